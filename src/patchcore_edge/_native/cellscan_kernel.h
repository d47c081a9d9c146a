/* The cells' first pass for one vector width; included by cellscan.c once per instruction set, with
 * KERNEL and VALUES (function names), VBYTES (vector bytes), QB (queries per block), VB (vectors per block) and ATTR.
 *
 * For each cell, the queries that probe it are taken QB at a time against sub-chunks of VB * W columns of the
 * cell's packed rows ([dp][width] per chunk of up to 64 columns, so a chunk is read from L1 by every block of
 * queries): QB * VB accumulators stay in registers across the dp products, and the running minimum per column
 * lane is kept beside them, so no product matrix is ever written. GCC/Clang vector extensions keep one source for
 * AVX-512, AVX2, SSE2 and NEON. */

#define CELLSCAN_CAT_(a, b) a##b
#define CELLSCAN_CAT(a, b) CELLSCAN_CAT_(a, b)
#define VF CELLSCAN_CAT(KERNEL, _vf)
#define VI CELLSCAN_CAT(KERNEL, _vi)
#define BLOCK CELLSCAN_CAT(KERNEL, _block)
#define SINGLE CELLSCAN_CAT(KERNEL, _single)
#define LOWER CELLSCAN_CAT(KERNEL, _lower)
#define STORE_ROWS CELLSCAN_CAT(KERNEL, _store_rows)

typedef float VF __attribute__((vector_size(VBYTES)));
typedef int32_t VI __attribute__((vector_size(VBYTES)));

/* acc[k][v] = q[k] . the VB vectors of columns at p (rows `width` floats apart), for the first nq queries. Inlined
 * with a constant nq, so that the accumulators live in registers. */
static inline __attribute__((always_inline)) ATTR void BLOCK(const float *const *q, int nq, const float *p,
                                                             int64_t width, int64_t dp, VF acc[QB][VB])
{
    enum { W = VBYTES / 4 };
    for (int k = 0; k < nq; ++k)
        for (int v = 0; v < VB; ++v) acc[k][v] = (VF){0};
    for (int64_t d = 0; d < dp; ++d, p += width) {
        VF mv[VB];
        for (int v = 0; v < VB; ++v) __builtin_memcpy(&mv[v], p + v * W, sizeof(VF));
        for (int k = 0; k < nq; ++k) {
            const float x = q[k][d];
            for (int v = 0; v < VB; ++v) acc[k][v] += x * mv[v];
        }
    }
}

/* acc[k] = q[k] . one vector of columns at p: a chunk's last columns short of VB vectors. */
static inline __attribute__((always_inline)) ATTR void SINGLE(const float *const *q, int nq, const float *p,
                                                              int64_t width, int64_t dp, VF acc[QB])
{
    for (int k = 0; k < nq; ++k) acc[k] = (VF){0};
    for (int64_t d = 0; d < dp; ++d, p += width) {
        VF mv;
        __builtin_memcpy(&mv, p, sizeof(VF));
        for (int k = 0; k < nq; ++k) acc[k] += q[k][d] * mv;
    }
}

/* Lowers the running minimum (bv, bi: value and column per lane) with the values of columns first..first+W-1;
 * strict <: the first column of equal values is kept, per lane. */
static inline __attribute__((always_inline)) ATTR void LOWER(VF value, int32_t first, VI lane, VF *bv, VI *bi)
{
    VI less = value < *bv;
    VI at = lane + first;
    *bv = (VF)(((VI)value & less) | ((VI)*bv & ~less));
    *bi = (at & less) | (*bi & ~less);
}

static ATTR void KERNEL(const float *lifted, int64_t dp, const float *packed, const int64_t *cell_cols,
                        const int64_t *group_starts, const int64_t *group_queries, int64_t *next_cell,
                        int64_t cells, float *best_value, int64_t *best_col)
{
    enum { W = VBYTES / 4, SUB = VB * W };
    VI lane;
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
            VF bv[QB];
            VI bi[QB];
            for (int k = 0; k < QB; ++k) {
                /* a short last block repeats its last query (its result is not stored) */
                q[k] = lifted + dp * group_queries[g + k < g1 ? g + k : g1 - 1];
                bv[k] = (VF){0} + __builtin_inff();
                bi[k] = (VI){0};
            }
            for (int64_t chunk = c0; chunk < c1; chunk += 64) {
                const int64_t width = c1 - chunk < 64 ? c1 - chunk : 64;
                const float *base = packed + dp * chunk;
                int64_t s = 0;
                for (; s + SUB <= width; s += SUB) {
                    VF acc[QB][VB];
                    BLOCK(q, QB, base + s, width, dp, acc);
                    for (int k = 0; k < QB; ++k)
                        for (int v = 0; v < VB; ++v)
                            LOWER(acc[k][v], (int32_t)(chunk - c0 + s + v * W), lane, &bv[k], &bi[k]);
                }
                for (; s < width; s += W) {
                    VF acc[QB];
                    SINGLE(q, QB, base + s, width, dp, acc);
                    for (int k = 0; k < QB; ++k) LOWER(acc[k], (int32_t)(chunk - c0 + s), lane, &bv[k], &bi[k]);
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

/* out rows [nq] of the columns of cells cell_first..cell_last-1 (column c_first first) = q[k] . each column. */
static inline __attribute__((always_inline)) ATTR void STORE_ROWS(const float *const *q, float *const *row, int nq,
                                                                  int64_t dp, const float *packed,
                                                                  const int64_t *cell_cols, int64_t cell_first,
                                                                  int64_t cell_last)
{
    enum { W = VBYTES / 4, SUB = VB * W };
    const int64_t c_first = cell_cols[cell_first];
    for (int64_t cell = cell_first; cell < cell_last; ++cell) {
        const int64_t c0 = cell_cols[cell], c1 = cell_cols[cell + 1];
        for (int64_t chunk = c0; chunk < c1; chunk += 64) {
            const int64_t width = c1 - chunk < 64 ? c1 - chunk : 64;
            const float *base = packed + dp * chunk;
            int64_t s = 0;
            for (; s + SUB <= width; s += SUB) {
                VF acc[QB][VB];
                BLOCK(q, nq, base + s, width, dp, acc);
                for (int k = 0; k < nq; ++k)
                    for (int v = 0; v < VB; ++v)
                        __builtin_memcpy(row[k] + (chunk - c_first) + s + v * W, &acc[k][v], sizeof(VF));
            }
            for (; s < width; s += W) {
                VF acc[QB];
                SINGLE(q, nq, base + s, width, dp, acc);
                for (int k = 0; k < nq; ++k) __builtin_memcpy(row[k] + (chunk - c_first) + s, &acc[k], sizeof(VF));
            }
        }
    }
}

/* The products themselves, for the exact search's pre-selection (search.PatchSearch._canonical_rows): out[q, c] =
 * lifted[q] . packed column c for the columns of cells cell_first..cell_last-1, out row-major [n, those columns].
 * Same blocking as the scan; padding columns come out +inf (their norm). Queries left over from the blocks of QB
 * (the exact re-rank often has one) go one at a time: a block padded with copies would do QB times the work. */
static ATTR void VALUES(const float *lifted, int64_t n, int64_t dp, const float *packed, const int64_t *cell_cols,
                        int64_t cell_first, int64_t cell_last, float *out)
{
    const int64_t span = cell_cols[cell_last] - cell_cols[cell_first], blocked = n / QB * QB;
    for (int64_t g = 0; g < blocked; g += QB) {
        const float *q[QB];
        float *row[QB];
        for (int k = 0; k < QB; ++k) {
            q[k] = lifted + dp * (g + k);
            row[k] = out + span * (g + k);
        }
        STORE_ROWS(q, row, QB, dp, packed, cell_cols, cell_first, cell_last);
    }
    for (int64_t g = blocked; g < n; ++g) {
        const float *q[1] = {lifted + dp * g};
        float *row[1] = {out + span * g};
        STORE_ROWS(q, row, 1, dp, packed, cell_cols, cell_first, cell_last);
    }
}

#undef VF
#undef VI
#undef BLOCK
#undef SINGLE
#undef LOWER
#undef STORE_ROWS
