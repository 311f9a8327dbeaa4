"""On paper: per-token decode time of Llama-3.1-70B and its drafts under tensor parallelism on 1-8 H100s,
and the speedup multi-level speculation should give at each width. A PROJECTION, not a measurement.

    python scripts/tp_projection.py --out results/tp_projection           # seconds, CPU, no GPU
    python scripts/tp_projection.py --allreduce-us 6 --out /tmp/oneshot   # a one-shot all-reduce
    python scripts/tp_projection.py --measure --device cuda --out results/tp_shard_h100   # time shards
    python scripts/tp_projection.py --measured-shard-ms results/tp_shard_h100.json --out ...  # use them

The model. One decode step (T tokens, batch 1) of a model sharded W ways as tp.py shards it:
    time = max(bytes read per rank / HBM bandwidth, FLOPs per rank / FLOP rate)     weights + KV cache
         + n_layer * per-layer floor                    kernel launches and small kernels, CUDA graphs
         + 2 * n_layer * all_reduce(W, T * dim * 2 bytes)    wo and w2 are row-parallel (tp.py)
         + all_gather(W, T * vocab * 2 bytes)                the vocabulary-parallel head (tp.py)
with all_reduce(W, m) = latency + m * 2(W-1)/W / NVLink bus bandwidth (all_gather: (W-1)/W), and no
collective at W = 1; a replicated draft runs whole on every rank. The speedup is the cost model
(bench_lib.expected_speedup, best k per level) fed with these times. Constants, their sources, the
models, stacks and assumed acceptance are in data/tp_projection.json.

--measure times one 70B layer shard per width on ONE device (shapes divided by W as tp.py divides
them, the head's vocab/W rows, a KV cache of --context tokens, CUDA graphs on CUDA) and writes its
JSON after every measurement; --measured-shard-ms then uses n_layer * (ms per layer) + the head in
place of the bandwidth model and floor, and still adds the modelled collectives.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import bench_lib
from model import PRESETS, ModelArgs

DATA = json.loads((bench_lib.DATA / "tp_projection.json").read_text())
ROOT = bench_lib.DATA.parent
WIDTHS = tuple(DATA["widths"])
HW, BPW = {k: v["value"] for k, v in DATA["hardware"].items()}, DATA["bytes_per_weight"]
ACT_BYTES = 2  # bf16 activations, logits and KV cache


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
    tied: bool  # the head is the embedding matrix (held once)

    @classmethod
    def of(cls, spec: dict) -> Shape:
        """A model.PRESETS shape with spec's "changes" (ModelArgs fields) and "head_rows"."""
        a = ModelArgs(**(PRESETS[spec["preset"]] | spec.get("changes", {})))
        return cls(a.n_layer, a.dim, a.n_head, a.n_local_heads, a.head_dim, a.intermediate_size,
                   a.vocab_size, spec.get("head_rows", a.vocab_size), a.tie_embeddings)  # fmt: skip

    def layer_weights(self) -> int:
        qkv = self.dim * (self.n_head + 2 * self.n_kv) * self.head_dim
        return qkv + self.n_head * self.head_dim * self.dim + 3 * self.dim * self.ffn

    def weights(self) -> int:
        """Weights one step reads: every layer and the head (the embedding gives one row: not counted)."""
        return self.n_layer * self.layer_weights() + self.head_rows * self.dim

    def kv_bytes(self, context: int) -> int:
        return 2 * self.n_layer * self.n_kv * self.head_dim * context * ACT_BYTES


@dataclass(frozen=True)
class Model:
    name: str
    shape: Shape
    fmt: str  # bf16 | mxfp4 | int4
    sharded: bool  # tp.py-sharded (collectives) or replicated (none)
    owns_embedding: bool = True  # a draft cast from the target shares the target's embedding


MODELS = {
    k: Model(m["name"], Shape.of(m), m["fmt"], m["sharded"], m.get("owns_embedding", True))
    for k, m in DATA["models"].items()
}


@dataclass(frozen=True)
class Hardware:
    bw: float  # achieved HBM bandwidth of bf16 GEMV, bytes/s
    bw_quant: float  # ... of weight-only quantized GEMV (dequantization in registers)
    floor: float  # seconds per layer that do not shrink with bytes: launches, norms, small kernels
    allreduce: float  # seconds, latency of one small all-reduce (and of the head's all-gather)
    nvlink: float = HW["nvlink_bus_bw"]
    flops: float = HW["flops_bf16"]
    memory: float = HW["usable_memory"]


def calibrate(allreduce: float) -> Hardware:
    """B and f with time = bytes / B + n_layer * f through the two bf16 anchors, and the quantized
    bandwidth from the int8 anchor less the floor (bytes as bench_gptfast.py counts them)."""
    anchors = DATA["anchors"]
    b8, b1 = Shape.of({"preset": "llama-3.1-8b"}).weights(), MODELS["1b"].shape.weights()
    (x1, l1, t1), (x2, l2, t2) = (
        (2.0 * b8, 32, anchors["llama-3.1-8b bf16"]),
        (2.0 * b1, 16, anchors["llama-3.2-1b bf16"]),
    )
    inv_b = (t1 * l2 - t2 * l1) / (x1 * l2 - x2 * l1)
    floor = (t1 - x1 * inv_b) / l1
    bw_quant = BPW["int8"] * b8 / (anchors["llama-3.1-8b int8"] - 32 * floor)
    return Hardware(bw=1 / inv_b, bw_quant=bw_quant, floor=floor, allreduce=allreduce)


def fit_gptfast_a100() -> dict:
    """Least squares of time = bytes/B + L*f + 2L*allreduce (W > 1) on gpt-fast's A100 table: the check
    that these three terms explain published tensor-parallel scaling."""
    import numpy as np

    t = DATA["gptfast_a100"]
    shapes = {k: Shape.of(v) for k, v in t["shapes"].items()}
    rows, secs = [], []
    for name, w, tok_s in t["tokens_per_s"]:
        s = shapes[name]
        rows.append(
            [
                2.0 * (s.n_layer * s.layer_weights() / w + s.head_rows * s.dim),
                s.n_layer,
                2 * s.n_layer * (w > 1),
            ]
        )
        secs.append(1 / tok_s)
    x, *_ = np.linalg.lstsq(np.array(rows), np.array(secs), rcond=None)
    fitted = np.array(rows) @ x
    points = [
        dict(model=n, W=w, measured_ms=1e3 / ts, model_ms=m * 1e3)
        for (n, w, ts), m in zip(t["tokens_per_s"], fitted)
    ]
    return dict(bw_TBps=1e-12 / x[0], floor_us=x[1] * 1e6, allreduce_us=x[2] * 1e6, points=points)


def collective(hw: Hardware, world: int, nbytes: float, traffic: float) -> float:
    """Latency + bandwidth term of one collective; traffic is 2(W-1)/W (all-reduce) or (W-1)/W."""
    return 0.0 if world == 1 else hw.allreduce + nbytes * traffic / hw.nvlink


def forward(model: Model, world: int, tokens: int, hw: Hardware, context: int, measured=None) -> dict:
    """Seconds of one T-token forward on one rank, split into its terms. `measured` {fmt, W: layer_s,
    head_s} from --measure replaces the bandwidth model and the floor of a sharded model."""
    s, w = model.shape, (world if model.sharded else 1)
    shard = (measured or {}).get((model.fmt, world)) if model.sharded else None
    bw = hw.bw if model.fmt == "bf16" else hw.bw_quant
    flops = (2 * s.weights() + 4 * s.n_layer * s.n_head * s.head_dim * context) * tokens / w
    if shard is not None:
        memory, floor = s.n_layer * shard["layer_s"] + shard["head_s"], 0.0
    else:
        memory = max(
            s.weights() * BPW[model.fmt] / w / bw + s.kv_bytes(context) / w / hw.bw, flops / hw.flops
        )
        floor = s.n_layer * hw.floor
    comm = 0.0
    if w > 1:
        comm += 2 * s.n_layer * collective(hw, w, tokens * s.dim * ACT_BYTES, 2 * (w - 1) / w)
        comm += collective(hw, w, tokens * s.vocab * ACT_BYTES, (w - 1) / w)
    return dict(
        total=memory + floor + comm, memory=memory, floor=floor, comm=comm, measured=shard is not None
    )


def memory_per_gpu(model: Model, world: int, max_seq: int) -> float:
    """Bytes one rank holds: its share of the weights and KV cache, plus the replicated embedding."""
    s, w = model.shape, (world if model.sharded else 1)
    embedding = s.vocab * s.dim * ACT_BYTES if model.owns_embedding and not s.tied else 0
    return s.weights() * BPW[model.fmt] / w + embedding + s.kv_bytes(max_seq) / w


def stack_speedup(keys: list[str], accept: list[float], world, hw, context, measured=None, ks=None):
    """(speedup, ks) of a stack over its target alone: the best over k (k0 <= 12, k1 <= 8), or at ks.
    A verify is the level's forward over k + 1 tokens: its one-token step plus what the extra tokens add."""
    levels = [MODELS[k] for k in keys]
    step = [forward(m, world, 1, hw, context, measured)["total"] for m in levels]

    def verify(i: int, k: int) -> float:
        extra = (
            forward(levels[i], world, k + 1, hw, context)["total"]
            - forward(levels[i], world, 1, hw, context)["total"]
        )
        return step[i] + extra

    if ks is not None:
        return bench_lib.expected_speedup(step, [verify(i, k) for i, k in enumerate(ks)], accept, ks), ks
    return bench_lib.best_k(step, verify, accept)


def scenarios() -> dict:
    """Acceptance per link (level above > level below), from data/tp_projection.json, and the measured
    scenario when its record exists."""
    out = dict(DATA["acceptance"])
    m = DATA["measured_acceptance"]
    path = ROOT / m["record"]
    if path.exists():
        rows = {(r["config"], r["temperature"]): r["accept"] for r in json.loads(path.read_text())["rows"]}
        try:
            links = {link: rows[c, t][i] for link, (c, t, i) in m["links"].items()}
            out = {"measured (SmolLM2-135M, CPU, T=0)": dict(source=m["record"], **links)} | out
        except KeyError:
            pass
    return out


def link_accept(sc: dict, keys: list[str]) -> list[float]:
    return [sc[f"{a}>{b}"] for a, b in zip(keys, keys[1:])]


def project(hw: Hardware, context: int, max_seq: int, measured: dict) -> dict:
    per_model = {}
    for key, m in MODELS.items():
        rows = {}
        for w in WIDTHS:
            f, mem = forward(m, w, 1, hw, context, measured), memory_per_gpu(m, w, max_seq)
            rows[w] = {f"{t}_ms": f[t] * 1e3 for t in ("memory", "floor", "comm")} | dict(
                ms=f["total"] * 1e3, allreduce_share=f["comm"] / f["total"], gb_per_gpu=mem / 1e9,
                fits=mem <= hw.memory, measured=f["measured"],
            )  # fmt: skip
        per_model[key] = dict(name=m.name, rows=rows)
    speedups = {}
    for sc_name, sc in scenarios().items():
        by_width = {}
        for w in WIDTHS:
            entry = {"target_ms": per_model["bf16"]["rows"][w]["ms"]}
            for name, st in DATA["stacks"].items():
                keys = st["levels"]
                sp, ks = stack_speedup(keys, link_accept(sc, keys), w, hw, context, measured, st.get("k"))
                fits = sum(memory_per_gpu(MODELS[k], w, max_seq) for k in keys) <= hw.memory
                entry[name] = dict(speedup=sp, k=ks, ms_per_token=entry["target_ms"] / sp, fits=fits)
            by_width[w] = entry
        speedups[sc_name] = dict(source=sc["source"], by_width=by_width)
    return dict(models=per_model, speedups=speedups)


def sensitivity(base: Hardware, context: int) -> list[dict]:
    """At W = 8, paper-like acceptance: how the per-layer floor and the all-reduce latency move it."""
    sc = DATA["acceptance"]["paper-like (assumption)"]
    out = []
    for floor_us in (15, 30, round(base.floor * 1e6)):
        for ar_us in (5, 10, 20, 40):
            hw = dataclasses.replace(base, floor=floor_us * 1e-6, allreduce=ar_us * 1e-6)
            row = dict(
                floor_us=floor_us,
                allreduce_us=ar_us,
                target_ms=forward(MODELS["bf16"], 8, 1, hw, context)["total"] * 1e3,
            )
            for name, st in DATA["stacks"].items():
                if "k" not in st:
                    row[name] = stack_speedup(st["levels"], link_accept(sc, st["levels"]), 8, hw, context)
            out.append(row)
    return out


def markdown(hw: Hardware, res: dict, sens: list[dict], fit: dict, a, measured_from) -> str:
    table, f2 = bench_lib.markdown_table, lambda x: f"{x:.2f}"
    used = dict(
        HW,
        nvlink_bus_bw=hw.nvlink,
        flops_bf16=hw.flops,
        usable_memory=hw.memory,
        allreduce_nccl_s=hw.allreduce,
    )
    constants = [
        ["achieved bf16 GEMV bandwidth", f"{hw.bw / 1e12:.2f} TB/s", DATA["anchors"]["_source"]],
        ["per-layer floor", f"{hw.floor * 1e6:.0f} us", "the same solve (or --floor-us)"],
        [
            "quantized GEMV bandwidth",
            f"{hw.bw_quant / 1e12:.2f} TB/s",
            "the int8 anchor (or --bw-quant-tbps)",
        ],
    ]
    for key, c in DATA["hardware"].items():
        constants.append([c["label"], f"{used[key] / c['scale']:.3g} {c['unit']}", c["source"]])
    bpw = ", ".join(f"{k} {v:.3g}" for k, v in BPW.items() if k[0] != "_")
    constants.append(["bytes per weight", bpw, BPW["_source"]])
    out = [
        "# Tensor-parallel projection: Llama-3.1-70B and its drafts on 1-8 H100s",
        f"**PROJECTION, not a measurement.** Batch 1, one token per step, KV cache of {a.context} tokens "
        f"read per step, memory checked for {a.max_seq} tokens. `python scripts/tp_projection.py`; inputs "
        "and sources in data/tp_projection.json.",
        f"Shard times marked `*` are measured ({measured_from}); the rest are modelled."
        if measured_from
        else "",
        "## Constants",
        table(["constant", "value", "source"], constants, "lrl"),
        f"Check of the model's form: {DATA['gptfast_a100']['_source']} Fitted by time = bytes/B + L f "
        f"+ 2L a: B = {fit['bw_TBps']:.2f} TB/s, f = {fit['floor_us']:.0f} us/layer, "
        f"a = {fit['allreduce_us']:.1f} us.",
        table(
            ["model", "W", "measured ms", "fitted ms"],
            [[p["model"], p["W"], f2(p["measured_ms"]), f2(p["model_ms"])] for p in fit["points"]],
        ),
        "## Per-token time (ms) of one decode step, and the all-reduce share",
        "`[x] no fit`: the model alone needs more than the usable memory per GPU. W stops at 8: tp.py "
        "splits the 8 kv heads, and a 9th GPU is another node.",
    ]

    def ms(k, w):
        r = res["models"][k]["rows"][w]
        c = f2(r["ms"]) + "*" * r["measured"]
        c += f" ({r['allreduce_share']:.0%} AR)" if MODELS[k].sharded and w > 1 else ""
        return c if r["fits"] else f"[{c}] no fit"

    keys = list(MODELS)
    rows = [[w] + [ms(k, w) for k in keys] for w in WIDTHS]
    rows.append(
        ["GB/GPU"]
        + ["/".join(f"{res['models'][k]['rows'][w]['gb_per_gpu']:.3g}" for w in WIDTHS) for k in keys]
    )
    out.append(table(["W"] + [MODELS[k].name for k in keys], rows))
    cost = lambda k, w: res["models"][k]["rows"][w]["ms"] / res["models"]["bf16"]["rows"][w]["ms"]  # noqa: E731
    out.append("Draft cost relative to the target's step, c = draft ms / target ms:")
    out.append(table(["W"] + keys[1:], [[w] + [f2(cost(k, w)) for k in keys[1:]] for w in WIDTHS]))
    out.append("## Expected speedup over the bf16 target at the same W (bench_lib.expected_speedup)")

    def sp(v):
        c = f"{v['speedup']:.2f}x k={v['k']} ({v['ms_per_token']:.1f} ms)"
        return c if v["fits"] else f"[{c}] no fit"

    for sc_name, sc in res["speedups"].items():
        names = list(DATA["stacks"])
        rows = [[w, f"{e['target_ms']:.1f}"] + [sp(e[n]) for n in names] for w, e in sc["by_width"].items()]
        out += [
            f"### Acceptance: {sc_name}",
            f"Source: {sc['source']}.",
            table(["W", "target ms", *names], rows),
        ]
    names = [n for n in DATA["stacks"] if n in sens[0]]
    rows = [
        [s["floor_us"], s["allreduce_us"], f"{s['target_ms']:.1f}"]
        + [f"{s[n][0]:.2f}x {s[n][1]}" for n in names]
        for s in sens
    ]
    out += [
        "## Sensitivity at W=8 (paper-like acceptance): per-layer floor x all-reduce latency",
        table(["floor us/layer", "all-reduce us", "target ms", *names], rows),
        "## Caveats",
        "\n".join(f"- {c}" for c in DATA["caveats"]),
    ]
    return "\n\n".join(x for x in out if x) + "\n"


# --- measuring one layer shard on one device ----------------------------------------------------


def build_shard(world: int, fmt: str, n_layers: int, context: int, device, dtype):
    """n_layers TransformerBlocks with one rank's shapes of the 70B at width `world`, with KV caches, and
    the head shard (vocab/world rows); random weights (random codes and scales when quantized)."""
    import torch
    import torch.nn as nn

    from int4 import Int4Linear
    from model import KVCache, TransformerBlock
    from mxfp4 import MXFP4Linear

    c = PRESETS[DATA["target"]]
    args = ModelArgs(
        dim=c["dim"], n_head=c["n_head"] // world, n_local_heads=c["n_local_heads"] // world,
        head_dim=c["dim"] // c["n_head"], intermediate_size=c["intermediate_size"] // world,
        vocab_size=math.ceil(c["vocab_size"] / world), rope_base=c["rope_base"], block_size=context + 64,
    )  # fmt: skip

    def packed(linear):
        n, k = linear.out_features, linear.in_features
        layer = (MXFP4Linear if fmt == "mxfp4" else Int4Linear)(k, n, device=device)
        if fmt == "mxfp4":
            layer.scales.random_(119, 127)  # E8M0 2^-8 .. 2^-1; 255 would be NaN
        else:
            layer.scales.copy_(torch.rand_like(layer.scales, dtype=torch.float32).mul_(0.01))
        layer.codes.random_(0, 256)
        return layer

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
                        block.set_submodule(name, packed(mod))
            head = packed(head)
    for block in blocks:
        block.attention.kv_cache = KVCache(1, context + 1, args.n_local_heads, args.head_dim, dtype, device)
    return args, blocks.eval().requires_grad_(False), head.eval().requires_grad_(False)


def measure(a) -> dict:
    """Seconds per layer shard and per head shard, one token over a KV cache of a.context tokens. The
    record is written to --out after every (format, width), so a timeout loses only the one running."""
    import torch

    from accel import accelerate
    from model import rope_table

    device, dtype = torch.device(a.device), torch.bfloat16
    compile_ = a.compile if a.compile is not None else device.type == "cuda"
    out = dict(
        kind="tp_shard_ms", device=str(device), device_name=bench_lib.environment(device)["gpu"] or "CPU",
        torch=torch.__version__, target=DATA["target"], context=a.context, layers_stacked=a.layers,
        iters=a.iters, compiled=compile_, kernels=a.kernels, ms_per_layer={}, head_ms={},
    )  # fmt: skip
    reported = False
    for fmt in a.formats.split(","):
        for w in [int(x) for x in a.widths.split(",")]:
            margs, blocks, head = build_shard(w, fmt, a.layers, a.context, device, dtype)
            for m in (blocks, head):
                report = accelerate(m, enabled=a.kernels)
            if not reported:
                print(report, flush=True)
                reported = True
            pos = torch.tensor([a.context], device=device)
            freqs = rope_table(margs, a.context + 1, device)[pos]
            mask = torch.ones(1, a.context + 1, dtype=torch.bool, device=device)
            x = torch.randn(1, 1, margs.dim, device=device, dtype=dtype)

            def layers_fwd(x=x, blocks=blocks, freqs=freqs, pos=pos, mask=mask):
                for b in blocks:
                    x = b(x, freqs, pos, mask)
                return x

            def head_fwd(x=x, head=head):
                return head(x)

            if compile_:
                layers_fwd = torch.compile(layers_fwd, mode="reduce-overhead", fullgraph=True)
                head_fwd = torch.compile(head_fwd, mode="reduce-overhead", fullgraph=True)
            with torch.inference_mode():
                per_layer = bench_lib.median_time(layers_fwd, a.iters, 3, device) / a.layers
                per_head = bench_lib.median_time(head_fwd, a.iters, 3, device)
            out["ms_per_layer"].setdefault(fmt, {})[str(w)] = per_layer * 1e3
            out["head_ms"].setdefault(fmt, {})[str(w)] = per_head * 1e3
            print(f"{fmt} W={w}: {per_layer * 1e3:.3f} ms/layer, head {per_head * 1e3:.3f} ms", flush=True)
            if a.out:
                bench_lib.write_json(Path(a.out).with_suffix(".json"), out)
            del blocks, head, layers_fwd, head_fwd
            torch._dynamo.reset()  # one compiled graph per shape; also frees the CUDA-graph pools
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def load_measured(path: Path) -> tuple[dict, str]:
    """{(fmt, W): {"layer_s", "head_s"}} from a --measure record, and where it comes from."""
    rec = json.loads(path.read_text())
    if rec.get("kind") != "tp_shard_ms":
        raise ValueError(f"{path} is not a --measure record")
    note = "" if rec["device"].startswith("cuda") else " (NOT a GPU: these rows are no H100 projection)"
    if note:
        print(f"WARNING: {path} was measured on {rec['device']}, not a GPU: not an H100 projection")
    out = {(fmt, int(w)): dict(layer_s=ms / 1e3, head_s=rec["head_ms"][fmt][w] / 1e3)
           for fmt, by_w in rec["ms_per_layer"].items() for w, ms in by_w.items()}  # fmt: skip
    where = f"{rec.get('device_name') or '?'}, {rec['device']}, context {rec['context']}"
    return out, f"{path.name}: {where}, compiled {rec['compiled']}{note}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output prefix: PREFIX.json and PREFIX.md")
    p.add_argument("--context", type=int, default=1024, help="KV-cache tokens a step reads")
    p.add_argument("--max-seq", type=int, default=8192, help="KV-cache tokens allocated (memory check)")
    p.add_argument("--allreduce-us", type=float, default=HW["allreduce_nccl_s"] * 1e6)
    p.add_argument("--floor-us", type=float, default=None, help="override the calibrated per-layer floor")
    p.add_argument("--bw-quant-tbps", type=float, default=None, help="override the quantized GEMV bandwidth")
    p.add_argument("--measured-shard-ms", type=Path, default=None, help="a --measure record to project from")
    g = p.add_argument_group("--measure: time 70B layer shards on this device")
    g.add_argument("--measure", action="store_true")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--widths", default="1,2,4,8")
    g.add_argument("--formats", default="bf16,mxfp4,int4")
    g.add_argument("--layers", type=int, default=4, help="distinct layer shards stacked per timed forward")
    g.add_argument("--iters", type=int, default=50)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="accel.accelerate")
    a = p.parse_args(argv)

    if a.measure:
        import torch

        a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return measure(a)
    hw = calibrate(a.allreduce_us * 1e-6)
    if a.floor_us is not None:
        hw = dataclasses.replace(hw, floor=a.floor_us * 1e-6)
    if a.bw_quant_tbps is not None:
        hw = dataclasses.replace(hw, bw_quant=a.bw_quant_tbps * 1e12)
    measured, measured_from = load_measured(a.measured_shard_ms) if a.measured_shard_ms else ({}, None)
    res = project(hw, a.context, a.max_seq, measured)
    sens, fit = sensitivity(hw, a.context), fit_gptfast_a100()
    md = markdown(hw, res, sens, fit, a, measured_from)
    print(md)
    record = dict(
        title="PROJECTION (not a measurement): Llama-3.1-70B tensor parallel on H100, batch 1",
        hardware=dataclasses.asdict(hw), inputs="data/tp_projection.json", context=a.context,
        max_seq=a.max_seq, measured_from=measured_from, gptfast_a100_fit=fit, sensitivity_w8=sens, **res,
    )  # fmt: skip
    bench_lib.write_outputs(a.out, record, md)
    return res


if __name__ == "__main__":
    main()
