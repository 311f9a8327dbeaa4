"""EAGLE-style feature heads: a one-layer draft that reads the hidden states of the level above it.

EAGLE (Li et al. 2024; EAGLE-2 grows its drafts into dynamic trees) drafts with one decoder layer. To
predict token t+1 it reads two things at position t: the *feature* f[t-1] of the level it drafts for
(that model's final-normed hidden state, the vector its output head reads) and the embedding of token
t. One linear (`fc`) maps the pair to `dim`, one Llama decoder layer with its own KV cache mixes in the
earlier positions, and the result is a prediction of f[t]; the verifier's own output head (or its
frequent-token rows, FR-Spec) turns it into q. Past the positions the verifier has computed, the head
reads its own predicted features instead (feature-level autoregression): that is how it drafts k
tokens with k cheap steps.

The layout is EAGLE-1/2's, so that their published heads load (checkpoint.load_eagle_head): `fc` has a
bias, and the decoder layer has no input norm (EAGLE's layer 0 skips it: its input is fc's output, not
a residual stream). Features are normed, as the output head wants them, so the head's prediction goes
to the output head directly.

HeadLevel makes a head a decoding level: the recursion in speculate.py sees one more q. It is always
right below the level whose features it reads (Speculation checks), and Speculation tells it, before
each of its forwards, how many leading positions of the shared buffer that level's features describe
(`known`): the rest may hold rejected drafts.
"""

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from model import Attention, FeedForward, KVCache, ModelArgs, RMSNorm, rope_table
from tiny import SubsetHead

HEAD_ARTIFACT = Path(__file__).resolve().parent / "heads" / "smollm2-135m-head.pth"
FORMAT = "specqd-feature-head-v1"


class FeatureHead(nn.Module):
    """fc(embedding of token t, feature t-1) -> one decoder layer -> predicted feature t.
    `tok_embeddings` and `output` are the verifier's (shared, not stored with the head)."""

    def __init__(self, config: ModelArgs, tok_embeddings: nn.Module, output: nn.Module, fc_bias: bool = True):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(2 * config.dim, config.dim, bias=fc_bias)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)
        self.tok_embeddings, self.output = tok_embeddings, output
        self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype=None):
        device = self.fc.weight.device
        c = self.config
        self.max_seq_length = max_seq_length
        self.attention.kv_cache = KVCache(
            max_batch_size, max_seq_length, c.n_local_heads, c.head_dim, dtype or self.fc.weight.dtype, device
        )
        self.register_buffer("freqs_cis", rope_table(c, max_seq_length, device), persistent=False)
        causal = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, idx: Tensor, features: Tensor, input_pos=None, mask=None, positions=None) -> Tensor:
        """idx [B, T] tokens t, features [B, T, dim] the features at t-1: predicted features at t. The
        cache arguments are Transformer.forward's (input_pos: cache slots; mask; RoPE positions)."""
        x = self.fc(torch.cat([self.tok_embeddings(idx), features.to(self.fc.weight.dtype)], dim=-1))
        if input_pos is None:
            freqs = rope_table(self.config, idx.shape[1], idx.device)
        else:
            freqs = self.freqs_cis[input_pos if positions is None else positions]
            if mask is None:
                mask = self.causal_mask[input_pos]
        h = x + self.attention(x, freqs, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def logits(self, features: Tensor) -> Tensor:
        return self.output(features.to(self.fc.weight.dtype))


def head_args(config: ModelArgs, **changes) -> ModelArgs:
    """The head's layer: the verifier's shapes (attention, MLP, RoPE), one layer."""
    return dataclasses.replace(config, n_layer=1, **changes)


def save_head(head: FeatureHead, path, meta=None):
    """The head's own weights (not the shared embedding and output head), the FR-Spec ids of its
    output rows, and the settings it was trained with."""
    own = {
        n: t.detach().cpu()
        for n, t in head.state_dict().items()
        if not n.startswith(("tok_embeddings", "output"))
    }
    ids = getattr(head.output, "ids", None)
    blob = {
        "format": FORMAT,
        "config": dataclasses.asdict(head.config),
        "state": own,
        "subset_ids": None if ids is None else ids.cpu().to(torch.int32),
        "meta": meta or {},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)


def load_head(verifier, path=None) -> FeatureHead:
    """The trained head for `verifier` (a Transformer: the model whose features it reads), in the
    verifier's dtype and device, sharing its embedding and (the subset rows of) its output head."""
    path = Path(path) if path is not None else HEAD_ARTIFACT
    if not path.exists():
        raise FileNotFoundError(f"feature head artifact not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} artifact (written by scripts/train_head.py)")
    args = ModelArgs(**blob["config"])
    cfg = verifier.config
    if (args.dim, args.vocab_size) != (cfg.dim, cfg.vocab_size):
        raise ValueError(
            f"{path}: the head reads features of dim {args.dim} and drafts over {args.vocab_size} ids; "
            f"this model has dim {cfg.dim} and {cfg.vocab_size} ids"
        )
    weight = verifier.output.weight
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError("load_head needs the verifier's unquantized output head: load it before casting")
    ids = blob["subset_ids"]
    output = verifier.output if ids is None else SubsetHead(weight, ids.long())
    head = FeatureHead(args, verifier.tok_embeddings, output, fc_bias="fc.bias" in blob["state"])
    result = head.load_state_dict(blob["state"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("tok_embeddings", "output"))]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: missing weights {missing}, unexpected {result.unexpected_keys}")
    dtype, device = verifier.tok_embeddings.weight.dtype, verifier.tok_embeddings.weight.device
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)


def head_bytes(head: FeatureHead) -> int:
    """Bytes one draft step reads: the head's own weights and its output rows (not the embedding)."""
    own = [p for n, p in head.named_parameters() if not n.startswith(("tok_embeddings", "output"))]
    out = list(head.output.parameters())
    return sum(t.numel() * t.element_size() for t in own + out)


class HeadLevel:
    """A FeatureHead as a decoding level, reading the features of `above` (a speculate.ModelLevel).

    forward(tokens, start_pos, last) and forward_tree(tokens, slots, positions, mask) are ModelLevel's.
    A position t is computed from the feature of the slot before it (t-1 in a sequence, the parent
    node in a tree): the verifier's when it holds it (slot < known), else the head's own prediction.
    Positions computed from predictions are recomputed from the verifier's features once it has them
    (after the round that verified them), as EAGLE does: `true_upto` tracks how far the head's cache
    rests on the verifier's features only.
    """

    def __init__(self, head: FeatureHead, above, name: str = "head"):
        self.model, self.name = head, name
        self.device = head.fc.weight.device
        self.max_seq_length = 0
        self.known = 0  # set by Speculation before every forward
        self.bind(above)

    def bind(self, above):
        """Read the features of `above` (a ModelLevel of a model as wide as the head)."""
        if self.model.config.dim != above.model.config.dim:
            raise ValueError(
                f"head {self.name}: its features have dim {self.model.config.dim} but level {above.name} "
                f"has {above.model.config.dim}"
            )
        self.above, self.vocab_size = above, above.vocab_size
        above.keep_features = True

    def reset(self, max_seq_length: int):
        if max_seq_length > self.max_seq_length:
            self.model.setup_caches(1, max_seq_length)
            self.max_seq_length = max_seq_length
            dim = self.model.config.dim
            self.pred = torch.zeros(max_seq_length, dim, dtype=self.model.fc.weight.dtype, device=self.device)
            self.toks = torch.zeros(max_seq_length, dtype=torch.long, device=self.device)
        self.true_upto = 0

    @torch.no_grad()
    def forward(self, tokens: Tensor, start_pos: int, last: int | None = None) -> Tensor:
        end = start_pos + tokens.numel()
        self.toks[start_pos:end] = tokens
        start = min(start_pos, self.true_upto)  # positions that rested on predicted features
        slots = torch.arange(start, end, device=self.device)
        h = self._run(self.toks[start:end], slots, slots - 1, None)
        self.true_upto = max(start, min(end, self.known + 1))
        n = end - start_pos if last is None else last
        return self.model.logits(h[-n:]).float()

    @torch.no_grad()
    def forward_tree(self, tokens: Tensor, slots: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        # A node's parent is the latest slot before its own that it sees (its ancestors sit in
        # earlier slots; in a sequence that is the slot before).
        S = mask.shape[-1]
        idx = torch.arange(S, device=self.device)
        before = mask & (idx[None, :] < slots[:, None])
        parents = torch.where(before, idx, -1).max(dim=-1).values
        self.toks[slots] = tokens
        self.true_upto = min(self.true_upto, int(slots.min()))
        return self.model.logits(self._run(tokens, slots, parents, mask, positions)).float()

    def _run(self, tokens, slots, parents, mask, positions=None) -> Tensor:
        """The head over rows that may depend on each other: a row whose parent is computed in this
        same forward from a prediction waits for it, so rows go in waves (a catch-up over verified
        positions is one wave; drafting past them is one row per wave)."""
        T, out = tokens.numel(), []
        par, sl = parents.tolist(), slots.tolist()
        i = 0
        while i < T:
            j, wave = i + 1, {sl[i]}
            while j < T and not (par[j] >= self.known and par[j] in wave):
                wave.add(sl[j])
                j += 1
            p = parents[i:j]
            # The verifier's rows only where it has them (its cache may have no scratch slots).
            true = self.above.features[torch.where(p < self.known, p, 0).clamp(min=0)]
            feat = torch.where((p < self.known)[:, None], true.to(self.pred.dtype), self.pred[p.clamp(min=0)])
            feat = torch.where((p >= 0)[:, None], feat, torch.zeros_like(feat))
            h = self.model(
                tokens[i:j].view(1, -1),
                feat.view(1, j - i, -1),
                slots[i:j],
                None if mask is None else mask[i:j],
                None if positions is None else positions[i:j],
            )[0]
            self.pred[slots[i:j]] = h
            out.append(h)
            i = j
        return torch.cat(out)

    def move_kv(self, src: Tensor, dst: Tensor):
        cache = self.model.attention.kv_cache
        cache.k_cache[:, :, dst] = cache.k_cache[:, :, src]
        cache.v_cache[:, :, dst] = cache.v_cache[:, :, src]
        self.pred[dst] = self.pred[src]
