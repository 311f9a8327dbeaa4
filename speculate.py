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


# ---------------------------------------------------------------------------------------------------
# Speculative decoding, any number of levels.
#
# levels[0] is the target; levels[i] (i >= 1) proposes k[i-1] tokens per round to levels[i-1]. A level
# that has a level below it produces its proposals *by speculative decoding against that level*, so the
# level above sees exactly what this level alone would have sampled (or, greedy, its own argmax run).
# One recursion, `Speculation.round`, serves every stack: plain SD, ML-SpecQD's BF16 > MXFP4 > small
# draft, or a model-free n-gram proposer at the bottom.
#
# All levels share one token buffer `buf`. A level working on buf[:L] only ever writes at positions
# >= L, and the levels it calls write further right, so buf[:L] is always the context everyone agrees on.
# Each level remembers how many leading positions of buf its KV cache holds (`seen`); every write to buf
# lowers that count for all levels, and before a forward a level first feeds what it has not seen yet.
# ---------------------------------------------------------------------------------------------------

# A draft's vocabulary may differ from the target's by padding rows only (e.g. 151936 vs 152064): we
# compare on the target's ids. A larger difference means another tokenizer, which is generate.py's check.
MAX_VOCAB_PADDING = 1024

# A rejection whose residual max(p - q, 0) sums to less than this is float32 rounding noise (p and q
# agree to ~1e-7 per entry): we then sample from p, which is off by at most this much in total variation.
RESIDUAL_EPS = 1e-6


def acceptance_prob(p: Tensor, q: Tensor) -> Tensor:
    """min(1, p/q) elementwise: the chance of keeping a token drawn from q when p is the target.
    Where q is 0 the token can never have been drawn; we return 1 there instead of dividing by 0."""
    return torch.where(q > 0, (p / q).clamp(max=1.0), torch.ones_like(p))


def residual(p: Tensor, q: Tensor) -> Tensor:
    """What to sample from after a rejection: max(p - q, 0) normalised over the last dim. A residual
    that is ~0 within rounding (p == q) falls back to p. For a point-mass q (an n-gram proposal x) this
    is p with x removed, renormalised."""
    r = (p - q).clamp(min=0.0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > RESIDUAL_EPS, r / total.clamp(min=RESIDUAL_EPS), p)


class NgramProposer:
    """Prompt-lookup decoding as a model-free last level: find the most recent earlier occurrence of the
    last n tokens (the longest n first, down to min_n) and propose the tokens that followed it.

    Deterministic, so its "distribution" is a point mass on the proposed token: the level above accepts x
    with probability p(x), and on rejection samples p with x removed (`residual` with a one-hot q).
    It may propose fewer than k tokens, or none; the level above then takes a plain step."""

    vocab_size = None  # proposes ids taken from the sequence itself

    def __init__(self, n: int = 3, name: str = "ngram", min_n: int = 1):
        if not 1 <= min_n <= n:
            raise ValueError(f"need 1 <= min_n <= n, got n={n}, min_n={min_n}")
        self.n, self.min_n, self.name = n, min_n, name

    def reset(self, max_seq_length: int):
        pass  # no state: the caller hands us the sequence

    def propose(self, tokens: list[int], k: int) -> list[int]:
        L = len(tokens)
        for n in range(min(self.n, L - 1), self.min_n - 1, -1):
            tail = tokens[L - n :]
            # Most recent match first; it must end before the last token so that something follows it.
            for start in range(L - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    return tokens[start + n : start + n + k]
        return []


def is_proposer(level) -> bool:
    """Model levels return logits (`forward`); model-free proposers return tokens (`propose`)."""
    return hasattr(level, "propose")


@dataclass
class LevelStats:
    """What one level did in one generation. Level 0 (the target) only verifies, so its draft fields
    stay 0.

    proposed / accepted: tokens this level handed to the level above, and how many of them it kept.
    rounds: verification rounds the level above ran on this level's proposals (one forward each).
    steps: rounds this level itself ran as verifier, plain steps included. Each adds exactly one token of
        its own (a correction, a bonus or a plain-step token), so the tokens level i produces are
        steps[i] + accepted[i+1]: the new tokens for the target, `proposed` for a draft.
    reached[j] / accepted_at[j]: rounds in which the level above tested draft position j (0-based; it
        stops at the first rejection), and in how many of them that token was accepted.
    forwards / tokens_fed: forwards this level ran (prefill included) and the tokens they processed
        (for a proposer: `propose` calls and tokens proposed).
    forward_time: seconds in this level's own forwards; None on CUDA unless profiling (timing a GPU
        forward needs a sync, which we do not add by default).
    A stop id inside a round ends the output there; the stats still count that round as verified.
    """

    name: str
    k: int | None = None  # initial draft length (None for the target)
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    steps: int = 0
    reached: list = field(default_factory=list)
    accepted_at: list = field(default_factory=list)
    forwards: int = 0
    tokens_fed: int = 0
    forward_time: float | None = 0.0

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """[j]: of the rounds that reached draft position j, the fraction accepted there."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_at, self.reached)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens the level above emits per verification round on this level's proposals: the accepted
        drafts plus its one correction or bonus token, (accepted + rounds) / rounds. Plain steps (nothing
        proposed) are not rounds and do not count."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def mean_proposed(self) -> float:
        """Tokens proposed per round (below k when clamped at the end or by adaptive k)."""
        return self.proposed / self.rounds if self.rounds else 0.0


@dataclass
class SpecStats(DecodeStats):
    """DecodeStats with one LevelStats per level in `levels` (levels[0] is the target)."""


def format_stats(stats: SpecStats) -> str:
    """A small table, one row per level, then the acceptance by draft position of each draft."""
    head = (
        f"{'level':<14}{'k':>4}{'proposed':>10}{'accepted':>10}{'rate':>7}{'mean len':>10}"
        f"{'rounds':>8}{'steps':>7}{'forwards':>10}{'fed':>7}{'time s':>9}"
    )
    lines = [
        f"{stats.new_tokens} new tokens in {stats.total_time:.3f} s ({stats.tokens_per_second:.1f} "
        f"tokens/s), time to first token {1e3 * stats.time_to_first_token:.0f} ms",
        head,
    ]
    for i, s in enumerate(stats.levels):
        k = "-" if s.k is None else str(s.k)
        t = "-" if s.forward_time is None else f"{s.forward_time:.3f}"
        draft = (
            f"{s.proposed:>10}{s.accepted:>10}{s.acceptance_rate:>7.2f}{s.mean_accepted_length:>10.2f}"
            f"{s.rounds:>8}"
            if i
            else f"{'-':>10}{'-':>10}{'-':>7}{'-':>10}{'-':>8}"
        )
        lines.append(
            f"{f'{i} {s.name}'[:13]:<14}{k:>4}{draft}{s.steps:>7}{s.forwards:>10}{s.tokens_fed:>7}{t:>9}"
        )
    for i, s in enumerate(stats.levels[1:], start=1):
        pos = " ".join(f"{a:.2f}" for a in s.acceptance_by_position)
        lines.append(f"acceptance by position, level {i} {s.name}: {pos or '-'}")
    return "\n".join(lines)


def _context(level) -> int | None:
    model = getattr(level, "model", None)
    return model.config.block_size if model is not None else None


def _check_levels(levels, k, temperature, top_k, top_p) -> list[int]:
    if not levels:
        raise ValueError("levels is empty: give at least the target")
    if is_proposer(levels[0]):
        raise ValueError(f"level 0 ({levels[0].name}) must be a model: the target defines the distribution")
    for i, level in enumerate(levels[:-1]):
        if is_proposer(level):
            raise ValueError(
                f"level {i} ({level.name}) is a model-free proposer: it can only be the last level "
                "(nothing below it can speed it up)"
            )
    seen = set()
    for level in levels:
        # Two levels on one model would share one KV cache and overwrite each other's positions.
        key = id(getattr(level, "model", level))
        if key in seen:
            raise ValueError(f"level {level.name} appears twice: each level needs its own model and cache")
        seen.add(key)
    n = len(levels) - 1
    if k is None:
        k = [] if n == 0 else None
        if k is None:
            raise ValueError(f"k is required: one draft length per draft level ({n})")
    if isinstance(k, int):
        k = [k] * n
    k = list(k)
    if len(k) != n:
        raise ValueError(f"k has {len(k)} entries but there are {n} draft levels: need one k per draft level")
    if any(not isinstance(x, int) or x < 1 for x in k):
        raise ValueError(f"every k must be an integer >= 1, got {k}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    vocab = levels[0].vocab_size
    for level in levels[1:]:
        v = level.vocab_size
        if v is not None and abs(v - vocab) > MAX_VOCAB_PADDING:
            raise ValueError(
                f"level {level.name} has a vocabulary of {v} ids and the target {vocab}: more than "
                f"{MAX_VOCAB_PADDING} rows of padding apart, so probably another tokenizer"
            )
    return k


class Speculation:
    """One generation with a stack of levels. `speculative_decode` is the way in; the class is public so
    that tests can look at the shared buffer and the per-level cache bookkeeping.

    buf: the token buffer shared by all levels (prompt, then committed tokens, then in-flight drafts).
    seen[i]: leading positions of buf whose keys/values level i's cache holds (for a proposer: the
        length of its host copy of buf). Any write to buf at position t lowers every seen to <= t.
    k[i]: tokens level i proposes per round (k[0] is unused), adapted if `adaptive`.
    """

    def __init__(
        self,
        levels,
        k,
        temperature=0.0,
        top_k=None,
        top_p=None,
        generator=None,
        adaptive=False,
        profile=False,
    ):
        self.k = [None] + _check_levels(levels, k, temperature, top_k, top_p)
        self.levels = levels
        self.k_max = [None] + [2 * x for x in self.k[1:]]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator, self.adaptive = generator, adaptive
        self.device = getattr(levels[0], "device", torch.device("cpu"))
        self.vocab = levels[0].vocab_size
        # Timing a CUDA forward needs a sync; on the CPU the clock alone is right.
        self.timed = profile or self.device.type != "cuda"
        self.stats = [LevelStats(lv.name, kk) for lv, kk in zip(levels, self.k)]
        for s in self.stats:
            s.forward_time = 0.0 if self.timed else None
        self.buf = torch.empty(0, dtype=torch.long, device=self.device)
        self.seen = [0] * len(levels)
        self.host = [[] for _ in levels]  # proposers read the sequence on the host

    # -- the shared buffer and the caches ---------------------------------------------------------

    def write(self, pos: int, tokens: Tensor):
        """Put tokens at buf[pos:]. No cache is rolled back: positions >= pos just stop counting as
        seen, and the next forward of each level overwrites them (the mask hides them meanwhile)."""
        self.buf[pos : pos + tokens.numel()] = tokens
        self.seen = [min(s, pos) for s in self.seen]

    def logits(self, i: int, start: int, end: int) -> Tensor:
        """Level i's logits at positions start..end-1 (row t predicts token t+1), given buf[:end].
        The forward first feeds the tokens of buf the level has not seen yet, so T >= end - start; this
        is also how a draft catches up on its own last token and the bonus after a fully accepted round."""
        level, s = self.levels[i], self.seen[i]
        # Writes lower `seen`, so a level never holds positions past the first one it is asked about.
        assert s <= start, f"cache bookkeeping: level {i} has seen {s} positions, asked from {start}"
        tokens = self.buf[s:end]
        if level.vocab_size < self.vocab:
            # Ids past a smaller draft's vocabulary (padding rows of the target) cannot be embedded.
            tokens = tokens.clamp(max=level.vocab_size - 1)
        t0 = self._tick()
        out = level.forward(tokens, s)
        self._tock(i, t0)
        self.stats[i].forwards += 1
        self.stats[i].tokens_fed += end - s
        self.seen[i] = end
        # Compare on the target's ids: drop a draft's extra padding rows.
        return out[start - s :, : self.vocab]

    def probs(self, logits: Tensor) -> Tensor:
        """The one warping for every level, padded with zeros to the target's vocabulary."""
        p = sampling.probs(logits, self.temperature, self.top_k, self.top_p)
        return torch.nn.functional.pad(p, (0, self.vocab - p.shape[-1]))

    def _tick(self):
        if not self.timed:
            return 0.0
        _sync(self.device)
        return time.perf_counter()

    def _tock(self, i, t0):
        if self.timed:
            _sync(self.device)
            self.stats[i].forward_time += time.perf_counter() - t0

    # -- the recursion ------------------------------------------------------------------------------

    def propose(self, j: int, L: int, m: int) -> tuple[int, Tensor | None]:
        """Level j proposes up to m tokens after buf[:L], written at buf[L:]. Returns how many, and
        (sampling) the distribution each was drawn from, rows [n, vocab]; None when greedy."""
        level = self.levels[j]
        if is_proposer(level):
            # Bring the host copy up to date with buf[:L] (one small transfer), then look up.
            host = self.host[j][: self.seen[j]] + self.buf[self.seen[j] : L].tolist()
            t0 = self._tick()
            tokens = level.propose(host, m)[:m]
            self._tock(j, t0)
            self.host[j], self.seen[j] = host, L
            self.stats[j].forwards += 1
            self.stats[j].tokens_fed += len(tokens)
            if not tokens:
                return 0, None
            x = torch.tensor(tokens, dtype=torch.long, device=self.device)
            self.write(L, x)
            # Deterministic: q is a point mass on each proposed token.
            q = None if self.temperature == 0 else torch.nn.functional.one_hot(x, self.vocab).float()
            return len(tokens), q
        # A model level: rounds of its own, each verifying what the level below proposes (or, at the
        # bottom, plain steps). Asking for at most m - n - 1 below means a round never overshoots m.
        n, rows = 0, []
        while n < m:
            below = min(self.k[j + 1], m - n - 1) if j + 1 < len(self.levels) else 0
            a, p = self.round(j, L + n, below)
            n += a + 1
            rows.append(p)
        return m, None if self.temperature == 0 else torch.cat(rows)

    def round(self, i: int, L: int, m: int) -> tuple[int, Tensor | None]:
        """Level i extends buf[:L]: level i+1 proposes up to m tokens, level i checks them all in one
        forward, keeps the first a of them and adds one token of its own (correction or bonus; with
        nothing proposed, a plain step). Writes buf[L:L+a+1] and returns a and, when sampling, level i's
        distributions at those a+1 positions: the q that level i-1 checks them against."""
        q = None
        if m > 0:
            m, q = self.propose(i + 1, L, m)  # may be fewer than asked (an n-gram lookup)
        logits = self.logits(i, L - 1, L + m)  # m+1 rows: one per draft, one for the bonus
        x = self.buf[L : L + m]
        if self.temperature == 0:
            # Greedy: accept while the draft is the verifier's argmax, then the argmax itself.
            best = sampling.greedy(logits)
            a = self._count_accepted(x == best[:m]) if m else 0
            nxt, p = best[a], None
        else:
            p = self.probs(logits)
            a = 0
            if m:
                at = torch.arange(m, device=self.device)
                u = torch.rand(m, generator=self.generator, device=self.device)
                a = self._count_accepted(u < acceptance_prob(p[at, x], q[at, x]))
            # After a rejection at a: the residual there; after m acceptances: a bonus from p.
            dist = residual(p[a], q[a]) if a < m else p[a]
            nxt = sampling.sample(dist, self.generator)
        self.write(L + a, nxt.view(1))
        self._record(i, m, a)
        return a, None if p is None else p[: a + 1]

    def _count_accepted(self, ok: Tensor) -> int:
        # Length of the leading run of accepted drafts: the one host sync of a verification round.
        return int(torch.cumprod(ok.int(), 0).sum())

    def _record(self, i: int, m: int, a: int):
        self.stats[i].steps += 1
        if m == 0:
            return
        s = self.stats[i + 1]
        s.proposed += m
        s.accepted += a
        s.rounds += 1
        for j in range(min(a + 1, m)):  # positions 0..a were tested (a is the rejected one, if any)
            if j == len(s.reached):
                s.reached.append(0)
                s.accepted_at.append(0)
            s.reached[j] += 1
            s.accepted_at[j] += j < a
        if self.adaptive:
            # Grow after a fully accepted round, shrink after a rejection. k only depends on past
            # outcomes, so the output distribution is unchanged.
            if a == m:
                self.k[i + 1] = min(self.k[i + 1] + 1, self.k_max[i + 1])
            else:
                self.k[i + 1] = max(self.k[i + 1] - 1, 1)

    @torch.no_grad()
    def generate(
        self, prompt: Tensor, max_new_tokens: int, stop_ids=(), on_token=None
    ) -> tuple[Tensor, SpecStats]:
        prompt = torch.as_tensor(prompt).view(-1)
        for level in self.levels:
            if _context(level) is not None:
                check_prompt(prompt, max_new_tokens, _context(level))
        prompt = check_prompt(prompt, max_new_tokens, 1 << 62).to(self.device)
        P, stop = prompt.numel(), set(int(s) for s in stop_ids)
        # No level ever writes past the last new token (proposals are clamped to what is still
        # needed), so prompt + max_new_tokens positions are enough for every cache.
        limit = P + max_new_tokens
        stats = SpecStats(prompt_tokens=P, levels=self.stats)

        _sync(self.device)
        t0 = time.perf_counter()
        self.buf = torch.zeros(limit, dtype=torch.long, device=self.device)
        self.buf[:P] = prompt
        self.seen = [0] * len(self.levels)
        for i, level in enumerate(self.levels):
            level.reset(limit)
            if P > 1 and not is_proposer(level):
                self.logits(i, P - 2, P - 1)  # prefill: every level sees the prompt but its last token

        out, L = [], P
        while len(out) < max_new_tokens:
            m = min(self.k[1], limit - L - 1) if len(self.levels) > 1 else 0
            a, _ = self.round(0, L, m)
            new = self.buf[L : L + a + 1].tolist()
            L += a + 1
            if not out:
                stats.time_to_first_token = time.perf_counter() - t0
            for t in new:
                out.append(t)
                if t in stop:
                    break
            if on_token is not None:
                on_token(out)
            if out[-1] in stop:
                break
        _sync(self.device)
        stats.total_time = time.perf_counter() - t0
        stats.new_tokens = len(out)
        return torch.tensor(out, dtype=torch.long), stats


@torch.no_grad()
def speculative_decode(
    levels: list,
    prompt: Tensor,
    max_new_tokens: int,
    k=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_ids=(),
    on_token=None,
    adaptive: bool = False,
    profile: bool = False,
) -> tuple[Tensor, SpecStats]:
    """Multi-level speculative decoding. levels[0] is the target; levels[i] proposes k[i-1] tokens per
    round to levels[i-1] (k may be one int for all), producing them by speculative decoding against
    levels[i+1] when there is one. A level is a ModelLevel (or anything with forward(tokens, start_pos)
    -> logits [T, vocab], reset(max_seq_length), vocab_size, name) or a model-free proposer with
    propose(tokens, k) -> list of ids (NgramProposer), which must be the last level.

    temperature 0 is exact greedy: the target's own argmax tokens whatever the drafts. Otherwise the
    output is distributed exactly as sampling from the target with this temperature/top_k/top_p.
    adaptive: per level, k grows by 1 after a fully accepted round (up to twice the initial k) and
    shrinks by 1 after a rejection (down to 1). profile: sync around forwards on CUDA to time them.

    A level asked for m tokens asks the level below for at most m - 1 per round (its own correction or
    bonus makes the m-th), so nothing is ever drafted past what is needed: with k[i-1] = 1 level i
    takes plain steps and the levels below it are not used.
    Returns the new ids (1-D, ending at the first stop id if one is produced) and SpecStats."""
    run = Speculation(levels, k, temperature, top_k, top_p, generator, adaptive, profile)
    return run.generate(prompt, max_new_tokens, stop_ids, on_token)
