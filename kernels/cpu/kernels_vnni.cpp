// The int8-activation path of the 4-bit linears (AVX512-VNNI): y[M, N] = x[M, K] @ W.T with W in MXFP4
// or int4, repacked once (pack_i8) into 16-row stripes, x quantized to int8 per block of 32, integer dot
// products by vpdpbusd.
//
// Why. The exact kernels (kernels_avx512.cpp) decode each 4-bit weight into an fp32 and spend shuffles
// and an FMA per 16 weights and activation row: they read MXFP4 at ~10-17 GB/s with two threads, bound
// by that arithmetic rather than by memory. Here a weight becomes a byte with one byte shuffle per 64
// weights, and one vpdpbusd multiplies 64 weights by int8 activations and adds them in fours, exactly,
// in int32. The price is the activation rounding: x is rounded to 8 bits (the weights stay exact), so
// this is a level's numerics to choose (accel.py: int8_activations), not a faster way to get the same
// bits.
//
// The layout. In the weight as quantized (codes [N, K/2], row-major) the 32 elements of a block sit in
// one row, so summing a block's products in one int32 lane costs a transposition per weight row (an
// earlier version of this file did that: 12 permutes per 512 weights, and a hard case for K not a
// multiple of 512). pack_i8 reorders the bytes once, at load time, into stripes of 16 weight rows where
// int32 lane r is weight row r: per stripe and block j of 32 elements, 4 vectors of 64 bytes, vector t
// holding in bytes 4r..4r+3 the codes of row r for elements 8t..8t+3 (low nibbles) and 8t+4..8t+7 (high
// nibbles). So each 64-byte load gives, by an and, a shift and (MXFP4) a vpshufb, two 16-row x 4-element
// byte tiles, and a vpdpbusd against 4 activation bytes broadcast adds 4 products into each row's lane:
// 8 of them make the 16 rows' block dots, in lanes, with nothing to transpose or reduce. A stripe's
// codes are one contiguous run of K * 8 bytes and the stripes follow each other: one sequential stream
// per thread. The scales go the same way: per stripe and block (MXFP4) or group (int4), the 16 rows'
// scales side by side (MXFP4: E8M0 bytes; int4: converted to fp32, exactly).
//
// The maths, for output y[m, n] (everything here is exact except the marked fp32 roundings):
//   Activations, per row m and block j of 32 elements (prep_i8; each row alone):
//     amax = max |x|,  sx = amax / 127 (fp32, rounded),  a_i = clamp(round_half_even(x_i / sx), -127, 127)
//     (a = 0 and sx = 0 when sx is 0). One scale per block, not per row: a block is where the weight
//     scale changes anyway, so it costs nothing in the inner loop, and an outlier channel (LLM
//     activations have a few, tens of times the rest) then coarsens only its own 32 activations
//     instead of the whole row.
//   Weights, per block j of row n: MXFP4 w_i = e_i * sw with e_i = 2 * E2M1 value, an integer in
//     [-12, 12], and sw = 2^(s - 128) for the E8M0 byte s (255: NaN); int4 w_i = q_i * sw with q_i in
//     [-8, 7] and sw the group's bf16/fp16 scale.
//   d_j = sum_i e_i a_i, an exact integer (|d_j| <= 32 * 12 * 127 < 2^24, so exact in fp32 too),
//   p_j = fp32(fp32(d_j) * fp32(sw_j * sx_j)): two roundings (the product of the scales, then d times it;
//     no FMA, so that PyTorch can reproduce them bit for bit). For MXFP4, fp32(sw * sx) is computed as
//     vscalefps(sx, s - 128): the same single rounding of the same exact product, without forming the
//     subnormal 2^-128 (a subnormal operand costs a microcode assist on some CPUs).
//   y[m, n] = (...((p_0 + p_1) + p_2) + ...) + p_last: the blocks in order, in fp32 (starting from +0).
// Nothing in this sequence depends on M, on the stripe, or on the thread: the same bits for a row alone
// or among many, as the exact kernels (the property speculative verification needs).
//
// vpdpbusd multiplies unsigned by signed bytes, so the weights go in as unsigned u = e + 12 (MXFP4, a
// 16-entry byte table: vpshufb) or u = q + 8 (int4: the stored nibble itself), and the offset comes
// back out per block: d_j = sum u_i a_i - 12 (or 8) * sum a_i, the last term computed once per call
// with the activations.
//
// Prepared activations (prep_i8), per row, i8_row_bytes(K) bytes (64-byte aligned): the K int8 a_i in
// natural order, then the K/32 fp32 sx_j, then the K/32 int32 offset terms.
//
// Speed (the weights of a SmolLM2-135M step, MXFP4, M = 1, two threads, streamed, on a 2-core Xeon with
// AMX): 12.8 GB/s against the exact kernel's 8.8 GB/s and the transposing version's 11.4 in the same
// process, where bf16_linear streamed 18 GB/s; from L2, one thread, 1.0 ns per block of 32 weights
// against the exact kernel's 2.9.

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace specqd_cpu {

int64_t i8_row_bytes(int64_t K) { return (K + 8 * (K / 32) + 63) / 64 * 64; }

int64_t i8_scratch_bytes(int64_t M, int64_t K) { return M * i8_row_bytes(K); }

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))

#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define VNNI_INLINE \
  static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

bool cpu_has_avx512_vnni() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
}

namespace {

// Software prefetch this far ahead in a stripe's codes (one sequential stream per thread): without it
// the stream ran 10% slower on the Xeon above; 1 KB and 8 KB did as well as 4 KB.
constexpr int64_t kPrefetchBytes = 4096;
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// 16 fp32 -> bf16 bits, round to nearest even, NaN -> quiet NaN (torch's rounding).
VNNI_INLINE __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// A stripe's 16 MXFP4 block scales as the exponents s - 128 of sw = 2^(s - 128) (the e_i carry a factor
// 2), as fp32; NaN for 255. i8_stripes multiplies by sw with vscalefps.
VNNI_INLINE __m512 mxfp4_exponents(const uint8_t* s) {
  const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  const __m512 exponent = _mm512_sub_ps(_mm512_cvtepi32_ps(e), _mm512_set1_ps(128.0f));
  return _mm512_mask_mov_ps(exponent, _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(255)), _mm512_set1_ps(NAN));
}

// Output rows [16 s0, 16 s1) of y for MR activation rows (xp: row 0's prepared activations, row m at
// m * i8_row_bytes(K)). cv, sv: the packed codes and scales (cpu_kernels.pack_i8); int4: `group`
// elements a scale.
template <bool MX, int MR>
VNNI void i8_stripes(const uint8_t* xp, int64_t K, int64_t group, const uint8_t* cv, const void* sv, int64_t s0,
                     int64_t s1, void* y, int64_t ldy, bool y_bf16) {
  const int64_t nb = K / 32, rb = i8_row_bytes(K), scales_per_stripe = MX ? nb : K / group;
  const int64_t blocks_per_scale = MX ? 1 : group / 32;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // MXFP4: nibble -> 2 * E2M1 value + 12, in [0, 24]; int4 keeps the nibble (q + 8).
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  for (int64_t s = s0; s < s1; ++s) {
    const uint8_t* c = cv + s * nb * 256;
    __m512 acc[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nb; ++j) {
      const uint8_t* cj = c + 256 * j;
      __m512i lo[4], hi[4];
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) {
        prefetch(cj + 64 * t + kPrefetchBytes);
        const __m512i v = _mm512_loadu_si512(cj + 64 * t);
        lo[t] = _mm512_and_si512(v, low4);                          // elements 8t .. 8t + 3, lane r = row r
        hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);  // elements 8t + 4 .. 8t + 7
        if (MX) {
          lo[t] = _mm512_shuffle_epi8(lut, lo[t]);
          hi[t] = _mm512_shuffle_epi8(lut, hi[t]);
        }
      }
      const int64_t si = s * scales_per_stripe + j / blocks_per_scale;
      const __m512 w = MX ? mxfp4_exponents(static_cast<const uint8_t*>(sv) + 16 * si)
                          : _mm512_loadu_ps(static_cast<const float*>(sv) + 16 * si);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const uint8_t* xm = xp + m * rb;
        const int32_t* a = reinterpret_cast<const int32_t*>(xm + 32 * j);  // 4 activations a dword
        __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], _mm512_set1_epi32(a[0]));
        __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[0], _mm512_set1_epi32(a[1]));
#pragma GCC unroll 3
        for (int t = 1; t < 4; ++t) {
          d0 = _mm512_dpbusd_epi32(d0, lo[t], _mm512_set1_epi32(a[2 * t]));
          d1 = _mm512_dpbusd_epi32(d1, hi[t], _mm512_set1_epi32(a[2 * t + 1]));
        }
        const float sx = reinterpret_cast<const float*>(xm + K)[j];
        const int32_t offset = reinterpret_cast<const int32_t*>(xm + K + 4 * nb)[j];
        const __m512i d = _mm512_sub_epi32(_mm512_add_epi32(d0, d1), _mm512_set1_epi32(offset));
        // p = fp32(d) * fp32(sw * sx), then the running sum: the two roundings of the header, then the sum's.
        const __m512 scale = MX ? _mm512_scalef_ps(_mm512_set1_ps(sx), w) : _mm512_mul_ps(w, _mm512_set1_ps(sx));
        acc[m] = _mm512_add_ps(acc[m], _mm512_mul_ps(_mm512_cvtepi32_ps(d), scale));
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      if (y_bf16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(y) + m * ldy + 16 * s), to_bf16(acc[m]));
      else
        _mm512_storeu_ps(static_cast<float*>(y) + m * ldy + 16 * s, acc[m]);
    }
  }
}

// Up to 8 activation rows per pass over the weights: 8 decoded byte tiles, MR accumulators and a few
// temporaries fit in the 32 zmm registers.
constexpr int64_t kMaxMR = 8;

template <bool MX>
VNNI void i8_rows(const uint8_t* xp, int64_t M, int64_t K, int64_t group, const uint8_t* cv, const void* sv,
                  int64_t N, int64_t n0, int64_t n1, void* y, bool y_bf16) {
  const int64_t elem = y_bf16 ? 2 : 4, rb = i8_row_bytes(K), s0 = n0 / 16, s1 = n1 / 16;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
    const int64_t mr = M - m0 < kMaxMR ? M - m0 : kMaxMR;
    const uint8_t* xm = xp + m0 * rb;
    void* ym = static_cast<char*>(y) + m0 * N * elem;
    switch (mr) {
#define SPECQD_I8_CASE(R) \
  case R: i8_stripes<MX, R>(xm, K, group, cv, sv, s0, s1, ym, N, y_bf16); break;
      SPECQD_I8_CASE(1) SPECQD_I8_CASE(2) SPECQD_I8_CASE(3) SPECQD_I8_CASE(4) SPECQD_I8_CASE(5) SPECQD_I8_CASE(6)
      SPECQD_I8_CASE(7)
#undef SPECQD_I8_CASE
      default: i8_stripes<MX, 8>(xm, K, group, cv, sv, s0, s1, ym, N, y_bf16); break;
    }
  }
}

}  // namespace

// ---- entry points ----------------------------------------------------------------------------------

VNNI void prep_i8(const void* x, bool x_bf16, int64_t M, int64_t K, int32_t offset, uint8_t* xp) {
  const int64_t nb = K / 32, rb = i8_row_bytes(K);
  const __m512i qmax = _mm512_set1_epi32(127), qmin = _mm512_set1_epi32(-127);
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* row = xp + m * rb;
    float* sxs = reinterpret_cast<float*>(row + K);
    int32_t* offsets = reinterpret_cast<int32_t*>(row + K + 4 * nb);
    for (int64_t j = 0; j < nb; ++j) {
      __m512 a, b;
      if (x_bf16) {
        const uint16_t* xj = static_cast<const uint16_t*>(x) + m * K + 32 * j;
        a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)xj)), 16));
        b = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(xj + 16))), 16));
      } else {
        const float* xj = static_cast<const float*>(x) + m * K + 32 * j;
        a = _mm512_loadu_ps(xj);
        b = _mm512_loadu_ps(xj + 16);
      }
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const float scale = amax / 127.0f;
      __m512i qa = _mm512_setzero_si512(), qb = _mm512_setzero_si512();
      if (scale > 0.0f) {
        const __m512 sv = _mm512_set1_ps(scale);
        constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        qa = _mm512_max_epi32(qmin, _mm512_min_epi32(qmax, _mm512_cvt_roundps_epi32(_mm512_div_ps(a, sv), kRound)));
        qb = _mm512_max_epi32(qmin, _mm512_min_epi32(qmax, _mm512_cvt_roundps_epi32(_mm512_div_ps(b, sv), kRound)));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 32 * j), _mm512_cvtepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 32 * j + 16), _mm512_cvtepi32_epi8(qb));
      sxs[j] = scale;
      offsets[j] = offset * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
  }
}

VNNI void mxfp4_i8_rows(const uint8_t* xp, int64_t M, int64_t K, const uint8_t* codes, const uint8_t* scales,
                        int64_t N, int64_t n0, int64_t n1, void* y, bool y_bf16) {
  i8_rows<true>(xp, M, K, 32, codes, scales, N, n0, n1, y, y_bf16);
}

VNNI void int4_i8_rows(const uint8_t* xp, int64_t M, int64_t K, int64_t group, const uint8_t* codes,
                       const float* scales, int64_t N, int64_t n0, int64_t n1, void* y, bool y_bf16) {
  i8_rows<false>(xp, M, K, group, codes, scales, N, n0, n1, y, y_bf16);
}

#else  // not x86: never called (cpu_has_avx512_vnni() is false)

bool cpu_has_avx512_vnni() { return false; }
void prep_i8(const void*, bool, int64_t, int64_t, int32_t, uint8_t*) {}
void mxfp4_i8_rows(const uint8_t*, int64_t, int64_t, const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t, void*,
                   bool) {}
void int4_i8_rows(const uint8_t*, int64_t, int64_t, int64_t, const uint8_t*, const float*, int64_t, int64_t, int64_t,
                  void*, bool) {}

#endif

}  // namespace specqd_cpu
