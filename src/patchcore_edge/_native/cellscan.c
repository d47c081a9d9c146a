/* patchcore_edge._cellscan: the k-means cells' first pass (search.CellIndex) as one compiled loop.
 *
 * Optional: search.py falls back to numpy when this module was not built. It only *chooses* bank rows (the first
 * pass's own values are discarded and every reported distance is recomputed by search.row_distances), so its
 * rounding, which differs from BLAS's, cannot change an image score (scoring.py's re-rank proof).
 * Arrays come through the buffer protocol (C-contiguous, checked sizes): no numpy headers at build time. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(_M_X64)
/* 32 zmm registers: 6 x 4 accumulators, 4 loads, a broadcast (6 x 4: 1.34 ms against 1.60 for 4 x 4 on the bottle
 * bank, 10 loads per 24 products instead of 8 per 16; benchmarks/results/runtime_vs_anomalib.md, session 8). */
#define KERNEL scan_avx512
#define VALUES values_avx512
#define VBYTES 64
#define QB 6
#define VB 4
#define ATTR __attribute__((target("avx512f,fma")))
#include "cellscan_kernel.h"
#undef KERNEL
#undef VALUES
#undef VBYTES
#undef QB
#undef VB
#undef ATTR
/* 16 ymm registers: 6 x 2 accumulators, 2 loads, a broadcast. */
#define KERNEL scan_avx2
#define VALUES values_avx2
#define VBYTES 32
#define QB 6
#define VB 2
#define ATTR __attribute__((target("avx2,fma")))
#include "cellscan_kernel.h"
#undef KERNEL
#undef VALUES
#undef VBYTES
#undef QB
#undef VB
#undef ATTR
#define KERNEL scan_base
#define VALUES values_base
#define VBYTES 16
#define QB 6
#define VB 2
#define ATTR
#include "cellscan_kernel.h"
#define BASE_NAME "sse2"
#elif defined(__aarch64__)
/* 32 NEON registers: 6 x 4 accumulators, 4 loads, a broadcast. */
#define KERNEL scan_base
#define VALUES values_base
#define VBYTES 16
#define QB 6
#define VB 4
#define ATTR
#include "cellscan_kernel.h"
#define BASE_NAME "neon"
#else
#define KERNEL scan_base
#define VALUES values_base
#define VBYTES 16
#define QB 2
#define VB 2
#define ATTR
#include "cellscan_kernel.h"
#define BASE_NAME "generic"
#endif

typedef void (*scan_fn)(const float *, int64_t, const float *, const int64_t *, const int64_t *, const int64_t *,
                        int64_t *, int64_t, float *, int64_t *);

typedef void (*values_fn)(const float *, int64_t, int64_t, const float *, const int64_t *, int64_t, int64_t, float *);

static scan_fn chosen_scan = NULL;
static values_fn chosen_values = NULL;
static const char *chosen_name = NULL;

static void choose(void)
{
    if (chosen_scan != NULL) return;
    chosen_scan = scan_base;
    chosen_values = values_base;
    chosen_name = BASE_NAME;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        chosen_scan = scan_avx512;
        chosen_values = values_avx512;
        chosen_name = "avx512";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        chosen_scan = scan_avx2;
        chosen_values = values_avx2;
        chosen_name = "avx2";
    }
#endif
}

static int need(Py_buffer *buffer, Py_ssize_t items, Py_ssize_t item_bytes, const char *name)
{
    if (items < 0 || buffer->len != items * item_bytes) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", name, buffer->len, items * item_bytes);
        return 0;
    }
    return 1;
}

/* group_starts ascending from 0, group_queries holding as many entries as the last says. */
static int groups_ok(const int64_t *group_starts, Py_ssize_t cells, Py_buffer *queries)
{
    if (group_starts[0] != 0) return 0;
    for (Py_ssize_t j = 0; j < cells; ++j)
        if (group_starts[j + 1] < group_starts[j]) return 0;
    return queries->len == (Py_ssize_t)(group_starts[cells] * 8);
}

/* Releases the buffers a call took (NULL-terminated list). */
static void release(Py_buffer *const *held)
{
    for (; *held != NULL; ++held) PyBuffer_Release(*held);
}

/* The packed layout: cell_cols ascending from 0 in steps that are multiples of 16, packed holding dp floats per column. */
static int layout_ok(Py_buffer *packed, const int64_t *cell_cols, Py_ssize_t cells, Py_ssize_t dp)
{
    if (cell_cols[0] != 0) return 0;
    for (Py_ssize_t j = 0; j < cells; ++j) {
        const int64_t width = cell_cols[j + 1] - cell_cols[j];
        if (width < 16 || width % 16 != 0) return 0;
    }
    return packed->len == (Py_ssize_t)(cell_cols[cells] * dp * 4);
}

/* probe(values, n, cells, probes, group_starts, group_queries): each query's `probes` cells with the smallest
 * values (float32 [n, cells]: the lifted query times the augmented centres; ties: the lower cell), grouped by cell:
 * group_starts [cells + 1] (int64), group_queries [n * probes] (int64, ascending query numbers within a cell). */
static PyObject *probe(PyObject *self, PyObject *args)
{
    Py_buffer values, starts, queries;
    Py_ssize_t n, cells, probes;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnnw*w*", &values, &n, &cells, &probes, &starts, &queries)) return NULL;
    PyObject *result = NULL;
    int32_t *picked = NULL;
    int64_t *fill = NULL;
    if (n < 0 || cells < 1 || probes < 1 || probes > cells) {
        PyErr_SetString(PyExc_ValueError, "probe: bad sizes");
        goto done;
    }
    if (!need(&values, n * cells, 4, "values") || !need(&starts, cells + 1, 8, "group_starts")
        || !need(&queries, n * probes, 8, "group_queries"))
        goto done;
    picked = malloc(sizeof(int32_t) * (size_t)(n * probes + 1));
    fill = calloc((size_t)cells + 1, sizeof(int64_t));
    if (picked == NULL || fill == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const float *all = values.buf;
    int64_t *group_starts = starts.buf, *group_queries = queries.buf;
    for (Py_ssize_t i = 0; i < n; ++i) {
        const float *row = all + i * cells;
        /* insertion into the `probes` smallest so far, ordered by (value, cell); NaN is never taken before a number */
        int32_t *best = picked + i * probes;
        Py_ssize_t kept = 0;
        for (Py_ssize_t j = 0; j < cells; ++j) {
            const float v = row[j];
            if (kept == probes && !(v < row[best[kept - 1]])) continue;
            Py_ssize_t at = kept < probes ? kept++ : probes - 1;
            while (at > 0 && v < row[best[at - 1]]) {
                best[at] = best[at - 1];
                --at;
            }
            best[at] = (int32_t)j;
        }
    }
    for (Py_ssize_t i = 0; i < n * probes; ++i) fill[picked[i] + 1] += 1;
    for (Py_ssize_t j = 0; j < cells; ++j) fill[j + 1] += fill[j];
    for (Py_ssize_t j = 0; j <= cells; ++j) group_starts[j] = fill[j];
    for (Py_ssize_t i = 0; i < n * probes; ++i) group_queries[fill[picked[i]]++] = i / probes;
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(picked);
    free(fill);
    release((Py_buffer *const[]){&values, &starts, &queries, NULL});
    return result;
}

/* scan(lifted, n, dp, packed, cell_cols, cells, group_starts, group_queries, next_cell, best_value, best_col): for the
 * cells claimed from next_cell (int64 [1], shared by the threads of one search, claimed up to `cells`), lowers
 * best_value[q] / best_col[q] (float32 / int64 [n], the smallest lifted . column and its packed column, ties: the
 * lower column) of every query that probes them. */
static PyObject *scan(PyObject *self, PyObject *args)
{
    Py_buffer lifted, packed, cols, starts, queries, counter, value, col;
    Py_ssize_t n, dp, cells;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nny*y*ny*y*w*w*w*", &lifted, &n, &dp, &packed, &cols, &cells, &starts, &queries,
                          &counter, &value, &col))
        return NULL;
    PyObject *result = NULL;
    if (n < 0 || dp < 1 || cells < 1) {
        PyErr_SetString(PyExc_ValueError, "scan: bad sizes");
        goto done;
    }
    if (!need(&lifted, n * dp, 4, "lifted") || !need(&cols, cells + 1, 8, "cell_cols")
        || !need(&starts, cells + 1, 8, "group_starts") || !need(&counter, 1, 8, "next_cell")
        || !need(&value, n, 4, "best_value") || !need(&col, n, 8, "best_col"))
        goto done;
    if (*(int64_t *)counter.buf < 0) {
        PyErr_SetString(PyExc_ValueError, "scan: next_cell below 0");
        goto done;
    }
    const int64_t *cell_cols = cols.buf, *group_starts = starts.buf, *group_queries = queries.buf;
    /* Every offset the kernel will read is checked here, once. */
    if (!layout_ok(&packed, cell_cols, cells, dp) || !groups_ok(group_starts, cells, &queries)) {
        PyErr_SetString(PyExc_ValueError, "scan: inconsistent layout");
        goto done;
    }
    for (Py_ssize_t i = 0; i < group_starts[cells]; ++i)
        if (group_queries[i] < 0 || group_queries[i] >= n) {
            PyErr_SetString(PyExc_ValueError, "scan: query number out of range");
            goto done;
        }
    choose();
    Py_BEGIN_ALLOW_THREADS
    chosen_scan(lifted.buf, dp, packed.buf, cell_cols, group_starts, group_queries, counter.buf, cells, value.buf, col.buf);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release((Py_buffer *const[]){&lifted, &packed, &cols, &starts, &queries, &counter, &value, &col, NULL});
    return result;
}

/* values(lifted, n, dp, packed, cell_cols, cells, cell_first, cell_last, out): out [n, columns of those cells]
 * (float32, row-major) = lifted . each packed column. */
static PyObject *values(PyObject *self, PyObject *args)
{
    Py_buffer lifted, packed, cols, out;
    Py_ssize_t n, dp, cells, first, last;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nny*y*nnnw*", &lifted, &n, &dp, &packed, &cols, &cells, &first, &last, &out))
        return NULL;
    PyObject *result = NULL;
    if (n < 1 || dp < 1 || cells < 1 || first < 0 || last > cells || first >= last) {
        PyErr_SetString(PyExc_ValueError, "values: bad sizes");
        goto done;
    }
    if (!need(&lifted, n * dp, 4, "lifted") || !need(&cols, cells + 1, 8, "cell_cols")) goto done;
    const int64_t *cell_cols = cols.buf;
    if (!layout_ok(&packed, cell_cols, cells, dp)) {
        PyErr_SetString(PyExc_ValueError, "values: inconsistent layout");
        goto done;
    }
    if (!need(&out, n * (Py_ssize_t)(cell_cols[last] - cell_cols[first]), 4, "out")) goto done;
    choose();
    Py_BEGIN_ALLOW_THREADS
    chosen_values(lifted.buf, n, dp, packed.buf, cell_cols, first, last, out.buf);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release((Py_buffer *const[]){&lifted, &packed, &cols, &out, NULL});
    return result;
}

static PyObject *variant(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    choose();
    return PyUnicode_FromString(chosen_name);
}

static PyMethodDef methods[] = {
    {"probe", probe, METH_VARARGS, "Each query's nearest cells, grouped by cell."},
    {"scan", scan, METH_VARARGS, "The smallest lifted product per query over its probed cells' rows."},
    {"values", values, METH_VARARGS, "The lifted products with the packed columns of a range of cells."},
    {"variant", variant, METH_NOARGS, "The instruction set the scan runs with."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cellscan", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cellscan(void) { return PyModule_Create(&module); }
