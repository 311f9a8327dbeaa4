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
(the distilled student of the embedded model), `ngram` (prompt lookup, last level only), a checkpoint
path, or `none`; `KIND@mxfp4` / `KIND@int4` casts that draft itself (e.g. `tiny@mxfp4`). In --levels an
entry kind:k:tree makes that level draft token trees k deep (--tree-nodes, --tree-topk), as --tree and
--tree2 do for --draft and --draft2; under torchrun, kind:k:shard or kind:k:replicate places that
draft (default: mxfp4/int4 sharded, others replicated). No decoding logic lives here: that is
speculate.py's job.
"""

import argparse
import os
import sys

import torch

import tp
from checkpoint import CheckpointError, load_model
from kernels import cpu as cpu_kernels
from model import weight_bytes
from speculate import (
    ModelLevel,
    NgramProposer,
    TreeShape,
    autoregressive_decode,
    format_stats,
    speculative_decode,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    p.add_argument("--draft", default="none", help="level 1: mxfp4, tiny, ngram, PATH or none")
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
        help="under TP, also shard tiny/checkpoint drafts (default: each rank runs them whole: no "
        "collective per drafted token; mxfp4/int4 drafts are sharded); per level: kind:k:shard or "
        "kind:k:replicate in --levels",
    )
    p.add_argument(
        "--target-quant",
        default="none",
        choices=["none", "mxfp4", "int4"],
        help="run the target itself quantized (its own outputs are then what speculation keeps)",
    )
    p.add_argument("--adaptive", action="store_true", help="grow/shrink k per level (ablations)")
    p.add_argument(
        "--quantize-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mxfp4 drafts also cast the output head (default: yes)",
    )
    args = p.parse_args(argv)
    try:
        args.drafts, args.trees, args.placement = parse_levels(args)
    except ValueError as e:
        p.error(str(e))
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        p.error("--top-k must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    return args


LEVEL_FLAGS = ("tree", "shard", "replicate")


def parse_levels(args) -> tuple[list[tuple[str, int]], list, list]:
    """[(kind, k), ...] for the draft levels, top-down; for each a TreeShape or None; and for each its
    placement under tensor parallelism: "shard", "replicate" or None (the default for its kind)."""
    placement = []
    if args.levels:
        drafts, tree = [], []
        for item in args.levels.split(","):
            parts = item.strip().split(":")
            flags = []
            while len(parts) > 2 and parts[-1] in LEVEL_FLAGS:
                flags.append(parts.pop())
            kind, k = ":".join(parts[:-1]), parts[-1]
            if not kind or not k.lstrip("-").isdigit() or ("shard" in flags and "replicate" in flags):
                raise ValueError(
                    f"--levels entries are kind:k with optional :tree and :shard or :replicate, got {item!r}"
                )
            drafts.append((kind, int(k)))
            tree.append("tree" in flags)
            placement.append(next((f for f in flags if f != "tree"), None))
    else:
        drafts, tree = [(args.draft, args.k), (args.draft2, args.k2)], [args.tree, args.tree2]
        if drafts[0][0] == "none":
            if drafts[1][0] != "none":
                raise ValueError("--draft2 needs a --draft above it")
            drafts = []
        elif drafts[1][0] == "none":
            drafts = drafts[:1]
        if any(tree[len(drafts) :]):
            raise ValueError("--tree/--tree2 need a draft at that level")
        tree = tree[: len(drafts)]
    if args.tree_depth is not None:
        drafts = [(kind, args.tree_depth if t else k) for (kind, k), t in zip(drafts, tree)]
    # A GPU verifies 30 nodes for about the price of one token; on the CPUs we measured a 17-token
    # forward costs 2.8x a one-token step (results/bench_verify_cpu_smollm2.json), and 4-node trees
    # were the best of 4, 8 and 16 (README), so the CPU default is small.
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    nodes = args.tree_nodes if args.tree_nodes is not None else (30 if cuda else 4)
    topk = args.tree_topk if args.tree_topk is not None else (10 if cuda else 2)
    shape = TreeShape(nodes, topk)  # ValueError for sizes < 1
    placement = placement or [None] * len(drafts)
    if args.shard_drafts:
        placement = [p or "shard" for p in placement]
    for kind, k in drafts:
        if k < 1:
            raise ValueError(f"k must be >= 1 for every draft, got {k} for {kind}")
        if kind == "none":
            raise ValueError("'none' cannot sit between two drafts")
    if any(kind == "ngram" for kind, _ in drafts[:-1]):
        raise ValueError("ngram can only be the last level: nothing below it can speed it up")
    if any(tree[:-1]):
        raise ValueError("only the last draft level can draft trees (a tree is verified by the level above)")
    return drafts, [shape if t else None for t in tree], placement


def check_same_tokenizer(target_tok, draft_tok, name):
    """A draft must speak the target's token ids. Padding rows may differ; the ids of real text may not."""
    if draft_tok is None:
        return
    probe = "Hello world! The year 2025, naïve café 東京 — def f(x):\n\treturn x ** 2  # done"
    if draft_tok.encode(probe) != target_tok.encode(probe):
        raise ValueError(
            f"draft {name} uses another tokenizer than the target: speculation needs the same ids"
        )


QUANTS = ("mxfp4", "int4")


def cast(model, quant: str, quantize_head: bool = True):
    """A copy of `model` with its linear weights direct-cast to `quant` (embeddings and norms shared)."""
    if quant == "mxfp4":
        from mxfp4 import quantize_model
    elif quant == "int4":
        from int4 import quantize_model
    else:
        raise ValueError(f"unknown weight format {quant!r}; known: {', '.join(QUANTS)}")
    return quantize_model(model, quantize_output=quantize_head)


def build_levels(
    target,
    tokenizer,
    drafts,
    device,
    dtype,
    quantize_head=True,
    compile=None,
    target_quant="none",
):
    """ModelLevels (and proposers) for [target, *drafts], top-down. `mxfp4` / `int4` cast the model of
    the level above it (the unquantized one: a draft of an int4 target is cast from the original
    weights, not from the int4 copy); `tiny` is the distilled student of the embedded SmolLM2;
    `KIND@QUANT` casts that draft. target_quant casts the target itself (its head too: a 4-bit target
    quantizes everything, as GPTQ checkpoints do not, but then every level agrees on the format)."""
    top = target if target_quant == "none" else cast(target, target_quant)
    name = "target" if target_quant == "none" else f"target({target_quant})"
    levels, plain = [ModelLevel(top, name, compile=compile)], [target]
    for kind, _ in drafts:
        if kind == "ngram":
            levels.append(NgramProposer())
            plain.append(None)
            continue
        kind, _, quant = kind.partition("@")
        if kind in QUANTS:
            if plain[-1] is None:
                raise ValueError(f"{kind} casts the level above it, which must be a model")
            model = cast(plain[-1], kind, quantize_head)
            name = f"{kind}({levels[-1].name.removesuffix(f'({target_quant})')})"
        elif kind == "tiny":
            from tiny import load_tiny

            model, name = load_tiny(target), "tiny"
        else:
            model, draft_tok = load_model(kind, device, dtype)
            check_same_tokenizer(tokenizer, draft_tok, kind)
            name = kind.rstrip("/").rsplit("/", 1)[-1]
        plain.append(model)
        if quant:
            model, name = cast(model, quant, quantize_head), f"{name}@{quant}"
        levels.append(ModelLevel(model, name, compile=compile))
    return levels


def shard_levels(levels, drafts, placement=None):
    """Tensor parallelism (tp.py) for a built stack, on every rank: the target is sharded; each draft
    as `placement` says ("shard" or "replicate", one per draft), by default mxfp4/int4 drafts are
    sharded (casts of a level above, as big as a quarter of it) and tiny and checkpoint drafts stay
    whole on every rank (small drafts are cheaper replicated: no collective per drafted token).
    Sharding comes after build_levels because `tiny` and replicated casts are built from the whole
    target. A ValueError says when a model's heads do not divide by the world size."""
    tp.apply_tp(levels[0].model)
    for level, (kind, _), where in zip(levels[1:], drafts, placement or [None] * len(drafts)):
        base = kind.partition("@")[0]
        if kind != "ngram" and (where == "shard" or (where is None and base in QUANTS)):
            # tiny's head predicts a subset of the vocabulary: it stays whole (it is small).
            tp.apply_tp(level.model, shard_head=base != "tiny")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, and on a CPU that runs our kernels (kernels/cpu: 1.9x torch fp32 there, and its
    multi-token forwards round exactly like one-token steps); elsewhere fp32, because torch's own
    bf16 matmul is slower than fp32 on the CPUs we measured."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_kernels.available()):
        return torch.bfloat16
    return torch.float32


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
    lead = rank in (None, 0)  # only rank 0 prints; every rank computes the same tokens
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else default_dtype(device)
    try:
        model, tokenizer = load_model(args.checkpoint, device, dtype)
    except (CheckpointError, FileNotFoundError, NotImplementedError) as e:
        sys.exit(f"error: {e}")
    if tokenizer is None:
        sys.exit("error: no tokenizer found next to the checkpoint (tokenizer.json or tokenizer.model)")

    text = args.prompt
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt = torch.tensor(tokenizer.encode(text, bos=tokenizer.add_bos), dtype=torch.long)
    try:
        levels = build_levels(
            model, tokenizer, args.drafts, device, dtype, args.quantize_head, args.compile, args.target_quant
        )
        if rank is not None:
            shard_levels(levels, args.drafts, args.placement)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    generator = torch.Generator(device=device).manual_seed(args.seed)

    printed = ""

    def stream(ids):
        nonlocal printed
        if not lead:
            return
        out = tokenizer.decode(ids)
        if out.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        print(out[len(printed) :], end="", flush=True)
        printed = out

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
    try:
        if len(levels) == 1:
            _, stats = autoregressive_decode(
                levels[0],
                prompt,
                args.max_new_tokens,
                stop_ids=tokenizer.stop_ids,
                on_token=stream,
                **sampling,
            )
        else:
            ks = [k for _, k in args.drafts]
            _, stats = speculative_decode(
                levels, prompt, args.max_new_tokens, k=ks, stop_ids=tokenizer.stop_ids, on_token=stream,
                adaptive=args.adaptive, trees=args.trees, **sampling,
            )  # fmt: skip
    except ValueError as e:
        sys.exit(f"\nerror: {e}")
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
