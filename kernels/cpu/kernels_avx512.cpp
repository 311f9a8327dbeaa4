// AVX-512 weight-only linear kernels for batch-1..16 decoding: y[M, N] = x[M, K] @ W.T.
//
// Why these kernels exist. Decoding one token reads every weight once and does 2 flops per weight,
// so on a CPU it is bound by memory bandwidth: the time is the bytes of weight read divided by
// ~25 GB/s. MXFP4 weights are 0.53 bytes each (4-bit codes + one scale byte per 32), bf16 weights 2,
// fp32 weights 4, so reading the weight in its stored format and decoding it in registers is what
// makes the small formats fast. Nothing is written to memory but y (and a small copy of x).
//
// The tiling (the same for every kernel here):
//   - A "block" is 32 consecutive elements of K: one MXFP4 scale block, one zmm of bf16 weights, a
//     quarter of an int4 group of 128.
//   - An output tile is NR weight rows (outputs n) by MR activation rows (tokens m), held as NR*MR
//     accumulators of 16 fp32 lanes in zmm registers. Per block, each of the NR weight rows is loaded
//     and decoded once into two zmm of 16 fp32 weights, then multiplied with all MR activation rows:
//     the weight is read from memory once whatever M is. MR = M (up to 16; a larger M is processed in
//     chunks of 16), and NR shrinks as MR grows so that accumulators + decoded weights fit in the 32
//     zmm registers (NR * MR + 2 * NR + a few <= 32; see tile_rows below).
//   - After the last block, each accumulator's 16 lanes are added in a fixed tree (hsum16) and the
//     sum is stored: y[m, n].
//   - Threads (ops.cpp) split the N rows into ranges (chunks); within a range a tile's NR rows are
//     spaced a fixed stride apart (see mxfp4_rows_mr), and leftover rows are done one at a time.
//
// Bit-identical results for every M (the property speculative verification relies on). For a given
// output (m, n) the operations are, whatever M, NR, MR, the thread and the position of n in a tile:
//     acc = 0 (16 lanes);  for each block j in order: acc = fma(w_a, x_a, acc); acc = fma(w_b, x_b, acc)
//     y[m, n] = hsum16(acc)
// where (w_a, x_a) and (w_b, x_b) are the two halves of the block, always the same halves in the same
// order, and the decoded weights are exact (so they do not depend on how they were decoded). Rows m
// never interact and threads split N only (never K), so neither M nor the thread count can change a
// single rounding. This holds as long as the compiler does not reassociate: no -ffast-math, and all
// arithmetic here is written with explicit intrinsics (the build also passes -ffp-contract=off).
//
// How the halves of a block are chosen, and why x is rearranged. MXFP4 packs elements 2i and 2i+1 of
// a block into the low and high nibbles of byte i; bf16 packs them into the low and high halves of
// dword i. Either way the cheap decode yields the even elements in one register and the odd ones in
// another, and instead of shuffling the weights back into K order (a shuffle per weight register, per
// row) we shuffle x once per call: the prep_* functions write each block of x as its 16 even elements
// followed by its 16 odd ones. Then lane i of the even registers meets x[2i] and lane i of the odd
// ones x[2i+1]. The prep also lays x out block-major ([block][row][32] per chunk of 16 rows), so a
// tile finds the x data of all its rows at fixed offsets from one pointer.
//
// Per block and per weight row the MXFP4 decode is 4 vector instructions:
//     lut  = kScaledE2M1[s]    the 16 E2M1 values times this block's scale 2^(s-127): one 64-byte row
//                              of a 16 KB table, read by vpermps as a memory operand (no arithmetic)
//     q    = the 16 code bytes zero-extended to 16 dwords (vpmovzxbd)
//     even = lut[q & 15]       (vpermps only looks at the low 4 bits of each index)
//     odd  = lut[q >> 4 & 15]  (one shift)
// then 2 FMAs per activation row. The product of an E2M1 value and a power of two is exact in fp32
// (2 significant bits), so these are exactly the weights `dequantize` produces, and the result equals
// dequantize-then-matmul up to the order of the fp32 additions.
//
// What limits them (measured on a 2-core Xeon, model 207, one thread, weights in L2): MXFP4 at M = 1
// is ~1.4 ns per block and row (the decode's shuffles; close to DRAM speed on one core, below it on
// two); M = 8 ~4.6 ns, M = 16 ~9 ns: 2 * M FMAs per block with an x load each, ~3.5 FMAs/ns. Exact
// fp32 arithmetic cannot do fewer FMAs, so M = 16 costs about 6x M = 1 in compute; in a memory-bound
// model pass (weights from DRAM) the ratio is smaller. bf16 at M = 1 is ~1.65 ns per block (64 bytes),
// far above DRAM speed: it is memory-bound. Software prefetches (kPrefetchBytes) help both.

#include <immintrin.h>

#include <array>
#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SPECQD_X86 1
#else
#define SPECQD_X86 0
#endif

// vdpbf16ps needs GCC >= 10 or clang >= 9 to compile.
#if SPECQD_X86 && ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10))
#define SPECQD_BF16_DOT 1
#else
#define SPECQD_BF16_DOT 0
#endif

namespace specqd_cpu {

#if SPECQD_X86

// Every function that uses AVX-512 says so itself (instead of -mavx512f for the whole file): the rest of
// the translation unit, including any inline function of the standard library, stays baseline x86-64.
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define AVX512_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,avx512bf16")))

bool cpu_has_avx512() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }();
  return ok;
}

bool cpu_has_avx512_bf16() {
#if SPECQD_BF16_DOT
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
#else
  return false;
#endif
}

bool built_with_bf16_dot() { return SPECQD_BF16_DOT; }

namespace {

// E2M1 code -> value, codes 8..15 being 0..7 negated (code 8 is -0, never produced by the cast).
alignas(64) constexpr float kE2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                         -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// The 16 E2M1 values times each of the 256 E8M0 scales: kScaledE2M1[s] is the lookup table of a
// block of scale s, so decoding a block needs no arithmetic at all (vpermps reads the table straight from memory).
// 16 KB, of which a real weight touches a few dozen lines (its scales cluster). Entries are exact
// products, as mxfp4.dequantize computes them: s = 0 is 2^-127 (a subnormal scale), s = 255 is NaN.
// (Filled when the library loads: a constexpr table would need the overflowing products, 6 * 2^127 =
// inf, which C++ does not allow in constant expressions.)
// (A memcpy bit cast: std::bit_cast is C++20, and torch 2.11's cpp_extension builds with -std=c++17;
// both compile to the same move.)
float e8m0_value(uint32_t s) {
  const uint32_t u = s == 255 ? 0x7FC00000u : s == 0 ? 0x00400000u : s << 23;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
alignas(64) const std::array<float, 256 * 16> kScaledE2M1 = [] {
  std::array<float, 256 * 16> t{};
  for (uint32_t s = 0; s < 256; ++s)
    for (uint32_t c = 0; c < 16; ++c) t[s * 16 + c] = kE2M1[c] * e8m0_value(s);
  return t;
}();

// fp32 -> bf16 bits, round to nearest even, NaN -> quiet NaN (torch's rounding).
inline uint16_t f32_to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  b += 0x7FFFu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

// 16 fp32 lanes -> their sum, always in this order: halves, then quarters, then pairs, then the last
// two. One function for every kernel and tile, so the order never depends on M.
AVX512_INLINE float hsum16(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

inline void store(void* y, int64_t index, bool y_bf16, float v) {
  if (y_bf16)
    static_cast<uint16_t*>(y)[index] = f32_to_bf16(v);
  else
    static_cast<float*>(y)[index] = v;
}

// 16 fp32 -> their bf16 values as fp32 (low 16 bits cleared), round to nearest even, NaN -> quiet NaN.
AVX512_INLINE __m512i round_to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC00000));
}

// Mask of the first `n` (0..32) 16-bit lanes / first `n` (0..16) 32-bit lanes.
inline __mmask32 first_lanes32(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : n <= 0 ? 0u : (1u << n) - 1u; }
inline __mmask16 first_lanes16(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : n <= 0 ? 0u : (1u << n) - 1u);
}

inline int64_t round_up32(int64_t k) { return (k + 31) / 32 * 32; }

// Software prefetch: how far ahead of the loads, in bytes of the weight row being read. A core keeps
// only so many cache misses in flight on its own; prefetching ahead made one thread's pass over
// SmolLM2's weights ~30% faster for MXFP4 (M = 1: 13.6 -> 9.5 ms, repeatable) and between 0 and 30%
// faster for bf16 (runs disagreed on the busy machine we measured on; it never made things slower).
// (Rows are contiguous, so "ahead in the row" soon means "in the next rows".)
// Prefetching past the end of a matrix is harmless: prefetches never fault.
constexpr int64_t kPrefetchBytes = 4096;      // MXFP4 codes
constexpr int64_t kPrefetchBytesBf16 = 8192;  // bf16 weights
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

// NR (weight rows per tile) for MR activation rows: the accumulators (NR * MR), the decoded weights
// (2 * NR) and a few constants must fit in 32 zmm registers. For small MR, several weight rows also
// give the out-of-order core independent FMA chains to overlap (each accumulator is a chain of 2 FMAs
// per block, 4 cycles each).
constexpr int tile_rows(int mr) { return mr <= 4 ? 4 : mr <= 8 ? 2 : 1; }
// bf16 decodes a weight block in two instructions (no table), so more weight rows fit: 4 up to MR = 5
// (20 + 8 + 2 registers) and 3 up to MR = 8 (24 + 6 + 2). A 5-row forward (a k = 4 verification) is
// where this shows: on the 49152 x 576 head, 1.64x -> 1.32x the time of M = 1, and a whole SmolLM2
// forward of 5 tokens 1.59x -> 1.26x of a one-token step (6 tokens 1.74x -> 1.44x, 8 2.02x -> 1.64x).
// The same per-output sequence of FMAs whatever NR, so the bits do not change.
constexpr int bf16_tile_rows(int mr) { return mr <= 5 ? 4 : mr <= 8 ? 3 : 1; }

// ---- MXFP4 ----------------------------------------------------------------------------------

// Outputs y[0..MR-1, n + r * step] for r = 0..NR-1; xp is the chunk of MR activation rows.
template <int NR, int MR>
AVX512 void mxfp4_tile(const float* xp, int64_t K, const uint8_t* codes, const uint8_t* scales, int64_t n,
                       int64_t step, void* y, int64_t ldy, bool y_bf16) {
  const int64_t nblocks = K / 32;
  const uint8_t* c[NR];
  const uint8_t* s[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    c[r] = codes + (n + r * step) * (K / 2);
    s[r] = scales + (n + r * step) * nblocks;
  }
  __m512 acc[NR][MR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();

  for (int64_t j = 0; j < nblocks; ++j) {
    // Decode block j of each weight row: 32 weights -> even (16 fp32) and odd (16 fp32).
    __m512 w_even[NR], w_odd[NR];
    // Software prefetch, one cache line per row every 4 blocks (64 bytes of codes): see kPrefetchBytes.
    if ((j & 3) == 0) {
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) prefetch(c[r] + 16 * j + kPrefetchBytes);
    }
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512 lut = _mm512_load_ps(kScaledE2M1.data() + (size_t{s[r][j]} << 4));  // the block's values
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c[r] + 16 * j)));
      w_even[r] = _mm512_permutexvar_ps(q, lut);                        // low nibbles: x[2i]
      w_odd[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut);  // high nibbles: x[2i+1]
    }
    // Use them for every activation row: even half, then odd half (the fixed order).
    const float* xj = xp + j * (MR * 32);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const __m512 x_even = _mm512_load_ps(xj + m * 32);
      const __m512 x_odd = _mm512_load_ps(xj + m * 32 + 16);
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        acc[r][m] = _mm512_fmadd_ps(w_even[r], x_even, acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(w_odd[r], x_odd, acc[r][m]);
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) store(y, m * ldy + n + r * step, y_bf16, hsum16(acc[r][m]));
}

// Rows [n0, n1) for MR activation rows. The range is cut into NR equal "lanes" and a tile takes one row
// from each: rows n0 + t + r * lane, r = 0..NR-1. So a tile reads NR streams of weight kilobytes apart,
// in different pages, instead of NR adjacent rows (one stream): the hardware prefetchers track pages,
// and more streams in flight gave one core ~45% more read bandwidth on bf16 (7.9 -> 11.4 GB/s on the
// 49152 x 576 head; MXFP4, which is compute-bound, was unchanged). Leftover rows go one at a time (a
// 1-row tile runs exactly the same per-output sequence, so where a row falls does not matter).
template <int MR>
AVX512 void mxfp4_rows_mr(const float* xp, int64_t K, const uint8_t* codes, const uint8_t* scales, int64_t n0,
                          int64_t n1, void* y, int64_t ldy, bool y_bf16) {
  constexpr int NR = tile_rows(MR);
  const int64_t lane = (n1 - n0) / NR, rest = n0 + lane * NR;
  for (int64_t t = 0; t < lane; ++t) mxfp4_tile<NR, MR>(xp, K, codes, scales, n0 + t, lane, y, ldy, y_bf16);
  for (int64_t n = rest; n < n1; ++n) mxfp4_tile<1, MR>(xp, K, codes, scales, n, 1, y, ldy, y_bf16);
}

// ---- int4 (W4A16, int4.py's layout) ------------------------------------------------------------
//
// The MXFP4 kernel with another table. The codes are packed as MXFP4's (element 2i in the low nibble
// of byte i), a nibble c meaning q = c - 8, and each group of G elements of K (G a multiple of 32) has
// one bf16 or fp16 scale. Per group and weight row the 16-lane table (c - 8) * scale is one multiply
// (exact: a 4-bit integer times a scale of at most 11 significant bits); per block the decode is then
// MXFP4's, with that table in place of kScaledE2M1[s]: vpmovzxbd, vpermps, shift, vpermps. The FMAs,
// their order and hsum16 are MXFP4's too, so the same argument gives bit-identical results across M.
// Measured against mxfp4_tile (one thread, weights in L2, a 2-core Xeon VM, model 167): the same time at
// K = 1536 (groups of 128) for M = 1..16; ~9% slower at M = 1 and 2-6% at M = 4..16 for K = 576 with
// groups of 64, where the table is rebuilt every 2 blocks. (There, converting 16 scales at once and
// reading them back from the stack was 17% faster than converting each as its group starts; on a Zen 5
// it was 1.5x slower, see int4_tile, and the per-group conversion is what we keep.)

// 16 bf16 or fp16 scales as fp32: bf16 bits are the top half of an fp32; fp16 by vcvtph2ps (exact, also
// for subnormal scales).
AVX512_INLINE __m512 scales_to_fp32(__m256i s, bool f16) {
  if (f16) return _mm512_cvtph_ps(s);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(s), 16));
}

// One bf16 or fp16 scale (its bits) as fp32, exactly.
AVX512_INLINE float scale_to_fp32(uint16_t bits, bool f16) {
  if (f16) return _mm512_cvtss_f32(_mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(bits))));
  const uint32_t u = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Outputs y[0..MR-1, n + r * step] for r = 0..NR-1, as mxfp4_tile; `group` elements of K per scale.
template <int NR, int MR>
AVX512 void int4_tile(const float* xp, int64_t K, int64_t group, const uint8_t* codes, const uint16_t* scales,
                      bool f16, int64_t n, int64_t step, void* y, int64_t ldy, bool y_bf16) {
  const int64_t ngroups = K / group, blocks_per_group = group / 32;
  const __m512 q_values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const uint8_t* c[NR];
  const uint16_t* s[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    c[r] = codes + (n + r * step) * (K / 2);
    s[r] = scales + (n + r * step) * ngroups;
  }
  __m512 acc[NR][MR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();

  for (int64_t g = 0; g < ngroups; ++g) {
    // This group's 16 values of each weight row: its scale, read and converted as a scalar, times -8..7.
    // (Converting 16 groups' scales at once into a stack array and reading them back one by one was
    // 1.5x slower over a SmolLM2 step's weights on a Zen 5, though no slower from L2: likely a 4-byte
    // load from a 64-byte store still in flight, which must wait for it, every 16 groups.)
    __m512 lut[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) lut[r] = _mm512_mul_ps(q_values, _mm512_set1_ps(scale_to_fp32(s[r][g], f16)));
    for (int64_t j = g * blocks_per_group; j < (g + 1) * blocks_per_group; ++j) {
      __m512 w_even[NR], w_odd[NR];
      if ((j & 3) == 0) {  // one cache line of codes per row every 4 blocks, as for MXFP4
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) prefetch(c[r] + 16 * j + kPrefetchBytes);
      }
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c[r] + 16 * j)));
        w_even[r] = _mm512_permutexvar_ps(q, lut[r]);                        // low nibbles: x[2i]
        w_odd[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut[r]);  // high nibbles: x[2i+1]
      }
      const float* xj = xp + j * (MR * 32);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m512 x_even = _mm512_load_ps(xj + m * 32);
        const __m512 x_odd = _mm512_load_ps(xj + m * 32 + 16);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) {
          acc[r][m] = _mm512_fmadd_ps(w_even[r], x_even, acc[r][m]);
          acc[r][m] = _mm512_fmadd_ps(w_odd[r], x_odd, acc[r][m]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) store(y, m * ldy + n + r * step, y_bf16, hsum16(acc[r][m]));
}

// Rows [n0, n1) for MR activation rows: mxfp4_rows_mr's lanes and leftovers.
template <int MR>
AVX512 void int4_rows_mr(const float* xp, int64_t K, int64_t group, const uint8_t* codes, const uint16_t* scales,
                         bool f16, int64_t n0, int64_t n1, void* y, int64_t ldy, bool y_bf16) {
  constexpr int NR = tile_rows(MR);
  const int64_t lane = (n1 - n0) / NR, rest = n0 + lane * NR;
  for (int64_t t = 0; t < lane; ++t)
    int4_tile<NR, MR>(xp, K, group, codes, scales, f16, n0 + t, lane, y, ldy, y_bf16);
  for (int64_t n = rest; n < n1; ++n) int4_tile<1, MR>(xp, K, group, codes, scales, f16, n, 1, y, ldy, y_bf16);
}

// ---- bf16, AVX-512F (no vdpbf16ps): exact fp32 FMAs on bf16-rounded x ------------------------
//
// Block j of a weight row is one 64-byte load: dword i holds w[32j + 2i] in its low half and
// w[32j + 2i + 1] in its high half. A bf16 is the top half of an fp32, so the odd weights are the
// dword with its low half cleared and the even ones the dword shifted left by 16: two integer
// instructions, no shuffle. Odd first, then even: the order vdpbf16ps documents, so both bf16 kernels
// do the same arithmetic (bf16 x bf16 products are exact in fp32); only vdpbf16ps flushes subnormals.

template <bool TAIL, int NR, int MR>
AVX512_INLINE void bf16_block(const float* xj, const uint16_t* const* w, int64_t j, __mmask32 tail_mask,
                              __m512 (&acc)[NR][MR]) {
  __m512 w_even[NR], w_odd[NR];
  // One cache line per row and block; see kPrefetchBytesBf16.
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) prefetch(w[r] + 32 * j + kPrefetchBytesBf16 / 2);
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    const __m512i v = TAIL ? _mm512_maskz_loadu_epi16(tail_mask, w[r] + 32 * j) : _mm512_loadu_si512(w[r] + 32 * j);
    w_odd[r] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    w_even[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    const __m512 x_even = _mm512_load_ps(xj + m * 32);
    const __m512 x_odd = _mm512_load_ps(xj + m * 32 + 16);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      acc[r][m] = _mm512_fmadd_ps(w_odd[r], x_odd, acc[r][m]);
      acc[r][m] = _mm512_fmadd_ps(w_even[r], x_even, acc[r][m]);
    }
  }
}

template <int NR, int MR>
AVX512 void bf16_tile(const float* xp, int64_t K, const uint16_t* wt, int64_t n, int64_t step, void* y,
                      int64_t ldy, bool y_bf16) {
  const int64_t full = K / 32;
  const uint16_t* w[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) w[r] = wt + (n + r * step) * K;
  __m512 acc[NR][MR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t j = 0; j < full; ++j) bf16_block<false, NR, MR>(xp + j * (MR * 32), w, j, 0, acc);
  // A partial last block: the missing weights load as zeros and x is zero-padded, so they add 0.
  if (full * 32 < K) bf16_block<true, NR, MR>(xp + full * (MR * 32), w, full, first_lanes32(K - full * 32), acc);
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) store(y, m * ldy + n + r * step, y_bf16, hsum16(acc[r][m]));
}

template <int MR>
AVX512 void bf16_rows_mr(const float* xp, int64_t K, const uint16_t* w, int64_t n0, int64_t n1, void* y,
                         int64_t ldy, bool y_bf16) {
  constexpr int NR = bf16_tile_rows(MR);
  const int64_t lane = (n1 - n0) / NR, rest = n0 + lane * NR;
  for (int64_t t = 0; t < lane; ++t) bf16_tile<NR, MR>(xp, K, w, n0 + t, lane, y, ldy, y_bf16);
  for (int64_t n = rest; n < n1; ++n) bf16_tile<1, MR>(xp, K, w, n, 1, y, ldy, y_bf16);
}

// ---- bf16 with vdpbf16ps ---------------------------------------------------------------------
//
// One instruction per block, row and token: acc += w[2i+1] * x[2i+1], then += w[2i] * x[2i], per lane,
// x already rounded to bf16 and in natural order. The instruction treats subnormal inputs as zero and
// flushes subnormal results; otherwise it matches bf16_tile bit for bit (checked on hardware).
// Not the default (ops.cpp): on the Xeon we measured (model 207) it was no faster at M = 1 and 1.4x
// slower at M = 8..16 than the two FMAs of bf16_tile, which already run at memory speed at M = 1.

#if SPECQD_BF16_DOT
template <bool TAIL, int NR, int MR>
static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512dq,avx512vl,fma,avx512bf16"))) void
bf16_dot_block(const uint16_t* xj, const uint16_t* const* w, int64_t j, __mmask32 tail_mask,
               __m512 (&acc)[NR][MR]) {
  __m512i wv[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) prefetch(w[r] + 32 * j + kPrefetchBytesBf16 / 2);
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    wv[r] = TAIL ? _mm512_maskz_loadu_epi16(tail_mask, w[r] + 32 * j) : _mm512_loadu_si512(w[r] + 32 * j);
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    const __m512i xv = _mm512_load_si512(xj + m * 32);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
  }
}

template <int NR, int MR>
AVX512_BF16 void bf16_dot_tile(const uint16_t* xp, int64_t K, const uint16_t* wt, int64_t n, int64_t step,
                               void* y, int64_t ldy, bool y_bf16) {
  const int64_t full = K / 32;
  const uint16_t* w[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) w[r] = wt + (n + r * step) * K;
  __m512 acc[NR][MR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t j = 0; j < full; ++j) bf16_dot_block<false, NR, MR>(xp + j * (MR * 32), w, j, 0, acc);
  if (full * 32 < K)
    bf16_dot_block<true, NR, MR>(xp + full * (MR * 32), w, full, first_lanes32(K - full * 32), acc);
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) store(y, m * ldy + n + r * step, y_bf16, hsum16(acc[r][m]));
}

template <int MR>
AVX512_BF16 void bf16_dot_rows_mr(const uint16_t* xp, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
                                  void* y, int64_t ldy, bool y_bf16) {
  constexpr int NR = tile_rows(MR);
  const int64_t lane = (n1 - n0) / NR, rest = n0 + lane * NR;
  for (int64_t t = 0; t < lane; ++t) bf16_dot_tile<NR, MR>(xp, K, w, n0 + t, lane, y, ldy, y_bf16);
  for (int64_t n = rest; n < n1; ++n) bf16_dot_tile<1, MR>(xp, K, w, n, 1, y, ldy, y_bf16);
}
#endif

// Calls F<MR>(args...) for a run-time mr in 1..16 (each MR is its own instantiation, so that the
// accumulator array has a compile-time size and lives in registers).
#define SPECQD_DISPATCH_MR(mr, FN, ...) \
  switch (mr) {                         \
    case 1: FN<1>(__VA_ARGS__); break;  \
    case 2: FN<2>(__VA_ARGS__); break;  \
    case 3: FN<3>(__VA_ARGS__); break;  \
    case 4: FN<4>(__VA_ARGS__); break;  \
    case 5: FN<5>(__VA_ARGS__); break;  \
    case 6: FN<6>(__VA_ARGS__); break;  \
    case 7: FN<7>(__VA_ARGS__); break;  \
    case 8: FN<8>(__VA_ARGS__); break;  \
    case 9: FN<9>(__VA_ARGS__); break;  \
    case 10: FN<10>(__VA_ARGS__); break; \
    case 11: FN<11>(__VA_ARGS__); break; \
    case 12: FN<12>(__VA_ARGS__); break; \
    case 13: FN<13>(__VA_ARGS__); break; \
    case 14: FN<14>(__VA_ARGS__); break; \
    case 15: FN<15>(__VA_ARGS__); break; \
    default: FN<16>(__VA_ARGS__); break; \
  }

constexpr int64_t kMaxMR = 16;

}  // namespace

// ---- activation layouts -------------------------------------------------------------------------

// Where x's block j of row m goes: rows are taken in chunks of 16 (the kernels' MR), and within a chunk
// of mc rows the layout is [block][row][32], so that the tile reads the x data of one block for all its
// rows from consecutive cache lines, at fixed offsets from one pointer.
inline int64_t chunk_offset(int64_t m, int64_t kp) {
  const int64_t m0 = m / kMaxMR * kMaxMR;
  return m0 * kp + (m - m0) * 32;  // + block * (rows in the chunk * 32)
}
inline int64_t chunk_rows(int64_t m, int64_t M) {
  const int64_t m0 = m / kMaxMR * kMaxMR;
  return M - m0 < kMaxMR ? M - m0 : kMaxMR;
}

AVX512 void prep_even_odd_f32(const float* x, int64_t M, int64_t K, float* xp, bool round_bf16) {
  const int64_t kp = round_up32(K);
  const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd_idx = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* out = xp + chunk_offset(m, kp);
    const int64_t stride = chunk_rows(m, M) * 32;
    for (int64_t k = 0; k < kp; k += 32, out += stride) {
      // Elements past K load as zeros (only in the last block, only when K % 32 != 0).
      __m512 a = _mm512_maskz_loadu_ps(first_lanes16(K - k), xr + k);
      __m512 b = _mm512_maskz_loadu_ps(first_lanes16(K - k - 16), xr + k + 16);
      if (round_bf16) {
        a = _mm512_castsi512_ps(round_to_bf16_bits(a));
        b = _mm512_castsi512_ps(round_to_bf16_bits(b));
      }
      _mm512_store_ps(out, _mm512_permutex2var_ps(a, even_idx, b));
      _mm512_store_ps(out + 16, _mm512_permutex2var_ps(a, odd_idx, b));
    }
  }
}

AVX512 void prep_even_odd_bf16(const uint16_t* x, int64_t M, int64_t K, float* xp) {
  const int64_t kp = round_up32(K);
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = x + m * K;
    float* out = xp + chunk_offset(m, kp);
    const int64_t stride = chunk_rows(m, M) * 32;
    for (int64_t k = 0; k < kp; k += 32, out += stride) {
      const __m512i v = _mm512_maskz_loadu_epi16(first_lanes32(K - k), xr + k);
      _mm512_store_si512(out, _mm512_slli_epi32(v, 16));  // x[2i]
      _mm512_store_si512(out + 16, _mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    }
  }
}

AVX512 void prep_bf16_pairs_f32(const float* x, int64_t M, int64_t K, uint16_t* xp) {
  const int64_t kp = round_up32(K);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    uint16_t* out = xp + chunk_offset(m, kp);
    const int64_t stride = chunk_rows(m, M) * 32;
    for (int64_t k = 0; k < kp; k += 32, out += stride) {
      const __m512 a = _mm512_maskz_loadu_ps(first_lanes16(K - k), xr + k);
      const __m512 b = _mm512_maskz_loadu_ps(first_lanes16(K - k - 16), xr + k + 16);
      const __m256i ha = _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_bf16_bits(a), 16));
      const __m256i hb = _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_bf16_bits(b), 16));
      _mm512_store_si512(out, _mm512_inserti64x4(_mm512_castsi256_si512(ha), hb, 1));
    }
  }
}

AVX512 void prep_bf16_pairs_bf16(const uint16_t* x, int64_t M, int64_t K, uint16_t* xp) {
  const int64_t kp = round_up32(K);
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* out = xp + chunk_offset(m, kp);
    const int64_t stride = chunk_rows(m, M) * 32;
    for (int64_t k = 0; k < kp; k += 32, out += stride)
      _mm512_store_si512(out, _mm512_maskz_loadu_epi16(first_lanes32(K - k), x + m * K + k));
  }
}

// ---- entry points: chunks of at most 16 activation rows; rows [n0, n1) of the weight -------------
//
// The chunk loop is outside the row loop: a chunk of x (16 x K floats) stays in L1/L2 while the weight
// streams past; for M <= 16 there is a single chunk and the weight is read exactly once.

AVX512 void mxfp4_rows(const float* xp, int64_t M, int64_t K, const uint8_t* codes, const uint8_t* scales,
                       int64_t N, int64_t n0, int64_t n1, void* y, bool y_bf16) {
  const int64_t elem = y_bf16 ? 2 : 4;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
    const int64_t mr = M - m0 < kMaxMR ? M - m0 : kMaxMR;
    void* ym = static_cast<char*>(y) + m0 * N * elem;
    SPECQD_DISPATCH_MR(mr, mxfp4_rows_mr, xp + m0 * K, K, codes, scales, n0, n1, ym, N, y_bf16)
  }
}

AVX512 void int4_rows(const float* xp, int64_t M, int64_t K, int64_t group, const uint8_t* codes,
                      const uint16_t* scales, bool scales_f16, int64_t N, int64_t n0, int64_t n1, void* y,
                      bool y_bf16) {
  const int64_t elem = y_bf16 ? 2 : 4;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
    const int64_t mr = M - m0 < kMaxMR ? M - m0 : kMaxMR;
    void* ym = static_cast<char*>(y) + m0 * N * elem;
    SPECQD_DISPATCH_MR(mr, int4_rows_mr, xp + m0 * K, K, group, codes, scales, scales_f16, n0, n1, ym, N, y_bf16)
  }
}

AVX512 void bf16_rows(const float* xp, int64_t M, int64_t K, const uint16_t* w, int64_t N, int64_t n0, int64_t n1,
                      void* y, bool y_bf16) {
  const int64_t elem = y_bf16 ? 2 : 4, kp = round_up32(K);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
    const int64_t mr = M - m0 < kMaxMR ? M - m0 : kMaxMR;
    void* ym = static_cast<char*>(y) + m0 * N * elem;
    SPECQD_DISPATCH_MR(mr, bf16_rows_mr, xp + m0 * kp, K, w, n0, n1, ym, N, y_bf16)
  }
}

// The 32 values of a block of codes (16 bytes, element 2i in the low nibble) through a 16-value table,
// in natural order: the even and odd elements decode apart (as in the tiles), then interleave.
AVX512_INLINE void decode_block(const uint8_t* c, __m512 lut, float* out) {
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
  const __m512 even = _mm512_permutexvar_ps(q, lut), odd = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut);
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(even, lo, odd));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(even, hi, odd));
}

// bf16: the same values as bf16, exactly (an E2M1 value times a power of two has 2 significant bits, so
// the fp32 value's low 16 bits are zero), for long forwards that take torch's bf16 GEMM: half the bytes
// written, and no conversion pass after.
AVX512 void mxfp4_to_float(const uint8_t* codes, const uint8_t* scales, int64_t K, int64_t n0, int64_t n1, void* w,
                           bool bf16) {
  alignas(64) float block[32];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t j = 0; j < K / 32; ++j) {
      const __m512 lut = _mm512_load_ps(kScaledE2M1.data() + (size_t{scales[n * (K / 32) + j]} << 4));
      if (!bf16) {
        decode_block(codes + n * (K / 2) + 16 * j, lut, static_cast<float*>(w) + n * K + 32 * j);
        continue;
      }
      decode_block(codes + n * (K / 2) + 16 * j, lut, block);
      uint16_t* out = static_cast<uint16_t*>(w) + n * K + 32 * j;
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * h),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_load_si512(block + 16 * h), 16)));
    }
}

AVX512 void int4_to_f32(const uint8_t* codes, const uint16_t* scales, bool scales_f16, int64_t K, int64_t group,
                        int64_t n0, int64_t n1, float* w) {
  const __m512 q_values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t ngroups = K / group;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < ngroups; ++g) {
      const uint16_t bits = scales[n * ngroups + g];
      const __m512 scale = scales_to_fp32(_mm256_set1_epi16(static_cast<short>(bits)), scales_f16);
      const __m512 lut = _mm512_mul_ps(q_values, scale);  // exact: a 4-bit integer times a 16-bit float
      for (int64_t j = g * (group / 32); j < (g + 1) * (group / 32); ++j)
        decode_block(codes + n * (K / 2) + 16 * j, lut, w + n * K + 32 * j);
    }
}

#if SPECQD_BF16_DOT
AVX512_BF16 void bf16_rows_dot(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* w, int64_t N, int64_t n0,
                               int64_t n1, void* y, bool y_bf16) {
  const int64_t elem = y_bf16 ? 2 : 4, kp = round_up32(K);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxMR) {
    const int64_t mr = M - m0 < kMaxMR ? M - m0 : kMaxMR;
    void* ym = static_cast<char*>(y) + m0 * N * elem;
    SPECQD_DISPATCH_MR(mr, bf16_dot_rows_mr, xp + m0 * kp, K, w, n0, n1, ym, N, y_bf16)
  }
}
#else
void bf16_rows_dot(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t, void*, bool) {}
#endif

#else  // not x86: nothing is available, the Python side falls back to PyTorch

bool cpu_has_avx512() { return false; }
bool cpu_has_avx512_bf16() { return false; }
bool built_with_bf16_dot() { return false; }
void prep_even_odd_f32(const float*, int64_t, int64_t, float*, bool) {}
void prep_even_odd_bf16(const uint16_t*, int64_t, int64_t, float*) {}
void prep_bf16_pairs_f32(const float*, int64_t, int64_t, uint16_t*) {}
void prep_bf16_pairs_bf16(const uint16_t*, int64_t, int64_t, uint16_t*) {}
void mxfp4_rows(const float*, int64_t, int64_t, const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t, void*,
                bool) {}
void int4_rows(const float*, int64_t, int64_t, int64_t, const uint8_t*, const uint16_t*, bool, int64_t, int64_t,
               int64_t, void*, bool) {}
void bf16_rows(const float*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t, void*, bool) {}
void bf16_rows_dot(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t, void*, bool) {}
void mxfp4_to_float(const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t, void*, bool) {}
void int4_to_f32(const uint8_t*, const uint16_t*, bool, int64_t, int64_t, int64_t, int64_t, float*) {}

#endif

}  // namespace specqd_cpu
