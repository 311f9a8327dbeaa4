// One decoder block of model.py (TransformerBlock.forward on the cached path) in a single call.
//
// Why: at 135M parameters a decode step's weights stream in ~11 ms on the CPU we measured, and the
// Python around them (module calls, attribute look-ups, views, the checks that pick a kernel) cost
// another ~5 ms: 30 blocks x ~20 small calls. Here the same kernels and the same ATen operations run
// in the same order as model.py's eager code, so the result is bit for bit the same, with the Python
// gone. model.py keeps the readable version; accel.py (FastBlock._fused) decides when
// this one may stand in for it.
//
//   h   = x + wo(attention(rope(q), rope(k) -> cache, v -> cache, mask))   q, k, v = split(wqkv(norm1(x)))
//   out = h + w2(silu(w1(norm2(h))) * w3(norm2(h)))

#include <torch/extension.h>

#include <vector>

namespace specqd_cpu {

at::Tensor mxfp4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales);  // ops.cpp
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales);   // ops.cpp
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w);                                 // ops.cpp
at::Tensor mxfp4_linear_i8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales);  // ops.cpp
at::Tensor int4_linear_i8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales);   // ops.cpp
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                     double scale);                                                               // ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);                   // norm_rope.cpp
at::Tensor rope(const at::Tensor& x, const at::Tensor& freqs);                                    // norm_rope.cpp

namespace {

// A linear layer as the Python side describes it: kind 0 = bf16 weight `a`; 1 = MXFP4 codes `a`,
// scales `b`; 2 = int4 codes `a`, scales `b`; 3 and 4 = MXFP4 and int4 with int8 activations (VNNI).
at::Tensor linear(int64_t kind, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
  switch (kind) {
    case 0: return bf16_linear(x, a);
    case 1: return mxfp4_linear(x, a, b);
    case 2: return int4_linear(x, a, b);
    case 3: return mxfp4_linear_i8(x, a, b);
    case 4: return int4_linear_i8(x, a, b);
  }
  TORCH_CHECK(false, "block: unknown linear kind ", kind);
}

}  // namespace

// w: [attention_norm.weight, ffn_norm.weight, then (a, b) for wqkv, wo, w1, w3, w2]; kinds: the 5 kinds.
at::Tensor block(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<int64_t>& kinds,
                 at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& input_pos, const at::Tensor& freqs,
                 const at::Tensor& mask, int64_t n_head, int64_t n_kv, int64_t head_dim, double eps,
                 double scale) {
  TORCH_CHECK(w.size() == 12 && kinds.size() == 5, "block: 12 weight tensors and 5 kinds expected");
  auto lin = [&](int i, const at::Tensor& in) { return linear(kinds[i], in, w[2 + 2 * i], w[3 + 2 * i]); };
  const int64_t B = x.size(0), T = x.size(1), q_size = n_head * head_dim, kv_size = n_kv * head_dim;

  // Attention (model.py: Attention.forward, KVCache.update, cached_attention).
  const auto qkv = lin(0, rms_norm(x, w[0], eps)).split_with_sizes({q_size, kv_size, kv_size}, -1);
  at::Tensor q = qkv[0].view({B, T, n_head, head_dim}).transpose(1, 2);
  at::Tensor k = qkv[1].view({B, T, n_kv, head_dim}).transpose(1, 2);
  at::Tensor v = qkv[2].view({B, T, n_kv, head_dim}).transpose(1, 2);
  q = rope(q, freqs);
  k = rope(k, freqs);
  k_cache.index_copy_(2, input_pos, k.to(k_cache.scalar_type()));
  v_cache.index_copy_(2, input_pos, v.to(v_cache.scalar_type()));
  const at::Tensor y = attention(q, k_cache, v_cache, mask, scale);
  const at::Tensor h = x + lin(1, y.transpose(1, 2).reshape({B, T, q_size}));

  // Feed-forward (model.py: FeedForward.forward).
  const at::Tensor f = rms_norm(h, w[1], eps);
  return h + lin(4, at::silu(lin(2, f)) * lin(3, f));
}

}  // namespace specqd_cpu
