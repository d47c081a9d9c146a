/* Runs the cells' scan kernel (src/patchcore_edge/_native/cellscan_kernel.h) on arrays read from files, for the
 * test that cross-compiles it for aarch64 (NEON, as on a Jetson) and runs it under qemu (tests/test_cells.py).
 * usage: harness DIR N DP CELLS  (DIR holds lifted.f32 packed.f32 cell_cols.i64 starts.i64 grouped.i64; writes
 * col.i64) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define KERNEL scan_neon
#define VALUES values_neon
#define VBYTES 16
#define QB 6
#define VB 4
#define ATTR
#include "cellscan_kernel.h"

static void *slurp(const char *dir, const char *name, long *size)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *data = malloc((size_t)*size + 1);
    if (fread(data, 1, (size_t)*size, f) != (size_t)*size) { perror(path); exit(2); }
    fclose(f);
    return data;
}

int main(int argc, char **argv)
{
    if (argc != 5) return 2;
    const char *dir = argv[1];
    const int64_t n = atoll(argv[2]), dp = atoll(argv[3]), cells = atoll(argv[4]);
    long size;
    const float *lifted = slurp(dir, "lifted.f32", &size), *packed = slurp(dir, "packed.f32", &size);
    const int64_t *cols = slurp(dir, "cell_cols.i64", &size), *starts = slurp(dir, "starts.i64", &size);
    const int64_t *grouped = slurp(dir, "grouped.i64", &size);
    float *value = malloc(sizeof(float) * (size_t)n);
    int64_t *col = malloc(sizeof(int64_t) * (size_t)n);
    for (int64_t i = 0; i < n; ++i) { value[i] = __builtin_inff(); col[i] = INT64_MAX; }
    int64_t next_cell = 0;
    scan_neon(lifted, dp, packed, cols, starts, grouped, &next_cell, cells, value, col);
    char path[4096];
    snprintf(path, sizeof path, "%s/col.i64", dir);
    FILE *f = fopen(path, "wb");
    fwrite(col, sizeof(int64_t), (size_t)n, f);
    fclose(f);
    return 0;
}
