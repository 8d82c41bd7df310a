/* The rank-r parts of a LoRA linear layer on the CPU, fp32: one pass over the rows forward, two backward.
 *
 *   forward:  u = x~ A^T                      (M x r, kept for the backward)
 *             y = b + s u B^T                 (M x N, the base GEMM then accumulates x W^T onto it)
 *   backward: gB = g B                        (a chunk of 64 rows at a time, never the whole M x r)
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
#include <math.h>
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
#define CHUNK_BLOCKS 16 /* at most, four-row blocks per chunk of the backward: 64 rows of g, ~200 KB at N = 768 */

/* LANES floats; aligned(4): rows start anywhere, so every load and store through it is an unaligned one. */
typedef float vf __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));

static inline vf load(const float *p) { return *(const vf *)p; }
static inline void store(float *p, vf v) { *(vf *)p = v; }
/* v in every lane. v - 0 is v for every v (0 + v is not: -0 + 0 = +0), so the compiler drops the subtraction
 * and broadcasts v straight from memory; 0 + v cost an add and a shuffle per splat (accumulate_rows ran at
 * 88 GFLOP/s one-threaded in L2 against 158 with this form, AVX-512). */
static inline vf splat(float v) { vf zero = {0}; return v - zero; }

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

/* s[q] (q < 4) += row_q[k0 .. k1) . m0[k0 .. k1) and s[4 + q] the same with m1, k1 - k0 a multiple of LANES:
 * eight independent accumulators, six loads per eight multiply-adds. Inlined: s is registers where it can be. */
static inline __attribute__((always_inline)) void dot_pair(const float *const rows[ROWS], const float *m0,
                                                           const float *m1, int64_t k0, int64_t k1, vf s[8]) {
    const float *a0 = rows[0], *a1 = rows[1], *a2 = rows[2], *a3 = rows[3];
    vf s00 = s[0], s10 = s[1], s20 = s[2], s30 = s[3], s01 = s[4], s11 = s[5], s21 = s[6], s31 = s[7];
    for (int64_t k = k0; k < k1; k += LANES) {
        vf v0 = load(m0 + k), v1 = load(m1 + k);
        vf x0 = load(a0 + k), x1 = load(a1 + k), x2 = load(a2 + k), x3 = load(a3 + k);
        IN_REGISTER(v0); IN_REGISTER(v1); IN_REGISTER(x0); IN_REGISTER(x1); IN_REGISTER(x2); IN_REGISTER(x3);
        s00 += x0 * v0; s10 += x1 * v0; s20 += x2 * v0; s30 += x3 * v0;
        s01 += x0 * v1; s11 += x1 * v1; s21 += x2 * v1; s31 += x3 * v1;
    }
    s[0] = s00; s[1] = s10; s[2] = s20; s[3] = s30; s[4] = s01; s[5] = s11; s[6] = s21; s[7] = s31;
}

/* out[q * r + j] (and j + 1 when below r) = the lanes of s summed plus the scalar tail k = body .. len - 1. */
static inline __attribute__((always_inline)) void finish_pair(const float *const rows[ROWS], const float *m0,
                                                              const float *m1, int64_t body, int64_t len,
                                                              const vf s[8], int64_t r, int64_t j, float *out) {
    float t[8];
    for (int e = 0; e < 8; ++e) t[e] = hsum(s[e]);
    for (int64_t k = body; k < len; ++k)
        for (int q = 0; q < ROWS; ++q) {
            t[q] += rows[q][k] * m0[k];
            t[4 + q] += rows[q][k] * m1[k];
        }
    for (int q = 0; q < ROWS; ++q) {
        out[q * r + j] = t[q];
        if (j + 1 < r) out[q * r + j + 1] = t[4 + q];
    }
}

/* Floats of each row per pass of dots4 over long rows: four rows of 1024 (16 KB) stay in L1 while every row of
 * mat passes over them. Untiled, rows of 4096 (64 KB) came from L2 once per pair of mat rows (one-threaded,
 * 4096 x r = 16: 68 -> 89 GFLOP/s tiled; r = 64: 82 -> 115). */
#define DOT_TILE 1024
/* Rows of mat whose sums with the four rows are carried, as vectors, from tile to tile (64 vectors, 4 KB). */
#define DOT_GROUP 16

/* out[q * r + j] = sum_k row_q[k] * mat[j * len + k] for the four rows q and the r rows j of mat, two rows of
 * mat at a time; rows longer than DOT_TILE in tiles, the accumulators kept from tile to tile (acc) and summed
 * across lanes once at the end. */
static void dots4(const float *const rows[ROWS], const float *mat, int64_t r, int64_t len, float *out) {
    int64_t body = len - len % LANES;
    if (len <= DOT_TILE) {  /* one tile: the accumulators never leave registers */
        for (int64_t j = 0; j < r; j += 2) {
            const float *m0 = mat + j * len, *m1 = j + 1 < r ? m0 + len : m0;  /* odd r: the last row twice */
            vf s[8];
            for (int e = 0; e < 8; ++e) s[e] = splat(0);
            dot_pair(rows, m0, m1, 0, body, s);
            finish_pair(rows, m0, m1, body, len, s, r, j, out);
        }
        return;
    }
    for (int64_t g0 = 0; g0 < r; g0 += DOT_GROUP) {
        int64_t g1 = g0 + DOT_GROUP < r ? g0 + DOT_GROUP : r;
        vf acc[DOT_GROUP / 2][8];
        for (int64_t p = 0; p < (g1 - g0 + 1) / 2; ++p)
            for (int e = 0; e < 8; ++e) acc[p][e] = splat(0);
        for (int64_t k0 = 0; k0 < body; k0 += DOT_TILE) {
            int64_t k1 = k0 + DOT_TILE < body ? k0 + DOT_TILE : body;
            for (int64_t j = g0; j < g1; j += 2) {
                const float *m0 = mat + j * len, *m1 = j + 1 < r ? m0 + len : m0;
                dot_pair(rows, m0, m1, k0, k1, acc[(j - g0) / 2]);
            }
        }
        for (int64_t j = g0; j < g1; j += 2) {
            const float *m0 = mat + j * len, *m1 = j + 1 < r ? m0 + len : m0;
            finish_pair(rows, m0, m1, body, len, acc[(j - g0) / 2], r, j, out);
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

/* row_q[n] = c_q init_q[n] + sum_j coef[q * r + j] * mat[j * len + n], four rows q (init NULL: 0, c NULL: 1).
 * Two vectors of each row stay in registers over all j: two loads per eight multiply-adds. `stream`: stores
 * that bypass the cache (every row aligned to a vector). Inlined, so the NULL tests fold where constant. */
static inline __attribute__((always_inline)) void update4(float *const rows[ROWS], const float *const *init,
                                                          const float *c, const float *coef, const float *mat,
                                                          int64_t r, int64_t len, int stream) {
    float *o0 = rows[0], *o1 = rows[1], *o2 = rows[2], *o3 = rows[3];
    int64_t n = 0;
    for (; n + 2 * LANES <= len; n += 2 * LANES) {
        vf v[ROWS], w[ROWS];
        for (int q = 0; q < ROWS; ++q) {
            v[q] = init ? load(init[q] + n) : splat(0);
            w[q] = init ? load(init[q] + n + LANES) : splat(0);
            if (c) { v[q] *= splat(c[q]); w[q] *= splat(c[q]); }
        }
        vf v0 = v[0], v1 = v[1], v2 = v[2], v3 = v[3], w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
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
    for (; n < len; ++n)
        for (int q = 0; q < ROWS; ++q) {
            float t = init ? (c ? c[q] * init[q][n] : init[q][n]) : 0.0f;
            for (int64_t j = 0; j < r; ++j) t += coef[q * r + j] * mat[j * len + n];
            rows[q][n] = t;
        }
}

/* row_q[n] = init[n] (0 when init is NULL) + sum_j coef[q * r + j] * mat[j * len + n], four rows q: the rank-r
 * term of y (init the bias) and of dx, streamed past the cache where the rows allow. */
static void rank_update4(float *const rows[ROWS], const float *init, const float *coef, const float *mat,
                         int64_t r, int64_t len) {
    const float *shared[ROWS] = {init, init, init, init};
    update4(rows, init ? shared : NULL, NULL, coef, mat, r, len, STREAM_STORES && aligned_rows(rows));
}

/* Rows of acc a register tile holds: JT rows by two vectors (AVX-512: 16 accumulators of its 32 registers;
 * 16-register ISAs: 8), plus the two vectors of x and one broadcast. */
#if LANES == 16
#define JT 8
#else
#define JT 4
#endif

/* acc[j * ld + n .. + nv LANES] for jt rows j from j0: sum over the `rows` rows t of coef_t[j] * x_t[n ..],
 * added to acc once. Inlined with constant jt and nv, so `s` lives in registers. */
static inline __attribute__((always_inline)) void accumulate_tile(float *acc, int64_t ld, const float *const *coef,
                                                                  const float *const *x, int64_t rows, int64_t j0,
                                                                  int jt, int64_t n, int nv) {
    vf s[JT][2];
    for (int a = 0; a < jt; ++a) s[a][0] = s[a][1] = splat(0);
    for (int64_t t = 0; t < rows; ++t) {
        const float *xt = x[t] + n, *ct = coef[t] + j0;
        vf x0 = load(xt), x1 = nv > 1 ? load(xt + LANES) : x0;
        IN_REGISTER(x0); IN_REGISTER(x1);
        for (int a = 0; a < jt; ++a) {
            vf c = splat(ct[a]);
            s[a][0] += c * x0;
            if (nv > 1) s[a][1] += c * x1;
        }
    }
    for (int a = 0; a < jt; ++a)
        for (int b = 0; b < nv; ++b) {
            float *out = acc + (j0 + a) * ld + n + b * LANES;
            store(out, load(out) + s[a][b]);
        }
}

/* acc[j * ld + n] += sum over t < rows of coef_t[j] * x_t[n]: the outer products of a chunk of rows (row t of
 * x and its r coefficients through the pointers x[t] and coef[t]) summed into an r x len partial. The sum over
 * the chunk runs in registers, tile by tile (JT rows of acc by two vectors: two loads of x and JT broadcasts
 * per 2 JT multiply-adds), and acc is read and written once per chunk: accumulating four rows at a time
 * instead read and wrote all of acc every four rows (r = 16, K = 4096: a 256 KB partial through L2 M/4 times). */
static void accumulate_rows(float *acc, int64_t ld, const float *const *coef, int64_t r, const float *const *x,
                            int64_t len, int64_t rows) {
    int64_t n = 0;
    for (; n + 2 * LANES <= len; n += 2 * LANES) {
        int64_t j = 0;
        for (; j + JT <= r; j += JT) accumulate_tile(acc, ld, coef, x, rows, j, JT, n, 2);
        for (; j < r; ++j) accumulate_tile(acc, ld, coef, x, rows, j, 1, n, 2);
    }
    for (; n + LANES <= len; n += LANES) {
        int64_t j = 0;
        for (; j + JT <= r; j += JT) accumulate_tile(acc, ld, coef, x, rows, j, JT, n, 1);
        for (; j < r; ++j) accumulate_tile(acc, ld, coef, x, rows, j, 1, n, 1);
    }
    for (; n < len; ++n)
        for (int64_t j = 0; j < r; ++j) {
            float sum = 0.0f;
            for (int64_t t = 0; t < rows; ++t) sum += coef[t][j] * x[t][n];
            acc[j * ld + n] += sum;
        }
}

/* Pointers to `rows` rows: row t of a row-major matrix with rows of `len` floats is base + index(t) * len,
 * index(t) = first + t, or order[first + t] when order is given (rows grouped by adapter). */
static void row_pointers(const float *base, int64_t len, const int64_t *order, int64_t first, int64_t rows,
                         const float **out) {
    for (int64_t t = 0; t < rows; ++t) out[t] = base + (order ? order[first + t] : first + t) * len;
}

/* Row pointers for the block starting at row i0 of a (M x len) matrix. Rows past M read row i0 again and
 * write into `spare` (one row of scratch), so the four-row kernels never need a tail case. */
static void block_rows(const float *base, int64_t i0, int64_t M, int64_t len, const float *rows[ROWS]) {
    for (int q = 0; q < ROWS; ++q) rows[q] = base + (i0 + q < M ? i0 + q : i0) * len;
}

static void block_rows_out(float *base, int64_t i0, int64_t M, int64_t len, float *spare, float *rows[ROWS]) {
    for (int q = 0; q < ROWS; ++q) rows[q] = i0 + q < M ? base + (i0 + q) * len : spare;
}

/* ublk (four rows of r) = x~ A^T for the rows i0 .. i0 + 3 (rows past M repeat row i0), and the rows below M
 * stored into u (M x r). */
static void block_u(const float *x, const float *A, int64_t i0, int64_t M, int64_t K, int64_t r, float *u,
                    float *ublk) {
    const float *xr[ROWS];
    block_rows(x, i0, M, K, xr);
    dots4(xr, A, r, K, ublk);
    for (int q = 0; q < ROWS && i0 + q < M; ++q) memcpy(u + (i0 + q) * r, ublk + q * r, r * sizeof(float));
}

/* Forward: u = x~ A^T and y = b + s u B^T (bias may be NULL). r <= 256. */
void lora_forward_f32(const float *x_lora, const float *A, const float *Bt, const float *bias, float scaling,
                      int64_t M, int64_t K, int64_t N, int64_t r, float *u, float *y, int threads) {
    int64_t blocks = (M + ROWS - 1) / ROWS;
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
 * chunk by chunk from x_lora, which must then be given); outputs that are NULL are
 * skipped: dx (M x K) = s gB A, dA (r x K) = s gB^T x~, dBt (r x N) = s u^T g. `partial` holds
 * lora_backward_scratch(K, N, r, threads) floats for the per-thread sums. r <= 256. */
void lora_backward_f32(const float *g, const float *x_lora, const float *u, const float *A, const float *Bt,
                       float scaling, int64_t M, int64_t K, int64_t N, int64_t r, float *dx, float *dA, float *dBt,
                       float *partial, int threads) {
    backward_passes(g, x_lora, u, A, Bt, scaling, M, K, N, r, dx, dA, dBt, partial, NULL, NULL, NULL, threads);
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

/* ---- Mixed-adapter batches: each row of x~ uses the adapter of its slot ---------------------------------
 * Rows come grouped by slot: slot a's rows are order[offsets[a] .. offsets[a + 1]) (n_slots slots); rows of
 * no slot (order[offsets[n_slots] ..), base only) and rows of a slot whose A[a] is NULL (a layer without that
 * adapter) get no rank-r term. Per slot: A[a] (r[a] x K), Bt[a] (r[a] x N), scaling[a]. u is M x r_max, row i's
 * first r[slot] entries used. The kernels are the single-adapter ones over gathered row pointers. */

/* dst = B^T (r x N) of B (N x r, row-major). The kernels read B^T's rows as vectors; torch's copy of a
 * transposed 768 x 8 took ~12 us a call (a 16-token layer's whole LoRA term costs ~8 us), this pass ~1 us. */
void lora_transpose_f32(const float *B, int64_t N, int64_t r, float *dst) {
    for (int64_t j = 0; j < r; ++j)  /* B (N r floats) stays in L1; each row of dst is written in order */
        for (int64_t i = 0; i < N; ++i) dst[j * N + i] = B[i * r + j];
}

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

/* Rows of the batch that get no rank-r term: rows of no slot, and the rows of slots without an adapter. */
static void fill_plain_rows(const int64_t *order, const int64_t *offsets, const float *const *A, int64_t n_slots,
                            int64_t M, const float *fill, int64_t len, float *out) {
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < M; ++p) {
        int64_t a = 0;
        while (a < n_slots && offsets[a + 1] <= p) ++a;
        if (a < n_slots && A[a]) continue;
        float *row = out + order[p] * len;
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
}

/* ||W_i + s (B A)_i|| from w2 = ||W_i||^2, b = B_i (r), wa = (W A^T)_i (r) and gram = A A^T (r x r):
 * sqrt(max(0, w2 + 2 s <b, wa> + s^2 b gram b^T)). */
static inline float dora_row_norm(float w2, const float *b, const float *wa, const float *gram, float s, int64_t r) {
    float cross = 0.0f, quad = 0.0f;
    for (int64_t j = 0; j < r; ++j) {
        float gb = 0.0f;
        for (int64_t k = 0; k < r; ++k) gb += gram[j * r + k] * b[k];
        cross += b[j] * wa[j];
        quad += b[j] * gb;
    }
    float n2 = w2 + 2.0f * s * cross + s * s * quad;
    return sqrtf(n2 > 0.0f ? n2 : 0.0f);
}

/* DoRA's row norms without B A (lorakern/dora.py, weight_norm): for each row i of W (N x K),
 * norm[i] = ||W_i + s (B A)_i|| (dora_row_norm), W A^T four rows at a time. B: N x r. */
void dora_norm_f32(const float *W, const float *A, const float *B, const float *w2, const float *gram, float s,
                   int64_t N, int64_t K, int64_t r, float *norm, int threads) {
    int64_t blocks = (N + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        int64_t i0 = blk * ROWS;
        float wa[ROWS * 256];
        const float *wr[ROWS];
        block_rows(W, i0, N, K, wr);
        dots4(wr, A, r, K, wa);
        for (int q = 0; q < ROWS && i0 + q < N; ++q)
            norm[i0 + q] = dora_row_norm(w2[i0 + q], B + (i0 + q) * r, wa + q * r, gram, s, r);
    }
}

/* out (N x K) = diag(c) (W + s B A), four rows of W at a time, A read from L1. The scale c: given (c_in; NULL
 * means 1), or with w2 given DoRA's c = m / ||W_i + s (B A)_i|| computed from the same rows (their W A^T first,
 * while they are in L1), written to c_out and the norms to norm. */
static void merge_rows(const float *W, const float *A, const float *B, float s, const float *c_in, const float *w2,
                       const float *gram, const float *m, int64_t N, int64_t K, int64_t r, float *norm,
                       float *c_out, float *out, int threads) {
    int64_t blocks = (N + ROWS - 1) / ROWS;
    #pragma omp parallel num_threads(threads)
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
                    scale[q] = m[i] / n;
                    if (i == i0 + q) {  /* a real row, not a repeat past N */
                        norm[i] = n;
                        c_out[i] = scale[q];
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
}

/* out (N x K) = diag(c) (W + s B A), the weight of the merged forms (lorakern/functional.py, merged_weight;
 * c NULL: 1; DoRA's folded backward passes its magnitude scale). B is N x r, A r x K. One pass over the rows
 * of W: torch's addmm then mul_ read and wrote the N x K weight twice, and its K = r product runs far below
 * BLAS's speed. Plain stores: the GEMM that follows reads out from the cache. */
void lora_merge_f32(const float *W, const float *A, const float *B, float s, const float *c, int64_t N, int64_t K,
                    int64_t r, float *out, int threads) {
    merge_rows(W, A, B, s, c, NULL, NULL, NULL, N, K, r, NULL, NULL, out, threads);
}

/* DoRA's folded forward weight in one pass over W (lorakern/dora.py, _folded_forward_native): norm[i] =
 * ||W_i + s (B A)_i|| (from w2 = ||W_i||^2 and gram = A A^T, as dora_norm_f32), c[i] = m[i] / norm[i], and
 * out = diag(c) (W + s B A). */
void dora_merge_f32(const float *W, const float *A, const float *B, const float *w2, const float *gram,
                    const float *m, float s, int64_t N, int64_t K, int64_t r, float *norm, float *c, float *out,
                    int threads) {
    merge_rows(W, A, B, s, NULL, w2, gram, m, N, K, r, norm, c, out, threads);
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
        int64_t a = 0;
        while (a < n_slots && offsets[a + 1] <= p) ++a;
        if (!bias || (a < n_slots && A[a])) continue;
        float *row = y + order[p] * N;
        for (int64_t n = 0; n < N; ++n) row[n] += bias[n];
    }
}

/* A DoRA row with dropout, y = x W^T + b + c (x~ W^T + s u B^T) - x~ W^T, for four rows q: with base_q = x~ W^T,
 * t = base_q[n] + sum_j coef[q * r + j] * mat[j * len + n] (written to keep_q when keep is not NULL) and
 * row_q[n] = (row_q[n] - base_q[n]) + c[n] * t + b[n] (row_q holding x W^T). */
static void shifted_update4(float *const rows[ROWS], float *const keep[ROWS], const float *const base[ROWS],
                            const float *scale, const float *bias, const float *coef, const float *mat, int64_t r,
                            int64_t len) {
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
        store(rows[0] + n, (load(rows[0] + n) - v0) + c * t0 + b);
        store(rows[1] + n, (load(rows[1] + n) - v1) + c * t1 + b);
        store(rows[2] + n, (load(rows[2] + n) - v2) + c * t2 + b);
        store(rows[3] + n, (load(rows[3] + n) - v3) + c * t3 + b);
    }
    for (; n < len; ++n)
        for (int q = 0; q < ROWS; ++q) {
            float t = base[q][n];
            for (int64_t j = 0; j < r; ++j) t += coef[q * r + j] * mat[j * len + n];
            if (keep[q]) keep[q][n] = t;
            rows[q][n] = (rows[q][n] - base[q][n]) + scale[n] * t + (bias ? bias[n] : 0.0f);
        }
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
