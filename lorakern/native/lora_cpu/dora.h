/* lora_cpu.c, part 4 of 5: DoRA's epilogue, norm and merges, and the merged weight of plain LoRA
 * (lorakern/dora.py, lorakern/functional.py). */

/* ---- DoRA (lorakern/dora.py): the magnitude scale c = m / n (per output column) in the epilogue ---------- */

/* row_q[n] = c[n] * t + b[n], t = base_q[n] + sum_j coef[q * r + j] * mat[j * len + n], for four rows q;
 * t is also written to keep_q[n] when keep is not NULL (the backward's z). base and row may be the same rows.
 * `shifted` (a constant at each call, so each caller gets its own loop): row_q[n] = (row_q[n] - base_q[n]) +
 * c[n] * t + b[n] instead, DoRA's form with dropout (shifted_update4, mixed_dora.h). */
static inline __attribute__((always_inline)) void scale_rows4(float *const rows[ROWS], float *const keep[ROWS],
                                                              const float *const base[ROWS], const float *scale,
                                                              const float *bias, const float *coef,
                                                              const float *mat, int64_t r, int64_t len,
                                                              const int shifted) {
    int64_t n = 0;
    for (; n + LANES <= len; n += LANES) {
        vf v0 = load(base[0] + n), v1 = load(base[1] + n), v2 = load(base[2] + n), v3 = load(base[3] + n);
        vf t0 = v0, t1 = v1, t2 = v2, t3 = v3;
        for (int64_t j = 0; j < r; ++j) {
            vf m = load(mat + j * len + n);
            IN_REGISTER(m);
            t0 += splat(coef[0 * r + j]) * m; t1 += splat(coef[1 * r + j]) * m;
            t2 += splat(coef[2 * r + j]) * m; t3 += splat(coef[3 * r + j]) * m;
        }
        if (keep[0]) { store(keep[0] + n, t0); store(keep[1] + n, t1); store(keep[2] + n, t2); store(keep[3] + n, t3); }
        vf c = load(scale + n), b = bias ? load(bias + n) : splat(0);
        if (shifted) {
            store(rows[0] + n, (load(rows[0] + n) - v0) + c * t0 + b);
            store(rows[1] + n, (load(rows[1] + n) - v1) + c * t1 + b);
            store(rows[2] + n, (load(rows[2] + n) - v2) + c * t2 + b);
            store(rows[3] + n, (load(rows[3] + n) - v3) + c * t3 + b);
        } else {
            store(rows[0] + n, c * t0 + b); store(rows[1] + n, c * t1 + b);
            store(rows[2] + n, c * t2 + b); store(rows[3] + n, c * t3 + b);
        }
    }
    for (; n < len; ++n)
        for (int q = 0; q < ROWS; ++q) {
            float t = base[q][n];
            for (int64_t j = 0; j < r; ++j) t += coef[q * r + j] * mat[j * len + n];
            if (keep[q]) keep[q][n] = t;
            float shift = shifted ? rows[q][n] - base[q][n] : 0.0f;
            rows[q][n] = shifted ? shift + scale[n] * t + (bias ? bias[n] : 0.0f)
                                 : scale[n] * t + (bias ? bias[n] : 0.0f);
        }
}

static void scaled_update4(float *const rows[ROWS], float *const keep[ROWS], const float *const base[ROWS],
                           const float *scale, const float *bias, const float *coef, const float *mat, int64_t r,
                           int64_t len) {
    scale_rows4(rows, keep, base, scale, bias, coef, mat, r, len, 0);
}

/* DoRA forward, after BLAS wrote z = x W^T (M x N): u = x A^T, then in the same pass over the rows
 * z += s u B^T (kept when `keep_z`) and y = c * z + b (bias may be NULL; y may be z itself when !keep_z).
 * The scale costs no pass over y of its own. B (N x r) as torch holds it (transposed_copy, as in
 * lora_forward_f32: torch's copy of a transposed 768 x 8 cost ~8 us a call). r <= 256. */
void dora_forward_f32(const float *x, const float *A, const float *B, const float *bias, const float *scale,
                      float scaling, int64_t M, int64_t K, int64_t N, int64_t r, float *u, float *z, float *y,
                      int keep_z, int threads) {
    int64_t blocks = (M + ROWS - 1) / ROWS;
    float *Bt = transposed_copy(B, N, r);
    #pragma omp parallel num_threads(threads)
    {
        float ublk[ROWS * 256], coef[ROWS * 256];
        float *spare = (float *)malloc((size_t)N * sizeof(float) * 2);
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            int64_t i0 = blk * ROWS;
            block_u(x, A, i0, M, K, r, u, ublk);
            for (int64_t e = 0; e < ROWS * r; ++e) coef[e] = scaling * ublk[e];
            float *yr[ROWS], *kr[ROWS];
            const float *zr[ROWS];
            block_rows_out(y, i0, M, N, spare, yr);
            for (int q = 0; q < ROWS; ++q) {
                /* rows past M read a zeroed spare row and write the other one */
                zr[q] = i0 + q < M ? z + (i0 + q) * N : spare + N;
                kr[q] = keep_z ? (i0 + q < M ? z + (i0 + q) * N : spare + N) : NULL;
            }
            if (i0 + ROWS > M) memset(spare + N, 0, (size_t)N * sizeof(float));
            scaled_update4(yr, kr, zr, scale, bias, coef, Bt, r, N);
        }
        free(spare);
    }
    free(Bt);
}

/* Below this share of the bound on its terms, the identity's n^2 has lost its digits (lorakern/dora.py,
 * CANCELLATION_LIMIT): the row is formed instead. */
#define DORA_CANCELLATION_LIMIT (1.0f / 1024.0f)

/* ||W_i + s (B A)_i|| from w2 = ||W_i||^2, b = B_i (r), wa = (W A^T)_i (r) and gram = A A^T (r x r):
 * sqrt(w2 + 2 s <b, wa> + s^2 b gram b^T); -1 where that sum cancels: n^2 <= DORA_CANCELLATION_LIMIT bound^2,
 * bound = ||W_i|| + |s| sum_j |b_j| sqrt(gram_jj) (Cauchy-Schwarz: every term is at most bound^2). The caller
 * forms those rows (lorakern/dora.py, _formed_rows). */
static inline float dora_row_norm(float w2, const float *b, const float *wa, const float *gram, float s, int64_t r) {
    float cross = 0.0f, quad = 0.0f, reach = 0.0f;
    for (int64_t j = 0; j < r; ++j) {
        float gb = 0.0f;
        for (int64_t k = 0; k < r; ++k) gb += gram[j * r + k] * b[k];
        cross += b[j] * wa[j];
        quad += b[j] * gb;
        reach += fabsf(b[j]) * sqrtf(gram[j * r + j] > 0.0f ? gram[j * r + j] : 0.0f);
    }
    float n2 = w2 + 2.0f * s * cross + s * s * quad;
    float bound = sqrtf(w2) + fabsf(s) * reach;
    return n2 > DORA_CANCELLATION_LIMIT * bound * bound ? sqrtf(n2) : -1.0f;
}

/* DoRA's row norms without B A (lorakern/dora.py, weight_norm): for each row i of W (N x K),
 * norm[i] = ||W_i + s (B A)_i|| (dora_row_norm), W A^T four rows at a time. B: N x r. Returns how many rows
 * cancelled (their norm -1: the caller forms them). */
int64_t dora_norm_f32(const float *W, const float *A, const float *B, const float *w2, const float *gram, float s,
                      int64_t N, int64_t K, int64_t r, float *norm, int threads) {
    int64_t blocks = (N + ROWS - 1) / ROWS, cancelled = 0;
    #pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : cancelled)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        int64_t i0 = blk * ROWS;
        float wa[ROWS * 256];
        const float *wr[ROWS];
        block_rows(W, i0, N, K, wr);
        dots4(wr, A, r, K, wa);
        for (int q = 0; q < ROWS && i0 + q < N; ++q) {
            norm[i0 + q] = dora_row_norm(w2[i0 + q], B + (i0 + q) * r, wa + q * r, gram, s, r);
            cancelled += norm[i0 + q] < 0.0f;
        }
    }
    return cancelled;
}

/* out (N x K) = diag(c) (W + s B A), four rows of W at a time, A read from L1. The scale c: given (c_in; NULL
 * means 1), or with w2 given DoRA's c = m / ||W_i + s (B A)_i|| computed from the same rows (their W A^T first,
 * while they are in L1), written to c_out and the norms to norm; a row whose norm cancelled (dora_row_norm: -1)
 * gets c = 0 and a zero row, and is counted in the return value (the caller forms it). */
static int64_t merge_rows(const float *W, const float *A, const float *B, float s, const float *c_in,
                          const float *w2, const float *gram, const float *m, int64_t N, int64_t K, int64_t r,
                          float *norm, float *c_out, float *out, int threads) {
    int64_t blocks = (N + ROWS - 1) / ROWS, cancelled = 0;
    #pragma omp parallel num_threads(threads) reduction(+ : cancelled)
    {
        float coef[ROWS * 256], scale[ROWS], wa[ROWS * 256];
        float *spare = (float *)malloc((size_t)K * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            int64_t i0 = blk * ROWS;
            const float *wr[ROWS];
            float *orow[ROWS];
            block_rows(W, i0, N, K, wr);  /* rows past N read row i0 again and land in spare */
            block_rows_out(out, i0, N, K, spare, orow);
            if (w2) dots4(wr, A, r, K, wa);
            for (int q = 0; q < ROWS; ++q) {
                int64_t i = i0 + q < N ? i0 + q : i0;
                if (w2) {
                    float n = dora_row_norm(w2[i], B + i * r, wa + q * r, gram, s, r);
                    scale[q] = n < 0.0f ? 0.0f : m[i] / n;
                    if (i == i0 + q) {  /* a real row, not a repeat past N */
                        norm[i] = n;
                        c_out[i] = scale[q];
                        cancelled += n < 0.0f;
                    }
                } else {
                    scale[q] = c_in ? c_in[i] : 1.0f;
                }
                for (int64_t j = 0; j < r; ++j) coef[q * r + j] = scale[q] * s * B[i * r + j];
            }
            update4(orow, wr, w2 || c_in ? scale : NULL, coef, A, r, K, 0);
        }
        free(spare);
    }
    return cancelled;
}

/* out (N x K) = diag(c) (W + s B A), the weight of the merged forms (lorakern/formulation.py, merged_weight;
 * c NULL: 1; DoRA's folded backward passes its magnitude scale). B is N x r, A r x K. One pass over the rows
 * of W: torch's addmm then mul_ read and wrote the N x K weight twice, and its K = r product runs far below
 * BLAS's speed. Plain stores: the GEMM that follows reads out from the cache. */
void lora_merge_f32(const float *W, const float *A, const float *B, float s, const float *c, int64_t N, int64_t K,
                    int64_t r, float *out, int threads) {
    merge_rows(W, A, B, s, c, NULL, NULL, NULL, N, K, r, NULL, NULL, out, threads);
}

/* DoRA's folded forward weight in one pass over W (lorakern/dora.py, _folded_forward_native): norm[i] =
 * ||W_i + s (B A)_i|| (from w2 = ||W_i||^2 and gram = A A^T, as dora_norm_f32), c[i] = m[i] / norm[i], and
 * out = diag(c) (W + s B A). Returns how many rows cancelled (norm -1, c 0, a zero row: the caller forms them). */
int64_t dora_merge_f32(const float *W, const float *A, const float *B, const float *w2, const float *gram,
                       const float *m, float s, int64_t N, int64_t K, int64_t r, float *norm, float *c, float *out,
                       int threads) {
    return merge_rows(W, A, B, s, NULL, w2, gram, m, N, K, r, norm, c, out, threads);
}

/* DoRA backward's first pass: gc = g * c (columns scaled: the LoRA backward then runs on gc) and, when z is
 * not NULL, gz[n] = sum_i g[i, n] z[i, n] (dm = gz / n). `partial` holds threads * N floats. */
void dora_scale_grad_f32(const float *g, const float *z, const float *scale, int64_t M, int64_t N, float *gc,
                         float *gz, float *partial, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int tid = 0, team = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        team = omp_get_num_threads();
#endif
        float *acc = partial + tid * N;
        if (z) memset(acc, 0, (size_t)N * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < M; ++i) {
            const float *gi = g + i * N;
            float *oi = gc + i * N;
            int64_t n = 0;
            for (; n + LANES <= N; n += LANES) {
                vf gv = load(gi + n);
                store(oi + n, gv * load(scale + n));
                if (z) store(acc + n, load(acc + n) + gv * load(z + i * N + n));
            }
            for (; n < N; ++n) {
                oi[n] = gi[n] * scale[n];
                if (z) acc[n] += gi[n] * z[i * N + n];
            }
        }
        /* the implicit barrier of `omp for`: every partial is complete */
        if (z) {
            #pragma omp for schedule(static)
            for (int64_t n = 0; n < N; ++n) {
                float sum = 0.0f;
                for (int t = 0; t < team; ++t) sum += partial[t * N + n];
                gz[n] = sum;
            }
        }
    }
}
