"""MXFP4, exactly as the OCP Microscaling Formats (MX) v1.0 specification defines it, and a linear
layer whose weight is stored in it. The speculative draft is the target model with every linear
weight cast this way (`quantize_model`), so the draft costs ~0.53 bytes per weight instead of 2.

The format, along the last dimension (K, the input features of a weight [N, K]):
  - blocks of 32 consecutive elements share one scale: an E8M0 byte s, meaning 2^(s - 127)
    (s = 0..254; 255 is NaN and never produced here);
  - each element is an E2M1 number (sign, 2 exponent bits, 1 mantissa bit), one of
    0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; the element's value is E2M1 * 2^(s - 127).

Storage, the layout the Triton kernel reads:
  codes  uint8 [..., K/2]   element 2i in the low nibble, element 2i+1 in the high nibble;
                            a nibble is sign(bit 3) | exponent(bits 2-1) | mantissa(bit 0)
  scales uint8 [..., K/32]  the E8M0 byte s of each block

The cast (section 6.3 of the spec), and the choices the spec leaves to implementations:
  - shared exponent: floor(log2(amax)) - 2, amax the block's largest |x| and 2 the exponent of
    E2M1's largest value (6 = 1.5 * 2^2); clamped to E8M0's range [-127, 127]. floor(log2) is read
    from the float's bits (torch.frexp), because float log2 can round up across a power of two.
  - elements: x / 2^e rounded to the nearest E2M1 value, ties to the even mantissa, and values
    above 6 saturate to 6 (amax / 2^e < 8, so only the largest elements of a block can).
  - an all-zero block gets s = 0 (scale 2^-127) and zero codes.
  - zero results are +0: code 0b0000 also for -0.0 and for negatives that round to zero, so the
    nibble 0b1000 (-0) is never produced. quantize(-x) therefore flips bit 3 of every nonzero
    nibble and leaves zero nibbles alone.
  - NaN or Inf in the input is an error: a weight cast never wants the spec's NaN scale.
bf16, fp16 and fp32 inputs are computed in fp32 (exact for all three), so a value representable in
several of them gets the same codes whichever dtype carries it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

BLOCK_SIZE = 32
E8M0_BIAS = 127
E2M1_EMAX = 2  # exponent of E2M1's largest value: 6 = 1.5 * 2^2
# The value of each 4-bit code. Codes 0..7 are the magnitudes in increasing order, 8..15 the same
# with the sign bit set.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Rows quantized at a time by `MXFP4Linear.from_linear`: the cast's fp32 temporaries are about ten
# times the slice, which would be gigabytes for a whole 128k-vocabulary output head.
_CHUNK_ELEMENTS = 1 << 24


def _check_k(k: int) -> None:
    if k % BLOCK_SIZE != 0:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK_SIZE}, got {k}")


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """Cast x (fp32, bf16 or fp16; fp64 is first rounded to fp32) to MXFP4 over its last dimension:
    (codes uint8 [..., K/2], scales uint8 [..., K/32]). See the module docstring for the exact rules."""
    if x.dtype == torch.float64:  # float64 models are for tests that must avoid near-ties
        x = x.float()
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize takes fp32, bf16, fp16 or fp64, got {x.dtype}")
    k = x.shape[-1]
    _check_k(k)
    if not torch.isfinite(x).all():
        raise ValueError("MXFP4 cannot encode NaN or Inf, and the input has some")

    blocks = x.float().reshape(*x.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)
    amax = blocks.abs().amax(dim=-1)
    # frexp writes amax = m * 2^E with m in [0.5, 1) exactly, so floor(log2(amax)) = E - 1.
    _, exponent = torch.frexp(amax)
    shared = exponent.to(torch.int32) - 1 - E2M1_EMAX
    shared = torch.where(amax == 0, -E8M0_BIAS, shared).clamp(-E8M0_BIAS, E8M0_BIAS)
    scales = (shared + E8M0_BIAS).to(torch.uint8)

    # Divide by 2^shared by multiplying with 2^-shared built from its fp32 bits: exact, where a
    # float pow might not be. Finite fp32 has amax < 2^128, so shared <= 125 and the biased
    # exponent 127 - shared stays in [2, 254]: always a normal float.
    inverse = ((E8M0_BIAS - shared) << 23).view(torch.float32)
    scaled = blocks * inverse[..., None]

    magnitude = _nearest_e2m1_magnitude(scaled.abs())
    negative = (scaled < 0) & (magnitude != 0)  # zero results stay +0
    nibbles = (magnitude | (negative.to(torch.uint8) << 3)).reshape(x.shape)
    codes = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return codes, scales


def _nearest_e2m1_magnitude(v: Tensor) -> Tensor:
    """Code (0..7) of the E2M1 magnitude nearest to v >= 0, ties to even, saturating at 6.

    The E2M1 grid is evenly spaced within each binade: steps of 0.5 on [0, 2), 1 on [2, 4) and 2 on
    [4, 8) (8 itself is not in the format). Dividing by the step makes the grid the integers, where
    torch.round rounds half to even; and the parity of that integer is exactly the E2M1 mantissa
    bit (0.5 -> 1, 1 -> 2, 1.5 -> 3, 2 -> 4 on the first step, 2 -> 2, 3 -> 3, 4 -> 4, 6 -> 3 on the
    others), so this is round-to-nearest-even in the format's own sense. A value that rounds up to
    the next binade (1.75 -> 2) lands on a grid point of both, so the step used does not matter.
    """
    step = torch.where(v < 2, 0.5, torch.where(v < 4, 1.0, 2.0))
    rounded = (torch.round(v / step) * step).clamp(max=6.0)
    grid = torch.tensor(E2M1_VALUES[:8], device=v.device)
    return torch.searchsorted(grid, rounded).to(torch.uint8)  # exact hits: the index is the code


def dequantize(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The inverse of `quantize`: [..., K] in `dtype`, exact when the values fit the dtype (every
    MXFP4 value fits fp32 and bf16; fp16 can overflow or underflow at extreme scales)."""
    k = codes.shape[-1] * 2
    if scales.shape != (*codes.shape[:-1], k // BLOCK_SIZE):
        raise ValueError(f"scales {tuple(scales.shape)} do not match codes {tuple(codes.shape)}")
    nibbles = torch.stack((codes & 0xF, codes >> 4), dim=-1).reshape(*codes.shape[:-1], k)
    values = torch.tensor(E2M1_VALUES, device=codes.device)[nibbles.int()]
    blocks = values.reshape(*scales.shape, BLOCK_SIZE) * e8m0_to_float(scales)[..., None]
    return blocks.reshape(*codes.shape[:-1], k).to(dtype)


def e8m0_to_float(scales: Tensor) -> Tensor:
    """2^(s - 127) as fp32, from its bits. s = 0 is 2^-127, an fp32 subnormal whose only set bit is
    bit 22 (hence the clamp); s = 255 is E8M0's NaN."""
    bits = (scales.to(torch.int32) << 23).clamp(min=1 << 22)
    return torch.where(scales == 255, torch.nan, bits.view(torch.float32))


class MXFP4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W stored as MXFP4 in the buffers `codes` [N, K/2] and `scales`
    [N, K/32]. The output has x's dtype. Here W is dequantized to x's dtype and multiplied;
    accel.FastMXFP4Linear reads the packed weight directly (Triton on CUDA, C++ on the CPU)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        _check_k(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales", torch.zeros(out_features, in_features // BLOCK_SIZE, dtype=torch.uint8, device=device)
        )
        bias_param = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.register_parameter("bias", bias_param)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> MXFP4Linear:
        """Cast a linear layer's weight. The bias is kept as it is (the same Parameter, shared)."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, device=weight.device)
        if not weight.is_meta:  # a meta skeleton has no values to cast
            rows = max(1, _CHUNK_ELEMENTS // weight.shape[1])
            for start in range(0, weight.shape[0], rows):
                codes, scales = quantize(weight[start : start + rows])
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
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}"


# Names of the output head in gpt-fast (`output`) and Hugging Face (`lm_head`) models.
OUTPUT_HEAD_NAMES = ("output", "lm_head")


def quantize_model(
    model: nn.Module,
    quantize_output: bool = True,
    skip: Callable[[str, nn.Linear], bool] | None = None,
    cast: Callable[[nn.Linear], nn.Module] = MXFP4Linear.from_linear,
) -> nn.Module:
    """A quantized copy of `model` (the draft), MXFP4 by default; `model` itself is left unchanged.

    Every nn.Linear becomes cast(linear), an MXFP4Linear by default, except the output head when
    quantize_output is False and the layers for which skip(qualified_name, module) is true. (Another
    `cast` gives another format with the same sharing: int4.quantize_model passes
    Int4Linear.from_linear.) Everything else is shared, the very same tensor objects: embedding,
    norms, biases, unquantized linears, RoPE table, masks. So the draft costs only its packed weights,
    and a tied output head that is not quantized stays tied to the (shared) embedding.

    KV caches are not shared: buffers of a module that has both `k_cache` and `v_cache`, and any
    buffer whose name contains "cache", are given fresh zero-filled tensors of the same shape, dtype
    and device, so the draft can run with its own cache at once. (Calling setup_caches on the draft
    also works, but allocates new RoPE/mask tables there, which are then no longer shared.)
    """
    memo: dict[int, Tensor] = {}
    for module in model.modules():
        own_buffers = dict(module.named_buffers(recurse=False))
        is_cache = "k_cache" in own_buffers and "v_cache" in own_buffers
        for name, buf in own_buffers.items():
            if buf is not None:
                memo[id(buf)] = torch.zeros_like(buf) if is_cache or "cache" in name else buf
        for param in module.parameters(recurse=False):
            memo[id(param)] = param
    # deepcopy returns memo[id(t)] for every tensor it meets: shared tensors come back as themselves,
    # caches as their fresh copies; only the non-tensor state (modules, config objects) is copied.
    draft = copy.deepcopy(model, memo)

    def wanted(name: str, module: nn.Module) -> bool:
        if not isinstance(module, nn.Linear) or not name:
            return False
        if not quantize_output and name in OUTPUT_HEAD_NAMES:
            return False
        return skip is None or not skip(name, module)

    for name, module in model.named_modules():
        if wanted(name, module):
            draft.set_submodule(name, cast(module))
    return draft


def load_quantized(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Make `model` the MXFP4 model saved in `state_dict` (a draft's `state_dict()`), in place.

    `model` is an unloaded skeleton of the same architecture, typically built under
    `torch.device("meta")` so that it allocates nothing. Each nn.Linear whose `<name>.codes` is in
    the state dict becomes an MXFP4Linear; then every tensor is taken from the state dict as is
    (load_state_dict with assign=True: no copy, so load it onto the device you want, e.g.
    torch.load(path, map_location="cuda")). Parameters tied in the skeleton (output head and
    embedding) are tied again afterwards. Non-persistent buffers are not in a state dict: with a
    meta skeleton, call `setup_caches` (RoPE table, masks, KV caches) before running the model.
    """
    for name, module in list(model.named_modules()):
        if name and isinstance(module, nn.Linear) and f"{name}.codes" in state_dict:
            layer = MXFP4Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            model.set_submodule(name, layer)
    # Parameters reachable under several names (tied weights) are one object before loading;
    # assign=True would make them separate objects, so remember the groups and re-tie them.
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    model.load_state_dict(state_dict, strict=True, assign=True)
    for first, *others in groups.values():
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    return model


def packed_bytes(model: nn.Module) -> int:
    """Bytes held by the MXFP4 layers of `model` (codes + scales)."""
    return sum(
        m.codes.numel() * m.codes.element_size() + m.scales.numel() * m.scales.element_size()
        for m in model.modules()
        if isinstance(m, MXFP4Linear)
    )
