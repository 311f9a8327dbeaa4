"""Ablations of speculative decoding on one model: each sweep writes JSON and a PNG.

    python scripts/ablate.py --out-dir results/ablate_cpu                     # all sweeps, small
    python scripts/ablate.py --sweeps kgrid --k1 1,2,4,6 --k2 1,2,3 --prompts-per-category 2

Sweeps (every point runs the same prompts from fresh caches, after one untimed warm-up; the AR
baseline of each temperature is measured in the same run):
  kgrid        ML-SD mxfp4 + tiny over k1 x k2                  -> speedup heatmap
  temperature  SD mxfp4 (k 4) at each --temperatures            -> acceptance and speedup per T
  depth        1 to 3 levels: mxfp4 / mxfp4 + tiny / + ngram    -> acceptance per level, time per level
  draft        SD with each draft alone: tiny, mxfp4, mxfp4 with its head kept, ngram
  head         the MXFP4 draft with its output head cast or kept, at each k in --k1
Plots: the heatmap for kgrid; for the others, acceptance per level (bars) and the time breakdown
per level (stacked bars: each level's forward time, and the rest: sampling and bookkeeping).
Definitions as in bench.py: acceptance rate = accepted / drafted per level; mean accepted length =
tokens emitted per verification round, bonus included.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint import load_model  # noqa: E402
from generate import build_levels, default_dtype  # noqa: E402
from scripts.bench import load_prompts, run_config, summarise  # noqa: E402


def sweep_points(name: str, a) -> list[dict]:
    """The configurations of one sweep: label, drafts top-down as (kind, k), temperature, head."""
    k1s, k2s = a.k1, a.k2
    t0 = a.temperatures[0]
    if name == "kgrid":
        return [
            dict(label=f"k1={x},k2={y}", drafts=[("mxfp4", x), ("tiny", y)], temperature=t0, k1=x, k2=y)
            for x in k1s
            for y in k2s
        ]
    if name == "temperature":
        return [dict(label=f"T={t:g}", drafts=[("mxfp4", 4)], temperature=t) for t in a.temperatures]
    if name == "depth":
        stacks = [[("mxfp4", 4)], [("mxfp4", 6), ("tiny", 3)], [("mxfp4", 6), ("tiny", 3), ("ngram", 2)]]
        return [dict(label=f"{len(s)} draft level(s)", drafts=s, temperature=t0) for s in stacks]
    if name == "draft":
        return [
            dict(label="tiny", drafts=[("tiny", 4)], temperature=t0),
            dict(label="mxfp4", drafts=[("mxfp4", 4)], temperature=t0),
            dict(label="mxfp4 head kept", drafts=[("mxfp4", 4)], temperature=t0, head=False),
            dict(label="ngram", drafts=[("ngram", 4)], temperature=t0),
        ]
    if name == "head":
        return [
            dict(
                label=f"{'cast' if head else 'kept'} k={k}", drafts=[("mxfp4", k)], temperature=t0, head=head
            )
            for head in (True, False)
            for k in k1s
        ]
    raise ValueError(f"unknown sweep {name!r} (kgrid, temperature, depth, draft, head)")


def run_sweep(name, model, tok, prompts, a, device, dtype) -> dict:
    points = sweep_points(name, a)
    baseline = {}
    for t in sorted({p["temperature"] for p in points}):
        levels = build_levels(model, tok, [], device, dtype)
        run_config(levels, [], prompts[:1], 4, t, a.seed)  # warm-up, not timed
        baseline[t] = summarise(run_config(levels, [], prompts, a.max_new_tokens, t, a.seed), ["target"])
        print(f"[{name}] AR T={t:g}: {baseline[t]['tokens_per_s']:.1f} tok/s", flush=True)
    for i, p in enumerate(points):
        levels = build_levels(model, tok, p["drafts"], device, dtype, quantize_head=p.get("head", True))
        names = [lv.name for lv in levels]
        run_config(levels, p["drafts"], prompts[:1], 8, p["temperature"], a.seed)  # warm-up
        t0 = time.perf_counter()
        p["result"] = summarise(
            run_config(levels, p["drafts"], prompts, a.max_new_tokens, p["temperature"], a.seed, p["label"]),
            names,
        )
        p["speedup"] = p["result"]["tokens_per_s"] / baseline[p["temperature"]]["tokens_per_s"]
        acc = " ".join(f"{lv['acceptance_rate']:.2f}" for lv in p["result"]["levels"])
        print(f"[{name}] {i + 1}/{len(points)} {p['label']}: {p['speedup']:.2f}x, acceptance {acc} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        del levels
    return dict(sweep=name, baseline=baseline, points=points)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, name = record["points"], record["sweep"]
    title = f"{name}: {record['model']}, {record['device']}, {record['dtype']} ({record['machine']})"
    if name == "kgrid":
        k1s, k2s = sorted({p["k1"] for p in pts}), sorted({p["k2"] for p in pts})
        grid = [[next(p["speedup"] for p in pts if p["k1"] == x and p["k2"] == y) for y in k2s] for x in k1s]
        fig, ax = plt.subplots(figsize=(1.2 * len(k2s) + 3, 1.0 * len(k1s) + 2))
        im = ax.imshow(grid, cmap="viridis", origin="lower")
        ax.set_xticks(range(len(k2s)), [str(y) for y in k2s])
        ax.set_yticks(range(len(k1s)), [str(x) for x in k1s])
        ax.set_xlabel("k2 (tiny drafts for mxfp4)")
        ax.set_ylabel("k1 (mxfp4 drafts for the target)")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}x", ha="center", va="center", color="white")
        fig.colorbar(im, label="speedup over AR (same run)")
        ax.set_title(title, fontsize=8)
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = [p["label"] for p in pts]
        depth = max(len(p["result"]["levels"]) for p in pts)
        width = 0.8 / depth
        for lv in range(depth):
            vals = [
                p["result"]["levels"][lv]["acceptance_rate"] if lv < len(p["result"]["levels"]) else 0
                for p in pts
            ]
            ax1.bar([i + lv * width for i in range(len(pts))], vals, width, label=f"level {lv + 1}")
        ax1.set_xticks([i + 0.4 - width / 2 for i in range(len(pts))], labels, rotation=20, fontsize=8)
        ax1.set_ylabel("acceptance rate (accepted / drafted)")
        ax1.legend(fontsize=8)
        bottoms = [0.0] * len(pts)
        per_token = lambda p, s: 1e3 * s / p["result"]["tokens"]  # noqa: E731
        parts = [("target", lambda p: p["result"]["target_forward_time_s"])]
        parts += [(f"level {lv + 1}", lambda p, lv=lv: p["result"]["levels"][lv]["forward_time_s"]
                   if lv < len(p["result"]["levels"]) else 0.0) for lv in range(depth)]  # fmt: skip
        for label, get in parts:
            vals = [per_token(p, get(p)) for p in pts]
            ax2.bar(range(len(pts)), vals, bottom=bottoms, label=label)
            bottoms = [b + v for b, v in zip(bottoms, vals)]
        rest = [per_token(p, p["result"]["seconds"]) - b for p, b in zip(pts, bottoms)]
        ax2.bar(
            range(len(pts)), rest, bottom=bottoms, label="rest (sampling, bookkeeping)", color="lightgray"
        )
        ax2.set_xticks(
            range(len(pts)), [f"{lab}\n{p['speedup']:.2f}x" for lab, p in zip(labels, pts)], fontsize=8
        )
        ax2.set_ylabel("ms per generated token")
        ax2.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweeps", default="kgrid,temperature,depth,draft,head")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: generate.py's")
    p.add_argument("--k1", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--k2", default="1,2,3", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--temperatures", default="0,0.7,1.0", type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--prompts-per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=ROOT / "results" / "ablate")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else default_dtype(device)
    model, tok = load_model(a.checkpoint, device, dtype)
    prompts = []
    for row in load_prompts(a.prompts_per_category):
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}])
        prompts.append((dict(row, stop_ids=tok.stop_ids), torch.tensor(tok.encode(text, bos=tok.add_bos))))
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for name in a.sweeps.split(","):
        record = run_sweep(name, model, tok, prompts, a, device, dtype)
        record.update(
            machine=platform.processor() or platform.machine(), device=str(device), dtype=str(dtype)[6:],
            model=str(a.checkpoint or "SmolLM2-135M-Instruct"), torch=torch.__version__,
            gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
            threads=torch.get_num_threads(), settings={k: str(v) for k, v in vars(a).items()},
            prompts=len(prompts),
        )  # fmt: skip
        (a.out_dir / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
        plot(record, a.out_dir / f"{name}.png")
        print(f"wrote {a.out_dir / name}.json and .png", flush=True)


if __name__ == "__main__":
    main()
