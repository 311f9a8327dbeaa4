"""The int8-activation (AVX512-VNNI) 4-bit linears of kernels/cpu: mxfp4_linear_i8 and int4_linear_i8.

They are checked for equality, bit for bit, with `reference` below: PyTorch doing the same maths in the
same order (kernels_vnni.cpp's header). Each step is an exactly specified operation, so equality is
the right test, not a tolerance:
  - the activation quantization: per row and block of 32, sx = amax / 127 and round(x / sx), clamped:
    an fp32 division, torch.round (half to even, as the kernel's cvtps2dq) and a clamp;
  - the block dot products d: integers below 2^24, exact in float64 (and in the kernel's int32);
  - fp32(d) * fp32(sw * sx): two fp32 multiplications, each correctly rounded in both (the kernel has no
    FMA there and is built with -ffp-contract=off);
  - the fp32 sum: the blocks in order, one after another, from +0. fp32 addition is correctly rounded
    and the order is the same, so the bits are.
The kernels read the weight packed by cpu_kernels.pack_i8; the reference reads it as quantized, so the
equality covers the packing too.
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
    acc = torch.zeros(p.shape[:2], dtype=torch.float32)
    for j in range(p.shape[-1]):
        acc = acc + p[..., j]
    return acc


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


# Shapes: N whole stripes of 16, K from one block to 37.
SHAPES = [(16, 32), (32, 64), (16, 96), (48, 128), (32, 160), (16, 512), (128, 576), (16, 1536),
          (32, 32 * 37)]  # fmt: skip


def mxfp4_i8(x, codes, scales):
    return cpu_kernels.mxfp4_linear_i8(x, *cpu_kernels.pack_i8(codes, scales))


def int4_i8(x, codes, scales):
    return cpu_kernels.int4_linear_i8(x, *cpu_kernels.pack_i8(codes, scales))


def test_pack_puts_each_code_where_the_layout_says():
    """pack_i8's layout, element by element: (row 16 s + r, element 32 j + 8 t + i (+ 4)) at byte
    ((s * K/32 + j) * 4 + t) * 64 + 4 r + i, low (high) nibble; scales per stripe and block, rows side by
    side; int4 scales as fp32."""
    n, k = 32, 96
    codes = torch.randint(0, 256, (n, k // 2), generator=gen(3), dtype=torch.uint8)
    scales = torch.randint(0, 256, (n, k // 32), generator=gen(4), dtype=torch.uint8)
    cv, sv = cpu_kernels.pack_i8(codes, scales)
    assert cv.shape == codes.shape and sv.shape == scales.shape
    flat, flat_s = cv.flatten(), sv.flatten()
    for row in range(n):
        s, r = divmod(row, 16)
        for e in range(k):
            j, t, i = e // 32, e % 32 // 8, e % 8
            nib = (codes[row, e // 2] >> (4 * (e % 2))) & 15
            byte = flat[((s * (k // 32) + j) * 4 + t) * 64 + 4 * r + i % 4]
            assert ((byte >> 4) if i >= 4 else byte & 15) == nib
        for j in range(k // 32):
            assert flat_s[(s * (k // 32) + j) * 16 + r] == scales[row, j]
    c4, s4 = random_int4(n, k, 32, torch.bfloat16, seed=1)
    _, packed = cpu_kernels.pack_i8(c4, s4)
    assert packed.dtype == torch.float32
    assert torch.equal(packed.reshape(2, k // 32, 16).transpose(1, 2).reshape(n, -1), s4.float())
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_kernels.pack_i8(codes[:20], scales[:20])


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_i8_equals_the_reference(kernels, n, k, dtype):
    codes, scales = random_mxfp4(n, k, seed=n * 1000 + k)
    e, sw = mxfp4_integers(codes, scales)
    for m in (1, 2, 5, 8, 9, 19):
        x = random_x(m, k, seed=m, dtype=dtype)
        y = mxfp4_i8(x, codes, scales)
        assert y.dtype == dtype
        assert_same_bits(y, reference(x, e, sw).to(dtype))


@pytest.mark.parametrize("n,k,group", [(16, 64, 32), (16, 576, 64), (128, 576, 64), (16, 1536, 128),
                                       (32, 1536, 512), (16, 96 * 7, 96), (16, 160, 160)])  # fmt: skip
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_int4_i8_equals_the_reference(kernels, n, k, group, scale_dtype):
    """Groups of 1 to 16 blocks, dividing K or not a power of two."""
    codes, scales = random_int4(n, k, group, scale_dtype, seed=n + k + group)
    q, sw = int4_integers(codes, scales)
    for m in (1, 3, 16, 17):
        for dtype in (torch.float32, torch.bfloat16):
            x = random_x(m, k, seed=m + 7, dtype=dtype)
            assert_same_bits(int4_i8(x, codes, scales), reference(x, q, sw).to(dtype))


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
    y = mxfp4_i8(x, codes, scales)
    assert_same_bits(y, reference(x, e, sw))
    # NaN where the scale is (255), and nowhere the tiny scales are (254 overflows: inf - inf).
    assert y[:, 3].isnan().all() and not y[:, :2].isnan().any()


@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
def test_rows_are_identical_for_every_m_and_thread_count(kernels, fmt):
    """Row m of an M-row call equals the one-row call bit for bit, for M = 1..16 and 40, on 1, 2 and 3
    threads (a matrix large enough to be split over threads)."""
    n, k = 1536, 576
    if fmt == "mxfp4":
        codes, scales = kernels.pack_i8(*random_mxfp4(n, k, seed=5))
        fn = kernels.mxfp4_linear_i8
    else:
        codes, scales = kernels.pack_i8(*random_int4(n, k, 64, torch.bfloat16, seed=5))
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
    approx = mxfp4_i8(x, codes, scales).double()
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
    codes, scales = kernels.pack_i8(*random_mxfp4(16, 64, seed=1))
    with pytest.raises(RuntimeError, match="features"):
        kernels.mxfp4_linear_i8(torch.randn(2, 32), codes, scales)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.mxfp4_linear_i8(torch.randn(2, 64).half(), codes, scales)
    c4, s4 = random_int4(16, 64, 32, torch.bfloat16, seed=1)
    with pytest.raises(RuntimeError, match="pack_i8"):  # int4 scales as quantized, not packed
        kernels.int4_linear_i8(torch.randn(2, 64), c4, s4)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernels.mxfp4_linear_i8(torch.randn(2, 64), codes[:8], scales[:8])
    assert kernels.mxfp4_linear_i8(torch.randn(0, 64), codes, scales).shape == (0, 16)
    assert kernels.mxfp4_linear_i8(torch.randn(2, 3, 64), codes, scales).shape == (2, 3, 16)


def test_torch_compile_traces_the_operators(kernels):
    codes, scales = kernels.pack_i8(*random_mxfp4(16, 64, seed=2))
    c4, s4 = kernels.pack_i8(*random_int4(16, 64, 32, torch.bfloat16, seed=2))

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
    int8_kind, exact_kind = (3, 1) if fmt == "mxfp4" else (4, 2)
    # The head's 300 outputs are not whole stripes of 16: it keeps the exact kernel.
    assert any(m.out_features % 16 for m in twins)
    assert all(accel._linear_spec(m)[0] == (exact_kind if m.out_features % 16 else int8_kind) for m in twins)
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
