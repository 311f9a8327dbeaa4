"""Decoding configurations over the project's prompt sets: speed, acceptance and exactness, one table.

    python scripts/bench.py                                   # embedded SmolLM2 on the CPU
    python scripts/bench.py --prompts-per-category 2 --max-new-tokens 48 --out results/cpu_smollm2

Every configuration runs the same prompts from fresh caches, after an untimed warm-up. The
autoregressive baseline of the same dtype runs in the same process, so speedups compare like with like.

Definitions (also written into the markdown next to the table):
  acceptance rate       drafted tokens the level above kept / drafted tokens, per level.
  mean accepted length  tokens the level above emits per verification round on that level's
                        proposals, the correction or bonus token included: (accepted + rounds) / rounds.
  greedy identical      greedy output token-for-token equal to the baseline's (it must be).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint import load_model  # noqa: E402
from generate import build_levels, default_dtype  # noqa: E402
from speculate import TreeShape, autoregressive_decode, speculative_decode  # noqa: E402

CONFIGS = {  # name: drafts top-down as (kind, k), or (kind, k, "tree") for a level that drafts trees
    "AR": [],
    "SD tiny": [("tiny", 4)],
    "SD mxfp4": [("mxfp4", 4)],
    "SD mxfp4 (head kept)": [("mxfp4", 4)],  # the draft keeps the output head in the run dtype
    "ML-SD mxfp4+tiny": [("mxfp4", 6), ("tiny", 3)],
    "ML-SD mxfp4+tiny+ngram": [("mxfp4", 6), ("tiny", 3), ("ngram", 2)],
    # Issue 7: the target verifies tiny's trees itself (EAGLE-2 style), and the SpecMQuant hierarchy,
    # where the MXFP4 level verifies tiny's trees and hands the target sequences.
    "tree SD tiny": [("tiny", 3, "tree")],
    "tree SD ngram": [("ngram", 3, "tree")],
    "hierarchy mxfp4+tiny tree": [("mxfp4", 6), ("tiny", 3, "tree")],
    "hierarchy tiny+ngram tree": [("tiny", 4), ("ngram", 3, "tree")],  # for 4-bit targets: a bf16 middle
}
HEAD_KEPT = {"SD mxfp4 (head kept)"}
TREE = TreeShape(nodes=16, topk=4)  # --tree-nodes / --tree-topk change it


def split(config: list) -> tuple[list[tuple[str, int]], list | None]:
    """A CONFIGS entry -> (drafts as (kind, k), trees for speculative_decode)."""
    trees = [TREE if len(d) > 2 else None for d in config]
    return [d[:2] for d in config], trees if any(trees) else None


def load_prompts(n_per_category: int) -> list[dict]:
    rows = []
    for f in sorted((ROOT / "data" / "prompts").glob("*.jsonl")):
        lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        rows += lines[:n_per_category]
    return rows


def run_config(levels, drafts, prompts, max_new, temperature, seed, desc=None, trees=None):
    """One configuration over all prompts: per-prompt outputs and per-category aggregates."""
    per_prompt = []
    bar = tqdm(prompts, desc=desc, unit="prompt", leave=False, file=sys.stderr, disable=not desc)
    for i, (row, ids) in enumerate(bar):
        g = torch.Generator(device=levels[0].device).manual_seed(seed + i)
        kw = dict(temperature=temperature, top_k=None, top_p=None, generator=g, stop_ids=row["stop_ids"])
        if not drafts:
            out, st = autoregressive_decode(levels[0], ids, max_new, **kw)
        else:
            out, st = speculative_decode(levels, ids, max_new, k=[k for _, k in drafts], trees=trees, **kw)
        per_prompt.append(dict(id=row["id"], category=row["category"], tokens=out.tolist(), stats=st))
    return per_prompt


AGREEMENT_DRAFTS = {  # label: (kind, quantize the head)
    "mxfp4": ("mxfp4", True),
    "mxfp4 (head kept)": ("mxfp4", False),
    "tiny": ("tiny", True),
    "ngram": ("ngram", True),
}


@torch.no_grad()
def draft_agreement(model, tok, prompts, greedy_tokens, device, dtype) -> dict:
    """How often each draft alone picks the target's greedy token, teacher-forced along the target's
    own greedy continuation of every prompt: the plainest measure of a draft (no k, no rounds).
    A model draft reads prompt + continuation in one forward and its argmax at each position is
    compared with the target's next token; ngram proposes one token from the tokens so far, and a
    missing proposal counts as a miss."""
    out = {}
    for label, (kind, head) in AGREEMENT_DRAFTS.items():
        level = build_levels(model, tok, [(kind, 1)], device, dtype, quantize_head=head)[1]
        hits = total = 0
        for row, ids in prompts:
            cont = greedy_tokens[row["id"]]
            seq = ids.tolist() + cont
            n = len(ids)
            if kind == "ngram":
                guesses = [(level.propose(seq[:i], 1) or [-1])[0] for i in range(n, len(seq))]
            else:
                level.reset(len(seq))
                logits = level.forward(torch.tensor(seq, device=device), 0)
                guesses = logits[n - 1 : len(seq) - 1].argmax(-1).tolist()
            hits += sum(g == t for g, t in zip(guesses, cont))
            total += len(cont)
        out[label] = hits / total if total else 0.0
        print(f"draft alone picks the target's greedy token: {label:<18} {out[label]:.3f}", flush=True)
    return out


def summarise(per_prompt, names):
    """Aggregate over prompts: tokens/s from summed tokens and time, acceptance from summed counts."""
    tokens = sum(len(p["tokens"]) for p in per_prompt)
    seconds = sum(p["stats"].total_time for p in per_prompt)
    out = dict(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds, levels=[])
    for i in range(1, len(names)):
        lv = [p["stats"].levels[i] for p in per_prompt]
        proposed, accepted, rounds = (
            sum(getattr(s, f) for s in lv) for f in ("proposed", "accepted", "rounds")
        )
        out["levels"].append(
            dict(
                name=names[i],
                acceptance_rate=accepted / proposed if proposed else 0.0,
                mean_accepted_length=(accepted + rounds) / rounds if rounds else 0.0,
                proposed=proposed,
                accepted=accepted,
                rounds=rounds,
                forward_time_s=sum(s.forward_time or 0.0 for s in lv),
                mean_tree_nodes=sum(s.tree_nodes for s in lv) / rounds if rounds else 0.0,
            )
        )
    out["target_forward_time_s"] = sum(
        p["stats"].levels[0].forward_time or 0.0 for p in per_prompt if p["stats"].levels
    )
    # Each level's mean forward time by tokens fed: the cost of verifying sequences or trees of each size.
    out["ms_per_forward_by_tokens"] = []
    for i in range(len(names)):
        acc = {}
        for p in per_prompt:
            if i < len(p["stats"].levels):
                for t, (n, sec) in p["stats"].levels[i].time_by_tokens.items():
                    a, b = acc.get(t, (0, 0.0))
                    acc[t] = (a + n, b + sec)
        out["ms_per_forward_by_tokens"].append({t: 1e3 * sec / n for t, (n, sec) in sorted(acc.items())})
    return out


def main(argv=None):
    global TREE  # the tree configs' shape, from the command line
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: generate.py's (bf16 on CUDA and AVX-512 CPUs)")
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated names from: " + ", ".join(CONFIGS)
    )
    p.add_argument("--temperatures", default="0,0.7")
    p.add_argument("--prompts-per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tree-nodes", type=int, default=TREE.nodes, help="nodes per tree of the tree configs")
    p.add_argument("--tree-topk", type=int, default=TREE.topk, help="children per expanded tree node")
    p.add_argument(
        "--target-quant",
        default="none",
        choices=["none", "mxfp4", "int4"],
        help="every config (AR too) runs this 4-bit target; speedups are over its own AR",
    )
    p.add_argument(
        "--no-agreement", dest="agreement", action="store_false", help="skip the draft-alone agreement table"
    )
    p.add_argument("--out", type=Path, default=None, help="output prefix: writes PREFIX.json and PREFIX.md")
    a = p.parse_args(argv)
    TREE = TreeShape(a.tree_nodes, a.tree_topk)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else default_dtype(device)
    model, tok = load_model(a.checkpoint, device, dtype)
    prompts = []
    for row in load_prompts(a.prompts_per_category):
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}])
        prompts.append((dict(row, stop_ids=tok.stop_ids), torch.tensor(tok.encode(text, bos=tok.add_bos))))
    categories = sorted({row["category"] for row, _ in prompts})
    temps = [float(t) for t in a.temperatures.split(",")]
    names = [n.strip() for n in a.configs.split(",")]
    if "AR" not in names:
        names.insert(0, "AR")  # the baseline is always measured in the same run

    results, baseline_tokens = [], {}
    for name in names:
        drafts, trees = split(CONFIGS[name])
        head, quant = name not in HEAD_KEPT, a.target_quant
        levels = build_levels(model, tok, drafts, device, dtype, quantize_head=head, target_quant=quant)
        level_names = [lv.name for lv in levels]
        warm = prompts[0][1]
        (autoregressive_decode(levels[0], warm, 4) if not drafts else
         speculative_decode(levels, warm, 8, k=[k for _, k in drafts], trees=trees))  # fmt: skip
        for t in temps:
            t0 = time.perf_counter()
            per_prompt = run_config(
                levels, drafts, prompts, a.max_new_tokens, t, a.seed, f"{name} T={t:g}", trees
            )
            row = dict(config=name, temperature=t, drafts=CONFIGS[name])
            row["all"] = summarise(per_prompt, level_names)
            row["tree"] = vars(TREE) if trees else None
            row["by_category"] = {
                c: summarise([q for q in per_prompt if q["category"] == c], level_names) for c in categories
            }
            if t == 0:
                if name == "AR":
                    baseline_tokens = {q["id"]: q["tokens"] for q in per_prompt}
                row["greedy_identical"] = all(q["tokens"] == baseline_tokens.get(q["id"]) for q in per_prompt)
            results.append(row)
            acc = " ".join(f"{lv['name']}: {lv['acceptance_rate']:.2f}/{lv['mean_accepted_length']:.2f}"
                           for lv in row["all"]["levels"])  # fmt: skip
            print(f"{name:<26} T={t:<4} {row['all']['tokens_per_s']:7.1f} tok/s  {acc}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        del levels
    agreement = {}
    if a.agreement and baseline_tokens:  # needs the greedy AR outputs (temperature 0 in the run)
        agreement = draft_agreement(model, tok, prompts, baseline_tokens, device, dtype)
    for row in results:
        base = next(r for r in results if r["config"] == "AR" and r["temperature"] == row["temperature"])
        row["speedup"] = row["all"]["tokens_per_s"] / base["all"]["tokens_per_s"]
        for c in categories:
            row["by_category"][c]["speedup"] = (
                row["by_category"][c]["tokens_per_s"] / base["by_category"][c]["tokens_per_s"]
            )

    md = markdown(results, categories, device, dtype, a, agreement)
    print("\n" + md)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        record = dict(
            machine=platform.node(), processor=platform.processor(), torch=torch.__version__,
            gpu=torch.cuda.get_device_name() if device.type == "cuda" else None, device=str(device),
            dtype=str(dtype), model=str(a.checkpoint or "embedded SmolLM2-135M-Instruct"),
            settings=vars(a) | {"out": str(a.out)}, threads=torch.get_num_threads(), results=results,
            draft_agreement=agreement,
        )  # fmt: skip
        a.out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
        a.out.with_suffix(".md").write_text(md)
    return results


def markdown(results, categories, device, dtype, a, agreement) -> str:
    lines = [
        f"Model: {a.checkpoint or 'embedded SmolLM2-135M-Instruct'}, {device}, {str(dtype)[6:]}, "
        f"{a.prompts_per_category} prompts x {len(categories)} categories, {a.max_new_tokens} new tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, target weights: "
        f"{a.target_quant if a.target_quant != 'none' else 'as loaded'}; tree configs: {TREE.nodes} nodes, "
        f"top-{TREE.topk}, depth = their k (for a tree level, acceptance counts accepted / tree depth).",
        "",
        "| config | T | tokens/s | speedup | greedy identical | per level: acceptance / mean acc. length |",
        "|---|---:|---:|---:|:---:|---|",
    ]
    for r in results:
        acc = "; ".join(
            f"{lv['name']} {lv['acceptance_rate']:.2f} / {lv['mean_accepted_length']:.2f}"
            + (f" (trees of {lv['mean_tree_nodes']:.1f} nodes)" if lv.get("mean_tree_nodes") else "")
            for lv in r["all"]["levels"]
        )
        same = {True: "yes", False: "**NO**"}.get(r.get("greedy_identical"), "-")
        lines.append(
            f"| {r['config']} | {r['temperature']:g} | {r['all']['tokens_per_s']:.1f} | {r['speedup']:.2f}x "
            f"| {same} | {acc or '-'} |"
        )
    lines += ["", "Speedup by category (over AR at the same temperature):", ""]
    lines.append("| config | T | " + " | ".join(categories) + " |")
    lines.append("|---|---:|" + "---:|" * len(categories))
    for r in results:
        cells = " | ".join(f"{r['by_category'][c]['speedup']:.2f}x" for c in categories)
        lines.append(f"| {r['config']} | {r['temperature']:g} | {cells} |")
    if agreement:
        lines += ["", "How often each draft alone picks the target's greedy token (teacher-forced along the "
                  "target's greedy outputs above):", "", "| draft | agreement |", "|---|---:|"]  # fmt: skip
        lines += [f"| {k} | {v:.3f} |" for k, v in agreement.items()]
    lines += [
        "",
        "Definitions: *acceptance rate* = drafted tokens the level above kept / drafted tokens. "
        "*Mean accepted length* = tokens the level above emits per verification round on that level's "
        "proposals, the correction or bonus token included: (accepted + rounds) / rounds. Speedups compare "
        "tokens/s with the autoregressive baseline measured in the same run; warm-up is not timed.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
