// The int8-activation path of the 4-bit linears (AVX512-VNNI): y[M, N] = x[M, K] @ W.T with W in MXFP4
// or int4 as stored, x quantized to int8 per block of 32, integer dot products by vpdpbusd.
//
// Why. The exact kernels (kernels_avx512.cpp) decode each 4-bit weight into an fp32 and spend two
// shuffles and an FMA per 16 weights and activation row: on the Xeon we measured they read MXFP4 at
// ~15 GB/s with two threads, bound by that arithmetic rather than by memory. Here a weight becomes an
// int8 with one byte shuffle per 64 weights, and one vpdpbusd multiplies 64 weights by 64 int8
// activations and adds them in fours, exactly, in int32. The price is the activation rounding: x is
// rounded to 8 bits (the weights stay exact), so this is a level's numerics to choose (accel.py:
// int8_activations), not a faster way to get the same bits.
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
//     vscalefps(sx, s - 128): the same single rounding of the same exact product.
//   y[m, n] = hsum16 over 16 fp32 lanes: the row's blocks go in groups of 16 (512 elements of K), and
//     lane L adds p_j of block j = 16 g + L for g = 0, 1, ... in order; a last group of fewer than 16
//     blocks (K not a multiple of 512) puts block 16 g + block_of_lane(L) in lane L instead, and its
//     lanes without a block add 0.
// Nothing in this sequence depends on M, on the tile, or on the thread: the same bits for a row alone
// or among 16, as the exact kernels (the property speculative verification needs).
//
// vpdpbusd multiplies unsigned by signed bytes, so the weights go in as unsigned u = e + 12 (MXFP4, a
// 16-entry byte table: vpshufb) or u = q + 8 (int4: the stored nibble itself), and the offset comes
// back out per block: d_j = sum u_i a_i - 12 (or 8) * sum a_i, the last term computed once per call
// with the activations.
//
// How a full group is computed (i8_full_group). Per weight row, its 256 bytes of codes are transposed
// by 8 vpermt2d into T_0..T_3: dword L of T_t holds code bytes 4t..4t+3 of block L, i.e. elements 8t..8t+7
// (the low nibbles the even ones, the high nibbles the odd ones). Split into nibbles and mapped to u,
// each T_t gives two byte vectors, and the activations are laid out to match (prep_i8), so the 8
// vpdpbusd of a (row, token) add all 32 products of block L into int32 lane L: the block dots come out
// in lanes, with no per-token reduction. The transposition is per weight row and shared by all tokens.
// A last, partial group (i8_partial_group) keeps the codes in place, 4 blocks per 64-byte load (unit u
// = blocks 4u..4u+3, block 4u+b in 128-bit lane b), and folds the 4 partial sums each block has per
// unit with unpacks (per token): that is what puts block 4 * (L % 4) + L / 4 (block_of_lane) in lane L.
//
// Layout of the prepared activations (prep_i8), per group of 16 blocks and row, kI8GroupBytes = 640:
//   bytes [0, 512)    the int8 activations. Full group: for t = 0..3, at 128 t the 64 bytes of even
//                     elements 8t, 8t+2, 8t+4, 8t+6 of blocks 0..15 (4 bytes a block), at 128 t + 64 the
//                     odd ones. Partial group: for unit u, at 128 u the 16 even elements of each of its
//                     4 blocks (16 bytes a block), at 128 u + 64 the odd ones.
//   bytes [512, 576)  16 fp32 activation scales sx, in lane order.
//   bytes [576, 640)  16 int32 offset corrections (12 or 8) * sum a_i, in lane order.
// Rows are chunked by 16 as the exact kernels' x (chunk c at 16 c * groups * 640; within it,
// [group][row][640]), and the partial group is zero-padded.
//
// Speed, one thread on the Xeon we measured (model 106, weights in L2), ns per block of 32 weights and
// row, exact kernel -> this one: K = 1536, M = 1: 1.2 -> 0.7; M = 8: 7.0 -> 3.0; K = 576 (a full group
// and a 2-block one): M = 1: 1.3 -> 1.1, M = 8: 7.0 -> 4.7. Subnormals are avoided on purpose: a
// subnormal operand or result costs a microcode assist (~150 cycles) there, which a padded lane
// computing 2^-128 on every weight row made 4x slower.

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace specqd_cpu {

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

// Lane L of a partial group's vectors holds block 4 * (L % 4) + L / 4 of the group (i8_partial_group).
constexpr int block_of_lane(int lane) { return 4 * (lane % 4) + lane / 4; }

// The same fixed tree as kernels_avx512.cpp's hsum16: halves, quarters, pairs, the last two.
VNNI_INLINE float hsum16(__m512 v) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// fp32 -> bf16 bits, round to nearest even, NaN -> quiet NaN (torch's rounding).
inline uint16_t f32_to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  b += 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

inline void store(void* y, int64_t index, bool y_bf16, float v) {
  if (y_bf16)
    static_cast<uint16_t*>(y)[index] = f32_to_bf16(v);
  else
    static_cast<float*>(y)[index] = v;
}

inline __mmask16 first_lanes16(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : n <= 0 ? 0u : (1u << n) - 1u);
}
inline __mmask64 first_bytes64(int64_t n) { return n >= 64 ? ~0ULL : n <= 0 ? 0ULL : (1ULL << n) - 1ULL; }

// As the exact kernels: software prefetch this far ahead in the codes of a weight row.
constexpr int64_t kPrefetchBytes = 4096;
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// The weight of a tile: codes [N, K/2]; MXFP4 scales (uint8, K/32 a row) or int4 scales (bf16 or fp16
// bits, K/group a row).
struct Weight4 {
  const uint8_t* codes;
  const void* scales;
  int64_t scales_per_row;
  int64_t blocks_per_scale;  // int4: group / 32
  bool f16;
};

// block_of_lane(L) in lane L.
VNNI_INLINE __m512i lane_blocks() { return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); }

// A group's 16 MXFP4 block scales of one weight row as the exponents s - 128 of sw = 2^(s - 128) (the
// e_i carry a factor 2), as fp32, in lane order (full: lane = block; else block_of_lane); NaN for 255.
// The kernel multiplies by sw with vscalefps: sx * 2^(s - 128), rounded once, is fp32(sw * sx), and
// lanes without a block (s read as 0, sx = 0) give 0 without forming the subnormal 2^-128.
VNNI_INLINE __m512 mxfp4_group_exponents(const uint8_t* s, int64_t blocks, bool full) {
  const __m128i to_lanes = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);  // block_of_lane
  const __m128i bytes = _mm_maskz_loadu_epi8(first_lanes16(blocks), s);
  const __m512i e = _mm512_cvtepu8_epi32(full ? bytes : _mm_shuffle_epi8(bytes, to_lanes));
  const __m512 exponent = _mm512_sub_ps(_mm512_cvtepi32_ps(e), _mm512_set1_ps(128.0f));
  return _mm512_mask_mov_ps(exponent, _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(255)), _mm512_set1_ps(NAN));
}

// 16 bf16 or fp16 scales as fp32 (exact).
VNNI_INLINE __m512 scales_to_fp32(__m256i s, bool f16) {
  if (f16) return _mm512_cvtph_ps(s);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(s), 16));
}

// A group's int4 scales of one weight row, one per lane (the scale of the lane's block), in lane order
// (full: lane = block; else block_of_lane).
// K is a multiple of the int4 group, so a lane past the row's end never shares a scale with a real
// block: it reads 0. shift: log2(blocks per scale) when that divides 16 (groups of 32, 64, 128, 256 or
// 512: the group's scales are consecutive, one vpermps puts them in lanes), else -1 (one lane at a time).
VNNI_INLINE __m512 int4_group_scales(const uint16_t* s, int64_t g, int64_t blocks, int64_t per_scale, int shift,
                                     bool f16, bool full) {
  if (shift >= 0) {
    const int64_t first = (16 * g) >> shift, count = (blocks + per_scale - 1) >> shift;
    const __m512 v = scales_to_fp32(_mm256_maskz_loadu_epi16(first_lanes16(count), s + first), f16);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i lanes = full ? iota : lane_blocks();
    return _mm512_permutexvar_ps(_mm512_srli_epi32(lanes, shift), v);
  }
  alignas(32) uint16_t raw[16];
  for (int lane = 0; lane < 16; ++lane) {
    const int64_t b = full ? lane : block_of_lane(lane);
    raw[lane] = b < blocks ? s[(16 * g + b) / per_scale] : 0;
  }
  return scales_to_fp32(_mm256_load_si256(reinterpret_cast<const __m256i*>(raw)), f16);
}

// acc += p = fp32(d) * fp32(sw * sx), lane by lane: the two roundings of the header, then the sum's.
// w: MXFP4 the exponents of sw (vscalefps), int4 sw itself.
template <bool MX>
VNNI_INLINE void finish(__m512i dot, __m512 w, const uint8_t* xm, __m512& acc) {
  const __m512 x_scale = _mm512_load_ps(reinterpret_cast<const float*>(xm + 512));
  const __m512 scale = MX ? _mm512_scalef_ps(x_scale, w) : _mm512_mul_ps(w, x_scale);
  acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(dot), scale));
}

// A full group of 16 blocks: NR weight rows against MR activation rows, acc[r][m] += p with lane L =
// block L. The codes are transposed first (per weight row, shared by all tokens): T_t, t = 0..3, holds
// in dword L the code bytes 4t..4t+3 of block L (elements 8t..8t+7), so that the 8 vpdpbusd of a (row,
// token) all add into lane L products of block L: the int32 lanes end up holding the whole block dots,
// with no reduction per token. Two rounds of vpermt2d (8 per weight row) do the transposition.
template <bool MX, int NR, int MR>
VNNI_INLINE void i8_full_group(const uint8_t* xg, const uint8_t* const* c, const __m512 (&w_scale)[NR],
                               __m512 (&acc)[NR][MR]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  // Round 1, two units (8 blocks) -> dwords t of those blocks: position 8 (t % 2) + block, t = 0, 1 (a)
  // or 2, 3 (b). Round 2, the two halves -> T_t: lane L < 8 from the first, L >= 8 from the second.
  const __m512i pick_a = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i pick_b = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
  const __m512i pick_even_t = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i pick_odd_t = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  __m512i lo01[NR], hi01[NR], lo23[NR], hi23[NR];  // blocks 0..7 and 8..15, dwords t = 0, 1 (lo) / 2, 3 (hi)
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) prefetch(c[r] + 64 * u + kPrefetchBytes);
    const __m512i u0 = _mm512_loadu_si512(c[r]), u1 = _mm512_loadu_si512(c[r] + 64);
    const __m512i u2 = _mm512_loadu_si512(c[r] + 128), u3 = _mm512_loadu_si512(c[r] + 192);
    lo01[r] = _mm512_permutex2var_epi32(u0, pick_a, u1);
    hi01[r] = _mm512_permutex2var_epi32(u0, pick_b, u1);
    lo23[r] = _mm512_permutex2var_epi32(u2, pick_a, u3);
    hi23[r] = _mm512_permutex2var_epi32(u2, pick_b, u3);
  }
  __m512i dot_a[NR][MR], dot_b[NR][MR];  // t = 0, 2 and t = 1, 3: two chains of vpdpbusd
#pragma GCC unroll 4
  for (int t = 0; t < 4; ++t) {
    __m512i even[NR], odd[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512i tt = _mm512_permutex2var_epi32(t < 2 ? lo01[r] : hi01[r], t % 2 ? pick_odd_t : pick_even_t,
                                                   t < 2 ? lo23[r] : hi23[r]);
      even[r] = _mm512_and_si512(tt, low4);                          // elements 8t, 8t + 2, 8t + 4, 8t + 6
      odd[r] = _mm512_and_si512(_mm512_srli_epi16(tt, 4), low4);  // elements 8t + 1, ..., 8t + 7
      if (MX) {
        even[r] = _mm512_shuffle_epi8(lut, even[r]);
        odd[r] = _mm512_shuffle_epi8(lut, odd[r]);
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const uint8_t* xm = xg + m * kI8GroupBytes;
      const __m512i x_even = _mm512_load_si512(xm + 128 * t), x_odd = _mm512_load_si512(xm + 128 * t + 64);
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        __m512i& d = t % 2 ? dot_b[r][m] : dot_a[r][m];
        if (t < 2) d = _mm512_setzero_si512();
        d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(d, even[r], x_even), odd[r], x_odd);
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    const uint8_t* xm = xg + m * kI8GroupBytes;
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(dot_a[r][m], dot_b[r][m]), _mm512_load_si512(xm + 576));
      finish<MX>(dot, w_scale[r], xm, acc[r][m]);
    }
  }
}

// The last group of a row when it has fewer than 16 blocks (K not a multiple of 512): UNITS units of 4
// blocks, NR weight rows against MR activation rows, acc[r][m] += p with lane L = block block_of_lane(L).
// c[r]: the group's codes of row r; xg: the group's activations of row 0 (row m at m * kI8GroupBytes);
// last: the bytes of the last unit that are in the row. Unit by unit: decode it for the NR rows, then
// the 2 vpdpbusd of every (row, token), folding each pair of units as soon as it is complete. (A
// transposition as in i8_full_group would cost 8 vpdpbusd per token however few the blocks.)
template <bool MX, int NR, int MR, int UNITS>
VNNI_INLINE void i8_partial_group(const uint8_t* xg, const uint8_t* const* c, const __m512 (&w_scale)[NR],
                                  __mmask64 last, __m512 (&acc)[NR][MR]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // MXFP4: nibble -> 2 * E2M1 value + 12, in [0, 24]; int4 keeps the nibble (q + 8).
  const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
  __m512i d0[NR][MR], d01[NR][MR], d2[NR][MR];
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u) {
    __m512i lo[NR], hi[NR];
    if (u < UNITS) {
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        prefetch(c[r] + 64 * u + kPrefetchBytes);
        const __m512i v =
            u == UNITS - 1 ? _mm512_maskz_loadu_epi8(last, c[r] + 64 * u) : _mm512_loadu_si512(c[r] + 64 * u);
        lo[r] = _mm512_and_si512(v, low4);                          // element 2i of each block
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);  // element 2i + 1
        if (MX) {
          lo[r] = _mm512_shuffle_epi8(lut, lo[r]);
          hi[r] = _mm512_shuffle_epi8(lut, hi[r]);
        }
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const uint8_t* xm = xg + m * kI8GroupBytes;
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        // 4 int32 partial sums per block: 128-bit lane b of d holds those of block 4u + b.
        __m512i d = _mm512_setzero_si512();
        if (u < UNITS) {
          d = _mm512_dpbusd_epi32(d, lo[r], _mm512_load_si512(xm + 128 * u));
          d = _mm512_dpbusd_epi32(d, hi[r], _mm512_load_si512(xm + 128 * u + 64));
        }
        // Fold them (exact, int32): after unit 3, lane L holds the whole block block_of_lane(L).
        if (UNITS == 1) {  // a last group of 1..4 blocks: add the 4 lanes of each 128-bit lane in place,
          // which puts block b in lane 4b (= block_of_lane) and copies elsewhere, zeroed.
          if (u == 0) {
            const __m512i d2x = _mm512_add_epi32(d, _mm512_shuffle_epi32(d, _MM_PERM_BADC));
            const __m512i sum = _mm512_add_epi32(d2x, _mm512_shuffle_epi32(d2x, _MM_PERM_CDAB));
            finish<MX>(_mm512_maskz_sub_epi32(0x1111, sum, _mm512_load_si512(xm + 576)), w_scale[r], xm, acc[r][m]);
          }
        } else if (u == 0 || u == 2) {
          (u == 0 ? d0 : d2)[r][m] = d;
        } else if (u == 1) {
          d01[r][m] = _mm512_add_epi32(_mm512_unpacklo_epi32(d0[r][m], d), _mm512_unpackhi_epi32(d0[r][m], d));
        } else {
          const __m512i d23 = _mm512_add_epi32(_mm512_unpacklo_epi32(d2[r][m], d), _mm512_unpackhi_epi32(d2[r][m], d));
          const __m512i sum =
              _mm512_add_epi32(_mm512_unpacklo_epi64(d01[r][m], d23), _mm512_unpackhi_epi64(d01[r][m], d23));
          finish<MX>(_mm512_sub_epi32(sum, _mm512_load_si512(xm + 576)), w_scale[r], xm, acc[r][m]);  // - offset
        }
      }
    }
  }
}

// Outputs y[0..MR-1, n + r * step] for r = 0..NR-1 (as the exact kernels' tiles).
template <bool MX, int NR, int MR>
VNNI void i8_tile(const uint8_t* xc, int64_t K, const Weight4& w, int64_t n, int64_t step, void* y, int64_t ldy,
                  bool y_bf16) {
  const int64_t nblocks = K / 32, ngroups = (nblocks + 15) / 16;
  const uint8_t* c[NR];
  const void* s[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    c[r] = w.codes + (n + r * step) * (K / 2);
    s[r] = static_cast<const char*>(w.scales) + (n + r * step) * w.scales_per_row * (MX ? 1 : 2);
  }
  int shift = -1;  // int4: log2(blocks per scale) where it divides 16 (int4_group_scales)
  for (int b = 0; b <= 4; ++b)
    if (w.blocks_per_scale == (int64_t{1} << b)) shift = b;
  __m512 acc[NR][MR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();

  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t blocks = nblocks - 16 * g < 16 ? nblocks - 16 * g : 16;
    __m512 w_scale[NR];
    const uint8_t* cg[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      cg[r] = c[r] + 256 * g;
      w_scale[r] = MX ? mxfp4_group_exponents(static_cast<const uint8_t*>(s[r]) + 16 * g, blocks, blocks == 16)
                      : int4_group_scales(static_cast<const uint16_t*>(s[r]), g, blocks, w.blocks_per_scale, shift,
                                          w.f16, blocks == 16);
    }
    const uint8_t* xg = xc + g * MR * kI8GroupBytes;
    if (blocks == 16) {
      i8_full_group<MX, NR, MR>(xg, cg, w_scale, acc);
    } else {
      const int64_t units = (blocks + 3) / 4;
      const __mmask64 last = first_bytes64(16 * (blocks - 4 * (units - 1)));
      switch (units) {
        case 1: i8_partial_group<MX, NR, MR, 1>(xg, cg, w_scale, last, acc); break;
        case 2: i8_partial_group<MX, NR, MR, 2>(xg, cg, w_scale, last, acc); break;
        case 3: i8_partial_group<MX, NR, MR, 3>(xg, cg, w_scale, last, acc); break;
        default: i8_partial_group<MX, NR, MR, 4>(xg, cg, w_scale, last, acc); break;
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) store(y, m * ldy + n + r * step, y_bf16, hsum16(acc[r][m]));
}

// NR for MR activation rows: the transposed codes (4 registers per weight row) and 3 per (row, token)
// should fit in the 32 zmm registers. At M = 1, 4 rows (a few spills) and 2 ran alike in L2 on a Xeon;
// over a SmolLM2 step's weights streamed from memory on a Zen 5, 2 rows were 1.3x faster than 4.
constexpr int i8_tile_rows(int mr) { return mr <= 2 ? 2 : 1; }

// Rows [n0, n1) for MR activation rows, in NR strided lanes as the exact kernels (mxfp4_rows_mr says
// why); leftover rows one at a time, by the same per-output sequence.
template <bool MX, int MR>
VNNI void i8_rows_mr(const uint8_t* xc, int64_t K, const Weight4& w, int64_t n0, int64_t n1, void* y, int64_t ldy,
                     bool y_bf16) {
  constexpr int NR = i8_tile_rows(MR);
  const int64_t lane = (n1 - n0) / NR, rest = n0 + lane * NR;
  for (int64_t t = 0; t < lane; ++t) i8_tile<MX, NR, MR>(xc, K, w, n0 + t, lane, y, ldy, y_bf16);
  for (int64_t n = rest; n < n1; ++n) i8_tile<MX, 1, MR>(xc, K, w, n, 1, y, ldy, y_bf16);
}

constexpr int64_t kMaxMR = 16;

template <bool MX>
VNNI void i8_rows(const uint8_t* xp, int64_t M, int64_t K, const Weight4& w, int64_t N, int64_t n0, int64_t n1,
                  void* y, bool y_bf16) {
  const int64_t elem = y_bf16 ? 2 : 4, ngroups = (K / 32 + 15) / 16;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
    const int64_t mr = M - m0 < kMaxMR ? M - m0 : kMaxMR;
    const uint8_t* xc = xp + m0 * ngroups * kI8GroupBytes;
    void* ym = static_cast<char*>(y) + m0 * N * elem;
    switch (mr) {
#define SPECQD_I8_CASE(R) \
  case R: i8_rows_mr<MX, R>(xc, K, w, n0, n1, ym, N, y_bf16); break;
      SPECQD_I8_CASE(1) SPECQD_I8_CASE(2) SPECQD_I8_CASE(3) SPECQD_I8_CASE(4) SPECQD_I8_CASE(5) SPECQD_I8_CASE(6)
      SPECQD_I8_CASE(7) SPECQD_I8_CASE(8) SPECQD_I8_CASE(9) SPECQD_I8_CASE(10) SPECQD_I8_CASE(11)
      SPECQD_I8_CASE(12) SPECQD_I8_CASE(13) SPECQD_I8_CASE(14) SPECQD_I8_CASE(15)
#undef SPECQD_I8_CASE
      default: i8_rows_mr<MX, 16>(xc, K, w, n0, n1, ym, N, y_bf16); break;
    }
  }
}

}  // namespace

// ---- entry points ----------------------------------------------------------------------------------

int64_t i8_scratch_bytes(int64_t M, int64_t K) { return M * ((K / 32 + 15) / 16) * kI8GroupBytes; }

VNNI void prep_i8(const void* x, bool x_bf16, int64_t M, int64_t K, int32_t offset, uint8_t* xp) {
  const int64_t nblocks = K / 32, ngroups = (nblocks + 15) / 16;
  const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i qmax = _mm512_set1_epi32(127), qmin = _mm512_set1_epi32(-127);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t m0 = m / kMaxMR * kMaxMR, rows = M - m0 < kMaxMR ? M - m0 : kMaxMR;
    uint8_t* row = xp + (m0 * ngroups + (m - m0)) * kI8GroupBytes;  // group g at + g * rows * kI8GroupBytes
    if (nblocks % 16) std::memset(row + (ngroups - 1) * rows * kI8GroupBytes, 0, kI8GroupBytes);
    for (int64_t j = 0; j < nblocks; ++j) {
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
      const int64_t g = j / 16, in_group = j % 16;
      uint8_t* grp = row + g * rows * kI8GroupBytes;
      alignas(16) int32_t even[4], odd[4];  // the block's 16 even and 16 odd activations, 4 bytes a dword
      _mm_store_si128(reinterpret_cast<__m128i*>(even),
                      _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(qa, even_idx, qb)));
      _mm_store_si128(reinterpret_cast<__m128i*>(odd),
                      _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(qa, odd_idx, qb)));
      int lane;
      if (16 * g + 16 <= nblocks) {  // a full group: dword t of the block at 128 t + 4 * block (+ 64 if odd)
        lane = static_cast<int>(in_group);
        for (int t = 0; t < 4; ++t) {
          std::memcpy(grp + 128 * t + 4 * lane, &even[t], 4);
          std::memcpy(grp + 128 * t + 64 + 4 * lane, &odd[t], 4);
        }
      } else {  // the last, partial group: unit u = in_group / 4 at 128 u, its block b = in_group % 4 at 16 b
        const int64_t unit = in_group / 4, slot = in_group % 4;
        lane = static_cast<int>(4 * slot + unit);  // block_of_lane(lane) == in_group
        std::memcpy(grp + 128 * unit + 16 * slot, even, 16);
        std::memcpy(grp + 128 * unit + 64 + 16 * slot, odd, 16);
      }
      reinterpret_cast<float*>(grp + 512)[lane] = scale;
      reinterpret_cast<int32_t*>(grp + 576)[lane] = offset * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
  }
}

VNNI void mxfp4_i8_rows(const uint8_t* xp, int64_t M, int64_t K, const uint8_t* codes, const uint8_t* scales,
                        int64_t N, int64_t n0, int64_t n1, void* y, bool y_bf16) {
  const Weight4 w{codes, scales, K / 32, 1, false};
  i8_rows<true>(xp, M, K, w, N, n0, n1, y, y_bf16);
}

VNNI void int4_i8_rows(const uint8_t* xp, int64_t M, int64_t K, int64_t group, const uint8_t* codes,
                       const uint16_t* scales, bool scales_f16, int64_t N, int64_t n0, int64_t n1, void* y,
                       bool y_bf16) {
  const Weight4 w{codes, scales, K / group, group / 32, scales_f16};
  i8_rows<false>(xp, M, K, w, N, n0, n1, y, y_bf16);
}

#else  // not x86: never called (cpu_has_avx512_vnni() is false)

bool cpu_has_avx512_vnni() { return false; }
int64_t i8_scratch_bytes(int64_t, int64_t) { return 0; }
void prep_i8(const void*, bool, int64_t, int64_t, int32_t, uint8_t*) {}
void mxfp4_i8_rows(const uint8_t*, int64_t, int64_t, const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t, void*,
                   bool) {}
void int4_i8_rows(const uint8_t*, int64_t, int64_t, int64_t, const uint8_t*, const uint16_t*, bool, int64_t, int64_t,
                  int64_t, void*, bool) {}

#endif

}  // namespace specqd_cpu
