"""Benchmark the CPU weight-only linear kernels (kernels/cpu) against torch on SmolLM2-135M's shapes.

    python scripts/bench_cpu.py --out results/bench_cpu.json
    python scripts/bench_cpu.py --m 1,8 --repeats 5 --threads 1

For each implementation and number of rows M (tokens per forward) it reports ms and GB/s:
  torch fp32    F.linear(x fp32, W fp32)                 (what the CPU path runs today)
  torch bf16    F.linear(x bf16, W bf16)
  ours bf16     kernels.cpu.bf16_linear(x fp32, W bf16)  (x rounded to bf16 inside)
  ours mxfp4    kernels.cpu.mxfp4_linear(x fp32, codes, scales)
  ours int4     kernels.cpu.int4_linear(x fp32, codes, scales)  (int4.py, bf16 scales, groups of 64 for
                K = 576 and 128 for K = 1536: int4.group_size_for)
GB/s counts the weight bytes of the implementation's format (fp32 4, bf16 2, MXFP4 0.53125 per weight,
int4 0.53125 too: 0.5 + 2/64, exact for K = 576, 3% high for w2's groups of 128) read once per call;
it is not a measured memory traffic.

Rows of the table:
  wqkv 960x576, wo 576x576, w1/w3 1536x576, w2 576x1536, output 49152x576   per call (N x K)
  model   the linears of one decode step: 30 x (wqkv, wo, w1, w3, w2) + output = 151 matrices, called
          in the model's order. Our model fuses q, k and v; unfused it would be the 211 matrices of
          30 x 7 + 1, with the same bytes.
Every matrix is its own tensor (30 copies of each layer shape, as in the model), so the per-shape rows
stream from memory too instead of re-reading one matrix from cache; a per-shape row's time is its
pass divided by its number of matrices.

Timing: the implementations take turns (one pass each, round after round), so that a change in the
machine's load hits all of them alike; a row reports the median of --repeats passes after --warmup
passes. The load average before and after is printed and saved: on a shared machine, read the table
with it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bench_lib
import int4
from kernels import cpu as cpu_kernels
from model import ModelArgs
from mxfp4 import quantize

_C = ModelArgs.from_name("smollm2-135m")  # the embedded model's shapes
LAYERS = _C.n_layer
SHAPES = {  # name -> (N, K)
    "wqkv": ((_C.n_head + 2 * _C.n_local_heads) * _C.head_dim, _C.dim),
    "wo": (_C.dim, _C.n_head * _C.head_dim),
    "w1/w3": (_C.intermediate_size, _C.dim),
    "w2": (_C.dim, _C.intermediate_size),
    "output": (_C.vocab_size, _C.dim),
}
LAYER_ORDER = ("wqkv", "wo", "w1/w3", "w1/w3", "w2")  # one layer's calls, in the model's order
IMPLS = ("torch fp32", "torch bf16", "ours bf16", "ours mxfp4", "ours int4")
BYTES_PER_WEIGHT = {
    "torch fp32": 4.0, "torch bf16": 2.0, "ours bf16": 2.0,
    "ours mxfp4": 0.5 + 1 / 32, "ours int4": 0.5 + 2 / 64,
}  # fmt: skip


def make_weights(seed: int = 0) -> dict[str, list[dict[str, torch.Tensor]]]:
    """shape name -> its copies, each {"fp32", "bf16", "codes", "scales", "int4"}."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (n, k) in SHAPES.items():
        copies = 1 if name == "output" else LAYERS * LAYER_ORDER.count(name)
        items = []
        for _ in range(copies):
            w = torch.randn(n, k, generator=g) * 0.02
            codes, scales = quantize(w)
            int4_weight = int4.quantize(w, int4.group_size_for(k))
            items.append(
                {"fp32": w, "bf16": w.bfloat16(), "codes": codes, "scales": scales, "int4": int4_weight}
            )
        weights[name] = items
    return weights


def model_order(weights) -> list[tuple[str, dict]]:
    """The 151 (shape name, weight) of a decode step: layer l uses copy l of each shape (w1 and w3
    are copies 2l and 2l + 1 of their shape), then the output head."""
    calls = []
    for layer in range(LAYERS):
        for i, name in enumerate(LAYER_ORDER):
            index = 2 * layer + (i == 3) if name == "w1/w3" else layer
            calls.append((name, weights[name][index]))
    calls.append(("output", weights["output"][0]))
    return calls


def make_pass(impl: str, calls, xs):
    """A function running one pass: impl over every (shape name, weight) of `calls`."""
    if impl == "torch fp32":
        args = [(xs[SHAPES[n][1]], w["fp32"]) for n, w in calls]
        f = F.linear
    elif impl == "torch bf16":
        args = [(xs[SHAPES[n][1]].bfloat16(), w["bf16"]) for n, w in calls]
        f = F.linear
    elif impl == "ours bf16":
        args = [(xs[SHAPES[n][1]], w["bf16"]) for n, w in calls]
        f = cpu_kernels.bf16_linear
    elif impl == "ours mxfp4":
        args = [(xs[SHAPES[n][1]], w["codes"], w["scales"]) for n, w in calls]
        f = cpu_kernels.mxfp4_linear
    elif impl == "ours int4":
        args = [(xs[SHAPES[n][1]], *w["int4"]) for n, w in calls]
        f = cpu_kernels.int4_linear
    else:
        raise ValueError(impl)

    def run():
        for a in args:
            f(*a)

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", default="1,2,4,8,16", help="comma-separated numbers of rows (tokens)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of: " + ", ".join(IMPLS))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (ours use it too)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    ms = [int(v) for v in args.m.split(",")]
    impls = [v.strip() for v in args.impls.split(",")]
    if any(i.startswith("ours") for i in impls) and not cpu_kernels.available():
        print(f"our kernels are unavailable ({cpu_kernels.unavailable_reason()}): timing torch only")
        impls = [i for i in impls if not i.startswith("ours")]

    load_before = os.getloadavg()
    weights = make_weights()
    rows = {name: [(name, w) for w in ws] for name, ws in weights.items()}
    rows["model"] = model_order(weights)
    weight_count = {name: sum(SHAPES[n][0] * SHAPES[n][1] for n, _ in calls) for name, calls in rows.items()}

    results = []
    with torch.inference_mode():
        for m in ms:
            xs = {k: torch.randn(m, k) for k in (576, 1536)}
            passes = {
                (impl, name): make_pass(impl, calls, xs) for impl in impls for name, calls in rows.items()
            }
            times = {key: [] for key in passes}
            for rep in range(args.warmup + args.repeats):
                for key, run in passes.items():  # implementations take turns, row by row
                    t = time.perf_counter()
                    run()
                    if rep >= args.warmup:
                        times[key].append(time.perf_counter() - t)
            for (impl, name), ts in times.items():
                seconds = statistics.median(ts)
                per_call = seconds if name == "model" else seconds / len(rows[name])
                gbs = weight_count[name] * BYTES_PER_WEIGHT[impl] / seconds / 1e9
                results.append({"m": m, "impl": impl, "shape": name, "ms": per_call * 1e3, "GB/s": gbs})
            print(f"M = {m} done", file=sys.stderr)
    load_after = os.getloadavg()

    report = []

    def emit(text="", end="\n"):  # the table goes to stdout and, with --out, to a .md beside the JSON
        report.append(text + end)
        print(text, end=end)

    emit(
        f"\n{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads; "
        f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"kernels {cpu_kernels.info()}"
    )
    emit(
        f"median of {args.repeats} passes after {args.warmup}; "
        "ms per call (model: per pass of its 151 matrices)\n"
    )
    columns = ["shape", "M"] + [f"{i} ms (GB/s)" for i in impls]
    if "torch fp32" in impls:
        columns += [f"{i} vs torch fp32" for i in impls if i.startswith("ours")]
    emit("| " + " | ".join(columns) + " |")
    emit("|" + "---|" * len(columns))
    by = {(r["shape"], r["m"], r["impl"]): r for r in results}
    for name in rows:
        for m in ms:
            cells = [f"{by[(name, m, i)]['ms']:.3f} ({by[(name, m, i)]['GB/s']:.1f})" for i in impls]
            if "torch fp32" in impls:
                base = by[(name, m, "torch fp32")]["ms"]
                cells += [f"{base / by[(name, m, i)]['ms']:.2f}x" for i in impls if i.startswith("ours")]
            emit(f"| {name} | {m} | " + " | ".join(cells) + " |")
    for impl in impls:
        if 1 in ms and len(ms) > 1:
            base = by[("model", 1, impl)]["ms"]
            ratios = ", ".join(f"M={m} {by[('model', m, impl)]['ms'] / base:.2f}x" for m in ms if m != 1)
            emit(f"\n{impl}: model pass relative to M = 1: {ratios}", end="")
    emit()

    if args.out:
        meta = dict(
            machine=platform.machine(), cpus=os.cpu_count(), torch=torch.__version__, threads=args.threads,
            loadavg_before=load_before, loadavg_after=load_after, warmup=args.warmup, repeats=args.repeats,
            kernels=cpu_kernels.info(), model_matrices=len(rows["model"]),
        )  # fmt: skip
        out = bench_lib.write_json(Path(args.out), {"meta": meta, "results": results})
        out.with_suffix(".md").write_text("".join(report).lstrip("\n"))
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
