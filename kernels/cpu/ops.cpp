// The torch side of the CPU kernels: argument checks, the activation layout, threading over N, and
// the Python bindings. Compiled for baseline x86-64; the AVX-512 code is all in kernels_avx512.cpp and
// only reached after the run-time CPU check (cpu_has_avx512).

#include <ATen/Parallel.h>  // at::get_num_threads
#include <torch/extension.h>

#include <cstdlib>
#include <vector>

#include "kernels.h"
#include "thread_pool.h"

namespace specqd_cpu {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);  // norm_rope.cpp
at::Tensor rope(const at::Tensor& x, const at::Tensor& freqs);                   // norm_rope.cpp
at::Tensor block(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<int64_t>& kinds,
                 at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& input_pos, const at::Tensor& freqs,
                 const at::Tensor& mask, int64_t n_head, int64_t n_kv, int64_t head_dim, double eps,
                 double scale);                                                   // block.cpp
void bind_stack(pybind11::module& m);  // block.cpp: class Stack
void copy_slots(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src, int64_t start,
                int64_t end);  // block.cpp

namespace {

// vdpbf16ps for bf16_linear: 0 = never (the default: the FMA kernel gives the same bits, except for
// subnormals, and was as fast or faster where we measured), 1 = when the CPU reports avx512_bf16,
// 2 = always (testing only: a hypervisor may hide a feature the hardware has; without it, SIGILL).
// Set once, before the first call: switching paths mid-run would break nothing but subnormal bits.
int g_bf16_dot_mode = 0;

bool bf16_dot_in_use() {
  if (!built_with_bf16_dot() || g_bf16_dot_mode == 0) return false;
  return g_bf16_dot_mode == 2 || cpu_has_avx512_bf16();
}

// Scratch memory for the rearranged activations. At decode time it is at most 16 x K floats: a
// per-thread buffer, reused across calls, so the hot path does not allocate. A large prefill gets a
// temporary tensor instead (`keep` holds it until the call returns), so that no thread keeps hundreds
// of megabytes for the rest of the process.
constexpr size_t kMaxCachedScratch = 4 << 20;

void* scratch(size_t bytes, at::Tensor& keep) {
  if (bytes > kMaxCachedScratch) {
    keep = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
    return keep.data_ptr();  // torch's CPU allocator aligns to 64 bytes
  }
  struct Buffer {
    void* p = nullptr;
    size_t capacity = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  if (bytes > buf.capacity) {
    std::free(buf.p);
    buf.capacity = (bytes + 4095) / 4096 * 4096;
    buf.p = std::aligned_alloc(64, buf.capacity);
    TORCH_CHECK(buf.p != nullptr, "specqd cpu kernels: out of memory for ", bytes, " bytes of scratch");
  }
  return buf.p;
}

// Rows of x: the product of its leading dimensions (x.numel() / K fails for K = 0).
int64_t leading_rows(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

// Threads split the N output rows into chunks (never K: that would change the order of the additions),
// claimed dynamically from thread_pool.h's pool; torch.set_num_threads sets how many threads take part
// (unless set_threads pinned the count: see g_pool_threads).
// A chunk is a multiple of 16 rows (whole tiles) and about kChunkBytes of weight: small enough to share
// the work out evenly, large enough that claiming it (one atomic operation) costs nothing; the last
// chunks of each thread's run shrink to single tiles (thread_pool.h). A matrix of a single chunk runs
// on the calling thread alone, where waking a helper would cost more than it saves.
constexpr int64_t kChunkBytes = 48 * 1024;

// The pool's thread count: 0 follows torch's (at::get_num_threads()); set_threads(n) pins it, so that
// ATen's own ops can run on one thread while the kernels keep n (cpu_kernels.serial_aten).
std::atomic<int> g_pool_threads{0};

int pool_threads() {
  const int n = g_pool_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : at::get_num_threads();
}

// f over [0, N) in units of `unit` rows, chunks of `per` units claimed from the pool (thread_pool.h);
// on the calling thread alone when there is one chunk or one thread.
template <typename F>
void in_chunks(int64_t N, int64_t unit, int64_t per, const F& f) {
  const int64_t units = (N + unit - 1) / unit;
  const int threads = pool_threads();
  if (units <= per || threads <= 1) return f(0, N);
  struct Job {
    const F* f;
    int64_t unit, N;
  } job{&f, unit, N};
  ThreadPool::instance().run(units, per, threads, [](void* ctx, int64_t u0, int64_t u1) {
    const Job& j = *static_cast<const Job*>(ctx);
    (*j.f)(u0 * j.unit, std::min(j.N, u1 * j.unit));
  }, &job);
}

// Rows a chunk of a linear: whole 16-row tiles, about kChunkBytes of weight.
int64_t chunk_rows(int64_t bytes_per_row) {
  return std::max<int64_t>(16, kChunkBytes / std::max<int64_t>(1, bytes_per_row) / 16 * 16);
}

// A linear's rows in units of 16 (whole tiles).
template <typename F>
void for_rows(int64_t N, int64_t bytes_per_row, const F& f) {
  in_chunks(N, 16, chunk_rows(bytes_per_row) / 16, f);
}

// At most this much of a linear's weight a helper prefetches ahead (its 2 MB L2 on the Xeon we measured
// also holds the stream of the linear it is computing).
constexpr int64_t kMaxPrefetchBytes = 1 << 20;

// Whether prefetch_linear hands the helpers anything (cpu_kernels.set_prefetch; on by default).
std::atomic<bool> g_prefetch{true};

void check_common(const at::Tensor& x, const at::Tensor& w, const char* what) {
  TORCH_CHECK(cpu_has_avx512(), "specqd cpu kernels need AVX-512 (F, BW, DQ, VL); check available() first");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), what, ": CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, what, ": x must have at least one dimension");
  TORCH_CHECK(!(at::GradMode::is_enabled() && x.requires_grad()), what,
              ": no autograd support (call it under torch.no_grad() / inference_mode)");
}

// x (contiguous, float32 or bfloat16, M rows of K) in fp32 with even and odd columns apart, the layout the
// 4-bit kernels read (their low nibbles meet the even columns): in scratch memory, held by `keep` if big.
const float* even_odd_x(const at::Tensor& xc, int64_t M, int64_t K, at::Tensor& keep) {
  float* xp = static_cast<float*>(scratch(M * K * sizeof(float), keep));
  if (xc.scalar_type() == at::kBFloat16)
    prep_even_odd_bf16(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, K, xp);
  else
    prep_even_odd_f32(xc.data_ptr<float>(), M, K, xp, false);
  return xp;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

}  // namespace

namespace {

// The argument checks of the MXFP4 and int4 linears (the exact and the int8 kernels alike).
void check_mxfp4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const char* what) {
  check_common(x, codes, what);
  TORCH_CHECK(codes.scalar_type() == at::kByte && scales.scalar_type() == at::kByte, what,
              ": codes and scales must be uint8");
  TORCH_CHECK(codes.dim() == 2 && scales.dim() == 2, what, ": codes and scales must be 2-D");
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(K % 32 == 0 && scales.size(0) == N && scales.size(1) == K / 32, what, ": scales ", scales.sizes(),
              " do not match codes ", codes.sizes());
  TORCH_CHECK(x.size(-1) == K, what, ": x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(scales.device().is_cpu(), what, ": CPU tensors expected");
}

void check_int4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const char* what) {
  check_common(x, codes, what);
  TORCH_CHECK(codes.scalar_type() == at::kByte, what, ": codes must be uint8");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 || scales.scalar_type() == at::kHalf, what,
              ": scales must be bfloat16 or float16, got ", scales.scalar_type());
  TORCH_CHECK(codes.dim() == 2 && scales.dim() == 2, what, ": codes and scales must be 2-D");
  const int64_t N = codes.size(0), K = codes.size(1) * 2, G = scales.size(1);
  TORCH_CHECK(scales.size(0) == N && G > 0 && K % G == 0 && (K / G) % 32 == 0, what, ": scales ", scales.sizes(),
              " do not match codes ", codes.sizes(), " (groups must be a multiple of 32 wide)");
  TORCH_CHECK(x.size(-1) == K, what, ": x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(scales.device().is_cpu(), what, ": CPU tensors expected");
}

void check_vnni(const char* what) {
  TORCH_CHECK(cpu_has_avx512_vnni(), what, " needs AVX512-VNNI, which this CPU lacks; check vnni_available() first");
}

}  // namespace

// y = x @ W.T with W in MXFP4 (codes [N, K/2], scales [N, K/32], mxfp4.py's layout). x float32 or
// bfloat16 [..., K]; y [..., N] in x's dtype, accumulated in fp32.
at::Tensor mxfp4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  check_mxfp4(x, codes, scales, "mxfp4_linear");
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  const at::Tensor xc = x.contiguous(), cc = codes.contiguous(), sc = scales.contiguous();
  const int64_t M = leading_rows(xc);
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const bool bf16 = x.scalar_type() == at::kBFloat16;

  at::Tensor keep;
  const float* xp = even_odd_x(xc, M, K, keep);
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  const uint8_t* sp = sc.data_ptr<uint8_t>();
  void* yp = y.data_ptr();
  for_rows(N, K / 2 + K / 32, [&](int64_t n0, int64_t n1) { mxfp4_rows(xp, M, K, cp, sp, N, n0, n1, yp, bf16); });
  return y;
}

namespace {

// The packed weight of the int8 kernels (cpu_kernels.pack_i8): codes uint8 [N, K/2] and scales [N, S]
// of `scale_type`, N a multiple of 16 (whole stripes).
void check_packed(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, at::ScalarType scale_type,
                  const char* what) {
  check_common(x, codes, what);
  check_vnni(what);
  TORCH_CHECK(codes.scalar_type() == at::kByte && scales.scalar_type() == scale_type, what, ": packed codes uint8 ",
              "and scales ", scale_type, " expected (cpu_kernels.pack_i8), got ", codes.scalar_type(), " and ",
              scales.scalar_type());
  TORCH_CHECK(codes.dim() == 2 && scales.dim() == 2 && codes.size(0) == scales.size(0), what,
              ": codes and scales must be 2-D with one row per output");
  TORCH_CHECK(codes.size(0) % 16 == 0, what, ": the packed weight has ", codes.size(0),
              " rows, not a multiple of 16 (pack_i8 takes whole stripes)");
  const int64_t K = codes.size(1) * 2, S = scales.size(1);
  TORCH_CHECK(K % 32 == 0 && S > 0 && K % S == 0 && (K / S) % 32 == 0, what, ": scales ", scales.sizes(),
              " do not match codes ", codes.sizes());
  TORCH_CHECK(x.size(-1) == K, what, ": x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(scales.device().is_cpu(), what, ": CPU tensors expected");
  TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous(), what, ": packed weights must be contiguous");
}

// y = x @ W.T, W packed as pack_i8 lays it out, x quantized to int8 per block of 32 (prep_i8): the
// int8-activation kernels (AVX512-VNNI; kernels_vnni.cpp gives the exact maths). Not the bits of
// mxfp4_linear / int4_linear: a level's choice. offset: the weights' unsigned bias (12 MXFP4, 8 int4).
template <typename Rows>
at::Tensor linear_i8(const at::Tensor& x, int64_t N, int64_t K, int32_t offset, int64_t bytes_per_row,
                     const Rows& rows) {
  const at::Tensor xc = x.contiguous();
  const int64_t M = leading_rows(xc);
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  if (M == 0 || N == 0) return y;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor keep;
  uint8_t* xp = static_cast<uint8_t*>(scratch(i8_scratch_bytes(M, K), keep));
  prep_i8(xc.data_ptr(), bf16, M, K, offset, xp);
  void* yp = y.data_ptr();
  for_rows(N, bytes_per_row, [&](int64_t n0, int64_t n1) { rows(xp, M, n0, n1, yp, bf16); });
  return y;
}

}  // namespace

at::Tensor mxfp4_linear_i8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  check_packed(x, codes, scales, at::kByte, "mxfp4_linear_i8");
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  TORCH_CHECK(scales.size(1) == K / 32, "mxfp4_linear_i8: scales ", scales.sizes(), " do not match codes ",
              codes.sizes());
  const uint8_t *cp = codes.data_ptr<uint8_t>(), *sp = scales.data_ptr<uint8_t>();
  return linear_i8(x, N, K, 12, K / 2 + K / 32, [&](const uint8_t* xp, int64_t M, int64_t n0, int64_t n1, void* y,
                                                    bool bf16) { mxfp4_i8_rows(xp, M, K, cp, sp, N, n0, n1, y, bf16); });
}

at::Tensor int4_linear_i8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  check_packed(x, codes, scales, at::kFloat, "int4_linear_i8");
  const int64_t N = codes.size(0), K = codes.size(1) * 2, group = K / scales.size(1);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  return linear_i8(x, N, K, 8, K / 2 + 4 * scales.size(1),
                   [&](const uint8_t* xp, int64_t M, int64_t n0, int64_t n1, void* y, bool bf16) {
                     int4_i8_rows(xp, M, K, group, cp, sp, N, n0, n1, y, bf16);
                   });
}

// Before a linear: gives each helper of the pool the weight rows it will compute first in the linear
// (kind, a, b) that comes next, as block.cpp's kinds say, to prefetch while it waits (thread_pool.h).
// Its run is what ThreadPool::run will hand it: units [U (i + 1) / P, U (i + 2) / P) of 16 rows for
// helper i of P threads, U units in all (for_rows). A weight's rows are contiguous bytes in every
// layout the kernels read (row-major, and pack_i8's 16-row stripes), so the rows' share of each
// tensor's bytes is the right range.
void prefetch_linear(int64_t kind, const at::Tensor& a, const at::Tensor& b) {
  const int threads = pool_threads();
  if (!g_prefetch.load(std::memory_order_relaxed) || threads <= 1 || a.dim() != 2 || !a.is_contiguous() ||
      (kind != 0 && !b.is_contiguous()))
    return;
  const int64_t N = a.size(0), a_row = a.numel() / std::max<int64_t>(1, N) * a.element_size();
  const int64_t b_row = kind == 0 || b.dim() != 2 || b.size(0) != N ? 0 : b.size(1) * b.element_size();
  const int64_t units = (N + 15) / 16;  // for_rows' units and chunks
  if (units <= chunk_rows(a_row + b_row) / 16) return;
  const auto* ap = static_cast<const char*>(a.data_ptr());
  const auto* bp = b_row ? static_cast<const char*>(b.data_ptr()) : nullptr;
  ThreadPool& pool = ThreadPool::instance();
  for (int i = 0; i + 1 < threads; ++i) {
    const int64_t r0 = std::min(N, units * (i + 1) / threads * 16);
    int64_t r1 = std::min(N, units * (i + 2) / threads * 16);
    r1 = std::min(r1, r0 + kMaxPrefetchBytes / (a_row + b_row));
    pool.set_prefetch(i, bp ? bp + r0 * b_row : nullptr, (r1 - r0) * b_row, ap + r0 * a_row, (r1 - r0) * a_row);
  }
}

// y = x @ W.T with W in int4 (codes [N, K/2], scales bf16 or fp16 [N, K/G], int4.py's layout). x float32
// or bfloat16 [..., K]; y [..., N] in x's dtype, accumulated in fp32.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  check_int4(x, codes, scales, "int4_linear");
  const int64_t N = codes.size(0), K = codes.size(1) * 2, G = scales.size(1);
  const at::Tensor xc = x.contiguous(), cc = codes.contiguous(), sc = scales.contiguous();
  const int64_t M = leading_rows(xc);
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const bool bf16 = x.scalar_type() == at::kBFloat16;

  at::Tensor keep;
  const float* xp = even_odd_x(xc, M, K, keep);
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr());
  const bool f16 = scales.scalar_type() == at::kHalf;
  const int64_t group = K / G;
  void* yp = y.data_ptr();
  for_rows(N, K / 2 + 2 * G,
           [&](int64_t n0, int64_t n1) { int4_rows(xp, M, K, group, cp, sp, f16, N, n0, n1, yp, bf16); });
  return y;
}

// The MXFP4 or int4 weight as a float32 [N, K] tensor (the values the kernels multiply by), for long
// forwards: torch's GEMM then does the products. MXFP4 also as bfloat16 (exact), for a bf16 GEMM.
at::Tensor mxfp4_weight(const at::Tensor& codes, const at::Tensor& scales, bool bf16) {
  check_mxfp4(at::empty({0, codes.size(1) * 2}, codes.options().dtype(at::kFloat)), codes, scales, "mxfp4_weight");
  const int64_t N = codes.size(0), K = codes.size(1) * 2;
  const at::Tensor cc = codes.contiguous(), sc = scales.contiguous();
  at::Tensor w = at::empty({N, K}, codes.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const uint8_t *cp = cc.data_ptr<uint8_t>(), *sp = sc.data_ptr<uint8_t>();
  void* wp = w.data_ptr();
  for_rows(N, K / 2 + K / 32, [&](int64_t n0, int64_t n1) { mxfp4_to_float(cp, sp, K, n0, n1, wp, bf16); });
  return w;
}

at::Tensor int4_weight_f32(const at::Tensor& codes, const at::Tensor& scales) {
  check_int4(at::empty({0, codes.size(1) * 2}, codes.options().dtype(at::kFloat)), codes, scales, "int4_weight_f32");
  const int64_t N = codes.size(0), K = codes.size(1) * 2, G = scales.size(1);
  const at::Tensor cc = codes.contiguous(), sc = scales.contiguous();
  at::Tensor w = at::empty({N, K}, codes.options().dtype(at::kFloat));
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr());
  const bool f16 = scales.scalar_type() == at::kHalf;
  float* wp = w.data_ptr<float>();
  for_rows(N, K / 2 + 2 * G, [&](int64_t n0, int64_t n1) { int4_to_f32(cp, sp, f16, K, K / G, n0, n1, wp); });
  return w;
}

// y = x @ W.T with W in bf16 [N, K]. x float32 or bfloat16 [..., K] is rounded to bf16 (nearest even)
// and the bf16 x bf16 products are accumulated in fp32; y [..., N] in x's dtype.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w) {
  check_common(x, w, "bf16_linear");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2, "bf16_linear: w must be a 2-D bfloat16 tensor");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.size(-1) == K, "bf16_linear: x has ", x.size(-1), " features, the weight ", K);

  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = leading_rows(xc);
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t kp = (K + 31) / 32 * 32;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  void* yp = y.data_ptr();

  at::Tensor keep;
  if (bf16_dot_in_use()) {
    uint16_t* xp = static_cast<uint16_t*>(scratch(M * kp * sizeof(uint16_t), keep));
    if (bf16)
      prep_bf16_pairs_bf16(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, K, xp);
    else
      prep_bf16_pairs_f32(xc.data_ptr<float>(), M, K, xp);
    for_rows(N, 2 * K, [&](int64_t n0, int64_t n1) { bf16_rows_dot(xp, M, K, wp, N, n0, n1, yp, bf16); });
  } else {
    float* xp = static_cast<float*>(scratch(M * kp * sizeof(float), keep));
    if (bf16)
      prep_even_odd_bf16(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, K, xp);
    else
      prep_even_odd_f32(xc.data_ptr<float>(), M, K, xp, true);
    for_rows(N, 2 * K, [&](int64_t n0, int64_t n1) { bf16_rows(xp, M, K, wp, N, n0, n1, yp, bf16); });
  }
  return y;
}

// attention_rows over all of a's rows, threaded: threads take whole rows (each row is computed alone,
// so the split does not change a bit); below ~64 K multiply-adds a helper's wake-up would cost more
// than it saves.
void attention_run(const AttentionArgs& a) {
  const int64_t rows = a.B * a.H * a.T, S = a.S;
  auto run = [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> scores;
    thread_local std::vector<int32_t> slots;
    if (static_cast<int64_t>(scores.size()) < S) scores.resize(S), slots.resize(S);
    attention_rows(a, r0, r1, scores.data(), slots.data());
  };
  if (rows * S * a.D < (1 << 16)) return run(0, rows);
  in_chunks(rows, 1, std::max<int64_t>(1, rows / (4 * pool_threads())), run);
}

// torch.argmax(x, dim=-1) for float32 x (contiguous, last dimension not empty): the same indices, NaN
// and ties included (glue_argmax). Why: ATen's argmax is a scalar loop, ~130 us over SmolLM2's 49152
// logits on one thread of the Xeon we measured, once per drafted and per decoded token (2% of an int8
// MXFP4 draft step); this takes ~10 us.
at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(cpu_has_avx512(), "specqd cpu kernels need AVX-512 (F, BW, DQ, VL); check available() first");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1 &&
                  x.size(-1) > 0,
              "argmax: a contiguous float32 CPU tensor with a non-empty last dimension expected");
  const int64_t n = x.size(-1), rows = leading_rows(x);
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  const float* p = x.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) o[r] = glue_argmax(p + r * n, n);
  return out;
}

// Attention of the T new tokens q [B, H, T, D] over the cache k, v [B, KVH, S, D], slots visible where
// mask [T, S] (bool) is true, scaled by `scale`; returns [B, H, T, D] in q's dtype. Every output row is
// computed alone, the same way whatever T (attention_avx512.cpp), so a T-token forward gets exactly the
// attention outputs of T one-token steps.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                     double scale) {
  TORCH_CHECK(cpu_has_avx512(), "specqd cpu kernels need AVX-512 (F, BW, DQ, VL); check available() first");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be [B, heads, T, D]");
  TORCH_CHECK(k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(), "attention: k and v differ");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KVH = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "attention: q ", q.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "attention: ", H, " query heads for ", KVH, " kv heads");
  TORCH_CHECK(D % 16 == 0 && D > 0 && D <= 256, "attention: head_dim must be a multiple of 16 up to 256");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && (t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16),
                "attention: CPU float32 or bfloat16 tensors expected");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == T && mask.size(1) == S,
              "attention: mask must be bool [T, S] = [", T, ", ", S, "], got ", mask.sizes());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), mc = mask.contiguous();
  at::Tensor out = at::empty({B, H, T, D}, q.options().dtype(at::kFloat));
  AttentionArgs a{qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), reinterpret_cast<const uint8_t*>(mc.data_ptr()),
                  out.data_ptr<float>(), B, H, KVH, T, S, D, S, static_cast<float>(scale),
                  q.scalar_type() == at::kBFloat16, k.scalar_type() == at::kBFloat16};
  attention_run(a);
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

}  // namespace specqd_cpu

// The same functions as torch operators (torch.ops.specqd_cpu.*), for torch.compile: the Python side
// registers their shape functions (fake kernels). Eager code calls the pybind functions below, which
// skip the dispatcher.
#ifndef SPECQD_NO_TORCH_LIBRARY  // defined only to load several builds into one process (A/B timing)
TORCH_LIBRARY(specqd_cpu, m) {
  m.def("mxfp4_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("mxfp4_linear_i8(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("int4_linear_i8(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor freqs) -> Tensor");
}
TORCH_LIBRARY_IMPL(specqd_cpu, CPU, m) {
  m.impl("mxfp4_linear", &specqd_cpu::mxfp4_linear);
  m.impl("int4_linear", &specqd_cpu::int4_linear);
  m.impl("mxfp4_linear_i8", &specqd_cpu::mxfp4_linear_i8);
  m.impl("int4_linear_i8", &specqd_cpu::int4_linear_i8);
  m.impl("bf16_linear", &specqd_cpu::bf16_linear);
  m.impl("attention", &specqd_cpu::attention);
  m.impl("rms_norm", &specqd_cpu::rms_norm);
  m.impl("rope", &specqd_cpu::rope);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace specqd_cpu;
  m.def("mxfp4_linear", &mxfp4_linear, "y = x @ W.T, W in MXFP4 (codes, scales)", py::arg("x"), py::arg("codes"),
        py::arg("scales"));
  m.def("int4_linear", &int4_linear, "y = x @ W.T, W in int4 (codes, bf16/fp16 group scales)", py::arg("x"),
        py::arg("codes"), py::arg("scales"));
  m.def("mxfp4_linear_i8", &mxfp4_linear_i8, "y = x @ W.T, W in MXFP4, x quantized to int8 per block of 32",
        py::arg("x"), py::arg("codes"), py::arg("scales"));
  m.def("int4_linear_i8", &int4_linear_i8, "y = x @ W.T, W in int4, x quantized to int8 per block of 32",
        py::arg("x"), py::arg("codes"), py::arg("scales"));
  m.def("argmax", &argmax, "torch.argmax(x, dim=-1) of a contiguous float32 tensor", py::arg("x"));
  m.def("bf16_linear", &bf16_linear, "y = x @ W.T, W in bf16, x rounded to bf16", py::arg("x"), py::arg("w"));
  m.def("mxfp4_weight", &mxfp4_weight, "an MXFP4 weight decoded to float32 or (exactly) bfloat16 [N, K]",
        py::arg("codes"), py::arg("scales"), py::arg("bf16"));
  m.def("int4_weight_f32", &int4_weight_f32, "an int4 weight decoded to float32 [N, K]", py::arg("codes"),
        py::arg("scales"));
  m.def("attention", &attention, "softmax(q k^T * scale, mask) v over a KV cache", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("mask"), py::arg("scale"));
  m.def("rms_norm", &rms_norm, "model.py's RMSNorm in one call", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("rope", &rope, "model.py's apply_rope in one call", py::arg("x"), py::arg("freqs"));
  m.def("block", &block, "model.py's TransformerBlock (cached path) in one call");
  bind_stack(m);
  m.def("set_prefetch", [](bool on) { g_prefetch.store(on); }, "whether idle helpers prefetch the next linear's rows");
  m.def("set_threads", [](int n) { g_pool_threads.store(n > 0 ? n : 0); }, "the pool's threads; 0: torch's");
  m.def("pool_threads", &pool_threads, "the threads the kernels use");
  m.def("copy_slots", &copy_slots, "cache slots [start, end) of every src into dst", py::arg("dst"), py::arg("src"),
        py::arg("start"), py::arg("end"));
  m.def("cpu_has_avx512", &cpu_has_avx512);
  m.def("cpu_has_avx512_bf16", &cpu_has_avx512_bf16);
  m.def("cpu_has_avx512_vnni", &cpu_has_avx512_vnni);
  m.def("built_with_bf16_dot", &built_with_bf16_dot);
  m.def("bf16_dot_in_use", &bf16_dot_in_use);
  m.def("set_bf16_dot_mode", [](int mode) { g_bf16_dot_mode = mode <= 0 ? 0 : mode >= 2 ? 2 : 1; });
}
