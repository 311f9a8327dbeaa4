// RMSNorm and rotary embedding for the CPU decode step, as single operators.
//
// Why: at decode time a SmolLM2-sized model spends more time dispatching small PyTorch ops than
// multiplying (RMSNorm is 8 eager ops, RoPE a dozen, each a few microseconds, 30 layers deep). One
// call each removes most of that. Both compute row by row with the same operations whatever the
// number of rows, so a T-token forward stays bit-identical to T one-token steps, and they follow
// model.py's formulas step by step (fp32 maths, rounding to the run dtype where model.py rounds).
// Plain C++: the compiler vectorizes the elementwise loops; the one reduction (sum of squares) is
// sequential in double, exact enough that its order does not matter for fp32 results.

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "scalar.h"

namespace specqd_cpu {
namespace {

using scalar::View;

void check_x(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), what,
              ": a CPU float32 or bfloat16 tensor expected");
}

}  // namespace

// model.py's RMSNorm: y = weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype), over the last dim.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_x(x, "rms_norm");
  check_x(weight, "rms_norm");
  const int64_t C = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, "rms_norm: weight ", weight.sizes(), " for ", C,
              " features");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  // torch's type promotion: the product weight * normed has the wider of the two dtypes
  const bool xb = x.scalar_type() == at::kBFloat16, wb = weight.scalar_type() == at::kBFloat16;
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(xb && wb ? at::kBFloat16 : at::kFloat));
  const bool yb = y.scalar_type() == at::kBFloat16;
  const int64_t rows = C ? xc.numel() / C : 0;
  const char* xp = static_cast<const char*>(xc.data_ptr());
  const View w{wc.data_ptr(), wb};
  char* yp = static_cast<char*>(y.data_ptr());
  const int64_t xe = xb ? 2 : 4, ye = yb ? 2 : 4;
  for (int64_t r = 0; r < rows; ++r)
    scalar::rms_norm_row({xp + r * C * xe, xb}, w, C, static_cast<float>(eps), yp + r * C * ye, yb);
  return y;
}

// model.py's apply_rope: x [B, H, T, D] (any strides), freqs [T, D/2, 2] fp32 (cos, sin). Pairs
// (x[i], x[i + D/2]) rotate: (x1 cos - x2 sin, x2 cos + x1 sin) in fp32, rounded to x's dtype.
// Returns a contiguous [B, H, T, D] tensor.
at::Tensor rope(const at::Tensor& x, const at::Tensor& freqs) {
  check_x(x, "rope");
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "rope: x must be [B, H, T, D] with D even");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.dim() == 3 && freqs.size(0) == T &&
                  freqs.size(1) == half && freqs.size(2) == 2,
              "rope: freqs must be float32 [T, D/2, 2], got ", freqs.sizes());
  const at::Tensor xc = x.contiguous(), fc = freqs.contiguous();
  at::Tensor y = at::empty({B, H, T, D}, x.options());
  const bool bf = x.scalar_type() == at::kBFloat16;
  const int64_t e = bf ? 2 : 4;
  const float* f = fc.data_ptr<float>();
  const char* xp = static_cast<const char*>(xc.data_ptr());
  char* yp = static_cast<char*>(y.data_ptr());
  std::vector<float> out(D);
  for (int64_t row = 0; row < B * H * T; ++row) {
    const int64_t t = row % T;
    const View xr{xp + row * D * e, bf};
    void* yr = yp + row * D * e;
    scalar::rope_row(xr, f + t * half * 2, half, out.data());
    for (int64_t i = 0; i < D; ++i) scalar::store(yr, i, out[i], bf);
  }
  return y;
}

}  // namespace specqd_cpu
