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
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate import cast  # noqa: E402
from model import weight_bytes  # noqa: E402
from scripts.bench_decode import random_model  # noqa: E402
from speculate import ModelLevel  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 32, 64)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forwards(model, device, context: int, tokens, repeats: int, compile) -> dict[int, float]:
    """Median ms of a T-token forward at positions context..context+T-1, for each T."""
    level = ModelLevel(model, "target", compile=compile)
    level.reset(context + max(tokens))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (context + max(tokens),), generator=g).to(device)
    level.forward(ids[:context], 0)  # fill the cache once; every timed forward attends to it
    out = {}
    for t in tokens:
        x = ids[context : context + t]
        for _ in range(2):  # warm-up (on CUDA: compilation and CUDA-graph capture for this T)
            level.forward(x, context)
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            level.forward(x, context)
            sync(device)
            times.append(1e3 * (time.perf_counter() - t0))
        out[t] = statistics.median(times)
    return out


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
    p.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    tokens = [int(t) for t in a.tokens.split(",")]
    repeats = a.repeats or (20 if device.type == "cuda" else 5)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    base = random_model(a.preset, device, torch.bfloat16, layers=a.layers)
    if a.no_head:  # the forward then returns the final hidden states: [T, dim] instead of logits
        base.output = torch.nn.Identity()
    record = dict(
        preset=a.preset, layers=base.config.n_layer, head=not a.no_head, device=str(device),
        device_name=device_name, machine=platform.node(), torch=torch.__version__, context=a.context,
        repeats=repeats, results={},
    )  # fmt: skip
    for fmt in a.formats.split(","):
        model = base if fmt == "bf16" else cast(base, fmt)
        ms = time_forwards(model, device, a.context, tokens, repeats, a.compile)
        record["results"][fmt] = dict(weight_GB=weight_bytes(model) / 1e9, ms=ms)
        print(f"{fmt}: " + " ".join(f"T={t} {v:.2f} ms" for t, v in ms.items()), file=sys.stderr, flush=True)
        del model
    head = "" if record["head"] else " (no output head)"
    print(f"\n{a.preset}, {base.config.n_layer} layers{head}, {device_name}, context {a.context}\n")
    fmts = list(record["results"])
    print("| T | " + " | ".join(f"{f} ms | {f} x T=1" for f in fmts) + " |")
    print("|---:|" + "---:|---:|" * len(fmts))
    for t in tokens:
        cells = []
        for f in fmts:
            ms = record["results"][f]["ms"]
            cells += [f"{ms[t]:.2f}", f"{ms[t] / ms[tokens[0]]:.2f}"]
        print(f"| {t} | " + " | ".join(cells) + " |")
    for f in fmts:  # where verifying stops being nearly free: the first T costing 1.5x one token
        ms = record["results"][f]["ms"]
        knee = next((t for t in tokens if ms[t] > 1.5 * ms[tokens[0]]), None)
        record["results"][f]["first_T_over_1.5x"] = knee
        print(f"{f}: {record['results'][f]['weight_GB']:.3f} GB of weights, first T over 1.5x T=1: {knee}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(record, indent=1))
        plot(record, a.out.with_suffix(".png"))
    return record


if __name__ == "__main__":
    main()
