"""The C++ CPU kernels (kernels/cpu): each equals its PyTorch reference, gives bit-identical outputs
whatever the number of rows M, threads or row range, and steps aside cleanly when disabled or unbuildable.

The first test to need the extension compiles it (about a minute, once per machine; later runs load
the cached library). Kernel tests skip, saying why, only where the extension cannot be built or the CPU
lacks AVX-512; the fallback tests run everywhere.

Tolerance. Both kernels decode the weight exactly and accumulate exact products in fp32, so they differ
from a float64 reference only by the rounding of the additions: per output at most about
(K/16 + 8) * 2^-24 * sum_k |x_k w_k| (K/16 FMAs per lane, then 4 additions across lanes; the bound
of recursive summation). That is the tolerance used, relative to sum |x||w|, not to |y|.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import cpu as cpu_kernels
from mxfp4 import dequantize, quantize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernels():
    if not cpu_kernels.available():
        pytest.skip(f"CPU kernels unavailable here: {cpu_kernels.unavailable_reason()}")
    return cpu_kernels


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_close_to(y, ref, x_abs, w_abs, k):
    """|y - ref| <= (K/16 + 8) 2^-24 sum|x||w| (see the module docstring), all in float64."""
    bound = (k / 16 + 8) * 2.0**-24 * (x_abs @ w_abs.T) + 1e-300
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g} x the bound"


def random_mxfp4(n, k, seed):
    """A quantized random weight whose rows span many scales (2^-20 .. 2^20 times N(0, 1))."""
    g = gen(seed)
    row_scale = 2.0 ** torch.randint(-20, 21, (n, 1), generator=g).float()
    w = torch.randn(n, k, generator=g) * row_scale
    codes, scales = quantize(w)
    return codes, scales, dequantize(codes, scales, torch.float32)


# Shapes: K at block edges (32, 64, 96, ...) and N not a multiple of any tile (1, 3, 7, 33, 130, ...).
MXFP4_SHAPES = [(1, 32), (3, 64), (7, 96), (33, 128), (130, 576), (5, 1536), (64, 32 * 37)]


@pytest.mark.parametrize("n,k", MXFP4_SHAPES)
def test_mxfp4_matches_dequantize_then_matmul(kernels, n, k):
    codes, scales, w = random_mxfp4(n, k, seed=n * 1000 + k)
    for m in (*range(1, 17), 23, 40):
        x = torch.randn(m, k, generator=gen(m))
        y = kernels.mxfp4_linear(x, codes, scales)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert_close_to(y, x.double() @ w.double().T, x.double().abs(), w.double().abs(), k)


def test_mxfp4_decodes_every_code_and_scale_exactly(kernels):
    """One-hot x picks one weight column: y must be that dequantized weight, exactly. The codes are all
    256 byte values (so every nibble, -0 included) and the scales every finite-result value 0..252."""
    n, k = 256, 64
    codes = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, k // 2)
    codes = codes ^ torch.arange(k // 2, dtype=torch.uint8)  # vary the bytes along K too
    scales = torch.randint(0, 253, (n, k // 32), generator=gen(1), dtype=torch.uint8)
    scales[:3] = torch.tensor([0, 1, 252], dtype=torch.uint8)[:, None]  # subnormal, smallest, largest
    w = dequantize(codes, scales, torch.float32)
    eye = torch.eye(k)
    y = kernels.mxfp4_linear(eye, codes, scales)  # y[j, n] = w[n, j]
    assert (y == w.T).all()  # == so that -0 (code 8) equals the +0 the sum gives


def test_4bit_weights_decode_to_fp32_exactly(kernels):
    """Long forwards decode a 4-bit weight to fp32 for torch's GEMM (accel.long_linear): the values must
    be mxfp4.dequantize's and int4.dequantize's, bit for bit, for every code and scale."""
    import int4

    n, k = 256, 64
    codes = torch.arange(256, dtype=torch.uint8)[:, None].repeat(1, k // 2)
    codes = codes ^ torch.arange(k // 2, dtype=torch.uint8)
    scales = torch.randint(0, 253, (n, k // 32), generator=gen(1), dtype=torch.uint8)
    scales[:3] = torch.tensor([0, 1, 252], dtype=torch.uint8)[:, None]
    w32 = kernels.mxfp4_weight_f32(codes, scales)
    assert torch.equal(w32, dequantize(codes, scales, torch.float32))
    # bf16 holds every MXFP4 value too (FastMXFP4Linear's long forwards on a CPU with native bf16)
    assert torch.equal(w32.to(torch.bfloat16).float(), w32)
    assert torch.equal(kernels.mxfp4_weight_bf16(codes, scales), w32.to(torch.bfloat16))  # in one pass
    w = torch.randn(40, 256, generator=gen(2))
    for dtype in (torch.bfloat16, torch.float16):
        for group in (32, 128):
            c, sc = int4.quantize(w, group, dtype)
            assert torch.equal(kernels.int4_weight_f32(c, sc), int4.dequantize(c, sc, torch.float32))


def test_mxfp4_bf16_x(kernels):
    """bf16 x is widened exactly, so the result is the fp32 one rounded once to bf16."""
    codes, scales, _ = random_mxfp4(77, 192, seed=3)
    for m in (1, 5, 16):
        x = torch.randn(m, 192, generator=gen(m)).bfloat16()
        y = kernels.mxfp4_linear(x, codes, scales)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, kernels.mxfp4_linear(x.float(), codes, scales).bfloat16())


# bf16 takes any K: block edges and partial blocks.
BF16_SHAPES = [(1, 1), (3, 31), (7, 32), (9, 33), (33, 100), (130, 576), (5, 1536)]


@pytest.mark.parametrize("n,k", BF16_SHAPES)
def test_bf16_matches_reference(kernels, n, k):
    w = torch.randn(n, k, generator=gen(n * 1000 + k)).bfloat16()
    wd = w.double()
    for m in (*range(1, 17), 23):
        x = torch.randn(m, k, generator=gen(m))
        y = kernels.bf16_linear(x, w)
        assert y.shape == (m, n) and y.dtype == torch.float32
        xr = x.bfloat16().double()  # the documented rounding of x
        assert_close_to(y, xr @ wd.T, xr.abs(), wd.abs(), k)
        # bf16 x: the same products; the output rounded once to bf16.
        yb = kernels.bf16_linear(x.bfloat16(), w)
        assert yb.dtype == torch.bfloat16 and torch.equal(
            yb, kernels.bf16_linear(x.bfloat16().float(), w).bfloat16()
        )


def test_bf16_rounds_x_like_torch(kernels):
    """x is rounded to bf16 as torch rounds it (nearest, ties to even): exactly the same outputs."""
    k = 64
    w = torch.randn(40, k, generator=gen(5)).bfloat16()
    x = torch.randn(8, k, generator=gen(6))
    bits = x.view(torch.int32)
    x_ties = ((bits & ~0xFFFF) | 0x8000).view(torch.float32)  # exactly half-way between two bf16
    for xx in (x, x_ties):
        assert torch.equal(kernels.bf16_linear(xx, w), kernels.bf16_linear(xx.bfloat16().float(), w))


def test_bf16_close_to_torch_linear(kernels):
    """Same maths as torch's bf16 linear, up to the order of the fp32 additions."""
    w = torch.randn(300, 576, generator=gen(7)).bfloat16()
    x = torch.randn(4, 576, generator=gen(8)).bfloat16()
    ref = F.linear(x.float(), w.float())
    torch.testing.assert_close(kernels.bf16_linear(x.float(), w), ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bit-identity: the property speculative verification relies on.


def _both_kernels(kernels, n, k, seed):
    codes, scales, _ = random_mxfp4(n, k, seed)
    w16 = torch.randn(n, k, generator=gen(seed + 1)).bfloat16()
    return {
        "mxfp4": lambda x: kernels.mxfp4_linear(x, codes, scales),
        "bf16": lambda x: kernels.bf16_linear(x, w16),
    }


@pytest.mark.parametrize("n,k", [(131, 576), (37, 1536), (960, 64)])
def test_bit_identical_for_every_m(kernels, n, k):
    """y for M rows at once == the rows one at a time == any split into chunks (torch.equal)."""
    for name, f in _both_kernels(kernels, n, k, seed=11).items():
        x = torch.randn(40, k, generator=gen(12))
        for dtype in (torch.float32, torch.bfloat16):
            xs = x.to(dtype)
            single = torch.cat([f(xs[i : i + 1]) for i in range(40)])
            for m in (2, 3, 4, 5, 8, 9, 16, 17, 40):
                assert torch.equal(f(xs[:m]), single[:m]), (name, dtype, m)
            chunks = torch.cat([f(c) for c in xs.split([3, 5, 8, 1, 16, 7])])
            assert torch.equal(chunks, single), (name, dtype)
            # The leading shape does not matter either: [B, T, K] as the model calls it.
            assert torch.equal(f(xs[:8].reshape(1, 8, k)), single[:8].reshape(1, 8, n)), (name, dtype)


def test_bit_identical_across_threads(kernels):
    """Threads split N only, so their number changes nothing."""
    fns = _both_kernels(kernels, 4100, 576, seed=21)  # ~1.2 MB of MXFP4: split over threads
    x = torch.randn(6, 576, generator=gen(22))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = {name: f(x) for name, f in fns.items()}
        torch.set_num_threads(max(2, before))
        many = {name: f(x) for name, f in fns.items()}
    finally:
        torch.set_num_threads(before)
    for name in fns:
        assert torch.equal(one[name], many[name]), name


def test_bit_identical_for_any_row_range(kernels):
    """Where a row falls in a tile does not matter: a slice of W gives the same columns of y."""
    codes, scales, _ = random_mxfp4(103, 256, seed=31)
    w16 = torch.randn(103, 256, generator=gen(32)).bfloat16()
    x = torch.randn(7, 256, generator=gen(33))
    y_mx, y_bf = kernels.mxfp4_linear(x, codes, scales), kernels.bf16_linear(x, w16)
    for a, b in [(0, 1), (1, 4), (3, 10), (50, 103), (101, 103)]:
        assert torch.equal(kernels.mxfp4_linear(x, codes[a:b], scales[a:b]), y_mx[:, a:b])
        assert torch.equal(kernels.bf16_linear(x, w16[a:b]), y_bf[:, a:b])


def test_torch_compile_traces_the_operators(kernels):
    """Under torch.compile the wrappers call torch.ops.specqd_cpu.* (with shape functions), so a
    fullgraph compile works and gives the eager bits."""
    codes, scales, _ = random_mxfp4(40, 128, seed=51)
    w16 = torch.randn(24, 128, generator=gen(52)).bfloat16()

    def f(x):
        return kernels.mxfp4_linear(x, codes, scales), kernels.bf16_linear(x, w16)

    x = torch.randn(5, 128, generator=gen(53))
    with torch.no_grad():
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        for got, want in zip(compiled(x), f(x)):
            assert torch.equal(got, want)


def test_compile_first_touch(kernels):
    """A fresh process whose first use of the kernels is inside torch.compile(fullgraph=True): the
    compiler runs available() (which loads the library) instead of tracing into it, and the model's
    compiled forward calls the operators."""
    code = """
import torch
from kernels import cpu
from model import ModelArgs, Transformer
model = Transformer(ModelArgs(block_size=16, vocab_size=64, n_layer=1, n_head=2, dim=64)).eval()
from accel import accelerate
accelerate(model)
model.setup_caches(1, 16)
graphs = []
def record(gm, example_inputs):
    graphs.append(gm.code)
    return gm.forward
with torch.no_grad():
    torch.compile(model, backend=record, fullgraph=True)(torch.tensor([[1, 2, 3]]), torch.arange(3))
print("TRIED:", cpu._TRIED, "OPS:", "specqd_cpu.attention" in "".join(graphs))
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "TRIED: True OPS: True" in r.stdout


# ---------------------------------------------------------------------------------------------
# Arguments.


def test_shapes_and_errors(kernels):
    codes, scales, _ = random_mxfp4(8, 64, seed=41)
    w16 = torch.randn(8, 64).bfloat16()
    assert kernels.mxfp4_linear(torch.randn(0, 64), codes, scales).shape == (0, 8)
    assert kernels.bf16_linear(torch.randn(2, 3, 64), w16).shape == (2, 3, 8)
    x = torch.randn(2, 64)
    assert torch.equal(
        kernels.mxfp4_linear(x.t().contiguous().t(), codes, scales), kernels.mxfp4_linear(x, codes, scales)
    )
    with pytest.raises(RuntimeError):
        kernels.mxfp4_linear(torch.randn(2, 32), codes, scales)  # K mismatch
    with pytest.raises(RuntimeError):
        kernels.mxfp4_linear(x, codes, scales[:, :1])  # scales do not match codes
    with pytest.raises(RuntimeError):
        kernels.mxfp4_linear(x.half(), codes, scales)  # fp16 x is not supported
    with pytest.raises(RuntimeError):
        kernels.bf16_linear(x, w16.float())  # the weight must be bf16
    with pytest.raises(RuntimeError):  # no autograd: refuse rather than silently drop the graph
        kernels.bf16_linear(x.requires_grad_(), w16)


# ---------------------------------------------------------------------------------------------
# Fallbacks: run in a subprocess, since the environment is read when the extension first loads.


def _run(code, **env):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300
    )


FALLBACK_CHECK = """
import warnings
import torch
from kernels import cpu
from mxfp4 import MXFP4Linear, dequantize
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert not cpu.available()
    assert not cpu.available()  # a second call neither retries nor warns again
print("REASON:", cpu.unavailable_reason())
print("WARNINGS:", sum("specqd" in str(w.message) for w in caught))
try:
    zeros = torch.zeros(4, 17, dtype=torch.uint8)
    cpu.mxfp4_linear(torch.randn(1, 32), zeros[:, :16], zeros[:, 16:])
    print("CALL: ran")
except RuntimeError:
    print("CALL: refused")
# The model's layer still works, on PyTorch's path.
layer = MXFP4Linear.from_linear(torch.nn.Linear(64, 24, bias=False))
import accel
accel.accelerate(layer)  # the twin must fall back to the plain layer's maths
x = torch.randn(3, 64)
ref = x @ dequantize(layer.codes, layer.scales, torch.float32).T
torch.testing.assert_close(layer(x), ref)
print("LAYER: ok")
"""


def test_disabled_by_environment():
    r = _run(FALLBACK_CHECK, SPECQD_NO_CPU_KERNELS="1")
    assert r.returncode == 0, r.stderr
    assert "REASON: disabled by SPECQD_NO_CPU_KERNELS" in r.stdout
    assert "WARNINGS: 0" in r.stdout  # asked for: no warning
    assert "CALL: refused" in r.stdout and "LAYER: ok" in r.stdout


def test_build_failure_falls_back_with_one_warning(tmp_path):
    """No working compiler: one warning, available() False, PyTorch's path still works."""
    r = _run(FALLBACK_CHECK, CXX="/bin/false", SPECQD_CACHE_DIR=str(tmp_path), SPECQD_NO_CPU_KERNELS="0")
    assert r.returncode == 0, r.stderr
    reason = next(line for line in r.stdout.splitlines() if line.startswith("REASON:"))
    assert "build failed" in reason or "x86-64 only" in reason, reason
    assert "WARNINGS: 1" in r.stdout
    assert "CALL: refused" in r.stdout and "LAYER: ok" in r.stdout


def test_vdpbf16ps_kernel_gives_the_same_bits(kernels, tmp_path):
    """The optional vdpbf16ps kernel equals the default FMA kernel bit for bit (normal numbers), across
    M too. Run in a subprocess with SPECQD_CPU_BF16_DOT=force: skipped where the instruction is absent
    (SIGILL), which CPUID may not tell (hypervisors hide it)."""
    code = """
import torch
from kernels import cpu
assert cpu.available() and cpu.info()["bf16_dot"]
g = torch.Generator().manual_seed(0)
out = {}
for n, k in [(131, 576), (9, 33), (5, 1)]:
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(17, k, generator=g)
    single = torch.cat([cpu.bf16_linear(x[i : i + 1], w) for i in range(17)])
    out[(n, k)] = (cpu.bf16_linear(x, w), single, x, w)
torch.save(out, OUT)
"""
    path = tmp_path / "dot.pt"
    r = _run(f"OUT = {str(path)!r}\n" + code, SPECQD_CPU_BF16_DOT="force")
    if r.returncode in (-4, 132):  # SIGILL
        pytest.skip("this CPU cannot execute vdpbf16ps")
    assert r.returncode == 0, r.stderr
    out = torch.load(path)
    for (n, k), (y_all, y_single, x, w) in out.items():
        assert torch.equal(y_all, y_single), (n, k)
        assert torch.equal(y_all, kernels.bf16_linear(x, w)), (n, k)


def test_serial_aten_keeps_the_kernels_threads_and_gives_them_back(kernels):
    """Inside serial_aten ATen has one thread and the kernels the count torch had; all_threads hands
    ATen that count back for one operation; nesting changes nothing; everything is restored on exit,
    also after an exception; and the linears give the same bits inside as outside."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(300, 64, generator=g).bfloat16()
        x = torch.randn(3, 64, generator=g)
        y = kernels.bf16_linear(x, w)
        with kernels.serial_aten():
            assert torch.get_num_threads() == 1 and kernels.info()["threads"] == 2
            with kernels.serial_aten():
                assert torch.get_num_threads() == 1 and kernels.info()["threads"] == 2
            assert torch.get_num_threads() == 1
            with kernels.all_threads():
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
            assert torch.equal(kernels.bf16_linear(x, w), y)
        assert torch.get_num_threads() == 2 and kernels.info()["threads"] == 2
        with pytest.raises(RuntimeError, match="boom"), kernels.serial_aten():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
        with kernels.serial_aten(False), kernels.all_threads():  # not enabled: nothing changes
            assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert kernels.info()["threads"] == 1  # outside, the kernels follow torch's count again
    finally:
        torch.set_num_threads(before)


def test_copy_slots_copies_exactly_those_slots(kernels):
    """copy_slots: dst[:, :, start:end] = src[:, :, start:end] for every pair (bf16 and fp32, caches of
    different lengths), nothing else touched; bad shapes and ranges are errors, not memory faults."""
    g = gen(5)
    src = [torch.randn(2, 3, 40, 16, generator=g).to(dt) for dt in (torch.bfloat16, torch.float32)]
    dst = [torch.zeros(2, 3, 24, 16, dtype=t.dtype) for t in src]
    for start, end in [(0, 1), (5, 17), (23, 24), (7, 7)]:
        want = [d.clone() for d in dst]
        for w, t in zip(want, src):
            w[:, :, start:end] = t[:, :, start:end]
        kernels.copy_slots(dst, src, start, end)
        assert all(torch.equal(d, w) for d, w in zip(dst, want))
    with pytest.raises(RuntimeError, match="outside"):
        kernels.copy_slots(dst, src, 20, 25)
    with pytest.raises(RuntimeError, match="alike"):
        kernels.copy_slots([torch.zeros(2, 4, 24, 16)], [src[1]], 0, 1)
    with pytest.raises(RuntimeError, match="destinations"):
        kernels.copy_slots(dst, src[:1], 0, 1)


# --- the rest of the decode step: attention over the cache, RMSNorm, RoPE -------------------------


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,kvh,d", [(9, 3, 64), (4, 4, 16), (8, 1, 128)])
def test_attention_matches_sdpa_and_is_identical_for_every_t(kernels, dtype, h, kvh, d):
    g = gen(h * d)
    s, t = 70, 9
    k = torch.randn(2, kvh, s, d, generator=g).to(dtype)
    v = torch.randn(2, kvh, s, d, generator=g).to(dtype)
    q = torch.randn(2, h, t, d, generator=g).to(dtype)
    mask = torch.tril(torch.ones(s, s, dtype=torch.bool))[torch.arange(40, 40 + t)]
    mask[3, 5:20] = False  # holes, as a tree mask has
    y = kernels.attention(q, k, v, mask)
    assert y.dtype == dtype and y.shape == q.shape
    # fp32: a few ulps of the outputs (|y| <= max |v|); bf16: the output rounding on top
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), _sdpa(q, k, v, mask), atol=tol, rtol=tol)
    one_by_one = torch.cat(
        [kernels.attention(q[:, :, i : i + 1], k, v, mask[i : i + 1]) for i in range(t)], 2
    )
    assert torch.equal(y, one_by_one)


def test_attention_takes_strided_q_and_rejects_bad_shapes(kernels):
    g = gen(1)
    q = torch.randn(1, 5, 2, 32, generator=g).transpose(1, 2)  # [1, 2, 5, 32], as the model's view
    k = v = torch.randn(1, 1, 8, 32, generator=g)
    mask = torch.ones(5, 8, dtype=torch.bool)
    torch.testing.assert_close(kernels.attention(q, k, v, mask), _sdpa(q, k, v, mask), atol=2e-6, rtol=2e-6)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        kernels.attention(q, k, v, mask[:4])
    with pytest.raises(RuntimeError, match="query heads"):
        kernels.attention(torch.randn(1, 3, 5, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_rope_follow_the_model(kernels, dtype):
    import model

    g = gen(7)
    norm = model.RMSNorm(576, 1e-5).to(dtype).requires_grad_(False)
    norm.weight.copy_(1 + 0.1 * torch.randn(576, generator=g))
    x = torch.randn(3, 5, 576, generator=g).to(dtype)
    y = kernels.rms_norm(x, norm.weight, norm.eps)
    xf = x.float()
    ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
    # only the sum of squares is added in another order (in double here): fp32 results within an ulp or two
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(
        torch.cat([kernels.rms_norm(x[:, i : i + 1], norm.weight, 1e-5) for i in range(5)], 1), y
    )

    freqs = model.rope_table(model.ModelArgs(dim=576, n_head=9, head_dim=64), 5)
    q = torch.randn(1, 5, 9, 64, generator=g).to(dtype).transpose(1, 2)
    x1, x2 = q.float().chunk(2, dim=-1)
    cos, sin = freqs[..., 0], freqs[..., 1]
    expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)
    assert torch.equal(kernels.rope(q, freqs), expected)  # the same operations in the same order


@pytest.mark.parametrize("fmt", ["bf16", "mxfp4", "int4", "mxfp4-fp32"])
def test_fused_block_gives_the_eager_bits(kernels, fmt, monkeypatch):
    """block.cpp runs model.py's TransformerBlock in one call, and all the blocks of a model in another:
    the same bits as the eager path, for every weight format, activation dtype and token count, and they
    step aside where they must (hooks)."""
    import accel
    import int4
    import mxfp4
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_local_heads=2, dim=128)
    dtype = torch.float32 if fmt.endswith("fp32") else torch.bfloat16
    model = Transformer(args).to(dtype).eval().requires_grad_(False)
    fmt = fmt.removesuffix("-fp32")
    model = {"bf16": model, "mxfp4": mxfp4.quantize_model(model), "int4": int4.quantize_model(model)}[fmt]
    accel.accelerate(model)
    ids = torch.randint(0, 300, (1, 12))
    calls = {accel.FastBlock: [], accel.FastTransformer: []}
    originals = {twin: twin._fused for twin in calls}

    def counting(twin):
        fused = originals[twin]

        def counted(self, *a):
            out = fused(self, *a)
            calls[twin].append(out is not None)
            return out

        return counted

    # A token tree after the 9th token: scratch slots 20-22 at depths (positions) 9, 10, 10, each
    # node seeing the sequence and its ancestors only.
    tree_mask = torch.zeros(3, 64, dtype=torch.bool)
    tree_mask[:, :9] = True
    tree_mask[[0, 1, 1, 2, 2], [20, 20, 21, 20, 22]] = True

    def run(stack: bool, blocks: bool):
        """The forwards, with FastTransformer's one call for all blocks and FastBlock's per block each on
        (counted) or off (returning None, as when they step aside)."""
        for twin, on in ((accel.FastTransformer, stack), (accel.FastBlock, blocks)):
            monkeypatch.setattr(twin, "_fused", counting(twin) if on else lambda self, *a: None)
            calls[twin].clear()
        model.setup_caches(1, 64)
        forwards = [
            ((ids[:, :5], torch.arange(5)), {}),
            ((ids[:, 5:9], torch.arange(5, 9)), {"last": 2}),
            ((ids[:, 9:12], torch.tensor([20, 21, 22]), tree_mask, torch.tensor([9, 10, 10])), {}),
        ] + [((ids[:, i : i + 1], torch.tensor([i])), {}) for i in range(9, 12)]
        out = []
        with torch.no_grad():
            for a, kw in forwards:  # the logits, and the final-normed states a feature head reads
                out += [model(*a, **kw), model.features]
        return out

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    eager = run(stack=False, blocks=False)
    assert same(run(stack=False, blocks=True), eager)
    assert calls[accel.FastBlock] and all(calls[accel.FastBlock])  # the fused path ran for every block
    assert same(run(stack=True, blocks=True), eager)
    assert calls[accel.FastTransformer] and all(calls[accel.FastTransformer])  # and for every forward
    assert not calls[accel.FastBlock]  # the stack's call stood in for the blocks'
    # The fused calls' weights are kept between calls (the plans in accel.py): a layer or a weight
    # replaced after a forward is still what runs.
    ffn = model.layers[0].feed_forward
    ffn.w2 = accel.FastLinear(ffn.w2.in_features, ffn.w2.out_features, bias=False).to(torch.bfloat16)
    model.layers[1].attention_norm.weight = torch.nn.Parameter(torch.full((128,), 0.5, dtype=dtype))
    eager = run(stack=False, blocks=False)
    assert same(run(stack=False, blocks=True), eager) and all(calls[accel.FastBlock])
    assert same(run(stack=True, blocks=True), eager) and all(calls[accel.FastTransformer])
    assert model.__dict__["_fused_plan"].with_head  # the final norm and the head ran in the same call
    # A head without a kernel (here: a bias) runs as a module after the stack's blocks.
    model.output = accel.FastLinear(128, 300, bias=True).to(dtype)
    eager = run(stack=False, blocks=False)
    assert same(run(stack=True, blocks=True), eager) and all(calls[accel.FastTransformer])
    assert not model.__dict__["_fused_plan"].with_head
    # A forward hook (tensor parallelism's all-reduce is one) sends its block back to the eager path,
    # and the stack steps aside for the blocks to decide one by one.
    model.layers[0].attention.register_forward_hook(lambda m, a, out: out)
    run(stack=True, blocks=True)
    assert not any(calls[accel.FastTransformer])
    assert calls[accel.FastBlock][:2] == [False, True]


def test_a_decoding_loop_checks_the_fused_plan_once_per_epoch(kernels):
    """Inside cpu_kernels.decoding_loop the stack's plan is checked once, then trusted; replacing a
    layer there (a module registration), or accelerate(), starts a new epoch and the plan is read
    again, so what runs is still what the model holds. Outside a loop every call checks."""
    import accel
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_local_heads=2, dim=128)
    model = Transformer(args).to(torch.bfloat16).eval().requires_grad_(False)
    accel.accelerate(model)
    model.setup_caches(1, 64)
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(1))

    def step(i):
        with torch.no_grad():
            return model(ids[:, i : i + 1], torch.tensor([i]))

    def poison(plan):  # a plan that no longer holds if it is checked
        plan.sizes = [-1] + plan.sizes[1:]

    assert cpu_kernels.loop_epoch() is None
    step(0)
    plan = model.__dict__["_fused_plan"]
    poison(plan)
    step(1)
    assert model.__dict__["_fused_plan"] is not plan  # outside a loop: checked, found stale, remade
    with cpu_kernels.decoding_loop():
        step(2)  # a new epoch: checked once
        plan = model.__dict__["_fused_plan"]
        assert plan.epoch == cpu_kernels.loop_epoch()
        poison(plan)
        step(3)
        assert model.__dict__["_fused_plan"] is plan  # trusted within the epoch
        # A layer replaced inside the loop: a registration, a new epoch, the plan read again.
        ffn = model.layers[0].feed_forward
        ffn.w2 = accel.FastLinear(ffn.w2.in_features, ffn.w2.out_features, bias=False).to(torch.bfloat16)
        with pytest.MonkeyPatch.context() as mp:  # the eager path (it writes the same cache slot alike)
            mp.setattr(accel.FastTransformer, "_fused", lambda self, *a: None)
            mp.setattr(accel.FastBlock, "_fused", lambda self, *a: None)
            eager = step(4)
        assert torch.equal(step(4), eager)  # the replaced layer ran in the fused call
        assert model.__dict__["_fused_plan"] is not plan
        plan = model.__dict__["_fused_plan"]
        poison(plan)
        accel.accelerate(model)  # classes and flags: announced by accelerate itself
        step(5)
        assert model.__dict__["_fused_plan"] is not plan


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_smollm2_verification_forward_equals_single_steps(kernels, smollm2, dtype):
    """The whole model on the CPU path: a forward over 8 tokens gives bit-identical logits to 8
    one-token steps, for the bf16 target (our bf16 kernel) and for the MXFP4 draft in both dtypes.
    The fp32 target is the exception: its linears are torch's GEMM, whose blocking depends on M."""
    from accel import accelerate
    from checkpoint import build_model
    from mxfp4 import quantize_model
    from speculate import ModelLevel

    model32, tok = smollm2
    model = (
        build_model(model32.config, model32.state_dict(), "cpu", dtype) if dtype != torch.float32 else model32
    )
    ids = torch.tensor(tok.encode("The quick brown fox jumps over the lazy dog and then", False))
    cases = [("mxfp4", quantize_model(model))] + ([("target", model)] if dtype == torch.bfloat16 else [])
    for name, m in cases:
        accelerate(m)
        level = ModelLevel(m, name)
        level.reset(32)
        level.forward(ids[:5], 0)
        together = level.forward(ids[5:13], 5)
        apart = torch.cat([level.forward(ids[i : i + 1], i) for i in range(5, 13)])
        assert torch.equal(together, apart), f"{name} {dtype}: {(together - apart).abs().max():.3g}"


@pytest.mark.slow
def test_smollm2_bf16_greedy_speculation_equals_plain_decoding(kernels, smollm2):
    """With verification logits bit-identical to one-token steps, greedy speculation must return the
    bf16 target's own greedy tokens exactly, with no near-tie excuse: MXFP4 + student drafts, 40 tokens."""
    from checkpoint import build_model
    from levels import build_levels
    from speculate import TreeShape, autoregressive_decode, speculative_decode

    model32, tok = smollm2
    target = build_model(model32.config, model32.state_dict(), "cpu", torch.bfloat16)
    text = tok.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}])
    prompt = torch.tensor(tok.encode(text, bos=tok.add_bos))
    levels = build_levels(target, tok, [("mxfp4", 3), ("student", 2)], torch.device("cpu"), torch.bfloat16)
    plain, _ = autoregressive_decode(levels[0], prompt, 40)
    fast, _ = speculative_decode(levels, prompt, 40, k=[3, 2])
    assert fast.tolist() == plain.tolist()
    # The SpecMQuant hierarchy: the student drafts trees that the MXFP4 level verifies (tree masks, moved
    # keys/values), and it hands sequences to the target. The attention kernel visits a tree node's
    # visible slots in increasing order, as a sequential step does, so this is bit-exact too.
    fast, stats = speculative_decode(levels, prompt, 40, k=[4, 2], trees=[None, TreeShape(nodes=8, topk=3)])
    assert fast.tolist() == plain.tolist() and stats.levels[2].tree_nodes > 0
    # A 4-bit (int4) target keeps its own greedy tokens, bit for bit, under tiny's trees (the feature
    # head, reading the int4 target's features).
    levels = build_levels(
        target, tok, [("tiny", 3)], torch.device("cpu"), torch.bfloat16, target_quant="int4"
    )
    plain, _ = autoregressive_decode(levels[0], prompt, 40)
    fast, _ = speculative_decode(levels, prompt, 40, k=[3], trees=[TreeShape(nodes=6, topk=2)])
    assert fast.tolist() == plain.tolist()


@pytest.mark.slow
def test_smollm2_bf16_greedy_speculation_with_the_head_equals_plain_decoding(kernels, smollm2):
    """The trained feature head (head.py) under the bf16 target, drafting sequences and trees, and
    under the MXFP4 level (ML-SpecQD with a head as its small draft): plain decoding's tokens, bit for
    bit, and the head's drafts are accepted (it read the right features)."""
    from checkpoint import build_model
    from levels import build_levels
    from speculate import TreeShape, autoregressive_decode, speculative_decode

    model32, tok = smollm2
    target = build_model(model32.config, model32.state_dict(), "cpu", torch.bfloat16)
    text = tok.apply_chat_template([{"role": "user", "content": "Explain what a compiler does."}])
    prompt = torch.tensor(tok.encode(text, bos=tok.add_bos))
    cpu = torch.device("cpu")
    levels = build_levels(target, tok, [("head", 3)], cpu, torch.bfloat16)
    plain, _ = autoregressive_decode(levels[0], prompt, 40)
    for trees in (None, [TreeShape(nodes=6, topk=2)]):
        fast, stats = speculative_decode(levels, prompt, 40, k=[3], trees=trees)
        assert fast.tolist() == plain.tolist()
        assert stats.levels[1].accepted_at[0] >= 0.15 * stats.levels[1].reached[0], stats.levels[1]
    levels = build_levels(target, tok, [("mxfp4", 3), ("head", 2)], cpu, torch.bfloat16)
    fast, _ = speculative_decode(levels, prompt, 40, k=[3, 2])
    assert fast.tolist() == plain.tolist()


@pytest.mark.parametrize("native", [False, True])
def test_long_linear_takes_bf16_gemm_only_where_bf16_is_native(kernels, monkeypatch, native):
    """accel.long_linear: torch's bf16 GEMM for bf16 x and w where the CPU multiplies bf16 natively,
    else fp32 (x and w widened exactly, the result rounded to x's dtype); an fp32 weight (a decoded int4
    one) always takes fp32. And a long MXFP4 forward gives exactly the long forward of its decoded weight."""
    import accel

    monkeypatch.setattr(kernels, "native_bf16", lambda: native)
    x = torch.randn(80, 96, generator=gen(3)).to(torch.bfloat16)
    w = torch.randn(40, 96, generator=gen(4)).to(torch.bfloat16)
    wide = F.linear(x.float(), w.float()).to(torch.bfloat16)
    assert torch.equal(accel.long_linear(x, w), F.linear(x, w) if native else wide)
    assert torch.equal(accel.long_linear(x, w.float()), wide)
    lin = torch.nn.Linear(96, 40, bias=False)
    lin.weight.data = w.float()
    q = accel.FastMXFP4Linear.from_linear(lin)
    decoded = kernels.mxfp4_weight_f32(q.codes, q.scales)
    expect = (
        F.linear(x, decoded.to(torch.bfloat16)) if native else F.linear(x.float(), decoded).to(torch.bfloat16)
    )
    with torch.no_grad():
        assert torch.equal(q(x), expect)


@pytest.mark.slow
def test_smollm2_long_prompt_prefill_takes_torchs_gemm_and_stays_identical(kernels, smollm2, monkeypatch):
    """A prompt longer than accel.LONG_FORWARD is prefilled through accel.long_linear (torch's GEMM, in
    bf16 or fp32; FastBlock steps aside), not the M-invariant kernels, and greedy speculation still returns
    plain decoding's tokens bit for bit: both prefill the prompt but its last token the same way."""
    import accel
    from checkpoint import build_model
    from levels import build_levels
    from speculate import autoregressive_decode, speculative_decode

    model32, tok = smollm2
    target = build_model(model32.config, model32.state_dict(), "cpu", torch.bfloat16)
    passage = "The old lighthouse keeper climbed the stairs every evening to light the lamp. " * 8
    text = tok.apply_chat_template([{"role": "user", "content": "Summarize: " + passage}])
    prompt = torch.tensor(tok.encode(text, bos=tok.add_bos))
    assert prompt.numel() > accel.LONG_FORWARD + 1
    levels = build_levels(target, tok, [("mxfp4", 3)], torch.device("cpu"), torch.bfloat16)
    rows = []
    long_linear = accel.long_linear
    monkeypatch.setattr(accel, "long_linear", lambda x, w: rows.append(x.shape[-2]) or long_linear(x, w))
    plain, _ = autoregressive_decode(levels[0], prompt, 24)
    assert rows and set(rows) == {prompt.numel() - 1}  # the prefill went to torch's GEMM, nothing else
    fast, _ = speculative_decode(levels, prompt, 24, k=[3])
    assert fast.tolist() == plain.tolist()


@pytest.mark.parametrize("fmt", ["bf16", "mxfp4-i8", "mxfp4-fp32", "int4"])
def test_float_logits_give_the_forwards_bits(kernels, fmt):
    """FastTransformer.float_logits (Stack.step: the embedding, RoPE and mask rows gathered in C++, the
    logits widened there) returns model(idx, pos, last=last)[0].float() and the same features, bit for
    bit, and writes the same caches (two copies of the model, one decoding each way); a bad token id is
    a clear error, and where the one call does not apply (a hook, an embedding with max_norm) it returns
    None and the caller runs forward."""
    import copy

    import accel
    import int4
    import mxfp4
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_local_heads=2, dim=128)
    dtype = torch.float32 if fmt.endswith("fp32") else torch.bfloat16
    model = Transformer(args).to(dtype).eval().requires_grad_(False)
    if fmt.startswith("mxfp4"):
        model = mxfp4.quantize_model(model)
    elif fmt == "int4":
        model = int4.quantize_model(model)
    accel.accelerate(model, int8_activations=fmt.endswith("i8"))
    slow_model = copy.deepcopy(model)
    for m in (model, slow_model):
        m.setup_caches(1, 64)
    ids = torch.randint(0, 300, (1, 12), generator=gen(1))
    forwards = [(0, 5, None), (5, 9, 2), (9, 10, None), (10, 11, 1), (11, 12, None)]
    with torch.no_grad():
        for start, end, last in forwards:
            idx, pos = ids[:, start:end], torch.arange(start, end)
            fast = model.float_logits(idx, pos, last=last)
            assert fast is not None and fast.dtype == torch.float32
            slow = slow_model(idx, pos, last=last)[0].float()
            assert torch.equal(fast, slow) and torch.equal(model.features, slow_model.features)
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            model.float_logits(torch.tensor([[300]]), torch.tensor([12]))
        step = ids[:, :1], torch.tensor([12])
        handle = model.register_forward_hook(lambda *a: None)
        assert model.float_logits(*step) is None
        handle.remove()
        handle = model.tok_embeddings.register_forward_pre_hook(lambda *a: None)
        assert model.float_logits(*step) is None
        handle.remove()
        model.tok_embeddings.max_norm = 1.0
        assert model.float_logits(*step) is None
        model.tok_embeddings.max_norm = None
        assert model.float_logits(*step) is not None


@pytest.mark.parametrize("fmt", ["bf16", "mxfp4", "mxfp4-i8"])
def test_fused_forward_bits_do_not_depend_on_threads_or_prefetch(kernels, fmt):
    """The pool splits a linear into a run of chunks per thread (the rest claimed in turn), and its idle
    helpers prefetch the rows they will compute next (thread_pool.h): where and when a row is computed
    changes, its bits must not. A fused forward at SmolLM2's widths (several chunks per linear) on 1, 2
    and 3 threads, prefetching or not, gives the same logits."""
    import accel
    import mxfp4
    from model import ModelArgs, Transformer

    if fmt == "mxfp4-i8" and not kernels.vnni_available():
        pytest.skip("the CPU lacks AVX512-VNNI")
    torch.manual_seed(0)
    args = ModelArgs(block_size=32, vocab_size=1000, n_layer=2, n_head=9, n_local_heads=3, dim=576,
                     intermediate_size=1536)  # fmt: skip
    model = Transformer(args).to(torch.bfloat16).eval().requires_grad_(False)
    if fmt != "bf16":
        model = mxfp4.quantize_model(model)
    accel.accelerate(model, int8_activations=fmt.endswith("i8"))
    ids = torch.randint(0, 1000, (1, 9))

    def run(threads, prefetch):
        torch.set_num_threads(threads)
        kernels.set_prefetch(prefetch)
        model.setup_caches(1, 32)
        with torch.no_grad():
            out = [model(ids[:, :5], torch.arange(5))]
            out += [model(ids[:, i : i + 1], torch.tensor([i])) for i in range(5, 9)]
        return out

    saved = torch.get_num_threads()
    try:
        reference = run(1, False)
        for threads in (2, 3):
            for prefetch in (True, False):
                same = all(torch.equal(a, b) for a, b in zip(run(threads, prefetch), reference, strict=True))
                assert same, f"{threads} threads, prefetch {prefetch}"
    finally:
        torch.set_num_threads(saved)
        kernels.set_prefetch(True)


@given(
    st.lists(
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan"), 3.0e38, -7.0]),
        min_size=1,
        max_size=70,
    ),
    st.integers(1, 3),
)
@settings(max_examples=300, deadline=None)
def test_argmax_is_torchs(kernels, values, rows):
    """The kernel's argmax returns torch.argmax's indices, ties (-0 and +0 too), infinities and NaN
    included, for rows of every length around the 16-lane blocks."""
    x = torch.tensor(values, dtype=torch.float32).roll(rows).repeat(rows, 1)
    x[-1] = torch.tensor(values, dtype=torch.float32)
    assert kernels.argmax_takes(x)
    assert kernels.argmax(x).tolist() == torch.argmax(x, dim=-1).tolist()
    assert kernels.argmax(x[0]).item() == torch.argmax(x[0]).item()


def test_argmax_on_random_logits(kernels):
    """A vocabulary's worth of random logits, with repeated maxima planted in the tail block."""
    x = torch.randn(4, 49157, generator=gen(3))
    x[1, -3:] = x[1].max() + 1
    x[2, 100] = x[2, -1] = x[2].max() + 1
    assert kernels.argmax(x).tolist() == torch.argmax(x, dim=-1).tolist()
    with pytest.raises(RuntimeError, match="argmax"):
        kernels.argmax(x.to(torch.bfloat16))
