/* Shared by the qlorakit CPU kernels (gemv4bit.c, dequant4bit.c, gemv_dense.c): the scale of a quantization
   block, plain or double-quantized, and the bf16 <-> fp32 conversions exactly as torch does them. */
#ifndef QLORAKIT_COMMON_H
#define QLORAKIT_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* The fp32 scale of block b: absmax[b], or (double quantization) the 8-bit code decoded as block_absmax
   does it in fp32. */
static inline float block_scale(int64_t b, const float* absmax, const uint8_t* qabsmax,
                                const float* nested_absmax, const float* nested_code, float offset,
                                int64_t nested_bs) {
    if (absmax)
        return absmax[b];
    return nested_code[qabsmax[b]] * nested_absmax[b / nested_bs] + offset;
}

/* bf16 <-> fp32 as torch converts them: bf16 is the top half of an fp32; fp32 -> bf16 rounds to nearest
   even (NaN -> 0x7FC0). */
static inline float from_bf16(uint16_t h) {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}
static inline uint16_t to_bf16(float f) {
    union {
        uint32_t u;
        float f;
    } v;
    v.f = f;
    if (f != f)
        return 0x7FC0;
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

#endif /* QLORAKIT_COMMON_H */
