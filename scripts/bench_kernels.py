"""Benchmark the MXFP4 matmul kernel on every linear shape of Llama-3.1-8B and Llama-3.2-1B (GPU).

For each weight shape [N, K] and each number of rows M it reports:
  us         median time of one call (triton.testing.do_bench: warm, L2 flushed before each call);
             with split-K this includes the second (reduction) kernel;
  graph_us   the same call replayed from a CUDA graph (no launch overhead; what decoding sees);
  GB/s       weight bytes read (codes + scales) / us;
  of_copy    GB/s / the copy bandwidth measured in the same run (below);
  bf16_us    torch.matmul of the same shape with a bf16 weight (cuBLAS), and speedup = bf16_us / us.
Copy bandwidth: dst.copy_(src) of a 1 GiB buffer, counted as (bytes read + bytes written) / time,
i.e. 2 GiB moved per copy. A weight-streaming kernel at of_copy = 1.0 moves bytes as fast as a
device-to-device copy does.

Goals (printed at the end): M = 1 reaches >= 80% of the copy bandwidth on large shapes (weights of
at least 16 MiB packed), and M = 8 takes <= 1.3x the M = 1 time on every shape.

  python scripts/bench_kernels.py --out results/bench_kernels_h100.json
  python scripts/bench_kernels.py --models llama-3.1-8b --m 1,8 --sweep   # try other tile configs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench_lib
from model import ModelArgs

MODELS = ("llama-3.1-8b", "llama-3.2-1b")  # model.PRESETS names
LARGE_BYTES = 16 * 2**20  # "large shape" for the bandwidth goal: >= 16 MiB of packed weight


def linear_shapes(preset: str):
    """(name, N, K) of every distinct linear of one transformer of a preset (w1 and w3 share a shape)."""
    c = ModelArgs.from_name(preset)
    return [
        ("wqkv", (c.n_head + 2 * c.n_local_heads) * c.head_dim, c.dim),
        ("wo", c.dim, c.n_head * c.head_dim),
        ("w1/w3", c.intermediate_size, c.dim),
        ("w2", c.dim, c.intermediate_size),
        ("output", c.vocab_size, c.dim),
    ]


def sweep_configs(m):
    """Alternatives to the heuristic for --sweep (split_k 0 means: the heuristic's split-K rule)."""
    from kernels.mxfp4_triton import Config

    if m == 1:
        tiles = [(8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4), (32, 128, 4), (16, 256, 8)]
        gemv = [Config(1, bn, bk, split, False, w, 2) for bn, bk, w in tiles for split in (1, 2, 4, 8)]
        dot = [Config(16, bn, 128, split, True, 4, 3) for bn in (32, 64) for split in (1, 2, 4)]
        return gemv + dot
    if m <= 16:
        tiles = [(32, 128, 4, 3), (64, 128, 4, 3), (64, 256, 4, 2), (64, 256, 8, 2), (128, 128, 4, 3)]
        return [Config(16, bn, bk, split, True, w, st) for bn, bk, w, st in tiles for split in (1, 2, 4, 8)]
    return []


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model.PRESETS names")
    parser.add_argument("--m", default="1,2,4,5,8,16", help="comma-separated row counts M")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile configs")
    parser.add_argument("--check", action="store_true", help="check each result against dequantize+matmul")
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetition time (ms)")
    args = parser.parse_args()

    import torch
    import triton
    from triton.testing import do_bench

    from kernels import mxfp4_triton as kt
    from mxfp4 import dequantize

    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    ms = [int(m) for m in args.m.split(",")]
    device = torch.device("cuda")
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count

    def bench(fn):
        return do_bench(fn, warmup=25, rep=args.rep, return_mode="median") * 1e3  # microseconds

    def graph_bench(fn):
        fn()  # compile and allocate outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay)

    def copy_bandwidth():
        src = torch.empty(2**30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e3  # GB/s, read + write

    def measure(model, layer, n, k, m, codes, scales, w_bf16):
        x = torch.randn(m, k, device=device, dtype=dtype)
        config = kt.pick_config(m, n, k, sm_count, dtype == torch.float32)
        weight_bytes = codes.numel() + scales.numel()
        us = bench(lambda: kt.launch(x, codes, scales, config))
        row = dict(
            model=model, layer=layer, N=n, K=k, M=m, us=us,
            graph_us=graph_bench(lambda: kt.launch(x, codes, scales, config)),
            weight_bytes=weight_bytes, GBps=weight_bytes / us / 1e3,
            of_copy=weight_bytes / us / 1e3 / copy_gbps,
            bf16_us=bench(lambda: torch.matmul(x, w_bf16.T)), config=config.__dict__,
        )  # fmt: skip
        row["speedup"] = row["bf16_us"] / us
        if args.check:
            y = kt.launch(x, codes, scales, config).float()
            ref = x.float() @ dequantize(codes, scales, torch.float32).T
            row["max_rel_err"] = ((y - ref).abs().max() / ref.abs().max()).item()
        if args.sweep and sweep_configs(m):
            timed = [(bench(lambda c=c: kt.launch(x, codes, scales, c)), c) for c in sweep_configs(m)]
            best_us, best = min(timed, key=lambda t: t[0])
            row["sweep_best_us"], row["sweep_best_config"] = best_us, best.__dict__
        return row

    def describe(cfg: dict) -> str:
        kind = "dot" if cfg["use_dot"] else "gemv"
        return (
            f"bm{cfg['block_m']} bn{cfg['block_n']} bk{cfg['block_k']} sk{cfg['split_k']} {kind} "
            f"w{cfg['num_warps']} s{cfg['num_stages']}"
        )

    copy_gbps = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s (read+write), {sm_count} SMs")
    print(f"torch {torch.__version__}, triton {triton.__version__}, x dtype {args.dtype}\n")
    print(
        f"{'model':13} {'layer':7} {'N':>6} {'K':>6} {'M':>3} {'us':>8} {'graph_us':>8} {'GB/s':>6} "
        f"{'of_copy':>7} {'bf16_us':>8} {'speedup':>7}  config"
    )
    rows = []
    for model in args.models.split(","):
        for layer, n, k in linear_shapes(model):
            # Random bytes: the kernel's speed does not depend on the values.
            codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
            scales = torch.randint(118, 124, (n, k // 32), dtype=torch.uint8, device=device)
            w_bf16 = torch.randn(n, k, device=device, dtype=dtype)
            for m in ms:
                row = measure(model, layer, n, k, m, codes, scales, w_bf16)
                rows.append(row)
                line = (
                    f"{model:13} {layer:7} {n:>6} {k:>6} {m:>3} {row['us']:8.1f} {row['graph_us']:8.1f} "
                    f"{row['GBps']:6.0f} {row['of_copy']:7.2f} {row['bf16_us']:8.1f} {row['speedup']:7.2f}  "
                    f"{describe(row['config'])}"
                )
                if "sweep_best_us" in row:
                    line += f" | best {row['sweep_best_us']:.1f}us {describe(row['sweep_best_config'])}"
                if "max_rel_err" in row:
                    line += f" | err {row['max_rel_err']:.1e}"
                print(line)

    # The goals.
    print("\nGoals:")
    goals = []
    for row in rows:
        if row["M"] == 1 and row["weight_bytes"] >= LARGE_BYTES:
            ok = row["of_copy"] >= 0.8
            goals.append(dict(goal="M=1 >= 80% of copy", model=row["model"], layer=row["layer"],
                              value=row["of_copy"], ok=ok))  # fmt: skip
    by_shape = {(r["model"], r["layer"], r["M"]): r for r in rows}
    for (model, layer, m), row in by_shape.items():
        if m == 8 and (model, layer, 1) in by_shape:
            ratio = row["us"] / by_shape[(model, layer, 1)]["us"]
            goals.append(dict(goal="M=8 <= 1.3x M=1", model=model, layer=layer, value=ratio, ok=ratio <= 1.3))
    for g in goals:
        verdict = "PASS" if g["ok"] else "FAIL"
        print(f"  {verdict}  {g['goal']:20} {g['model']:13} {g['layer']:7} {g['value']:.2f}")

    if args.out:
        meta = dict(
            device=torch.cuda.get_device_name(), sm_count=sm_count, torch=torch.__version__,
            triton=triton.__version__, dtype=args.dtype, copy_GBps=copy_gbps,
            copy_definition="(bytes read + bytes written) / time of dst.copy_(src), 1 GiB",
        )  # fmt: skip
        bench_lib.write_json(args.out, dict(meta=meta, results=rows, goals=goals))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
