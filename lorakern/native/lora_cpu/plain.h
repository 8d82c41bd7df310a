/* lora_cpu.c, part 2 of 5: the single-adapter forward and backward (and DoRA's backward, which runs the same
 * passes on its scaled operands). */

/* dst = B^T (r x N) of B (N x r, row-major). The kernels read B^T's rows as vectors; torch's copy of a
 * transposed 768 x 8 took ~12 us a call (a 16-token layer's whole LoRA term costs ~8 us), this pass ~1 us.
 * The single-adapter passes transpose B themselves; the mixed ones call it per slot. */
void lora_transpose_f32(const float *B, int64_t N, int64_t r, float *dst) {
    for (int64_t j = 0; j < r; ++j)  /* B (N r floats) stays in L1; each row of dst is written in order */
        for (int64_t i = 0; i < N; ++i) dst[j * N + i] = B[i * r + j];
}

/* B^T of B (N x r) in fresh memory, for a pass that takes B as torch holds it (the caller frees it): the
 * rank updates and g B read B^T's rows as vectors; transposed here rather than by a call of its own from
 * Python, which cost more than a one-token layer's whole pass. */
static float *transposed_copy(const float *B, int64_t N, int64_t r) {
    float *Bt = (float *)malloc((size_t)(r * N) * sizeof(float));
    lora_transpose_f32(B, N, r, Bt);
    return Bt;
}

/* Forward: u = x~ A^T and y = b + s u B^T (bias may be NULL), B (N x r) as torch holds it. r <= 256. */
void lora_forward_f32(const float *x_lora, const float *A, const float *B, const float *bias, float scaling,
                      int64_t M, int64_t K, int64_t N, int64_t r, float *u, float *y, int threads) {
    int64_t blocks = (M + ROWS - 1) / ROWS;
    float *Bt = transposed_copy(B, N, r);
    #pragma omp parallel num_threads(threads)
    {
        float ublk[ROWS * 256], coef[ROWS * 256];
        float *spare = (float *)malloc((size_t)N * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            int64_t i0 = blk * ROWS;
            float *yr[ROWS];
            block_u(x_lora, A, i0, M, K, r, u, ublk);
            block_rows_out(y, i0, M, N, spare, yr);
            for (int64_t e = 0; e < ROWS * r; ++e) coef[e] = scaling * ublk[e];
            rank_update4(yr, bias, coef, Bt, r, N);
        }
        stream_fence();  /* this thread's streamed rows are visible before the region ends */
        free(spare);
    }
    free(Bt);
}

/* This thread's number and the team's size inside a parallel region (0 and 1 without OpenMP). */
static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* Row stride of a per-thread partial sum: a power-of-two row length (4096 floats) would put every row of
 * the r rows in the same L1 set, and updating them together thrashes it (measured 2.5x slower). */
static int64_t padded(int64_t len) {
    int64_t ld = (len + LANES - 1) / LANES * LANES + LANES;
    return ld % 1024 == 0 ? ld + LANES : ld;
}

/* Floats of scratch `lora_backward_f32` needs for `threads` threads. */
int64_t lora_backward_scratch(int64_t K, int64_t N, int64_t r, int threads) {
    return (int64_t)threads * r * (padded(K) + padded(N));
}

/* out (rows x len) = scaling * the sum over the team's partials (rows x ld each, `stride` floats apart).
 * Called inside the parallel region: the `omp for` splits runs of 256 columns of a row among its threads, and
 * each run is summed partial by partial along the row, so that the loops vectorize. The element-wise form
 * (collapse(2), a sum over the team per element) ran ~26 instructions an element: 77% of a one-row backward. */
#define REDUCE_RUN 256
static void reduce_partials(float *out, const float *partial, int64_t stride, int64_t ld, int team, int64_t rows,
                            int64_t len, float scaling) {
    int64_t runs = (len + REDUCE_RUN - 1) / REDUCE_RUN;
    #pragma omp for schedule(static)
    for (int64_t run = 0; run < rows * runs; ++run) {
        int64_t j = run / runs, n0 = run % runs * REDUCE_RUN, n1 = n0 + REDUCE_RUN < len ? n0 + REDUCE_RUN : len;
        float *o = out + j * len;
        const float *p = partial + j * ld;
        for (int64_t n = n0; n < n1; ++n) o[n] = p[n];
        for (int t = 1; t < team; ++t)
            for (int64_t n = n0; n < n1; ++n) o[n] += p[t * stride + n];
        for (int64_t n = n0; n < n1; ++n) o[n] *= scaling;
    }
}

/* acc[n] += sum over t < rows of a_t[n] * b_t[n]: column sums of the elementwise product of two chunks of
 * rows (DoRA's sum_rows(g * z)), four rows per read and write of acc. */
static void accumulate_products(float *acc, const float *const *a, const float *const *b, int64_t rows,
                                int64_t len) {
    int64_t t = 0;
    for (; t + ROWS <= rows; t += ROWS) {
        int64_t n = 0;
        for (; n + LANES <= len; n += LANES)
            store(acc + n, load(acc + n) + load(a[t] + n) * load(b[t] + n) + load(a[t + 1] + n) * load(b[t + 1] + n)
                           + load(a[t + 2] + n) * load(b[t + 2] + n) + load(a[t + 3] + n) * load(b[t + 3] + n));
        for (; n < len; ++n)
            acc[n] += a[t][n] * b[t][n] + a[t + 1][n] * b[t + 1][n] + a[t + 2][n] * b[t + 2][n] + a[t + 3][n] * b[t + 3][n];
    }
    for (; t < rows; ++t)
        for (int64_t n = 0; n < len; ++n) acc[n] += a[t][n] * b[t][n];
}

typedef int32_t vi __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
static inline vf vabs(vf v) { vi bits = (vi)v; bits &= 0x7fffffff; return (vf)bits; }

/* Over a chunk of rows t, for each column n, with d = y_t[n] - shift[n]:
 *   acc[n] += sum g_t[n] d        acc[ld + n] += sum |g_t[n]| (|y_t[n]| + |shift[n]|)        acc[2 ld + n] += sum |g_t[n] d|
 * DoRA's sum_rows(g * (y - b)) when the forward kept y = c z + b rather than z, with what bounds its rounding
 * (the second row: y - b loses what y's rounding loses) beside its size (the third): lorakern/dora.py
 * recomputes a column from z wherever the second is large against the third. */
static inline void shifted_product(float *acc, int64_t ld, int64_t n, float g, float y, float h) {
    float d = y - h;
    acc[n] += g * d;
    acc[ld + n] += fabsf(g) * (fabsf(y) + fabsf(h));
    acc[2 * ld + n] += fabsf(g * d);
}

static void accumulate_shifted_products(float *acc, int64_t ld, const float *const *g, const float *const *y,
                                        const float *shift, int64_t rows, int64_t len) {
    int64_t t = 0;
    for (; t + ROWS <= rows; t += ROWS) {  /* four rows per read and write of acc, in order along each row */
        int64_t n = 0;
        for (; n + LANES <= len; n += LANES) {
            vf h = load(shift + n), ah = vabs(h), s1 = load(acc + n), s2 = load(acc + ld + n), s3 = load(acc + 2 * ld + n);
            for (int q = 0; q < ROWS; ++q) {
                vf gt = load(g[t + q] + n), yt = load(y[t + q] + n), d = yt - h;
                s1 += gt * d;
                s2 += vabs(gt) * (vabs(yt) + ah);
                s3 += vabs(gt * d);
            }
            store(acc + n, s1);
            store(acc + ld + n, s2);
            store(acc + 2 * ld + n, s3);
        }
        for (; n < len; ++n)
            for (int q = 0; q < ROWS; ++q) shifted_product(acc, ld, n, g[t + q][n], y[t + q][n], shift[n]);
    }
    for (; t < rows; ++t)
        for (int64_t n = 0; n < len; ++n) shifted_product(acc, ld, n, g[t][n], y[t][n], shift[n]);
}

/* Ask for rows first .. first + count - 1 (positions below M) of a row-major matrix with rows of len floats to
 * be brought towards L2, one request per cache line; the row at position p is base + index(p) * len, index(p)
 * = p, or order[p] when order is given (a mixed batch's gathered rows, whose addresses no hardware
 * prefetcher can guess). The backward prefetches the next chunk's rows of g and x~ while it computes on this
 * chunk's (already in cache): its first passes over a chunk otherwise wait on memory (measured at 4096 x 768,
 * r=8, caches flushed before each call as in a training step: 2.08 -> 1.87 ms without dx's term, 2.56 -> 2.33
 * ms with it, the same a chunk further ahead or into L1 gaining no more; the mixed backward, 8 adapters: 2.53
 * -> 2.30 ms; the mixed forward, whose rows come in runs of a batch row's tokens, gained nothing). */
static inline void prefetch_rows(const float *base, const int64_t *order, int64_t first, int64_t count, int64_t M,
                                 int64_t len) {
    for (int64_t p = first; p < first + count && p < M; ++p) {
        const float *row = base + (order ? order[p] : p) * len;
        for (int64_t k = 0; k < len; k += 64 / (int64_t)sizeof(float)) __builtin_prefetch(row + k, 0, 2);
    }
}

/* Four-row blocks per chunk of the backward: as many as keep the chunk's rows of the matrices it reads twice
 * (g and x~, of `width` floats together) within CHUNK_BYTES of L2, from 1 to CHUNK_BLOCKS. 64 rows of 4096-wide
 * g and x~ took 2 MB, all of L2, and dA's pass read x~ again from L3 (4096 x 4096, r=16, caches flushed, without
 * dx's term: 16.5 -> 15.6 ms; 768-wide rows keep 64-row chunks). */
#define CHUNK_BYTES (512 * 1024)
static int64_t chunk_blocks(int64_t width) {
    int64_t blocks = CHUNK_BYTES / (width * (int64_t)sizeof(float) * ROWS);
    return blocks < 1 ? 1 : blocks > CHUNK_BLOCKS ? CHUNK_BLOCKS : blocks;
}

/* Threads for a backward over `chunks` chunks: no more than there are chunks (a thread without rows still paid
 * the team's start and the reduction), at least one. */
static int backward_team(int threads, int64_t chunks) {
    return chunks < 1 ? 1 : chunks < threads ? (int)chunks : threads;
}

/* The backward's passes (lora_backward_f32; dora_backward_f32 adds z and gz). */
static void backward_passes(const float *g, const float *x_lora, const float *u, const float *A, const float *Bt,
                            float scaling, int64_t M, int64_t K, int64_t N, int64_t r, float *dx, float *dA,
                            float *dBt, float *partial, const float *z, const float *z_shift, float *gz,
                            int threads) {
    int64_t blocks = (M + ROWS - 1) / ROWS;
    int64_t z_rows = z ? (z_shift ? 3 : 1) : 0;  /* gz's rows: sum_rows(g z), or the three sums of y mode */
    int64_t ldK = padded(K), ldN = padded(N), per_thread = r * (ldK + ldN) + z_rows * ldN;
    int need_gB = dx != NULL || dA != NULL, u_from_x = dBt != NULL && u == NULL;
    int64_t step = chunk_blocks(K + N);  /* z is read once, front to back: it need not stay */
    #pragma omp parallel num_threads(backward_team(threads, (blocks + step - 1) / step))
    {
        int tid = thread_id(), team = team_size();
        float *pA = partial + tid * per_thread, *pB = pA + r * ldK, *pZ = pB + r * ldN;
        if (dA) memset(pA, 0, (size_t)(r * ldK) * sizeof(float));
        if (dBt) memset(pB, 0, (size_t)(r * ldN) * sizeof(float));
        if (z) memset(pZ, 0, (size_t)(z_rows * ldN) * sizeof(float));
        float coef[ROWS * 256];
        float *spare = dx ? (float *)malloc((size_t)K * sizeof(float)) : NULL;
        float *gB = need_gB ? (float *)malloc((size_t)(CHUNK_BLOCKS * ROWS * r) * sizeof(float)) : NULL;
        /* u_from_x: the chunk's u = x~ A^T, computed here (the merged forward keeps no u) */
        float *uc = u_from_x ? (float *)malloc((size_t)(CHUNK_BLOCKS * ROWS * r) * sizeof(float)) : NULL;
        /* Rows go in chunks of `step` four-row blocks: g B and dx four rows at a time first, then dB (and DoRA's
         * sums) over the chunk's rows of g, then dA over the chunk. The partial sums are updated once per chunk
         * (in registers, accumulate_rows), and the second read of the chunk's g and x~ hits L2. g B goes first
         * because it reads four rows front to back, streams the hardware prefetcher follows, while
         * accumulate_rows walks column tiles down all the chunk's rows: as the first reader of g it waited on
         * memory (4096 x 768, r=8, two threads, caches flushed: 1.88 -> 1.62 ms, 2.11 -> 1.97 with dx's term). */
        #pragma omp for schedule(static)
        for (int64_t chunk = 0; chunk < blocks; chunk += step) {
            int64_t last = chunk + step < blocks ? chunk + step : blocks;
            int64_t row0 = chunk * ROWS, rows = (last * ROWS < M ? last * ROWS : M) - row0;
            const float *grows[CHUNK_BLOCKS * ROWS], *crows[CHUNK_BLOCKS * ROWS];
            row_pointers(g, N, NULL, row0, rows, grows);
            for (int64_t blk = chunk; need_gB && blk < last; ++blk) {
                int64_t i0 = blk * ROWS;
                int valid = (int)(M - i0 < ROWS ? M - i0 : ROWS);
                float *gBblk = gB + (i0 - row0) * r;
                /* the next chunk's rows, four per block (this thread's next chunk under the static schedule) */
                int64_t ahead = row0 + rows + (i0 - row0);
                prefetch_rows(g, NULL, ahead, ROWS, M, N);
                if (z) prefetch_rows(z, NULL, ahead, ROWS, M, N);
                if (dA || u_from_x) prefetch_rows(x_lora, NULL, ahead, ROWS, M, K);
                const float *gr[ROWS];
                block_rows(g, i0, M, N, gr);
                dots4(gr, Bt, r, N, gBblk);  /* rows past M (only in the last block) are never read below */
                if (dx) {
                    float *dr[ROWS];
                    block_rows_out(dx, i0, M, K, spare, dr);
                    for (int64_t e = 0; e < ROWS * r; ++e) coef[e] = e < valid * r ? scaling * gBblk[e] : 0.0f;
                    rank_update4(dr, NULL, coef, A, r, K);
                }
            }
            if (dBt) {
                if (u_from_x) {  /* four rows at a time; rows past the chunk land in uc's spare rows */
                    for (int64_t t0 = 0; t0 < rows; t0 += ROWS) {
                        const float *xr[ROWS];
                        block_rows(x_lora, row0 + t0, row0 + rows, K, xr);
                        dots4(xr, A, r, K, uc + t0 * r);
                    }
                    row_pointers(uc, r, NULL, 0, rows, crows);
                } else {
                    row_pointers(u, r, NULL, row0, rows, crows);
                }
                accumulate_rows(pB, ldN, crows, r, grows, N, rows);
            }
            if (z) {  /* the chunk's rows of g are in L2 from the passes above: gz costs a read of z only */
                const float *zrows[CHUNK_BLOCKS * ROWS];
                row_pointers(z, N, NULL, row0, rows, zrows);
                if (z_shift) accumulate_shifted_products(pZ, ldN, grows, zrows, z_shift, rows, N);
                else accumulate_products(pZ, grows, zrows, rows, N);
            }
            if (dA) {
                const float *xrows[CHUNK_BLOCKS * ROWS];
                row_pointers(gB, r, NULL, 0, rows, crows);
                row_pointers(x_lora, K, NULL, row0, rows, xrows);
                accumulate_rows(pA, ldK, crows, r, xrows, K, rows);
            }
        }
        stream_fence();  /* this thread's streamed rows are visible before the region ends */
        free(spare);
        free(gB);
        free(uc);
        /* the implicit barrier of `omp for` above: every partial is complete; reduce them column-wise */
        if (dA) reduce_partials(dA, partial, per_thread, ldK, team, r, K, scaling);
        if (dBt) reduce_partials(dBt, partial + r * ldK, per_thread, ldN, team, r, N, scaling);
        if (z) reduce_partials(gz, partial + r * (ldK + ldN), per_thread, ldN, team, z_rows, N, 1.0f);
    }
}

/* Backward. g (M x N); x_lora (M x K, needed for dA); u (M x r, for dB: when NULL, u = x~ A^T is computed
 * chunk by chunk from x_lora, which must then be given); B (N x r) as torch holds it; outputs that are NULL are
 * skipped: dx (M x K) = s gB A, dA (r x K) = s gB^T x~, dBt (r x N) = s u^T g. `partial` holds
 * lora_backward_scratch(K, N, r, threads) floats for the per-thread sums. r <= 256. */
void lora_backward_f32(const float *g, const float *x_lora, const float *u, const float *A, const float *B,
                       float scaling, int64_t M, int64_t K, int64_t N, int64_t r, float *dx, float *dA, float *dBt,
                       float *partial, int threads) {
    float *Bt = dx || dA ? transposed_copy(B, N, r) : NULL;  /* g B needs it: only dx and dA read g B */
    backward_passes(g, x_lora, u, A, Bt, scaling, M, K, N, r, dx, dA, dBt, partial, NULL, NULL, NULL, threads);
    free(Bt);
}

/* DoRA's backward with the magnitude scale folded into the operands (lorakern/dora.py): the LoRA backward above
 * on g with Bt = (c B)^T, and in the pass that computes dB, where the rows of g are still in cache:
 *   z_shift NULL: gz[n] = sum_i g[i, n] z[i, n] (z: M x N)
 *   z_shift given (z is then the output y, z_shift the bias): gz (3 x N) = the sums of accumulate_shifted_products.
 * `partial` holds dora_backward_scratch(K, N, r, threads) floats. */
void dora_backward_f32(const float *g, const float *x_lora, const float *u, const float *A, const float *Bt,
                       float scaling, int64_t M, int64_t K, int64_t N, int64_t r, float *dx, float *dA, float *dBt,
                       const float *z, const float *z_shift, float *gz, float *partial, int threads) {
    backward_passes(g, x_lora, u, A, Bt, scaling, M, K, N, r, dx, dA, dBt, partial, z, z_shift, gz, threads);
}

int64_t dora_backward_scratch(int64_t K, int64_t N, int64_t r, int threads) {
    return lora_backward_scratch(K, N, r, threads) + (int64_t)threads * 3 * padded(N);
}
