/* The rank-r parts of a LoRA linear layer on the CPU, fp32: one pass over the rows forward, two backward.
 *
 *   forward:  u = x~ A^T                      (M x r, kept for the backward)
 *             y = b + s u B^T                 (M x N, the base GEMM then accumulates x W^T onto it)
 *   backward: gB = g B                        (never stored: four rows at a time, in registers)
 *             dx~ = s gB A                    (M x K, the base GEMM then accumulates g W onto it)
 *             dA = s gB^T x~,  dB^T = s u^T g (r x K and r x N, per-thread partial sums, then reduced;
 *                                             dB in a pass over g of its own, see lora_backward_f32)
 *
 * Why: BLAS runs these thin products (one side of extent r = 4..64) far below the memory bandwidth, and
 * each one is a separate pass over an M x K or M x N operand. Here four rows of x~ (or of g) are read
 * once, from L1, for every product that needs them. Shapes: x~ (M, K), A (r, K), Bt = B^T (r, N),
 * g (M, N), u (M, r); every matrix row-major and contiguous.
 *
 * One source for every CPU: LANES (floats per vector, -DLANES=16/8/4) is the only compile-time choice,
 * set by lorakern/native/__init__.py for the ISA level it builds (AVX-512: 16, AVX2: 8, SSE2 or NEON: 4)
 * so that one `vf` is one machine register. The vectors are GCC/Clang vector extensions; no intrinsics
 * outside the optional streaming store below. The sums run in another order than BLAS's (LANES lanes,
 * then a horizontal sum), so fp32 results differ from it by rounding. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE__) || defined(__AVX__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef LANES
#error "build with -DLANES=16, 8 or 4 (floats per vector register); lorakern/native/__init__.py does"
#endif
#if LANES != 4 && LANES != 8 && LANES != 16
#error "LANES must be 4, 8 or 16"
#endif
#define ROWS 4
#define CHUNK_BLOCKS 16 /* four-row blocks per chunk of the backward: 64 rows of g, ~200 KB at N = 768 */

/* LANES floats; aligned(4): rows start anywhere, so every load and store through it is an unaligned one. */
typedef float vf __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));

static inline vf load(const float *p) { return *(const vf *)p; }
static inline void store(float *p, vf v) { *(vf *)p = v; }
static inline vf splat(float v) { vf zero = {0}; return zero + v; }

/* A vector used several times: GCC folds each use into a memory operand and loads it again (four loads of
 * one B row per four multiply-adds, measured ~25% slower on AVX-512). An empty asm that "changes" the
 * value keeps it in a register. The constraint is the architecture's generic "any vector register"
 * ("v" on x86, "w" on aarch64), which holds a `vf` since LANES matches the register; other targets skip it. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
#define IN_REGISTER(v) __asm__("" : "+w"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

/* The sum of a vector's lanes, halving in registers (eight of these end every dots4 step): a sum through
 * memory costs a store and LANES reloads per call. __builtin_shufflevector: GCC 12+ and Clang. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
static inline float hsum4(vf4 s4) { return (s4[0] + s4[2]) + (s4[1] + s4[3]); }
#if LANES == 16
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
static inline float hsum(vf v) {
    vf8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
             + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    return hsum4(__builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7));
}
#elif LANES == 8
static inline float hsum(vf v) {
    return hsum4(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
}
#else
static inline float hsum(vf v) { return hsum4(v); }
#endif
#else
static inline float hsum(vf v) {
    float t[LANES];
    memcpy(t, &v, sizeof t);
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int i = 0; i < width; ++i) t[i] += t[i + width];
    return t[0];
}
#endif

/* out[q * r + j] = sum_k row_q[k] * mat[j * len + k] for the four rows q and the r rows j of mat.
 * Two rows of mat at a time: eight independent accumulators, six loads per eight multiply-adds. */
static void dots4(const float *const rows[ROWS], const float *mat, int64_t r, int64_t len, float *out) {
    const float *a0 = rows[0], *a1 = rows[1], *a2 = rows[2], *a3 = rows[3];
    int64_t body = len - len % LANES;
    for (int64_t j = 0; j < r; j += 2) {
        const float *m0 = mat + j * len, *m1 = j + 1 < r ? m0 + len : m0;  /* odd r: the last row twice */
        vf s00 = splat(0), s10 = s00, s20 = s00, s30 = s00, s01 = s00, s11 = s00, s21 = s00, s31 = s00;
        for (int64_t k = 0; k < body; k += LANES) {
            vf v0 = load(m0 + k), v1 = load(m1 + k);
            vf x0 = load(a0 + k), x1 = load(a1 + k), x2 = load(a2 + k), x3 = load(a3 + k);
            IN_REGISTER(v0); IN_REGISTER(v1); IN_REGISTER(x0); IN_REGISTER(x1); IN_REGISTER(x2); IN_REGISTER(x3);
            s00 += x0 * v0; s10 += x1 * v0; s20 += x2 * v0; s30 += x3 * v0;
            s01 += x0 * v1; s11 += x1 * v1; s21 += x2 * v1; s31 += x3 * v1;
        }
        float t00 = hsum(s00), t10 = hsum(s10), t20 = hsum(s20), t30 = hsum(s30);
        float t01 = hsum(s01), t11 = hsum(s11), t21 = hsum(s21), t31 = hsum(s31);
        for (int64_t k = body; k < len; ++k) {
            t00 += a0[k] * m0[k]; t10 += a1[k] * m0[k]; t20 += a2[k] * m0[k]; t30 += a3[k] * m0[k];
            t01 += a0[k] * m1[k]; t11 += a1[k] * m1[k]; t21 += a2[k] * m1[k]; t31 += a3[k] * m1[k];
        }
        out[0 * r + j] = t00; out[1 * r + j] = t10; out[2 * r + j] = t20; out[3 * r + j] = t30;
        if (j + 1 < r) {
            out[0 * r + j + 1] = t01; out[1 * r + j + 1] = t11; out[2 * r + j + 1] = t21; out[3 * r + j + 1] = t31;
        }
    }
}

/* The rank-r term of y (and of dx) is written once and read next by the base GEMM (beta = 1), not by this
 * code: stores that bypass the cache skip reading each line in first (a 4096 x 768 y no longer fits in
 * L2 and those reads doubled the time of its write; measured ~1% of the whole forward). They need rows
 * aligned to one vector; the tails, other rows and targets without such a store use plain stores. */
#if LANES == 16 && defined(__AVX512F__)
#define STREAM_STORES 1
static inline void stream_store(float *p, vf v) { _mm512_stream_ps(p, (__m512)v); }
#elif LANES == 8 && defined(__AVX__)
#define STREAM_STORES 1
static inline void stream_store(float *p, vf v) { _mm256_stream_ps(p, (__m256)v); }
#elif LANES == 4 && defined(__SSE__)
#define STREAM_STORES 1
static inline void stream_store(float *p, vf v) { _mm_stream_ps(p, (__m128)v); }
#else
#define STREAM_STORES 0
static inline void stream_store(float *p, vf v) { store(p, v); }
#endif
#if STREAM_STORES
static inline void stream_fence(void) { _mm_sfence(); }
#else
static inline void stream_fence(void) {}
#endif

static inline int aligned_rows(float *const rows[ROWS]) {
    for (int q = 0; q < ROWS; ++q)
        if ((uintptr_t)rows[q] % (LANES * sizeof(float)) != 0) return 0;
    return 1;
}

/* row_q[n] = init[n] (0 when init is NULL) + sum_j coef[q * r + j] * mat[j * len + n], four rows q.
 * Two vectors of each row stay in registers over all j: two loads per eight multiply-adds. */
static void rank_update4(float *const rows[ROWS], const float *init, const float *coef, const float *mat,
                         int64_t r, int64_t len) {
    float *o0 = rows[0], *o1 = rows[1], *o2 = rows[2], *o3 = rows[3];
    int stream = STREAM_STORES && aligned_rows(rows);
    int64_t n = 0;
    for (; n + 2 * LANES <= len; n += 2 * LANES) {
        vf v0 = init ? load(init + n) : splat(0), w0 = init ? load(init + n + LANES) : splat(0);
        vf v1 = v0, v2 = v0, v3 = v0, w1 = w0, w2 = w0, w3 = w0;
        for (int64_t j = 0; j < r; ++j) {
            vf m = load(mat + j * len + n), mm = load(mat + j * len + n + LANES);
            IN_REGISTER(m); IN_REGISTER(mm);
            vf c0 = splat(coef[0 * r + j]), c1 = splat(coef[1 * r + j]);
            vf c2 = splat(coef[2 * r + j]), c3 = splat(coef[3 * r + j]);
            v0 += c0 * m; v1 += c1 * m; v2 += c2 * m; v3 += c3 * m;
            w0 += c0 * mm; w1 += c1 * mm; w2 += c2 * mm; w3 += c3 * mm;
        }
        if (stream) {
            stream_store(o0 + n, v0); stream_store(o1 + n, v1); stream_store(o2 + n, v2); stream_store(o3 + n, v3);
            stream_store(o0 + n + LANES, w0); stream_store(o1 + n + LANES, w1);
            stream_store(o2 + n + LANES, w2); stream_store(o3 + n + LANES, w3);
        } else {
            store(o0 + n, v0); store(o1 + n, v1); store(o2 + n, v2); store(o3 + n, v3);
            store(o0 + n + LANES, w0); store(o1 + n + LANES, w1); store(o2 + n + LANES, w2); store(o3 + n + LANES, w3);
        }
    }
    for (; n < len; ++n) {
        float start = init ? init[n] : 0.0f;
        float v0 = start, v1 = start, v2 = start, v3 = start;
        for (int64_t j = 0; j < r; ++j) {
            float m = mat[j * len + n];
            v0 += coef[0 * r + j] * m; v1 += coef[1 * r + j] * m;
            v2 += coef[2 * r + j] * m; v3 += coef[3 * r + j] * m;
        }
        o0[n] = v0; o1[n] = v1; o2[n] = v2; o3[n] = v3;
    }
}

/* acc[j * ld + n] += sum_q coef[q * r + j] * row_q[n]: four rows' outer products with their r coefficients.
 * One vector of each row stays in registers over all j: one load and one store per four multiply-adds. */
static void accumulate4(float *acc, int64_t ld, const float *coef, const float *const rows[ROWS], int64_t r,
                        int64_t len) {
    const float *a0 = rows[0], *a1 = rows[1], *a2 = rows[2], *a3 = rows[3];
    int64_t n = 0;
    for (; n + LANES <= len; n += LANES) {
        vf x0 = load(a0 + n), x1 = load(a1 + n), x2 = load(a2 + n), x3 = load(a3 + n);
        IN_REGISTER(x0); IN_REGISTER(x1); IN_REGISTER(x2); IN_REGISTER(x3);
        for (int64_t j = 0; j < r; ++j) {
            float *out = acc + j * ld + n;
            store(out, load(out) + splat(coef[0 * r + j]) * x0 + splat(coef[1 * r + j]) * x1
                           + splat(coef[2 * r + j]) * x2 + splat(coef[3 * r + j]) * x3);
        }
    }
    for (; n < len; ++n)
        for (int64_t j = 0; j < r; ++j)
            acc[j * ld + n] += coef[0 * r + j] * a0[n] + coef[1 * r + j] * a1[n] + coef[2 * r + j] * a2[n]
                               + coef[3 * r + j] * a3[n];
}

/* Row pointers for the block starting at row i0 of a (M x len) matrix. Rows past M read row i0 again and
 * write into `spare` (one row of scratch), so the four-row kernels never need a tail case. */
static void block_rows(const float *base, int64_t i0, int64_t M, int64_t len, const float *rows[ROWS]) {
    for (int q = 0; q < ROWS; ++q) rows[q] = base + (i0 + q < M ? i0 + q : i0) * len;
}

static void block_rows_out(float *base, int64_t i0, int64_t M, int64_t len, float *spare, float *rows[ROWS]) {
    for (int q = 0; q < ROWS; ++q) rows[q] = i0 + q < M ? base + (i0 + q) * len : spare;
}

/* Forward: u = x~ A^T; y = b + s u B^T when y is not NULL (bias may be NULL). r <= 256. */
void lora_forward_f32(const float *x_lora, const float *A, const float *Bt, const float *bias, float scaling,
                      int64_t M, int64_t K, int64_t N, int64_t r, float *u, float *y, int threads) {
    int64_t blocks = (M + ROWS - 1) / ROWS;
    #pragma omp parallel num_threads(threads)
    {
        float ublk[ROWS * 256], coef[ROWS * 256];
        float *spare = y ? (float *)malloc((size_t)N * sizeof(float)) : NULL;
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            int64_t i0 = blk * ROWS;
            const float *xr[ROWS];
            block_rows(x_lora, i0, M, K, xr);
            dots4(xr, A, r, K, ublk);
            for (int q = 0; q < ROWS && i0 + q < M; ++q) memcpy(u + (i0 + q) * r, ublk + q * r, r * sizeof(float));
            if (y) {
                float *yr[ROWS];
                block_rows_out(y, i0, M, N, spare, yr);
                for (int64_t e = 0; e < ROWS * r; ++e) coef[e] = scaling * ublk[e];
                rank_update4(yr, bias, coef, Bt, r, N);
            }
        }
        stream_fence();  /* this thread's streamed rows are visible before the region ends */
        free(spare);
    }
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
 * Called inside the parallel region: the `omp for` splits the elements among its threads. */
static void reduce_partials(float *out, const float *partial, int64_t stride, int64_t ld, int team, int64_t rows,
                            int64_t len, float scaling) {
    #pragma omp for schedule(static) collapse(2)
    for (int64_t j = 0; j < rows; ++j)
        for (int64_t n = 0; n < len; ++n) {
            float sum = 0.0f;
            for (int t = 0; t < team; ++t) sum += partial[t * stride + j * ld + n];
            out[j * len + n] = scaling * sum;
        }
}

/* Backward. g (M x N); x_lora (M x K, needed for dA); u (M x r, needed for dB); outputs that are NULL are
 * skipped: dx (M x K) = s gB A, dA (r x K) = s gB^T x~, dBt (r x N) = s u^T g. `partial` holds
 * lora_backward_scratch(K, N, r, threads) floats for the per-thread sums. r <= 256. */
void lora_backward_f32(const float *g, const float *x_lora, const float *u, const float *A, const float *Bt,
                       float scaling, int64_t M, int64_t K, int64_t N, int64_t r, float *dx, float *dA, float *dBt,
                       float *partial, int threads) {
    int64_t blocks = (M + ROWS - 1) / ROWS;
    int64_t ldK = padded(K), ldN = padded(N), per_thread = r * (ldK + ldN);
    int need_gB = dx != NULL || dA != NULL;
    #pragma omp parallel num_threads(threads)
    {
        int tid = 0, team = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        team = omp_get_num_threads();
#endif
        float *pA = partial + tid * per_thread, *pB = pA + r * ldK;
        if (dA) memset(pA, 0, (size_t)(r * ldK) * sizeof(float));
        if (dBt) memset(pB, 0, (size_t)(r * ldN) * sizeof(float));
        float gB[ROWS * 256], coef[ROWS * 256];
        float *spare = dx ? (float *)malloc((size_t)K * sizeof(float)) : NULL;
        /* Rows go in chunks of CHUNK_ROWS: dB over the chunk's rows of g first, then g B, dx and dA over the
         * same rows. dB has a loop of its own because its r x N partial and dA's r x K partial, updated
         * together, evicted each other from L1 (768 x 768, r = 8: 3.0 ms in one loop, 2.4 ms in two whole
         * passes); in chunks the second read of g hits L2 instead of memory. */
        #pragma omp for schedule(static)
        for (int64_t chunk = 0; chunk < blocks; chunk += CHUNK_BLOCKS) {
            int64_t last = chunk + CHUNK_BLOCKS < blocks ? chunk + CHUNK_BLOCKS : blocks;
            for (int64_t blk = chunk; dBt && blk < last; ++blk) {
                int64_t i0 = blk * ROWS;
                int valid = (int)(M - i0 < ROWS ? M - i0 : ROWS);
                const float *gr[ROWS];
                block_rows(g, i0, M, N, gr);
                for (int64_t e = 0; e < ROWS * r; ++e) coef[e] = e < valid * r ? u[i0 * r + e] : 0.0f;
                accumulate4(pB, ldN, coef, gr, r, N);
            }
            for (int64_t blk = chunk; need_gB && blk < last; ++blk) {
                int64_t i0 = blk * ROWS;
                int valid = (int)(M - i0 < ROWS ? M - i0 : ROWS);
                const float *gr[ROWS];
                block_rows(g, i0, M, N, gr);
                dots4(gr, Bt, r, N, gB);
                for (int64_t e = valid * r; e < ROWS * r; ++e) gB[e] = 0.0f;  /* rows past M add nothing */
                if (dx) {
                    float *dr[ROWS];
                    block_rows_out(dx, i0, M, K, spare, dr);
                    for (int64_t e = 0; e < ROWS * r; ++e) coef[e] = scaling * gB[e];
                    rank_update4(dr, NULL, coef, A, r, K);
                }
                if (dA) {
                    const float *xr[ROWS];
                    block_rows(x_lora, i0, M, K, xr);
                    accumulate4(pA, ldK, gB, xr, r, K);
                }
            }
        }
        stream_fence();  /* this thread's streamed rows are visible before the region ends */
        free(spare);
        /* the implicit barrier of `omp for` above: every partial is complete; reduce them column-wise */
        if (dA) reduce_partials(dA, partial, per_thread, ldK, team, r, K, scaling);
        if (dBt) reduce_partials(dBt, partial + r * ldK, per_thread, ldN, team, r, N, scaling);
    }
}

/* ---- DoRA (lorakern/dora.py): the magnitude scale c = m / n (per output column) in the epilogue ---------- */

/* row_q[n] = c[n] * t + b[n], t = base_q[n] + sum_j coef[q * r + j] * mat[j * len + n], for four rows q;
 * t is also written to keep_q[n] when keep is not NULL (the backward's z). base and row may be the same rows. */
static void scaled_update4(float *const rows[ROWS], float *const keep[ROWS], const float *const base[ROWS],
                           const float *scale, const float *bias, const float *coef, const float *mat, int64_t r,
                           int64_t len) {
    int64_t n = 0;
    for (; n + LANES <= len; n += LANES) {
        vf t0 = load(base[0] + n), t1 = load(base[1] + n), t2 = load(base[2] + n), t3 = load(base[3] + n);
        for (int64_t j = 0; j < r; ++j) {
            vf m = load(mat + j * len + n);
            IN_REGISTER(m);
            t0 += splat(coef[0 * r + j]) * m; t1 += splat(coef[1 * r + j]) * m;
            t2 += splat(coef[2 * r + j]) * m; t3 += splat(coef[3 * r + j]) * m;
        }
        if (keep[0]) { store(keep[0] + n, t0); store(keep[1] + n, t1); store(keep[2] + n, t2); store(keep[3] + n, t3); }
        vf c = load(scale + n), b = bias ? load(bias + n) : splat(0);
        store(rows[0] + n, c * t0 + b); store(rows[1] + n, c * t1 + b);
        store(rows[2] + n, c * t2 + b); store(rows[3] + n, c * t3 + b);
    }
    for (; n < len; ++n)
        for (int q = 0; q < ROWS; ++q) {
            float t = base[q][n];
            for (int64_t j = 0; j < r; ++j) t += coef[q * r + j] * mat[j * len + n];
            if (keep[q]) keep[q][n] = t;
            rows[q][n] = scale[n] * t + (bias ? bias[n] : 0.0f);
        }
}

/* DoRA forward, after BLAS wrote z = x W^T (M x N): u = x A^T, then in the same pass over the rows
 * z += s u B^T (kept when `keep_z`) and y = c * z + b (bias may be NULL; y may be z itself when !keep_z).
 * The scale costs no pass over y of its own. r <= 256. */
void dora_forward_f32(const float *x, const float *A, const float *Bt, const float *bias, const float *scale,
                      float scaling, int64_t M, int64_t K, int64_t N, int64_t r, float *u, float *z, float *y,
                      int keep_z, int threads) {
    int64_t blocks = (M + ROWS - 1) / ROWS;
    #pragma omp parallel num_threads(threads)
    {
        float ublk[ROWS * 256], coef[ROWS * 256];
        float *spare = (float *)malloc((size_t)N * sizeof(float) * 2);
        #pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            int64_t i0 = blk * ROWS;
            const float *xr[ROWS];
            block_rows(x, i0, M, K, xr);
            dots4(xr, A, r, K, ublk);
            for (int q = 0; q < ROWS && i0 + q < M; ++q) memcpy(u + (i0 + q) * r, ublk + q * r, r * sizeof(float));
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
