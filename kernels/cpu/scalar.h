// Scalar helpers shared by the elementwise parts of the decode step (norm_rope.cpp, block.cpp):
// bf16 <-> fp32 as torch converts, and model.py's RMSNorm and RoPE on one row, so that the fused
// block and the single operators compute the same bits by sharing the code.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace specqd_cpu {
namespace scalar {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // nearest even, as torch rounds (NaN kept quiet)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Element access in the run dtype, as fp32 values.
struct View {
  const void* p;
  bool bf16;
  float operator[](int64_t i) const {
    return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
  }
};
inline float round_to(float v, bool bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }
inline void store(void* p, int64_t i, float v, bool bf16) {
  if (bf16)
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  else
    static_cast<float*>(p)[i] = v;
}

// model.py's RMSNorm on one row of C: y = w * (x * rsqrt(mean(x^2) + eps)).to(x dtype), in y's dtype.
// The sum of squares is sequential in double: exact enough that its order does not matter in fp32.
inline void rms_norm_row(View x, View w, int64_t C, float eps, void* y, bool y_bf16) {
  double ss = 0;
  for (int64_t c = 0; c < C; ++c) ss += static_cast<double>(x[c]) * x[c];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / C) + eps);
  for (int64_t c = 0; c < C; ++c) store(y, c, w[c] * round_to(x[c] * inv, x.bf16), y_bf16);
}

// model.py's apply_rope on one row of D = 2 * half: pairs (x[i], x[i + half]) rotate by (cos, sin) =
// (f[2i], f[2i + 1]) in fp32, each product rounded as torch rounds it; out (fp32) holds the results
// already rounded to x's dtype.
inline void rope_row(View x, const float* f, int64_t half, float* out) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half], c = f[2 * i], s = f[2 * i + 1];
    const float a = x1 * c, b = x2 * s, p = x2 * c, q = x1 * s;
    out[i] = round_to(a - b, x.bf16);
    out[i + half] = round_to(p + q, x.bf16);
  }
}

}  // namespace scalar
}  // namespace specqd_cpu
