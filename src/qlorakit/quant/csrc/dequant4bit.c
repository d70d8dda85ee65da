/* The 4-bit decode table[code] * scale of a whole weight into fp32 or bf16, bit-identical to
   quant.functional.dequantize_4bit_reference. */
#include "common.h"

/* out[0..n) = code[c_i] * scale(block of i), c_i the high (even i) or low (odd i) nibble of packed[i / 2]:
   the decode of dequantize_4bit_reference, one multiply per value (bit-identical). `bf16` != 0 writes each
   value rounded to nearest even as uint16 bf16 bits, exactly what .to(torch.bfloat16) of the fp32 value
   gives (the values are finite); otherwise fp32. */
static void dequant_any(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                        const float* nested_absmax, const float* nested_code, float offset, int64_t nested_bs,
                        const float* code, void* out, int64_t n, int64_t blocksize, int bf16) {
    float* out32 = (float*)out;
    uint16_t* out16 = (uint16_t*)out;
    int64_t blocks = (n + blocksize - 1) / blocksize;
#ifdef __AVX512F__
    __m512 table = _mm512_loadu_ps(code);
    __m512i low4 = _mm512_set1_epi32(15), one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
    /* hi[j] -> out[2j], lo[j] -> out[2j+1]: first 16 outputs from j = 0..7, next 16 from j = 8..15 */
    __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
#define RNE16(v)                                                                                             \
    _mm512_cvtepi32_epi16(_mm512_srli_epi32(                                                                 \
        _mm512_add_epi32(                                                                                    \
            _mm512_castps_si512(v),                                                                          \
            _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), one))),   \
        16))
#endif
    for (int64_t b = 0; b < blocks; b++) {
        float s = block_scale(b, absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs);
        int64_t start = b * blocksize, end = start + blocksize < n ? start + blocksize : n;
        int64_t i = start;
#ifdef __AVX512F__
        __m512 scale = _mm512_set1_ps(s);
        for (; i + 32 <= end; i += 32) {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(packed + i / 2)));
            __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), scale);
            __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), table), scale);
            __m512 v0 = _mm512_permutex2var_ps(hi, first, lo), v1 = _mm512_permutex2var_ps(hi, second, lo);
            if (bf16) {
                _mm256_storeu_si256((__m256i*)(out16 + i), RNE16(v0));
                _mm256_storeu_si256((__m256i*)(out16 + i + 16), RNE16(v1));
            } else {
                _mm512_storeu_ps(out32 + i, v0);
                _mm512_storeu_ps(out32 + i + 16, v1);
            }
        }
#undef RNE16
#endif
        for (; i < end; i++) {
            uint8_t byte = packed[i / 2];
            float v = code[i % 2 ? byte & 15 : byte >> 4] * s;
            if (bf16)
                out16[i] = to_bf16(v);
            else
                out32[i] = v;
        }
    }
}

void dequant4bit(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                 const float* nested_absmax, const float* nested_code, float offset, int64_t nested_bs,
                 const float* code, float* out, int64_t n, int64_t blocksize) {
    dequant_any(packed, absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs, code, out, n,
                blocksize, 0);
}

void dequant4bit_bf16(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                      const float* nested_absmax, const float* nested_code, float offset, int64_t nested_bs,
                      const float* code, uint16_t* out, int64_t n, int64_t blocksize) {
    dequant_any(packed, absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs, code, out, n,
                blocksize, 1);
}
