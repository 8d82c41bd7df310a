/* lora_cpu.c, part 3 of 5: mixed-adapter batches (lorakern/mixed_c.py). */

/* ---- Mixed-adapter batches: each row of x~ uses the adapter of its slot ---------------------------------
 * Rows come grouped by slot: slot a's rows are order[offsets[a] .. offsets[a + 1]) (n_slots slots); rows of
 * no slot (order[offsets[n_slots] ..), base only) and rows of a slot whose A[a] is NULL (a layer without that
 * adapter) get no rank-r term. Per slot: A[a] (r[a] x K), Bt[a] (r[a] x N), scaling[a]. u is M x r_max, row i's
 * first r[slot] entries used. The kernels are the single-adapter ones over gathered row pointers. */

/* dst = the slots' B_a^T (r[a] x N each), one after another; slots whose B[a] is NULL take no room. */
void lora_transpose_many_f32(const float *const *B, const int64_t *ranks, int64_t n_slots, int64_t N, float *dst) {
    for (int64_t a = 0; a < n_slots; ++a) {
        if (!B[a]) continue;
        lora_transpose_f32(B[a], N, ranks[a], dst);
        dst += ranks[a] * N;
    }
}

/* Four-row blocks of the slots' segments, numbered across slots: `first_block[a]` is slot a's first. */
static int64_t segment_blocks(const int64_t *offsets, const float *const *A, int64_t n_slots, int64_t unit,
                              int64_t *first_block) {
    int64_t total = 0;
    for (int64_t a = 0; a < n_slots; ++a) {
        first_block[a] = total;
        if (A[a]) total += (offsets[a + 1] - offsets[a] + unit - 1) / unit;
    }
    first_block[n_slots] = total;
    return total;
}

static int64_t slot_of_block(const int64_t *first_block, int64_t n_slots, int64_t blk) {
    int64_t a = 0;
    /* slots without blocks have first_block[a + 1] == first_block[a]; blk < the total, so a stays below n_slots */
    while (a + 1 < n_slots && first_block[a + 1] <= blk) ++a;
    return a;
}

/* The row at position p of the grouped order when it gets no rank-r term (a row of no slot, or of a slot
 * without an adapter), else -1. */
static inline int64_t plain_row(const int64_t *order, const int64_t *offsets, const float *const *A,
                                int64_t n_slots, int64_t p) {
    int64_t a = 0;
    while (a < n_slots && offsets[a + 1] <= p) ++a;
    return a < n_slots && A[a] ? -1 : order[p];
}

/* Rows of the batch that get no rank-r term: rows of no slot, and the rows of slots without an adapter. */
static void fill_plain_rows(const int64_t *order, const int64_t *offsets, const float *const *A, int64_t n_slots,
                            int64_t M, const float *fill, int64_t len, float *out) {
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < M; ++p) {
        int64_t i = plain_row(order, offsets, A, n_slots, p);
        if (i < 0) continue;
        float *row = out + i * len;
        if (fill) memcpy(row, fill, (size_t)len * sizeof(float));
        else memset(row, 0, (size_t)len * sizeof(float));
    }
}

/* Forward: u_i = x~_i A_a^T and y_i = b + s_a u_i B_a^T for each row i of slot a; y_i = b (0 without bias) for
 * the rows without a term. The base GEMM then accumulates x W^T onto every row of y. */
void lora_mixed_forward_f32(const float *x_lora, const int64_t *order, const int64_t *offsets, int64_t n_slots,
                            const float *const *A, const float *const *Bt, const int64_t *ranks, const float *scaling,
                            const float *bias, int64_t M, int64_t K, int64_t N, int64_t r_max, float *u, float *y,
                            int threads) {
    int64_t first_block[n_slots + 1];
    int64_t blocks = segment_blocks(offsets, A, n_slots, ROWS, first_block);
    #pragma omp parallel num_threads(threads)
    {
        float ublk[ROWS * 256], coef[ROWS * 256];
        float *spare = (float *)malloc((size_t)N * sizeof(float));
        fill_plain_rows(order, offsets, A, n_slots, M, bias, N, y);
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            int64_t a = slot_of_block(first_block, n_slots, blk), r = ranks[a];
            int64_t p0 = offsets[a] + (blk - first_block[a]) * ROWS;
            int valid = (int)(offsets[a + 1] - p0 < ROWS ? offsets[a + 1] - p0 : ROWS);
            const float *xr[ROWS];
            float *yr[ROWS];
            for (int q = 0; q < ROWS; ++q) {
                int64_t i = order[p0 + (q < valid ? q : 0)];
                xr[q] = x_lora + i * K;
                yr[q] = q < valid ? y + i * N : spare;
            }
            dots4(xr, A[a], r, K, ublk);
            for (int q = 0; q < valid; ++q) memcpy(u + order[p0 + q] * r_max, ublk + q * r, r * sizeof(float));
            for (int64_t e = 0; e < ROWS * r; ++e) coef[e] = scaling[a] * ublk[e];
            rank_update4(yr, bias, coef, Bt[a], r, N);
        }
        stream_fence();
        free(spare);
    }
}

/* Floats of scratch `lora_mixed_backward_f32` needs: per thread, an r[a] x (K + N) partial per adapter. */
int64_t lora_mixed_backward_scratch(int64_t K, int64_t N, const int64_t *ranks, const float *const *A, int64_t n_slots,
                                    int threads) {
    int64_t per_thread = 0;
    for (int64_t a = 0; a < n_slots; ++a)
        if (A[a]) per_thread += ranks[a] * (padded(K) + padded(N));
    return (int64_t)threads * per_thread;
}

/* Backward, per slot a and row i of it: gB_i = g_i B_a; dx~_i = s_a gB_i A_a (rows without a term: 0; the base
 * GEMM then accumulates g W onto every row); dA_a = s_a sum_i gB_i^T x~_i; dB_a^T = s_a sum_i u_i^T g_i. The sums
 * run per thread over chunks of up to 64 rows of one slot (accumulate_rows), then reduced. NULL outputs are
 * skipped: dx, or dA[a] / dBt[a] of an adapter whose factor needs no gradient. */
void lora_mixed_backward_f32(const float *g, const float *x_lora, const float *u, const int64_t *order,
                             const int64_t *offsets, int64_t n_slots, const float *const *A, const float *const *Bt,
                             const int64_t *ranks, const float *scaling, int64_t M, int64_t K, int64_t N,
                             int64_t r_max, float *dx, float *const *dA, float *const *dBt, float *partial,
                             int threads) {
    const int64_t chunk_rows = chunk_blocks(K + N) * ROWS;  /* as the single-adapter backward sizes its chunks */
    int64_t first_chunk[n_slots + 1], part[n_slots + 1];
    int64_t chunks = segment_blocks(offsets, A, n_slots, chunk_rows, first_chunk);
    int64_t ldK = padded(K), ldN = padded(N);
    part[0] = 0;
    for (int64_t a = 0; a < n_slots; ++a) part[a + 1] = part[a] + (A[a] ? ranks[a] * (ldK + ldN) : 0);
    int64_t per_thread = part[n_slots];
    #pragma omp parallel num_threads(backward_team(threads, chunks))
    {
        int tid = thread_id(), team = team_size();
        float *mine = partial + tid * per_thread;
        memset(mine, 0, (size_t)per_thread * sizeof(float));
        float coef[ROWS * 256];
        float *gB = (float *)malloc((size_t)(chunk_rows * r_max) * sizeof(float));
        float *spare = (float *)malloc((size_t)K * sizeof(float));
        if (dx) fill_plain_rows(order, offsets, A, n_slots, M, NULL, K, dx);
        #pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t a = slot_of_block(first_chunk, n_slots, c), r = ranks[a];
            int64_t p0 = offsets[a] + (c - first_chunk[a]) * chunk_rows;
            int64_t rows = offsets[a + 1] - p0 < chunk_rows ? offsets[a + 1] - p0 : chunk_rows;
            float *pA = mine + part[a], *pB = pA + r * ldK;
            const float *grows[CHUNK_BLOCKS * ROWS], *crows[CHUNK_BLOCKS * ROWS], *xrows[CHUNK_BLOCKS * ROWS];
            row_pointers(g, N, order, p0, rows, grows);
            /* g B first, four rows at a time, then dB and dA: the order of the single-adapter backward */
            for (int64_t t0 = 0; (dx || dA[a]) && t0 < rows; t0 += ROWS) {
                int valid = (int)(rows - t0 < ROWS ? rows - t0 : ROWS);
                const float *gr[ROWS];
                /* the next chunk's rows, four per block (as the single-adapter backward does) */
                prefetch_rows(g, order, p0 + chunk_rows + t0, ROWS, M, N);
                if (dA[a]) prefetch_rows(x_lora, order, p0 + chunk_rows + t0, ROWS, M, K);
                for (int q = 0; q < ROWS; ++q) gr[q] = grows[t0 + (q < valid ? q : 0)];
                dots4(gr, Bt[a], r, N, gB + t0 * r);  /* rows past `valid` land in gB's spare rows, never read */
                if (dx) {
                    float *dr[ROWS];
                    for (int q = 0; q < ROWS; ++q) dr[q] = q < valid ? dx + order[p0 + t0 + q] * K : spare;
                    for (int64_t e = 0; e < ROWS * r; ++e) coef[e] = e < valid * r ? scaling[a] * gB[t0 * r + e] : 0.0f;
                    rank_update4(dr, NULL, coef, A[a], r, K);
                }
            }
            if (dBt[a]) {
                row_pointers(u, r_max, order, p0, rows, crows);
                accumulate_rows(pB, ldN, crows, r, grows, N, rows);
            }
            if (dA[a]) {
                row_pointers(gB, r, NULL, 0, rows, crows);
                row_pointers(x_lora, K, order, p0, rows, xrows);
                accumulate_rows(pA, ldK, crows, r, xrows, K, rows);
            }
        }
        stream_fence();
        free(gB);
        free(spare);
        /* the implicit barrier of `omp for` above: every partial is complete */
        for (int64_t a = 0; a < n_slots; ++a) {
            if (!A[a]) continue;
            if (dA[a]) reduce_partials(dA[a], partial + part[a], per_thread, ldK, team, ranks[a], K, scaling[a]);
            if (dBt[a])
                reduce_partials(dBt[a], partial + part[a] + ranks[a] * ldK, per_thread, ldN, team,
                                ranks[a], N, scaling[a]);
        }
    }
}
