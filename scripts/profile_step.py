"""Where one CPU decode step goes, per level kind, on the embedded SmolLM2-135M.

    python scripts/profile_step.py                       # -> results/profile_step_cpu.json
    python scripts/profile_step.py --int8-activations    # + the 4-bit levels on the int8 (VNNI) path
    python scripts/profile_step.py --acceptance          # what int8 activations do to an MXFP4 draft

For the bf16 target and its MXFP4 and int4 casts (levels.cast, the output head quantized too), each
accelerated (accel.accelerate) and wrapped in a speculate.ModelLevel, and the feature head (head.py,
a HeadLevel reading the bf16 target's features; its linears are its own layer's and its FR-Spec
output rows), it reports the rows below; with
--int8-activations also "mxfp4+i8" and "int4+i8", the same casts with accelerate(...,
int8_activations=True), measured in the same rounds as the exact ones (a before/after under one load):
  step ms      the median time of a one-token ModelLevel.forward (the fused blocks, the head and the
               float32 logits: what a draft or a plain decoding step costs; inside
               cpu_kernels.serial_aten and decoding_loop, as the decoding loops run it), after a prefill of
               --prefill tokens; every repeat writes the same position, so the attention span is fixed.
  linears ms   the same step's linears alone: every linear of the model (30 x wqkv, wo, w1, w3, w2 and
               the output head) through the same kernel the model uses, on a random [1, K] input in
               the model's dtype: one pass over all of them in one C++ call (cpu_kernels.linears,
               as the fused block calls them), median of passes. No Python call is counted here.
  rest ms      step - linears: attention, norms, RoPE, residual adds, the embedding, the float32
               logits, and the Python of the step.
  ATen thr.    the same step outside serial_aten, ATen's ops on every thread (each of its OpenMP
               regions then wakes a sleeping thread), in the same rounds.
  weight MB    model.weight_bytes (what a step reads: the head, and the embedding only when tied).
  linear MB    the bytes of the linears' own weights (codes + scales, or the bf16 matrix).
  GB/s         linear MB / linears ms.
  x target     step ms / the bf16 target's step ms.
The kinds take turns (a block of steps each, round after round), so a change of load on a shared
machine hits all of them alike; the load average is printed and saved with the results.

--acceptance instead runs greedy speculative decoding of the bf16 target with an MXFP4 draft (k = 4,
64 new tokens, the first 5 prompts of data/prompts/chat.jsonl in the chat template), once with the
draft's exact kernels and once with int8 activations (their order alternating), checks that both
give the target's own greedy tokens, and reports the draft's acceptance rate, acceptance by position
and tokens/s (and plain decoding's, interleaved) -> results/profile_step_acceptance_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

# As generate.py: OpenMP's threads sleep after a region instead of spinning (docs/kernels.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import accel
import bench_lib
import levels as levels_lib
from checkpoint import load_model
from kernels import cpu as cpu_kernels
from model import weight_bytes
from speculate import ModelLevel, autoregressive_decode, speculative_decode

ROOT = Path(__file__).resolve().parents[1]

KINDS = ("bf16", "mxfp4", "int4", "head")
INT8_KINDS = ("mxfp4+i8", "int4+i8")
TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Germany and "
    "France built wooden machines that riders pushed along with their feet."
)


def linear_calls(model) -> list[tuple]:
    """(kind, weight args, weight bytes, K) for each linear of the model, in module order: what its
    twin (and the fused block) calls for a CPU input, as its cpu_spec says (block.cpp's kinds)."""
    calls = []
    for module in model.modules():
        spec = getattr(module, "cpu_spec", None)
        spec = spec() if spec is not None else None
        if spec is None:
            continue
        kind, a, b = spec
        nbytes = a.numel() * a.element_size() + (b.numel() * b.element_size() if kind else 0)
        calls.append((kind, (a, b), nbytes, getattr(module, "in_features", a.shape[1])))
    return calls


def _head_level(target, prompt):
    """The trained feature head as a level over the bf16 target, after a prefill of both: each timed
    step is one drafted token, reading the target's feature of the position before."""
    from head import HeadLevel, load_head

    verifier = ModelLevel(target, "verifier")
    head = load_head(target)
    accel.accelerate(head)
    level = HeadLevel(head, verifier, "head")
    n = prompt.numel()
    verifier.reset(n + 8)
    level.reset(n + 8)
    verifier.forward(prompt, 0)
    level.known = n
    level.forward(prompt, 0)
    return head, level


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="default: results/profile_step_cpu[_int8].json")
    p.add_argument(
        "--int8-activations", action="store_true", help="also the 4-bit levels on the int8 (VNNI) path"
    )
    p.add_argument("--prefill", type=int, default=32, help="prompt tokens before the timed step")
    p.add_argument("--rounds", type=int, default=30, help="rounds; each kind runs --block steps per round")
    p.add_argument("--block", type=int, default=8, help="steps (or linear passes) per kind and round")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--kinds", default=None, help=f"a subset of {', '.join(KINDS + INT8_KINDS)}")
    p.add_argument("--acceptance", action="store_true", help="the MXFP4 draft's acceptance, exact vs int8")
    p.add_argument("--repeats", type=int, default=2, help="--acceptance: timed runs per prompt and mode")
    args = p.parse_args(argv)
    suffix = "_acceptance" if args.acceptance else "_int8" if args.int8_activations else ""
    if args.out is None:
        args.out = ROOT / "results" / f"profile_step{suffix}_cpu.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit(f"the CPU kernels are unavailable: {cpu_kernels.unavailable_reason()}")
    if args.acceptance:
        return acceptance(args)
    if args.kinds:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    else:
        kinds = list(KINDS + (INT8_KINDS if args.int8_activations else ()))
    if any(k.endswith("+i8") for k in kinds) and not cpu_kernels.vnni_available():
        raise SystemExit("the int8-activation kernels need AVX512-VNNI, which this CPU lacks")
    load_before = os.getloadavg()

    target, tok = load_model(dtype=torch.bfloat16)
    ids = tok.encode(TEXT, bos=getattr(tok, "add_bos", False))
    while len(ids) < args.prefill:
        ids = ids + ids
    prompt = torch.tensor(ids[: args.prefill])
    step_token = prompt[-1:].clone()

    models, runs, passes = {}, {}, {}
    for kind in kinds:
        fmt, int8 = kind.removesuffix("+i8"), kind.endswith("+i8")
        if kind == "head":
            model, level = _head_level(target, prompt)
        else:
            model = target if fmt == "bf16" else levels_lib.cast(target, fmt)
            accel.accelerate(model, int8_activations=int8)
            level = ModelLevel(model, kind)
            level.reset(args.prefill + 8)
            level.forward(prompt, 0)
        models[kind] = model
        runs[kind] = _stepper(level, step_token, args.prefill)
        passes[kind] = _linear_pass(model)

    step_ms = {k: [] for k in kinds}
    threaded_ms = {k: [] for k in kinds}
    lin_ms = {k: [] for k in kinds}

    def time_steps(kind, into):
        for _ in range(args.block):
            t0 = time.perf_counter()
            runs[kind]()
            into[kind].append(1e3 * (time.perf_counter() - t0))

    with torch.inference_mode():
        for kind in kinds:  # warm-up
            for _ in range(3):
                runs[kind]()
                passes[kind][0]()
        for _ in range(args.rounds):
            for kind in kinds:
                # As decoding runs them: ATen's own ops on one thread, the kernels on all, the fused
                # plans checked once (decoding_loop).
                with cpu_kernels.decoding_loop():
                    with cpu_kernels.serial_aten(cpu_kernels.decodes_on_kernels(models[kind])):
                        time_steps(kind, step_ms)
                        for _ in range(max(1, args.block // 2)):
                            t0 = time.perf_counter()
                            passes[kind][0]()
                            lin_ms[kind].append(1e3 * (time.perf_counter() - t0))
                    time_steps(kind, threaded_ms)  # and with ATen on every thread, as before serial_aten
    load_after = os.getloadavg()

    results = {}
    for kind in kinds:
        step, lin = statistics.median(step_ms[kind]), statistics.median(lin_ms[kind])
        lin_bytes = passes[kind][1]
        results[kind] = {
            "step_ms": step,
            "step_ms_p10": _quantile(step_ms[kind], 0.1),
            "step_ms_p90": _quantile(step_ms[kind], 0.9),
            "step_ms_aten_threaded": statistics.median(threaded_ms[kind]),
            "linears_ms": lin,
            "rest_ms": step - lin,
            "weight_bytes": weight_bytes(models[kind]),
            "linear_bytes": lin_bytes,
            "linears": passes[kind][2],
            "linears_GBps": lin_bytes / lin / 1e6,
            "int8_activations": kind.endswith("+i8"),
        }
    base = results["bf16"]["step_ms"] if "bf16" in results else None
    for r in results.values():
        r["of_target_step"] = r["step_ms"] / base if base else None

    record = {
        "script": "scripts/profile_step.py",
        "kinds": kinds,
        "prefill": args.prefill,
        "samples_per_kind": len(step_ms[kinds[0]]),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "machine": bench_lib.cpu_name(),
        "torch": torch.__version__,
        "kernels": cpu_kernels.info(),
        "results": results,
    }
    print(markdown(record))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return record


def acceptance(args, prompts: int = 5, new_tokens: int = 64, k: int = 4) -> dict:
    """The MXFP4 draft of the bf16 target with exact kernels and with int8 activations (module docstring)."""
    if not cpu_kernels.vnni_available():
        raise SystemExit("the int8-activation kernels need AVX512-VNNI, which this CPU lacks")
    target, tok = load_model(dtype=torch.bfloat16)
    levels = levels_lib.build_levels(target, tok, [("mxfp4", k)], "cpu", torch.bfloat16)
    rows = [json.loads(line) for line in (ROOT / "data" / "prompts" / "chat.jsonl").read_text().splitlines()]
    encoded = [
        torch.tensor(
            tok.encode(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}]), bos=tok.add_bos)
        )
        for r in rows[:prompts]
    ]
    modes = {"exact": False, "int8": True}
    totals = {
        m: {"proposed": 0, "accepted": 0, "rounds": 0, "reached": [0] * k, "accepted_at": [0] * k}
        for m in modes
    }
    times = {m: [0.0, 0] for m in (*modes, "AR")}
    for i, prompt in enumerate(encoded):
        plain, _ = autoregressive_decode(levels[0], prompt, new_tokens)
        for rep in range(args.repeats):
            _, stats = autoregressive_decode(levels[0], prompt, new_tokens)
            times["AR"][0] += stats.total_time
            times["AR"][1] += stats.new_tokens
            for mode in modes if rep % 2 == 0 else reversed(modes):
                accel.accelerate(levels[1].model, int8_activations=modes[mode])
                out, stats = speculative_decode(levels, prompt, new_tokens, k=[k])
                if out.tolist() != plain.tolist():
                    raise AssertionError(
                        f"prompt {i}, {mode}: greedy speculation differs from plain decoding"
                    )
                times[mode][0] += stats.total_time
                times[mode][1] += stats.new_tokens
                if rep == 0:  # the counts are the same every repeat
                    draft, t = stats.levels[1], totals[mode]
                    t["proposed"] += draft.proposed
                    t["accepted"] += draft.accepted
                    t["rounds"] += draft.rounds
                    for j in range(min(k, len(draft.reached))):
                        t["reached"][j] += draft.reached[j]
                        t["accepted_at"][j] += draft.accepted_at[j]
        print(f"prompt {i}: {prompt.numel()} tokens, greedy output identical in both modes", flush=True)
    results = {}
    for mode, t in totals.items():
        results[mode] = {
            "acceptance_rate": t["accepted"] / t["proposed"],
            "acceptance_by_position": [a / r if r else 0.0 for a, r in zip(t["accepted_at"], t["reached"])],
            "mean_accepted_length": (t["accepted"] + t["rounds"]) / t["rounds"],
            **t,
        }
    for mode, (seconds, tokens) in times.items():
        results.setdefault(mode, {})["tokens_per_s"] = tokens / seconds
    record = {
        "script": "scripts/profile_step.py --acceptance",
        "levels": f"bf16 target, mxfp4:{k}",
        "prompts": len(encoded),
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "load_average_after": os.getloadavg(),
        "results": results,
    }
    lines = [
        "| draft | acceptance | by position | mean accepted length | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for mode in modes:
        r = results[mode]
        pos = " ".join(f"{a:.2f}" for a in r["acceptance_by_position"])
        lines.append(
            f"| mxfp4 {mode} | {r['acceptance_rate']:.3f} ({r['accepted']}/{r['proposed']}) | {pos} "
            f"| {r['mean_accepted_length']:.2f} | {r['tokens_per_s']:.1f} |"
        )
    lines.append(f"| (plain decoding) | | | | {results['AR']['tokens_per_s']:.1f} |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return record


def _stepper(level: ModelLevel, token: torch.Tensor, pos: int):
    def run():
        level.forward(token, pos)

    return run


def _linear_pass(model):
    """(a function calling every linear once on random [1, K] inputs, their weight bytes, count)."""
    calls = linear_calls(model)
    g = torch.Generator().manual_seed(0)
    dtype = model.tok_embeddings.weight.dtype
    inputs = {k: torch.randn(1, k, generator=g).to(dtype) for k in {c[3] for c in calls}}
    kinds, xs = [c[0] for c in calls], [inputs[c[3]] for c in calls]
    weights = [t for c in calls for t in c[1]]

    def run():
        cpu_kernels.linears(kinds, xs, weights)

    return run, sum(c[2] for c in calls), len(calls)


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def markdown(record: dict) -> str:
    lines = [
        f"threads {record['threads']}, "
        f"load average {record['load_average_before'][0]:.2f} -> {record['load_average_after'][0]:.2f}, "
        f"{record['samples_per_kind']} steps per kind",
        "",
        "| kind | step ms (p10-p90) | ATen thr. ms | linears ms | rest ms | weight MB | linear MB "
        "| lin. GB/s | x target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in record["results"].items():
        name = kind
        rel = f"{r['of_target_step']:.2f}" if r["of_target_step"] is not None else "-"
        lines.append(
            f"| {name} | {r['step_ms']:.2f} ({r['step_ms_p10']:.2f}-{r['step_ms_p90']:.2f}) "
            f"| {r['step_ms_aten_threaded']:.2f} | {r['linears_ms']:.2f} | {r['rest_ms']:.2f} "
            f"| {r['weight_bytes'] / 1e6:.1f} "
            f"| {r['linear_bytes'] / 1e6:.1f} | {r['linears_GBps']:.1f} | {rel} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
