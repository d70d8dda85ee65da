/* The dense GEMV y = W x of one input row for an fp32 or bf16 weight (a decoding step's output head). */
#include "common.h"

/* y[o] = sum_i w[o][i] x[i] for a dense fp32 (out, in) row-major weight: one input row (a decoding step's
   head). Rows are read in order, one sequential stream (measured faster here than interleaving several
   rows' streams), with two independent accumulators per row. */
void gemv_f32(const float* x, const float* w, float* y, int64_t out, int64_t in) {
    int64_t o = 0;
#ifdef __AVX512F__
    int64_t pairs = in / 32 * 32, full = in / 16 * 16;
    __mmask16 tail = (__mmask16)((1u << (in - full)) - 1u);
    for (; o < out; o++) {
        const float* row = w + o * in;
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i < pairs; i += 32) {
            a = _mm512_fmadd_ps(_mm512_loadu_ps(row + i), _mm512_loadu_ps(x + i), a);
            b = _mm512_fmadd_ps(_mm512_loadu_ps(row + i + 16), _mm512_loadu_ps(x + i + 16), b);
        }
        if (i < full) {
            a = _mm512_fmadd_ps(_mm512_loadu_ps(row + i), _mm512_loadu_ps(x + i), a);
            i += 16;
        }
        if (tail)
            b = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, row + i), _mm512_maskz_loadu_ps(tail, x + i), b);
        y[o] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
#endif
    for (; o < out; o++) {
        float total = 0.0f;
        for (int64_t i = 0; i < in; i++)
            total += w[o * in + i] * x[i];
        y[o] = total;
    }
}

/* gemv_f32 for a bf16 weight and x: products of bf16 values are exact in fp32, sums in fp32, y rounded
   once to bf16 (F.linear in bf16 also sums in fp32; the order differs). */
void gemv_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t out, int64_t in) {
    float* xf = (float*)malloc((size_t)in * sizeof(float));
    for (int64_t i = 0; i < in; i++)
        xf[i] = from_bf16(x[i]);
    int64_t o = 0;
#ifdef __AVX512F__
    int64_t pairs = in / 32 * 32, full = in / 16 * 16;
    __mmask16 tail = (__mmask16)((1u << (in - full)) - 1u);
    for (; o < out; o++) {
        const uint16_t* row = w + o * in;
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
        int64_t i = 0;
#define WIDEN(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(p), 16))
        for (; i < pairs; i += 32) {
            a = _mm512_fmadd_ps(WIDEN(_mm256_loadu_si256((const __m256i*)(row + i))), _mm512_loadu_ps(xf + i),
                                a);
            b = _mm512_fmadd_ps(WIDEN(_mm256_loadu_si256((const __m256i*)(row + i + 16))),
                                _mm512_loadu_ps(xf + i + 16), b);
        }
        if (i < full) {
            a = _mm512_fmadd_ps(WIDEN(_mm256_loadu_si256((const __m256i*)(row + i))), _mm512_loadu_ps(xf + i),
                                a);
            i += 16;
        }
        if (tail)
            b = _mm512_fmadd_ps(WIDEN(_mm256_maskz_loadu_epi16(tail, row + i)),
                                _mm512_maskz_loadu_ps(tail, xf + i), b);
#undef WIDEN
        y[o] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(a, b)));
    }
#endif
    for (; o < out; o++) {
        float total = 0.0f;
        for (int64_t i = 0; i < in; i++)
            total += from_bf16(w[o * in + i]) * xf[i];
        y[o] = to_bf16(total);
    }
    free(xf);
}
