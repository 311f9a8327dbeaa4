"""Autoregressive decode speed at batch 1 on random weights at real shapes (gpt-fast's method).

    python scripts/bench_decode.py --models llama-3.1-8b,llama-3.2-1b            # on a GPU
    python scripts/bench_decode.py --models smollm2-135m --device cpu --tokens 16  # smoke test

Reports ms/token, tokens/s and GB/s of weights read per token, against the device's copy bandwidth
measured in the same run. Prints a markdown table and writes JSON (--out).
"""

import argparse
import time
from pathlib import Path

import torch

import bench_lib
from accel import accelerate, compile_decode
from levels import DTYPES
from model import weight_bytes
from speculate import ModelLevel, autoregressive_decode


def copy_bandwidth(device, iters=10) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written (the usual convention:
    a weight-streaming kernel that only reads should reach roughly this figure)."""
    src = torch.empty(1 << (28 if device.type == "cpu" else 30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(iters):
        bench_lib.sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        bench_lib.sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() / best / 1e9


def bench(name, device, dtype, tokens, prompt_len, compile, kernels, repeats=3):
    model = bench_lib.random_model(name, device, dtype)
    report = accelerate(model, enabled=kernels)
    level = ModelLevel(model, name, compiled=compile_decode(model) if compile else None)
    level.reset(prompt_len + tokens)  # one cache for every repeat: the CUDA graphs stay valid
    prompt = torch.randint(0, 1000, (prompt_len,), generator=torch.Generator().manual_seed(0))
    autoregressive_decode(level, prompt, tokens)  # warm-up: compilation and graph capture
    best = min(
        (autoregressive_decode(level, prompt, tokens)[1] for _ in range(repeats)),
        key=lambda s: s.ms_per_token,
    )
    nbytes, ms = weight_bytes(model), best.ms_per_token
    del model, level
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report, dict(
        model=name, ms_per_token=ms, tokens_per_s=1e3 / ms, weight_GB=nbytes / 1e9,
        GBps=nbytes / ms / 1e6, time_to_first_token_ms=1e3 * best.time_to_first_token,
    )  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-3.1-8b,llama-3.2-1b", help="model.PRESETS names")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="accel.accelerate")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    compile = device.type == "cuda" if a.compile is None else a.compile
    if device.type == "cuda":
        import torch._inductor.config as ic

        ic.coordinate_descent_tuning = True  # as gpt-fast: a few % on the small decode kernels
    copy = copy_bandwidth(device)
    rows = []
    for name in a.models.split(","):
        report, row = bench(name, device, DTYPES[a.dtype], a.tokens, a.prompt_len, compile, a.kernels)
        if not rows:
            print(report)
        rows.append(row | dict(fraction_of_copy_bw=row["GBps"] / copy))
    env = bench_lib.environment(device)
    print(f"{env['gpu'] or 'CPU'}, torch {torch.__version__}, {a.dtype}, copy {copy:.0f} GB/s (read+write)\n")
    print(
        bench_lib.markdown_table(
            ["model", "ms/token", "tokens/s", "weights GB", "GB/s", "of copy bw"],
            [
                [r["model"], f"{r['ms_per_token']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['weight_GB']:.2f}",
                 f"{r['GBps']:.0f}", f"{100 * r['fraction_of_copy_bw']:.0f}%"]
                for r in rows
            ],
        )
    )  # fmt: skip
    record = dict(env, dtype=a.dtype, tokens=a.tokens, prompt_len=a.prompt_len, compiled=compile,
                  kernels=a.kernels, copy_GBps_read_plus_write=copy, results=rows)  # fmt: skip
    if a.out:
        bench_lib.write_json(a.out, record)
    return record


if __name__ == "__main__":
    main()
