"""The SpecMQuant compatibility curve: what verifying T tokens at once costs the target, per weight format.

A BF16 target reads its weights once per forward whatever T is (memory-bound), so verifying a 30-node
tree costs about one decode step. A 4-bit weight-only kernel moves 4x fewer bytes but decodes every
weight in registers for every token, so its time starts to grow with T much earlier: past some T a
tree is no longer cheap to verify on a 4-bit target (SpecMQuant, arXiv 2505.22179, Fig. 2). This script
measures one forward of T tokens against a KV cache already filled with `--context` tokens, for
T = 1, 2, 4, ..., 64, in bf16, MXFP4 and int4 (random weights at a real shape, as gpt-fast benchmarks).

    python scripts/bench_verify.py                                        # GPU: llama-3.1-8b
    python scripts/bench_verify.py --device cpu --preset llama-3.1-8b --layers 2 --context 256
    python scripts/bench_verify.py --device cpu --preset smollm2-135m

--layers N keeps only N of the preset's layers (the full 8B does not fit three formats in a CPU's RAM);
the per-layer cost is what matters, and the table says how many layers were timed. With few layers
the output head (128256 x 4096 for Llama-3) weighs as much as several of them: --no-head leaves it out,
so that the curve is the layers' alone. Prints a markdown
table (ms per forward, and the ratio to T = 1), writes JSON and a PNG next to --out.
"""

import argparse
import platform
import sys
from pathlib import Path

import torch

import bench_lib
from accel import accelerate, compile_decode
from levels import cast
from model import weight_bytes
from speculate import ModelLevel

TOKENS = (1, 2, 4, 8, 16, 32, 64)


def plot(record, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for fmt, r in record["results"].items():
        ts = [int(t) for t in r["ms"]]
        ms = list(r["ms"].values())
        ax1.plot(ts, ms, marker="o", label=fmt)
        ax2.plot(ts, [m / ms[0] for m in ms], marker="o", label=fmt)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens verified in one forward (T)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_ylabel("ms per forward")
    ax2.set_ylabel("time / time at T = 1")
    ax2.axhline(1.5, color="grey", ls=":", lw=1)
    layers = record["layers"]
    fig.suptitle(
        f"{record['preset']} ({layers} layers{'' if record.get('head', True) else ', no head'}),"
        f" {record['device_name']}: cost of verifying T tokens"
        f" after {record['context']} cached"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers")
    p.add_argument("--formats", default="bf16,mxfp4,int4")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--context", type=int, default=512, help="tokens in the KV cache before the forward")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per T (default 20 GPU, 5 CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--no-head", action="store_true", help="time the layers only (no output head)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="accel.accelerate")
    p.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    tokens = [int(t) for t in a.tokens.split(",")]
    repeats = a.repeats or (20 if device.type == "cuda" else 5)
    compile = device.type == "cuda" if a.compile is None else a.compile
    device_name = bench_lib.environment(device)["gpu"] or f"CPU x{torch.get_num_threads()}"
    base = bench_lib.random_model(a.preset, device, torch.bfloat16, layers=a.layers)
    if a.no_head:  # the forward then returns the final hidden states: [T, dim] instead of logits
        base.output = torch.nn.Identity()
    record = dict(
        preset=a.preset, layers=base.config.n_layer, head=not a.no_head, device=str(device),
        device_name=device_name, machine=platform.node(), torch=torch.__version__, context=a.context,
        repeats=repeats, kernels=a.kernels, compiled=compile, results={},
    )  # fmt: skip
    for fmt in a.formats.split(","):
        model = base if fmt == "bf16" else cast(base, fmt)
        report = accelerate(model, enabled=a.kernels)
        if fmt == a.formats.split(",")[0]:
            print(report)
        level = ModelLevel(model, "target", compiled=compile_decode(model) if compile else None)
        secs = bench_lib.time_forwards(level, tokens, a.context, repeats)
        ms = {t: 1e3 * s for t, s in secs.items()}
        record["results"][fmt] = dict(weight_GB=weight_bytes(model) / 1e9, ms=ms)
        print(f"{fmt}: " + " ".join(f"T={t} {v:.2f} ms" for t, v in ms.items()), file=sys.stderr, flush=True)
        del model, level
    head = "" if record["head"] else " (no output head)"
    print(f"\n{a.preset}, {base.config.n_layer} layers{head}, {device_name}, context {a.context}\n")
    fmts = list(record["results"])
    rows = [
        [t]
        + [f"{r['ms'][t]:.2f} ({r['ms'][t] / r['ms'][tokens[0]]:.2f}x)" for r in record["results"].values()]
        for t in tokens
    ]
    print(bench_lib.markdown_table(["T", *(f"{f} ms (x T={tokens[0]})" for f in fmts)], rows))
    for f in fmts:  # where verifying stops being nearly free: the first T costing 1.5x one token
        ms = record["results"][f]["ms"]
        knee = next((t for t in tokens if ms[t] > 1.5 * ms[tokens[0]]), None)
        record["results"][f]["first_T_over_1.5x"] = knee
        print(f"{f}: {record['results'][f]['weight_GB']:.3f} GB of weights, first T over 1.5x T=1: {knee}")
    if a.out:
        bench_lib.write_json(a.out, record)
        plot(record, a.out.with_suffix(".png"))
    return record


if __name__ == "__main__":
    main()
