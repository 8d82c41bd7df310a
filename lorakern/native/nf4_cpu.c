/* NF4 blockwise quantization and decoding on the CPU, bit-identical to lorakern.core.nf4 and to
 * bitsandbytes' pure-PyTorch backend: the same fp32 operations in the same order, one block at a time.
 * Built on first use by lorakern/native/__init__.py with -ffp-contract=off (no fused multiply-adds). */
#include <math.h>
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Index of the code whose midpoint interval holds v: the number of midpoints strictly below v
 * (a value exactly on a midpoint takes the lower code), as numpy.searchsorted(..., side="left"). */
static inline uint8_t code_of(float v, const float *mid, int64_t n_mid) {
    if (n_mid <= 16) {
        uint8_t c = 0;
        for (int64_t j = 0; j < n_mid; ++j) c += mid[j] < v;
        return c;
    }
    int64_t lo = 0, hi = n_mid;
    while (lo < hi) {
        int64_t m = (lo + hi) / 2;
        if (mid[m] < v) lo = m + 1; else hi = m;
    }
    return (uint8_t)lo;
}

/* x (n fp32) -> codes and absmax per block. Full blocks: clamp(x * fl(1 / max(absmax, 1e-38)), -1, 1);
 * a partial last block: clamp(x / max(its absmax, 1e-38), -1, 1), and that clamped absmax is stored.
 * pack != 0: two codes per byte, the first in the high nibble, an odd tail padded with code 7.
 * Blocks are even-sized (32..4096), so each block owns whole bytes. */
void blockwise_quantize_f32(const float *x, int64_t n, int64_t blocksize, const float *mid, int64_t n_mid,
                            int pack, uint8_t *out, float *absmax) {
    int64_t blocks = (n + blocksize - 1) / blocksize;
    #pragma omp parallel
    {
        uint8_t codes[4096];
        float scaled[4096];
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            int64_t start = b * blocksize;
            int64_t len = start + blocksize < n ? blocksize : n - start;
            const float *xb = x + start;
            float am = 0.0f;
            for (int64_t i = 0; i < len; ++i) am = fmaxf(am, fabsf(xb[i]));
            float guarded = fmaxf(am, 1e-38f);
            if (len < blocksize) {
                absmax[b] = guarded;
                for (int64_t i = 0; i < len; ++i) scaled[i] = fminf(fmaxf(xb[i] / guarded, -1.0f), 1.0f);
            } else {
                absmax[b] = am;
                float inverse = 1.0f / guarded;
                for (int64_t i = 0; i < len; ++i) scaled[i] = fminf(fmaxf(xb[i] * inverse, -1.0f), 1.0f);
            }
            if (n_mid == 15) {
                /* NF4: a constant trip count, so the compiler unrolls it and vectorises over elements */
                for (int64_t i = 0; i < len; ++i) {
                    int c = 0;
                    for (int j = 0; j < 15; ++j) c += mid[j] < scaled[i];
                    codes[i] = (uint8_t)c;
                }
            } else {
                for (int64_t i = 0; i < len; ++i) codes[i] = code_of(scaled[i], mid, n_mid);
            }
            if (pack) {
                if (len % 2) codes[len] = 7;
                uint8_t *ob = out + start / 2;
                for (int64_t i = 0; i < (len + 1) / 2; ++i) ob[i] = (uint8_t)((codes[2 * i] << 4) | codes[2 * i + 1]);
            } else {
                for (int64_t i = 0; i < len; ++i) out[start + i] = codes[i];
            }
        }
    }
}

/* Elements [start, start + count) of a packed NF4 weight: code[nibble] * absmax[element / blocksize]
 * in fp32. start must be even. Walks whole blocks so each absmax is read once. */
void nf4_decode_f32(const uint8_t *packed, int64_t start, int64_t count, int64_t blocksize, const float *absmax,
                    const float *code, float *out) {
    int64_t first = start / blocksize, last = (start + count - 1) / blocksize;
    float pair[256][2];  /* byte -> its two decoded codes: one lookup per byte */
    for (int v = 0; v < 256; ++v) {
        pair[v][0] = code[v >> 4];
        pair[v][1] = code[v & 15];
    }
    #pragma omp parallel for schedule(static)
    for (int64_t b = first; b <= last; ++b) {
        int64_t lo = b * blocksize > start ? b * blocksize : start;
        int64_t hi = (b + 1) * blocksize < start + count ? (b + 1) * blocksize : start + count;
        float scale = absmax[b];
        float *ob = out + (lo - start);
        const uint8_t *pb = packed + lo / 2;  /* lo is even: block starts and start are */
        int64_t pairs = (hi - lo) / 2;
        int64_t k = 0;
#ifdef __AVX512F__
        /* 16 bytes -> 32 values: nibbles interleaved in order, looked up in the 16-entry code with a permute,
         * scaled by one fp32 multiply each (the same operation as the scalar loop below) */
        __m512 lut = _mm512_loadu_ps(code), vscale = _mm512_set1_ps(scale);
        __m128i low_mask = _mm_set1_epi8(0x0F);
        for (; k + 16 <= pairs; k += 16) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(pb + k));
            __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
            __m128i low = _mm_and_si128(bytes, low_mask);
            __m512i first = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(high, low));
            __m512i second = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(high, low));
            _mm512_storeu_ps(ob + 2 * k, _mm512_mul_ps(_mm512_permutexvar_ps(first, lut), vscale));
            _mm512_storeu_ps(ob + 2 * k + 16, _mm512_mul_ps(_mm512_permutexvar_ps(second, lut), vscale));
        }
#endif
        for (; k < pairs; ++k) {
            const float *p = pair[pb[k]];
            ob[2 * k] = p[0] * scale;
            ob[2 * k + 1] = p[1] * scale;
        }
        if ((hi - lo) % 2) ob[hi - lo - 1] = code[pb[pairs] >> 4] * scale;
    }
}
