"""What a generation cost and what each level did: the numbers the CLI prints and benchmarks save.

Kept apart from speculate.py so that the algorithm reads without its bookkeeping. `Meter` is what
the decoding loop calls: once per forward (count, and time on the CPU) and once per verification round.
"""

import time
from dataclasses import dataclass, field

import torch


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
    time_by_tokens[T]: [forwards, seconds] of this level's forwards over T tokens (when timed): the
        cost of verifying a sequence or a tree of each size.
    round_time_by_tokens[T]: [rounds, seconds] of this level's sequence rounds over T tokens, from the
        end of the proposal to the token written: the forward plus everything around it (acceptance,
        sampling, bookkeeping, host syncs). propose_time: seconds in this level's proposals (its
        own rounds and everything below it, Python included). What a round really costs, for the
        cost policy.
    Tree drafts (a TreeShape for this level): `proposed` counts each tree's depth (the most one round
    could accept) and tree_nodes its size, so tree_nodes / rounds is the mean tree verified.
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
    time_by_tokens: dict = field(default_factory=dict)
    round_time_by_tokens: dict = field(default_factory=dict)
    propose_time: float = 0.0
    tree_nodes: int = 0
    k_used: dict = field(default_factory=dict)  # {k in effect: rounds of the level above}; 0 = off

    @property
    def mean_tree_nodes(self) -> float:
        return self.tree_nodes / self.rounds if self.rounds else 0.0

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
    """DecodeStats with one LevelStats per level in `levels` (levels[0] is the target), the level that
    produced each new token (`origin`: 0 the target's own correction, bonus or plain step), and the
    rounds, when traced."""

    origin: list = field(default_factory=list)
    trace: list | None = None


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
        what = "depth" if s.tree_nodes else "position"
        lines.append(f"acceptance by {what}, level {i} {s.name}: {pos or '-'}")
        if s.tree_nodes:
            lines.append(f"mean tree verified, level {i} {s.name}: {s.mean_tree_nodes:.1f} nodes")
        if len(s.k_used) > 1 or 0 in s.k_used:
            used = " ".join(f"{k}:{n}" for k, n in sorted(s.k_used.items()))
            lines.append(f"k chosen (k:rounds, 0 = off), level {i} {s.name}: {used}")
    for i, s in enumerate(stats.levels):
        if len(s.time_by_tokens) > 1:
            ms = " ".join(f"{t}:{1e3 * sec / n:.1f}" for t, (n, sec) in sorted(s.time_by_tokens.items()))
            lines.append(f"ms per forward by tokens fed, level {i} {s.name}: {ms}")
    return "\n".join(lines)


class Meter:
    """Counts each level's forwards and rounds into LevelStats. Timing a CUDA forward needs a sync, so
    forwards are timed only on the CPU or when `timed` (profiling)."""

    def __init__(self, names: list[str], ks: list, device: torch.device, timed: bool):
        self.device, self.timed = device, timed
        self.levels = [LevelStats(name, k) for name, k in zip(names, ks)]
        for s in self.levels:
            s.forward_time = 0.0 if timed else None

    def start(self) -> float:
        if not self.timed:
            return 0.0
        sync(self.device)
        return clock()

    def stop(self, i: int, t0: float, tokens: int):
        """Close one forward of level i over `tokens` tokens (a proposer: one propose call)."""
        s = self.levels[i]
        s.forwards += 1
        s.tokens_fed += tokens
        if self.timed:
            sync(self.device)
            dt = clock() - t0
            s.forward_time += dt
            n, sec = s.time_by_tokens.get(tokens, (0, 0.0))
            s.time_by_tokens[tokens] = (n + 1, sec + dt)

    def round_time(self, i: int, m: int, t0: float, t1: float):
        """Level i's round that began at t0 and had its m proposals at t1 ends now (when timed)."""
        if not self.timed:
            return
        now = clock()
        n, sec = self.levels[i].round_time_by_tokens.get(m + 1, (0, 0.0))
        self.levels[i].round_time_by_tokens[m + 1] = (n + 1, sec + now - t1)
        if m:
            self.levels[i + 1].propose_time += t1 - t0

    def round(self, i: int, m: int, a: int):
        """Level i verified m proposals of level i+1 and accepted the first a (m = 0: a plain step)."""
        self.levels[i].steps += 1
        if m == 0:
            return
        s = self.levels[i + 1]
        s.proposed += m
        s.accepted += a
        s.rounds += 1
        for j in range(min(a + 1, m)):  # positions 0..a were tested (a is the rejected one, if any)
            if j == len(s.reached):
                s.reached.append(0)
                s.accepted_at.append(0)
            s.reached[j] += 1
            s.accepted_at[j] += j < a


def clock() -> float:
    """The clock the Meter reads (a function, so that a test can give the cost policy fake times)."""
    return time.perf_counter()


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
