/* The 4-bit GEMV y = x @ dequant(W)^T for a few input rows (batch-1 decoding, a short prefill), fp32 or
   bf16, W never materialized: the sums of quant/gemv.py with AVX-512 table lookups, or a scalar loop
   without AVX-512 (the scheme is described in quant/backends/cpu_native.py). */
#include "common.h"

#define GROUP 8 /* rows of x that share each decoded weight vector, accumulators kept in registers */

/* y[rows][out] = x[rows][in] @ dequant(W)^T for an even `in`; seg = gcd(blocksize, in) elements. */
void gemv4bit(const float* x, const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
              const float* nested_absmax, const float* nested_code, float offset, int64_t nested_bs,
              const float* code, float* y, int64_t out, int64_t in, int64_t blocksize, int64_t seg,
              int64_t rows) {
    int64_t half = in / 2, seg_bytes = seg / 2, segs = in / seg;
    int64_t padded = rows == 1 ? 1 : (rows + GROUP - 1) / GROUP * GROUP;
    /* xe[r][j] = x[r][2j], xo[r][j] = x[r][2j+1]; rows past `rows` are zero */
    float* xe = (float*)calloc((size_t)(half * 2 * padded), sizeof(float));
    float* xo = xe + half * padded;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < half; j++) {
            xe[r * half + j] = x[r * in + 2 * j];
            xo[r * half + j] = x[r * in + 2 * j + 1];
        }
#ifdef __AVX512F__
    int vector = seg_bytes % 16 == 0;
    __m512 table = _mm512_loadu_ps(code);
    __m512i low4 = _mm512_set1_epi32(15);
#endif
    int64_t o = 0;
#ifdef __AVX512F__
    if (vector && rows == 1) { /* batch 1, four weight rows at a time: four independent FMA chains */
        for (; o + 4 <= out; o += 4) {
            __m512 total[4];
            for (int r = 0; r < 4; r++)
                total[r] = _mm512_setzero_ps();
            for (int64_t s = 0; s < segs; s++) {
                __m512 sum[4];
                for (int r = 0; r < 4; r++)
                    sum[r] = _mm512_setzero_ps();
                for (int64_t j = s * seg_bytes; j < (s + 1) * seg_bytes; j += 16) {
                    __m512 ve = _mm512_loadu_ps(xe + j), vo = _mm512_loadu_ps(xo + j);
                    for (int r = 0; r < 4; r++) {
                        __m512i bytes = _mm512_cvtepu8_epi32(
                            _mm_loadu_si128((const __m128i*)(packed + (o + r) * half + j)));
                        sum[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table),
                                                 ve, sum[r]);
                        sum[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), table),
                                                 vo, sum[r]);
                    }
                }
                for (int r = 0; r < 4; r++) {
                    __m512 scale =
                        _mm512_set1_ps(block_scale(((o + r) * in + s * seg) / blocksize, absmax, qabsmax,
                                                   nested_absmax, nested_code, offset, nested_bs));
                    total[r] = _mm512_fmadd_ps(sum[r], scale, total[r]);
                }
            }
            for (int r = 0; r < 4; r++)
                y[o + r] = _mm512_reduce_add_ps(total[r]);
        }
    }
#endif
    for (; o < out; o++) {
        const uint8_t* wrow = packed + o * half;
        int64_t first = o * in;
#ifdef __AVX512F__
        if (vector && rows == 1) { /* batch 1, the rows left over from the groups of four */
            __m512 total = _mm512_setzero_ps();
            for (int64_t s = 0; s < segs; s++) {
                __m512 sum = _mm512_setzero_ps();
                for (int64_t j = s * seg_bytes; j < (s + 1) * seg_bytes; j += 16) {
                    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wrow + j)));
                    sum = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table),
                                          _mm512_loadu_ps(xe + j), sum);
                    sum = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), table),
                                          _mm512_loadu_ps(xo + j), sum);
                }
                __m512 scale = _mm512_set1_ps(block_scale((first + s * seg) / blocksize, absmax, qabsmax,
                                                          nested_absmax, nested_code, offset, nested_bs));
                total = _mm512_fmadd_ps(sum, scale, total);
            }
            y[o] = _mm512_reduce_add_ps(total);
            continue;
        }
        if (vector) { /* weight rows o, o+1 against GROUP rows of x: 16 accumulators in registers */
            int64_t o1 = o + 1 < out ? o + 1 : o; /* an odd last row is paired with itself */
            const uint8_t* wrow1 = packed + o1 * half;
            for (int64_t g = 0; g < padded; g += GROUP) {
                __m512 acc0[GROUP], acc1[GROUP];
                for (int r = 0; r < GROUP; r++) {
                    acc0[r] = _mm512_setzero_ps();
                    acc1[r] = _mm512_setzero_ps();
                }
                for (int64_t s = 0; s < segs; s++) {
                    __m512 sc0 = _mm512_set1_ps(block_scale((first + s * seg) / blocksize, absmax, qabsmax,
                                                            nested_absmax, nested_code, offset, nested_bs));
                    __m512 sc1 = _mm512_set1_ps(block_scale((o1 * in + s * seg) / blocksize, absmax, qabsmax,
                                                            nested_absmax, nested_code, offset, nested_bs));
                    for (int64_t j = s * seg_bytes; j < (s + 1) * seg_bytes; j += 16) {
                        __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wrow + j)));
                        __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wrow1 + j)));
                        /* dequantized weights T[c] * scale, as the reference computes them */
                        __m512 w0h =
                            _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), table), sc0);
                        __m512 w0l =
                            _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(b0, low4), table), sc0);
                        __m512 w1h =
                            _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), table), sc1);
                        __m512 w1l =
                            _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(b1, low4), table), sc1);
                        for (int r = 0; r < GROUP; r++) {
                            __m512 ve = _mm512_loadu_ps(xe + (g + r) * half + j);
                            __m512 vo = _mm512_loadu_ps(xo + (g + r) * half + j);
                            acc0[r] = _mm512_fmadd_ps(w0l, vo, _mm512_fmadd_ps(w0h, ve, acc0[r]));
                            acc1[r] = _mm512_fmadd_ps(w1l, vo, _mm512_fmadd_ps(w1h, ve, acc1[r]));
                        }
                    }
                }
                for (int r = 0; r < GROUP && g + r < rows; r++) {
                    y[(g + r) * out + o] = _mm512_reduce_add_ps(acc0[r]);
                    y[(g + r) * out + o1] = _mm512_reduce_add_ps(acc1[r]);
                }
            }
            o = o1; /* the loop's o++ moves past the pair */
            continue;
        }
#endif
        for (int64_t r = 0; r < rows; r++) {
            const float* xer = xe + r * half;
            const float* xor_ = xo + r * half;
            float total = 0.0f;
            for (int64_t s = 0; s < segs; s++) {
                float sum = 0.0f;
                for (int64_t j = s * seg_bytes; j < (s + 1) * seg_bytes; j++) {
                    uint8_t b = wrow[j];
                    sum += code[b >> 4] * xer[j] + code[b & 15] * xor_[j];
                }
                total += sum * block_scale((first + s * seg) / blocksize, absmax, qabsmax, nested_absmax,
                                           nested_code, offset, nested_bs);
            }
            y[r * out + o] = total;
        }
    }
    free(xe);
}

/* gemv4bit for bf16 x and y: x is widened to fp32 (exact), the sums are the fp32 kernel's, y is rounded
   once, exactly what x.float() -> gemv4bit -> .to(bfloat16) gives. */
void gemv4bit_bf16(const uint16_t* x, const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                   const float* nested_absmax, const float* nested_code, float offset, int64_t nested_bs,
                   const float* code, uint16_t* y, int64_t out, int64_t in, int64_t blocksize, int64_t seg,
                   int64_t rows) {
    float* xf = (float*)malloc((size_t)(rows * in + rows * out) * sizeof(float));
    float* yf = xf + rows * in;
    for (int64_t i = 0; i < rows * in; i++)
        xf[i] = from_bf16(x[i]);
    gemv4bit(xf, packed, absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs, code, yf, out, in,
             blocksize, seg, rows);
    for (int64_t i = 0; i < rows * out; i++)
        y[i] = to_bf16(yf[i]);
    free(xf);
}
