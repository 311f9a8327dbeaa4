"""The command line: flags -> model and levels -> streamed text and a stats table.

    python generate.py --prompt "Hello" --chat               # the embedded SmolLM2-135M-Instruct
    python generate.py --checkpoint PATH --device cuda       # a GGUF, HF folder or converted .pth
    python generate.py --draft mxfp4 --draft2 tiny --chat    # ML-SpecQD: 3 levels
    python generate.py --levels mxfp4:6,tiny:3,ngram:2       # any stack, draft:k from the top down
    python generate.py --draft mxfp4 --draft2 tiny --tree2   # SpecMQuant: tiny drafts trees for mxfp4
    python generate.py --draft tiny --tree --tree-nodes 16   # EAGLE-2 style: the target verifies trees
    python generate.py --target-quant int4 --draft tiny      # a 4-bit target (drafts measured against it)
    torchrun --nproc-per-node 3 generate.py --tp --draft mxfp4 --draft2 tiny   # tensor parallel (tp.py)

A draft is `mxfp4` or `int4` (the level above, before any --target-quant, cast to that format), `tiny`
(the best small draft of the embedded model: its feature head, which reads the level right above it),
`head` (the same, by name), `head=DIR` (a published EAGLE-1/2 head), `student` (the distilled
standalone student), `ngram` (prompt lookup, last level only), a checkpoint path, or `none`;
`KIND@mxfp4` / `KIND@int4` casts that draft itself (e.g. `student@mxfp4`). In --levels an
entry kind:k:tree makes that level draft token trees k deep (--tree-nodes, --tree-topk), as --tree and
--tree2 do for --draft and --draft2; under torchrun, kind:k:shard or kind:k:replicate places that
draft (default: mxfp4/int4 sharded, others replicated). --draft/--k/--draft2/--k2/--tree/--tree2 are
shorthand for --levels. --show colours each token by the level that produced it.

The target runs with kernel-backed twins of model.py's modules where the CPU or GPU has them
(accel.py; the first line printed says so); --no-kernels runs model.py exactly as written. No
decoding logic lives here: that is speculate.py's job, and building the levels is levels.py's.
"""

import argparse
import os
import sys

# OpenMP's threads sleep as soon as a parallel region ends instead of spinning for milliseconds: a decode
# step runs a few small ATen regions (the logits' conversion, argmax), and spinning OpenMP threads then
# take the cores from our kernels' own threads (docs/kernels.md). libgomp reads this when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import tp
from accel import accelerate
from checkpoint import CheckpointError, load_model
from levels import DTYPES, build_levels, default_dtype, parse_levels, shard_levels, shorthand, tree_shape
from model import weight_bytes
from show import Painter
from speculate import autoregressive_decode, format_stats, speculative_decode


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="Hello, my name is", help="the prompt text")
    p.add_argument(
        "--checkpoint", default=None, help="GGUF file, HF folder or .pth (default: embedded SmolLM2)"
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is exact greedy (argmax)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="auto: bfloat16 on CUDA and on CPUs with our kernels (AVX-512), else float32",
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile + CUDA graphs for the decode step (default: on for CUDA)",
    )
    p.add_argument(
        "--draft",
        default="none",
        help="level 1: mxfp4, int4, tiny, head, head=EAGLE_DIR, student, ngram, PATH or none",
    )
    p.add_argument("--draft2", default="none", help="level 2 (drafts for level 1): same choices")
    p.add_argument("--k", type=int, default=6, help="tokens level 1 proposes per round")
    p.add_argument("--k2", type=int, default=3, help="tokens level 2 proposes per round")
    p.add_argument(
        "--levels", default=None, help="drafts top-down as kind:k[:tree],... (overrides --draft/--k/--tree)"
    )
    p.add_argument("--tree", action="store_true", help="level 1 drafts token trees, --k deep")
    p.add_argument("--tree2", action="store_true", help="level 2 drafts token trees, --k2 deep")
    p.add_argument(
        "--tree-nodes",
        type=int,
        default=None,
        help="nodes per tree the level above verifies (default: 30 on CUDA as SpecMQuant, 4 on the CPU)",
    )
    p.add_argument(
        "--tree-topk",
        type=int,
        default=None,
        help="children per expanded node, EAGLE-2's top-k (default: 10 on CUDA, 2 on the CPU)",
    )
    p.add_argument(
        "--tree-depth", type=int, default=None, help="depth of every tree level (default: that level's k)"
    )
    p.add_argument(
        "--tp",
        action="store_true",
        help="tensor parallel over the torchrun processes (implied when torchrun starts several)",
    )
    p.add_argument(
        "--shard-drafts",
        action="store_true",
        help="under TP, also shard student/checkpoint drafts (default: each rank runs them whole: no "
        "collective per drafted token; mxfp4/int4 drafts are sharded); per level: kind:k:shard or "
        "kind:k:replicate in --levels",
    )
    p.add_argument(
        "--target-quant",
        default="none",
        choices=["none", "mxfp4", "int4"],
        help="run the target itself quantized (its own outputs are then what speculation keeps)",
    )
    p.add_argument(
        "--k-policy",
        default="cost",
        choices=["fixed", "grow", "cost"],
        help="how each level's k changes during a run (policy.py): fixed; grow (+1 after a fully accepted "
        "round, -1 after a rejection); cost (the k with the most expected tokens/s from measured "
        "acceptance and round times, 0 switching a level off; the default); --k/--k2 are then the "
        "initial k. Use fixed for reproducible ablations: cost decides from measured times",
    )
    p.add_argument("--adaptive", action="store_true", help="the same as --k-policy grow")
    p.add_argument(
        "--kernels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="kernel-backed twins of model.py's modules (accel.py); --no-kernels runs model.py as written",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch and our kernels (default: all cores)"
    )
    p.add_argument(
        "--int8-drafts",
        action=argparse.BooleanOptionalAction,
        default="auto",
        help="MXFP4/int4 drafts round their inputs to int8 (AVX512-VNNI CPUs): same output, faster on some "
        "CPUs (default: where it measures faster here)",
    )
    p.add_argument(
        "--share-kv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a draft with the target's shapes (an MXFP4/int4 cast) reads its verifier's keys and values "
        "for the prompt and verified tokens instead of computing its own: no draft prefill, and a higher "
        "acceptance; same output",
    )
    p.add_argument(
        "--int8-target",
        action="store_true",
        help="an MXFP4/int4 target (--target-quant) rounds its inputs to int8 too: faster, other numerics",
    )
    p.add_argument("--show", action="store_true", help="colour each token by the level that produced it")
    p.add_argument(
        "--quantize-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mxfp4 drafts also cast the output head (default: yes)",
    )
    args = p.parse_args(argv)
    try:
        spec = args.levels or shorthand(args.draft, args.k, args.draft2, args.k2, args.tree, args.tree2)
        args.drafts = parse_levels(spec) if spec else []
        if args.tree_depth is not None:
            args.drafts = [d if not d.tree else d.__class__(d.kind, args.tree_depth, True, d.placement)
                           for d in args.drafts]  # fmt: skip
        if args.shard_drafts:
            args.drafts = [d.__class__(d.kind, d.k, d.tree, d.placement or "shard") for d in args.drafts]
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        shape = tree_shape(device, args.tree_nodes, args.tree_topk)  # ValueError for sizes < 1
        args.trees = [shape if d.tree else None for d in args.drafts]
    except ValueError as e:
        p.error(str(e))
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        p.error("--top-k must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available")
    rank = tp.maybe_init_dist(device)  # None unless torchrun started several processes
    if args.tp and rank is None:
        sys.exit("error: --tp needs several processes: launch with torchrun --nproc-per-node N generate.py")
    if rank is not None:
        device = tp.device_for_rank(device)
        if device.type == "cpu":  # torchrun gives each rank 1 thread; share the cores out instead
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.world_size()))
    if args.threads is not None:  # one knob: our kernels' pool sizes itself from torch's thread count
        torch.set_num_threads(args.threads)
    lead = rank in (None, 0)  # only rank 0 prints; every rank computes the same tokens
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else default_dtype(device, args.kernels)
    try:
        model, tokenizer = load_model(args.checkpoint, device, dtype)
    except (CheckpointError, FileNotFoundError, NotImplementedError) as e:
        sys.exit(f"error: {e}")
    report = accelerate(model, enabled=args.kernels)
    if lead and device.type == "cpu":
        print(report, file=sys.stderr)
    if tokenizer is None:
        sys.exit("error: no tokenizer found next to the checkpoint (tokenizer.json or tokenizer.model)")

    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt = torch.tensor(tokenizer.encode(text, bos=tokenizer.add_bos), dtype=torch.long)
    try:
        levels = build_levels(
            model, tokenizer, args.drafts, device, dtype, args.quantize_head, args.compile, args.target_quant,
            kernels=args.kernels, int8_drafts=args.int8_drafts, int8_target=args.int8_target,
        )  # fmt: skip
        if rank is not None:
            shard_levels(levels, args.drafts)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    generator = torch.Generator(device=device).manual_seed(args.seed)

    printed = ""
    stop_ids = tokenizer.stop_ids

    def stream(ids):
        nonlocal printed
        if not lead or args.show:
            return
        out = tokenizer.decode(ids[:-1] if ids[-1] in stop_ids else ids)  # a stop token is not text
        if out.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        print(out[len(printed) :], end="", flush=True)
        printed = out

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
    try:
        if len(levels) == 1:
            out, stats = autoregressive_decode(
                levels[0],
                prompt,
                args.max_new_tokens,
                stop_ids=tokenizer.stop_ids,
                on_token=stream,
                **sampling,
            )
        else:
            ks = [d.k for d in args.drafts]
            out, stats = speculative_decode(
                levels, prompt, args.max_new_tokens, k=ks, stop_ids=tokenizer.stop_ids, on_token=stream,
                adaptive=args.adaptive, trees=args.trees, policy=args.k_policy, share_kv=args.share_kv,
                **sampling,
            )  # fmt: skip
    except ValueError as e:
        sys.exit(f"\nerror: {e}")
    if args.show and lead:
        origin = getattr(stats, "origin", None) or [0] * len(out)
        painter = Painter([lv.name for lv in levels], colour=sys.stdout.isatty())
        print(painter.paint(tokenizer, out.tolist(), origin, stop_ids), end="")
        print("\n" + painter.legend(), end="")
    summary = (
        f"\n\n{stats.new_tokens} tokens in {stats.total_time:.2f} s: {stats.tokens_per_second:.1f} tokens/s, "
        f"time to first token {1e3 * stats.time_to_first_token:.0f} ms ({stats.prompt_tokens}-token prompt), "
        f"{stats.ms_per_token:.2f} ms/token ({device.type}, {str(dtype).removeprefix('torch.')})"
    )
    if len(levels) == 1:
        # Bytes streamed per token: the number a memory-bound decoder is judged by.
        gb = weight_bytes(levels[0].model) / 1e9
        gbps = gb * 1e3 / stats.ms_per_token if stats.ms_per_token else 0.0
        per = f" per rank, {tp.world_size()} ranks" if rank is not None else ""
        summary += f", {gbps:.1f} GB/s of weights ({gb:.3f} GB per token{per})"
    else:
        summary += "\n" + format_stats(stats)
    if lead:
        print(summary, file=sys.stderr)
    if rank is not None:
        torch.distributed.destroy_process_group()
    return stats


if __name__ == "__main__":
    main()
