"""The `tiny` draft level for the embedded SmolLM2-135M-Instruct: a few-layer student distilled from it.

Why a trained student: cutting the target after its first 8, 15 or 22 of 30 layers (an untrained early
exit) picks the target's greedy token only 5%, 13% and 28% of the time. A student made of a handful of
the target's own layers, fine-tuned to match the target's next-token distribution
(scripts/distill_tiny.py), does better at a fraction of the cost.

What the student is:
  - a plain `model.Transformer` with the target's shapes but `n_layer` = 4: copies of the target's
    layers 0, 1, 2 and 29 (the artifact says which), fine-tuned together with the final norm;
  - its token embedding IS the target's (the same tensor, no copy), frozen during training;
  - only the layers' deltas from their source layers ship, quantized to 4 bits (groups of 32, fp16
    scales): 14.2M trained weights in an 8.1 MB artifact, tiny/smollm2-135m-tiny.pth;
  - its output head (FR-Spec, arXiv 2502.14856) scores only the 16384 most frequent tokens of the
    training data (rows of the target's tied embedding, gathered once into a contiguous matrix): the
    head is a fifth of the target's weights, so a full-vocabulary head would make even a 1-layer draft
    cost a quarter of the target. Every other token gets logit -inf, i.e. probability exactly 0: the
    output keeps the full vocabulary, and speculative sampling stays exact (such tokens are simply
    never proposed; the target's residual covers them).

How good it is (tiny/eval.json; held-out prompts, teacher-forced on the target's greedy answers): the
draft's argmax is the target's 34% of the time (chat 25%, code 45%, summaries 22%, maths 42%; the
untrained 4-layer early exit: 5%) at about 0.15 of a target step on one CPU thread. As the only draft
on the 2-core CPU we measured it is slower than plain decoding: 20 minutes of single-core training is
far from converged.

Exactness never depends on this file: a draft only changes speed. Load it with

    from tiny import load_tiny
    draft = load_tiny(target)          # target: the Transformer from checkpoint.load_model()

before the target is quantized (the student starts from copies of the target's layer weights).
"""

import copy
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model import Transformer

ARTIFACT = Path(__file__).resolve().parent / "tiny" / "smollm2-135m-tiny.pth"
FORMAT = "specqd-tiny-v1"


class SubsetHead(nn.Module):
    """Logits for a subset of the vocabulary (`ids`, the frequent tokens); -inf for all others.

    `weight` holds the subset's rows contiguously ([len(ids), dim]): one GEMV over len(ids)/vocab of the
    full head's bytes. The output is [..., vocab_size] so that callers never see the subset."""

    def __init__(self, full_weight: Tensor, ids: Tensor):
        super().__init__()
        self.vocab_size = full_weight.shape[0]
        ids = ids.to(device=full_weight.device, dtype=torch.long)
        self.register_buffer("ids", ids, persistent=False)
        self.weight = nn.Parameter(full_weight.detach()[ids].clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.scatter(F.linear(x, self.weight))

    def scatter(self, sub: Tensor) -> Tensor:
        """Subset logits [..., len(ids)] -> [..., vocab_size], -inf outside the subset."""
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.ids, sub)


def student_from_target(target: Transformer, source_layers, subset_ids: Tensor | None) -> Transformer:
    """A student Transformer: copies of `target.layers[i]` for i in source_layers, a copy of the final
    norm, the target's embedding module itself (shared, not copied) and a head over `subset_ids` (None:
    the target's own full head, shared)."""
    args = dataclasses.replace(target.config, n_layer=len(source_layers))
    with torch.device("meta"):  # no memory: every submodule is replaced below
        student = Transformer(args)
    student.tok_embeddings = target.tok_embeddings
    layers = []
    for i in source_layers:
        layer = copy.deepcopy(target.layers[i])
        layer.attention.kv_cache = None  # never copy the target's cache
        layers.append(layer)
    student.layers = nn.ModuleList(layers)
    student.norm = copy.deepcopy(target.norm)
    if subset_ids is None:
        student.output = target.output
    else:
        student.output = SubsetHead(target.output.weight, subset_ids)
    return student


# --- storage of the trained deltas -------------------------------------------------------------------
# A weight is stored as W_student - W_target[source layer], quantized symmetrically per group of GROUP
# consecutive elements of a row: int8 or int4 values and one fp16 scale per group. The delta is small
# next to the weight, so its rounding error is a small fraction of the student's weight; norms (a few
# hundred values) are stored whole in fp32.

GROUP = 32


def quantize_delta(d: Tensor, bits: int) -> dict:
    """[rows, cols] float -> {"q": int8 (int4: two per uint8, low nibble first), "scale": fp16, ...}."""
    rows, cols = d.shape
    if cols % GROUP:
        raise ValueError(f"columns ({cols}) must be a multiple of {GROUP}")
    qmax = 2 ** (bits - 1) - 1
    g = d.float().reshape(rows, cols // GROUP, GROUP)
    scale = (g.abs().amax(-1, keepdim=True) / qmax).to(torch.float16).float()
    q = torch.where(scale > 0, g / scale.clamp(min=1e-30), torch.zeros_like(g))
    q = q.round().clamp(-qmax, qmax).to(torch.int8).reshape(rows, cols)
    if bits == 4:
        u = (q & 0xF).to(torch.uint8)
        q = u[:, 0::2] | (u[:, 1::2] << 4)
    elif bits != 8:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return {"q": q, "scale": scale.squeeze(-1).to(torch.float16), "bits": bits, "shape": [rows, cols]}


def dequantize_delta(enc: dict) -> Tensor:
    rows, cols = enc["shape"]
    q = enc["q"]
    if enc["bits"] == 4:
        lo = (q & 0xF).to(torch.int8)
        hi = (q >> 4).to(torch.int8)
        q = torch.stack([lo, hi], dim=-1).reshape(rows, cols)
        q = torch.where(q > 7, q - 16, q)  # two's complement nibbles
    g = q.float().reshape(rows, cols // GROUP, GROUP) * enc["scale"].float().unsqueeze(-1)
    return g.reshape(rows, cols)


def fingerprint(target: Transformer, source_layers) -> list[float]:
    """A few sums of the target's weights: load_tiny refuses a target the student was not trained from
    (its deltas would be added to the wrong base weights)."""
    with torch.no_grad():
        sums = [float(target.tok_embeddings.weight[:256].double().abs().sum())]
        for i in source_layers:
            sums.append(float(target.layers[i].feed_forward.w2.weight.double().abs().sum()))
    return sums


def save_tiny(student: Transformer, target: Transformer, source_layers, path, bits: int = 8, meta=None):
    """Write the artifact: source layer ids, head subset ids, quantized deltas, norms, settings."""
    source_layers = list(source_layers)
    base = student_from_target(target, source_layers, None)
    base_sd = {k: v for k, v in base.state_dict().items() if not k.startswith(("tok_embeddings", "output"))}
    tensors = {}
    for name, w in student.state_dict().items():
        if name.startswith(("tok_embeddings", "output")):
            continue  # shared with the target
        w = w.detach().float().cpu()
        if w.dim() == 1:  # norms: tiny, stored whole
            tensors[name] = {"full": w.clone()}
        else:
            tensors[name] = quantize_delta(w - base_sd[name].float().cpu(), bits)
    head = student.output
    blob = {
        "format": FORMAT,
        "source_layers": source_layers,
        "subset_ids": head.ids.cpu().to(torch.int32) if isinstance(head, SubsetHead) else None,
        "target": {
            "vocab_size": target.config.vocab_size,
            "dim": target.config.dim,
            "n_layer": target.config.n_layer,
            "fingerprint": fingerprint(target, source_layers),
        },
        "tensors": tensors,
        "meta": meta or {},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)


def load_tiny(target_model: Transformer, path=None) -> Transformer:
    """The tiny draft for `target_model` (eval mode, no grad, the target's device and dtype): shares the
    target's embedding tensor; its layers are the target's source layers plus the stored deltas."""
    path = Path(path) if path is not None else ARTIFACT
    if not path.exists():
        raise FileNotFoundError(f"tiny draft artifact not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} artifact (written by scripts/distill_tiny.py)")
    want, cfg = blob["target"], target_model.config
    got = {"vocab_size": cfg.vocab_size, "dim": cfg.dim, "n_layer": cfg.n_layer}
    if any(want[k] != v for k, v in got.items()):
        raise ValueError(f"the tiny draft was trained for a target with {want}, not {got}")
    source_layers = list(blob["source_layers"])
    for layer in (target_model.layers[i] for i in source_layers):
        if not isinstance(getattr(layer.feed_forward.w2, "weight", None), Tensor):
            raise ValueError("load_tiny needs the unquantized target: call it before quantizing the target")
    fp = fingerprint(target_model, source_layers)
    # bf16 targets change these sums by ~1e-3 relative; another checkpoint changes them by far more.
    if any(abs(a - b) > 1e-2 * abs(b) for a, b in zip(fp, want["fingerprint"])):
        raise ValueError("the tiny draft was distilled from another checkpoint than this target")
    ids = blob["subset_ids"]
    student = student_from_target(target_model, source_layers, None if ids is None else ids.long())
    params = dict(student.named_parameters())
    with torch.no_grad():
        for name, enc in blob["tensors"].items():
            p = params[name]
            if "full" in enc:
                p.copy_(enc["full"])
            else:
                p.add_(dequantize_delta(enc).to(device=p.device, dtype=p.dtype))
    return student.eval().requires_grad_(False)
