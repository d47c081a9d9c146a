/* The cells' first pass for one vector width; included by cellscan.c once per instruction set, with
 * KERNEL (function name), VBYTES (vector bytes), QB (queries per block), VB (vectors per block) and ATTR.
 *
 * For each cell, the queries that probe it are taken QB at a time against sub-chunks of VB * W columns of the
 * cell's packed rows ([dp][width] per chunk of up to 64 columns, so a chunk is read from L1 by every block of
 * queries): QB * VB accumulators stay in registers across the dp products, and the running minimum per column
 * lane is kept beside them, so no product matrix is ever written. GCC/Clang vector extensions keep one source for
 * AVX-512, AVX2, SSE2 and NEON. */

static ATTR void KERNEL(const float *lifted, int64_t dp, const float *packed, const int64_t *cell_cols,
                        const int64_t *group_starts, const int64_t *group_queries, int64_t *next_cell,
                        int64_t cells, float *best_value, int64_t *best_col)
{
    typedef float vf __attribute__((vector_size(VBYTES)));
    typedef int32_t vi __attribute__((vector_size(VBYTES)));
    enum { W = VBYTES / 4, SUB = VB * W };
    vi lane;
    for (int l = 0; l < W; ++l) lane[l] = l;
    /* Cells are claimed one at a time from a counter that the threads of a call share (a thread that starts late
     * or is preempted takes fewer), each thread lowering its own best_value / best_col. */
    for (;;) {
        const int64_t cell = __atomic_fetch_add(next_cell, 1, __ATOMIC_RELAXED);
        if (cell >= cells) break;
        const int64_t c0 = cell_cols[cell], c1 = cell_cols[cell + 1];
        const int64_t g0 = group_starts[cell], g1 = group_starts[cell + 1];
        for (int64_t g = g0; g < g1; g += QB) {
            const float *q[QB];
            vf bv[QB];
            vi bi[QB];
            for (int k = 0; k < QB; ++k) {
                /* a short last block repeats its last query (its result is not stored) */
                q[k] = lifted + dp * group_queries[g + k < g1 ? g + k : g1 - 1];
                bv[k] = (vf){0} + __builtin_inff();
                bi[k] = (vi){0};
            }
            for (int64_t chunk = c0; chunk < c1; chunk += 64) {
                const int64_t width = c1 - chunk < 64 ? c1 - chunk : 64;
                const float *base = packed + dp * chunk;
                int64_t s = 0;
                for (; s + SUB <= width; s += SUB) {
                    vf acc[QB][VB];
                    for (int k = 0; k < QB; ++k)
                        for (int v = 0; v < VB; ++v) acc[k][v] = (vf){0};
                    const float *p = base + s;
                    for (int64_t d = 0; d < dp; ++d, p += width) {
                        vf mv[VB];
                        for (int v = 0; v < VB; ++v) __builtin_memcpy(&mv[v], p + v * W, sizeof(vf));
                        for (int k = 0; k < QB; ++k) {
                            const float x = q[k][d];
                            for (int v = 0; v < VB; ++v) acc[k][v] += x * mv[v];
                        }
                    }
                    for (int k = 0; k < QB; ++k)
                        for (int v = 0; v < VB; ++v) {
                            /* strict <: the first column of equal values is kept, per lane */
                            vi less = acc[k][v] < bv[k];
                            vi at = lane + (int32_t)(chunk - c0 + s + v * W);
                            bv[k] = (vf)(((vi)acc[k][v] & less) | ((vi)bv[k] & ~less));
                            bi[k] = (at & less) | (bi[k] & ~less);
                        }
                }
                for (; s < width; s += W) {
                    vf acc[QB];
                    for (int k = 0; k < QB; ++k) acc[k] = (vf){0};
                    const float *p = base + s;
                    for (int64_t d = 0; d < dp; ++d, p += width) {
                        vf mv;
                        __builtin_memcpy(&mv, p, sizeof(vf));
                        for (int k = 0; k < QB; ++k) acc[k] += q[k][d] * mv;
                    }
                    for (int k = 0; k < QB; ++k) {
                        vi less = acc[k] < bv[k];
                        vi at = lane + (int32_t)(chunk - c0 + s);
                        bv[k] = (vf)(((vi)acc[k] & less) | ((vi)bv[k] & ~less));
                        bi[k] = (at & less) | (bi[k] & ~less);
                    }
                }
            }
            for (int k = 0; k < QB && g + k < g1; ++k) {
                float value = __builtin_inff();
                int32_t at = 0;
                for (int l = 0; l < W; ++l)
                    if (bv[k][l] < value || (bv[k][l] == value && bi[k][l] < at)) {
                        value = bv[k][l];
                        at = bi[k][l];
                    }
                const int64_t query = group_queries[g + k], col = c0 + at;
                if (value < best_value[query] || (value == best_value[query] && col < best_col[query])) {
                    best_value[query] = value;
                    best_col[query] = col;
                }
            }
        }
    }
}

/* The products themselves, for the exact search's pre-selection (search.PatchSearch._canonical_rows): out[q, c] =
 * lifted[q] . packed column c for the columns of cells cell_first..cell_last-1, out row-major [n, those columns].
 * Same blocking as the scan; padding columns come out +inf (their norm). */
static ATTR void VALUES(const float *lifted, int64_t n, int64_t dp, const float *packed, const int64_t *cell_cols,
                        int64_t cell_first, int64_t cell_last, float *out)
{
    typedef float vf __attribute__((vector_size(VBYTES)));
    enum { W = VBYTES / 4, SUB = VB * W };
    const int64_t c_first = cell_cols[cell_first], c_last = cell_cols[cell_last], span = c_last - c_first;
    /* Queries left over from the blocks of QB (the exact re-rank often has one) go one at a time: a block padded with
     * copies would do QB times the work. */
    const int64_t blocked = n / QB * QB;
    for (int64_t g = blocked; g < n; ++g) {
        const float *q = lifted + dp * g;
        float *row = out + span * g;
        for (int64_t cell = cell_first; cell < cell_last; ++cell) {
            const int64_t c0 = cell_cols[cell], c1 = cell_cols[cell + 1];
            for (int64_t chunk = c0; chunk < c1; chunk += 64) {
                const int64_t width = c1 - chunk < 64 ? c1 - chunk : 64;
                const float *base = packed + dp * chunk;
                int64_t s = 0;
                for (; s + SUB <= width; s += SUB) {
                    vf acc[VB];
                    for (int v = 0; v < VB; ++v) acc[v] = (vf){0};
                    const float *p = base + s;
                    for (int64_t d = 0; d < dp; ++d, p += width) {
                        for (int v = 0; v < VB; ++v) {
                            vf mv;
                            __builtin_memcpy(&mv, p + v * W, sizeof(vf));
                            acc[v] += q[d] * mv;
                        }
                    }
                    for (int v = 0; v < VB; ++v) __builtin_memcpy(row + (chunk - c_first) + s + v * W, &acc[v], sizeof(vf));
                }
                for (; s < width; s += W) {
                    vf acc = (vf){0};
                    const float *p = base + s;
                    for (int64_t d = 0; d < dp; ++d, p += width) {
                        vf mv;
                        __builtin_memcpy(&mv, p, sizeof(vf));
                        acc += q[d] * mv;
                    }
                    __builtin_memcpy(row + (chunk - c_first) + s, &acc, sizeof(vf));
                }
            }
        }
    }
    for (int64_t g = 0; g < blocked; g += QB) {
        const float *q[QB];
        float *row[QB];
        for (int k = 0; k < QB; ++k) {
            const int64_t at = g + k < n ? g + k : n - 1;
            q[k] = lifted + dp * at;
            row[k] = out + span * at;
        }
        for (int64_t cell = cell_first; cell < cell_last; ++cell) {
            const int64_t c0 = cell_cols[cell], c1 = cell_cols[cell + 1];
            for (int64_t chunk = c0; chunk < c1; chunk += 64) {
                const int64_t width = c1 - chunk < 64 ? c1 - chunk : 64;
                const float *base = packed + dp * chunk;
                int64_t s = 0;
                for (; s + SUB <= width; s += SUB) {
                    vf acc[QB][VB];
                    for (int k = 0; k < QB; ++k)
                        for (int v = 0; v < VB; ++v) acc[k][v] = (vf){0};
                    const float *p = base + s;
                    for (int64_t d = 0; d < dp; ++d, p += width) {
                        vf mv[VB];
                        for (int v = 0; v < VB; ++v) __builtin_memcpy(&mv[v], p + v * W, sizeof(vf));
                        for (int k = 0; k < QB; ++k) {
                            const float x = q[k][d];
                            for (int v = 0; v < VB; ++v) acc[k][v] += x * mv[v];
                        }
                    }
                    /* a short last block repeats its last query: it writes that query's row again, same values */
                    for (int k = 0; k < QB; ++k)
                        for (int v = 0; v < VB; ++v)
                            __builtin_memcpy(row[k] + (chunk - c_first) + s + v * W, &acc[k][v], sizeof(vf));
                }
                for (; s < width; s += W) {
                    vf acc[QB];
                    for (int k = 0; k < QB; ++k) acc[k] = (vf){0};
                    const float *p = base + s;
                    for (int64_t d = 0; d < dp; ++d, p += width) {
                        vf mv;
                        __builtin_memcpy(&mv, p, sizeof(vf));
                        for (int k = 0; k < QB; ++k) acc[k] += q[k][d] * mv;
                    }
                    for (int k = 0; k < QB; ++k) __builtin_memcpy(row[k] + (chunk - c_first) + s, &acc[k], sizeof(vf));
                }
            }
        }
    }
}
