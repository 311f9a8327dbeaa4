// Attention of a few new tokens over the KV cache, for decoding on the CPU:
//     out[h, t] = softmax(q[h, t] . k[g, j] * scale over the cache slots j that mask[t] allows) @ v[g, j]
// with g = h / (H / KVH) the KV head of query head h (grouped-query attention).
//
// Why it exists: the same answer for every number of tokens. torch's scaled_dot_product_attention
// picks its blocking by the number of queries T, so a verification forward over k+1 tokens rounds
// differently from k+1 one-token steps (by ~1e-5 in fp32), and the linear kernels' bit-identity would
// be lost one op later. Here every output row (h, t) is computed alone, by the same operations in the
// same order whatever T, the other rows and the thread that runs it:
//   1. scores: for each allowed slot j in increasing order, s_j = hsum16(sum over D/16 chunks, in order,
//      of fma(q, k_j)) * scale, kept in a compact list (masked slots are skipped, never computed);
//   2. m = max s_j; e_j = exp(s_j - m) with the vector exp below, in chunks of 16 of the compact list;
//      denominator = hsum16 of the 16-lane running sum of those chunks (zero-padded last chunk);
//   3. out = (sum over the list, in order, of e_j * v_j, 16 lanes of D at a time) * (1 / denominator).
// It also skips the masked part of a long static cache, which SDPA reads in full.
//
// Accuracy: the fp32 maths of softmax attention; exp is a degree-6 polynomial after range reduction
// (relative error ~2e-7, like the libm's within a couple of ulps), so results equal SDPA's to fp32
// rounding, not bit for bit. q, k, v may be fp32 or bf16 (decoded exactly to fp32); out is fp32.

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels.h"

namespace specqd_cpu {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define AVX512_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

namespace {

AVX512_INLINE float hsum16(__m512 v) {  // a fixed tree: 16 -> 8 -> 4 -> 2 -> 1 lanes
  __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}

// 16 fp32 values from p: fp32 as is, bf16 widened exactly (its bits are the high half of an fp32).
AVX512_INLINE __m512 load16(const void* p, bool bf16) {
  if (!bf16) return _mm512_loadu_ps(p);
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// exp(x) for x <= 0 (softmax arguments): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor
// polynomial to degree 6 (Horner), times 2^n by scalef. Below -87 the result flushes to 0.
AVX512_INLINE __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 split in two so that n * ln2_hi is exact.
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  __m512 y = _mm512_scalef_ps(p, n);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LE_OQ), y, _mm512_setzero_ps());
}

}  // namespace

AVX512 void attention_rows(const AttentionArgs& a, int64_t r0, int64_t r1, float* scores, int32_t* slots) {
  const int64_t D = a.D, chunks = D / 16, group = a.H / a.KVH;
  const size_t qe = a.q_bf16 ? 2 : 4, ke = a.kv_bf16 ? 2 : 4;
  for (int64_t row = r0; row < r1; ++row) {  // row = (b * H + h) * T + t
    const int64_t t = row % a.T, bh = row / a.T, h = bh % a.H, b = bh / a.H;
    const char* q = static_cast<const char*>(a.q) + row * D * qe;
    const int64_t kv_base = (b * a.KVH + h / group) * a.S * D;
    const char* k = static_cast<const char*>(a.k) + kv_base * ke;
    const char* v = static_cast<const char*>(a.v) + kv_base * ke;
    const uint8_t* mask = a.mask + t * a.mask_stride;

    // 1. scores of the allowed slots, in slot order
    int64_t n = 0;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < a.S; ++j) {
      if (!mask[j]) continue;
      const char* kj = k + j * D * ke;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c)
        acc = _mm512_fmadd_ps(load16(q + c * 16 * qe, a.q_bf16), load16(kj + c * 16 * ke, a.kv_bf16), acc);
      const float s = hsum16(acc) * a.scale;
      scores[n] = s;
      slots[n++] = static_cast<int32_t>(j);
      m = s > m ? s : m;
    }
    float* out = a.out + row * D;
    if (n == 0) {  // nothing visible: SDPA would give NaN; zeros are the safer answer and never used
      for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
      continue;
    }
    // 2. exponentials and their sum (the list is padded to a whole chunk with exp = 0)
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 live = static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
      __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, scores + i), mv));
      e = _mm512_maskz_mov_ps(live, e);
      _mm512_mask_storeu_ps(scores + i, live, e);
      sum = _mm512_add_ps(sum, e);
    }
    const float inv = 1.0f / hsum16(sum);
    // 3. the weighted sum of values, 16 lanes of D at a time (D <= 256: at most 16 accumulators)
    __m512 acc[16];
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      const __m512 p = _mm512_set1_ps(scores[i]);
      const char* vj = v + slots[i] * D * ke;
      for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(p, load16(vj + c * 16 * ke, a.kv_bf16), acc[c]);
    }
    const __m512 iv = _mm512_set1_ps(inv);
    for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(out + c * 16, _mm512_mul_ps(acc[c], iv));
  }
}

#else

void attention_rows(const AttentionArgs&, int64_t, int64_t, float*, int32_t*) {}

#endif

}  // namespace specqd_cpu
