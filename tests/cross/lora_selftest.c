/* A self-check of lorakern/native/lora_cpu.c without Python: for a target this machine cannot run Python
 * on (aarch64 under qemu-user), build the kernels with a cross compiler into this program and compare
 * every output with a double-precision loop written here. Prints the worst error relative to the
 * magnitude of the summed terms and exits non-zero when it exceeds the bound passed as argv[1].
 * Used by tests/test_native_cross.py. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

void lora_forward_f32(const float *x, const float *A, const float *B, const float *bias, float s, int64_t M,
                      int64_t K, int64_t N, int64_t r, float *u, float *y, int threads);
void lora_backward_f32(const float *g, const float *x, const float *u, const float *A, const float *B, float s,
                       int64_t M, int64_t K, int64_t N, int64_t r, float *dx, float *dA, float *dBt,
                       float *partial, int threads);
int64_t lora_backward_scratch(int64_t K, int64_t N, int64_t r, int threads);

static uint64_t state = 88172645463325252ull;
static float uniform(void) {  /* xorshift64: the same numbers on every target */
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return (float)((double)(state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}
static float *fill(int64_t n) {
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; ++i) p[i] = uniform();
    return p;
}
static double worst = 0.0;
static void compare(const char *what, const float *got, const double *ref, const double *mag, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        double e = fabs(got[i] - ref[i]) / (mag[i] + 1e-30);
        if (e > worst) { worst = e; }
        if (!(e <= 1.0)) { printf("%s[%ld]: got %g, expected %g\n", what, (long)i, got[i], ref[i]); }
    }
}

int main(int argc, char **argv) {
    double bound = argc > 1 ? atof(argv[1]) : 1e-6;
    const int64_t shapes[][4] = {{1, 6, 42, 1}, {6, 42, 123, 3}, {42, 123, 6, 8}, {9, 48, 80, 5}, {37, 33, 64, 17}};
    for (unsigned c = 0; c < sizeof shapes / sizeof shapes[0]; ++c) {
        int64_t M = shapes[c][0], K = shapes[c][1], N = shapes[c][2], r = shapes[c][3];
        float s = 1.5f;
        float *x = fill(M * K), *A = fill(r * K), *B = fill(N * r), *b = fill(N), *g = fill(M * N);
        float *u = fill(M * r), *y = fill(M * N), *dx = fill(M * K), *dA = fill(r * K), *dBt = fill(r * N);
        float *partial = fill(lora_backward_scratch(K, N, r, 2));
        lora_forward_f32(x, A, B, b, s, M, K, N, r, u, y, 2);
        lora_backward_f32(g, x, u, A, B, s, M, K, N, r, dx, dA, dBt, partial, 2);
        double *ru = calloc(M * r, 8), *mu = calloc(M * r, 8), *ry = calloc(M * N, 8), *my = calloc(M * N, 8);
        double *gB = calloc(M * r, 8), *mgB = calloc(M * r, 8), *rdx = calloc(M * K, 8), *mdx = calloc(M * K, 8);
        double *rdA = calloc(r * K, 8), *mdA = calloc(r * K, 8), *rdB = calloc(r * N, 8), *mdB = calloc(r * N, 8);
        for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < r; ++j)
                for (int64_t k = 0; k < K; ++k) {
                    ru[i * r + j] += (double)x[i * K + k] * A[j * K + k];
                    mu[i * r + j] += fabs((double)x[i * K + k] * A[j * K + k]);
                }
        for (int64_t i = 0; i < M; ++i)
            for (int64_t n = 0; n < N; ++n) {
                ry[i * N + n] = b[n]; my[i * N + n] = fabs(b[n]);
                for (int64_t j = 0; j < r; ++j) {
                    ry[i * N + n] += s * ru[i * r + j] * B[n * r + j];
                    my[i * N + n] += s * mu[i * r + j] * fabs(B[n * r + j]);
                }
                for (int64_t j = 0; j < r; ++j) {
                    gB[i * r + j] += (double)g[i * N + n] * B[n * r + j];
                    mgB[i * r + j] += fabs((double)g[i * N + n] * B[n * r + j]);
                }
            }
        for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < r; ++j) {
                for (int64_t k = 0; k < K; ++k) {
                    rdx[i * K + k] += s * gB[i * r + j] * A[j * K + k];
                    mdx[i * K + k] += s * mgB[i * r + j] * fabs(A[j * K + k]);
                    rdA[j * K + k] += s * gB[i * r + j] * x[i * K + k];
                    mdA[j * K + k] += s * mgB[i * r + j] * fabs(x[i * K + k]);
                }
                for (int64_t n = 0; n < N; ++n) {
                    rdB[j * N + n] += s * ru[i * r + j] * g[i * N + n];
                    mdB[j * N + n] += s * mu[i * r + j] * fabs(g[i * N + n]);
                }
            }
        compare("u", u, ru, mu, M * r);
        compare("y", y, ry, my, M * N);
        compare("dx", dx, rdx, mdx, M * K);
        compare("dA", dA, rdA, mdA, r * K);
        compare("dBt", dBt, rdB, mdB, r * N);
    }
    printf("worst relative error %.3e, bound %.3e\n", worst, bound);
    return worst <= bound ? 0 : 1;
}
