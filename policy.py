"""How many tokens each draft level proposes per round: fixed, grown and shrunk, or chosen by a cost model.

A policy only ever looks at the past (how earlier proposals fared, how long earlier forwards took), so
whatever it picks, each token is still accepted or resampled by the exact rule: the output keeps the
target's distribution. (With "cost" the choice depends on measured times, so a seeded sampled run is
exact but not reproducible from run to run; fixed k is for reproducible ablations.)

    fixed   k stays as given.
    grow    +1 after a fully accepted round (up to twice the initial k), -1 after a rejection (down to 1).
    cost    Leviathan's expected-speedup formula with measured numbers. For draft level j, verified by
            level j-1, a round with k proposals yields E(k) = 1 + a_1 + a_1 a_2 + ... + a_1...a_k tokens
            (a_s: the measured acceptance at draft position s) and costs k c_j + v(k + 1) (c_j: the
            measured wall time of level j's proposals per token, every level below it and all the
            Python between forwards included; v(T): level j-1's measured round time over T tokens,
            its forward plus the acceptance, sampling and bookkeeping around it). Forwards alone
            undercount a round by the fixed costs around them, and a draft near break-even then
            looks cheaper than it is. It picks the k with the most tokens per second,
            or k = 0 (the level is switched off: level j-1 takes plain steps) when no k beats a plain
            step's 1 / v(1). A level that is off is tried again now and then, so a change in the text
            can switch it back on. The stats table counts how often each k was used.
"""

POLICIES = ("fixed", "grow", "cost")


def expected_tokens(alpha: list[float], k: int) -> float:
    """Tokens a round with k proposals yields on average: the accepted ones plus the verifier's own,
    1 + a_1 + a_1 a_2 + ... + a_1...a_k, with a_s the acceptance at draft position s (positions past
    the end of `alpha` take its last value; [a] alone is Leviathan et al.'s i.i.d. case, whose sum is
    (1 - a^(k+1)) / (1 - a)). The one formula of the cost model, here and in bench_lib."""
    total, survive = 1.0, 1.0
    for s in range(k):
        survive *= alpha[min(s, len(alpha) - 1)]
        total += survive
    return total


class Fixed:
    def __init__(self, k: list):
        self.k = k

    def start(self, sp):
        pass

    def update(self, sp, i: int, m: int, a: int):
        pass


class GrowShrink(Fixed):
    def __init__(self, k: list):
        super().__init__(k)
        self.k_max = [None] + [2 * x for x in k[1:]]

    def update(self, sp, i: int, m: int, a: int):
        j = i + 1
        if m and j < len(self.k):
            self.k[j] = min(self.k[j] + 1, self.k_max[j]) if a == m else max(self.k[j] - 1, 1)


class CostModel(Fixed):
    WARMUP = 3  # rounds with the given k before the model decides (it needs acceptances and times)
    PROBE = 16  # while a level is off, one round with k = 2 after this many plain steps
    MAX_TOKENS = 64  # forwards longer than this are prefills, not verifications
    SLOPE = 0.1  # v(T) ~ v(1) (1 + SLOPE (T - 1)) until two token counts have been timed

    def __init__(self, k: list):
        super().__init__(k)
        self.k_max = [None] + [max(2 * x, 8) for x in k[1:]]

    def start(self, sp):
        """Called after the prefill: draft costs are counted from here."""
        self.base = [(s.propose_time, s.proposed) for s in sp.stats]
        self.rounds = [0] * len(self.k)
        self.off = [0] * len(self.k)

    def update(self, sp, i: int, m: int, a: int):
        j = i + 1
        if j >= len(self.k) or sp.trees[j] is not None or sp.stats[i].forward_time is None:
            return  # trees keep their depth; untimed runs (CUDA without profiling) have no costs
        self.rounds[j] += 1
        if self.rounds[j] <= self.WARMUP:
            return
        k = self.best_k(sp, j)
        if k == 0:
            self.off[j] += 1
            if self.off[j] % self.PROBE == 0:
                k = 2
        else:
            self.off[j] = 0
        if k is not None:
            self.k[j] = k

    def best_k(self, sp, j: int) -> int | None:
        """The k with the most expected tokens per second for level j-1 (0: level j off), or None
        while level j has proposed nothing to learn from."""
        s = sp.stats[j]
        proposed = s.proposed - self.base[j][1]
        if proposed <= 0:
            return None
        # Seconds spent producing level j's proposals, everything included.
        c = max(s.propose_time - self.base[j][0], 0.0) / proposed
        v = self._round_time(sp.stats[j - 1])
        if v is None:
            return None
        # Acceptance at each draft position, with one pseudo-accept and one pseudo-reject (a uniform
        # prior), and positions never reached taking the last reached one's value.
        alpha = [(acc + 1) / (r + 2) for acc, r in zip(s.accepted_at, s.reached)] or [0.5]
        best, best_rate = 0, 1.0 / v(1)
        for k in range(1, self.k_max[j] + 1):
            rate = expected_tokens(alpha, k) / (k * c + v(k + 1))
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def _round_time(self, s):
        """v(T): level s's mean measured round time over T tokens, interpolated linearly between
        measured token counts (and extrapolated from the last two, or with SLOPE from one)."""
        pts = sorted(
            (t, sec / n) for t, (n, sec) in s.round_time_by_tokens.items() if t <= self.MAX_TOKENS and n
        )
        if not pts:
            return None

        def v(T: int) -> float:
            lo = [p for p in pts if p[0] <= T]
            hi = [p for p in pts if p[0] >= T]
            if lo and hi:
                (t0, y0), (t1, y1) = lo[-1], hi[0]
                return y0 if t1 == t0 else y0 + (y1 - y0) * (T - t0) / (t1 - t0)
            if len(pts) >= 2:
                (t0, y0), (t1, y1) = (pts[-2], pts[-1]) if lo else (pts[0], pts[1])
                slope = max((y1 - y0) / (t1 - t0), 0.0)
            else:
                slope = self.SLOPE * pts[0][1] / pts[0][0]
            t, y = pts[-1] if lo else pts[0]
            return max(y + slope * (T - t), 1e-9)

        return v


def make_policy(name: str, k: list):
    if name not in POLICIES:
        raise ValueError(f"unknown k policy {name!r}; known: {', '.join(POLICIES)}")
    return {"fixed": Fixed, "grow": GrowShrink, "cost": CostModel}[name](k)
