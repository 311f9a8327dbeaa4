// The raw kernels: plain pointers, no torch. ops.cpp (the torch glue) calls them.
//
// They live in their own translation unit, compiled for AVX-512 through per-function target
// attributes, so that no inline function shared with the rest of the extension (torch, the standard
// library) is ever emitted with AVX-512 instructions: the glue runs on any x86-64 CPU, and only
// calls into this file after checking the CPU at run time.
#pragma once

#include <cstdint>

namespace specqd_cpu {

// What the CPU and the OS support, checked once (cpuid + xgetbv, through the compiler's builtins).
bool cpu_has_avx512();       // AVX-512 F + BW + DQ + VL: every kernel needs these
bool cpu_has_avx512_bf16();  // vdpbf16ps
bool cpu_has_avx512_vnni();  // vpdpbusd: the int8-activation kernels (kernels_vnni.cpp)

// ---- activations: x [M, K] in, a per-call scratch layout out --------------------------------
//
// The kernels read x per block of 32 elements of K, in the order that matches the weight decode:
// the 16 even elements of the block (x[32j], x[32j+2], ..., x[32j+30]), then its 16 odd ones.
// `xp` holds M * kp floats, kp = round_up(K, 32), zero-padded, 64-byte aligned, laid out per chunk of
// 16 rows (the kernels' tile height) as [block][row in chunk][32]: chunk c starts at 16 * c * kp.
// round_bf16: round each element to bf16 first (nearest even), as bf16_linear does.
void prep_even_odd_f32(const float* x, int64_t M, int64_t K, float* xp, bool round_bf16);
void prep_even_odd_bf16(const uint16_t* x, int64_t M, int64_t K, float* xp);
// The layout of the vdpbf16ps path: x rounded to bf16, natural order within a block, otherwise as above
// (uint16 elements).
void prep_bf16_pairs_f32(const float* x, int64_t M, int64_t K, uint16_t* xp);
void prep_bf16_pairs_bf16(const uint16_t* x, int64_t M, int64_t K, uint16_t* xp);

// ---- the kernels: output rows [n0, n1) of y [M, N] = x [M, K] @ W.T -------------------------
//
// Each output y[m, n] is computed by the same sequence of floating-point operations whatever M,
// [n0, n1) and the tiling are (see kernels_avx512.cpp), so results are bit-identical across M and
// across thread counts. y is fp32 (y_bf16 = false) or bf16 (rounded to nearest even), row stride N.

// W in MXFP4: codes [N, K/2] (element 2i in the low nibble), scales [N, K/32] (E8M0). K % 32 == 0.
void mxfp4_rows(const float* xp, int64_t M, int64_t K, const uint8_t* codes, const uint8_t* scales,
                int64_t N, int64_t n0, int64_t n1, void* y, bool y_bf16);

// W in int4 (int4.py): codes [N, K/2] as MXFP4's, a nibble c meaning c - 8; scales [N, K/group] as raw
// bf16 bits, or fp16 bits when scales_f16. group % 32 == 0, K % group == 0.
void int4_rows(const float* xp, int64_t M, int64_t K, int64_t group, const uint8_t* codes, const uint16_t* scales,
               bool scales_f16, int64_t N, int64_t n0, int64_t n1, void* y, bool y_bf16);

// W in bf16 [N, K] (as raw uint16 bits), any K; xp from prep_even_odd_* with round_bf16.
void bf16_rows(const float* xp, int64_t M, int64_t K, const uint16_t* w, int64_t N, int64_t n0,
               int64_t n1, void* y, bool y_bf16);

// The same with vdpbf16ps (needs avx512_bf16); xp from prep_bf16_pairs_*.
void bf16_rows_dot(const uint16_t* xp, int64_t M, int64_t K, const uint16_t* w, int64_t N, int64_t n0,
                   int64_t n1, void* y, bool y_bf16);

// The weight rows [n0, n1) decoded to fp32 (MXFP4 also to bf16, exactly), w [N, K] row-major (natural
// order): for long forwards, whose products then go to torch's GEMM. The values are exactly the ones
// the kernels multiply by.
void mxfp4_to_float(const uint8_t* codes, const uint8_t* scales, int64_t K, int64_t n0, int64_t n1, void* w,
                    bool bf16);
void int4_to_f32(const uint8_t* codes, const uint16_t* scales, bool scales_f16, int64_t K, int64_t group,
                 int64_t n0, int64_t n1, float* w);

// Whether this build contains the vdpbf16ps kernel (the compiler knew the instruction).
bool built_with_bf16_dot();

// ---- int8 activations, AVX512-VNNI (kernels_vnni.cpp; call only when cpu_has_avx512_vnni()) ------
//
// x [M, K] (fp32, or bf16 bits when x_bf16; K % 32 == 0) quantized to int8 per block of 32 with one fp32
// scale each: i8_row_bytes(K) bytes a row (kernels_vnni.cpp describes the layout), xp 64-byte aligned.
// offset: 12 for the MXFP4 kernel, 8 for int4 (the bias of their unsigned weight bytes, taken back out
// per block).
int64_t i8_row_bytes(int64_t K);
int64_t i8_scratch_bytes(int64_t M, int64_t K);
void prep_i8(const void* x, bool x_bf16, int64_t M, int64_t K, int32_t offset, uint8_t* xp);
// Output rows [n0, n1) of y [M, N] (n0, n1, N multiples of 16), the weights packed in stripes of 16
// rows (cpu_kernels.pack_i8): codes [N, K/2] bytes; MXFP4 scales [N, K/32] E8M0 bytes, int4 scales
// [N, K/group] fp32. Bit-identical across M, row ranges and threads, as the exact kernels.
void mxfp4_i8_rows(const uint8_t* xp, int64_t M, int64_t K, const uint8_t* codes, const uint8_t* scales,
                   int64_t N, int64_t n0, int64_t n1, void* y, bool y_bf16);
void int4_i8_rows(const uint8_t* xp, int64_t M, int64_t K, int64_t group, const uint8_t* codes, const float* scales,
                  int64_t N, int64_t n0, int64_t n1, void* y, bool y_bf16);

}  // namespace specqd_cpu

namespace specqd_cpu {

// ---- attention of T new tokens over the KV cache (attention_avx512.cpp) ----------------------
// q [B, H, T, D], k and v [B, KVH, S, D] (contiguous; fp32 or bf16 bits), mask [T, S] bytes (nonzero =
// visible, row stride mask_stride), out [B, H, T, D] fp32. D % 16 == 0, D <= 256, H % KVH == 0.
struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* mask;
  float* out;
  int64_t B, H, KVH, T, S, D, mask_stride;
  float scale;
  bool q_bf16, kv_bf16;
};
// Output rows [r0, r1) of the B * H * T rows; scratch: S floats and S int32 per calling thread.
void attention_rows(const AttentionArgs& a, int64_t r0, int64_t r1, float* scores, int32_t* slots);

// ---- the fused block's elementwise glue (glue_avx512.cpp) ----------------------------------------
// scalar.h's loops 16 elements at a time, the same bits; n elements, fp32 or bf16 (bf16 = true) each.
void glue_add(const void* a, const void* b, void* out, int64_t n, bool bf16);  // out = a + b (out may be b)
void glue_mul(const void* a, const void* b, void* out, int64_t n, bool bf16);  // out = a * b (out may be a)
void glue_convert(const void* src, bool src_bf16, void* dst, bool dst_bf16, int64_t n);  // dst = src, rounded
// scalar::rms_norm_row with x, w and y all of one dtype
void glue_norm(const void* x, const void* w, int64_t C, float eps, void* y, bool bf16);
// scalar::rope_row, its results (rounded to x's dtype) stored in out's dtype
void glue_rope(const void* x, const float* f, int64_t half, void* out, bool x_bf16, bool out_bf16);
// torch.argmax of x[0, n) (n > 0): the first NaN, else the first index of the maximum
int64_t glue_argmax(const float* x, int64_t n);

}  // namespace specqd_cpu
