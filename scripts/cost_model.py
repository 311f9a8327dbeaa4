"""The speedup that speculation should give, from acceptance and measured forward latencies.

    python scripts/cost_model.py --bench results/cpu_smollm2.json --out results/cost_model_cpu
        check: predicted vs measured speedup of every configuration in a bench.py record, with the
        latencies of each level measured here, on the same model
    python scripts/cost_model.py --bench results/cpu_smollm2.json --project llama-3.1-8b --device cuda
        projection: latencies measured at real shapes on random weights (target llama-3.1-8b, its
        MXFP4 cast, llama-3.2-1b as `tiny`), acceptance taken from the bench record of the real model.
        Printed and saved as a PROJECTION, never as a measurement.

The model is `expected_speedup` below; everything else feeds it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def expected_speedup(
    step: list[float],
    verify: list[float],
    accept: list[float],
    k: list[int],
    emitted: list[float | None] | None = None,
    drafting: list[float | None] | None = None,
) -> float:
    """Expected speedup of speculative decoding over plain decoding with levels[0] (the target).

    Leviathan et al. (2023), generalised to a stack of levels 0 (target) .. L-1 (last draft):
      step[i]    seconds of a one-token forward of level i (0 for a model-free proposer)
      verify[i]  seconds of level i's forward over k[i] + 1 tokens (it verifies level i+1's proposals)
      accept[i]  probability that level i accepts a token drafted by level i+1, taken as independent
                 of position (the i.i.d. assumption of the paper)
      k[i]       tokens level i+1 drafts for level i per round
    A verification round of level i emits E = (1 - a^(k+1)) / (1 - a) tokens on average (accepted
    ones plus the correction or bonus token) and costs verify[i] plus k drafted tokens, each at the
    per-token cost c[i+1] of the level below. That level, when it has drafts of its own, produces its
    tokens by the same rule, so the cost per token is defined from the bottom up:
        c[L-1] = step[L-1];   c[i] = (verify[i] + k[i] * c[i+1]) / E(accept[i], k[i])
    and the speedup is step[0] / c[0]. Ignored: the overshoot of a lower level past what the level
    above asked for (ours never overshoots), sampling and bookkeeping time between forwards, prefill.

    Trees (level i+1 drafts a token tree for level i): no i.i.d. formula gives the tokens a tree round
    emits, and drafting a tree is not k tokens at the per-token cost below. So emitted[i] (the measured
    mean accepted length) replaces E, and drafting[i] (the seconds level i+1 spends growing one tree:
    one forward per depth) replaces k[i] * c[i+1]; verify[i] is then level i's forward over the tree.
    None entries (or no list) keep the sequence rule.
    """
    levels = len(step)
    if not (len(verify) >= levels - 1 and len(accept) >= levels - 1 and len(k) >= levels - 1):
        raise ValueError("need verify, accept and k for every level but the last")
    emitted = emitted or [None] * levels
    drafting = drafting or [None] * levels
    cost = step[-1]
    for i in range(levels - 2, -1, -1):
        a = accept[i]
        e = emitted[i] or (k[i] + 1 if a >= 1 else (1 - a ** (k[i] + 1)) / (1 - a))
        d = drafting[i] if drafting[i] is not None else k[i] * cost
        cost = (verify[i] + d) / e
    return step[0] / cost


def acceptance_from_mean_length(mean_length: float, k: int) -> float:
    """The i.i.d. per-token acceptance a whose (1 - a^(k+1)) / (1 - a) equals a measured mean accepted
    length (tokens emitted per round, bonus included), by bisection: it is increasing in a."""
    if not 1 <= mean_length <= k + 1:
        raise ValueError(f"a mean accepted length must lie in [1, k + 1], got {mean_length} for k = {k}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        a = (lo + hi) / 2
        if (1 - a ** (k + 1)) / (1 - a) < mean_length:
            lo = a
        else:
            hi = a
    return (lo + hi) / 2


def time_forward(level, tokens: int, context: int = 128, repeats: int = 7) -> float:
    """Median seconds of level.forward over `tokens` tokens after `context` cached ones."""
    if not hasattr(level, "forward"):  # a model-free proposer: no forward to pay for
        return 0.0
    level.reset(context + tokens + 1)
    ids = torch.randint(0, level.vocab_size, (context + tokens,), device=level.device)
    level.forward(ids[:context], 0)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        level.forward(ids[context:], context)
        if level.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def measured_acceptance(bench_row: dict, ks: list[int]) -> list[float]:
    """Per level, the i.i.d. acceptance that reproduces the mean accepted length a bench.py run saw."""
    levels = bench_row["all"]["levels"]
    return [acceptance_from_mean_length(lv["mean_accepted_length"], k) for lv, k in zip(levels, ks)]


def latencies(levels, ks, timer=time_forward) -> tuple[list[float], list[float]]:
    step = [timer(lv, 1) for lv in levels]
    verify = [timer(lv, k + 1) for lv, k in zip(levels, ks)]
    return step, verify


def tree_terms(levels, r: dict, ks: list[int], verify: list[float], timer=time_forward):
    """For a record row whose last level drafts trees: (emitted, drafting) for expected_speedup, with
    verify[-1] replaced in place by the verifier's forward over a tree of the measured mean size. The
    drafter grows a tree with one forward per depth: the first over one token, the others over topk
    nodes each (bench.py's tree shape is saved with the row)."""
    n = len(ks)
    emitted, drafting = [None] * (n + 1), [None] * (n + 1)
    last = r["all"]["levels"][-1]
    nodes = max(1, round(last["mean_tree_nodes"]))
    verify[n - 1] = timer(levels[n - 1], nodes + 1)
    depth = ks[-1]
    drafter = levels[n]
    drafting[n - 1] = timer(drafter, 1) + (depth - 1) * timer(drafter, r["tree"]["topk"])
    emitted[n - 1] = last["mean_accepted_length"]
    return emitted, drafting


def check(record: dict, model, tok, device, dtype) -> list[dict]:
    """Predicted vs measured speedup for every speculative configuration of a bench.py record."""
    from generate import build_levels

    rows = []
    for r in record["results"]:
        drafts = [tuple(d[:2]) for d in r["drafts"]]
        if not drafts:
            continue
        ks = [k for _, k in drafts]
        levels = build_levels(model, tok, drafts, device, dtype, quantize_head="head kept" not in r["config"])
        step, verify = latencies(levels, ks)
        accept = measured_acceptance(r, ks)
        emitted = drafting = None
        if r.get("tree"):
            emitted, drafting = tree_terms(levels, r, ks, verify)
        predicted = expected_speedup(step, verify, accept, ks, emitted, drafting)
        rows.append(
            dict(
                config=r["config"], temperature=r["temperature"], k=ks, accept=accept,
                step_ms=[s * 1e3 for s in step], verify_ms=[v * 1e3 for v in verify],
                predicted=predicted, measured=r["speedup"],
            )
        )  # fmt: skip
        del levels
    return rows


def project(record: dict, target: str, tiny: str, device, dtype) -> list[dict]:
    """Latencies at real shapes (random weights), acceptance from the real model's record."""
    from mxfp4 import quantize_model
    from scripts.bench_decode import random_model
    from speculate import ModelLevel, NgramProposer

    big = random_model(target, device, dtype)
    # One level per model for all rows, each forward length timed once: on CUDA a level compiles
    # every forward length it is given (minutes for an 8B model over all rows otherwise).
    made, times = {"target": ModelLevel(big, "target")}, {}

    def level_of(kind: str, head: bool):
        if kind == "ngram":
            return NgramProposer()
        key = (kind, head) if kind == "mxfp4" else kind
        if key not in made:
            made[key] = (
                ModelLevel(quantize_model(big, quantize_output=head), "mxfp4")
                if kind == "mxfp4"
                else ModelLevel(random_model(tiny, device, dtype), "tiny")
            )
        return made[key]

    def timer(level, tokens: int) -> float:
        if (level, tokens) not in times:  # keyed by the object (kept alive), not a reusable id
            times[level, tokens] = time_forward(level, tokens)
        return times[level, tokens]

    rows = []
    for r in record["results"]:
        drafts = [tuple(d[:2]) for d in r["drafts"]]
        if not drafts:
            continue
        ks = [k for _, k in drafts]
        levels = [made["target"]] + [level_of(kind, "head kept" not in r["config"]) for kind, _ in drafts]
        step, verify = latencies(levels, ks, timer)
        accept = measured_acceptance(r, ks)
        emitted = drafting = None
        if r.get("tree"):
            emitted, drafting = tree_terms(levels, r, ks, verify, timer)
        rows.append(
            dict(
                config=r["config"], temperature=r["temperature"], k=ks, accept=accept,
                step_ms=[s * 1e3 for s in step], verify_ms=[v * 1e3 for v in verify],
                projected=expected_speedup(step, verify, accept, ks, emitted, drafting),
            )
        )  # fmt: skip
        del levels
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, required=True, help="a JSON record written by scripts/bench.py")
    p.add_argument("--project", default=None, help="a target preset (llama-3.1-8b): project instead of check")
    p.add_argument("--tiny", default="llama-3.2-1b", help="the preset standing in for `tiny` in a projection")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="output prefix: PREFIX.json and PREFIX.md")
    a = p.parse_args(argv)
    record = json.loads(a.bench.read_text())
    device = torch.device(a.device)
    dtype = getattr(torch, record["dtype"].removeprefix("torch."))
    if a.project:
        rows = project(record, a.project, a.tiny, device, dtype)
        title = (
            f"PROJECTION (not a measurement): {a.project} target on {device}, random weights, latencies "
            f"measured here; acceptance from {record['model']} ({a.bench.name})"
        )
        head, key = "projected speedup", "projected"
    else:
        from checkpoint import load_model

        model, tok = load_model(record["settings"].get("checkpoint"), device, dtype)
        rows = check(record, model, tok, device, dtype)
        title = f"Cost model vs measurement: {record['model']} on {device}, {dtype}, latencies measured here"
        head, key = "predicted | measured", None
    lines = [title, "", f"| config | T | k | i.i.d. acceptance | step ms | verify ms | {head} |"]
    lines.append("|---|---:|---|---|---|---|---:|" + ("---:|" if key is None else ""))
    for r in rows:
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        last = f"{r['predicted']:.2f}x | {r['measured']:.2f}x" if key is None else f"{r[key]:.2f}x"
        lines.append(
            f"| {r['config']} | {r['temperature']:g} | {r['k']} | {fmt(r['accept'])} | {fmt(r['step_ms'])} "
            f"| {fmt(r['verify_ms'])} | {last} |"
        )
    md = "\n".join(lines)
    print(md)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps(dict(title=title, rows=rows), indent=1))
        a.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
