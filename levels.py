"""Building a stack of levels: a description like "mxfp4:6,tiny:3:tree" -> ModelLevels, ready to decode.

The library behind the CLI, for scripts and tests alike:

    from levels import build_levels, parse_levels
    specs = parse_levels("mxfp4:6,tiny:3")            # the drafts, top-down: kind:k[:tree][:shard]
    levels = build_levels(target, tokenizer, specs, device, dtype)
    speculative_decode(levels, prompt, 128, k=[s.k for s in specs])

A draft kind is `mxfp4` or `int4` (the level above, before any target_quant, cast to that format),
`tiny` (the best small draft shipped for the embedded model: TINY says which), `head` (the trained
feature head of the embedded model, head.py: it reads the features of the level right above it),
`student` (the standalone distilled student, tiny.py), `head=PATH` (a published EAGLE-1/2 head,
checkpoint.load_eagle_head), `ngram` (prompt lookup, last level only), or a checkpoint path;
`KIND@mxfp4` / `KIND@int4` casts that draft itself (e.g. `student@mxfp4`; a head is not cast).

"""

from dataclasses import dataclass

import torch

import tp
from accel import accelerate, compile_decode
from checkpoint import load_model
from head import HeadLevel
from kernels import cpu as cpu_kernels
from speculate import ModelLevel, NgramProposer, TreeShape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What `tiny` means: the small draft that measured fastest on the embedded model. The feature head and
# the standalone student trained on the same data for the same time; the head won (results/cpu_smollm2.md:
# 0.76x vs 0.71x over plain decoding greedy, 0.74x vs 0.64x at T = 0.7).
TINY = "head"
LEVEL_FLAGS = ("tree", "shard", "replicate")


@dataclass(frozen=True)
class LevelSpec:
    """One draft level: its kind, how many tokens it proposes per round (k; a tree's depth), whether it
    drafts token trees, and its placement under tensor parallelism ("shard", "replicate" or None: the
    default for its kind)."""

    kind: str
    k: int
    tree: bool = False
    placement: str | None = None


def parse_levels(spec: str) -> list[LevelSpec]:
    """ "kind:k[:tree][:shard|:replicate],..." -> the draft levels, top-down. ValueError on bad input."""
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        flags = []
        while len(parts) > 2 and parts[-1] in LEVEL_FLAGS:
            flags.append(parts.pop())
        kind, k = ":".join(parts[:-1]), parts[-1]
        if not kind or not k.lstrip("-").isdigit() or ("shard" in flags and "replicate" in flags):
            raise ValueError(
                f"levels are kind:k with optional :tree and :shard or :replicate, got {item.strip()!r}"
            )
        where = next((f for f in flags if f != "tree"), None)
        out.append(LevelSpec(kind, int(k), "tree" in flags, where))
    check_levels(out)
    return out


def check_levels(specs: list[LevelSpec]):
    for s in specs:
        if s.k < 1:
            raise ValueError(f"k must be >= 1 for every draft, got {s.k} for {s.kind}")
        if s.kind == "none":
            raise ValueError("'none' cannot sit between two drafts")
    if any(s.kind == "ngram" for s in specs[:-1]):
        raise ValueError("ngram can only be the last level: nothing below it can speed it up")
    if any(s.tree for s in specs[:-1]):
        raise ValueError("only the last draft level can draft trees (a tree is verified by the level above)")


def shorthand(draft="none", k=6, draft2="none", k2=3, tree=False, tree2=False) -> str:
    """The CLI's --draft/--k/--draft2/--k2/--tree/--tree2 as a levels description ("" for none)."""
    if draft == "none":
        if draft2 != "none":
            raise ValueError("--draft2 needs a --draft above it")
        if tree or tree2:
            raise ValueError("--tree/--tree2 need a draft at that level")
        return ""
    if draft2 == "none" and tree2:
        raise ValueError("--tree/--tree2 need a draft at that level")
    items = [f"{draft}:{k}" + (":tree" if tree else "")]
    if draft2 != "none":
        items.append(f"{draft2}:{k2}" + (":tree" if tree2 else ""))
    return ",".join(items)


def tree_shape(device: torch.device, nodes: int | None = None, topk: int | None = None) -> TreeShape:
    """The tree a tree-drafting level grows. A GPU verifies 30 nodes for about the price of one token
    (SpecMQuant's 30 nodes, top-10); on the CPUs we measured a 17-token forward costs 2.8x a one-token
    step, and 4-node trees were the best of 4, 8 and 16, so the CPU default is small."""
    cuda = torch.device(device).type == "cuda"
    return TreeShape(
        nodes if nodes is not None else (30 if cuda else 4), topk if topk is not None else (10 if cuda else 2)
    )


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
    kernels=True,
    int8_drafts="auto",
    int8_target=False,
) -> list:
    """ModelLevels (and proposers) for [target, *drafts], top-down; drafts are LevelSpecs (or (kind, k)
    pairs). `mxfp4` / `int4` cast the model of the level above it (the unquantized one: a draft of an
    int4 target is cast from the original weights, not from the int4 copy); `tiny` is the distilled
    student of the embedded SmolLM2; `KIND@QUANT` casts that draft. target_quant casts the target
    itself (its head too: a 4-bit target quantizes everything, as GPTQ checkpoints do not, but then
    every level agrees on the format).
    kernels: every model gets accel.accelerate (kernel-backed twins of its modules); False leaves
    them as model.py wrote them (and swaps back a target that was accelerated before).
    int8_drafts / int8_target: the MXFP4 and int4 linears of the drafts / of the target round their
    input to int8 on CPUs with AVX512-VNNI (accel.FastMXFP4Linear): True, False or "auto" (where it
    measures faster on this CPU, accel.int8_pays). "auto" for drafts by default: a draft's numerics
    change only its acceptance, never the output (measured unchanged, 0.39 exact vs 0.40 int8,
    scripts/profile_step.py --acceptance); off for the target, whose numerics are the output.
    compile: torch.compile + CUDA graphs for decode-sized forwards (None: on for CUDA)."""
    drafts = [d if isinstance(d, LevelSpec) else LevelSpec(*d) for d in drafts]
    compile = torch.device(device).type == "cuda" if compile is None else compile

    def level(model, name, int8):
        accelerate(model, enabled=kernels, int8_activations=int8)
        return ModelLevel(model, name, compiled=compile_decode(model) if compile else None)

    top = target if target_quant == "none" else cast(target, target_quant)
    name = "target" if target_quant == "none" else f"target({target_quant})"
    levels, plain = [level(top, name, int8_target)], [target]
    for d in drafts:
        if d.kind == "ngram":
            levels.append(NgramProposer())
            plain.append(None)
            continue
        kind, _, quant = d.kind.partition("@")
        kind = TINY if kind == "tiny" else kind
        if kind == "head" or kind.startswith("head="):
            if plain[-1] is None:
                raise ValueError(
                    "a feature head reads the features of the level above it: it must be a model"
                )
            if quant:
                raise ValueError("a feature head is not cast (it is a few MB): drop the @ part")
            head = load_feature_head(kind, target)
            name = "eagle" if kind != "head" else "tiny" if d.kind == "tiny" else "head"
            accelerate(head, enabled=kernels)
            levels.append(HeadLevel(head, levels[-1], name))
            plain.append(None)
            continue
        if kind in QUANTS:
            if plain[-1] is None:
                raise ValueError(f"{kind} casts the level above it, which must be a model")
            model = cast(plain[-1], kind, quantize_head)
            name = f"{kind}({levels[-1].name.removesuffix(f'({target_quant})')})"
        elif kind == "student":
            from tiny import load_tiny

            model, name = load_tiny(target), "tiny" if d.kind.startswith("tiny") else "student"
        else:
            model, draft_tok = load_model(kind, device, dtype)
            check_same_tokenizer(tokenizer, draft_tok, kind)
            name = kind.rstrip("/").rsplit("/", 1)[-1]
        plain.append(model)
        if quant:
            model, name = cast(model, quant, quantize_head), f"{name}@{quant}"
        levels.append(level(model, name, int8_drafts))
    return levels


def load_feature_head(kind: str, target):
    """`head`: the trained head of the embedded model; `head=PATH`: a published EAGLE-1/2 head. Its
    embedding and output rows are the (unquantized) target's."""
    if kind == "head":
        from head import load_head

        return load_head(target)
    from checkpoint import load_eagle_head

    return load_eagle_head(kind.removeprefix("head="), target)


def shard_levels(levels, drafts):
    """Tensor parallelism (tp.py) for a built stack, on every rank: the target is sharded; each draft
    as its placement says, by default mxfp4/int4 drafts are sharded (casts of a level above, as big as
    a quarter of it) and tiny, student, head and checkpoint drafts stay whole on every rank (small
    drafts are cheaper replicated: no collective per drafted token; a head is never sharded). Sharding
    comes after build_levels because the small drafts and replicated casts are built from the whole
    target. A ValueError says when a model's heads do not divide by the world size."""
    drafts = [d if isinstance(d, LevelSpec) else LevelSpec(*d) for d in drafts]
    tp.apply_tp(levels[0].model)
    for level, d in zip(levels[1:], drafts):
        base = d.kind.partition("@")[0]
        base = TINY if base == "tiny" else base
        if (
            d.kind != "ngram"
            and not base.startswith("head")  # a feature head stays whole: a few MB
            and (d.placement == "shard" or (d.placement is None and base in QUANTS))
        ):
            # The student's head predicts a subset of the vocabulary: it stays whole (it is small).
            tp.apply_tp(level.model, shard_head=base != "student")


def default_dtype(device: torch.device, kernels: bool = True) -> torch.dtype:
    """bf16 on CUDA, and on a CPU that runs our kernels (kernels/cpu: 1.9x torch fp32 there, and its
    multi-token forwards round exactly like one-token steps); elsewhere fp32, because torch's own
    bf16 matmul is slower than fp32 on the CPUs we measured."""
    if device.type == "cuda" or (device.type == "cpu" and kernels and cpu_kernels.available()):
        return torch.bfloat16
    return torch.float32
