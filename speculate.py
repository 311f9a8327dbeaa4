"""Decoding: the autoregressive baseline and (recursive, multi-level) speculative decoding.

Blind to weight formats: a level is any object with the small interface below, whether a BF16 model,
its MXFP4 cast, a smaller checkpoint or a model-free proposer. Nothing here imports mxfp4 or kernels.
"""

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

import sampling


class ModelLevel:
    """A Transformer as a decoding level: it owns its KV cache and a (compiled on CUDA) forward.

    forward(tokens [T], start_pos) -> float32 logits [T, vocab] for positions start_pos..start_pos+T-1,
    writing those positions of the cache. Positions past the last accepted token are simply
    overwritten by a later forward: the cache never needs a rollback.
    """

    def __init__(self, model, name: str = "model", compile: bool | None = None):
        self.model, self.name = model, name
        self.vocab_size = model.config.vocab_size
        self.device = model.tok_embeddings.weight.device
        self.max_seq_length = 0
        # On CUDA every distinct token count T gets its own CUDA graph (reduce-overhead): the decode
        # step (T=1) and the verification forward (T=k+1) are each one graph launch, as in gpt-fast.
        self.compile = (self.device.type == "cuda") if compile is None else compile
        self._forward = model
        if self.compile:
            self._forward = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def reset(self, max_seq_length: int):
        """Fresh cache for a new sequence. Reallocates only when it must grow, so that captured CUDA
        graphs stay valid: stale entries from the last sequence are masked, never read."""
        if max_seq_length > self.max_seq_length:
            self.model.setup_caches(1, max_seq_length)
            self.max_seq_length = max_seq_length  # new buffers: the compiled graphs' guards recompile

    @torch.no_grad()
    def forward(self, tokens: Tensor, start_pos: int) -> Tensor:
        pos = torch.arange(start_pos, start_pos + tokens.numel(), device=self.device)
        logits = self._forward(tokens.view(1, -1), pos)
        # Clone out of the CUDA graph's static output buffer before the next replay reuses it.
        return logits[0].float().clone() if self.compile else logits[0].float()


@dataclass
class DecodeStats:
    """What one generation cost. time_to_first_token includes the prefill."""

    new_tokens: int = 0
    prompt_tokens: int = 0
    time_to_first_token: float = 0.0
    total_time: float = 0.0
    levels: list = field(default_factory=list)  # per-level stats (speculative decoding)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_time if self.total_time > 0 else 0.0

    @property
    def ms_per_token(self) -> float:
        # Decode steps only: the first token's time is the prefill's.
        steps = self.new_tokens - 1
        return 1e3 * (self.total_time - self.time_to_first_token) / steps if steps > 0 else 0.0


def check_prompt(prompt: Tensor, max_new_tokens: int, context: int) -> Tensor:
    prompt = torch.as_tensor(prompt).view(-1)
    if prompt.numel() == 0:
        raise ValueError("the prompt is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt.numel() + max_new_tokens > context:
        raise ValueError(
            f"prompt of {prompt.numel()} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"context of {context} tokens"
        )
    return prompt


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def autoregressive_decode(
    level: ModelLevel,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_ids=(),
    on_token=None,
) -> tuple[Tensor, DecodeStats]:
    """The baseline: one target forward per token. temperature 0 is exact greedy (argmax).
    Returns the new token ids (1-D, ending at the first stop id if one is produced) and stats.
    on_token(list_of_new_ids) is called as tokens arrive (for streaming)."""
    prompt = check_prompt(prompt, max_new_tokens, level.model.config.block_size).to(level.device)
    stats = DecodeStats(prompt_tokens=prompt.numel())
    stop = set(int(s) for s in stop_ids)

    def pick(logits):
        if temperature == 0:
            return sampling.greedy(logits)
        return sampling.sample(sampling.probs(logits, temperature, top_k, top_p), generator)

    _sync(level.device)
    t0 = time.perf_counter()
    level.reset(prompt.numel() + max_new_tokens)
    tok = pick(level.forward(prompt, 0)[-1])
    out = []
    pos = prompt.numel()
    while True:
        out.append(int(tok))  # the host needs each token anyway: to stream it and to stop at EOS
        if len(out) == 1:
            stats.time_to_first_token = time.perf_counter() - t0
        if on_token is not None:
            on_token(out)
        if out[-1] in stop or len(out) == max_new_tokens:
            break
        tok = pick(level.forward(tok.view(1), pos)[-1])
        pos += 1
    _sync(level.device)
    stats.total_time = time.perf_counter() - t0
    stats.new_tokens = len(out)
    return torch.tensor(out, dtype=torch.long), stats
