"""Ablations of speculative decoding on one model: each sweep writes JSON and a PNG.

    python scripts/ablate.py --out-dir results/ablate_cpu                     # all sweeps, small
    python scripts/ablate.py --sweeps kgrid --k1 1,2,4,6 --k2 1,2,3 --prompts-per-category 2

Sweeps (each runs its points and the AR baseline interleaved prompt by prompt, bench_lib.run_interleaved):
  kgrid        ML-SD mxfp4 + tiny over k1 x k2                  -> speedup heatmap
  temperature  SD mxfp4 (k 4) at each --temperatures            -> acceptance and speedup per T
  depth        1 to 3 levels: mxfp4 / mxfp4 + tiny / + ngram    -> acceptance per level, time per level
  draft        SD with each draft alone: tiny, mxfp4, mxfp4 with its head kept, ngram
  head         the MXFP4 draft with its output head cast or kept, at each k in --k1
Plots: the heatmap for kgrid; for the others, acceptance per level (bars) and the time per generated
token split by level (each level's forward time, and the rest: sampling and bookkeeping).
"""

import argparse
from pathlib import Path

import torch

import bench_lib
from accel import accelerate
from checkpoint import load_model
from levels import DTYPES, default_dtype

SWEEPS = ("kgrid", "temperature", "depth", "draft", "head")


def sweep_points(name: str, a) -> tuple[dict, list[float]]:
    """One sweep's points {label: (levels description, quantize the MXFP4 head)} and its temperatures."""
    first = a.temperatures[:1]
    if name == "kgrid":
        return {f"k1={x},k2={y}": (f"mxfp4:{x},tiny:{y}", True) for x in a.k1 for y in a.k2}, first
    if name == "temperature":
        return {"SD mxfp4 k=4": ("mxfp4:4", True)}, a.temperatures
    if name == "depth":
        stacks = ("mxfp4:4", "mxfp4:6,tiny:3", "mxfp4:6,tiny:3,ngram:2")
        return {f"{s.count(',') + 1} draft level(s)": (s, True) for s in stacks}, first
    if name == "draft":
        points = {"tiny": "tiny:4", "mxfp4": "mxfp4:4", "mxfp4 head kept": "mxfp4:4", "ngram": "ngram:4"}
        return {k: (v, k != "mxfp4 head kept") for k, v in points.items()}, first
    if name == "head":
        return {
            f"{'cast' if h else 'kept'} k={k}": (f"mxfp4:{k}", h) for h in (True, False) for k in a.k1
        }, first
    raise ValueError(f"unknown sweep {name!r} ({', '.join(SWEEPS)})")


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["rows"] if r["config"] != "AR"]
    label = lambda r: r["config"] if record["sweep"] != "temperature" else f"T={r['temperature']:g}"  # noqa: E731
    title = (
        f"{record['sweep']}: {record['model']}, {record['device']}, {record['dtype']} ({record['processor']})"
    )
    if record["sweep"] == "kgrid":
        ks = {r["config"]: [s.k for s in bench_lib.as_specs(r["levels"])] for r in rows}
        k1s, k2s = sorted({k[0] for k in ks.values()}), sorted({k[1] for k in ks.values()})
        grid = [[next(r["speedup"] for r in rows if ks[r["config"]] == [x, y]) for y in k2s] for x in k1s]
        fig, ax = plt.subplots(figsize=(1.2 * len(k2s) + 3, 1.0 * len(k1s) + 2))
        im = ax.imshow(grid, cmap="viridis", origin="lower")
        ax.set(xlabel="k2 (tiny drafts for mxfp4)", ylabel="k1 (mxfp4 drafts for the target)")
        ax.set_xticks(range(len(k2s)), [str(y) for y in k2s])
        ax.set_yticks(range(len(k1s)), [str(x) for x in k1s])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}x", ha="center", va="center", color="white")
        fig.colorbar(im, label="speedup over AR (same run)")
        ax.set_title(title, fontsize=8)
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        depth = max(len(r["all"]["levels"]) for r in rows)
        width, xs = 0.8 / depth, range(len(rows))
        for lv in range(depth):
            vals = [
                r["all"]["levels"][lv]["acceptance_rate"] if lv < len(r["all"]["levels"]) else 0 for r in rows
            ]
            ax1.bar([i + lv * width for i in xs], vals, width, label=f"level {lv + 1}")
        ax1.set_xticks([i + 0.4 - width / 2 for i in xs], [label(r) for r in rows], rotation=20, fontsize=8)
        ax1.set_ylabel("acceptance rate (accepted / drafted)")
        ax1.legend(fontsize=8)
        ms = lambda r, s: 1e3 * s / r["all"]["tokens"]  # noqa: E731
        level_time = lambda r, lv: (
            r["all"]["levels"][lv]["forward_time_s"] if lv < len(r["all"]["levels"]) else 0
        )  # noqa: E731
        parts = [("target", lambda r: r["all"]["target_forward_time_s"])]
        parts += [(f"level {lv + 1}", lambda r, lv=lv: level_time(r, lv)) for lv in range(depth)]
        bottoms = [0.0] * len(rows)
        for name, get in parts:
            vals = [ms(r, get(r)) for r in rows]
            ax2.bar(xs, vals, bottom=bottoms, label=name)
            bottoms = [b + v for b, v in zip(bottoms, vals)]
        rest = [ms(r, r["all"]["seconds"]) - b for r, b in zip(rows, bottoms)]
        ax2.bar(xs, rest, bottom=bottoms, label="rest (sampling, bookkeeping)", color="lightgray")
        ax2.set_xticks(xs, [f"{label(r)}\n{r['speedup']:.2f}x" for r in rows], fontsize=8)
        ax2.set_ylabel("ms per generated token")
        ax2.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweeps", default=",".join(SWEEPS))
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--k1", default="1,2,4", type=ints)
    p.add_argument("--k2", default="1,2,3", type=ints)
    p.add_argument("--temperatures", default="0,0.7,1.0", type=floats)
    p.add_argument("--prompts", default=None, help="a JSONL file or folder (default: data/prompts)")
    p.add_argument("--prompts-per-category", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="accel.accelerate")
    p.add_argument("--out-dir", type=Path, default=bench_lib.DATA.parent / "results" / "ablate")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = default_dtype(device, a.kernels) if a.dtype == "auto" else DTYPES[a.dtype]
    model, tok = load_model(a.checkpoint, device, dtype)
    print(accelerate(model, enabled=a.kernels))
    prompts = bench_lib.encode_prompts(bench_lib.load_prompts(a.prompts, a.prompts_per_category), tok)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for name in a.sweeps.split(","):
        points, temps = sweep_points(name, a)
        points = {"AR": ("", True)} | points
        stacks = {
            label: bench_lib.build_stack(
                model, tok, spec, device, dtype, quantize_head=head, kernels=a.kernels
            )
            for label, (spec, head) in points.items()
        }
        results = bench_lib.run_interleaved(
            stacks, prompts, a.max_new_tokens, temps, a.repeats, a.seed, tok.stop_ids
        )
        rows = bench_lib.compare(results, {n: [lv.name for lv in s.levels] for n, s in stacks.items()})
        for r in rows:
            r["levels"], r["quantize_head"] = points[r["config"]]
            acc = " ".join(f"{lv['acceptance_rate']:.2f}" for lv in r["all"]["levels"])
            print(
                f"[{name}] {r['config']} T={r['temperature']:g}: {r['speedup']:.2f}x, acceptance {acc or '-'}"
            )
        record = dict(
            bench_lib.environment(device), sweep=name, model=str(a.checkpoint or "SmolLM2-135M-Instruct"),
            dtype=str(dtype)[6:], settings={k: str(v) for k, v in vars(a).items()}, prompts=len(prompts),
            rows=rows,
        )  # fmt: skip
        bench_lib.write_json(a.out_dir / f"{name}.json", record)
        plot(record, a.out_dir / f"{name}.png")
        print(f"wrote {a.out_dir / name}.json and .png", flush=True)


if __name__ == "__main__":
    main()
