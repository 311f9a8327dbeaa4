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

#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels.h"

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
void attention_run(const AttentionArgs& a);                                                       // ops.cpp
void prefetch_linear(int64_t kind, const at::Tensor& a, const at::Tensor& b);                     // ops.cpp

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

// The decode step's usual case, with its glue in loops: batch 1, x contiguous in the dtype of the norm
// weights (so that every intermediate stays in x's dtype), int64 cache slots. Each loop does what the
// ATen operation it replaces does, element by element, with the same roundings: the residual adds and
// the SwiGLU product in fp32 rounded to x's dtype, RoPE as model.py (scalar::rope_row), the cache
// written in its dtype, attention's fp32 output rounded to x's dtype. What it saves is the ~20 ATen
// calls per block (views, splits, index_copy_, transposes, small adds), a few microseconds each. The
// loops are glue_avx512.cpp's (scalar.h's loops 16 elements at a time, the same bits).
bool glue_in_loops(const at::Tensor& x, const std::vector<at::Tensor>& w, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const at::Tensor& input_pos, const at::Tensor& freqs,
                   const at::Tensor& mask, int64_t n_kv, int64_t head_dim) {
  const auto dt = x.scalar_type();
  const auto ct = k_cache.scalar_type();
  return x.dim() == 3 && x.size(0) == 1 && x.is_contiguous() && (dt == at::kBFloat16 || dt == at::kFloat) &&
         w[0].scalar_type() == dt && w[1].scalar_type() == dt && w[0].is_contiguous() && w[1].is_contiguous() &&
         (ct == at::kBFloat16 || ct == at::kFloat) && v_cache.scalar_type() == ct && k_cache.is_contiguous() &&
         v_cache.is_contiguous() && k_cache.dim() == 4 && k_cache.size(0) == 1 && k_cache.size(1) == n_kv &&
         k_cache.size(3) == head_dim && v_cache.sizes() == k_cache.sizes() &&
         input_pos.scalar_type() == at::kLong && input_pos.dim() == 1 && input_pos.size(0) == x.size(1) &&
         input_pos.is_contiguous() && freqs.scalar_type() == at::kFloat && freqs.is_contiguous() &&
         freqs.dim() == 3 && freqs.size(0) == x.size(1) && freqs.size(1) == head_dim / 2 &&
         mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == x.size(1) &&
         mask.size(1) == k_cache.size(2) && head_dim % 16 == 0 && head_dim <= 256 && cpu_has_avx512();
}

// The linear that follows a block's last one (the next layer's wqkv, or the head), if any: a block has
// the pool's helpers prefetch each linear's rows before it comes (prefetch_linear), this one too.
struct NextLinear {
  int64_t kind = -1;
  const at::Tensor* a = nullptr;
  const at::Tensor* b = nullptr;
};

// w: [attention_norm.weight, ffn_norm.weight, then (a, b) for wqkv, wo, w1, w3, w2]; kinds: the 5 kinds.
at::Tensor block_then(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<int64_t>& kinds,
                      at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& input_pos, const at::Tensor& freqs,
                      const at::Tensor& mask, int64_t n_head, int64_t n_kv, int64_t head_dim, double eps,
                      double scale, NextLinear next) {
  TORCH_CHECK(w.size() == 12 && kinds.size() == 5, "block: 12 weight tensors and 5 kinds expected");
  // Linear i, once the helpers know what to prefetch while it and the work after it run: the next one.
  auto lin = [&](int i, const at::Tensor& in) {
    if (i < 4)
      prefetch_linear(kinds[i + 1], w[4 + 2 * i], w[5 + 2 * i]);
    else if (next.a != nullptr)
      prefetch_linear(next.kind, *next.a, *next.b);
    return linear(kinds[i], in, w[2 + 2 * i], w[3 + 2 * i]);
  };
  const int64_t B = x.size(0), T = x.size(1), q_size = n_head * head_dim, kv_size = n_kv * head_dim;
  if (glue_in_loops(x, w, k_cache, v_cache, input_pos, freqs, mask, n_kv, head_dim)) {
    const int64_t C = x.size(2), D = head_dim, half = D / 2, S = k_cache.size(2), N = q_size + 2 * kv_size;
    const bool xb = x.scalar_type() == at::kBFloat16, cb = k_cache.scalar_type() == at::kBFloat16;
    const int64_t xe = xb ? 2 : 4, ce = cb ? 2 : 4;
    const int64_t* pos = input_pos.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(pos[t] >= 0 && pos[t] < S, "block: cache slot ", pos[t], " outside the cache of ", S);
    auto norm = [&](const at::Tensor& in, const at::Tensor& weight) {
      at::Tensor out = at::empty_like(in);
      for (int64_t t = 0; t < T; ++t)
        glue_norm(static_cast<const char*>(in.data_ptr()) + t * C * xe, weight.data_ptr(), C,
                  static_cast<float>(eps), static_cast<char*>(out.data_ptr()) + t * C * xe, xb);
      return out;
    };

    // Attention: q rotated into [H, T, D]; k rotated and v copied straight into their cache slots.
    const at::Tensor qkv = lin(0, norm(x, w[0]));
    at::Tensor q = at::empty({1, n_head, T, D}, x.options());
    const char* qkv_p = static_cast<const char*>(qkv.data_ptr());
    const float* f = freqs.data_ptr<float>();
    char *qp = static_cast<char*>(q.data_ptr()), *kp = static_cast<char*>(k_cache.data_ptr()),
         *vp = static_cast<char*>(v_cache.data_ptr());
    for (int64_t t = 0; t < T; ++t) {
      const char* row = qkv_p + t * N * xe;
      const float* ft = f + t * half * 2;
      for (int64_t h = 0; h < n_head; ++h)
        glue_rope(row + h * D * xe, ft, half, qp + (h * T + t) * D * xe, xb, xb);
      for (int64_t g = 0; g < n_kv; ++g) {
        const int64_t slot = (g * S + pos[t]) * D * ce;
        glue_rope(row + (q_size + g * D) * xe, ft, half, kp + slot, xb, cb);
        glue_convert(row + (q_size + kv_size + g * D) * xe, xb, vp + slot, cb, D);
      }
    }
    const at::Tensor mc = mask.contiguous();
    at::Tensor att = at::empty({n_head, T, D}, x.options().dtype(at::kFloat));
    attention_run(AttentionArgs{qp, kp, vp, reinterpret_cast<const uint8_t*>(mc.data_ptr()), att.data_ptr<float>(),
                                1, n_head, n_kv, T, S, D, S, static_cast<float>(scale), xb, cb});
    at::Tensor y = at::empty({1, T, q_size}, x.options());  // [H, T, D] -> [T, H * D], in x's dtype
    const float* ap = att.data_ptr<float>();
    char* yp = static_cast<char*>(y.data_ptr());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < n_head; ++h)
        glue_convert(ap + (h * T + t) * D, false, yp + (t * q_size + h * D) * xe, xb, D);
    at::Tensor hid = lin(1, y);
    glue_add(x.data_ptr(), hid.data_ptr(), hid.data_ptr(), hid.numel(), xb);

    // Feed-forward: silu by ATen (its exp is torch's), the product and the residual here.
    const at::Tensor fn = norm(hid, w[1]);
    at::Tensor gate = lin(2, fn);
    const at::Tensor up = lin(3, fn);
    at::silu_(gate);
    glue_mul(gate.data_ptr(), up.data_ptr(), gate.data_ptr(), gate.numel(), xb);
    at::Tensor out = lin(4, gate);
    glue_add(hid.data_ptr(), out.data_ptr(), out.data_ptr(), out.numel(), xb);
    return out;
  }

  // Any other case: the same operations through ATen.
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
  const at::Tensor f = rms_norm(h, w[1], eps);
  return h + lin(4, at::silu(lin(2, f)) * lin(3, f));
}

}  // namespace

at::Tensor block(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<int64_t>& kinds,
                 at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& input_pos, const at::Tensor& freqs,
                 const at::Tensor& mask, int64_t n_head, int64_t n_kv, int64_t head_dim, double eps,
                 double scale) {
  return block_then(x, w, kinds, std::move(k_cache), std::move(v_cache), input_pos, freqs, mask, n_head, n_kv,
                    head_dim, eps, scale, NextLinear{});
}

// FastTransformer's cached forward after the embedding, its weights bound once (accel._StackPlan makes
// one per model): every block in turn (block() per layer), then, where the model's final norm and
// output head have kernels, those too. Why bound: a Python loop of FastBlock calls cost ~40 us a block
// (1.2-1.6 ms of a SmolLM2 step); then one call passing the ~600 tensors and numbers of all the layers,
// plus the norm and head module calls, still cost ~0.3-0.5 ms of a step (Python objects read again
// right after the weights had streamed through the caches). Now a call passes the four per-step inputs.
class Stack {
 public:
  // w, kinds: block()'s lists for every layer, concatenated (12 tensors and 5 kinds a layer); a cache
  // pair per layer; head_kind: linear()'s kind for the head (a, b), or -1 to leave the norm and head
  // to the caller.
  Stack(const std::vector<at::Tensor>& w, const std::vector<int64_t>& kinds, std::vector<at::Tensor> k_caches,
        std::vector<at::Tensor> v_caches, int64_t n_head, int64_t n_kv, int64_t head_dim, double eps, double scale,
        at::Tensor norm, double norm_eps, int64_t head_kind, at::Tensor head_a, at::Tensor head_b)
      : k_caches_(std::move(k_caches)),
        v_caches_(std::move(v_caches)),
        n_head_(n_head),
        n_kv_(n_kv),
        head_dim_(head_dim),
        eps_(eps),
        scale_(scale),
        norm_(std::move(norm)),
        norm_eps_(norm_eps),
        head_kind_(head_kind),
        head_a_(std::move(head_a)),
        head_b_(std::move(head_b)) {
    const size_t layers = k_caches_.size();
    TORCH_CHECK(v_caches_.size() == layers && w.size() == 12 * layers && kinds.size() == 5 * layers,
                "Stack: 12 weights, 5 kinds and a cache pair per layer expected");
    for (size_t l = 0; l < layers; ++l) {
      w_.emplace_back(w.begin() + 12 * l, w.begin() + 12 * (l + 1));
      kinds_.emplace_back(kinds.begin() + 5 * l, kinds.begin() + 5 * (l + 1));
    }
  }

  at::Tensor blocks(const at::Tensor& x, const at::Tensor& input_pos, const at::Tensor& freqs,
                    const at::Tensor& mask) const {
    return run_blocks(x, input_pos, freqs, mask, false);
  }

  // (the final-normed hidden states of every token, the head's logits for the last `last` tokens, or
  // all of them for last = 0 or past T): Transformer.forward's result and its `features`.
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& input_pos,
                                             const at::Tensor& freqs, const at::Tensor& mask, int64_t last) const {
    TORCH_CHECK(head_kind_ >= 0, "Stack.forward: this stack has no head (call blocks)");
    TORCH_CHECK(last >= 0, "Stack.forward: last = ", last, " (0: every token)");
    const at::Tensor features = rms_norm(run_blocks(x, input_pos, freqs, mask, true), norm_, norm_eps_);
    const int64_t T = features.size(1);
    const at::Tensor rows = last == 0 || last >= T ? features : features.narrow(1, T - last, last);
    // While the caller turns the logits into tokens, the helpers fetch the first layer's wqkv for the
    // next call (a draft's next step, most often).
    if (!w_.empty()) prefetch_linear(kinds_[0][0], w_[0][2], w_[0][3]);
    return {features, linear(head_kind_, rows, head_a_, head_b_)};
  }

  // forward() from token ids, as ModelLevel calls the model for a decoding step: the embedding rows
  // (emb [V, C]), the RoPE rows (freqs_table [S, D / 2, 2]) and the mask rows (mask_table [S, S]) of the
  // tokens and positions gathered here, and the logits returned widened to float32 [rows, V]. Why: in
  // Python these few small operations (the embedding, two indexings, the module call, .float()) ran
  // on caches the weights had just flushed, ~0.3 ms of a step (the embedding alone 117 us, 16 warm).
  std::tuple<at::Tensor, at::Tensor> step(const at::Tensor& idx, const at::Tensor& input_pos, const at::Tensor& emb,
                                          const at::Tensor& freqs_table, const at::Tensor& mask_table,
                                          int64_t last) const {
    TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == 1 && idx.is_contiguous() &&
                    input_pos.scalar_type() == at::kLong && input_pos.dim() == 1 &&
                    input_pos.size(0) == idx.size(1) && input_pos.is_contiguous(),
                "Stack.step: token ids [1, T] and positions [T] (int64) expected");
    TORCH_CHECK(emb.dim() == 2 && emb.is_contiguous() &&
                    (emb.scalar_type() == at::kFloat || emb.scalar_type() == at::kBFloat16) &&
                    freqs_table.dim() == 3 && freqs_table.is_contiguous() && freqs_table.scalar_type() == at::kFloat &&
                    mask_table.dim() == 2 && mask_table.is_contiguous() && mask_table.scalar_type() == at::kBool &&
                    mask_table.size(0) == freqs_table.size(0),
                "Stack.step: an embedding [V, C], a RoPE table [S, D / 2, 2] and a mask [S, S] expected");
    const int64_t T = idx.size(1), V = emb.size(0), C = emb.size(1), S = mask_table.size(0);
    const int64_t f_row = freqs_table.size(1) * freqs_table.size(2), m_row = mask_table.size(1);
    at::Tensor x = at::empty({1, T, C}, emb.options());
    at::Tensor freqs = at::empty({T, freqs_table.size(1), freqs_table.size(2)}, freqs_table.options());
    at::Tensor mask = at::empty({T, m_row}, mask_table.options());
    const int64_t *ids = idx.data_ptr<int64_t>(), *pos = input_pos.data_ptr<int64_t>();
    const int64_t e_row = C * emb.element_size();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(ids[t] >= 0 && ids[t] < V, "Stack.step: token id ", ids[t], " outside the vocabulary of ", V);
      TORCH_CHECK(pos[t] >= 0 && pos[t] < S, "Stack.step: position ", pos[t], " outside the cache of ", S);
      std::memcpy(static_cast<char*>(x.data_ptr()) + t * e_row,
                  static_cast<const char*>(emb.data_ptr()) + ids[t] * e_row, e_row);
      std::memcpy(freqs.data_ptr<float>() + t * f_row, freqs_table.data_ptr<float>() + pos[t] * f_row,
                  f_row * sizeof(float));
      std::memcpy(static_cast<char*>(mask.data_ptr()) + t * m_row,
                  static_cast<const char*>(mask_table.data_ptr()) + pos[t] * m_row, m_row);
    }
    auto [features, logits] = forward(x, input_pos, freqs, mask, last);
    const int64_t rows = logits.size(1), n = logits.size(2);
    if (logits.scalar_type() == at::kFloat) return {features, logits.view({rows, n})};
    at::Tensor wide = at::empty({rows, n}, logits.options().dtype(at::kFloat));
    glue_convert(logits.data_ptr(), true, wide.data_ptr(), false, rows * n);
    return {features, wide};
  }

 private:
  at::Tensor run_blocks(const at::Tensor& x, const at::Tensor& input_pos, const at::Tensor& freqs,
                        const at::Tensor& mask, bool then_head) const {
    at::Tensor h = x;
    for (size_t l = 0; l < w_.size(); ++l) {
      NextLinear next;
      if (l + 1 < w_.size())
        next = NextLinear{kinds_[l + 1][0], &w_[l + 1][2], &w_[l + 1][3]};
      else if (then_head)
        next = NextLinear{head_kind_, &head_a_, &head_b_};
      h = block_then(h, w_[l], kinds_[l], k_caches_[l], v_caches_[l], input_pos, freqs, mask, n_head_, n_kv_,
                     head_dim_, eps_, scale_, next);
    }
    return h;
  }

  std::vector<std::vector<at::Tensor>> w_;
  std::vector<std::vector<int64_t>> kinds_;
  std::vector<at::Tensor> k_caches_, v_caches_;
  int64_t n_head_, n_kv_, head_dim_;
  double eps_, scale_;
  at::Tensor norm_;
  double norm_eps_;
  int64_t head_kind_;
  at::Tensor head_a_, head_b_;
};

// Each linear once on its own input, from C++ as block() calls them: a step's weight reads timed
// without a Python call around each (scripts/profile_step.py). w: two tensors a linear, as block().
void linears(const std::vector<int64_t>& kinds, const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& w) {
  TORCH_CHECK(xs.size() == kinds.size() && w.size() == 2 * kinds.size(), "linears: an input and two tensors a kind");
  for (size_t i = 0; i < kinds.size(); ++i) linear(kinds[i], xs[i], w[2 * i], w[2 * i + 1]);
}

void bind_stack(pybind11::module& m) {
  pybind11::class_<Stack>(m, "Stack", "a model's cached forward after the embedding, its weights bound once")
      .def(pybind11::init<const std::vector<at::Tensor>&, const std::vector<int64_t>&, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, int64_t, int64_t, int64_t, double, double, at::Tensor, double,
                          int64_t, at::Tensor, at::Tensor>())
      .def("blocks", &Stack::blocks, "every block in turn")
      .def("forward", &Stack::forward, "every block, the final norm and the head: (features, logits)")
      .def("step", &Stack::step, "forward from token ids: (features, float32 logits [rows, V])");
  m.def("linears", &linears, "each linear once on its own input (kinds, inputs, two tensors a linear)");
}

// Cache slots [start, end) of every src[i] into dst[i] (caches [B, H, S, D], contiguous, slots along
// dim 2): what a draft sharing its verifier's keys and values copies after each round. One memcpy per
// (tensor, batch row, head) instead of a view and a copy per tensor from Python: slicing SmolLM2's 60
// caches for torch._foreach_copy_ cost ~0.4 ms a round, a few percent of a k = 1 round.
void copy_slots(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src, int64_t start, int64_t end) {
  TORCH_CHECK(dst.size() == src.size(), "copy_slots: ", dst.size(), " destinations for ", src.size(), " sources");
  for (size_t i = 0; i < dst.size(); ++i) {
    const at::Tensor &d = dst[i], &s = src[i];
    TORCH_CHECK(d.dim() == 4 && s.dim() == 4 && d.size(0) == s.size(0) && d.size(1) == s.size(1) &&
                    d.size(3) == s.size(3) && d.scalar_type() == s.scalar_type() && d.is_cpu() && s.is_cpu() &&
                    d.is_contiguous() && s.is_contiguous(),
                "copy_slots: contiguous CPU caches [B, H, S, D] alike but for S expected, got ", d.sizes(), " and ",
                s.sizes());
    TORCH_CHECK(0 <= start && start <= end && end <= d.size(2) && end <= s.size(2), "copy_slots: slots [", start,
                ", ", end, ") outside caches of ", d.size(2), " and ", s.size(2));
  }
  for (size_t i = 0; i < dst.size(); ++i) {
    const at::Tensor &d = dst[i], &s = src[i];
    const int64_t rows = d.size(0) * d.size(1), row = d.size(3) * d.element_size();
    const int64_t Sd = d.size(2), Ss = s.size(2);  // the two caches may hold different numbers of slots
    char* dp = static_cast<char*>(d.data_ptr());
    const char* sp = static_cast<const char*>(s.data_ptr());
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(dp + (r * Sd + start) * row, sp + (r * Ss + start) * row, (end - start) * row);
  }
}

}  // namespace specqd_cpu
