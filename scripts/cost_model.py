"""The speedup speculation should give (bench_lib.expected_speedup), from acceptance and forward latencies.

python scripts/cost_model.py --bench results/cpu_smollm2.json --out results/cost_model_cpu
    check: predicted vs measured speedup of every configuration of a bench.py record, with each
    level's latencies measured here, on the same model
python scripts/cost_model.py --bench results/cpu_smollm2.json --project llama-3.1-8b --device cuda
    projection: latencies measured at real shapes on random weights (target llama-3.1-8b, its
    MXFP4 cast, llama-3.2-1b standing in for `tiny`), acceptance from the real model's record.
    Printed and saved as a PROJECTION, never as a measurement.
"""

import argparse
import json
from pathlib import Path

import torch

import bench_lib
from accel import accelerate, compile_decode
from bench_lib import acceptance_from_mean_length, expected_speedup
from checkpoint import load_model
from levels import cast
from speculate import ModelLevel, NgramProposer


def predict(row: dict, levels: list, timer) -> dict:
    """expected_speedup for one record row, with timer(level, tokens) -> seconds. A row whose last
    level drafts trees: the verifier's forward is over a tree of the measured mean size, the drafter
    grows it with one forward per depth (the first over one token, the others over topk nodes each),
    and the measured mean accepted length replaces the i.i.d. round length."""
    specs = bench_lib.as_specs(row["drafts"])
    ks, n = [s.k for s in specs], len(specs)
    stats = row["all"]["levels"]
    accept = [acceptance_from_mean_length(lv["mean_accepted_length"], k) for lv, k in zip(stats, ks)]
    step = [timer(lv, 1) for lv in levels]
    verify = [timer(lv, k + 1) for lv, k in zip(levels, ks)]
    emitted = drafting = None
    if row.get("tree"):
        emitted, drafting = [None] * (n + 1), [None] * (n + 1)
        verify[n - 1] = timer(levels[n - 1], max(1, round(stats[-1]["mean_tree_nodes"])) + 1)
        drafting[n - 1] = timer(levels[n], 1) + (ks[-1] - 1) * timer(levels[n], row["tree"]["topk"])
        emitted[n - 1] = stats[-1]["mean_accepted_length"]
    return dict(
        config=row["config"], temperature=row["temperature"], k=ks, accept=accept,
        step_ms=[s * 1e3 for s in step], verify_ms=[v * 1e3 for v in verify],
        predicted=expected_speedup(step, verify, accept, ks, emitted, drafting), measured=row.get("speedup"),
    )  # fmt: skip


def cached_timer():
    times = {}

    def timer(level, tokens: int) -> float:
        if (level, tokens) not in times:  # keyed by the object (kept alive), not a reusable id
            times[level, tokens] = bench_lib.time_forwards(level, [tokens])[tokens]
        return times[level, tokens]

    return timer


def speculative_rows(record):
    return [r for r in record["results"] if r["drafts"]]


def check(record: dict, device, dtype, kernels: bool) -> list[dict]:
    """Predicted vs measured speedup for every speculative configuration of a bench.py record."""
    model, tok = load_model(record["settings"].get("checkpoint"), device, dtype)
    print(accelerate(model, enabled=kernels))
    rows = []
    for r in speculative_rows(record):
        head = r.get("quantize_head", "head kept" not in r["config"])
        stack = bench_lib.build_stack(
            model, tok, r["drafts"], device, dtype, quantize_head=head, kernels=kernels
        )
        rows.append(predict(r, stack.levels, cached_timer()))
    return rows


def project(record: dict, target: str, tiny: str, device, dtype, kernels: bool, compile: bool) -> list[dict]:
    """Latencies at real shapes (random weights), acceptance from the real model's record. One level per
    model for all rows, each forward length timed once: on CUDA a level compiles every length it runs."""
    big = bench_lib.random_model(target, device, dtype)
    print(accelerate(big, enabled=kernels))

    def level(model, name):
        accelerate(model, enabled=kernels)
        return ModelLevel(model, name, compiled=compile_decode(model) if compile else None)

    made = {"target": level(big, "target")}

    def level_of(kind: str, head: bool):
        kind = kind.partition("@")[0]
        if kind == "ngram":
            return NgramProposer()
        key = (kind, head) if kind in ("mxfp4", "int4") else kind
        if key not in made:
            made[key] = (
                level(cast(big, kind, head), kind)
                if kind in ("mxfp4", "int4")
                else level(bench_lib.random_model(tiny, device, dtype), "tiny")
            )
        return made[key]

    timer, rows = cached_timer(), []
    for r in speculative_rows(record):
        head = r.get("quantize_head", "head kept" not in r["config"])
        levels = [made["target"]] + [level_of(s.kind, head) for s in bench_lib.as_specs(r["drafts"])]
        rows.append(predict(r, levels, timer))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, required=True, help="a JSON record written by scripts/bench.py")
    p.add_argument("--project", default=None, help="a target preset (llama-3.1-8b): project instead of check")
    p.add_argument("--tiny", default="llama-3.2-1b", help="the preset standing in for `tiny` in a projection")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="accel.accelerate")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    p.add_argument("--out", type=Path, default=None, help="output prefix: PREFIX.json and PREFIX.md")
    a = p.parse_args(argv)
    record = json.loads(a.bench.read_text())
    device = torch.device(a.device)
    dtype = getattr(torch, record["dtype"].removeprefix("torch."))
    if a.project:
        compile = device.type == "cuda" if a.compile is None else a.compile
        rows = project(record, a.project, a.tiny, device, dtype, a.kernels, compile)
        title = (
            f"PROJECTION (not a measurement): {a.project} target on {device}, random weights, latencies "
            f"measured here; acceptance from {record['model']} ({a.bench.name})"
        )
    else:
        rows = check(record, device, dtype, a.kernels)
        title = f"Cost model vs measurement: {record['model']} on {device}, {dtype}, latencies measured here"
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    last = ["projected speedup"] if a.project else ["predicted", "measured"]
    table = bench_lib.markdown_table(
        ["config", "T", "k", "i.i.d. acceptance", "step ms", "verify ms", *last],
        [
            [r["config"], f"{r['temperature']:g}", r["k"], fmt(r["accept"]), fmt(r["step_ms"]),
             fmt(r["verify_ms"]), f"{r['predicted']:.2f}x"] + ([] if a.project else [f"{r['measured']:.2f}x"])
            for r in rows
        ],
        "lrllll" + "r" * len(last),
    )  # fmt: skip
    md = f"{title}\n\n{table}"
    print(md)
    if a.project:
        for r in rows:
            r["projected"] = r.pop("predicted")
            r.pop("measured")
    bench_lib.write_outputs(a.out, dict(title=title, rows=rows), md)


if __name__ == "__main__":
    main()
