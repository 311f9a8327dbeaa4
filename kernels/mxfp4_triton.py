"""y = x @ W.T with W in MXFP4 (weight-only): the draft model's matmul on CUDA.

x [M, K] is bf16, fp16 or fp32; W is stored as in mxfp4.py: codes uint8 [N, K/2] (element 2i in the
low nibble of byte i, 2i+1 in the high nibble), scales uint8 [N, K/32] (E8M0, 2^(s - 127) per block
of 32). The result is [M, N] in x's dtype, accumulated in fp32. This module imports nothing of the
project: mxfp4.py imports it, never the other way round.

Design. Decoding reads every weight once, so for small M the matmul is memory-bound and the goal is
to stream the 0.53 bytes per weight at copy speed. One kernel serves every M. A program computes a
[BLOCK_M, BLOCK_N] tile of y over a slice of K; per K tile it loads a [BLOCK_N, BLOCK_K] weight tile
(BLOCK_K/2 code bytes and BLOCK_K/32 scales per row), decodes it in registers and uses it for all
BLOCK_M rows of x, so the weight is read once whatever M is.
  - M = 1 (decode): BLOCK_M = 1, no tensor cores: multiply-add elementwise into a per-position
    accumulator, reduce once after the K loop (a GEMV).
  - M = 2..16 (verifying k drafted tokens): BLOCK_M = 16 with tl.dot (mma); rows past M are masked
    (no memory traffic), so M = 16 costs about what M = 2 does.
  - M > 16 (prefill): the same code as a tiled GEMM, BLOCK_M 32/64/128 (wgmma on Hopper).
  - split-K: when there are too few output tiles to fill the GPU (N = 4096 with M = 1 gives 256
    tiles of 16 columns for 132 SMs), the K range is split over several programs that write fp32
    partial sums, and a small second kernel adds them in a fixed order (deterministic) and casts.
Hopper has no FP4 tensor cores, so the weight is decoded to fp32 with integer bit operations (no
lookup table, no int-to-float conversion) and multiplied by the block scale; on the tl.dot path it
is then cast to x's dtype (exact: an MXFP4 value has 2 significant bits) for an mma with fp32
accumulation.

The element order needs no shuffle: instead of interleaving low and high nibbles back into K order,
x is split into its even and odd columns (a register split of a contiguous load); the low nibbles
meet the even columns, the high nibbles the odd ones.

Cost, read from the sm_90 SASS of the main loop (compiled without a GPU): about 8.5 instructions per
weight for M = 1 and 9 for the mma path (shift/shift/lop3 to build the fp32 bits, two multiplies
(2^126 and the scale), one fma or half a bf16 pack, plus addressing), i.e. roughly 2 TB/s of codes
at H100 issue rate: the decode, not DRAM, may be the limit. See scripts/bench_kernels.py.

The configurations are a heuristic, not autotuned (the interpreter tests must stay fast and the
choice deterministic); scripts/bench_kernels.py --sweep measures alternatives on a GPU.

torch.compile: `mxfp4_linear` is a torch.library.triton_op, so Inductor sees the Triton kernels and
launches them itself (no graph break, CUDA-graph friendly). Under TRITON_INTERPRET=1 the kernels are
Python functions that cannot be traced, so there it is a plain custom_op with a shape-only fake.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# SPECQD_MXFP4_CUSTOM_OP=1 registers the op as an opaque custom_op even on a GPU: an escape hatch
# should Inductor fail to compile the triton_op on some torch/triton version.
_OPAQUE_OP = _INTERPRET or os.environ.get("SPECQD_MXFP4_CUSTOM_OP", "0") == "1"


@triton.jit
def _e2m1_to_fp32(nibble):
    """The E2M1 value of the low 4 bits of `nibble` (uint32), without a lookup table.

    The code's two exponent bits and its mantissa bit go where fp32 keeps its exponent's two lowest
    bits and its first mantissa bit (bits 24-23 and 22), the sign to bit 31. Read as fp32 that is the
    E2M1 value times 2^-126 exactly, because E2M1's exponent bias is 1 and fp32's 127, and E2M1's
    subnormal 0.5 (exponent bits 00) lands on an fp32 subnormal with the same mantissa. One multiply
    by 2^126 restores the value (fp32 multiplies keep subnormals: Triton does not flush them).
    """
    bits = ((nibble & 0x7) << 22) | ((nibble & 0x8) << 28)
    return bits.to(tl.float32, bitcast=True) * 2.0**126


@triton.jit
def _e8m0_to_fp32(s):
    """2^(s - 127) from the fp32 bits (exponent field = s). s = 0 is 2^-127, an fp32 subnormal whose
    only set bit is bit 22, hence the maximum. (s = 255, E8M0's NaN, is never produced by the cast.)"""
    bits = tl.maximum(s.to(tl.uint32) << 23, 0x400000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_matmul_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    out_ptr,  # y [M, N] in x's dtype, or fp32 partial sums [SPLIT_K, M, N] when SPLIT_K > 1
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_cn,
    stride_sn,
    stride_om,
    stride_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    GROUPS: tl.constexpr = BLOCK_K // 32  # MXFP4 blocks per tile row
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    offs_byte = tl.arange(0, 16)  # the 16 code bytes of one block
    offs_elem = tl.arange(0, 32)  # the 32 elements of one block
    m_ok = offs_m < M
    n_ok = offs_n < N
    # int64 row offsets: a vocabulary head has N * K/2 close to 2^31 bytes.
    code_rows = codes_ptr + offs_n.to(tl.int64)[:, None, None] * stride_cn
    scale_rows = scales_ptr + offs_n.to(tl.int64)[:, None] * stride_sn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm

    # This program's share of the K tiles.
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The GEMV path (BLOCK_M = 1) keeps one partial sum per weight position of the tile and adds
    # them up once after the loop: any reduction inside the loop costs cross-thread shuffles on
    # every tile (Triton spreads a block's 32 elements over several threads).
    acc_gemv = tl.zeros((BLOCK_N, GROUPS, 16), dtype=tl.float32)
    for t in range(first, last):
        groups = t * GROUPS + offs_g  # global block indices of this tile
        g_ok = groups < K // 32  # K is a multiple of 32 but maybe not of BLOCK_K

        # Weight tile as [BLOCK_N, GROUPS, 16] bytes, so that each block's scale broadcasts over
        # its bytes. Masked bytes read as code 0, the value 0.
        w_mask = n_ok[:, None, None] & g_ok[None, :, None]
        codes = tl.load(
            code_rows + (groups[None, :, None] * 16 + offs_byte[None, None, :]), mask=w_mask, other=0
        )
        s = tl.load(scale_rows + groups[None, :], mask=n_ok[:, None] & g_ok[None, :], other=127)
        scale = _e8m0_to_fp32(s)[:, :, None]
        codes = codes.to(tl.uint32)
        w_even = _e2m1_to_fp32(codes) * scale  # elements 2j of each block: the low nibbles
        w_odd = _e2m1_to_fp32(codes >> 4) * scale  # elements 2j + 1: the high nibbles

        # x tile as [BLOCK_M, GROUPS, 32], loaded contiguously, then split into its even and odd
        # columns (a register split): the low nibbles meet the even columns, the high nibbles the
        # odd ones, so the weight never needs interleaving.
        k_idx = groups[None, :, None] * 32 + offs_elem[None, None, :]
        x = tl.load(x_rows + k_idx * stride_xk, mask=m_ok[:, None, None] & g_ok[None, :, None], other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, GROUPS, 16, 2)))

        if USE_DOT:
            # mma on x's dtype: the decoded weights are exact in bf16/fp16 (fp16 can overflow at
            # extreme scales, exactly as dequantize(..., fp16) does); fp32 x uses full fp32 ("ieee").
            # DOT_IN_FP32 (the interpreter, whose tl.dot mishandles bf16) computes the same exact
            # products in fp32.
            dot_dtype: tl.constexpr = tl.float32 if DOT_IN_FP32 else x.dtype
            w_even = tl.reshape(w_even, (BLOCK_N, BLOCK_K // 2)).to(dot_dtype)
            w_odd = tl.reshape(w_odd, (BLOCK_N, BLOCK_K // 2)).to(dot_dtype)
            x_even = tl.reshape(x_even, (BLOCK_M, BLOCK_K // 2)).to(dot_dtype)
            x_odd = tl.reshape(x_odd, (BLOCK_M, BLOCK_K // 2)).to(dot_dtype)
            acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision="ieee")
            acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision="ieee")
        else:
            x_even = tl.reshape(x_even, (GROUPS, 16)).to(tl.float32)[None, :, :]
            x_odd = tl.reshape(x_odd, (GROUPS, 16)).to(tl.float32)[None, :, :]
            acc_gemv += w_even * x_even  # two statements: two fused multiply-adds
            acc_gemv += w_odd * x_odd

    if not USE_DOT:
        acc = tl.reshape(tl.sum(tl.sum(acc_gemv, axis=2), axis=1), (BLOCK_M, BLOCK_N))

    out = out_ptr + pid_k * stride_split + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum over the SPLIT_K fp32 partial results, added in a fixed order, cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + i * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options of one call. block_k is a multiple of 32 (whole MXFP4 blocks);
    use_dot needs block_m, block_n >= 16 (tl.dot's minimum); the GEMV path (use_dot=False) is for
    block_m = 1. All block sizes are powers of two."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 2


def _split_k(m: int, n_programs: int, k: int, block_k: int, sm_count: int) -> int:
    """How many K slices: enough programs for ~4 per SM, each slice at least 2 tiles long, and the
    fp32 partial sums (8*M bytes per output column: written, then read back) under a quarter of the
    weight bytes (~0.53*K per column)."""
    k_tiles = triton.cdiv(k, block_k)
    max_split = max(1, min(k_tiles // 2, int(0.25 * 0.53 * k / (8 * m))))
    split = 1
    while n_programs * split < 4 * sm_count and split * 2 <= max_split:
        split *= 2
    return split


@functools.lru_cache(maxsize=256)
def pick_config(m: int, n: int, k: int, sm_count: int = 132, fp32: bool = False) -> Config:
    """The heuristic configuration for an [m, k] x [n, k]^T product (see the module docstring).
    fp32: x is fp32, whose tl.dot runs on FMA units ("ieee") and spills registers in big tiles."""
    # Tile sizes picked from the compiled sm_90 SASS: no spills, registers <= ~110 for small M
    # (occupancy), the fewest instructions per weight; to be confirmed by the sweep on a GPU.
    if m == 1:
        cfg = Config(block_m=1, block_n=16, block_k=256, use_dot=False, num_warps=4)
    elif m <= 16:
        cfg = Config(block_m=16, block_n=64, block_k=128, use_dot=True, num_warps=4, num_stages=3)
    elif m <= 64 or fp32:
        cfg = Config(block_m=min(triton.next_power_of_2(m), 32 if fp32 else 64), block_n=64, block_k=128,
                     num_warps=4, num_stages=3)  # fmt: skip
    else:
        cfg = Config(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)
    n_programs = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split = _split_k(m, n_programs, k, cfg.block_k, sm_count)
    return Config(**{**cfg.__dict__, "split_k": split})


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter (or tracing without a GPU): an H100's count keeps the GPU's choices


def _traceable(kernel):
    """The kernel as torch.compile can see it (wrap_triton), except in the interpreter."""
    return kernel if _INTERPRET else torch.library.wrap_triton(kernel)


def _check_inputs(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    if x.dim() != 2 or codes.dim() != 2 or scales.dim() != 2:
        raise ValueError("mxfp4_linear takes x [M, K], codes [N, K/2] and scales [N, K/32]")
    k = x.shape[1]
    if k % 32 or codes.shape[1] * 2 != k or scales.shape != (codes.shape[0], k // 32):
        shapes = f"x {tuple(x.shape)}, codes {tuple(codes.shape)}, scales {tuple(scales.shape)}"
        raise ValueError(f"shapes do not match: {shapes}")
    if x.dtype not in KERNEL_DTYPES or codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"mxfp4_linear takes bf16/fp16/fp32 x and uint8 codes/scales, got {x.dtype}")


def launch(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, config: Config | None = None):
    """y = x @ dequantize(codes, scales).T with a given Config (None: the heuristic's). Tests and the
    benchmark call this directly to try configurations; models go through `mxfp4_linear`."""
    _check_inputs(x, codes, scales)
    m, k = x.shape
    n = codes.shape[0]
    codes, scales = codes.contiguous(), scales.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if config is None:
        config = pick_config(m, n, k, _sm_count(x.device), x.dtype == torch.float32)
    dot_ok = min(config.block_m, config.block_n) >= 16 if config.use_dot else config.block_m == 1
    if config.block_k % 32 or not dot_ok:
        raise ValueError(
            f"invalid config {config}: block_k must be a multiple of 32, use_dot needs "
            "block_m and block_n >= 16, the GEMV path block_m == 1"
        )

    split = min(config.split_k, triton.cdiv(k, config.block_k))
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), split)
    _traceable(_mxfp4_matmul_kernel)[grid](
        x,
        codes,
        scales,
        target,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        codes.stride(0),
        scales.stride(0),
        n,  # row stride of the output (and of each partial-sum slice)
        m * n,  # distance between partial-sum slices
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=split,
        USE_DOT=config.use_dot,
        DOT_IN_FP32=_INTERPRET,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return _sum_splits(target, out, split)


def _mxfp4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return launch(x, codes, scales)


def _sum_splits(target: torch.Tensor, out: torch.Tensor, split: int) -> torch.Tensor:
    """out = the sum of split-K's fp32 partial products target [split, M, N] (target is out itself when
    split is 1). Shared with int4_triton.py."""
    if split > 1:
        block = 1024
        _traceable(_sum_splits_kernel)[(triton.cdiv(out.numel(), block),)](
            target, out, out.numel(), SPLIT_K=split, BLOCK=block, num_warps=4
        )
    return out


def register_op(name: str, fn):
    """fn(x, codes, scales) -> y [M, N] as the operator specqd::name (see the module docstring): a
    triton_op, or an opaque custom_op with a shape-only fake under the interpreter or
    SPECQD_MXFP4_CUSTOM_OP=1. Shared with int4_triton.py."""
    if not _OPAQUE_OP:
        return torch.library.triton_op(f"specqd::{name}", fn, mutates_args=())
    op = torch.library.custom_op(f"specqd::{name}", fn, mutates_args=())

    @op.register_fake
    def _(x, codes, scales):
        return x.new_empty((x.shape[0], codes.shape[0]))

    return op


mxfp4_linear = register_op("mxfp4_linear", _mxfp4_linear)

mxfp4_linear.__doc__ = """y [M, N] = x [M, K] @ W.T, W given as MXFP4 codes [N, K/2] and scales [N, K/32];
y has x's dtype (bf16, fp16 or fp32), accumulated in fp32."""
