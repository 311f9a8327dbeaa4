"""On paper: per-token decode time of Llama-3.1-70B and its drafts under tensor parallelism on 1-8 H100s,
and the speedup multi-level speculation should give at each width. A PROJECTION, not a measurement.

    python scripts/tp_projection.py --out results/tp_projection           # seconds, CPU, no GPU
    python scripts/tp_projection.py --allreduce-us 6 --out /tmp/oneshot   # a one-shot all-reduce
    python scripts/tp_projection.py --measure --out results/tp_shard_h100 # on a GPU: time the shards
    python scripts/tp_projection.py --measured-shard-ms results/tp_shard_h100.json \
        --out results/tp_projection_measured                              # ...and project from them

The model. One decode step (T tokens, batch 1) of a model sharded W ways as tp.py shards it:
    time = max(bytes read per rank / HBM bandwidth, FLOPs per rank / FLOP rate)     weights + KV cache
         + n_layer * per-layer floor                    kernel launches and small kernels, CUDA graphs
         + 2 * n_layer * all_reduce(W, T * dim * 2 bytes)    wo and w2 are row-parallel (tp.py)
         + all_gather(W, T * vocab * 2 bytes)                the vocabulary-parallel head (tp.py)
with all_reduce(W, m) = latency + m * 2(W-1)/W / NVLink bus bandwidth (all_gather: (W-1)/W), and
none of the collectives at W = 1. A replicated draft runs whole on every rank: no collectives, the
same time at every W. The speedup is scripts/cost_model.py's expected_speedup (Leviathan et al.,
generalised to levels), fed with these times and with acceptance rates given as inputs.

The constants, and where they come from (ms are per token, batch 1):
  HBM peak 3.35 TB/s: H100 SXM5 80GB datasheet, https://www.nvidia.com/en-us/data-center/h100/
  Achieved bandwidth and per-layer floor: solved from two anchors measured on an H100 with gpt-fast's
    own decode loop (torch.compile, CUDA graphs; ../shared/NOTES.md, ../shared/anchors/
    bench_gptfast.py): Llama-3.1-8B bf16 6.77 ms and Llama-3.2-1B bf16 1.74 ms. With bytes from the
    shapes, time = bytes / B + n_layer * f gives B = 3.06 TB/s (91% of peak) and f = 58 us per layer.
  Quantized GEMV bandwidth: gpt-fast's int8 weight-only Llama-3.1-8B, 5.94 ms on the same H100, less
    the same floor: 1.84 TB/s. Used for MXFP4 and int4 (our own kernels are not yet timed on a GPU).
  All-reduce latency, small messages ([1, 8192] bf16 = 16 KB) on H100 NVLink/NVSwitch:
    NCCL, 8xH100, nccl-tests out of a graph: ~32 us at 16 KB (NCCL 2.28)
        https://github.com/NVIDIA/nccl/issues/2094
    NCCL inside a CUDA graph (vLLM's pynccl), H100, bf16 hidden 8192: 17 us (TP=4), 23 us (TP=6) at
        512 KB, the smallest size listed; https://github.com/vllm-project/vllm/pull/24111
    NCCL (pynccl) captured in a graph: 16.5 us at 2 KiB, 18.6 us at 4 KiB
        https://github.com/sgl-project/sglang/pull/10571
    custom one-shot all-reduce on H100 (no graph): 3.7-5.9 us (TP 2-8) at small sizes, 7.8 us at TP=8
        for the largest small size; vLLM's custom all-reduce ~9-12 us
        https://github.com/sgl-project/sglang/pull/2904
    => default 18 us (NCCL in a CUDA graph: what tp.py gets, it calls NCCL); 6 us = a one-shot
       custom all-reduce (--allreduce-us 6); a sensitivity table sweeps 5-40 us.
  Cross-check of the model's form on published data: gpt-fast's README tensor-parallel table
    (8xA100-80GB at 330 W; Llama-2-7B on 1/2/4/8 GPUs, Llama-2-70B on 2/4/8)
    https://github.com/pytorch-labs/gpt-fast#tensor-parallelism
    is fitted by the same three terms to within 0.25 ms, with B = 1.65 TB/s (the README's "peak
    bandwidth about 1700 GB/s"), f = 47 us/layer and an all-reduce of 8.3 us; the .md shows the fit.
  NVLink bus bandwidth 360 GB/s per GPU (of 450 GB/s per direction; it barely matters for 16 KB).
  Dense bf16 FLOP rate 600 TFLOP/s (~60% of the datasheet's 989): matters only for wide verifies.
  Usable memory 80 GB per GPU (the H100 80GB has 81559 MiB; ~5 GB kept for context and workspace).

Measuring instead of modelling the shards. A GPU session times one 70B layer shard per width on ONE
GPU (shapes divided by W exactly as tp.py divides them: n_head/W, n_local_heads/W, intermediate/W;
the head's vocab/W rows) with a KV cache of --context tokens, compiled with CUDA graphs:
    python scripts/tp_projection.py --measure --device cuda --widths 1,2,4,8 --formats bf16,mxfp4,int4 \
        --layers 4 --iters 50 --out results/tp_shard_h100
which writes results/tp_shard_h100.json; then
    python scripts/tp_projection.py --measured-shard-ms results/tp_shard_h100.json --out ...
uses n_layer * (measured ms per layer) + the measured head in place of the bandwidth model and the
floor for those formats and widths, and still adds the modelled collectives (one GPU has none).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import PRESETS  # noqa: E402
from scripts.cost_model import expected_speedup  # noqa: E402

WIDTHS = (1, 2, 4, 8)
TARGET = "llama-3.1-70b"
ACT_BYTES = 2  # bf16 activations, logits and KV cache

# Bytes per weight, scales included. MXFP4 (mxfp4.py): 4-bit E2M1 + one 8-bit E8M0 scale per 32.
# int4 (int4.py): 4-bit integers + one bf16 scale per group of 128. int8: gpt-fast's per-channel.
BYTES_PER_WEIGHT = {"bf16": 2.0, "mxfp4": (4 + 8 / 32) / 8, "int4": 0.5 + 2 / 128, "int8": 1.0}


# --- shapes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    n_layer: int
    dim: int
    n_head: int
    n_kv: int
    head_dim: int
    ffn: int
    vocab: int
    head_rows: int  # rows of the output head a step reads (fewer with an FR-Spec subset head)
    tied: bool = False  # the head is the embedding matrix (held once)

    @classmethod
    def preset(cls, name: str, **changes) -> Shape:
        c = PRESETS[name]
        s = cls(
            n_layer=c["n_layer"], dim=c["dim"], n_head=c["n_head"], n_kv=c["n_local_heads"],
            head_dim=c.get("head_dim") or c["dim"] // c["n_head"], ffn=c["intermediate_size"],
            vocab=c["vocab_size"], head_rows=c["vocab_size"], tied=c.get("tie_embeddings", False),
        )  # fmt: skip
        return dataclasses.replace(s, **changes)

    def layer_weights(self) -> int:
        qkv = self.dim * (self.n_head + 2 * self.n_kv) * self.head_dim
        return qkv + self.n_head * self.head_dim * self.dim + 3 * self.dim * self.ffn

    def weights(self) -> int:
        """Weights one step reads: every layer and the head (the embedding gives one row: not counted)."""
        return self.n_layer * self.layer_weights() + self.head_rows * self.dim

    def kv_bytes(self, context: int) -> int:
        return 2 * self.n_layer * self.n_kv * self.head_dim * context * ACT_BYTES


# The two small drafts, both replicated on every rank. tiny.py's recipe for SmolLM2-135M is a 4-layer
# student with SmolLM2's layer shape and an FR-Spec head over the 16384 most frequent tokens. A draft
# for Llama-3 needs Llama-3's tokenizer, so the projection keeps that body and head size with the
# 128256-token vocabulary (a full-vocabulary head is shown as well: it alone is 74M weights).
TINY = Shape.preset("smollm2-135m", n_layer=4, vocab=128256, head_rows=16384, tied=False)  # a copy of rows
TINY_FULL = dataclasses.replace(TINY, head_rows=128256, tied=True)
LLAMA_1B = Shape.preset("llama-3.2-1b")  # tied head: the embedding read as the head, counted once
BIG = Shape.preset(TARGET)


@dataclass(frozen=True)
class Model:
    name: str
    shape: Shape
    fmt: str  # bf16 | mxfp4 | int4
    sharded: bool  # tp.py-sharded (collectives) or replicated (none)
    owns_embedding: bool = True  # a draft cast from the target shares the target's embedding


MODELS = {
    "bf16": Model("target bf16", BIG, "bf16", True),
    "mxfp4": Model("MXFP4 draft", BIG, "mxfp4", True, owns_embedding=False),
    "int4": Model("int4 (draft or W4 target)", BIG, "int4", True, owns_embedding=False),
    "tiny": Model("tiny (4L, 16k head), replicated", TINY, "bf16", False),
    "tiny_full": Model("tiny, full 128k head, replicated", TINY_FULL, "bf16", False),
    "1b": Model("Llama-3.2-1B, replicated", LLAMA_1B, "bf16", False),
}


# --- the hardware: constants and their calibration -----------------------------------------------

HBM_PEAK = 3.35e12  # H100 SXM5 datasheet
ANCHOR_8B_BF16_S = 6.77e-3  # gpt-fast decode on an H100, ../shared/NOTES.md
ANCHOR_1B_BF16_S = 1.74e-3
ANCHOR_8B_INT8_S = 5.94e-3
ALLREDUCE_NCCL_S = 18e-6  # NCCL in a CUDA graph, 16 KB, H100 NVSwitch (sources in the docstring)
ALLREDUCE_ONESHOT_S = 6e-6  # a custom one-shot all-reduce (vLLM / TensorRT-LLM style)
NVLINK_BUS_BW = 360e9
FLOPS_BF16 = 600e12
USABLE_MEMORY = 80e9


@dataclass(frozen=True)
class Hardware:
    bw: float  # achieved HBM bandwidth of bf16 GEMV, bytes/s
    bw_quant: float  # ... of weight-only quantized GEMV (dequantization in registers)
    floor: float  # seconds per layer that do not shrink with bytes: launches, norms, small kernels
    allreduce: float  # seconds, latency of one small all-reduce (and of the head's all-gather)
    nvlink: float = NVLINK_BUS_BW
    flops: float = FLOPS_BF16
    memory: float = USABLE_MEMORY


def solve_bandwidth_and_floor(anchors: list[tuple[float, int, float]]) -> tuple[float, float]:
    """B and f with time = bytes / B + n_layer * f through two (bytes, n_layer, seconds) anchors."""
    (b1, l1, t1), (b2, l2, t2) = anchors
    inv_b = (t1 * l2 - t2 * l1) / (b1 * l2 - b2 * l1)
    return 1 / inv_b, (t1 - b1 * inv_b) / l1


def calibrate(allreduce: float = ALLREDUCE_NCCL_S) -> Hardware:
    """The H100 constants from the gpt-fast anchors (bytes as bench_gptfast.py counts them: every weight
    but the embedding; gpt-fast's random 1B has an untied head of the same size as the tied one)."""
    b8 = Shape.preset("llama-3.1-8b").weights()
    anchors = [(2.0 * b8, 32, ANCHOR_8B_BF16_S), (2.0 * LLAMA_1B.weights(), 16, ANCHOR_1B_BF16_S)]
    bw, floor = solve_bandwidth_and_floor(anchors)
    bw_quant = BYTES_PER_WEIGHT["int8"] * b8 / (ANCHOR_8B_INT8_S - 32 * floor)
    return Hardware(bw=bw, bw_quant=bw_quant, floor=floor, allreduce=allreduce)


def fit_gptfast_a100() -> dict:
    """Least squares of time = bytes/B + L*f + 2L*allreduce (W > 1) on gpt-fast's README table: the
    check that these three terms explain published tensor-parallel scaling. gpt-fast shards the
    layers and keeps the head whole on every rank."""
    import numpy as np

    l2_7b = Shape(32, 4096, 32, 32, 128, 11008, 32000, 32000)
    l2_70b = Shape(80, 8192, 64, 8, 128, 28672, 32000, 32000)
    table = [(l2_7b, 1, 104.9), (l2_7b, 2, 168.84), (l2_7b, 4, 254.02), (l2_7b, 8, 328.43)]
    table += [(l2_70b, 2, 21.32), (l2_70b, 4, 38.01), (l2_70b, 8, 62.50)]
    rows, secs = [], []
    for s, w, tok_s in table:
        per_rank = 2.0 * (s.n_layer * s.layer_weights() / w + s.head_rows * s.dim)
        rows.append([per_rank, s.n_layer, 2 * s.n_layer * (w > 1)])
        secs.append(1 / tok_s)
    x, *_ = np.linalg.lstsq(np.array(rows), np.array(secs), rcond=None)
    fitted = np.array(rows) @ x
    points = [
        dict(model="Llama-2-7B" if s is l2_7b else "Llama-2-70B", W=w, measured_ms=1e3 / t, model_ms=m * 1e3)
        for (s, w, t), m in zip(table, fitted)
    ]
    return dict(bw_TBps=1e-12 / x[0], floor_us=x[1] * 1e6, allreduce_us=x[2] * 1e6, points=points)


# --- one forward -----------------------------------------------------------------------------------


def collective(hw: Hardware, world: int, nbytes: float, traffic: float) -> float:
    """Latency + bandwidth term of one collective; traffic is 2(W-1)/W (all-reduce) or (W-1)/W."""
    return 0.0 if world == 1 else hw.allreduce + nbytes * traffic / hw.nvlink


def forward(model: Model, world: int, tokens: int, hw: Hardware, context: int, measured=None) -> dict:
    """Seconds of one T-token forward on one rank, split into its terms. `measured`: per-layer and head
    seconds for this format and width (from --measure), replacing the bandwidth model and the floor."""
    s, w = model.shape, (world if model.sharded else 1)
    bpw = BYTES_PER_WEIGHT[model.fmt]
    bw = hw.bw if model.fmt == "bf16" else hw.bw_quant
    weight_bytes = s.weights() * bpw / w
    kv_bytes = s.kv_bytes(context) / w  # kv heads are split too (n_kv % W == 0 up to W = 8)
    # Attention reads the cache once per forward; its FLOPs grow with T and the context.
    flops = (2 * s.weights() + 4 * s.n_layer * s.n_head * s.head_dim * context) * tokens / w
    if measured is not None:
        memory = s.n_layer * measured["layer_s"] + measured["head_s"]
        floor = 0.0  # inside the measurement
    else:
        memory = max(weight_bytes / bw + kv_bytes / hw.bw, flops / hw.flops)
        floor = s.n_layer * hw.floor
    comm = 0.0
    if w > 1:
        comm += 2 * s.n_layer * collective(hw, w, tokens * s.dim * ACT_BYTES, 2 * (w - 1) / w)
        comm += collective(hw, w, tokens * s.vocab * ACT_BYTES, (w - 1) / w)
    return dict(total=memory + floor + comm, memory=memory, floor=floor, comm=comm)


def memory_per_gpu(model: Model, world: int, max_seq: int) -> float:
    """Bytes one rank holds: its share of the weights and KV cache, plus the replicated embedding."""
    s, w = model.shape, (world if model.sharded else 1)
    weights = s.weights() * BYTES_PER_WEIGHT[model.fmt] / w
    embedding = s.vocab * s.dim * ACT_BYTES if model.owns_embedding and not s.tied else 0
    return weights + embedding + s.kv_bytes(max_seq) / w


# --- the speedup of a stack of levels -----------------------------------------------------------


def shard_time(measured: dict, model: Model, world: int):
    """The measured layer/head times for a sharded model at this width, if a --measure record has them
    (only the 70B's shards are measured: replicated drafts always use the model)."""
    return measured.get((model.fmt, world)) if model.sharded else None


def level_times(levels: list[Model], world: int, hw: Hardware, context: int, measured: dict):
    """Seconds of each level's one-token step, and verify(i, k): level i's forward over k + 1 tokens
    (it checks k drafted tokens). A measured step keeps its measured part; the model adds what the
    extra tokens add (collective bytes, FLOPs past the roofline's knee)."""
    step = [forward(m, world, 1, hw, context, shard_time(measured, m, world))["total"] for m in levels]

    def verify(i: int, k: int) -> float:
        extra = (
            forward(levels[i], world, k + 1, hw, context)["total"]
            - forward(levels[i], world, 1, hw, context)["total"]
        )
        return step[i] + extra

    return step, verify


def best_speedup(levels: list[Model], accept: list[float], world, hw, context, measured, kmax=(12, 8)):
    """The best expected speedup over the target alone (cost_model.expected_speedup) over k per level,
    the drafted token counts k_i in 1..kmax[i]. Returns (speedup, ks, seconds per emitted token)."""
    step, verify = level_times(levels, world, hw, context, measured)
    best = (0.0, None)
    grids = [range(1, kmax[min(i, len(kmax) - 1)] + 1) for i in range(len(levels) - 1)]
    for ks in itertools.product(*grids):
        sp = expected_speedup(step, [verify(i, k) for i, k in enumerate(ks)], accept, list(ks))
        if sp > best[0]:
            best = (sp, list(ks))
    return best[0], best[1], step[0] / best[0]


def fixed_speedup(levels, accept, ks, world, hw, context, measured) -> float:
    step, verify = level_times(levels, world, hw, context, measured)
    return expected_speedup(step, [verify(i, k) for i, k in enumerate(ks)], accept, ks)


def scenarios() -> dict:
    """Acceptance rates (per token, i.i.d. as cost_model assumes). 'measured': this project's SmolLM2-
    135M on the CPU at T=0 (results/cost_model_cpu.json: acceptance that reproduces each measured mean
    accepted length); a 135M model casts to MXFP4 far worse than a 70B, so this is a pessimistic
    floor, and the 1B draft is given the tiny's numbers for want of its own. 'paper-like': values of
    the order ML-SpecQD reports for 7B targets, an ASSUMPTION, not a measurement."""
    out = {}
    path = ROOT / "results" / "cost_model_cpu.json"
    if path.exists():
        rows = {(r["config"], r["temperature"]): r["accept"] for r in json.loads(path.read_text())["rows"]}
        try:
            mx, tiny = rows[("SD mxfp4", 0.0)][0], rows[("SD tiny", 0.0)][0]
            ml = rows[("ML-SD mxfp4+tiny", 0.0)]
            out["measured (SmolLM2-135M, CPU, T=0)"] = dict(
                source=str(path.relative_to(ROOT)), mxfp4=mx, small={"tiny": tiny, "1b": tiny},
                ml={"tiny": ml, "1b": ml},
            )  # fmt: skip
        except KeyError:
            pass
    out["paper-like (assumption)"] = dict(
        source="assumption: MXFP4 0.875 (0.85-0.9), tiny 0.60, 1B 0.70 per token",
        mxfp4=0.875, small={"tiny": 0.60, "1b": 0.70}, ml={"tiny": [0.875, 0.60], "1b": [0.875, 0.70]},
    )  # fmt: skip
    return out


# --- the tables ---------------------------------------------------------------------------------


def stops_scaling(ms: dict[int, float], sharded: bool) -> str:
    """The W past which doubling cuts the time by less than 15%."""
    if not sharded:
        return "never (replicated)"
    gains = ", ".join(f"{ms[w] / ms[2 * w]:.2f}x" for w in WIDTHS[:-1])
    for w in WIDTHS[:-1]:
        if ms[2 * w] > 0.85 * ms[w]:
            return f"past W={w} (per doubling: {gains})"
    return f"still scaling at W={WIDTHS[-1]} (per doubling: {gains})"


def project(hw: Hardware, context: int, max_seq: int, measured: dict) -> dict:
    per_model = {}
    for key, m in MODELS.items():
        rows = {}
        for w in WIDTHS:
            f = forward(m, w, 1, hw, context, shard_time(measured, m, w))
            mem = memory_per_gpu(m, w, max_seq)
            rows[w] = dict(
                ms=f["total"] * 1e3, allreduce_share=f["comm"] / f["total"], floor_ms=f["floor"] * 1e3,
                memory_ms=f["memory"] * 1e3, comm_ms=f["comm"] * 1e3, gb_per_gpu=mem / 1e9,
                fits=mem <= hw.memory, measured=shard_time(measured, m, w) is not None,
            )  # fmt: skip
        per_model[key] = dict(
            name=m.name, rows=rows, stops=stops_scaling({w: r["ms"] for w, r in rows.items()}, m.sharded),
            # what no width can beat: the per-layer floor and the collectives' latency stay (the W=8 values)
            limit_ms=rows[WIDTHS[-1]]["floor_ms"] + rows[WIDTHS[-1]]["comm_ms"],
        )  # fmt: skip
    speedups = {}
    for sc_name, sc in scenarios().items():
        table = {}
        for w in WIDTHS:
            t_target = forward(MODELS["bf16"], w, 1, hw, context, shard_time(measured, MODELS["bf16"], w))[
                "total"
            ]
            entry = {"target_ms": t_target * 1e3}
            stacks = {
                "SD > MXFP4": ([MODELS["bf16"], MODELS["mxfp4"]], [sc["mxfp4"]]),
                "SD > tiny": ([MODELS["bf16"], MODELS["tiny"]], [sc["small"]["tiny"]]),
                "SD > 1B": ([MODELS["bf16"], MODELS["1b"]], [sc["small"]["1b"]]),
                "ML > MXFP4 > tiny": ([MODELS["bf16"], MODELS["mxfp4"], MODELS["tiny"]], sc["ml"]["tiny"]),
                "ML > MXFP4 > 1B": ([MODELS["bf16"], MODELS["mxfp4"], MODELS["1b"]], sc["ml"]["1b"]),
            }
            for name, (levels, acc) in stacks.items():
                sp, ks, sec = best_speedup(levels, acc, w, hw, context, measured)
                mem = sum(memory_per_gpu(m, w, max_seq) for m in levels)
                entry[name] = dict(speedup=sp, k=ks, ms_per_token=sec * 1e3, fits=mem <= hw.memory)
            levels = [MODELS["bf16"], MODELS["mxfp4"], MODELS["tiny"]]
            entry["ML > MXFP4 > tiny, k=[6,3]"] = dict(
                speedup=fixed_speedup(levels, sc["ml"]["tiny"], [6, 3], w, hw, context, measured)
            )
            table[w] = entry
        speedups[sc_name] = dict(source=sc["source"], by_width=table)
    return dict(models=per_model, speedups=speedups)


def sensitivity(base: Hardware, context: int) -> list[dict]:
    """At W = 8: how the all-reduce latency and the per-layer floor move the answer (paper-like)."""
    sc = scenarios()["paper-like (assumption)"]
    out = []
    for floor_us in (15, 30, round(base.floor * 1e6)):
        for ar_us in (5, 10, 20, 40):
            hw = dataclasses.replace(base, floor=floor_us * 1e-6, allreduce=ar_us * 1e-6)
            t = {k: forward(MODELS[k], 8, 1, hw, context)["total"] for k in ("bf16", "mxfp4", "1b", "tiny")}
            ml, ks, _ = best_speedup(
                [MODELS["bf16"], MODELS["mxfp4"], MODELS["tiny"]], sc["ml"]["tiny"], 8, hw, context, {}
            )
            sd_1b, _, _ = best_speedup(
                [MODELS["bf16"], MODELS["1b"]], [sc["small"]["1b"]], 8, hw, context, {}
            )
            sd_mx, _, _ = best_speedup([MODELS["bf16"], MODELS["mxfp4"]], [sc["mxfp4"]], 8, hw, context, {})
            out.append(
                dict(
                    floor_us=floor_us, allreduce_us=ar_us, target_ms=t["bf16"] * 1e3,
                    c_mxfp4=t["mxfp4"] / t["bf16"], c_1b=t["1b"] / t["bf16"], sd_mxfp4=sd_mx, sd_1b=sd_1b,
                    ml_mxfp4_tiny=ml, ml_k=ks,
                )
            )  # fmt: skip
    return out


def _gb(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def quant_sensitivity(base: Hardware, context: int) -> list[dict]:
    """The MXFP4 level with kernels as fast per byte as bf16 (ideal) against the int8-anchored ones."""
    sc = scenarios()["paper-like (assumption)"]
    out = []
    for w in WIDTHS:
        for label, bw_q in (("int8 anchor", base.bw_quant), ("ideal (= bf16)", base.bw)):
            hw = dataclasses.replace(base, bw_quant=bw_q)
            c = (
                forward(MODELS["mxfp4"], w, 1, hw, context)["total"]
                / forward(MODELS["bf16"], w, 1, hw, context)["total"]
            )
            sd, _, _ = best_speedup([MODELS["bf16"], MODELS["mxfp4"]], [sc["mxfp4"]], w, hw, context, {})
            ml = {}
            for small in ("tiny", "1b"):
                levels = [MODELS["bf16"], MODELS["mxfp4"], MODELS[small]]
                ml[small], _, _ = best_speedup(levels, sc["ml"][small], w, hw, context, {})
            out.append(
                dict(W=w, kernels=label, bw_quant_TBps=bw_q / 1e12, c_mxfp4=c, sd_mxfp4=sd,
                     ml_mxfp4_tiny=ml["tiny"], ml_mxfp4_1b=ml["1b"])
            )  # fmt: skip
    return out


def fmt_ms(r: dict) -> str:
    cell = f"{r['ms']:.2f}"
    if r.get("measured"):
        cell += "*"
    return cell if r["fits"] else f"[{cell}] no fit"


def markdown(
    hw: Hardware, res: dict, sens: list[dict], qsens: list[dict], fit: dict, args, measured_from
) -> str:
    L = []
    add = L.append
    add("# Tensor-parallel projection: Llama-3.1-70B and its drafts on 1-8 H100s")
    add("")
    add(
        "**PROJECTION, not a measurement.** Batch 1, one token per step, KV cache of "
        f"{args.context} tokens read per step, memory checked for {args.max_seq} tokens. "
        "`python scripts/tp_projection.py` (constants and sources in its docstring)."
    )
    if measured_from:
        add(f"Per-layer shard times marked `*` are measured ({measured_from}); the rest are modelled.")
    add("")
    add("## Constants")
    add("")
    add("| constant | value | source |")
    add("|---|---:|---|")
    add(
        f"| HBM peak | {HBM_PEAK / 1e12:.2f} TB/s | H100 SXM5 datasheet "
        "https://www.nvidia.com/en-us/data-center/h100/ |"
    )
    add(
        f"| achieved bf16 GEMV bandwidth | {hw.bw / 1e12:.2f} TB/s ({hw.bw / HBM_PEAK:.0%} of peak) | "
        "solved from gpt-fast on H100: 8B bf16 6.77 ms, 1B bf16 1.74 ms (../shared/NOTES.md) |"
    )
    add(
        f"| per-layer floor | {hw.floor * 1e6:.0f} us | "
        "same solve (launches and small kernels, CUDA graphs) |"
    )
    add(
        f"| quantized GEMV bandwidth | {hw.bw_quant / 1e12:.2f} TB/s | gpt-fast int8 weight-only 8B, "
        "5.94 ms on H100, less the floor; used for MXFP4 and int4 |"
    )
    add(
        f"| all-reduce latency, 16 KB | {hw.allreduce * 1e6:.0f} us | NCCL in a CUDA graph on H100: "
        "https://github.com/vllm-project/vllm/pull/24111 (17-23 us at 512 KB), "
        "https://github.com/sgl-project/sglang/pull/10571 (16.5-18.6 us at 2-4 KiB), "
        "nccl-tests 8xH100 ~32 us at 16 KB out of a graph https://github.com/NVIDIA/nccl/issues/2094; "
        "one-shot custom all-reduce 4-8 us https://github.com/sgl-project/sglang/pull/2904 |"
    )
    add(f"| NVLink bus bandwidth | {hw.nvlink / 1e9:.0f} GB/s | assumption (450 GB/s per direction) |")
    add(f"| bf16 FLOP rate | {hw.flops / 1e12:.0f} TFLOP/s | assumption, ~60% of the 989 TFLOP/s datasheet |")
    add(
        f"| usable memory | {hw.memory / 1e9:.0f} GB per GPU | "
        "assumption (81559 MiB less context/workspace) |"
    )
    add(
        "| bytes per weight | bf16 2, MXFP4 0.531, int4 0.516 | mxfp4.py (4 bits + E8M0 per 32), "
        "int4.py (4 bits + bf16 per 128) |"
    )
    add("")
    add(
        "Check of the model's form on published data: gpt-fast's README tensor-parallel table "
        "(8xA100-80GB, 330 W; https://github.com/pytorch-labs/gpt-fast#tensor-parallelism) fitted by "
        f"time = bytes/B + L f + 2L a: B = {fit['bw_TBps']:.2f} TB/s, f = {fit['floor_us']:.0f} us/layer, "
        f"a = {fit['allreduce_us']:.1f} us (gpt-fast runs with ENABLE_INTRA_NODE_COMM=1)."
    )
    add("")
    add("| model | W | measured ms | fitted ms |")
    add("|---|---:|---:|---:|")
    for p in fit["points"]:
        add(f"| {p['model']} | {p['W']} | {p['measured_ms']:.2f} | {p['model_ms']:.2f} |")
    add("")
    add("## Per-token time (ms), one decode step, and the all-reduce share")
    add("")
    add("`[x] no fit`: the model alone needs more than the usable memory per GPU (number still shown).")
    add("")
    keys = list(MODELS)
    add("| W | " + " | ".join(MODELS[k].name for k in keys) + " |")
    add("|---:|" + "---:|" * len(keys))
    for w in WIDTHS:
        cells = []
        for k in keys:
            r = res["models"][k]["rows"][w]
            share = f" ({r['allreduce_share']:.0%} AR)" if MODELS[k].sharded and w > 1 else ""
            cells.append(fmt_ms(r) + share)
        add(f"| {w} | " + " | ".join(cells) + " |")
    add("| GB/GPU at W=1/2/4/8 | " + " | ".join(
        "/".join(_gb(res["models"][k]["rows"][w]["gb_per_gpu"]) for w in WIDTHS) for k in keys
    ) + " |")  # fmt: skip
    add("| stops scaling (<15% per doubling) | " + " | ".join(res["models"][k]["stops"] for k in keys) + " |")
    add("| limit as W grows (floor + collectives) | " + " | ".join(
        f"{res['models'][k]['limit_ms']:.2f}" if MODELS[k].sharded else "-" for k in keys
    ) + " |")  # fmt: skip
    add("")
    add("W stops at 8 here: tp.py splits the 8 kv heads, and a 9th GPU is another node (slower collectives).")
    add("")
    add("Terms at W=8 (ms): " + "; ".join(
        f"{MODELS[k].name}: bytes {res['models'][k]['rows'][8]['memory_ms']:.2f} + floor "
        f"{res['models'][k]['rows'][8]['floor_ms']:.2f} + collectives "
        f"{res['models'][k]['rows'][8]['comm_ms']:.2f}"
        for k in ("bf16", "mxfp4", "int4")
    ) + ".")  # fmt: skip
    add("")
    add("Draft cost relative to the target's step, c = draft ms / target ms:")
    add("")
    add("| W | MXFP4 | int4 | tiny | tiny, full head | 1B |")
    add("|---:|---:|---:|---:|---:|---:|")
    for w in WIDTHS:
        t = res["models"]["bf16"]["rows"][w]["ms"]
        cs = [res["models"][k]["rows"][w]["ms"] / t for k in ("mxfp4", "int4", "tiny", "tiny_full", "1b")]
        add(f"| {w} | " + " | ".join(f"{c:.2f}" for c in cs) + " |")
    add("")
    add("## Expected speedup over the bf16 target at the same W (cost_model.expected_speedup)")
    add("")
    add(
        "Best k per level searched (k0 <= 12, k1 <= 8); verify = a forward over k+1 tokens, same model. "
        "`no fit`: target + drafts exceed the memory per GPU. ms/token = the stack's time per emitted token."
    )
    for sc_name, sc in res["speedups"].items():
        add("")
        add(f"### Acceptance: {sc_name}")
        add("")
        add(f"Source: {sc['source']}.")
        add("")
        names = [n for n in next(iter(sc["by_width"].values())) if n != "target_ms"]
        add("| W | target ms | " + " | ".join(names) + " |")
        add("|---:|---:|" + "---|" * len(names))
        for w, e in sc["by_width"].items():
            cells = []
            for n in names:
                v = e[n]
                if "k" in v:
                    cell = f"{v['speedup']:.2f}x k={v['k']} ({v['ms_per_token']:.1f} ms)"
                    cells.append(cell if v["fits"] else f"[{cell}] no fit")
                else:
                    cells.append(f"{v['speedup']:.2f}x")
            add(f"| {w} | {e['target_ms']:.1f} | " + " | ".join(cells) + " |")
    add("")
    add("## Sensitivity at W=8 (paper-like acceptance): all-reduce latency x per-layer floor")
    add("")
    add(
        "| floor us/layer | all-reduce us | target ms | c MXFP4 | c 1B | SD>MXFP4 | SD>1B "
        "| ML>MXFP4>tiny (k) |"
    )
    add("|---:|---:|---:|---:|---:|---:|---:|---|")
    for s in sens:
        add(
            f"| {s['floor_us']} | {s['allreduce_us']} | {s['target_ms']:.1f} | {s['c_mxfp4']:.2f} | "
            f"{s['c_1b']:.2f} | {s['sd_mxfp4']:.2f}x | {s['sd_1b']:.2f}x | "
            f"{s['ml_mxfp4_tiny']:.2f}x {s['ml_k']} |"
        )
    add("")
    add("## The MXFP4 level with faster kernels (paper-like acceptance)")
    add("")
    add("| W | MXFP4 kernels | TB/s | c MXFP4 | SD>MXFP4 | ML>MXFP4>tiny | ML>MXFP4>1B |")
    add("|---:|---|---:|---:|---:|---:|---:|")
    for q in qsens:
        add(
            f"| {q['W']} | {q['kernels']} | {q['bw_quant_TBps']:.2f} | {q['c_mxfp4']:.2f} | "
            f"{q['sd_mxfp4']:.2f}x | {q['ml_mxfp4_tiny']:.2f}x | {q['ml_mxfp4_1b']:.2f}x |"
        )
    add("")
    add("## Caveats")
    add("")
    for c in CAVEATS:
        add(f"- {c}")
    add("")
    add("## Measuring instead of modelling (a GPU session)")
    add("")
    add("```")
    add(
        "python scripts/tp_projection.py --measure --device cuda --widths 1,2,4,8 --formats bf16,mxfp4,int4 "
        "--layers 4 --iters 50 --out results/tp_shard_h100"
    )
    add(
        "python scripts/tp_projection.py --measured-shard-ms results/tp_shard_h100.json "
        "--out results/tp_projection_measured"
    )
    add("```")
    add("")
    add(
        "The first times `--layers` random 70B layer shards (shapes divided by W as tp.py divides them, "
        "KV cache of --context tokens, torch.compile with CUDA graphs) and the vocab/W head shard on one "
        "GPU; the second replaces the bandwidth model and floor by those times and keeps the modelled "
        "collectives."
    )
    return "\n".join(L) + "\n"


CAVEATS = [
    "Every number is a model: bytes/bandwidth + a per-layer floor + collective latencies, calibrated "
    "on gpt-fast runs (H100 anchors for bandwidth and floor, its A100 table for the form). Nothing "
    "here ran on 2-8 GPUs.",
    "The floor (58 us/layer) is gpt-fast's stack (torch.compile + CUDA graphs). Our model.py in eager "
    "mode is far slower per layer; a TensorRT-LLM-class stack is faster (the sensitivity table's "
    "15-30 us rows). The floor does not shrink with W: at W=8 it is as large as the bytes term.",
    "Quantized GEMV bandwidth comes from gpt-fast's int8 kernel, not from our MXFP4/int4 Triton "
    "kernels, which have not been timed on a GPU yet (--measure does that); the MXFP4 table shows "
    "kernels as fast as bf16 per byte too.",
    "The all-reduce latency is taken as independent of W (published small-message figures move by a "
    "few us from TP=2 to TP=8) and of the message size up to the ~150 KB of a 9-token verify (the "
    "bandwidth term adds <1 us). tp.py calls NCCL: 18 us is its case; a one-shot custom all-reduce "
    "(~6 us) is the obvious next step.",
    "The MXFP4 draft is as deep as the target: it pays the same 80-layer floor and the same 160 "
    "all-reduces, so its cost relative to the target rises with W, while a replicated small draft's "
    "absolute cost stays fixed.",
    "Verify forwards over k+1 tokens are costed by the roofline (memory-bound up to ~16 tokens here); "
    "wide 4-bit verifies are compute-bound on Hopper (SpecMQuant), which this does not model.",
    "Acceptance is i.i.d. per token (cost_model's assumption). The measured scenario comes from a "
    "135M model on the CPU, and the 1B draft reuses the tiny's numbers; the paper-like one is an "
    "assumption, and 0.6 for a 4-layer, 576-wide draft of a 70B target is generous.",
    "Sampling, bookkeeping and host syncs between forwards, and prefill, are not counted; nor is a "
    "draft's KV-cache catch-up after all k tokens are accepted. They weigh most on the tiny draft, "
    "whose modelled step is only 0.25 ms.",
]


# --- measuring one layer shard on one device ----------------------------------------------------


def _random_packed(linear, fmt: str, device):
    """A quantized layer with random codes and scales: the timing does not depend on the values."""
    import torch

    from int4 import Int4Linear
    from mxfp4 import MXFP4Linear

    n, k = linear.out_features, linear.in_features
    if fmt == "mxfp4":
        layer = MXFP4Linear(k, n, device=device)
        layer.scales.random_(119, 127)  # E8M0 2^-8 .. 2^-1; 255 would be NaN
    else:
        layer = Int4Linear(k, n, device=device)
        layer.scales.copy_(
            torch.rand_like(layer.scales, dtype=torch.float32).mul_(0.01).to(layer.scales.dtype)
        )
    layer.codes.random_(0, 256)
    return layer


def build_shard(world: int, fmt: str, n_layers: int, context: int, device, dtype):
    """n_layers TransformerBlocks with one rank's shapes of the 70B at width `world`, with KV caches,
    and the head shard (vocab/world rows)."""
    import torch
    import torch.nn as nn

    from model import KVCache, ModelArgs, TransformerBlock

    c = PRESETS[TARGET]
    args = ModelArgs(
        dim=c["dim"], n_head=c["n_head"] // world, n_local_heads=c["n_local_heads"] // world,
        head_dim=c["dim"] // c["n_head"], intermediate_size=c["intermediate_size"] // world,
        vocab_size=math.ceil(c["vocab_size"] / world), rope_base=c["rope_base"], block_size=context + 64,
    )  # fmt: skip
    with torch.device("meta"):
        blocks = nn.ModuleList(TransformerBlock(args) for _ in range(n_layers))
        head = nn.Linear(args.dim, args.vocab_size, bias=False)
    blocks, head = blocks.to(dtype).to_empty(device=device), head.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for p in [*blocks.parameters(), *head.parameters()]:
            p.normal_(0, 0.02) if p.dim() >= 2 else p.fill_(1.0)
    if fmt != "bf16":
        for block in blocks:
            for name, mod in list(block.named_modules()):
                if isinstance(mod, nn.Linear):
                    block.set_submodule(name, _random_packed(mod, fmt, device))
        head = _random_packed(head, fmt, device)
    for block in blocks:
        block.attention.kv_cache = KVCache(1, context + 1, args.n_local_heads, args.head_dim, dtype, device)
    return args, blocks.eval().requires_grad_(False), head.eval().requires_grad_(False)


def _time(fn, iters: int, device) -> float:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up (and compilation)
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(args) -> dict:
    """Seconds per layer shard and per head shard, one token over a KV cache of args.context tokens."""
    import platform

    import torch

    from model import rope_table

    device, dtype = torch.device(args.device), torch.bfloat16
    compile_ = args.compile if args.compile is not None else device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    out = dict(
        kind="tp_shard_ms", device=str(device), device_name=name,
        torch=torch.__version__, target=TARGET, context=args.context, layers_stacked=args.layers,
        iters=args.iters, compiled=compile_, ms_per_layer={}, head_ms={},
    )  # fmt: skip
    for fmt in args.formats.split(","):
        for w in [int(x) for x in args.widths.split(",")]:
            margs, blocks, head = build_shard(w, fmt, args.layers, args.context, device, dtype)
            pos = torch.tensor([args.context], device=device)
            freqs = rope_table(margs, args.context + 1, device)[pos]
            mask = torch.ones(1, args.context + 1, dtype=torch.bool, device=device)
            x = torch.randn(1, 1, margs.dim, device=device, dtype=dtype)

            def layers_fwd(x=x, blocks=blocks, freqs=freqs, pos=pos, mask=mask):
                h = x
                for b in blocks:
                    h = b(h, freqs, pos, mask)
                return h

            def head_fwd(x=x, head=head):
                return head(x)

            if compile_:
                layers_fwd = torch.compile(layers_fwd, mode="reduce-overhead", fullgraph=True)
                head_fwd = torch.compile(head_fwd, mode="reduce-overhead", fullgraph=True)
            with torch.inference_mode():
                per_layer = _time(layers_fwd, args.iters, device) / args.layers
                per_head = _time(head_fwd, args.iters, device)
            out["ms_per_layer"].setdefault(fmt, {})[str(w)] = per_layer * 1e3
            out["head_ms"].setdefault(fmt, {})[str(w)] = per_head * 1e3
            print(f"{fmt} W={w}: {per_layer * 1e3:.3f} ms/layer, head {per_head * 1e3:.3f} ms", flush=True)
            del blocks, head, layers_fwd, head_fwd
            torch._dynamo.reset()  # one compiled graph per shape; also frees the CUDA-graph pools
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def load_measured(path: Path) -> tuple[dict, str]:
    """{(fmt, W): {"layer_s", "head_s"}} from a --measure record."""
    rec = json.loads(path.read_text())
    if rec.get("kind") != "tp_shard_ms":
        raise ValueError(f"{path} is not a --measure record")
    note = ""
    if not rec["device"].startswith("cuda"):
        note = " (NOT a GPU: these rows are no H100 projection)"
        print(f"WARNING: {path} was measured on {rec['device']}, not a GPU: not an H100 projection")
    out = {}
    for fmt, by_w in rec["ms_per_layer"].items():
        for w, ms in by_w.items():
            out[(fmt, int(w))] = dict(layer_s=ms / 1e3, head_s=rec["head_ms"][fmt][w] / 1e3)
    where = f"{rec.get('device_name') or '?'}, {rec['device']}, context {rec['context']}"
    return out, f"{path.name}: {where}, compiled {rec['compiled']}{note}"


# --- main ---------------------------------------------------------------------------------------


def plot(res: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, m in MODELS.items():
        ys = [res["models"][k]["rows"][w]["ms"] for w in WIDTHS]
        a.plot(WIDTHS, ys, marker="o", label=m.name, linestyle="-" if m.sharded else "--")
    a.set(xscale="log", yscale="log", xlabel="tensor-parallel width W (H100s)", ylabel="ms / token")
    a.set_xticks(WIDTHS, [str(w) for w in WIDTHS])
    a.minorticks_off()
    a.set_title("one decode step (projection; bf16 target fits from W=2)")
    a.legend(fontsize=7)
    stacks = ("SD > MXFP4", "SD > tiny", "SD > 1B", "ML > MXFP4 > tiny", "ML > MXFP4 > 1B")
    colors = dict(zip(stacks, ("C0", "C1", "C2", "C3", "C4")))
    for sc_name, sc in res["speedups"].items():
        style = "-" if "paper" in sc_name else ":"
        for name in stacks:
            ys = [sc["by_width"][w][name]["speedup"] for w in WIDTHS]
            label = f"{name} ({sc_name.split(' (')[0]})"
            b.plot(WIDTHS, ys, marker="o", linestyle=style, color=colors[name], label=label)
    b.axhline(1.0, color="grey", lw=0.8)
    b.set(xscale="log", xlabel="tensor-parallel width W (H100s)", ylabel="expected speedup over bf16 target")
    b.set_xticks(WIDTHS, [str(w) for w in WIDTHS], minor=False)
    b.minorticks_off()
    b.set_title("best-k speedup; stacks with the MXFP4 level fit from W=4")
    b.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output prefix: PREFIX.json, PREFIX.md, PREFIX.png")
    p.add_argument("--context", type=int, default=1024, help="KV-cache tokens a step reads")
    p.add_argument("--max-seq", type=int, default=8192, help="KV-cache tokens allocated (memory check)")
    p.add_argument("--allreduce-us", type=float, default=ALLREDUCE_NCCL_S * 1e6)
    p.add_argument("--floor-us", type=float, default=None, help="override the calibrated per-layer floor")
    p.add_argument("--measured-shard-ms", type=Path, default=None, help="a --measure record to project from")
    p.add_argument("--no-plot", action="store_true")
    g = p.add_argument_group("--measure: time 70B layer shards on this device")
    g.add_argument("--measure", action="store_true")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--widths", default="1,2,4,8")
    g.add_argument("--formats", default="bf16,mxfp4,int4")
    g.add_argument("--layers", type=int, default=4, help="distinct layer shards stacked per timed forward")
    g.add_argument("--iters", type=int, default=50)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    a = p.parse_args(argv)

    if a.measure:
        import torch

        a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        rec = measure(a)
        text = json.dumps(rec, indent=1)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.with_suffix(".json").write_text(text + "\n")
        print(text)
        return rec

    hw = calibrate(a.allreduce_us * 1e-6)
    if a.floor_us is not None:
        hw = dataclasses.replace(hw, floor=a.floor_us * 1e-6)
    measured, measured_from = ({}, None)
    if a.measured_shard_ms:
        measured, measured_from = load_measured(a.measured_shard_ms)
    res = project(hw, a.context, a.max_seq, measured)
    sens, qsens = sensitivity(hw, a.context), quant_sensitivity(hw, a.context)
    fit = fit_gptfast_a100()
    md = markdown(hw, res, sens, qsens, fit, a, measured_from)
    print(md)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        record = dict(
            title="PROJECTION (not a measurement): Llama-3.1-70B tensor parallel on H100, batch 1",
            hardware=dataclasses.asdict(hw), hbm_peak=HBM_PEAK, bytes_per_weight=BYTES_PER_WEIGHT,
            context=a.context, max_seq=a.max_seq, measured_from=measured_from,
            shapes={k: dict(dataclasses.asdict(m.shape), fmt=m.fmt, sharded=m.sharded)
                    for k, m in MODELS.items()},
            gptfast_a100_fit=fit, sensitivity_w8=sens, mxfp4_kernel_sensitivity=qsens, caveats=CAVEATS, **res,
        )  # fmt: skip
        a.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        a.out.with_suffix(".md").write_text(md)
        if not a.no_plot:
            plot(res, a.out.with_suffix(".png"))
    return res


if __name__ == "__main__":
    main()
