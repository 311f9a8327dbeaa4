"""Autoregressive decode speed at batch 1 on random weights at real shapes (gpt-fast's method).

    python scripts/bench_decode.py --models llama-3.1-8b,llama-3.2-1b            # on a GPU
    python scripts/bench_decode.py --models smollm2-135m --device cpu --tokens 16  # smoke test

Reports ms/token, tokens/s and GB/s of weights read per token, against the device's copy bandwidth
measured in the same run. Prints a markdown table and writes JSON (--out).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import cpu as cpu_kernels  # noqa: E402
from model import ModelArgs, Transformer, weight_bytes  # noqa: E402
from speculate import ModelLevel, autoregressive_decode  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes=1 << 30, iters=10) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written (the usual convention:
    a weight-streaming kernel that only reads should reach roughly this figure)."""
    if device.type == "cpu":
        nbytes = 1 << 28
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def random_model(name, device, dtype, layers: int | None = None) -> Transformer:
    """A preset's shapes with random weights (gpt-fast's benchmarking method), built without a slow
    default init; `layers` keeps only that many blocks. On the CPU the bf16 linears use our kernel, as
    checkpoint.build_model does for loaded models (a no-op elsewhere)."""
    args = ModelArgs.from_name(name)
    if layers:
        args.n_layer = min(layers, args.n_layer)
    with torch.device("meta"):
        m = Transformer(args)
    m = m.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
    cpu_kernels.use_bf16_kernel(m)
    return m.eval().requires_grad_(False)


def bench(name, device, dtype, tokens, prompt_len, compile, repeats=3):
    model = random_model(name, device, dtype)
    level = ModelLevel(model, name, compile=compile)
    level.reset(prompt_len + tokens)  # one cache for every repeat: the CUDA graphs stay valid
    prompt = torch.randint(0, 1000, (prompt_len,), generator=torch.Generator().manual_seed(0))
    autoregressive_decode(level, prompt, tokens)  # warm-up: compilation and graph capture
    runs = [autoregressive_decode(level, prompt, tokens)[1] for _ in range(repeats)]
    best = min(runs, key=lambda s: s.ms_per_token)
    nbytes = weight_bytes(model)
    del model, level
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ms = best.ms_per_token
    return dict(
        model=name, ms_per_token=ms, tokens_per_s=1e3 / ms, weight_GB=nbytes / 1e9,
        GBps=nbytes / ms / 1e6, time_to_first_token_ms=1e3 * best.time_to_first_token,
    )  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-3.1-8b,llama-3.2-1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        import torch._inductor.config as ic

        ic.coordinate_descent_tuning = True  # as gpt-fast: a few % on the small decode kernels
    copy = copy_bandwidth(device)
    rows = [bench(n, device, DTYPES[a.dtype], a.tokens, a.prompt_len, a.compile) for n in a.models.split(",")]
    for r in rows:
        r["fraction_of_copy_bw"] = r["GBps"] / copy
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    record = dict(
        machine=platform.node(), processor=platform.processor(), gpu=gpu, torch=torch.__version__,
        device=str(device), dtype=a.dtype, tokens=a.tokens, prompt_len=a.prompt_len,
        copy_GBps_read_plus_write=copy, results=rows,
    )  # fmt: skip
    print(f"{gpu or 'CPU'}, torch {torch.__version__}, {a.dtype}, copy {copy:.0f} GB/s (read+write)\n")
    print("| model | ms/token | tokens/s | weights GB | GB/s | of copy bw |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | {r['weight_GB']:.2f} "
            f"| {r['GBps']:.0f} | {100 * r['fraction_of_copy_bw']:.0f}% |"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
