"""The CPU decode step in C++ (AVX-512): weight-only linears y [..., N] = x [..., K] @ W.T, attention
over the KV cache, RMSNorm and RoPE.

    from kernels import cpu as cpu_kernels
    if cpu_kernels.available():                    # builds the extension on first use
        y = cpu_kernels.mxfp4_linear(x, codes, scales)   # W in MXFP4, mxfp4.py's layout as is
        y = cpu_kernels.int4_linear(x, codes, scales)    # W in int4 (W4A16), int4.py's layout as is
        if cpu_kernels.vnni_available():                 # the same weights, x rounded to int8 (W4A8)
            y = cpu_kernels.mxfp4_linear_i8(x, codes, scales)
            y = cpu_kernels.int4_linear_i8(x, codes, scales)
        y = cpu_kernels.bf16_linear(x, w_bf16)           # W in bf16 [N, K]
        y = cpu_kernels.attention(q, k_cache, v_cache, mask)   # [B, H, T, D] over [B, KVH, S, D]
        y = cpu_kernels.rms_norm(x, weight, eps); y = cpu_kernels.rope(q, freqs)

Who calls them: the kernel-backed twins of model.py's, mxfp4.py's and int4.py's modules in
accel.py, each behind `usable(...)` with the plain module's own code as the fallback. Every one of
them computes each output row alone, by the same operations whatever the number of rows, so a
verification forward over k+1 tokens gives bit-identical logits to k+1 one-token steps (with bf16,
MXFP4 or int4 weights; an fp32 target still goes through torch's GEMM, which is not M-invariant).

The linears take x in float32 or bfloat16 of any shape [..., K] and return [..., N] in x's dtype,
accumulated in fp32. No autograd (call them under torch.no_grad() or inference_mode), no bias.

  mxfp4_linear  the weight as quantized: codes uint8 [N, K/2], scales uint8 [N, K/32], no repacking.
                Equals dequantize-then-matmul up to the order of the fp32 additions (the decoded
                weights are exact).
  int4_linear   the weight as quantized: codes uint8 [N, K/2] (nibble = q + 8), scales bf16 or fp16
                [N, K/G] (G, read from the shapes, a multiple of 32), no repacking. Equals
                dequantize(codes, scales, float32)-then-matmul up to the order of the fp32 additions
                (q * scale is exact in fp32).
  mxfp4_linear_i8, int4_linear_i8
                the same weights, repacked once by pack_i8 into stripes of 16 rows (N a multiple of
                16; int4 scales as fp32), with x quantized to int8 per block of 32 elements (one fp32 scale
                each, amax / 127, round half to even), exact integer dot products per block (AVX512-VNNI
                vpdpbusd), each block's sum scaled by (weight scale x activation scale) and added in
                fp32 in a fixed order: kernels_vnni.cpp gives the maths to the rounding, and
                tests/test_vnni.py reproduces it bit for bit in PyTorch. Faster than the exact kernels
                where those are bound by decoding (not by memory), but not their bits: rounding x to
                8 bits changes a level's numerics, so accel.py makes it a per-layer choice
                (int8_activations). Needs vnni_available(); M-invariant like the others.
  bf16_linear   x is rounded to bf16 (nearest even) first, as vdpbf16ps needs, so the result is that
                of a bf16 x bf16 matmul with fp32 accumulation, on every CPU. The default kernel does
                exact fp32 FMAs on the bf16 values (bf16 -> fp32 is a shift), odd element then even
                element of each pair: the order of vdpbf16ps, which the optional vdpbf16ps kernel
                (SPECQD_CPU_BF16_DOT) uses, so both give the same bits except that vdpbf16ps treats
                subnormal inputs and results as zero. vdpbf16ps was no faster at M = 1 and 1.4x
                slower at M = 8..16 on a Xeon we measured, 1.0-1.4x faster at M = 1..8 on a Zen 5:
                by default the kernel is chosen by timing both once, at load.

Bit-identical across M: for any output y[m, n] the same floating-point operations run in the same
order whether x has 1 row or 16 (or 100), and whatever the number of threads (the work is split over
N only). So a verification forward over k+1 tokens gets exactly the linear outputs of k+1 one-token
steps. See kernels_avx512.cpp for the tiling and the argument.

Threads: torch.get_num_threads() of them (torch.set_num_threads; inside serial_aten, the count torch
had on entry, while ATen itself runs on one thread), from a small pool of our own in
which the caller never waits for a helper that has not started (thread_pool.h says why: OpenMP's
fork-join took a scheduler time slice per call on a busy machine). Matrices under ~48 KB of weight
run on the calling thread only.

torch.compile: the functions are also the operators torch.ops.specqd_cpu.* (mxfp4_linear, int4_linear,
bf16_linear, ..., with shape functions), and under compilation the wrappers below call those, so a
model that uses them compiles with fullgraph=True (the compiler runs available() once while tracing, so
the library is built or loaded then).

Build. On first use the sources here are compiled with torch.utils.cpp_extension.load (g++ or the
compiler in $CXX, and ninja) into ~/.cache/specqd/cpu_kernels/<hash>/ ($SPECQD_CACHE_DIR or
$XDG_CACHE_HOME move it); later processes load the cached library. If the build fails, the CPU is
not x86-64 with AVX-512 (F, BW, DQ, VL), or SPECQD_NO_CPU_KERNELS=1 is set, available() is False
(with one warning saying why, except for the environment variable) and callers keep to PyTorch.

Environment (read once, when the extension is first loaded):
  SPECQD_NO_CPU_KERNELS=1   never build or use the kernels.
  SPECQD_CPU_BF16_DOT=auto  (or unset) bf16_linear uses vdpbf16ps where the CPU reports avx512_bf16
                            and it times faster there at load (_bf16_dot_pays), else the FMA kernel.
  SPECQD_CPU_BF16_DOT=1     ... vdpbf16ps whenever the CPU reports avx512_bf16; 0: never.
  SPECQD_CPU_BF16_DOT=force ... even when it does not (a hypervisor can hide the feature; testing
                            only: SIGILL on hardware without it).

This package imports nothing of the project's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

__all__ = [
    "available",
    "loaded",
    "unavailable_reason",
    "mxfp4_linear",
    "int4_linear",
    "mxfp4_linear_i8",
    "int4_linear_i8",
    "pack_i8",
    "decoding_loop",
    "loop_epoch",
    "models_changed",
    "vnni_available",
    "bf16_linear",
    "mxfp4_weight_f32",
    "mxfp4_weight_bf16",
    "int4_weight_f32",
    "block",
    "blocks",
    "copy_slots",
    "serial_aten",
    "all_threads",
    "decodes_on_kernels",
    "attention",
    "rms_norm",
    "rope",
    "info",
]

_SOURCES = (
    "ops.cpp", "kernels_avx512.cpp", "kernels_vnni.cpp", "attention_avx512.cpp", "norm_rope.cpp", "block.cpp",
    "glue_avx512.cpp",
)  # fmt: skip
_HEADERS = ("kernels.h", "thread_pool.h", "scalar.h")
# -O3 and nothing target-specific: the kernels carry their own target attributes and are only called
# after a run-time CPU check. -ffp-contract=off: no fused multiply-adds other than the written ones.
_CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno")

_EXT = None  # the loaded extension module
_TRIED = False
_REASON: str | None = None  # why the kernels are unavailable


def _cache_dir() -> Path:
    root = os.environ.get("SPECQD_CACHE_DIR")
    if root:
        return Path(root) / "cpu_kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "specqd" / "cpu_kernels"


def _build_dir(flags: tuple[str, ...]) -> Path:
    """A folder named by a hash of everything the binary depends on, so that edits or a new torch
    never load a stale library (torch's own versioning would rebuild in place, racing with other
    processes)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _SOURCES + _HEADERS:
        h.update((here / name).read_bytes())
    # ninja too: ninja 1.11 (a system package) and 1.13 (pip's, on PATH when the virtual environment is
    # activated) logged the same commands under different hashes, so processes alternating between them
    # in one folder rebuilt everything (about a minute) every time.
    ninja = shutil.which("ninja") or ""
    for part in (torch.__version__, sys.version, " ".join(flags), os.environ.get("CXX", ""), ninja):
        h.update(part.encode())
    return _cache_dir() / h.hexdigest()[:16]


def _build(flags: tuple[str, ...]):
    import fcntl  # POSIX only; elsewhere the ImportError means PyTorch's path

    from torch.utils import cpp_extension

    # torch runs `ninja` from PATH; `pip install ninja` puts it next to the interpreter, which is not on
    # PATH when the virtual environment is used without being activated (as `make test` does).
    venv_bin = Path(sys.executable).parent
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    here = Path(__file__).parent
    build_dir = _build_dir(flags)
    if not any(build_dir.glob("*.so")):
        print("specqd: compiling the CPU kernels (first use, about a minute)...", file=sys.stderr)
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's own build lock is a plain file that a killed build leaves behind, and every later
    # process then waits on it forever. An flock dies with its holder: under it, a leftover file
    # can only be stale.
    with open(build_dir / "specqd.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        return cpp_extension.load(
            name="specqd_cpu_kernels",
            sources=[str(here / s) for s in _SOURCES],
            extra_cflags=list(flags),
            extra_include_paths=[str(here)],
            build_directory=str(build_dir),
            verbose=False,
        )


def _load():
    """Build (first time) or load the extension; returns it, or None with _REASON set."""
    global _REASON
    if os.environ.get("SPECQD_NO_CPU_KERNELS", "0") not in ("", "0"):
        _REASON = "disabled by SPECQD_NO_CPU_KERNELS"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _REASON = f"the kernels are x86-64 only (this is {platform.machine()})"
        return None
    try:
        ext = _build(_CFLAGS)
    except Exception as e:  # no compiler, no ninja, a compile error: PyTorch's path it is
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        _REASON = f"the build failed ({first[:300]})"
        return None
    if not ext.cpu_has_avx512():
        _REASON = "the CPU lacks AVX-512 (F, BW, DQ, VL)"
        return None
    choice = os.environ.get("SPECQD_CPU_BF16_DOT", "auto")
    if choice in ("", "auto"):
        ext.set_bf16_dot_mode(1 if ext.cpu_has_avx512_bf16() and _bf16_dot_pays(ext) else 0)
    else:
        ext.set_bf16_dot_mode({"1": 1, "force": 2}.get(choice, 0))
    _register_fakes()
    return ext


def best_times(runs: dict, repeats: int) -> dict:
    """{key: the best of `repeats` timings of runs[key]()}, the runs taking turns after one untimed
    warm-up each, so that a change of load hits all of them alike. For choosing a kernel by timing
    (_bf16_dot_pays here, accel.int8_pays)."""
    best = dict.fromkeys(runs, float("inf"))
    for i in range(repeats + 1):
        for key, run in runs.items():
            t0 = time.perf_counter()
            run()
            if i:
                best[key] = min(best[key], time.perf_counter() - t0)
    return best


def _bf16_dot_pays(ext, rows=(1, 2), repeats=3) -> bool:
    """Whether vdpbf16ps makes bf16_linear faster here, timed before any other call (the mode is set
    once: the two kernels differ only on subnormals, but a run should not mix them): 106 MB of bf16
    weight in SmolLM2's MLP shape (more than a last-level cache, so read from memory as a decode step
    reads it) against one row and two (a step and a k = 1 verification), each kernel in turn, best of
    `repeats`. It was faster on a 2-core Zen 5 (M = 1: 5.4 vs 6.6 ms for 212 MB, and even at M = 5),
    not on a Xeon we measured (no faster at M = 1, 1.4x slower at M = 8). About 0.1 s, once per
    process."""
    ws = [torch.full((1536, 576), 1.0, dtype=torch.bfloat16) for _ in range(60)]
    xs = [torch.full((m, 576), 0.5, dtype=torch.bfloat16) for m in rows]

    def run(mode):
        ext.set_bf16_dot_mode(mode)
        for x in xs:
            for w in ws:
                ext.bf16_linear(x, w)

    best = best_times({mode: lambda mode=mode: run(mode) for mode in (0, 1)}, repeats)
    ext.set_bf16_dot_mode(0)
    return best[1] < best[0]


def _register_fakes():
    """Shape functions of torch.ops.specqd_cpu.* (the library registered them as operators), so that
    torch.compile can trace calls to them."""

    @torch.library.register_fake("specqd_cpu::mxfp4_linear")
    def _(x, codes, scales):
        return x.new_empty((*x.shape[:-1], codes.shape[0]))

    @torch.library.register_fake("specqd_cpu::int4_linear")
    def _(x, codes, scales):
        return x.new_empty((*x.shape[:-1], codes.shape[0]))

    @torch.library.register_fake("specqd_cpu::mxfp4_linear_i8")
    def _(x, codes, scales):
        return x.new_empty((*x.shape[:-1], codes.shape[0]))

    @torch.library.register_fake("specqd_cpu::int4_linear_i8")
    def _(x, codes, scales):
        return x.new_empty((*x.shape[:-1], codes.shape[0]))

    @torch.library.register_fake("specqd_cpu::bf16_linear")
    def _(x, w):
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("specqd_cpu::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))

    @torch.library.register_fake("specqd_cpu::rope")
    def _(x, freqs):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("specqd_cpu::attention")
    def _(q, k, v, mask, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)


def _ensure():
    global _EXT, _TRIED
    if not _TRIED:
        _TRIED = True
        _EXT = _load()
        if _EXT is None and _REASON and "SPECQD_NO_CPU_KERNELS" not in _REASON:
            warnings.warn(f"specqd: CPU kernels unavailable, using PyTorch: {_REASON}", stacklevel=3)
    return _EXT


# torch.compile runs this once while tracing and keeps the answer as a constant: the first call builds
# or loads the library, which the compiler could not trace, so a model compiled with fullgraph=True
# before anything else touched the kernels would fail.
@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the kernels can run here (builds or loads them on the first call)."""
    return (_EXT if _TRIED else _ensure()) is not None


def loaded() -> bool:
    """Whether something has already built or loaded the kernels (never builds them): for helpers that
    should not bring C++ into a run that asked for none (--no-kernels)."""
    return _EXT is not None


def unavailable_reason() -> str | None:
    """Why available() is False (None when it is True)."""
    _ensure()
    return _REASON


def _require():
    ext = _ensure()
    if ext is None:
        raise RuntimeError(f"specqd CPU kernels unavailable: {_REASON}")
    return ext


# Eager calls go straight to the pybind functions (~1 us a call; the torch.ops path costs ~2 us);
# under torch.compile the operators, which the compiler can put in its graph.


def mxfp4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] (float32 or bfloat16) @ W.T, W in MXFP4 (codes uint8 [N, K/2], scales uint8 [N, K/32]):
    [..., N] in x's dtype."""
    if torch.compiler.is_compiling():
        return torch.ops.specqd_cpu.mxfp4_linear(x, codes, scales)
    return (_EXT or _require()).mxfp4_linear(x, codes, scales)


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] (float32 or bfloat16) @ W.T, W in int4 (codes uint8 [N, K/2], scales bfloat16 or
    float16 [N, K/G]): [..., N] in x's dtype."""
    if torch.compiler.is_compiling():
        return torch.ops.specqd_cpu.int4_linear(x, codes, scales)
    return (_EXT or _require()).int4_linear(x, codes, scales)


_NATIVE_BF16: bool | None = None


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (it reports AVX512-BF16): there torch's bf16 GEMM
    (oneDNN's: fp32 sums of exact products) beats widening to fp32 for long forwards (accel.long_linear);
    without it torch emulates bf16 and is the slower of the two. Answered once."""
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        ext = _EXT if _TRIED else _ensure()
        _NATIVE_BF16 = ext is not None and bool(ext.cpu_has_avx512_bf16())
    return _NATIVE_BF16


_VNNI: bool | None = None


def vnni_available() -> bool:
    """Whether the int8-activation kernels (mxfp4_linear_i8, int4_linear_i8) can run: available() and
    a CPU that reports AVX512-VNNI. (Asked by every 4-bit layer on every call: answered once.)"""
    global _VNNI
    if _VNNI is None:
        ext = _EXT if _TRIED else _ensure()
        _VNNI = ext is not None and bool(ext.cpu_has_avx512_vnni())
    return _VNNI


def pack_i8(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An MXFP4 or int4 weight (codes uint8 [N, K/2]; scales uint8 E8M0 [N, K/32], or int4's bf16/fp16
    [N, G]) in the layout of the int8 kernels: stripes of 16 weight rows whose int32 lanes are the rows
    (kernels_vnni.cpp says why). Per stripe s and block j of 32 elements, 4 vectors of 64 bytes: vector
    t holds in bytes 4r .. 4r + 3 the codes of row 16 s + r for elements 8t .. 8t + 3 (low nibbles) and
    8t + 4 .. 8t + 7 (high nibbles). The scales go per stripe and block (group) with the 16 rows side
    by side; int4's become fp32 (exactly). The same bytes as the input, reordered: N must be a multiple
    of 16."""
    n, half = codes.shape
    if n % 16 or half % 16:
        raise ValueError(f"pack_i8 needs N a multiple of 16 and K of 32, got a weight of [{n}, {2 * half}]")
    stripes, blocks = n // 16, half // 16
    nibbles = torch.stack([codes & 15, codes >> 4], -1)  # [N, K/2, 2]: element 2b, 2b + 1
    # [stripe, row, block, t, half (elements 8t..8t+3 or 8t+4..8t+7), i] -> [stripe, block, t, row, i]
    e = nibbles.reshape(stripes, 16, blocks, 4, 2, 4)
    packed = (e[:, :, :, :, 0] | (e[:, :, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)
    packed_scales = scales if scales.dtype == torch.uint8 else scales.float()
    groups = scales.shape[1]
    packed_scales = packed_scales.reshape(stripes, 16, groups).transpose(1, 2)
    return packed.contiguous().reshape(n, half), packed_scales.contiguous().reshape(n, groups)


def mxfp4_linear_i8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """mxfp4_linear with x quantized to int8 per block of 32 (AVX512-VNNI; see the module docstring),
    the weight packed by pack_i8: [..., N] in x's dtype. Needs vnni_available()."""
    if torch.compiler.is_compiling():
        return torch.ops.specqd_cpu.mxfp4_linear_i8(x, codes, scales)
    return (_EXT or _require()).mxfp4_linear_i8(x, codes, scales)


def int4_linear_i8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int4_linear with x quantized to int8 per block of 32 (AVX512-VNNI), the weight packed by
    pack_i8: [..., N] in x's dtype. Needs vnni_available()."""
    if torch.compiler.is_compiling():
        return torch.ops.specqd_cpu.int4_linear_i8(x, codes, scales)
    return (_EXT or _require()).int4_linear_i8(x, codes, scales)


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] (float32 or bfloat16, rounded to bf16) @ w.T, w bfloat16 [N, K]: [..., N] in x's dtype."""
    if torch.compiler.is_compiling():
        return torch.ops.specqd_cpu.bf16_linear(x, w)
    return (_EXT or _require()).bf16_linear(x, w)


def mxfp4_weight_f32(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """An MXFP4 weight (codes [N, K/2], scales [N, K/32]) decoded to float32 [N, K]: the values
    mxfp4_linear multiplies by, for long forwards that take torch's fp32 GEMM."""
    return (_EXT or _require()).mxfp4_weight(codes, scales, False)


def mxfp4_weight_bf16(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same weight as bfloat16 [N, K], exactly (an E2M1 value times a power of two fits in bf16): for
    long forwards that take torch's bf16 GEMM, in one pass."""
    return (_EXT or _require()).mxfp4_weight(codes, scales, True)


def int4_weight_f32(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """An int4 weight (codes [N, K/2], bf16 or fp16 scales [N, K/G]) decoded to float32 [N, K], as
    mxfp4_weight_f32."""
    return (_EXT or _require()).int4_weight_f32(codes, scales)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q @ k.T / sqrt(D), where mask) @ v for q [B, H, T, D] over a cache k, v [B, KVH, S, D]
    (grouped-query: H a multiple of KVH), mask bool [T, S]: [B, H, T, D] in q's dtype. Each output row
    is computed alone, so T tokens at once give exactly the rows of T one-token calls. D % 16 == 0."""
    scale = q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        return torch.ops.specqd_cpu.attention(q, k, v, mask, scale)
    return (_EXT or _require()).attention(q, k, v, mask, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.py's RMSNorm in one call: weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)."""
    if torch.compiler.is_compiling():
        return torch.ops.specqd_cpu.rms_norm(x, weight, eps)
    return (_EXT or _require()).rms_norm(x, weight, eps)


def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """model.py's apply_rope in one call: x [B, H, T, D], freqs float32 [T, D/2, 2] (cos, sin)."""
    if torch.compiler.is_compiling():
        return torch.ops.specqd_cpu.rope(x, freqs)
    return (_EXT or _require()).rope(x, freqs)


def argmax_takes(x: torch.Tensor) -> bool:
    """Whether argmax(x) stands in for torch.argmax(x, dim=-1): a contiguous float32 CPU tensor with a
    non-empty last dimension, outside torch.compile, the kernels already loaded (this never builds
    them: a --no-kernels run keeps torch's argmax)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 1
        and x.shape[-1] > 0
        and x.is_contiguous()
        and not torch.compiler.is_compiling()
        and loaded()
    )


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1), the same indices (NaN first, then the first of equal maxima), in two
    vector passes instead of ATen's scalar loop (~10 us instead of ~130 over a SmolLM2 row of logits
    on one thread). Check argmax_takes(x) first."""
    return _require().argmax(x)


def attention_usable(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether attention() takes these: a 2-D [T, S] bool mask, head_dim a multiple of 16 up to 256,
    the cache in fp32 or bf16, and usable(q)."""
    return attention_takes(q.shape[-1], k.dtype, mask) and usable(q)


def attention_takes(head_dim: int, cache_dtype: torch.dtype, mask: torch.Tensor | None) -> bool:
    return (
        mask is not None
        and mask.dim() == 2
        and mask.dtype == torch.bool
        and head_dim % 16 == 0
        and head_dim <= 256
        and cache_dtype in (torch.float32, torch.bfloat16)
    )


def block(x, weights, kinds, k_cache, v_cache, input_pos, freqs, mask, n_head, n_kv_head, head_dim, eps):
    """A Llama decoder block on the cached path in one call (block.cpp): x + attention(norm(x)), then
    + SwiGLU(norm(.)), with rms_norm, the linears, rope, the cache write and attention as the functions
    above compute them, in that order, so the bits equal those of calling them one by one.
    weights: [attention_norm, ffn_norm] then two tensors per linear (wqkv, wo, w1, w3, w2), each of
    kinds[j]: 0 bf16 (the weight twice), 1 MXFP4 (codes, scales), 2 int4 (codes, scales), 3 and 4 MXFP4
    and int4 with int8 activations (mxfp4_linear_i8, int4_linear_i8: only where vnni_available())."""
    return (_EXT or _require()).block(
        x, weights, kinds, k_cache, v_cache, input_pos, freqs, mask, n_head, n_kv_head, head_dim, eps,
        head_dim**-0.5,
    )  # fmt: skip


def stack(weights, kinds, k_caches, v_caches, n_head, n_kv_head, head_dim, eps, norm=None, head=None):
    """A model's cached forward after the embedding with its weights bound once (block.cpp's Stack):
    weights and kinds are the layers' block() lists concatenated (12 tensors and 5 kinds a layer),
    k_caches and v_caches one tensor a layer; norm (weight, eps) and head (kind, a, b) as block() takes
    a linear, or None. Its blocks(x, input_pos, freqs, mask) runs every block in turn; with a norm and a
    head, forward(x, input_pos, freqs, mask, last) runs them too and returns (features, logits) as
    model.Transformer.forward computes them (last = 0: logits for every token)."""
    norm_w, norm_eps = norm if norm is not None else (torch.empty(0), 0.0)
    kind, a, b = head if head is not None and norm is not None else (-1, torch.empty(0), torch.empty(0))
    return (_EXT or _require()).Stack(
        weights, kinds, k_caches, v_caches, n_head, n_kv_head, head_dim, eps, head_dim**-0.5,
        norm_w, norm_eps, kind, a, b,
    )  # fmt: skip


def linears(kinds: list, inputs: list, weights: list) -> None:
    """Each linear once on its own input, in one call, as block() calls them (kinds as block() takes
    them, two weight tensors a linear): for timing a step's weight reads (scripts/profile_step.py)."""
    (_EXT or _require()).linears(kinds, inputs, weights)


def copy_slots(dst: list, src: list, start: int, end: int) -> None:
    """dst[i][:, :, start:end] = src[i][:, :, start:end] for every pair of contiguous CPU caches
    [B, H, S, D] of one dtype, alike but for S, in one call (block.cpp)."""
    (_EXT or _require()).copy_slots(dst, src, start, end)


_SERIAL = 0  # inside serial_aten: the threads the kernels keep (0: not inside)

# decoding_loop: [how deep inside, the epoch]. The epoch moves on entering a loop and whenever any
# module, parameter or buffer is registered (torch's global registration hooks), so a plan checked in
# this epoch is still what the models hold.
_LOOP = [0, 0]


def _next_epoch(*_) -> None:  # a registration hook: returning None keeps the value registered
    _LOOP[1] += 1


for _name in (
    "register_module_module_registration_hook",
    "register_module_parameter_registration_hook",
    "register_module_buffer_registration_hook",
):
    _register = getattr(torch.nn.modules.module, _name, None)
    if _register is None:  # an older torch: plans are checked before every step, as outside loops
        _LOOP[0] = -(1 << 30)
        break
    _register(_next_epoch)


@contextlib.contextmanager
def decoding_loop():
    """Around a decoding loop, whose code does not change the models between its forwards (plain and
    speculative decoding; an on_token callback must not either): the fused calls' plans (accel.py's
    _Watch) are checked once per epoch instead of before every step. That check walks every watched
    module, weight and flag of the model (~2000 objects for SmolLM2), and right after a step has
    streamed the weights through the caches it cost 0.5-0.9 ms of a 9 ms MXFP4 step. A module,
    parameter or buffer registered inside (ModelLevel.reset growing a cache) starts a new epoch, so the
    plans are checked again."""
    _LOOP[0] += 1
    _LOOP[1] += 1
    try:
        yield
    finally:
        _LOOP[0] -= 1
        _LOOP[1] += 1


def models_changed() -> None:
    """A new epoch, for a change torch's registration hooks do not see (a class swapped, a flag set):
    the plans are checked again even inside a decoding loop (accel.accelerate calls it)."""
    _next_epoch()


def loop_epoch() -> int | None:
    """The epoch inside a decoding_loop, None outside one."""
    return _LOOP[1] if _LOOP[0] > 0 else None


def decodes_on_kernels(model: torch.nn.Module) -> bool:
    """Whether every linear layer of `model` runs on these kernels, on the CPU: each says so through
    cpu_spec() (accel.py's twins; None for a weight the kernels do not take, such as fp32), and a layer
    without one (anything with in_features) goes through ATen. Then a decode step leaves ATen only
    small ops, and serial_aten may take its threads; an fp32 or unaccelerated model needs them."""
    if _EXT is None:
        return False
    tensors = list(model.parameters()) + list(model.buffers())
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return False
    found = False
    for m in model.modules():
        if hasattr(m, "cpu_spec"):
            if m.cpu_spec() is None:
                return False
            found = True
        elif hasattr(m, "in_features"):
            return False
    return found


def set_prefetch(on: bool) -> None:
    """Whether the kernels' idle helper threads prefetch the rows they will compute in the next linear
    of a fused forward (on by default; thread_pool.h says why). Off, for an ablation: the same bits,
    only slower."""
    _require().set_prefetch(bool(on))


@contextlib.contextmanager
def serial_aten(enabled: bool = True):
    """Around a CPU decoding loop: ATen's own ops run on one thread, our kernels on torch's thread count
    as it was. Why: the ops on the logits (a conversion, an argmax, a softmax: vocabulary-sized, so
    above ATen's grain size) each open an OpenMP region whose other thread is asleep after the step's
    kernels, and waking it can take a good part of a millisecond on the 2-core VMs we measured (up to
    ~1.5 ms of a ~7 ms MXFP4 step; docs/kernels.md). On one thread these ops take microseconds. What
    can change: a sum over the vocabulary (a softmax's) may round differently on one thread than on
    two, as between machines; greedy tokens cannot, and speculation's exactness does not rest on such
    bits (the target and the drafts compute their probabilities the same way inside one run). Long
    forwards take all the threads back for torch's GEMM (all_threads, accel.long_linear). Callers pass
    enabled=decodes_on_kernels(model) for each model of the loop: a model whose linears ATen computes
    (fp32, or not accelerated) keeps ATen's threads. A no-op when not enabled, where the kernels are
    not loaded, with one thread, and when already inside."""
    global _SERIAL
    n = torch.get_num_threads()
    if not enabled or _EXT is None or n <= 1 or _SERIAL:
        yield
        return
    _EXT.set_threads(n)
    torch.set_num_threads(1)
    _SERIAL = n
    try:
        yield
    finally:
        _SERIAL = 0
        torch.set_num_threads(n)
        _EXT.set_threads(0)


@contextlib.contextmanager
def all_threads():
    """Inside serial_aten, ATen gets all the threads back for one big operation (a long prefill's GEMM)."""
    if not _SERIAL:
        yield
        return
    torch.set_num_threads(_SERIAL)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def info() -> dict:
    """What is in use: availability, reason, whether the CPU reports avx512_bf16 and avx512_vnni, whether
    bf16_linear uses vdpbf16ps, threads."""
    ext = _ensure()
    return {
        "available": ext is not None,
        "reason": _REASON,
        "avx512_bf16_reported": bool(ext and ext.cpu_has_avx512_bf16()),
        "avx512_vnni": bool(ext and ext.cpu_has_avx512_vnni()),
        "bf16_dot": bool(ext and ext.bf16_dot_in_use()),
        "threads": ext.pool_threads() if ext else torch.get_num_threads(),
    }


def usable(x: torch.Tensor) -> bool:
    """Whether a layer should call the kernels for input x: a CPU tensor of a dtype they take, no
    gradient wanted (they have no backward), and the kernels built."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and not (torch.is_grad_enabled() and x.requires_grad)
        and available()
    )
