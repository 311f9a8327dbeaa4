"""Int4 weight-only quantization (W4A16), in the layout GPTQ checkpoints use, and a linear layer whose
weight is stored in it: symmetric 4-bit integers with one scale per group of K. At the default group
of 128 a weight costs 0.5 + 2/128 ~ 0.52 bytes, about MXFP4's (0.53), but on a uniform grid whose step
follows each group's largest value, where MXFP4's grid is logarithmic with a power-of-two scale.

The format, along the last dimension (K, the input features of a weight [N, K]):
  - groups of G consecutive elements share one scale (G = `group_size`, 128 by default: GPTQ's usual
    choice; any multiple of 32 that divides K, because the CPU kernel decodes blocks of 32);
  - each element is an integer q in [-8, 7]; its value is q * scale, exactly (in fp32: a 4-bit integer
    times a scale of at most 11 significant bits).

Storage, the layout the kernels read:
  codes  uint8 [..., K/2]           q + 8 as an unsigned nibble (8 is GPTQ's symmetric zero point),
                                    element 2i in the low nibble, element 2i+1 in the high nibble:
                                    MXFP4's packing, so the kernels share their structure
  scales bf16 or fp16 [..., K/G]    the scale of each group, as stored (bf16 by default)

GPTQ checkpoints (symmetric, no act-order: g_idx = k // G) hold the same numbers transposed, qweight
int32 [K/8, N] with element 8i + t in bits 4t..4t+3 of qweight[i], and scales fp16 [K/G, N]; on a
little-endian machine qweight.T.contiguous().view(torch.uint8) is `codes` and scales.T is `scales`.
(GPTQ's own round-to-nearest uses scale = 2 * amax / 15, so its largest element rounds to 7.5 and is
clipped to 7; the cast below uses amax / 7.)

The cast (round to nearest, no calibration data):
  - scale: amax / 7, amax the group's largest |w|, computed in fp32 and rounded to the scale dtype
    (torch's round to nearest even). Every q is then computed from the scale *as stored*, so that
    dequantize gives q * scale exactly and the error of an element is at most scale / 2.
  - a scale that rounds so far down that amax / scale > 7.5 (possible only for subnormal scales: fp16
    below 2^-14, i.e. groups whose amax is below ~4.3e-4; bf16 only for amax below ~1e-37) is moved
    up by one unit in the last place, which restores amax / scale <= 7.5; so is a nonzero group's
    scale that would underflow to 0. Then no element is clipped by more than scale / 2.
  - elements: q = clamp(round(w / scale), -8, 7), ties to even, the division in float64 (so that the
    rounding decision is exact). With amax / scale <= 7.5, only -7.5 rounds to -8 and +7.5 (a tie
    rounding to 8) clips to 7: -8 is otherwise unused by this cast, but the kernels decode it, since
    GPTQ checkpoints use it.
  - an all-zero group gets scale 0 and q = 0 (no division by zero, no NaN).
  - NaN or Inf in the input is an error, and so is a scale beyond fp16's range (amax > ~458000) when
    scales are fp16.
bf16, fp16 and fp32 inputs are computed in fp32 (exact for all three; fp64 is first rounded to fp32),
so a value representable in several of them gets the same codes and scale whichever dtype carries it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import mxfp4

GROUP_SIZE = 128
ZERO_POINT = 8  # the stored nibble is q + 8
QMAX = 7  # the cast's scale maps amax to 7 (the codes also hold -8)
SCALE_DTYPES = (torch.bfloat16, torch.float16)

# Rows quantized at a time by `Int4Linear.from_linear`: the cast's float64 temporaries are about
# twenty times the slice, which would be gigabytes for a whole 128k-vocabulary output head.
_CHUNK_ELEMENTS = 1 << 22


def _check_group(k: int, group_size: int) -> None:
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"int4 group_size must be a positive multiple of 32, got {group_size}")
    if k % group_size:
        raise ValueError(
            f"int4 with group_size {group_size} needs the last dimension to be a multiple of it, got {k}"
        )


def quantize(
    w: Tensor, group_size: int = GROUP_SIZE, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[Tensor, Tensor]:
    """Cast w (fp32, bf16 or fp16; fp64 is first rounded to fp32) to int4 over its last dimension:
    (codes uint8 [..., K/2], scales `scale_dtype` [..., K/group_size]). See the module docstring."""
    if w.dtype == torch.float64:  # float64 models are for tests that must avoid near-ties
        w = w.float()
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize takes fp32, bf16, fp16 or fp64, got {w.dtype}")
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"int4 scales are bf16 or fp16, got {scale_dtype}")
    k = w.shape[-1]
    _check_group(k, group_size)
    if not torch.isfinite(w).all():
        raise ValueError("int4 cannot encode NaN or Inf, and the input has some")

    groups = w.float().reshape(*w.shape[:-1], k // group_size, group_size)
    amax = groups.abs().amax(dim=-1)
    scales = (amax / QMAX).to(scale_dtype)
    # One ulp up where the rounded scale is too small for amax (subnormal scales only, see the module
    # docstring). For a positive float, the next representable value up is the next bit pattern.
    too_small = scales.double() * (QMAX + 0.5) < amax.double()
    scales = torch.where(too_small, (scales.view(torch.int16) + 1).view(scale_dtype), scales)
    if not torch.isfinite(scales).all():
        raise ValueError(f"a group's scale (amax / 7) is too large for {scale_dtype}")

    s = scales.double()[..., None]
    q = torch.where(s > 0, torch.round(groups.double() / s), 0.0).clamp(-ZERO_POINT, QMAX)
    nibbles = (q + ZERO_POINT).to(torch.uint8).reshape(w.shape)
    codes = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return codes, scales


def dequantize(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The inverse of `quantize`: [..., K] in `dtype`, the group size read from the shapes. Exact in
    fp32; bf16 and fp16 round q * scale once (it has up to 11 significant bits, bf16 keeps 8) and fp16
    can overflow (8 * 65504)."""
    k = codes.shape[-1] * 2
    n_groups = scales.shape[-1]
    if scales.shape[:-1] != codes.shape[:-1] or n_groups == 0 or k % n_groups:
        raise ValueError(f"scales {tuple(scales.shape)} do not match codes {tuple(codes.shape)}")
    nibbles = torch.stack((codes & 0xF, codes >> 4), dim=-1).reshape(*codes.shape[:-1], k)
    q = nibbles.float() - ZERO_POINT
    w = q.reshape(*scales.shape, k // n_groups) * scales.float()[..., None]
    return w.reshape(*codes.shape[:-1], k).to(dtype)


class Int4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W stored as int4 in the buffers `codes` [N, K/2] and `scales`
    [N, K/group_size] (bf16 or fp16). The output has x's dtype. Here W is dequantized to x's dtype and
    multiplied (for bf16/fp16 x the weight is rounded to x's dtype, where the kernels use the exact
    q * scale); accel.FastInt4Linear reads the packed weight directly (Triton on CUDA, C++ on the CPU)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = GROUP_SIZE,
        scale_dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        _check_group(in_features, group_size)
        if scale_dtype not in SCALE_DTYPES:
            raise TypeError(f"int4 scales are bf16 or fp16, got {scale_dtype}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer(
            "codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales",
            torch.zeros(out_features, in_features // group_size, dtype=scale_dtype, device=device),
        )
        bias_param = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.register_parameter("bias", bias_param)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = GROUP_SIZE, scale_dtype: torch.dtype = torch.bfloat16
    ) -> Int4Linear:
        """Cast a linear layer's weight. The bias is kept as it is (the same Parameter, shared)."""
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features, linear.out_features, group_size=group_size, scale_dtype=scale_dtype,
            device=weight.device,
        )  # fmt: skip
        if not weight.is_meta:  # a meta skeleton has no values to cast
            rows = max(1, _CHUNK_ELEMENTS // weight.shape[1])
            for start in range(0, weight.shape[0], rows):
                codes, scales = quantize(weight[start : start + rows], group_size, scale_dtype)
                layer.codes[start : start + rows] = codes
                layer.scales[start : start + rows] = scales
        layer.bias = linear.bias
        return layer

    def forward(self, x: Tensor) -> Tensor:
        # The reference maths: dequantize, then multiply. accel.py's twin reads the packed weight.
        y = F.linear(x, dequantize(self.codes, self.scales, x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        has_bias = self.bias is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}, "
            f"group_size={self.group_size}, scale_dtype={self.scales.dtype}"
        )


def group_size_for(k: int, preferred: int = GROUP_SIZE) -> int | None:
    """The group size `quantize_model` gives a layer with k input features: `preferred` if it divides
    k, else the largest of 128, 64 and 32 below it that does; None if none does (the layer is then
    left as it is). SmolLM2-135M, for example, gets 64 for its K = 576 layers (576 = 4.5 * 128) and
    128 for its K = 1536 ones."""
    if preferred <= 0 or preferred % 32:
        raise ValueError(f"int4 group_size must be a positive multiple of 32, got {preferred}")
    candidates = (preferred, *(g for g in (128, 64, 32) if g < preferred))
    return next((g for g in candidates if k % g == 0), None)


def quantize_model(
    model: nn.Module,
    quantize_output: bool = True,
    skip: Callable[[str, nn.Linear], bool] | None = None,
    group_size: int = GROUP_SIZE,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """An int4 copy of `model`; `model` itself is left unchanged. Everything but the cast is
    mxfp4.quantize_model's (read its docstring): every tensor other than the cast linears' weights is
    shared, KV caches are fresh, the output head follows quantize_output, and skip(name, module) keeps
    a linear as it is.

    Group sizes: each linear gets group_size_for(in_features, group_size), so a layer whose K is not
    a multiple of `group_size` gets the largest of 128, 64, 32 (below group_size) that divides K, and a
    layer with no such divisor (K not a multiple of 32) is skipped: kept in its dtype, not an error."""

    def unfit_or_skipped(name: str, module: nn.Linear) -> bool:
        if group_size_for(module.in_features, group_size) is None:
            return True
        return skip is not None and skip(name, module)

    def cast(linear: nn.Linear) -> Int4Linear:
        return Int4Linear.from_linear(linear, group_size_for(linear.in_features, group_size), scale_dtype)

    return mxfp4.quantize_model(model, quantize_output, unfit_or_skipped, cast=cast)


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by the int4 layers of `model` (codes + scales)."""
    return sum(
        m.codes.numel() * m.codes.element_size() + m.scales.numel() * m.scales.element_size()
        for m in model.modules()
        if isinstance(m, Int4Linear)
    )
