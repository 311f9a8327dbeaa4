"""Decoding configurations side by side on a prompt set: tokens/s, speedup over AR, acceptance, exactness.

    python scripts/bench.py --out results/cpu_smollm2                     # embedded SmolLM2, all configs
    python scripts/bench.py --configs "AR,SD mxfp4" --levels mxfp4:4,ngram:2 --repeats 3
    python scripts/bench.py --prompts spec_bench/question.jsonl --prompts-per-category 1

Named configurations live in data/bench_configs.json; --levels adds any stack (levels.parse_levels).
Prompts: data/prompts/*.jsonl by default, or --prompts FILE in this project's layout or Spec-Bench's
question.jsonl (its first turn). For each temperature and repeat, every prompt runs AR first and then
every configuration, so a change in the machine's load lands on all rows alike; the speedup's spread
is the min-max of the per-repeat speedups. Writes PREFIX.json and PREFIX.md with --out.
"""

import argparse
import json
import os
import sys
from pathlib import Path

# As generate.py: OpenMP's threads sleep after a region instead of spinning (docs/kernels.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import bench_lib
from accel import accelerate
from checkpoint import load_model
from levels import DTYPES, default_dtype, tree_shape

CONFIGS = {
    k: v for k, v in json.loads((bench_lib.DATA / "bench_configs.json").read_text()).items() if k[0] != "_"
}


LEVELS_HEAD = "per level: acceptance / mean acc. length [acceptance at draft positions 1-4]"


def markdown(rows, header_line) -> str:
    def levels(r):
        return "; ".join(
            f"{lv['name']} {lv['acceptance_rate']:.2f} / {lv['mean_accepted_length']:.2f}"
            + (
                " [" + " ".join(f"{a:.2f}" for a in lv["acceptance_by_position"][:4]) + "]"
                if lv.get("acceptance_by_position")
                else ""
            )
            + (f" (trees of {lv['mean_tree_nodes']:.1f} nodes)" if lv["mean_tree_nodes"] else "")
            for lv in r["all"]["levels"]
        )

    same = {True: "yes", False: "**NO**"}
    main = bench_lib.markdown_table(
        ["config", "T", "tokens/s", "speedup (min-max)", "greedy identical", LEVELS_HEAD],
        [
            [r["config"] + (f" (vs {r['baseline']})" if r.get("baseline", "AR") != "AR" else ""),
             f"{r['temperature']:g}", f"{r['all']['tokens_per_s']:.1f}",
             f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})",
             same.get(r.get("greedy_identical"), "-"), levels(r) or "-"]
            for r in rows
        ],
        "lrrrll",
    )  # fmt: skip
    cats = list(rows[0]["by_category"])
    by_cat = bench_lib.markdown_table(
        ["config", "T", *cats],
        [
            [r["config"], f"{r['temperature']:g}"] + [f"{r['by_category'][c]['speedup']:.2f}x" for c in cats]
            for r in rows
        ],
    )
    return "\n\n".join(
        [
            header_line,
            main,
            "Speedup by category (over AR at the same temperature):",
            by_cat,
            bench_lib.DEFINITIONS,
        ]
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated names from: " + ", ".join(CONFIGS)
    )
    p.add_argument("--levels", action="append", default=[], help="also run this stack (kind:k[:tree],...)")
    p.add_argument("--prompts", default=None, help="a JSONL file or folder (default: data/prompts)")
    p.add_argument("--prompts-per-category", type=int, default=2)
    p.add_argument("--temperatures", default="0,0.7")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="passes over the prompts (the spread is over them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tree-nodes", type=int, default=None, help="nodes per tree (default: levels.tree_shape)")
    p.add_argument("--tree-topk", type=int, default=None, help="children per expanded tree node")
    p.add_argument("--target-quant", default="none", choices=["none", "mxfp4", "int4"],
                   help="every config (AR too) runs this 4-bit target, speedups over its own AR")  # fmt: skip
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="accel.accelerate")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="output prefix: writes PREFIX.json and PREFIX.md")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    if unknown := [n for n in names if n not in CONFIGS]:
        p.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)} (or pass --levels)")
    configs = {n: CONFIGS[n] for n in ["AR", *names]} | {s: dict(levels=s) for s in a.levels}
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = default_dtype(device, a.kernels) if a.dtype == "auto" else DTYPES[a.dtype]
    tree = tree_shape(device, a.tree_nodes, a.tree_topk)
    model, tok = load_model(a.checkpoint, device, dtype)
    print(accelerate(model, enabled=a.kernels))
    prompts = bench_lib.encode_prompts(bench_lib.load_prompts(a.prompts, a.prompts_per_category), tok)
    temps = [float(t) for t in a.temperatures.split(",")]

    stacks = {
        name: bench_lib.build_stack(
            model, tok, c["levels"], device, dtype, tree, c.get("policy", "fixed"), c.get("share_kv", True),
            quantize_head=c.get("quantize_head", True), int8_drafts=c.get("int8_drafts", "auto"),
            compile=a.compile, target_quant=c.get("target_quant", a.target_quant), kernels=a.kernels,
        )
        for name, c in configs.items()
    }  # fmt: skip

    def progress(name, t, r, i, st):
        if name == list(stacks)[-1]:
            print(
                f"T={t:g} repeat {r + 1}/{a.repeats} prompt {i + 1}/{len(prompts)}",
                file=sys.stderr,
                flush=True,
            )

    results = bench_lib.run_interleaved(
        stacks, prompts, a.max_new_tokens, temps, a.repeats, a.seed, tok.stop_ids, progress
    )
    baselines = {n: c["baseline"] for n, c in configs.items() if "baseline" in c}
    if missing := {b for b in baselines.values() if b not in configs}:
        p.error(f"configs compared with {sorted(missing)} need them in --configs too")
    rows = bench_lib.compare(
        results, {n: [lv.name for lv in s.levels] for n, s in stacks.items()}, "AR", baselines
    )
    for r in rows:
        c = configs[r["config"]]
        if c.get("target_quant", a.target_quant) != a.target_quant and r["baseline"] == "AR":
            r["greedy_identical"] = None  # another target than AR's: its own greedy tokens differ
        r.update(levels=c["levels"], drafts=bench_lib.record_drafts(c["levels"]),
                 quantize_head=c.get("quantize_head", True))  # fmt: skip
        r["tree"] = vars(tree) if stacks[r["config"]].trees else None
    model_name, kernels = str(a.checkpoint or "embedded SmolLM2-135M-Instruct"), "on" if a.kernels else "off"
    head = (
        f"Model: {model_name}, {device}, {str(dtype)[6:]}, {len(prompts)} prompts "
        f"({a.prompts or 'data/prompts'}), {a.max_new_tokens} new tokens, {a.repeats} repeat(s), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads on {bench_lib.cpu_name()}, "
        f"kernels {kernels}, "
        f"target weights: {a.target_quant if a.target_quant != 'none' else 'as loaded'}; trees: {tree.nodes} "
        f"nodes, top-{tree.topk}, depth = the level's k (acceptance then counts accepted / depth)."
    )
    md = markdown(rows, head)
    print("\n" + md)
    record = dict(
        bench_lib.environment(device), model=model_name, dtype=str(dtype), settings=vars(a), results=rows
    )
    bench_lib.write_outputs(a.out, record, md)
    if a.out:
        plot(rows, head, Path(a.out).with_suffix(".png"))  # as write_outputs: PREFIX.png
    return rows


def plot(rows, title: str, path: Path):
    """Speedup over AR per configuration (bars) with its min-max over repeats, one colour per T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    temps = sorted({r["temperature"] for r in rows})
    width = 0.8 / len(temps)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(configs) + 2), 4.2))
    for j, t in enumerate(temps):
        got = {r["config"]: r for r in rows if r["temperature"] == t}
        xs = [i + (j - (len(temps) - 1) / 2) * width for i, c in enumerate(configs) if c in got]
        rs = [got[c] for c in configs if c in got]
        ys = [r["speedup"] for r in rs]
        err = [[y - r["speedup_min"] for y, r in zip(ys, rs)], [r["speedup_max"] - y for y, r in zip(ys, rs)]]
        label = "greedy" if t == 0 else f"T = {t:g}"
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(configs)), configs, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup over AR (same run)")
    ax.set_title(title[:110] + ("..." if len(title) > 110 else ""), fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
