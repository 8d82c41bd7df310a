/* lora_cpu.c, part 5 of 5: DoRA slots in a mixed batch (lorakern/mixed_dora_c.py). */

/* ---- DoRA slots in a mixed batch (lorakern/mixed_dora_c.py) --------------------------------------------
 * The grouping of the mixed kernels above. Per slot a, scale[a] = c_a = m_a / ||W + s_a B_a A_a|| (N floats)
 * for a DoRA slot, NULL for a plain one; z[a] (NULL: not kept) holds one row of N floats per row of slot a,
 * in the order of its segment: z_i = x_i W^T + s_a u_i B_a^T (x~_i W^T + s_a u_i B_a^T on a slot that drops
 * out), what the backward's dm_a needs. */

/* y_i += b for the rows without a rank-r term (rows of no slot, rows of a slot whose A[a] is NULL). */
static void bias_plain_rows(const int64_t *order, const int64_t *offsets, const float *const *A, int64_t n_slots,
                            int64_t M, const float *bias, int64_t N, float *y) {
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < M; ++p) {
        int64_t i = bias ? plain_row(order, offsets, A, n_slots, p) : -1;
        if (i < 0) continue;
        float *row = y + i * N;
        for (int64_t n = 0; n < N; ++n) row[n] += bias[n];
    }
}

/* A DoRA row with dropout, y = x W^T + b + c (x~ W^T + s u B^T) - x~ W^T, for four rows q: with base_q = x~ W^T,
 * t = base_q[n] + sum_j coef[q * r + j] * mat[j * len + n] (written to keep_q when keep is not NULL) and
 * row_q[n] = (row_q[n] - base_q[n]) + c[n] * t + b[n] (row_q holding x W^T). */
static void shifted_update4(float *const rows[ROWS], float *const keep[ROWS], const float *const base[ROWS],
                            const float *scale, const float *bias, const float *coef, const float *mat, int64_t r,
                            int64_t len) {
    scale_rows4(rows, keep, base, scale, bias, coef, mat, r, len, 1);
}

/* Forward, after BLAS wrote y = x W^T (no bias) for every row: for each row i of slot a, u_i = x~_i A_a^T and
 *   plain slot:  y_i = (y_i + s_a u_i B_a^T) + b
 *   DoRA slot:   z_i = y_i + s_a u_i B_a^T (stored into z[a] when given),   y_i = c_a z_i + b
 *   DoRA slot with dropout (v[a] given: v_i = x~_i W^T, one row per row of the slot, in its segment's order):
 *                z_i = v_i + s_a u_i B_a^T (stored as above),   y_i = (y_i - v_i) + c_a z_i + b
 * and y_i += b for the rows without a term: one pass over the rows (scaled_update4, a plain slot's scale 1).
 * x~ is every row's LoRA input. v may be NULL (no slot drops out). r <= 256. */
void dora_mixed_forward_f32(const float *x, const int64_t *order, const int64_t *offsets, int64_t n_slots,
                            const float *const *A, const float *const *Bt, const int64_t *ranks, const float *scaling,
                            const float *const *scale, const float *const *v, const float *bias, int64_t M, int64_t K,
                            int64_t N, int64_t r_max, float *u, float *y, float *const *z, int threads) {
    int64_t first_block[n_slots + 1];
    int64_t blocks = segment_blocks(offsets, A, n_slots, ROWS, first_block);
    float *ones = (float *)malloc((size_t)N * sizeof(float));
    for (int64_t n = 0; n < N; ++n) ones[n] = 1.0f;
    #pragma omp parallel num_threads(threads)
    {
        float ublk[ROWS * 256], coef[ROWS * 256];
        /* rows past a segment's end read `zero` (never written) and write `spare` */
        float *spare = (float *)calloc((size_t)(2 * N), sizeof(float)), *zero = spare + N;
        bias_plain_rows(order, offsets, A, n_slots, M, bias, N, y);
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            int64_t a = slot_of_block(first_block, n_slots, blk), r = ranks[a];
            int64_t p0 = offsets[a] + (blk - first_block[a]) * ROWS;
            int valid = (int)(offsets[a + 1] - p0 < ROWS ? offsets[a + 1] - p0 : ROWS);
            int keep = z != NULL && z[a] != NULL, shifted = v != NULL && v[a] != NULL;
            const float *xr[ROWS], *br[ROWS];
            float *yr[ROWS], *kr[ROWS];
            for (int q = 0; q < ROWS; ++q) {
                int64_t i = order[p0 + (q < valid ? q : 0)];
                xr[q] = x + i * K;
                yr[q] = q < valid ? y + i * N : spare;
                br[q] = q >= valid ? zero : shifted ? v[a] + (p0 + q - offsets[a]) * N : y + i * N;
                kr[q] = !keep ? NULL : q < valid ? z[a] + (p0 + q - offsets[a]) * N : spare;
            }
            dots4(xr, A[a], r, K, ublk);
            for (int q = 0; q < valid; ++q) memcpy(u + order[p0 + q] * r_max, ublk + q * r, r * sizeof(float));
            for (int64_t e = 0; e < ROWS * r; ++e) coef[e] = scaling[a] * ublk[e];
            if (shifted) shifted_update4(yr, kr, br, scale[a], bias, coef, Bt[a], r, N);
            else scaled_update4(yr, kr, br, scale[a] ? scale[a] : ones, bias, coef, Bt[a], r, N);
        }
        free(spare);
    }
    free(ones);
}

/* Floats of scratch `dora_mixed_scale_grad_f32` needs: per thread, N (padded) per slot whose gz[a] is given. */
int64_t dora_mixed_scale_grad_scratch(int64_t N, float *const *gz, int64_t n_slots, int threads) {
    int64_t sums = 0;
    for (int64_t a = 0; a < n_slots; ++a) sums += gz[a] != NULL;
    return (int64_t)threads * sums * padded(N);
}

/* The backward's first pass over g: gc_i = c_a g_i for each row i of a slot a with scale[a] (a DoRA slot), gc_i =
 * g_i for every other row (the mixed LoRA backward then runs on gc), and gz[a] = sum over slot a's rows of g_i z_i
 * where z[a] and gz[a] are given (dm_a = gz[a] / n_a; 0 for a slot without rows). `partial` holds
 * dora_mixed_scale_grad_scratch floats. */
void dora_mixed_scale_grad_f32(const float *g, const int64_t *order, const int64_t *offsets, int64_t n_slots,
                               const float *const *scale, const float *const *z, int64_t M, int64_t N, float *gc,
                               float *const *gz, float *partial, int threads) {
    const int64_t unit = 4 * ROWS;
    int64_t first_block[n_slots + 1], part[n_slots + 1];
    const float *walk[n_slots + 1];  /* the slots walked block by block: scaled, or summed, or both */
    for (int64_t a = 0; a < n_slots; ++a) walk[a] = scale[a] ? scale[a] : z[a] && gz[a] ? z[a] : NULL;
    int64_t blocks = segment_blocks(offsets, walk, n_slots, unit, first_block);
    int64_t ldN = padded(N);
    part[0] = 0;
    for (int64_t a = 0; a < n_slots; ++a) part[a + 1] = part[a] + (gz[a] ? ldN : 0);
    int64_t per_thread = part[n_slots];
    #pragma omp parallel num_threads(threads)
    {
        int tid = thread_id(), team = team_size();
        float *mine = partial + tid * per_thread;
        memset(mine, 0, (size_t)per_thread * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < M; ++p) {  /* rows of the slots not walked: gc_i = g_i */
            int64_t a = 0;
            while (a < n_slots && offsets[a + 1] <= p) ++a;
            if (a < n_slots && walk[a]) continue;
            memcpy(gc + order[p] * N, g + order[p] * N, (size_t)N * sizeof(float));
        }
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            int64_t a = slot_of_block(first_block, n_slots, blk);
            int64_t p0 = offsets[a] + (blk - first_block[a]) * unit;
            int64_t rows = offsets[a + 1] - p0 < unit ? offsets[a + 1] - p0 : unit;
            const float *c = scale[a];
            const float *grows[4 * ROWS], *zrows[4 * ROWS];
            for (int64_t t = 0; t < rows; ++t) {
                const float *gi = g + order[p0 + t] * N;
                float *oi = gc + order[p0 + t] * N;
                int64_t n = 0;
                if (c) {
                    for (; n + LANES <= N; n += LANES) store(oi + n, load(gi + n) * load(c + n));
                    for (; n < N; ++n) oi[n] = gi[n] * c[n];
                } else {
                    memcpy(oi, gi, (size_t)N * sizeof(float));
                }
                grows[t] = gi;
                if (z[a]) zrows[t] = z[a] + (p0 + t - offsets[a]) * N;
            }
            /* the block's rows of g are in L1 from the pass above */
            if (z[a] && gz[a]) accumulate_products(mine + part[a], grows, zrows, rows, N);
        }
        /* the implicit barrier of `omp for` above: every partial is complete */
        for (int64_t a = 0; a < n_slots; ++a)
            if (gz[a]) reduce_partials(gz[a], partial + part[a], per_thread, ldN, team, 1, N, 1.0f);
    }
}
