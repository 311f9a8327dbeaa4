"""Logits -> the distribution we sample from, and the sampler. Shared by plain and speculative decoding.

Speculative sampling is exact only if the target and every draft warp their logits the same way, and
the acceptance test uses exactly the probabilities the proposal was drawn from. So there is one
function for it, `probs`, always in float32, and nothing else in the project warps logits.
"""

import torch
from torch import Tensor

from kernels import cpu as cpu_kernels

# A rejection whose residual max(p - q, 0) sums to less than this is float32 rounding noise (p and q
# agree to ~1e-7 per entry): we then sample from p, which is off by at most this much in total variation.
RESIDUAL_EPS = 1e-6


def probs(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Warped distribution over the last dim, float32: temperature, then top-k, then top-p
    (the order Hugging Face applies them). temperature must be > 0: greedy is `greedy`, not a
    tiny temperature."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling; use greedy() for temperature 0")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the top one always).
        sorted_p, order = torch.sort(p, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        p = p.masked_fill(drop, 0.0)
        p = p / p.sum(-1, keepdim=True)
    return p


def sample(p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw from each row of p: argmax(p / E) with E ~ Exp(1) picks i with probability p_i
    exactly, without torch.multinomial's host sync on CUDA."""
    e = torch.empty_like(p).exponential_(1, generator=generator)
    return argmax(p / e)


def greedy(logits: Tensor) -> Tensor:
    return argmax(logits)


def argmax(x: Tensor) -> Tensor:
    """torch.argmax over the last dim; on the CPU by the kernels where they take x (the same indices:
    ATen's is a scalar loop, 2% of a quantized draft's step over a 49k vocabulary)."""
    if cpu_kernels.argmax_takes(x):
        return cpu_kernels.argmax(x)
    return torch.argmax(x, dim=-1)
