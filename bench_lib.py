"""What the benchmark scripts share: prompts, configurations run side by side, random-weight models at a
named shape, the cost model, and a writer for tables and records.

    from bench_lib import load_prompts, encode_prompts, run_interleaved, summarise, compare
    rows = load_prompts(per_category=2)                      # data/prompts/*.jsonl
    rows = load_prompts("question.jsonl")                     # or Spec-Bench's layout (first turn)

Definitions used by every table (bench.py and ablate.py write them next to their tables):
  acceptance rate       drafted tokens the level above kept / drafted tokens, per level.
  mean accepted length  tokens the level above emits per verification round on that level's
                        proposals, the correction or bonus token included: (accepted + rounds) / rounds.
  speedup               tokens/s over the autoregressive baseline measured in the same run, on the
                        same prompts, interleaved prompt by prompt (so a change in load hits all alike).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from policy import expected_tokens

DATA = Path(__file__).resolve().parent / "data"
PROMPTS = DATA / "prompts"
DEFINITIONS = (
    "Definitions: *acceptance rate* = drafted tokens the level above kept / drafted tokens. *Mean accepted "
    "length* = tokens the level above emits per verification round on that level's proposals, the "
    "correction or bonus token included: (accepted + rounds) / rounds. *Speedup* = tokens/s over the "
    "autoregressive baseline measured in the same run, prompt by prompt interleaved; the spread is the "
    "min-max of the per-repeat speedups. Warm-up is not timed."
)


# --- prompts -----------------------------------------------------------------------------------------


def read_prompts(path: Path) -> list[dict]:
    """The rows of one JSONL file as {id, category, prompt}. Two layouts: this project's
    (data/prompts/README.md: id, category, prompt) and Spec-Bench's question.jsonl (question_id,
    category, turns: the first turn is the prompt)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        r = json.loads(line)
        if "prompt" in r:
            text = r["prompt"]
        elif r.get("turns"):
            text = r["turns"][0]
        else:
            raise ValueError(f"{path}:{n}: a prompt needs a 'prompt' or a 'turns' field")
        category = r.get("category", Path(path).stem)
        rid = r.get("id", r.get("question_id", len(rows) + 1))
        rid = rid if isinstance(rid, str) else f"{category}-{rid}"
        rows.append(dict(r, id=rid, category=category, prompt=text))
    return rows


def load_prompts(path: Path | str | None = None, per_category: int | None = None) -> list[dict]:
    """Prompts from a JSONL file or a folder of them (default: data/prompts), keeping the first
    `per_category` of each category in file order (all of them for None)."""
    path = Path(path) if path is not None else PROMPTS
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    rows, seen = [], {}
    for f in files:
        for r in read_prompts(f):
            seen[r["category"]] = seen.get(r["category"], 0) + 1
            if per_category is None or seen[r["category"]] <= per_category:
                rows.append(r)
    if not rows:
        raise ValueError(f"no prompts in {path}")
    return rows


def encode_prompts(rows: list[dict], tokenizer, chat: bool = True) -> list[tuple[dict, torch.Tensor]]:
    """(row, token ids) per prompt: each prompt as the one user message of the chat template."""
    out = []
    for r in rows:
        text = (
            tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}]) if chat else r["prompt"]
        )
        out.append((r, torch.tensor(tokenizer.encode(text, bos=tokenizer.add_bos), dtype=torch.long)))
    return out


# --- configurations, run side by side --------------------------------------------------------------


@dataclass
class Stack:
    """A built configuration: its levels (levels.build_levels), k per draft level, trees (or None),
    the k policy (policy.py) and whether drafts share their verifier's keys and values (share_kv in
    speculate.speculative_decode)."""

    levels: list
    ks: list[int]
    trees: list | None = None
    policy: str = "fixed"
    share_kv: bool = True


def as_specs(drafts) -> list:
    """LevelSpecs from LevelSpecs, a levels description ("mxfp4:6,tiny:3:tree") or the lists a record
    keeps ([kind, k] or [kind, k, "tree"])."""
    from levels import LevelSpec, parse_levels

    if isinstance(drafts, str):
        return parse_levels(drafts) if drafts else []
    return [d if isinstance(d, LevelSpec) else LevelSpec(d[0], int(d[1]), "tree" in d[2:]) for d in drafts]


def build_stack(
    target, tokenizer, drafts, device, dtype, tree=None, policy="fixed", share_kv=True, **kw
) -> Stack:
    """levels.build_levels for [target, *drafts] (which accelerates every model unless kernels=False);
    `tree` (a TreeShape) is the shape of the levels marked tree."""
    from levels import build_levels

    specs = as_specs(drafts)
    levels = build_levels(target, tokenizer, specs, device, dtype, **kw)
    trees = [tree if s.tree else None for s in specs]
    return Stack(levels, [s.k for s in specs], trees if any(trees) else None, policy, share_kv)


def record_drafts(drafts) -> list:
    """LevelSpecs as a record keeps them: [kind, k] or [kind, k, "tree"]."""
    return [[s.kind, s.k] + (["tree"] if s.tree else []) for s in as_specs(drafts)]


def decode(
    stack: Stack, ids, max_new: int, temperature: float = 0.0, seed: int = 0, stop_ids=(), trace=False
):
    """One generation with a stack (plain autoregressive decoding when it has no drafts)."""
    from speculate import autoregressive_decode, speculative_decode

    g = torch.Generator(device=stack.levels[0].device).manual_seed(seed)
    kw = dict(temperature=temperature, generator=g, stop_ids=stop_ids)
    if not stack.ks:
        return autoregressive_decode(stack.levels[0], ids, max_new, **kw)
    return speculative_decode(
        stack.levels, ids, max_new, k=stack.ks, trees=stack.trees, trace=trace, policy=stack.policy,
        share_kv=stack.share_kv, **kw,
    )  # fmt: skip


def run_interleaved(
    stacks: dict,
    prompts,
    max_new: int,
    temperatures=(0.0,),
    repeats: int = 1,
    seed: int = 0,
    stop_ids=(),
    progress=None,
) -> dict:
    """Every stack on every prompt, interleaved: for each temperature, repeat and prompt, the stacks run
    one after the other in their order (put the baseline first) on that same prompt, so a change in
    the machine's load lands on all of them alike. One untimed warm-up per stack first.
    Returns {(name, temperature): [per repeat: [per prompt: dict(id, category, tokens, stats)]]}.
    progress(name, temperature, repeat, prompt index, stats) is called after each generation.
    Stacks built on the same model object (the target, in every stack) are given one ModelLevel for it:
    the KV cache lives in the model, and two levels sizing it each their own way would clash."""
    shared = {}
    for stack in stacks.values():
        levels = []
        for lv in stack.levels:
            lv = shared.setdefault(id(lv.model), lv) if hasattr(lv, "model") else lv
            if hasattr(lv, "bind"):  # a feature head reads the level above it: now the shared one
                lv.bind(levels[-1])
            levels.append(lv)
        stack.levels = levels
    for stack in stacks.values():
        decode(stack, prompts[0][1], 8)
    out = {(n, t): [[] for _ in range(repeats)] for t in temperatures for n in stacks}
    for t in temperatures:
        for r in range(repeats):
            for i, (row, ids) in enumerate(prompts):
                for name, stack in stacks.items():
                    tokens, st = decode(stack, ids, max_new, t, seed + i, stop_ids)
                    out[name, t][r].append(
                        dict(id=row["id"], category=row["category"], tokens=tokens.tolist(), stats=st)
                    )
                    if progress:
                        progress(name, t, r, i, st)
    return out


def summarise(runs: list[dict], names: list[str]) -> dict:
    """Aggregate generations: tokens/s from summed tokens and time, acceptance from summed counts (per
    draft level), each level's forward time, and its mean ms per forward by tokens fed."""
    tokens = sum(len(p["tokens"]) for p in runs)
    seconds = sum(p["stats"].total_time for p in runs)
    out = dict(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds if seconds else 0.0, levels=[])
    for i in range(1, len(names)):
        lv = [p["stats"].levels[i] for p in runs]
        proposed, accepted, rounds = (
            sum(getattr(s, f) for s in lv) for f in ("proposed", "accepted", "rounds")
        )
        reached, kept = [0] * max(len(s.reached) for s in lv), [0] * max(len(s.reached) for s in lv)
        for s in lv:
            for j, (r, a) in enumerate(zip(s.reached, s.accepted_at)):
                reached[j], kept[j] = reached[j] + r, kept[j] + a
        out["levels"].append(
            dict(
                name=names[i], acceptance_rate=accepted / proposed if proposed else 0.0,
                mean_accepted_length=(accepted + rounds) / rounds if rounds else 0.0,
                proposed=proposed, accepted=accepted, rounds=rounds,
                forward_time_s=sum(s.forward_time or 0.0 for s in lv),
                mean_tree_nodes=sum(s.tree_nodes for s in lv) / rounds if rounds else 0.0,
                acceptance_by_position=[a / r if r else 0.0 for a, r in zip(kept, reached)],
            )
        )  # fmt: skip
    levels0 = [p["stats"].levels[0] for p in runs if getattr(p["stats"], "levels", None)]
    out["target_forward_time_s"] = sum(s.forward_time or 0.0 for s in levels0)
    out["ms_per_forward_by_tokens"] = []
    for i in range(len(names)):
        acc = {}
        for p in runs:
            levels = getattr(p["stats"], "levels", [])
            for t, (n, sec) in levels[i].time_by_tokens.items() if i < len(levels) else ():
                a, b = acc.get(t, (0, 0.0))
                acc[t] = (a + n, b + sec)
        out["ms_per_forward_by_tokens"].append({t: 1e3 * sec / n for t, (n, sec) in sorted(acc.items())})
    return out


def compare(results: dict, names: dict, baseline: str = "AR", baselines: dict | None = None) -> list[dict]:
    """One row per (stack, temperature) of run_interleaved's results: the summary over all repeats, the
    speedup over the baseline at the same temperature with its min-max over repeats, per-category
    speedups, and (greedy) whether the output equals the baseline's token for token.
    names: stack name -> its level names. baselines: stack name -> its own baseline (a stack on a
    4-bit target is compared with that target's own autoregressive decoding), else `baseline`."""
    rows = []
    for (name, t), reps in results.items():
        baseline_of = (baselines or {}).get(name, baseline)
        base = results[baseline_of, t]
        flat, base_flat = [p for r in reps for p in r], [p for r in base for p in r]
        s = summarise(flat, names[name])
        per_rep = [
            summarise(r, names[name])["tokens_per_s"] / summarise(b, names[baseline_of])["tokens_per_s"]
            for r, b in zip(reps, base)
        ]
        b_all = summarise(base_flat, names[baseline_of])
        row = dict(config=name, temperature=t, all=s, speedup=s["tokens_per_s"] / b_all["tokens_per_s"])
        row["baseline"] = baseline_of
        row.update(speedup_min=min(per_rep), speedup_max=max(per_rep), speedup_per_repeat=per_rep)
        row["by_category"] = {}
        for c in sorted({p["category"] for p in flat}):
            sc = summarise([p for p in flat if p["category"] == c], names[name])
            bc = summarise([p for p in base_flat if p["category"] == c], names[baseline_of])
            row["by_category"][c] = dict(sc, speedup=sc["tokens_per_s"] / bc["tokens_per_s"])
        if t == 0:
            ref = {p["id"]: p["tokens"] for p in base_flat}
            row["greedy_identical"] = all(p["tokens"] == ref[p["id"]] for p in flat)
        rows.append(row)
    return rows


# --- random weights at a named shape ---------------------------------------------------------------


def random_model(preset: str, device, dtype, layers: int | None = None):
    """A model.PRESETS shape with random weights (gpt-fast's benchmarking method), built without a slow
    default init; `layers` keeps only that many blocks. Plain modules: accel.accelerate makes it fast."""
    from model import ModelArgs, Transformer

    args = ModelArgs.from_name(preset)
    if layers:
        args.n_layer = min(layers, args.n_layer)
    with torch.device("meta"):
        m = Transformer(args)
    m = m.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
    return m.eval().requires_grad_(False)


def time_forwards(level, token_counts, context: int = 128, repeats: int = 7, warmup: int = 2) -> dict:
    """Median seconds of level.forward over T tokens after `context` cached ones, for each T: the cache
    is filled once, and every timed forward attends to it. A model-free proposer costs 0."""
    if not hasattr(level, "forward"):
        return {t: 0.0 for t in token_counts}
    level.reset(context + max(token_counts) + 1)
    ids = torch.randint(0, min(level.vocab_size, 1000), (context + max(token_counts),), device=level.device)
    level.forward(ids[:context], 0)
    fn = lambda t: lambda: level.forward(ids[context : context + t], context)  # noqa: E731
    return {t: median_time(fn(t), repeats, warmup, level.device) for t in token_counts}


def median_time(fn, repeats: int, warmup: int = 2, device="cpu") -> float:
    """Median seconds of fn() after `warmup` untimed calls (on CUDA: compilation, graph capture)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --- the cost model ----------------------------------------------------------------------------------


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
        e = emitted[i] or expected_tokens([a], k[i])
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


def best_k(step: list[float], verify, accept: list[float], kmax=(12, 8)) -> tuple[float, list[int]]:
    """The best expected_speedup over the draft lengths k_i in 1..kmax[i] (the last entry of kmax
    serves deeper levels); verify(i, k) gives level i's forward over k + 1 tokens. (speedup, ks)."""
    import itertools

    grids = [range(1, kmax[min(i, len(kmax) - 1)] + 1) for i in range(len(step) - 1)]
    best = (0.0, [])
    for ks in itertools.product(*grids):
        sp = expected_speedup(step, [verify(i, k) for i, k in enumerate(ks)], accept, list(ks))
        if sp > best[0]:
            best = (sp, list(ks))
    return best


# --- tables and records ----------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list], right: str | None = None) -> str:
    """A markdown table; cells are str()'d. right: 'l'/'r' per column (default: first left, rest right)."""
    right = right or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if c == "r" else "---|" for c in right)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model numbers (a machine's kind changes
    what is fast: records say which one they were measured on); platform's guess elsewhere."""
    try:
        info = dict(
            line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line
        )
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
    except (OSError, KeyError, ValueError):
        return platform.processor() or platform.machine()


def environment(device=None) -> dict:
    """The machine a record was measured on."""
    device = torch.device(device or "cpu")
    return dict(
        machine=platform.node(), processor=cpu_name(), cpus=os.cpu_count(),
        torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )  # fmt: skip


def write_json(path: Path, record) -> Path:
    """Write a record atomically (a temporary file, then a rename): a run killed mid-write leaves the
    previous complete file, so scripts can call this after every measurement."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_outputs(prefix: Path | None, record: dict, md: str) -> None:
    """PREFIX.json and PREFIX.md (nothing without a prefix)."""
    if prefix is None:
        return
    prefix = Path(prefix)
    write_json(prefix.with_suffix(".json"), record)
    prefix.with_suffix(".md").write_text(md.rstrip("\n") + "\n")
    print(f"wrote {prefix.with_suffix('.json')} and {prefix.with_suffix('.md')}")
