"""How often each draft alone picks the target's greedy token: the plainest measure of a draft (no k, no
rounds), teacher-forced along the target's own greedy continuation of every prompt.

    python scripts/agreement.py --out results/cpu_smollm2_agreement

A model draft reads prompt + continuation in one forward and its argmax at each position is compared
with the target's next token; ngram proposes one token from the tokens so far, and a missing proposal
counts as a miss.
"""

import argparse

import torch

import bench_lib
from accel import accelerate
from checkpoint import load_model
from levels import DTYPES, build_levels, default_dtype

DRAFTS = {  # label: (kind, quantize the head)
    "mxfp4": ("mxfp4", True),
    "mxfp4 (head kept)": ("mxfp4", False),
    "tiny": ("tiny", True),
    "ngram": ("ngram", True),
}


@torch.no_grad()
def agreement(level, prompts, continuations) -> float:
    hits = total = 0
    for (_, ids), cont in zip(prompts, continuations):
        seq, n = ids.tolist() + cont, ids.numel()
        if hasattr(level, "propose"):
            guesses = [(level.propose(seq[:i], 1) or [-1])[0] for i in range(n, len(seq))]
        else:
            level.reset(len(seq))
            logits = level.forward(torch.tensor(seq, device=level.device), 0)
            guesses = logits[n - 1 : len(seq) - 1].argmax(-1).tolist()
        hits += sum(g == t for g, t in zip(guesses, cont))
        total += len(cont)
    return hits / total if total else 0.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--drafts", default=",".join(DRAFTS), help="comma-separated, from: " + ", ".join(DRAFTS))
    p.add_argument("--prompts", default=None, help="a JSONL file or folder (default: data/prompts)")
    p.add_argument("--prompts-per-category", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="accel.accelerate")
    p.add_argument("--out", default=None, help="output prefix: writes PREFIX.json and PREFIX.md")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = default_dtype(device, a.kernels) if a.dtype == "auto" else DTYPES[a.dtype]
    model, tok = load_model(a.checkpoint, device, dtype)
    print(accelerate(model, enabled=a.kernels))
    prompts = bench_lib.encode_prompts(bench_lib.load_prompts(a.prompts, a.prompts_per_category), tok)
    target = bench_lib.Stack(build_levels(model, tok, [], device, dtype, kernels=a.kernels), [])
    greedy = [
        bench_lib.decode(target, ids, a.max_new_tokens, stop_ids=tok.stop_ids)[0].tolist()
        for _, ids in prompts
    ]
    rows = []
    for label in a.drafts.split(","):
        kind, head = DRAFTS[label]
        level = build_levels(model, tok, [(kind, 1)], device, dtype, quantize_head=head, kernels=a.kernels)[1]
        rows.append(dict(draft=label, agreement=agreement(level, prompts, greedy)))
        print(f"{label}: {rows[-1]['agreement']:.3f}", flush=True)
    md = (
        f"How often each draft alone picks the target's greedy token, teacher-forced along the target's "
        f"greedy outputs ({len(prompts)} prompts, {a.max_new_tokens} new tokens, {str(dtype)[6:]}):\n\n"
    ) + bench_lib.markdown_table(
        ["draft", "agreement"], [[r["draft"], f"{r['agreement']:.3f}"] for r in rows]
    )
    print("\n" + md)
    record = dict(bench_lib.environment(device), dtype=str(dtype), settings=vars(a), results=rows)
    bench_lib.write_outputs(a.out, record, md)
    return rows


if __name__ == "__main__":
    main()
