// The fused block's elementwise glue (block.cpp), 16 elements at a time.
//
// Why: block.cpp's glue was the scalar loops of scalar.h (RMSNorm's scaling, RoPE, the cache writes,
// attention's output, the residual adds, the SwiGLU product): ~6000 elements a block, compiled for
// baseline x86-64 with a dtype branch per element, ~0.5 ms of a SmolLM2 decode step on the 2-core Xeon
// (perf: 4% of the main thread's samples of an int8 MXFP4 draft step). Each function here is one of
// those loops with the same fp32 operations on each element, in the same order, and the same rounding
// to bf16 (scalar::f32_to_bf16: nearest even, NaN kept quiet with its sign and high payload bits), so
// the results are the same bits; only the sum of squares of RMSNorm stays scalar (a sequential double
// sum, whose order is part of the result).

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace specqd_cpu {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))

#define GLUE __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define GLUE_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512dq,avx512vl")))

namespace {

GLUE_INLINE __mmask16 live(int64_t i, int64_t n) {
  return n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
}

// Elements [i, i + 16) of p (those under m) as fp32: bf16 widened exactly.
GLUE_INLINE __m512 load16(const void* p, int64_t i, bool bf16, __mmask16 m) {
  if (!bf16) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// v rounded to bf16 as scalar::f32_to_bf16 rounds, as exact fp32 values.
GLUE_INLINE __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                              _mm512_and_si512(hi, _mm512_set1_epi32(1)))), 16);
  const __m512i quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet);
}

GLUE_INLINE __m512 round_to(__m512 v, bool bf16) {  // scalar::round_to
  return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)) : v;
}

// scalar::store of 16 elements (those under m) at [i, i + 16) of p.
GLUE_INLINE void store16(void* p, int64_t i, __m512 v, bool bf16, __mmask16 m) {
  if (bf16)
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + i, m, _mm512_cvtepi32_epi16(bf16_bits(v)));
  else
    _mm512_mask_storeu_ps(static_cast<float*>(p) + i, m, v);
}

}  // namespace

GLUE void glue_add(const void* a, const void* b, void* out, int64_t n, bool bf16) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = live(i, n);
    store16(out, i, _mm512_add_ps(load16(a, i, bf16, m), load16(b, i, bf16, m)), bf16, m);
  }
}

GLUE void glue_mul(const void* a, const void* b, void* out, int64_t n, bool bf16) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = live(i, n);
    store16(out, i, _mm512_mul_ps(load16(a, i, bf16, m), load16(b, i, bf16, m)), bf16, m);
  }
}

GLUE void glue_convert(const void* src, bool src_bf16, void* dst, bool dst_bf16, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = live(i, n);
    store16(dst, i, load16(src, i, src_bf16, m), dst_bf16, m);
  }
}

GLUE void glue_norm(const void* x, const void* w, int64_t C, float eps, void* y, bool bf16) {
  // scalar::rms_norm_row's sum, element by element in order. Written out rather than calling scalar.h:
  // an inline function compiled here for AVX-512 could be the copy the linker keeps for baseline code.
  double ss = 0;
  if (bf16) {
    const uint16_t* xh = static_cast<const uint16_t*>(x);
    for (int64_t c = 0; c < C; ++c) {
      uint32_t u = static_cast<uint32_t>(xh[c]) << 16;
      float f;
      __builtin_memcpy(&f, &u, 4);
      ss += static_cast<double>(f) * f;
    }
  } else {
    const float* xf = static_cast<const float*>(x);
    for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(xf[c]) * xf[c];
  }
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(ss / C) + eps));
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = live(c, C);
    const __m512 normed = round_to(_mm512_mul_ps(load16(x, c, bf16, m), inv), bf16);
    store16(y, c, _mm512_mul_ps(load16(w, c, bf16, m), normed), bf16, m);
  }
}

GLUE void glue_rope(const void* x, const float* f, int64_t half, void* out, bool x_bf16, bool out_bf16) {
  // f holds (cos, sin) pairs: even and odd lanes of two loads
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = live(i, half);
    const __mmask16 lo = live(2 * i, 2 * half), hi = live(2 * i + 16, 2 * half);
    const __m512 f0 = _mm512_maskz_loadu_ps(lo, f + 2 * i), f1 = _mm512_maskz_loadu_ps(hi, f + 2 * i + 16);
    const __m512 c = _mm512_permutex2var_ps(f0, evens, f1), s = _mm512_permutex2var_ps(f0, odds, f1);
    const __m512 x1 = load16(x, i, x_bf16, m), x2 = load16(x, i + half, x_bf16, m);
    const __m512 a = _mm512_mul_ps(x1, c), b = _mm512_mul_ps(x2, s), p = _mm512_mul_ps(x2, c),
                 q = _mm512_mul_ps(x1, s);
    store16(out, i, round_to(_mm512_sub_ps(a, b), x_bf16), out_bf16, m);
    store16(out, i + half, round_to(_mm512_add_ps(p, q), x_bf16), out_bf16, m);
  }
}

// torch.argmax over a row: NaN above every number (the first NaN wins), else the first index whose
// value equals the maximum (so -0 and +0 tie). Two passes: the maximum with a NaN check, then the
// first match; each a vector compare per 16 elements.
GLUE int64_t glue_argmax(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = live(i, n);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, x + i);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) {  // a NaN in this block: the first one
      for (int64_t j = i;; ++j)
        if (std::isnan(x[j])) return j;
    }
    m = _mm512_max_ps(m, v);
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = live(i, n);  // masked load: never past x + n
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(k, _mm512_maskz_loadu_ps(k, x + i), top, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return 0;  // n == 0 (callers do not pass it)
}

#else  // not x86: never called (cpu_has_avx512() is false)

void glue_add(const void*, const void*, void*, int64_t, bool) {}
void glue_mul(const void*, const void*, void*, int64_t, bool) {}
void glue_convert(const void*, bool, void*, bool, int64_t) {}
void glue_norm(const void*, const void*, int64_t, float, void*, bool) {}
void glue_rope(const void*, const float*, int64_t, void*, bool, bool) {}
int64_t glue_argmax(const float*, int64_t) { return 0; }

#endif

}  // namespace specqd_cpu
