"""y = x @ W.T with W in int4 (weight-only, W4A16): Int4Linear's matmul on CUDA.

x [M, K] is bf16, fp16 or fp32; W is stored as in int4.py: codes uint8 [N, K/2] (q + 8 per nibble,
element 2i in the low nibble of byte i, 2i+1 in the high nibble), scales bf16 or fp16 [N, K/G], one per
group of G elements of K (G a multiple of 32 dividing K, read from the shapes). The result is [M, N] in
x's dtype, accumulated in fp32. This module imports nothing of the project but kernels/mxfp4_triton.py,
whose split-K reduction, launch helpers and registration switches it shares; int4.py imports it.

Design: the one of mxfp4_triton.py (read its docstring first): one kernel for every M, a program
computes a [BLOCK_M, BLOCK_N] tile of y over a slice of K and decodes each [BLOCK_N, BLOCK_K] weight
tile once for all its rows of x; a GEMV path for M = 1, tl.dot for M = 2..16 (BLOCK_M = 16, masked
rows cost nothing) and a tiled GEMM above; split-K when there are too few output tiles; x split into
its even and odd columns instead of interleaving the nibbles. What the format changes:
  - A K tile lies inside one group: BLOCK_K divides G, which divides K. So a tile has one scale per
    weight row, and no tile is partial (no mask along K).
  - Decode: nibble c becomes the fp32 number q = c - 8 by bit operations, no int-to-float conversion:
    c | 0x4B000000 is the fp32 number 2^23 + c, and subtracting 2^23 + 8 is exact.
  - GEMV: w = q * scale (exact in fp32: a 4-bit integer times a scale of at most 11 significant bits),
    multiply-added elementwise into a per-position accumulator, reduced once after the K loop.
  - tl.dot: the mma multiplies x by q itself (small integers: exact in bf16 and fp16), accumulating
    in fp32, and the tile's result is multiplied by each row's scale before it is added to the
    accumulator ("scale after the dot", the usual way for grouped weights). Decoding to q * scale in
    x's dtype instead, as the MXFP4 kernel may (its products have 2 significant bits), would round the
    weight here: a bf16 scale times q has up to 11 significant bits, bf16 keeps 8.
Per weight the decode is an and/or pair (which may fuse into one lop3) and a subtract, plus a multiply by
the scale on the GEMV path: about the MXFP4 decode's count. With G = 32 the K tile is only 32 wide;
G = 64 or 128 (GPTQ's usual) gives the tile sizes of the MXFP4 kernel. The configurations are the
MXFP4 kernel's heuristic; this kernel has only run under the interpreter so far (no GPU was at hand):
compile, time and sweep it on one before relying on its speed.

torch.compile: as for mxfp4_linear, `int4_linear` is a torch.library.triton_op (Inductor launches the
Triton kernels itself), and under TRITON_INTERPRET=1 (or SPECQD_MXFP4_CUSTOM_OP=1, the escape hatch
shared with the MXFP4 op) a plain custom_op with a shape-only fake.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.mxfp4_triton import (
    _INTERPRET,
    KERNEL_DTYPES,
    Config,
    _sm_count,
    _split_k,
    _sum_splits,
    _traceable,
    register_op,
)

__all__ = ["KERNEL_DTYPES", "Config", "int4_linear", "launch", "pick_config"]

SCALE_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _int4_to_fp32(nibble):
    """q = nibble - 8 as fp32, for the low 4 bits of `nibble` (uint32): 2^23 + nibble from the bits
    (fp32 integers in [2^23, 2^24) have unit spacing), then minus 2^23 + 8, exact."""
    bits = (nibble & 0xF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _scale_to_fp32(s, SCALE_BF16: tl.constexpr):
    """A bf16 or fp16 scale as fp32, exactly. bf16 from its bits (the top half of an fp32), which
    keeps subnormal scales that the interpreter's bf16 conversion flushes to zero; fp16 converted."""
    if SCALE_BF16:
        return (s.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return s.to(tl.float32)


@triton.jit
def _int4_matmul_kernel(
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
    GROUP: tl.constexpr,
    SCALE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_byte = tl.arange(0, BLOCK_K // 2)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # int64 row offsets: a vocabulary head has N * K/2 close to 2^31 bytes.
    code_rows = codes_ptr + offs_n.to(tl.int64)[:, None] * stride_cn
    scale_rows = scales_ptr + offs_n.to(tl.int64) * stride_sn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    # This program's share of the K tiles (all full: BLOCK_K divides GROUP, which divides K).
    k_tiles = K // BLOCK_K
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = pid_k * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The GEMV path keeps one partial sum per weight position and adds them up once after the loop
    # (a reduction inside the loop would cost cross-thread shuffles on every tile).
    acc_gemv = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    for t in range(first, last):
        # Weight tile [BLOCK_N, BLOCK_K/2] bytes and its one scale per row. Masked rows read code
        # 0x88 (q = 0) and scale 0.
        codes = tl.load(code_rows + (t * (BLOCK_K // 2) + offs_byte[None, :]), mask=n_ok[:, None], other=0x88)
        scale = _scale_to_fp32(tl.load(scale_rows + (t * BLOCK_K) // GROUP, mask=n_ok, other=0.0), SCALE_BF16)
        codes = codes.to(tl.uint32)
        q_even = _int4_to_fp32(codes)  # elements 2j of the tile: the low nibbles
        q_odd = _int4_to_fp32(codes >> 4)  # elements 2j + 1: the high nibbles

        # x tile [BLOCK_M, BLOCK_K], loaded contiguously, then split into its even and odd columns (a
        # register split): the low nibbles meet the even columns, the high nibbles the odd ones.
        k_idx = t * BLOCK_K + offs_k[None, :]
        x = tl.load(x_rows + k_idx * stride_xk, mask=m_ok[:, None], other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))

        if USE_DOT:
            # q is exact in every dot dtype; DOT_IN_FP32 (the interpreter, whose tl.dot mishandles
            # bf16) computes the same exact products in fp32; fp32 x uses full fp32 ("ieee").
            dot_dtype: tl.constexpr = tl.float32 if DOT_IN_FP32 else x.dtype
            part = tl.dot(x_even.to(dot_dtype), tl.trans(q_even.to(dot_dtype)), input_precision="ieee")
            part = tl.dot(x_odd.to(dot_dtype), tl.trans(q_odd.to(dot_dtype)), part, input_precision="ieee")
            acc += part * scale[None, :]
        else:
            x_even = tl.reshape(x_even, (BLOCK_K // 2,)).to(tl.float32)[None, :]
            x_odd = tl.reshape(x_odd, (BLOCK_K // 2,)).to(tl.float32)[None, :]
            acc_gemv += (q_even * scale[:, None]) * x_even  # two statements: two fused multiply-adds
            acc_gemv += (q_odd * scale[:, None]) * x_odd

    if not USE_DOT:
        acc = tl.reshape(tl.sum(acc_gemv, axis=1), (BLOCK_M, BLOCK_N))

    out = out_ptr + pid_k * stride_split + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _block_k(group: int, cap: int) -> int:
    """The largest power of two <= cap that divides the group size (at least 32: G % 32 == 0)."""
    return min(cap, group & -group)


@functools.lru_cache(maxsize=256)
def pick_config(m: int, n: int, k: int, group: int, sm_count: int = 132, fp32: bool = False) -> Config:
    """The heuristic configuration for an [m, k] x [n, k]^T product with groups of `group`: the MXFP4
    kernel's choices (mxfp4_triton.pick_config), with block_k cut to a divisor of the group size."""
    if m == 1:
        cfg = Config(block_m=1, block_n=16, block_k=_block_k(group, 256), use_dot=False, num_warps=4)
    elif m <= 16:
        cfg = Config(block_m=16, block_n=64, block_k=_block_k(group, 128), num_warps=4, num_stages=3)
    elif m <= 64 or fp32:
        cfg = Config(block_m=min(triton.next_power_of_2(m), 32 if fp32 else 64), block_n=64,
                     block_k=_block_k(group, 128), num_warps=4, num_stages=3)  # fmt: skip
    else:
        cfg = Config(block_m=128, block_n=128, block_k=_block_k(group, 128), num_warps=8, num_stages=3)
    n_programs = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)
    split = _split_k(m, n_programs, k, cfg.block_k, sm_count)
    return Config(**{**cfg.__dict__, "split_k": split})


def _check_inputs(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> int:
    """The group size, after checking the arguments."""
    if x.dim() != 2 or codes.dim() != 2 or scales.dim() != 2:
        raise ValueError("int4_linear takes x [M, K], codes [N, K/2] and scales [N, K/G]")
    k, n_groups = x.shape[1], scales.shape[1]
    if (
        codes.shape[1] * 2 != k
        or scales.shape[0] != codes.shape[0]
        or n_groups == 0
        or k % n_groups
        or (k // n_groups) % 32
    ):
        shapes = f"x {tuple(x.shape)}, codes {tuple(codes.shape)}, scales {tuple(scales.shape)}"
        raise ValueError(f"shapes do not match (groups must be a multiple of 32 wide): {shapes}")
    if x.dtype not in KERNEL_DTYPES or codes.dtype != torch.uint8 or scales.dtype not in SCALE_DTYPES:
        raise TypeError(
            f"int4_linear takes bf16/fp16/fp32 x, uint8 codes and bf16/fp16 scales, got {x.dtype}, "
            f"{codes.dtype}, {scales.dtype}"
        )
    return k // n_groups


def launch(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, config: Config | None = None):
    """y = x @ dequantize(codes, scales).T with a given Config (None: the heuristic's). Tests call
    this directly to try configurations; models go through `int4_linear`."""
    group = _check_inputs(x, codes, scales)
    m, k = x.shape
    n = codes.shape[0]
    codes, scales = codes.contiguous(), scales.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if config is None:
        config = pick_config(m, n, k, group, _sm_count(x.device), x.dtype == torch.float32)
    dot_ok = min(config.block_m, config.block_n) >= 16 if config.use_dot else config.block_m == 1
    if group % config.block_k or not dot_ok:
        raise ValueError(
            f"invalid config {config} for groups of {group}: block_k must divide the group size, "
            "use_dot needs block_m and block_n >= 16, the GEMV path block_m == 1"
        )

    split = min(config.split_k, k // config.block_k)
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), split)
    _traceable(_int4_matmul_kernel)[grid](
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
        GROUP=group,
        SCALE_BF16=scales.dtype == torch.bfloat16,
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


def _int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return launch(x, codes, scales)


int4_linear = register_op("int4_linear", _int4_linear)

int4_linear.__doc__ = """y [M, N] = x [M, K] @ W.T, W given as int4 codes [N, K/2] and bf16/fp16 scales
[N, K/G]; y has x's dtype (bf16, fp16 or fp32), accumulated in fp32."""
