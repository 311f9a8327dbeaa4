"""The Llama network, gpt-fast style: one ModelArgs, plain modules, read top to bottom.

This file knows nothing of checkpoints, quantization, kernels or speculation: it is plain PyTorch,
and what it says is what runs. Quantized layers replace `nn.Linear` from outside (mxfp4.py, int4.py),
and kernel-backed twins of these modules are swapped in from outside too (accel.py, which checks
that they still mirror the code below and leaves off any whose model.py function was edited).

Two ways to run it:
  model(tokens)             no cache: full causal logits [B, T, vocab] (tests, teaching).
  model(tokens, input_pos)  with a static KV cache (`setup_caches`): keys/values are written at the
                            absolute positions `input_pos`, so a T-token forward at any offset equals
                            T single-token steps. Entries past the last accepted token are never
                            rolled back: the mask hides them and the next forward overwrites them.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    # Field names follow gpt-fast so that its users feel at home.
    block_size: int = 2048  # longest context the model was trained for
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int | None = None
    n_local_heads: int = -1  # key/value heads (GQA); -1 means n_head
    head_dim: int | None = None  # None means dim // n_head
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # output head shares the embedding matrix
    # Llama-3.1 RoPE scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict | None = field(default=None)

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head
        if self.intermediate_size is None:
            # Llama's rule: 2/3 of 4*dim, rounded up to a multiple of 256.
            hidden = int(2 * 4 * self.dim / 3)
            self.intermediate_size = 256 * math.ceil(hidden / 256)
        if self.n_head % self.n_local_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_local_heads={self.n_local_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


_LLAMA31_ROPE = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)

PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(
        block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_local_heads=3, dim=576,
        intermediate_size=1536, rope_base=100000.0, norm_eps=1e-5, tie_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        block_size=131072, vocab_size=128256, n_layer=16, n_head=32, n_local_heads=8, dim=2048,
        intermediate_size=8192, rope_base=500000.0, norm_eps=1e-5, tie_embeddings=True,
        rope_scaling=dict(_LLAMA31_ROPE, factor=32.0),
    ),
    "llama-3.1-8b": dict(
        block_size=131072, vocab_size=128256, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
        intermediate_size=14336, rope_base=500000.0, norm_eps=1e-5, rope_scaling=dict(_LLAMA31_ROPE),
    ),
    "llama-3.1-70b": dict(
        block_size=131072, vocab_size=128256, n_layer=80, n_head=64, n_local_heads=8, dim=8192,
        intermediate_size=28672, rope_base=500000.0, norm_eps=1e-5, rope_scaling=dict(_LLAMA31_ROPE),
    ),
    "llama-2-7b": dict(
        block_size=4096, vocab_size=32000, n_layer=32, n_head=32, dim=4096, intermediate_size=11008,
        rope_base=10000.0, norm_eps=1e-5,
    ),
}  # fmt: skip


class KVCache(nn.Module):
    """Static cache [B, kv_heads, max_seq, head_dim]: static shapes are what CUDA graphs need."""

    def __init__(self, max_batch_size, max_seq_length, n_heads, head_dim, dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # index_copy_ writes in place at absolute positions: no rollback is ever needed.
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype=None):
        """Allocate the KV caches, the causal mask and the RoPE table for `max_seq_length` positions."""
        if max_seq_length > self.config.block_size:
            raise ValueError(
                f"max_seq_length={max_seq_length} exceeds the model's context of {self.config.block_size}"
            )
        device = self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        c = self.config
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        for b in self.layers:
            # The layer's own kv head count, not the config's: tensor parallelism (tp.py) gives each
            # rank's Attention its share of the heads, and its cache holds only those.
            b.attention.kv_cache = KVCache(
                max_batch_size, max_seq_length, b.attention.n_local_heads, c.head_dim, dtype, device
            )
        self.register_buffer("freqs_cis", rope_table(c, max_seq_length, device), persistent=False)
        causal = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(
        self,
        idx: Tensor,
        input_pos: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        last: int | None = None,
    ) -> Tensor:
        """idx [B, T] token ids. input_pos [T]: the cache slots the tokens' keys/values go to (needs
        setup_caches), which are also their positions unless `positions` says otherwise.
        mask: optional bool [T, max_seq_length] (or broadcastable to [B, H, T, S]) of which cache
        slots each query may see; it replaces the causal mask.
        positions: optional [T] RoPE positions. A token tree needs both: its nodes sit in distinct
        scratch slots, but a node's position is its depth, and it sees only its ancestors.
        last: logits for the last `last` tokens only, [B, last, vocab]. The others are fed for their keys
        and values alone (a prompt), and the output head over every one of them can cost more than
        the rest of a long prefill."""
        x = self.tok_embeddings(idx)
        if input_pos is None:
            freqs = rope_table(self.config, idx.shape[1], idx.device)
        else:
            if self.max_seq_length < 0:
                raise RuntimeError("call setup_caches() before a cached forward (input_pos given)")
            freqs = self.freqs_cis[input_pos if positions is None else positions]
            if mask is None:
                mask = self.causal_mask[input_pos]
        for layer in self.layers:
            x = layer(x, freqs, input_pos, mask)
        # The final-normed hidden states of every fed token: what the output head reads, and what a
        # feature head (head.py) drafting for this model reads too.
        x = self.norm(x)
        self.features = x
        if last is not None:
            x = x[:, -last:]
        return self.output(x)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, freqs, input_pos, mask):
        h = x + self.attention(self.attention_norm(x), freqs, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        # q, k and v in one matrix: one weight read and one kernel launch instead of three.
        qkv_out = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_out, bias=False)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, freqs, input_pos, mask):
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_local_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        if input_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            y = cached_attention(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_size))


def cached_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of the new tokens q over the whole cache k, v; mask says which slots each token sees
    (stale slots past the sequence are never visible, which is why the cache needs no rollback)."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=True)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 sums of squares lose bits), scale in the run dtype, as Llama does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_table(config: ModelArgs, seq_len: int, device=None) -> Tensor:
    """cos and sin for every position: [seq_len, head_dim // 2, 2] in fp32."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, half, device=device).float() / half))
    if config.rope_scaling is not None:
        inv_freq = _llama31_scale(inv_freq, config.rope_scaling)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def _llama31_scale(inv_freq: Tensor, s: dict) -> Tensor:
    """Llama-3.1 RoPE: slow down low frequencies by `factor`, keep high ones, blend in between."""
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"]
    )
    blended = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, blended, scaled)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + head_dim/2]): Hugging Face's layout, so HF weights load unpermuted
    (llama.cpp permutes q/k rows for its interleaved layout; the GGUF loader undoes that).
    x [B, H, T, D], freqs [T, D/2, 2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = freqs[..., 0], freqs[..., 1]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once, except the caches
    and tables, and except the embedding when it is not also the output head (a step reads one row)."""
    tied = getattr(model.output, "weight", None) is model.tok_embeddings.weight
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if any(s in name for s in ("k_cache", "v_cache", "freqs_cis", "causal_mask")):
            continue
        if name.startswith("tok_embeddings") and not tied:
            continue
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
