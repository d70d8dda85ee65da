"""A compiled batch-1 4-bit GEMV for x86 CPUs: the C kernel behind ``gemv_4bit`` when a C compiler exists.

Same math as ``quant.gemv`` (see its docstring): for each row ``o`` and each segment of ``G = gcd(B, in)``
consecutive inputs (a segment lies in one block, so it has one scale ``s``),

    y[o] += s * sum_{i in segment} T[q[o, i]] * x[i]

With AVX-512 the 16-entry table ``T`` sits in one register and ``_mm512_permutexvar_ps`` looks up 16
codes at once; the high and low nibbles of 16 packed bytes meet the even and odd inputs (de-interleaved
once per call), so 32 weights cost two lookups and two fused multiply-adds and are never stored. For one
input row each segment's vector sum is scaled and added to the row's accumulator, reduced once per row;
for several rows (a short prefill) two weight rows are decoded and scaled at a time and used for 8 input
rows, with the 16 accumulators in registers.
The double-quantized scale is decoded in the kernel exactly as ``block_absmax`` does it in fp32:
``nested_code[a] * nested_absmax[b / 256] + offset``. Without AVX-512 (or when ``G`` is not a multiple
of 32) a scalar loop does the same sums.

The source is compiled once with ``cc -O3 -march=native -ffp-contract=off`` (the scale decode then rounds as torch does) into ``$XDG_CACHE_HOME/qlorakit/kernels``
(named by the source hash and the machine), written atomically, and loaded with ``ctypes``. If no
compiler is found or compiling fails, ``gemv_native`` returns ``None`` and the caller uses the pure-torch
path. ``QLORAKIT_NATIVE=0`` turns the kernel off. One thread (batch-1 work per layer is small).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch

from qlorakit.hardware import cpu_flags
from qlorakit.quant.tensor import QuantizedTensor

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float block_scale(int64_t b, const float* absmax, const uint8_t* qabsmax, const float* nested_absmax,
                                const float* nested_code, float offset, int64_t nested_bs) {
    if (absmax) return absmax[b];
    return nested_code[qabsmax[b]] * nested_absmax[b / nested_bs] + offset;
}

#define GROUP 8 /* rows of x that share each decoded weight vector, accumulators kept in registers */

/* y[rows][out] = x[rows][in] @ dequant(W)^T for an even `in`; seg = gcd(blocksize, in) elements. */
void gemv4bit(const float* x, const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
              const float* nested_absmax, const float* nested_code, float offset, int64_t nested_bs,
              const float* code, float* y, int64_t out, int64_t in, int64_t blocksize, int64_t seg, int64_t rows) {
    int64_t half = in / 2, seg_bytes = seg / 2, segs = in / seg;
    int64_t padded = rows == 1 ? 1 : (rows + GROUP - 1) / GROUP * GROUP;
    /* xe[r][j] = x[r][2j], xo[r][j] = x[r][2j+1]; rows past `rows` are zero */
    float* xe = (float*)calloc((size_t)(half * 2 * padded), sizeof(float));
    float* xo = xe + half * padded;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < half; j++) { xe[r * half + j] = x[r * in + 2 * j]; xo[r * half + j] = x[r * in + 2 * j + 1]; }
#ifdef __AVX512F__
    int vector = seg_bytes % 16 == 0;
    __m512 table = _mm512_loadu_ps(code);
    __m512i low4 = _mm512_set1_epi32(15);
#endif
    int64_t o = 0;
#ifdef __AVX512F__
    if (vector && rows == 1) {  /* batch 1, four weight rows at a time: four independent FMA chains */
        for (; o + 4 <= out; o += 4) {
            __m512 total[4];
            for (int r = 0; r < 4; r++) total[r] = _mm512_setzero_ps();
            for (int64_t s = 0; s < segs; s++) {
                __m512 sum[4];
                for (int r = 0; r < 4; r++) sum[r] = _mm512_setzero_ps();
                for (int64_t j = s * seg_bytes; j < (s + 1) * seg_bytes; j += 16) {
                    __m512 ve = _mm512_loadu_ps(xe + j), vo = _mm512_loadu_ps(xo + j);
                    for (int r = 0; r < 4; r++) {
                        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(packed + (o + r) * half + j)));
                        sum[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), ve, sum[r]);
                        sum[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), table), vo, sum[r]);
                    }
                }
                for (int r = 0; r < 4; r++) {
                    __m512 scale = _mm512_set1_ps(block_scale(((o + r) * in + s * seg) / blocksize, absmax, qabsmax,
                                                              nested_absmax, nested_code, offset, nested_bs));
                    total[r] = _mm512_fmadd_ps(sum[r], scale, total[r]);
                }
            }
            for (int r = 0; r < 4; r++) y[o + r] = _mm512_reduce_add_ps(total[r]);
        }
    }
#endif
    for (; o < out; o++) {
        const uint8_t* wrow = packed + o * half;
        int64_t first = o * in;
#ifdef __AVX512F__
        if (vector && rows == 1) {  /* batch 1, the rows left over from the groups of four */
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
        if (vector) {  /* weight rows o, o+1 against GROUP rows of x: 16 accumulators in registers */
            int64_t o1 = o + 1 < out ? o + 1 : o;  /* an odd last row is paired with itself */
            const uint8_t* wrow1 = packed + o1 * half;
            for (int64_t g = 0; g < padded; g += GROUP) {
                __m512 acc0[GROUP], acc1[GROUP];
                for (int r = 0; r < GROUP; r++) { acc0[r] = _mm512_setzero_ps(); acc1[r] = _mm512_setzero_ps(); }
                for (int64_t s = 0; s < segs; s++) {
                    __m512 sc0 = _mm512_set1_ps(block_scale((first + s * seg) / blocksize, absmax, qabsmax,
                                                            nested_absmax, nested_code, offset, nested_bs));
                    __m512 sc1 = _mm512_set1_ps(block_scale((o1 * in + s * seg) / blocksize, absmax, qabsmax,
                                                            nested_absmax, nested_code, offset, nested_bs));
                    for (int64_t j = s * seg_bytes; j < (s + 1) * seg_bytes; j += 16) {
                        __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wrow + j)));
                        __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wrow1 + j)));
                        /* dequantized weights T[c] * scale, as the reference computes them */
                        __m512 w0h = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), table), sc0);
                        __m512 w0l = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(b0, low4), table), sc0);
                        __m512 w1h = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), table), sc1);
                        __m512 w1l = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(b1, low4), table), sc1);
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
            o = o1;  /* the loop's o++ moves past the pair */
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
        if (i < full) { a = _mm512_fmadd_ps(_mm512_loadu_ps(row + i), _mm512_loadu_ps(x + i), a); i += 16; }
        if (tail) b = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, row + i), _mm512_maskz_loadu_ps(tail, x + i), b);
        y[o] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
#endif
    for (; o < out; o++) {
        float total = 0.0f;
        for (int64_t i = 0; i < in; i++) total += w[o * in + i] * x[i];
        y[o] = total;
    }
}

/* bf16 <-> fp32 as torch converts them: bf16 is the top half of an fp32; fp32 -> bf16 rounds to nearest
   even (NaN -> 0x7FC0). */
static inline float from_bf16(uint16_t h) { union { uint32_t u; float f; } v; v.u = (uint32_t)h << 16; return v.f; }
static inline uint16_t to_bf16(float f) {
    union { uint32_t u; float f; } v; v.f = f;
    if (f != f) return 0x7FC0;
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

/* gemv4bit for bf16 x and y: x is widened to fp32 (exact), the sums are the fp32 kernel's, y is rounded
   once, exactly what x.float() -> gemv4bit -> .to(bfloat16) gives. */
void gemv4bit_bf16(const uint16_t* x, const uint8_t* packed, const float* absmax, const uint8_t* qabsmax,
                   const float* nested_absmax, const float* nested_code, float offset, int64_t nested_bs,
                   const float* code, uint16_t* y, int64_t out, int64_t in, int64_t blocksize, int64_t seg,
                   int64_t rows) {
    float* xf = (float*)malloc((size_t)(rows * in + rows * out) * sizeof(float));
    float* yf = xf + rows * in;
    for (int64_t i = 0; i < rows * in; i++) xf[i] = from_bf16(x[i]);
    gemv4bit(xf, packed, absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs, code, yf, out, in,
             blocksize, seg, rows);
    for (int64_t i = 0; i < rows * out; i++) y[i] = to_bf16(yf[i]);
    free(xf);
}

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
#define RNE16(v) _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(v), \
    _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), one))), 16))
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
            if (bf16) out16[i] = to_bf16(v); else out32[i] = v;
        }
    }
}

void dequant4bit(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* nested_absmax,
                 const float* nested_code, float offset, int64_t nested_bs, const float* code,
                 float* out, int64_t n, int64_t blocksize) {
    dequant_any(packed, absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs, code, out, n, blocksize, 0);
}

void dequant4bit_bf16(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* nested_absmax,
                      const float* nested_code, float offset, int64_t nested_bs, const float* code,
                      uint16_t* out, int64_t n, int64_t blocksize) {
    dequant_any(packed, absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs, code, out, n, blocksize, 1);
}

/* gemv_f32 for a bf16 weight and x: products of bf16 values are exact in fp32, sums in fp32, y rounded
   once to bf16 (F.linear in bf16 also sums in fp32; the order differs). */
void gemv_bf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t out, int64_t in) {
    float* xf = (float*)malloc((size_t)in * sizeof(float));
    for (int64_t i = 0; i < in; i++) xf[i] = from_bf16(x[i]);
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
            a = _mm512_fmadd_ps(WIDEN(_mm256_loadu_si256((const __m256i*)(row + i))), _mm512_loadu_ps(xf + i), a);
            b = _mm512_fmadd_ps(WIDEN(_mm256_loadu_si256((const __m256i*)(row + i + 16))), _mm512_loadu_ps(xf + i + 16), b);
        }
        if (i < full) { a = _mm512_fmadd_ps(WIDEN(_mm256_loadu_si256((const __m256i*)(row + i))), _mm512_loadu_ps(xf + i), a); i += 16; }
        if (tail) b = _mm512_fmadd_ps(WIDEN(_mm256_maskz_loadu_epi16(tail, row + i)), _mm512_maskz_loadu_ps(tail, xf + i), b);
#undef WIDEN
        y[o] = to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(a, b)));
    }
#endif
    for (; o < out; o++) {
        float total = 0.0f;
        for (int64_t i = 0; i < in; i++) total += from_bf16(w[o * in + i]) * xf[i];
        y[o] = to_bf16(total);
    }
    free(xf);
}
"""

#: ctypes signatures: pointers are passed as ints (``data_ptr()``), NULL as ``None``.
_SIGNATURES = {
    "gemv4bit": [ctypes.c_void_p] * 6 + [ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    + [ctypes.c_int64] * 5,
    "dequant4bit": [ctypes.c_void_p] * 5 + [ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    + [ctypes.c_int64] * 2,
    "gemv_f32": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2,
    "gemv_bf16": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2,
}
_SIGNATURES["gemv4bit_bf16"] = _SIGNATURES["gemv4bit"]
_SIGNATURES["dequant4bit_bf16"] = _SIGNATURES["dequant4bit"]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "qlorakit" / "kernels"


def _compile(target: Path) -> None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "gemv4bit.c"
        source.write_text(_SOURCE)
        built = Path(tmp) / target.name
        subprocess.run([compiler, "-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(built), str(source)],
                       check=True, capture_output=True, text=True)
        os.replace(built, target)


@cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel (building it on first use), or ``None`` when it is off or cannot be built."""
    if os.environ.get("QLORAKIT_NATIVE", "1") == "0" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    # -march=native code only runs where the CPU has the same instruction sets: the flags are in the key.
    machine = " ".join(sorted(cpu_flags())) or platform.node()
    tag = hashlib.sha256((_SOURCE + platform.machine() + machine).encode()).hexdigest()[:16]
    target = _cache_dir() / f"gemv4bit-{tag}.so"
    try:
        if not target.is_file():
            _compile(target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        warnings.warn(f"qlorakit: native 4-bit GEMV unavailable ({detail}); using the pure-torch path", stacklevel=2)
        return None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, None
    return library


def _usable(q: QuantizedTensor) -> bool:
    return q.device.type == "cpu" and q.code.dtype == torch.float32 and all(t.is_contiguous() for t in q.tensors())


def _scale_args(q: QuantizedTensor) -> tuple:
    """(absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs): the kernels' block-scale arguments."""
    nested = q.nested
    if nested is None:
        return q.absmax.data_ptr(), None, None, None, 0.0, 1
    return None, q.absmax.data_ptr(), nested.absmax.data_ptr(), nested.code.data_ptr(), nested.offset, nested.blocksize


class BoundGemv:
    """``x @ dequant(q).T`` by the compiled kernel for one weight, its arguments marshalled once.

    Holds ``q`` (so the pointers stay valid); call with fp32 ``x (rows, in)`` contiguous on the CPU.
    """

    __slots__ = ("_bf16", "_function", "_head", "_tail", "out_features", "q")

    def __init__(self, library: Any, q: QuantizedTensor) -> None:
        out_f, in_f = q.shape
        absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs = _scale_args(q)
        self._function, self._bf16 = library.gemv4bit, library.gemv4bit_bf16
        self.q, self.out_features = q, out_f
        self._head = (q.packed.data_ptr(), absmax, qabsmax, nested_absmax, nested_code, offset, nested_bs,
                      q.code.data_ptr())
        self._tail = (out_f, in_f, q.blocksize, math.gcd(q.blocksize, in_f))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, in) fp32 -> (rows, out) fp32
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        self._function(x.data_ptr(), *self._head, y.data_ptr(), *self._tail, x.shape[0])
        return y

    def bf16(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, in) bf16 -> (rows, out) bf16
        """``self(x.float()).to(torch.bfloat16)`` in one call (the casts done in C, bit-identical)."""
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.bfloat16)
        self._bf16(x.data_ptr(), *self._head, y.data_ptr(), *self._tail, x.shape[0])
        return y


def bind_gemv(q: QuantizedTensor) -> BoundGemv | None:
    """A ``BoundGemv`` for a 2-D CPU weight with an even ``in``, or ``None`` when the kernel cannot take it."""
    library = load_kernel()
    if library is None or len(q.shape) != 2 or q.shape[1] % 2 or not _usable(q):
        return None
    return BoundGemv(library, q)


def gemv_native(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor | None:
    """x fp32 (rows, in) contiguous on the CPU -> y fp32 (rows, out), or ``None`` if the kernel cannot take it."""
    bound = bind_gemv(q) if x.device.type == "cpu" else None
    return None if bound is None else bound(x)


def dequantize_native(
    q: QuantizedTensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The decode of ``q`` (flat, ``q.numel`` values) in fp32, or rounded once to bf16, by the compiled kernel.

    ``None`` without the kernel or for another ``dtype`` (the caller then casts the fp32 decode). ``out``: a
    contiguous CPU tensor of ``q.numel`` elements in ``dtype`` to write into (returned flat) instead of a new one.
    """
    library = load_kernel()
    if library is None or not _usable(q) or dtype not in (torch.float32, torch.bfloat16):
        return None
    if out is None:
        out = torch.empty(q.numel, dtype=dtype)
    elif out.dtype != dtype or out.numel() != q.numel or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"out must be a contiguous CPU {dtype} tensor of {q.numel} elements, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    out = out.view(-1)
    function = library.dequant4bit if dtype == torch.float32 else library.dequant4bit_bf16
    function(q.packed.data_ptr(), *_scale_args(q), q.code.data_ptr(), out.data_ptr(), q.numel, q.blocksize)
    return out


def dense_gemv_native(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x (in,) @ weight (out, in).T -> (out,)`` for one CPU row in fp32 or bf16 (summed in fp32), or ``None``."""
    library = load_kernel()
    usable = x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
    usable = usable and x.device.type == weight.device.type == "cpu" and x.is_contiguous() and weight.is_contiguous()
    if library is None or not usable:
        return None
    out_f, in_f = weight.shape
    y = torch.empty(out_f, dtype=x.dtype)
    function = library.gemv_f32 if x.dtype == torch.float32 else library.gemv_bf16
    function(x.data_ptr(), weight.data_ptr(), y.data_ptr(), out_f, in_f)
    return y
