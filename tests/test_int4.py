"""Int4 (W4A16): the cast's promises, the Triton kernel (through the interpreter on the CPU), the C++
CPU kernel, Int4Linear's three paths and quantize_model.

Tolerances of the kernels. Every path multiplies exact weights (q * scale is exact in fp32) or exact
integers (the Triton mma multiplies x by q, then scales) and sums in fp32, so against the float64
product an output is off by the rounding of the additions only: at most about K * 2^-24 * sum|x||w|
(recursive summation, a loose worst case), plus the final rounding of a bf16/fp16 output (2^-8 or
2^-11 of |y|; 2^-7 for bf16 under the Triton interpreter, which truncates instead of rounding).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before torch/triton load: kernels run on the CPU

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import accel  # noqa: E402
from int4 import (  # noqa: E402
    GROUP_SIZE,
    Int4Linear,
    dequantize,
    group_size_for,
    packed_bytes,
    quantize,
    quantize_model,
)
from kernels import cpu as cpu_kernels  # noqa: E402
from kernels import int4_triton as kt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
FAST = settings(max_examples=40, deadline=None)
SCALE_DTYPES = [torch.bfloat16, torch.float16]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def unpack_q(codes):
    """Packed codes [..., K/2] -> q = nibble - 8 [..., K] in element order (int)."""
    return torch.stack((codes & 0xF, codes >> 4), dim=-1).flatten(-2).int() - 8


# ---------------------------------------------------------------------------------------------
# The cast.


@st.composite
def weights(draw, scale_dtype=torch.bfloat16):
    """([rows, K] fp32, group): each group N(0, 1) times its own 2^e (down to subnormal scales), or
    all zero. For fp16 scales, e keeps amax / 7 below fp16's largest value."""
    group = draw(st.sampled_from([32, 64, 128]))
    rows, n_groups = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    low, high = (-140, 120) if scale_dtype == torch.bfloat16 else (-32, 14)
    exps = draw(st.lists(st.integers(low, high), min_size=rows * n_groups, max_size=rows * n_groups))
    zero = draw(st.lists(st.booleans(), min_size=rows * n_groups, max_size=rows * n_groups))
    w = torch.randn(rows, n_groups, group, generator=gen(draw(st.integers(0, 2**31))))
    scale = torch.tensor([0.0 if z else 2.0**e for e, z in zip(exps, zero)], dtype=torch.float64)
    w = (w.double() * scale.reshape(rows, n_groups, 1)).float()  # 2^e times fp32: exact or subnormal
    return w.reshape(rows, n_groups * group), group


@FAST
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@given(data=st.data())
def test_error_is_at_most_half_a_step(scale_dtype, data):
    w, group = data.draw(weights(scale_dtype))
    codes, scales = quantize(w, group, scale_dtype)
    assert codes.dtype == torch.uint8 and codes.shape == (w.shape[0], w.shape[1] // 2)
    assert scales.dtype == scale_dtype and scales.shape == (w.shape[0], w.shape[1] // group)
    s = scales.double().repeat_interleave(group, dim=-1)
    q = unpack_q(codes)
    assert ((q >= -8) & (q <= 7)).all()
    deq = dequantize(codes, scales, torch.float32)
    assert torch.equal(deq.double(), q * s)  # dequantize is exactly q * stored scale
    assert ((deq.double() - w.double()).abs() <= s / 2).all()
    # -8 only where w / scale reaches -7.5 (never clipped by more than half a step); zero groups
    # exactly where the scale is 0.
    assert (w.double()[q == -8] <= -7.5 * s[q == -8]).all()
    amax = w.abs().reshape(*scales.shape, group).amax(-1)
    assert torch.equal(scales == 0, amax == 0)
    # The scale is amax / 7 rounded to the scale dtype, where that scale is normal.
    normal = scales.float() >= torch.finfo(scale_dtype).tiny
    assert torch.equal(scales[normal], (amax / 7).to(scale_dtype)[normal])


@FAST
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@given(data=st.data())
def test_values_on_the_grid_round_trip_exactly(scale_dtype, data):
    """q * s with q in [-7, 7] and one |q| = 7 per group (so amax / 7 = s): the same codes and scale."""
    group, n_groups = data.draw(st.sampled_from([32, 64, 128])), data.draw(st.integers(1, 3))
    qs = data.draw(st.lists(st.integers(-7, 7), min_size=group * n_groups, max_size=group * n_groups))
    q = torch.tensor(qs, dtype=torch.int32).reshape(n_groups, group)
    q[:, 0] = torch.tensor(
        data.draw(st.lists(st.sampled_from([-7, 7]), min_size=n_groups, max_size=n_groups))
    )
    # normal scales: 8 (bf16) or 11 (fp16) significant bits, inside the dtype's normal range
    lo, hi = (-120, 120) if scale_dtype == torch.bfloat16 else (-14, 12)
    exps = data.draw(st.lists(st.integers(lo, hi), min_size=n_groups, max_size=n_groups))
    mants = data.draw(st.lists(st.floats(1, 2, exclude_max=True), min_size=n_groups, max_size=n_groups))
    s = torch.tensor([m * 2.0**e for m, e in zip(mants, exps)]).to(scale_dtype)
    w = (q.float() * s.float()[:, None]).reshape(-1)
    codes, scales = quantize(w, group, scale_dtype)
    assert torch.equal(scales, s)
    assert torch.equal(unpack_q(codes), q.reshape(-1))
    assert torch.equal(dequantize(codes, scales, torch.float32), w)


@FAST
@given(st.lists(st.integers(-255, 255), min_size=64, max_size=64), st.integers(-10, 7))
def test_fp32_bf16_fp16_agree(ints, exp):
    """Values exact in all three dtypes (8 significant bits, inside fp16's range) give one result."""
    w = torch.tensor(ints, dtype=torch.float32) * 2.0**exp
    results = [quantize(w.to(dtype), 32) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    for codes, scales in results[1:]:
        assert torch.equal(codes, results[0][0]) and torch.equal(scales, results[0][1])


def test_zero_groups_ties_and_subnormal_scales():
    w = torch.zeros(4, 128)
    w[0, :4] = torch.tensor([7.0, -3.5, 2.5, 0.5])  # scale 1: ties go to even
    w[1] = -0.0  # all zero (even -0.0): scale 0, q = 0, no NaN
    w[2, 0] = 1e-30  # fp16: amax / 7 underflows to 0, so the scale is fp16's smallest subnormal
    w[3, :2] = torch.tensor([9.8, -9.8]) * 2.0**-24  # fp16: amax / 7 = 1.4 ulps of the subnormals:
    # rounded to 1 ulp, amax / scale would be 9.8 > 7.5, so the scale goes one ulp up, to 2 ulps
    codes, scales = quantize(w, scale_dtype=torch.float16)
    q = unpack_q(codes)
    assert q[0, :4].tolist() == [7, -4, 2, 0] and (q[0, 4:] == 0).all()
    assert scales[1].item() == 0 and (q[1] == 0).all()
    assert scales[2].item() == 2.0**-24 and q[2, 0] == 0  # 1e-30 rounds to 0 at that scale
    assert scales[3].item() == 2.0**-23 and q[3, :2].tolist() == [5, -5]  # 4.9 -> 5
    deq = dequantize(codes, scales, torch.float32)
    assert not deq.isnan().any() and (deq[1] == 0).all()
    assert ((deq - w).abs() <= scales.float().repeat_interleave(128, -1) / 2).all()


def test_clear_errors():
    with pytest.raises(ValueError, match="multiple of it"):
        quantize(torch.randn(4, 192))  # 192 is not a multiple of 128
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.randn(4, 96), group_size=48)
    with pytest.raises(ValueError, match="multiple of it"):
        Int4Linear(576, 8)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([1.0, float("nan")] * 64))
    with pytest.raises(ValueError, match="too large"):
        quantize(torch.full((128,), 1e6), scale_dtype=torch.float16)
    with pytest.raises(TypeError):
        quantize(torch.ones(128, dtype=torch.int32))
    with pytest.raises(TypeError):
        quantize(torch.ones(128), scale_dtype=torch.float32)
    codes, scales = quantize(torch.randn(4, 256))
    with pytest.raises(ValueError, match="do not match"):
        dequantize(codes, scales[:1])
    with pytest.raises(ValueError, match="do not match"):
        kt.int4_linear(torch.randn(2, 128), codes, scales)
    with pytest.raises(TypeError):
        kt.int4_linear(torch.randn(2, 256), codes, scales.float())


def test_group_size_for():
    assert group_size_for(1536) == 128 and group_size_for(576) == 64 and group_size_for(96) == 32
    assert group_size_for(200) is None and group_size_for(48) is None
    assert group_size_for(768, 256) == 256 and group_size_for(640, 256) == 128
    assert group_size_for(576, 64) == 64 and group_size_for(96, 64) == 32
    with pytest.raises(ValueError):
        group_size_for(128, 100)


# ---------------------------------------------------------------------------------------------
# Kernels against the float64 product of the dequantized weight.


def random_int4(n, k, group=GROUP_SIZE, scale_dtype=torch.bfloat16, seed=0, spread=4):
    """A quantized random weight whose rows span many scales (2^-spread .. 2^spread times N(0, 1);
    the default keeps fp16 outputs finite)."""
    g = gen(seed)
    row_scale = 2.0 ** torch.randint(-spread, spread + 1, (n, 1), generator=g).float()
    codes, scales = quantize(torch.randn(n, k, generator=g) * row_scale, group, scale_dtype)
    return codes, scales, dequantize(codes, scales, torch.float64)


def check_matmul(y, x, w, out_rel_interpret=True):
    """y against x @ w.T in float64 (see the module docstring for the tolerance)."""
    xd = x.cpu().double()
    exact, magnitude = xd @ w.T, xd.abs() @ w.abs().T
    bf16_rel = 2.0**-7 if INTERPRET and out_rel_interpret else 2.0**-8
    out_rel = {torch.float32: 0.0, torch.bfloat16: bf16_rel, torch.float16: 2.0**-11}[y.dtype]
    tol = x.shape[-1] * 2.0**-24 * magnitude + out_rel * exact.abs() + 1e-300
    err = (y.cpu().double() - exact).abs()
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    assert torch.isfinite(y).all()
    assert (err <= tol).all(), f"error {(err / tol).max().item():.3g} x the tolerance"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 5, 16, 33])
@pytest.mark.parametrize("k", [128, 256, 384])
def test_triton_kernel_matches_dequantized_matmul(m, k, dtype):
    n = 40 if m % 2 else 72  # not a multiple of any block_n
    codes, scales, w = random_int4(n, k, seed=m * n + k)
    x = torch.randn(m, k, generator=gen(m)).to(dtype)
    check_matmul(kt.int4_linear(x.to(DEVICE), codes.to(DEVICE), scales.to(DEVICE)), x, w)


@pytest.mark.parametrize(
    "group,scale_dtype", [(32, torch.float16), (64, torch.bfloat16), (256, torch.float16)]
)
@pytest.mark.parametrize(
    "config",
    [
        None,  # the heuristic's
        kt.Config(block_m=1, block_n=16, block_k=32, split_k=3, use_dot=False),  # GEMV, split-K
        kt.Config(block_m=16, block_n=32, block_k=32, split_k=4),  # mma, split-K
        kt.Config(block_m=32, block_n=64, block_k=32),
    ],
    ids=str,
)
def test_triton_kernel_group_sizes_configs_and_split_k(group, scale_dtype, config):
    codes, scales, w = random_int4(48, 512, group, scale_dtype, seed=group)
    for m in (1, 3) if config is not None and not config.use_dot else (1, 7, 20):  # the interpreter is
        # slow on GEMV programs (block_m = 1: one program per row)
        x = torch.randn(m, 512, generator=gen(m))
        y = kt.launch(x.to(DEVICE), codes.to(DEVICE), scales.to(DEVICE), config)
        check_matmul(y, x, w)
    with pytest.raises(ValueError, match="invalid config"):
        kt.launch(x, codes, scales, kt.Config(block_m=16, block_n=16, block_k=512))


def test_triton_kernel_strided_and_empty_inputs():
    codes, scales, w = random_int4(40, 128, seed=3)
    wide = torch.randn(3, 300)[:, 10:138]  # row stride 300
    x_t = torch.randn(128, 4).t()  # column stride 4
    for x in (wide, x_t):
        check_matmul(kt.int4_linear(x.to(DEVICE), codes.to(DEVICE), scales.to(DEVICE)), x, w)
    empty = kt.int4_linear(torch.randn(0, 128, device=DEVICE), codes.to(DEVICE), scales.to(DEVICE))
    assert empty.shape == (0, 40)


def every_code_weight(scale_dtype):
    """16 rows x 128: every nibble in every row, scales from subnormal to large, two groups of 64."""
    nibbles = (torch.arange(16 * 128).reshape(16, 128) * 7 % 16).to(torch.uint8)
    codes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    tiny = torch.finfo(scale_dtype).tiny
    values = [tiny / 4, tiny, 2.0**-10, 0.01, 0.5, 1.0, 1.5, 3.0, 100.0, 1000.0, 7.0, 2.0**-3]
    values += [0.0, 0.1, 0.3, 60000.0 if scale_dtype == torch.float16 else 1e30]
    scales = torch.tensor(values * 2).reshape(16, 2).to(scale_dtype)
    return codes, scales


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("use_dot", [False, True])
def test_triton_kernel_decodes_every_code_exactly(scale_dtype, use_dot):
    """x = identity: y is W.T itself, one exact product per output."""
    codes, scales = every_code_weight(scale_dtype)
    config = kt.Config(16, 16, 64) if use_dot else kt.Config(1, 16, 64, use_dot=False)
    y = kt.launch(torch.eye(128, device=DEVICE), codes.to(DEVICE), scales.to(DEVICE), config)
    assert torch.equal(y.cpu(), dequantize(codes, scales, torch.float32).T)


@pytest.fixture(scope="module")
def cpu():
    if not cpu_kernels.available():
        pytest.skip(f"CPU kernels unavailable here: {cpu_kernels.unavailable_reason()}")
    return cpu_kernels


# K at group edges, groups of 32, 64 and 128, N not a multiple of any tile (1, 3, 7, 33, 130, ...).
CPU_SHAPES = [(1, 128, 128), (7, 256, 128), (33, 384, 128), (130, 576, 64), (5, 1536, 128), (9, 96, 32)]


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("n,k,group", CPU_SHAPES)
def test_cpu_kernel_matches_reference_and_is_identical_for_every_m(cpu, n, k, group, scale_dtype):
    """fp32 x: within the summation bound; bf16 x (widened exactly): the fp32 result rounded once.
    And y for M rows at once == the rows one at a time (torch.equal), M = 1..16 and past 16."""
    codes, scales, w = random_int4(n, k, group, scale_dtype, seed=n + k, spread=12)
    x = torch.randn(40, k, generator=gen(k))
    for dtype in (torch.float32, torch.bfloat16):
        xs = x.to(dtype)
        single = torch.cat([cpu.int4_linear(xs[i : i + 1], codes, scales) for i in range(40)])
        for m in (*range(1, 17), 23, 40):
            y = cpu.int4_linear(xs[:m], codes, scales)
            assert torch.equal(y, single[:m]), (dtype, m)
        # the leading shape does not matter either: [B, T, K] as the model calls it
        assert torch.equal(
            cpu.int4_linear(xs[:8].reshape(2, 4, k), codes, scales), single[:8].reshape(2, 4, n)
        )
        if dtype == torch.float32:
            check_matmul(single, x, w)
        else:
            assert torch.equal(single, cpu.int4_linear(xs.float(), codes, scales).bfloat16())


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_cpu_kernel_decodes_every_code_exactly(cpu, scale_dtype):
    codes, scales = every_code_weight(scale_dtype)
    y = cpu.int4_linear(torch.eye(128), codes, scales)  # y[j, n] = w[n, j]
    assert (y == dequantize(codes, scales, torch.float32).T).all()  # == so that -0 equals +0


def test_cpu_kernel_threads_errors_and_compile(cpu):
    codes, scales, _ = random_int4(2100, 576, 64, seed=5)  # ~0.6 MB: split over threads
    x = torch.randn(6, 576, generator=gen(6))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.int4_linear(x, codes, scales)
        torch.set_num_threads(max(2, before))
        assert torch.equal(cpu.int4_linear(x, codes, scales), one)  # threads split N only
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        cpu.int4_linear(x, codes, scales.float())
    with pytest.raises(RuntimeError, match="do not match"):
        cpu.int4_linear(x, codes, scales[:, :5])  # 576 / 5 is no group size
    with pytest.raises(RuntimeError, match="features"):
        cpu.int4_linear(x[:, :512], codes, scales)
    with torch.no_grad():
        compiled = torch.compile(
            lambda x: cpu.int4_linear(x, codes, scales), backend="aot_eager", fullgraph=True
        )
        assert torch.equal(compiled(x), one)


# ---------------------------------------------------------------------------------------------
# The layer.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_equals_dequantize_then_matmul(dtype):
    linear = nn.Linear(256, 40, bias=True)
    layer = Int4Linear.from_linear(linear)
    assert layer.bias is linear.bias  # the bias is shared, not cast
    assert layer.codes.shape == (40, 128) and layer.scales.shape == (40, 2)
    x = torch.randn(2, 3, 256).to(dtype)
    expected = F.linear(x, dequantize(layer.codes, layer.scales, dtype)) + linear.bias.to(dtype)
    # The plain layer: exactly F.linear on the dequantized weight.
    assert torch.equal(layer(x), expected)
    fast = Int4Linear.from_linear(linear)
    accel.accelerate(fast)  # the kernel-backed twin: the C++ kernel where available, else the same path
    with torch.no_grad():
        y = fast(x)
    assert y.dtype == dtype and y.shape == (2, 3, 40)
    # The kernel multiplies the exact fp32 weights; bf16's PyTorch path rounds them to bf16 first.
    tol = 1e-5 if dtype == torch.float32 else 2.0**-6
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
    fast.bias = None
    with torch.no_grad():
        check_matmul(fast(x), x, dequantize(fast.codes, fast.scales, torch.float64), out_rel_interpret=False)


def test_fallback_when_the_cpu_kernels_are_disabled():
    """SPECQD_NO_CPU_KERNELS=1 (read when the extension first loads, hence a subprocess): the layer
    takes the PyTorch path, exactly F.linear on the dequantized weight."""
    code = """
import torch
from int4 import Int4Linear, dequantize
from kernels import cpu
assert not cpu.available()
layer = Int4Linear.from_linear(torch.nn.Linear(128, 24, bias=False), scale_dtype=torch.float16)
import accel
accel.accelerate(layer)  # the twin must fall back to the plain layer's maths
x = torch.randn(3, 128)
w = dequantize(layer.codes, layer.scales, torch.float32)
with torch.no_grad():
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w))
print("LAYER: ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPECQD_NO_CPU_KERNELS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "LAYER: ok" in r.stdout


# ---------------------------------------------------------------------------------------------
# quantize_model on a small model.py Transformer.


def small_transformer(intermediate_size):
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(
        block_size=64, vocab_size=96, n_layer=2, n_head=4, n_local_heads=2, dim=256,
        intermediate_size=intermediate_size,
    )  # fmt: skip
    model = Transformer(args).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.05)
    model.setup_caches(1, 32)
    return model


IDX = torch.tensor([[3, 17, 42, 5, 88, 1, 0, 63]])


def test_quantize_model_replaces_the_linears_with_fitting_groups():
    """dim 256 (groups of 128) and ffn 320 (w2's K: 320 = 2.5 * 128, so groups of 64). Everything but
    the linears is shared; the logits stay close to the model's."""
    model = small_transformer(320)
    with torch.no_grad():
        logits = model(IDX)
        draft = quantize_model(model)
        draft_logits = draft(IDX)
    assert sum(isinstance(m, nn.Linear) for m in draft.modules()) == 0
    assert sum(isinstance(m, Int4Linear) for m in draft.modules()) == 2 * 5 + 1  # wqkv wo w1 w3 w2, head
    assert type(model.output) is nn.Linear and type(model.layers[1].feed_forward.w2) is nn.Linear
    assert draft.layers[0].feed_forward.w2.group_size == 64 and draft.output.group_size == 128
    assert draft.tok_embeddings.weight is model.tok_embeddings.weight
    assert draft.layers[0].attention.kv_cache.k_cache is not model.layers[0].attention.kv_cache.k_cache
    expected_bytes = sum(
        m.weight.numel() // 2 + m.weight.numel() // group_size_for(m.in_features) * 2
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )
    assert packed_bytes(draft) == expected_bytes
    rel = ((draft_logits - logits).norm() / logits.norm()).item()
    # A 4-bit cast, not a broken one: measured 0.17, as MXFP4's cast of the same model (0.17); the
    # per-weight error is 0.11-0.12 of the weight's norm for both on these Gaussian weights.
    assert 0 < rel < 0.3, rel


def test_quantize_model_skips_layers_no_group_fits():
    """ffn 200: w2's K = 200 is not a multiple of 32, so w2 stays an nn.Linear in its dtype; skip and
    quantize_output work as for MXFP4."""
    model = small_transformer(200).bfloat16()
    draft = quantize_model(model, quantize_output=False, skip=lambda name, m: name.endswith("wo"))
    for layer in draft.layers:
        assert (
            type(layer.feed_forward.w2) is nn.Linear and layer.feed_forward.w2.weight.dtype == torch.bfloat16
        )
        assert type(layer.attention.wo) is nn.Linear
        assert isinstance(layer.feed_forward.w1, Int4Linear) and isinstance(layer.attention.wqkv, Int4Linear)
    assert type(draft.output) is nn.Linear and draft.output.weight is model.output.weight
    with torch.no_grad():
        assert draft(IDX).dtype == torch.bfloat16
