"""The int8-activation (AVX512-VNNI) 4-bit linears of kernels/cpu: mxfp4_linear_i8 and int4_linear_i8.

They are checked for equality, bit for bit, with `reference` below: PyTorch doing the same maths in the
same order (kernels_vnni.cpp's header). Each step is an exactly specified operation, so equality is
the right test, not a tolerance:
  - the activation quantization: per row and block of 32, sx = amax / 127 and round(x / sx), clamped:
    an fp32 division, torch.round (half to even, as the kernel's cvtps2dq) and a clamp;
  - the block dot products d: integers below 2^24, exact in float64 (and in the kernel's int32);
  - fp32(d) * fp32(sw * sx): two fp32 multiplications, each correctly rounded in both (the kernel has no
    FMA there and is built with -ffp-contract=off);
  - the fp32 sums: 16 lanes, lane L taking block 16 g + block_of_lane(L) for g = 0, 1, ... in order (a
    padded lane adding +0), then the fixed tree of hsum16. fp32 addition is correctly rounded and the
    order is the same, so the bits are.
Then M-invariance (every row of an M-row call equals the one-row call, whatever the thread count), the
fused block with int8 kinds equal to the twins called one by one, the accel option, and the quality of
the approximation (close to the exact kernel, as int8 rounding allows).

Everything skips where the extension is unavailable or the CPU lacks AVX512-VNNI.
"""

import pytest
import torch

import int4
from kernels import cpu as cpu_kernels
from mxfp4 import E2M1_VALUES, quantize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kernels():
    if not cpu_kernels.available():
        pytest.skip(f"CPU kernels unavailable here: {cpu_kernels.unavailable_reason()}")
    if not cpu_kernels.vnni_available():
        pytest.skip("the CPU lacks AVX512-VNNI")
    return cpu_kernels


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- the reference -------------------------------------------------------------------------------------

# The block of lane L in a last group of fewer than 16 blocks (block_of_lane in kernels_vnni.cpp).
LANE_BLOCK = [4 * (lane % 4) + lane // 4 for lane in range(16)]


def quantize_activations(x: torch.Tensor):
    """x [M, K] -> (a [M, K/32, 32] integers as float64, sx float32 [M, K/32]), as prep_i8."""
    m, k = x.shape
    xb = x.float().reshape(m, k // 32, 32)
    sx = xb.abs().amax(-1) / 127
    a = torch.where(sx[..., None] > 0, (xb / sx[..., None]).round(), 0.0).clamp(-127, 127)
    return a.double(), sx


def mxfp4_integers(codes, scales):
    """(e [N, K/32, 32] = 2 * E2M1 values as float64, sw float32 [N, K/32] = 2^(s - 128), NaN for 255)."""
    n = codes.shape[0]
    nib = torch.stack([codes & 15, codes >> 4], -1).reshape(n, -1, 32).long()
    e = (2 * torch.tensor(E2M1_VALUES, dtype=torch.float64))[nib]
    sw = torch.pow(2.0, scales.double() - 128).float()
    return e, torch.where(scales == 255, float("nan"), sw)


def int4_integers(codes, scales):
    """(q [N, K/32, 32] as float64, sw float32 [N, K/32]: each block's group scale)."""
    n = codes.shape[0]
    q = torch.stack([codes & 15, codes >> 4], -1).reshape(n, -1, 32).double() - 8
    per = q.shape[1] // scales.shape[1]
    return q, scales.float().repeat_interleave(per, dim=1)


def reference(x, weight_ints, weight_scales):
    """The int8 path's y [M, N] in float32, operation for operation (module docstring)."""
    a, sx = quantize_activations(x)
    d = torch.einsum("mbi,nbi->mnb", a, weight_ints)  # exact integers
    p = d.float() * (weight_scales[None] * sx[:, None])  # [M, N, blocks]
    blocks = p.shape[-1]
    groups = -(-blocks // 16)
    p = torch.nn.functional.pad(p, (0, 16 * groups - blocks)).reshape(*p.shape[:2], groups, 16)
    acc = torch.zeros(p.shape[:2] + (16,), dtype=torch.float32)
    for g in range(groups):  # lane L: block 16 g + L, or LANE_BLOCK[L] in a last, partial group
        acc = acc + (p[:, :, g] if 16 * (g + 1) <= blocks else p[:, :, g, LANE_BLOCK])
    s8 = acc[..., :8] + acc[..., 8:]
    s4 = s8[..., :4] + s8[..., 4:]
    s2 = s4[..., :2] + s4[..., 2:]
    return s2[..., 0] + s2[..., 1]


def random_mxfp4(n, k, seed):
    g = gen(seed)
    row_scale = 2.0 ** torch.randint(-20, 21, (n, 1), generator=g).float()
    codes, scales = quantize(torch.randn(n, k, generator=g) * row_scale)
    return codes, scales


def random_int4(n, k, group, scale_dtype, seed):
    return int4.quantize(torch.randn(n, k, generator=gen(seed)), group, scale_dtype)


def random_x(m, k, seed, dtype=torch.float32):
    """Activations with an outlier channel and a few all-zero blocks (sx = 0)."""
    x = torch.randn(m, k, generator=gen(seed)) * torch.rand(m, 1, generator=gen(seed + 1)) * 4
    x[:, 7] *= 50
    if k >= 96:
        x[: m // 2 + 1, 32:64] = 0
    return x.to(dtype)


def assert_same_bits(y, ref):
    """Equal values, NaN where the reference has NaN (torch.equal would fail on NaN)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    same = (y == ref) | (y.isnan() & ref.isnan())
    assert same.all(), f"{(~same).sum().item()} of {same.numel()} outputs differ"


# Shapes: K below, at and past a group of 16 blocks (512), with every tail of 1..4 units; N not a
# multiple of any tile.
SHAPES = [(1, 32), (3, 64), (7, 96), (5, 128), (33, 160), (17, 512), (130, 576), (9, 1536), (5, 32 * 37)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_i8_equals_the_reference(kernels, n, k, dtype):
    codes, scales = random_mxfp4(n, k, seed=n * 1000 + k)
    e, sw = mxfp4_integers(codes, scales)
    for m in (1, 2, 5, 16, 19):
        x = random_x(m, k, seed=m, dtype=dtype)
        y = kernels.mxfp4_linear_i8(x, codes, scales)
        assert y.dtype == dtype
        assert_same_bits(y, reference(x, e, sw).to(dtype))


@pytest.mark.parametrize("n,k,group", [(3, 64, 32), (7, 576, 64), (130, 576, 64), (9, 1536, 128),
                                       (5, 1536, 512), (6, 96 * 7, 96), (4, 160, 160)])  # fmt: skip
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_int4_i8_equals_the_reference(kernels, n, k, group, scale_dtype):
    """Group sizes dividing 16 blocks take the vector path; 96 and 160 (3 and 5 blocks) the per-lane one."""
    codes, scales = random_int4(n, k, group, scale_dtype, seed=n + k + group)
    q, sw = int4_integers(codes, scales)
    for m in (1, 3, 16, 17):
        for dtype in (torch.float32, torch.bfloat16):
            x = random_x(m, k, seed=m + 7, dtype=dtype)
            assert_same_bits(kernels.int4_linear_i8(x, codes, scales), reference(x, q, sw).to(dtype))


def test_every_code_scale_and_extreme(kernels):
    """All 256 code bytes, scales from the subnormal s = 0 to 254 and NaN (255); activations at the clamp
    (a block whose amax maps to exactly 127, a value just under a rounding tie) and zero blocks."""
    n, k = 256, 64
    codes = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, k // 2)
    codes = codes ^ torch.arange(k // 2, dtype=torch.uint8)  # vary the bytes along K too
    scales = torch.randint(0, 255, (n, k // 32), generator=gen(1), dtype=torch.uint8)
    scales[:4] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)[:, None]
    e, sw = mxfp4_integers(codes, scales)
    x = torch.randn(6, k, generator=gen(2))
    x[1] = 0
    x[2, :32] = torch.arange(32) - 15.5  # sx = 1: every x / sx a tie, rounded to even
    x[2, 0] = 127
    x[3] *= 1e-30
    x[4] *= 1e30
    x[5, :32] = 1e-40  # subnormal activations
    y = kernels.mxfp4_linear_i8(x, codes, scales)
    assert_same_bits(y, reference(x, e, sw))
    # NaN where the scale is (255), and nowhere the tiny scales are (254 overflows: inf - inf).
    assert y[:, 3].isnan().all() and not y[:, :2].isnan().any()


@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
def test_rows_are_identical_for_every_m_and_thread_count(kernels, fmt):
    """Row m of an M-row call equals the one-row call bit for bit, for M = 1..16 and 40, on 1, 2 and 3
    threads (a matrix large enough to be split over threads)."""
    n, k = 1536, 576
    if fmt == "mxfp4":
        codes, scales = random_mxfp4(n, k, seed=5)
        fn = kernels.mxfp4_linear_i8
    else:
        codes, scales = random_int4(n, k, 64, torch.bfloat16, seed=5)
        fn = kernels.int4_linear_i8
    x = random_x(40, k, seed=3)
    alone = torch.cat([fn(x[i : i + 1], codes, scales) for i in range(40)])
    xb = x.bfloat16()
    alone_bf16 = torch.cat([fn(xb[i : i + 1], codes, scales) for i in range(40)])
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for m in (*range(1, 17), 40):
                assert torch.equal(fn(x[:m], codes, scales), alone[:m]), (threads, m)
            assert torch.equal(fn(xb, codes, scales), alone_bf16), threads
    finally:
        torch.set_num_threads(saved)


def test_close_to_the_exact_kernel(kernels):
    """The int8 path approximates the exact one: each activation moves by at most half a step sx / 2
    (plus the fp32 rounding of x / sx, relatively 2^-24 of 127 steps), so an output by at most
    sum_j sx_j / 2 * sum_i |w_ij|, plus the fp32 accumulation error of both kernels."""
    n, k = 64, 576
    codes, scales = random_mxfp4(n, k, seed=9)
    x = random_x(8, k, seed=4)
    exact = kernels.mxfp4_linear(x, codes, scales).double()
    approx = kernels.mxfp4_linear_i8(x, codes, scales).double()
    from mxfp4 import dequantize

    w = dequantize(codes, scales, torch.float32).double().abs().reshape(n, -1, 32)
    _, sx = quantize_activations(x)
    fp32 = (
        2
        * (k / 16 + 8)
        * 2.0**-24
        * (x.double().abs() + sx.double().repeat_interleave(32, 1))
        @ w.reshape(n, k).T
    )
    bound = torch.einsum("nbi,mb->mn", w, sx.double()) / 2 * (1 + 1e-5) + fp32
    assert ((approx - exact).abs() <= bound).all()


def test_errors(kernels):
    codes, scales = random_mxfp4(4, 64, seed=1)
    with pytest.raises(RuntimeError, match="features"):
        kernels.mxfp4_linear_i8(torch.randn(2, 32), codes, scales)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.mxfp4_linear_i8(torch.randn(2, 64).half(), codes, scales)
    c4, s4 = random_int4(4, 64, 32, torch.bfloat16, seed=1)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        kernels.int4_linear_i8(torch.randn(2, 64), c4, s4.float())
    assert kernels.mxfp4_linear_i8(torch.randn(0, 64), codes, scales).shape == (0, 4)
    assert kernels.mxfp4_linear_i8(torch.randn(2, 3, 64), codes, scales).shape == (2, 3, 4)


def test_torch_compile_traces_the_operators(kernels):
    codes, scales = random_mxfp4(8, 64, seed=2)
    c4, s4 = random_int4(8, 64, 32, torch.bfloat16, seed=2)

    def f(x):
        return kernels.mxfp4_linear_i8(x, codes, scales) + kernels.int4_linear_i8(x, c4, s4)

    x = torch.randn(3, 64)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


# --- the twins and the fused block -------------------------------------------------------------------


def small_model(fmt):
    import int4 as int4_mod
    import mxfp4
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_local_heads=2, dim=128)
    model = Transformer(args).to(torch.bfloat16).eval().requires_grad_(False)
    return {"mxfp4": mxfp4.quantize_model, "int4": int4_mod.quantize_model}[fmt](model)


@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
def test_fused_block_with_int8_kinds_gives_the_twins_bits(kernels, fmt, monkeypatch):
    """block.cpp with kinds 3 / 4 equals the twins called one by one (FastBlock stepping aside), for a
    prefill, a verification and single steps; and every step equals the steps of a longer forward."""
    import accel

    model = small_model(fmt)
    accel.accelerate(model, int8_activations=True)
    twins = [m for m in model.modules() if isinstance(m, accel.FastMXFP4Linear | accel.FastInt4Linear)]
    assert twins and all(m.int8_activations for m in twins)
    assert {accel._linear_spec(m)[0] for m in twins} == {3 if fmt == "mxfp4" else 4}
    ids = torch.randint(0, 300, (1, 12), generator=gen(0))
    calls = []
    fused = accel.FastBlock._fused

    def counting(self, *a):
        out = fused(self, *a)
        calls.append(out is not None)
        return out

    def run():
        model.setup_caches(1, 64)
        with torch.no_grad():
            return [model(ids[:, :5], torch.arange(5)), model(ids[:, 5:9], torch.arange(5, 9))] + [
                model(ids[:, i : i + 1], torch.tensor([i])) for i in range(9, 12)
            ]

    stack = accel.FastTransformer._fused
    monkeypatch.setattr(accel.FastTransformer, "_fused", lambda self, *a: None)  # the blocks one by one
    monkeypatch.setattr(accel.FastBlock, "_fused", counting)
    fast = run()
    assert calls and all(calls)
    monkeypatch.setattr(accel.FastBlock, "_fused", lambda self, *a: None)
    eager = run()
    assert all(torch.equal(a, b) for a, b in zip(fast, eager))
    # All the blocks in one call (FastTransformer) give the same bits.
    monkeypatch.setattr(accel.FastTransformer, "_fused", stack)
    monkeypatch.setattr(accel.FastBlock, "_fused", fused)
    assert all(torch.equal(a, b) for a, b in zip(run(), eager))
    # The int8 path really runs: the exact twins give other logits.
    accel.accelerate(model)
    assert not any(m.int8_activations for m in twins)
    assert not torch.equal(run()[0], fast[0])


def test_verification_forward_equals_single_steps(kernels):
    """A forward over 6 tokens gives the logits of 6 one-token steps, bit for bit, on the int8 path."""
    import accel
    from speculate import ModelLevel

    model = small_model("mxfp4")
    accel.accelerate(model, int8_activations=True)
    level = ModelLevel(model, "mxfp4-i8")
    level.reset(32)
    ids = torch.randint(0, 300, (12,), generator=gen(1))
    level.forward(ids[:5], 0)
    together = level.forward(ids[5:11], 5)
    apart = torch.cat([level.forward(ids[i : i + 1], i) for i in range(5, 11)])
    assert torch.equal(together, apart)


def test_option_falls_back_without_vnni(monkeypatch):
    """Where VNNI is missing, int8_activations is ignored: the exact kernels run (kinds 1 and 2)."""
    import accel

    if not cpu_kernels.available():
        pytest.skip(f"CPU kernels unavailable here: {cpu_kernels.unavailable_reason()}")
    model = small_model("mxfp4")
    accel.accelerate(model, int8_activations=True)
    monkeypatch.setattr(cpu_kernels, "vnni_available", lambda: False)
    twin = model.layers[0].attention.wqkv
    assert accel._linear_spec(twin)[0] == 1
    x = torch.randn(2, 128).bfloat16()
    with torch.no_grad():
        assert torch.equal(twin(x), cpu_kernels.mxfp4_linear(x, twin.codes, twin.scales))


@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
def test_auto_turns_int8_on_where_it_measures_faster(kernels, fmt, monkeypatch):
    """int8_activations="auto" sets every 4-bit twin to accel.int8_pays' verdict, which follows the
    timed passes (faked here both ways), is remembered per shapes and threads, and is False without
    VNNI; anything but True, False or "auto" is an error."""
    import time

    import accel

    model = small_model(fmt)
    twins = lambda: [
        m for m in model.modules() if isinstance(m, accel.FastMXFP4Linear | accel.FastInt4Linear)
    ]
    slow = cpu_kernels.mxfp4_linear_i8 if fmt == "mxfp4" else cpu_kernels.int4_linear_i8
    for int8_slower in (True, False):
        monkeypatch.setattr(accel, "_INT8_PAYS", {})
        victim = (
            slow if int8_slower else (cpu_kernels.mxfp4_linear if fmt == "mxfp4" else cpu_kernels.int4_linear)
        )
        name = victim.__name__
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _f=victim: (time.sleep(0.002), _f(*a))[1])
        accel.accelerate(model, int8_activations="auto")
        assert twins() and all(m.int8_activations is not int8_slower for m in twins())
        assert list(accel._INT8_PAYS.values()) == [not int8_slower]
        monkeypatch.setattr(cpu_kernels, name, victim)
        assert accel.int8_pays(model) is not int8_slower  # remembered, not measured again
    monkeypatch.setattr(cpu_kernels, "vnni_available", lambda: False)
    assert accel.int8_pays(model) is False
    with pytest.raises(ValueError, match="auto"):
        accel.accelerate(model, int8_activations="yes")
