"""Tensor parallelism on the embedded SmolLM2-135M: greedy autoregressive and speculative decoding
(MXFP4 draft) with the target and the draft sharded over the ranks; rank 0 prints the tokens and the
speed, and checks that every rank produced the same tokens.

    OMP_NUM_THREADS=1 python scripts/tp_check.py                              # one process
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 3 scripts/tp_check.py         # 3 gloo ranks

SmolLM2 has 9 query and 3 key/value heads, so 1 or 3 ranks. Compare the printed token lists of the
two runs: in float32 they should match (the sums run in another order, so a near-tie could still
flip a token); in bf16 the partial outputs are rounded to bf16 before the all-reduce, so they may
drift apart after some tokens, as any bf16 tensor-parallel run does.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tp  # noqa: E402
from checkpoint import load_model  # noqa: E402
from mxfp4 import quantize_model  # noqa: E402
from speculate import ModelLevel, autoregressive_decode, speculative_decode  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="Explain speculative decoding in two sentences.")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--k", type=int, default=4, help="tokens the MXFP4 draft proposes per round")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (the best is reported)")
    args = p.parse_args()

    rank = tp.maybe_init_dist("cpu")
    world = tp.world_size()
    main_rank = rank in (None, 0)
    model, tokenizer = load_model(None, "cpu", DTYPES[args.dtype])
    draft = quantize_model(model)  # cast from the whole target, then split like it
    tp.apply_tp(model)
    tp.apply_tp(draft)
    levels = [ModelLevel(model, "target"), ModelLevel(draft, "mxfp4")]

    text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt = torch.tensor(tokenizer.encode(text, bos=tokenizer.add_bos), dtype=torch.long)
    n = args.max_new_tokens
    runs = {
        "greedy AR": lambda: autoregressive_decode(levels[0], prompt, n),
        f"greedy SD mxfp4 k={args.k}": lambda: speculative_decode(levels, prompt, n, k=args.k),
    }
    results = {}
    for name, run in runs.items():
        run()  # warm-up (first-call allocations)
        best = None
        for _ in range(args.repeats):
            tokens, stats = run()
            if best is None or stats.tokens_per_second > best[1].tokens_per_second:
                best = (tokens, stats)
        results[name] = best

    same = True
    if world > 1:  # every rank must have taken the same decisions
        mine = {name: r[0].tolist() for name, r in results.items()}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        same = all(other == mine for other in everyone)
    if main_rank:
        print(f"{world} rank(s), {args.dtype}, OMP threads per rank {torch.get_num_threads()}")
        for name, (tokens, stats) in results.items():
            print(
                f"{name}: {stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tokens/s "
                f"({stats.ms_per_token:.2f} ms/token after the first)"
            )
            print(f"  tokens {tokens.tolist()}")
            print(f"  text   {tokenizer.decode(tokens.tolist())!r}")
        ar, sd = (r[0] for r in results.values())
        print(f"SD tokens == AR tokens: {torch.equal(ar, sd)}; all ranks agree: {same}")
    if world > 1:
        dist.destroy_process_group()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
