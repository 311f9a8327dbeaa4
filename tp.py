"""Tensor parallelism (Megatron-style) with torch.distributed: each rank holds a 1/world share of every
layer's weights, so a memory-bound decode step reads 1/world of the bytes per rank.

    torchrun --nproc-per-node 3 script.py          # gloo on the CPU, nccl on CUDA
    rank = tp.maybe_init_dist()                     # None when not launched with torchrun
    model, tokenizer = load_model(...)
    draft = quantize_model(model)                   # before or after apply_tp: both work (see below)
    tp.apply_tp(model); tp.apply_tp(draft)          # in place; a no-op for one process
    ... ModelLevel / speculative_decode exactly as without TP, on every rank; rank 0 prints.

What is split, per Transformer block (world = W ranks, this rank r):
  attention.wqkv     column-parallel. Its rows are [q heads | k heads | v heads]: rank r keeps its
                     n_head/W q heads, its n_local_heads/W k heads and the same v heads, concatenated
                     in that order, so Attention.forward's split/view work unchanged on local counts.
                     With grouped-query attention the q heads of rank r use exactly the kv heads of
                     rank r (the group ratio n_head/n_local_heads is the same on every rank).
  attention.wo       row-parallel (input features = this rank's heads), then one all-reduce (sum).
  feed_forward.w1/3  column-parallel (intermediate_size/W rows each).
  feed_forward.w2    row-parallel, then one all-reduce.
So each block costs two all-reduces of [B, T, dim]. The all-reduces are forward hooks on the Attention
and FeedForward modules (as in gpt-fast), not on wo/w2 themselves, so that mxfp4.quantize_model of a
sharded model, which replaces wo/w2 with new modules, keeps them. Each Attention gets its local n_head
and n_local_heads; model.setup_caches sizes the KV caches from those, so a cache holds local heads.
model.config is left as it is: it describes the whole model (vocab_size, n_head, ... stay global).

Quantized layers (MXFP4Linear, and any layer that keeps its weight in 2-D tensors with one row per
output feature, e.g. `codes` [N, K/2] and `scales` [N, K/block]) are split the same way, generically:
column-parallel slices the rows of every such tensor; row-parallel slices its columns, which is whole
quantization blocks only if K/W is a multiple of the block (else a ValueError says so).

Embedding and output head. The embedding is replicated: a step reads only T of its rows, so it costs
memory, not bandwidth, and no collective. The output head is vocabulary-parallel: rank r computes the
logits of its 1/W of the vocabulary and one all-gather (per forward) assembles them. The numbers:
  SmolLM2-135M: head 49152 x 576 = 28.3M weights of the 134.5M a token reads (21%; tied to the
    embedding). Replicated over 3 ranks each rank would read 35.4M + 28.3M = 63.7M weights instead of
    44.8M (+42%); the all-gather moves 49152 logits (196 KB in fp32) per forward. On a CPU core at
    ~10 GB/s the 18.9M extra bf16 weights are ~4 ms per token, the all-gather ~0.1 ms.
  Llama-3.1-70B bf16: head 128256 x 8192 = 1.05G weights = 2.1 GB, 1.5% of the model. Over 8 GPUs a
    replicated head is +12% of each rank's 17.4 GB (about 0.6 ms at 3 TB/s), against an all-gather of
    256 KB of bf16 logits per token (~10-20 us on NVLink).
  Vocab-parallel wins both. A tied head's shard is a view of the replicated embedding: no extra memory.
  A vocabulary not divisible by W is padded with zero rows on the last rank and cut after the gather.

Identical tokens on every rank. Every rank runs the same decoding loop (speculate.py, unchanged) and
must take the same decisions, else the ranks disagree on the next forward's shape and hang. The logits
a level returns come out of the all-gather, so every rank holds the same bytes by construction (the
gather copies each rank's slice; nothing is summed in an order that could differ by rank). Whatever
the all-reduce does, the gathered logits are identical. Given identical logits, greedy (argmax) is
identical, and sampling is identical when every rank's torch.Generator is seeded the same: each rank
then draws the same random numbers in the same order (the draws depend only on the logits and the
decisions, which agree). A replicated (unsharded) draft level runs the same ops on the same tokens on
every rank, so its logits agree as well (same shapes, same thread count: deterministic CPU/GPU ops).
So nothing is broadcast. (Gloo's CPU all-reduce also leaves every rank the same bytes, as a ring
reduce-scatter + all-gather does: tests/test_tp.py checks the hidden states too. Nothing relies on it;
NCCL does not promise it in general, which is one more reason to end with the gather.)

Drafts: quantize_model(sharded target) gives a draft sharded the same way (its hooks are copied, its
MXFP4 layers are cast from the local shards); apply_tp(quantize_model(target)) shards a draft cast
from the whole target (the same draft as without TP, just split). A draft may also stay replicated:
every rank runs the whole draft, with no collectives. apply_tp refuses a model that is already sharded.

torch.compile: under compilation the collectives are torch.distributed._functional_collectives (as in
gpt-fast), which the compiler traces into its graph; eager runs call the in-place c10d collectives.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

try:  # not on every platform (macOS builds may lack it)
    from torch.distributed import _functional_collectives as funcol
except ImportError:  # pragma: no cover
    funcol = None


@dataclass(frozen=True)
class TPInfo:
    """Set as `model.tp` by apply_tp: how the model was sharded."""

    world_size: int
    rank: int
    vocab_padded: int  # rows of the output head over all ranks (vocab_size rounded up to world_size)


# --- the process group -----------------------------------------------------------------------------


def maybe_init_dist(device=None, timeout_s: float = 600.0) -> int | None:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) and return this process's rank; None when not launched with more than
    one process (plain `python ...`, or torchrun --nproc-per-node 1). Backend: nccl for CUDA (and the
    process's GPU becomes cuda:LOCAL_RANK), gloo for the CPU. `device` is "cpu" or "cuda" (default:
    cuda when available). Idempotent: an initialised group just returns its rank."""
    if not dist.is_available():
        return None
    if dist.is_initialized():
        return dist.get_rank()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return rank


def is_tp() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def device_for_rank(device=None) -> torch.device:
    """The device this rank should load its model on: cuda:LOCAL_RANK under torchrun on CUDA."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# --- collectives: functional under torch.compile, in-place c10d in eager ---------------------------


def _all_reduce(x: Tensor, group) -> Tensor:
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x, "sum", group)
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_last(x: Tensor, world: int, group) -> Tensor:
    x = x.contiguous()
    if torch.compiler.is_compiling():
        return funcol.all_gather_tensor(x, x.dim() - 1, group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def _all_reduce_hook(group):
    def hook(module, args, output):
        return _all_reduce(output, group)

    return hook


def _gather_logits_hook(vocab: int, world: int, group):
    def hook(module, args, logits):
        out = _all_gather_last(logits, world, group)
        return out if out.shape[-1] == vocab else out[..., :vocab]

    return hook


# --- sharding one layer ----------------------------------------------------------------------------


def _weight_tensors(layer: nn.Module) -> list[tuple[str, Tensor]]:
    """The layer's 2-D parameters and buffers (one row per output feature): `weight` of an nn.Linear,
    `codes`/`scales` of a quantized linear. The bias is handled apart."""
    out = []
    for name, t in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
        if t is not None and name != "bias" and t.dim() == 2:
            out.append((name, t))
    if not out:
        raise TypeError(f"{type(layer).__name__} has no 2-D weight tensor to shard")
    n = _out_features(layer)
    for name, t in out:
        if t.shape[0] != n:
            raise TypeError(f"{type(layer).__name__}.{name} has {t.shape[0]} rows, expected {n}")
    return out


def _out_features(layer: nn.Module) -> int:
    if hasattr(layer, "out_features"):
        return layer.out_features
    return next(t for _, t in layer.named_parameters(recurse=False) if t.dim() == 2).shape[0]


def _set(layer: nn.Module, name: str, value: Tensor):
    if name in layer._parameters:
        setattr(layer, name, nn.Parameter(value, requires_grad=False))
    else:
        setattr(layer, name, value)  # a registered buffer stays a buffer (and keeps its persistence)


def _check_row_parallel(layer: nn.Module, name: str, world: int):
    """Row-parallel splits K (the input features); a quantized weight only in whole blocks."""
    k = layer.in_features
    if k % world:
        raise ValueError(f"{name}: {k} input features are not divisible by the world size {world}")
    for tname, t in _weight_tensors(layer):
        if t.shape[1] % world:
            block = k // t.shape[1]
            raise ValueError(
                f"{name}: K={k} input features over {world} ranks is {k // world} per rank, not a "
                f"multiple of the {block}-element quantization block of its `{tname}` "
                f"({t.shape[1]} columns): this layer cannot be split row-parallel {world} ways"
            )


def _shard_columns(layer: nn.Module, splits: list[int], world: int, rank: int):
    """Column-parallel: keep this rank's rows of each segment (segments: [q, k, v] for wqkv)."""

    def rows(t: Tensor) -> Tensor:
        parts, start = [], 0
        for size in splits:
            share = size // world
            parts.append(t.narrow(0, start + rank * share, share))
            start += size
        return torch.cat(parts).clone()  # a copy: the full tensor can be freed

    for tname, t in _weight_tensors(layer):
        _set(layer, tname, rows(t))
    if getattr(layer, "bias", None) is not None:
        layer.bias = nn.Parameter(rows(layer.bias.detach()), requires_grad=False)
    layer.out_features = sum(splits) // world


def _shard_rows_of_k(layer: nn.Module, world: int, rank: int):
    """Row-parallel: keep this rank's 1/world of the input features (columns)."""
    for tname, t in _weight_tensors(layer):
        share = t.shape[1] // world
        _set(layer, tname, t.narrow(1, rank * share, share).clone())
    if getattr(layer, "bias", None) is not None:
        # The partial outputs are summed: the bias must be added once, by rank 0.
        bias = layer.bias.detach()
        layer.bias = nn.Parameter(bias.clone() if rank == 0 else torch.zeros_like(bias), requires_grad=False)
    layer.in_features //= world


def _shard_vocab(layer: nn.Module, vocab: int, world: int, rank: int, tied: Tensor | None):
    """Vocabulary-parallel head: rows [r*c, (r+1)*c) with c = ceil(vocab/world), the last rank's share
    padded with zero rows (zero logits, cut after the gather). A head tied to the embedding without
    padding is a view of the embedding's rows: no copy."""
    c = math.ceil(vocab / world)
    start, stop = min(vocab, rank * c), min(vocab, (rank + 1) * c)  # a tiny vocabulary may leave none
    for tname, t in _weight_tensors(layer):
        part = t.narrow(0, start, stop - start)
        if part.shape[0] < c:
            pad = torch.zeros((c - part.shape[0], t.shape[1]), dtype=t.dtype, device=t.device)
            part = torch.cat([part, pad])
        elif t is not tied:
            part = part.clone()
        _set(layer, tname, part)
    if getattr(layer, "bias", None) is not None:
        b = layer.bias.detach()
        part = torch.cat([b[start:stop], b.new_zeros(c - (stop - start))])
        layer.bias = nn.Parameter(part, requires_grad=False)
    layer.out_features = c


# --- the model -------------------------------------------------------------------------------------


def _resolve(world: int | None, rank_: int | None, group) -> tuple[int, int, object]:
    initialised = dist.is_available() and dist.is_initialized()
    if world is None:
        world = dist.get_world_size(group) if initialised else 1
    if world < 1:
        raise ValueError(f"world_size must be >= 1, got {world}")
    if world == 1:
        return 1, 0, group
    if not initialised:
        raise ValueError(
            f"tensor parallelism over {world} ranks needs torch.distributed: launch with "
            f"torchrun --nproc-per-node {world} and call tp.maybe_init_dist() before apply_tp"
        )
    group = group if group is not None else dist.group.WORLD
    if dist.get_world_size(group) != world:
        raise ValueError(
            f"world_size={world} but the process group has {dist.get_world_size(group)} ranks: "
            f"launch with torchrun --nproc-per-node {world}"
        )
    rank_ = dist.get_rank(group) if rank_ is None else rank_
    if not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} is outside 0..{world - 1}")
    return world, rank_, group


def check_tp(model: nn.Module, world: int, shard_head: bool = True):
    """Raise ValueError if `model` cannot be split over `world` ranks (nothing is changed)."""
    if getattr(model, "tp", None) is not None:
        raise ValueError(
            f"the model is already sharded over {model.tp.world_size} ranks (a draft cast from a "
            "sharded target is sharded too: do not apply_tp it again)"
        )
    for i, block in enumerate(model.layers):
        attn, ffn = block.attention, block.feed_forward
        if attn.n_head % world:
            raise ValueError(
                f"n_head={attn.n_head} is not divisible by the tensor-parallel world size {world}"
            )
        if attn.n_local_heads % world:
            raise ValueError(
                f"n_local_heads={attn.n_local_heads} (key/value heads) is not divisible by the "
                f"tensor-parallel world size {world}"
            )
        if ffn.w1.out_features % world or ffn.w3.out_features % world:
            raise ValueError(
                f"intermediate_size={ffn.w1.out_features} is not divisible by the tensor-parallel "
                f"world size {world}"
            )
        for layer in (attn.wqkv, ffn.w1, ffn.w3):
            _weight_tensors(layer)  # raises on a layer it cannot shard
        _check_row_parallel(attn.wo, f"layers.{i}.attention.wo", world)
        _check_row_parallel(ffn.w2, f"layers.{i}.feed_forward.w2", world)
    if shard_head:
        _weight_tensors(model.output)


def apply_tp(
    model: nn.Module,
    world_size: int | None = None,
    rank: int | None = None,
    group=None,
    shard_head: bool = True,
):
    """Shard a loaded Transformer (model.py) in place over the ranks of `group` (default: the world
    group) and return it. world_size defaults to the group's size; with 1 (or no process group and
    world_size None) the model is returned unchanged. Call it before setup_caches (caches that exist
    already are reallocated with the local kv heads). See the module docstring for the layout.
    shard_head=False keeps the output head whole on every rank (a head that is not a plain linear,
    such as tiny.py's vocabulary-subset head, cannot be split by vocabulary rows)."""
    world, rank, group = _resolve(world_size, rank, group)
    if world == 1:
        return model
    check_tp(model, world, shard_head)  # everything is checked before anything changes

    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        q, kv = attn.n_head * attn.head_dim, attn.n_local_heads * attn.head_dim
        _shard_columns(attn.wqkv, [q, kv, kv], world, rank)
        _shard_rows_of_k(attn.wo, world, rank)
        attn.n_head //= world
        attn.n_local_heads //= world
        if attn.kv_cache is not None:  # setup_caches ran before: same cache, local heads
            k = attn.kv_cache.k_cache
            attn.kv_cache = type(attn.kv_cache)(
                k.shape[0], k.shape[2], attn.n_local_heads, k.shape[3], k.dtype, k.device
            )
        attn.register_forward_hook(_all_reduce_hook(group))

        _shard_columns(ffn.w1, [ffn.w1.out_features], world, rank)
        _shard_columns(ffn.w3, [ffn.w3.out_features], world, rank)
        _shard_rows_of_k(ffn.w2, world, rank)
        ffn.register_forward_hook(_all_reduce_hook(group))

    if not shard_head:
        model.tp = TPInfo(world, rank, model.config.vocab_size)
        return model
    vocab = _out_features(model.output)
    emb = model.tok_embeddings.weight
    tied = emb if getattr(model.output, "weight", None) is emb else None
    _shard_vocab(model.output, vocab, world, rank, tied)
    model.register_forward_hook(_gather_logits_hook(vocab, world, group))
    model.tp = TPInfo(world, rank, _out_features(model.output) * world)
    return model
