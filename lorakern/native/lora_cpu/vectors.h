/* lora_cpu.c, part 1 of 5: headers, the vector type and the register-level building blocks (dot products of
 * four rows, rank-r updates of four rows, the outer-product tiles), shared by every kernel below. */

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
