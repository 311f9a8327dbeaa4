"""Decoding: the autoregressive baseline and (recursive, multi-level) speculative decoding.

Read in this order: the acceptance rule (`acceptance_prob`, `residual`), `ModelLevel`, then
`Speculation.round` and `Speculation.propose`, which call each other: that recursion is the whole of
multi-level speculative decoding. Token trees are in trees.py, the bookkeeping of stats in stats.py.

Blind to weight formats: a level is any object with the small interface below, whether a BF16 model,
its MXFP4 cast, a smaller checkpoint or a model-free proposer. Nothing here imports mxfp4 or kernels.
"""

import time

import torch
from torch import Tensor

import sampling
from kernels import cpu as cpu_kernels
from policy import make_policy
from sampling import RESIDUAL_EPS
from stats import DecodeStats, LevelStats, Meter, SpecStats, format_stats, sync  # noqa: F401
from trees import Tree, TreeShape, check_trees, tree_round  # noqa: F401 (TreeShape: for callers)

# ---------------------------------------------------------------------------------------------------
# The acceptance rule (Leviathan et al. 2023; Chen et al. 2023). A draft proposes x ~ q; the verifier
# keeps it with probability min(1, p(x)/q(x)), and on a rejection samples the residual max(p - q, 0),
# renormalised. The kept token is then distributed exactly as p, whatever q is.
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Levels. A model level returns logits for the tokens it is fed; a proposer returns tokens.
# ---------------------------------------------------------------------------------------------------

# Forwards of at most this many tokens that are not prefills run compiled (when a level is compiled).
COMPILE_MAX_TOKENS = 64
MIN_COMPILED_CACHE = 256


class ModelLevel:
    """A Transformer as a decoding level: it owns its KV cache.

    forward(tokens [T], start_pos, last=None) -> float32 logits [T, vocab] for positions
    start_pos..start_pos+T-1 (only the last `last` of them when given), writing those positions of the
    cache. Positions past the last accepted token are simply
    overwritten by a later forward: the cache never needs a rollback.

    keep_features: set by a feature head drafting for this level (head.HeadLevel): every forward then
    keeps the model's final-normed hidden states in `features`, one row per cache slot it computed.

    compiled: an optional faster callable of the model for decode-sized forwards (accel.compile_decode:
    torch.compile with one CUDA graph per token count, as gpt-fast). Prefills and forwards over more
    than COMPILE_MAX_TOKENS tokens run eagerly, as gpt-fast's prefill does: they are compute-bound, and
    compiling them would cost one compilation per prompt length.
    """

    def __init__(self, model, name: str = "model", compiled=None):
        self.model, self.name, self.compiled = model, name, compiled
        self.vocab_size = model.config.vocab_size
        self.device = model.tok_embeddings.weight.device
        self.max_seq_length = 0
        self.keep_features, self.features = False, None
        self._caches, self._kv = [], None  # set by reset

    def reset(self, max_seq_length: int):
        """Fresh cache for a new sequence. Reallocates only when it must grow, so that captured CUDA
        graphs stay valid: stale entries from the last sequence are masked, never read."""
        if max_seq_length > self.max_seq_length:
            if self.compiled is not None:  # new buffer shapes recompile every graph: grow by doubling
                size = max(MIN_COMPILED_CACHE, 1 << (max_seq_length - 1).bit_length())
                max_seq_length = min(size, self.model.config.block_size)
            self.model.setup_caches(1, max_seq_length)
            self.max_seq_length = max_seq_length
            self.features = None
        if self.keep_features and self.features is None:
            dim, dtype = self.model.config.dim, self.model.tok_embeddings.weight.dtype
            self.features = torch.zeros(self.max_seq_length, dim, dtype=dtype, device=self.device)
        # The modules holding caches, for move_kv (walking the whole model per tree round cost ~2 ms).
        self._caches = [m for m in self.model.modules() if hasattr(m, "k_cache") and hasattr(m, "v_cache")]
        # ... and their tensors in one list, for copy_kv's one call (None: copy_slots cannot take them)
        kv = [c for m in self._caches for c in (m.k_cache, m.v_cache)]
        self._kv = kv if self.device.type == "cpu" and all(c.is_contiguous() for c in kv) else None

    def _run(self, args: tuple, start_pos: int | None = None, last: int | None = None) -> Tensor:
        """The model on args (tokens [1, T] first, cache slots second), compiled or eager: float32
        [T or last, V]."""
        T = args[0].shape[1]
        if self.compiled is None or T > COMPILE_MAX_TOKENS or start_pos == 0:
            # accel.FastTransformer can run the whole step in one C++ call (the same bits); a tree's
            # forward (slots, mask, positions: four arguments) always goes through the model.
            fused = getattr(self.model, "float_logits", None)
            out = fused(*args, last=last) if fused is not None and len(args) == 2 else None
            if out is None:
                out = self.model(*args, last=last)[0].float()
        else:
            # Clone out of the CUDA graph's static output buffer before the next replay reuses it.
            # (The graph computes every row: a `last` argument would multiply the graphs per count.)
            out = self.compiled(*args)[0]
            out = (out if last is None else out[-last:]).float().clone()
        if self.features is not None:
            self.features[args[1]] = self.model.features[0].to(self.features.dtype)
        return out

    @torch.no_grad()
    def forward(self, tokens: Tensor, start_pos: int, last: int | None = None) -> Tensor:
        """last: logits for the last `last` tokens only (the others are fed for the cache)."""
        pos = torch.arange(start_pos, start_pos + tokens.numel(), device=self.device)
        return self._run((tokens.view(1, -1), pos), start_pos, last)

    @torch.no_grad()
    def forward_tree(self, tokens: Tensor, slots: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """A forward over tokens that need not form a sequence (a token tree): token t's key/value go to
        cache slot slots[t], it is rotated as position positions[t], and it attends to the slots that
        mask[t] (bool [T, max_seq_length]) allows. Returns float32 logits [T, vocab]."""
        return self._run((tokens.view(1, -1), slots, mask, positions))

    def shares_kv_with(self, other) -> bool:
        """Whether this level's cache can take `other` level's keys and values slot for slot: the same
        layers, heads, head size, dtype and device (a 4-bit cast of the same model). Where a feature
        head reads this level's hidden states, `other` must keep its own (copied along: Speculation
        asks it to, see share_features)."""
        theirs = getattr(other, "_caches", None)
        if not theirs or len(theirs) != len(self._caches):
            return False
        if self.features is not None and (
            other.features is None or other.features.shape[1:] != self.features.shape[1:]
        ):
            return False
        for m, o in zip(self._caches, theirs):
            a, b = m.k_cache, o.k_cache
            if (
                a.dtype != b.dtype
                or a.device != b.device
                or a.shape[:2] != b.shape[:2]
                or a.shape[3:] != b.shape[3:]
            ):
                return False
        return True

    def share_features(self, other) -> bool:
        """Before a generation: if a feature head reads this level's hidden states and `other` (its
        verifier) is the same shape of model, ask `other` to keep its own, so that shares_kv_with can
        hold. Returns whether it asked."""
        a, b = self.model.config, getattr(getattr(other, "model", None), "config", None)
        same = b is not None and (a.dim, a.n_layer, a.n_local_heads, a.head_dim) == (
            b.dim, b.n_layer, b.n_local_heads, b.head_dim
        )  # fmt: skip
        if self.keep_features and same and hasattr(other, "keep_features"):
            other.keep_features = True
            return True
        return False

    @torch.no_grad()
    def copy_kv(self, other, start: int, end: int):
        """Cache slots start..end-1 from `other` (see shares_kv_with), in one call for every layer: a
        slice assignment per cache cost ~20 us, 1.3 ms a round for SmolLM2's 60 caches, and slicing
        them all for one torch._foreach_copy_ still ~0.4 ms, so on the CPU our kernels copy the rows
        (cpu_kernels.copy_slots) where they are loaded. The hidden states of those positions too, where
        a feature head reads them."""
        if self._kv is not None and getattr(other, "_kv", None) is not None and cpu_kernels.loaded():
            cpu_kernels.copy_slots(self._kv, other._kv, start, end)
        else:
            pairs = [
                (c[:, :, start:end], d[:, :, start:end])
                for m, o in zip(self._caches, other._caches)
                for c, d in ((m.k_cache, o.k_cache), (m.v_cache, o.v_cache))
            ]
            torch._foreach_copy_([c for c, _ in pairs], [d for _, d in pairs])
        if self.features is not None:
            self.features[start:end] = other.features[start:end]

    @torch.no_grad()
    def move_kv(self, src: Tensor, dst: Tensor):
        """Copy the cached keys/values of slots src to slots dst in every layer: after a tree round the
        accepted path moves from its scratch slots to the positions sequential decoding would use.
        The gather happens before the scatter, so overlapping ranges are safe."""
        for cache in self._caches:
            cache.k_cache[:, :, dst] = cache.k_cache[:, :, src]
            cache.v_cache[:, :, dst] = cache.v_cache[:, :, src]
        if self.features is not None:
            self.features[dst] = self.features[src]


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

    def propose_tree(self, tokens: list[int], depth: int, nodes: int) -> "Tree":
        """Every earlier occurrence of the tail, not only the most recent: each one's continuation (up
        to `depth` tokens) is a path, merged into a trie of at most `nodes` nodes. Longest tails first,
        then the most recent occurrences; a node's children are tried in that order."""
        L = len(tokens)
        tree = Tree([], [])
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for n in range(min(self.n, L - 1), self.min_n - 1, -1):
            tail = tokens[L - n :]
            for start in range(L - n - 1, -1, -1):
                if tokens[start : start + n] != tail:
                    continue
                parent = -1
                for x in tokens[start + n : start + n + depth]:
                    if (parent, x) not in index:
                        if len(tree) == nodes:
                            return tree
                        index[parent, x] = tree.add(x, parent)
                    parent = index[parent, x]
        return tree


def is_proposer(level) -> bool:
    """Model levels return logits (`forward`); model-free proposers return tokens (`propose`)."""
    return hasattr(level, "propose")


# ---------------------------------------------------------------------------------------------------
# The baseline: one target forward per token.
# ---------------------------------------------------------------------------------------------------


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

    # Where the kernels run every linear, ATen's own small ops take one thread (serial_aten says why);
    # the models do not change between steps (decoding_loop).
    with cpu_kernels.serial_aten(cpu_kernels.decodes_on_kernels(level.model)), cpu_kernels.decoding_loop():
        sync(level.device)
        t0 = time.perf_counter()
        level.reset(prompt.numel() + max_new_tokens)
        # The prompt but its last token in one forward, then that token alone: as speculative decoding
        # feeds it (its prefill stops one short, and the first round's forward starts with it). A long
        # prefill may take another GEMM than short forwards do (accel.LONG_FORWARD), and this way the
        # cache holds the same bits in both, so greedy speculation returns these tokens bit for bit.
        if prompt.numel() > 1:
            level.forward(prompt[:-1], 0, last=1)
        tok = pick(level.forward(prompt[-1:], prompt.numel() - 1)[-1])
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
        sync(level.device)
        stats.total_time = time.perf_counter() - t0
    stats.new_tokens = len(out)
    return torch.tensor(out, dtype=torch.long), stats


# ---------------------------------------------------------------------------------------------------
# Speculative decoding, any number of levels.
#
# levels[0] is the target; levels[i] (i >= 1) proposes k[i] tokens per round to levels[i-1]. A level
# that has a level below it produces its proposals *by speculative decoding against that level*, so the
# level above sees exactly what this level alone would have sampled (or, greedy, its own argmax run).
# One recursion, `round` <-> `propose`, serves every stack: plain SD, ML-SpecQD's BF16 > MXFP4 > small
# draft, SpecMQuant's trees, or a model-free n-gram proposer at the bottom.
#
# All levels share one token buffer `buf`. A level working on buf[:L] only ever writes at positions
# >= L, and the levels it calls write further right, so buf[:L] is always the context everyone agrees on.
# Each level remembers how many leading positions of buf its KV cache holds (`seen`); every write to buf
# lowers that count for all levels, and before a forward a level first feeds what it has not seen yet.
# ---------------------------------------------------------------------------------------------------


class Speculation:
    """One generation with a stack of levels. `speculative_decode` is the way in; the class is public so
    that tests can look at the shared buffer and the per-level cache bookkeeping.

    buf: the token buffer shared by all levels (prompt, then committed tokens, then in-flight drafts).
    seen[i]: leading positions of buf whose keys/values level i's cache holds (for a proposer: the
        length of its host copy of buf). Any write to buf at position t lowers every seen to <= t.
    k[i]: tokens level i proposes per round (k[0] is unused; 0 switches level i off), which the
        k policy (policy.py) may change after every round, from past outcomes only.
    origin[t]: the level that produced buf[t] (0: the target's own correction, bonus or plain step).
    trace: with trace=True, one dict per verification round (see `note`), for pictures of a run.
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
        trees=None,
        trace=False,
        policy="fixed",
        share_kv=True,
    ):
        self.k = [None] + _check_levels(levels, k, temperature, top_k, top_p)
        self.trees = [None] + check_trees(levels, trees)
        self.levels = levels
        self.k_max = [None] + [2 * x for x in self.k[1:]]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = generator
        self.policy = make_policy("grow" if adaptive else policy, self.k)
        self.share_kv = share_kv
        self.device = getattr(levels[0], "device", torch.device("cpu"))
        self.vocab = levels[0].vocab_size
        # Timing a CUDA forward needs a sync; on the CPU the clock alone is right.
        timed = profile or self.device.type != "cuda"
        self.meter = Meter([lv.name for lv in levels], self.k, self.device, timed)
        self.stats = self.meter.levels
        self.buf = torch.empty(0, dtype=torch.long, device=self.device)
        self.seen = [0] * len(levels)
        self.origin: list[int] = []
        self.host = [[] for _ in levels]  # proposers read the sequence on the host
        self.trace = [] if trace else None

    # -- the shared buffer and the caches ---------------------------------------------------------

    def write(self, pos: int, tokens: Tensor, by: int):
        """Put tokens, produced by level `by`, at buf[pos:]. No cache is rolled back: positions >= pos
        just stop counting as seen, and the next forward of each level overwrites them (the mask hides
        them meanwhile)."""
        n = tokens.numel()
        self.buf[pos : pos + n] = tokens
        self.origin[pos : pos + n] = [by] * n
        self.seen = [min(s, pos) for s in self.seen]

    def logits(self, i: int, start: int, end: int) -> Tensor:
        """Level i's logits at positions start..end-1 (row t predicts token t+1), given buf[:end].
        The forward first feeds the tokens of buf the level has not seen yet, so T >= end - start; this
        is also how a draft catches up on its own last token and the bonus after a fully accepted round."""
        self.catch_up(i, start)
        level, s = self.levels[i], self.seen[i]
        # Writes lower `seen`, so a level never holds positions past the first one it is asked about.
        assert s <= start, f"cache bookkeeping: level {i} has seen {s} positions, asked from {start}"
        tokens = self.buf[s:end]
        if level.vocab_size < self.vocab:
            # Ids past a smaller draft's vocabulary (padding rows of the target) cannot be embedded.
            tokens = tokens.clamp(max=level.vocab_size - 1)
        self.tell_features(i)
        t0 = self.meter.start()
        out = level.forward(tokens, s, last=end - start)  # no logits for the catch-up tokens
        self.meter.stop(i, t0, end - s)
        self.seen[i] = end
        # Compare on the target's ids: drop a draft's extra padding rows.
        return out[:, : self.vocab]

    def catch_up(self, i: int, upto: int) -> bool:
        """A draft level sharing its verifier's keys and values (`lends[i]`) takes the verifier's for
        the positions it has not seen, up to `upto` and as far as the verifier has computed them,
        instead of computing its own: after a round it feeds only the last token, not the tokens it
        missed, and its proposals attend to the verifier's more exact keys and values (acceptance of
        an MXFP4 draft of SmolLM2: 0.43 -> 0.54 from the prompt's alone). A draft's numbers only change
        what it proposes, never the output distribution. Returns whether seen[i] reached `upto`."""
        if self.lends[i]:
            end = min(upto, self.seen[i - 1])
            if end > self.seen[i]:
                self.levels[i].copy_kv(self.levels[i - 1], self.seen[i], end)
                self.seen[i] = end
        return self.seen[i] >= upto

    def tell_features(self, i: int):
        """A feature head (head.py) reads the hidden states of the level above it: those of buf's
        first seen[i-1] positions are that level's, for the tokens now in buf."""
        if hasattr(self.levels[i], "known"):
            self.levels[i].known = self.seen[i - 1]

    def probs(self, logits: Tensor) -> Tensor:
        """The one warping for every level, padded with zeros to the target's vocabulary."""
        p = sampling.probs(logits, self.temperature, self.top_k, self.top_p)
        return torch.nn.functional.pad(p, (0, self.vocab - p.shape[-1]))

    def _host_sequence(self, j: int, L: int) -> list[int]:
        """buf[:L] as a list for proposer level j, which reads the sequence on the host: its copy is
        brought up to date with one small transfer of what it has not seen."""
        self.host[j] = self.host[j][: self.seen[j]] + self.buf[self.seen[j] : L].tolist()
        self.seen[j] = L
        return self.host[j]

    # -- the recursion ------------------------------------------------------------------------------

    def round(self, i: int, L: int, m: int) -> tuple[int, Tensor | None]:
        """Level i extends buf[:L]: level i+1 proposes up to m tokens, level i checks them all in one
        forward, keeps the first a of them and adds one token of its own (correction or bonus; with
        nothing proposed, a plain step). Writes buf[L:L+a+1] and returns a and, when sampling, level i's
        distributions at those a+1 positions: the q that level i-1 checks them against."""
        if m > 0 and self.trees[i + 1] is not None:
            return tree_round(self, i, L, m)
        q, t0 = None, self.meter.start()
        if m > 0:
            m, q = self.propose(i + 1, L, m)  # may be fewer than asked (an n-gram lookup)
        t1 = self.meter.start()
        logits = self.logits(i, L - 1, L + m)  # m+1 rows: one per draft, one for the bonus
        x = self.buf[L : L + m]
        if self.temperature == 0:
            # Greedy: accept while the draft is the verifier's argmax, then the argmax itself.
            best = sampling.greedy(logits)
            a = _leading_true(x == best[:m]) if m else 0
            nxt, p = best[a], None
        else:
            p = self.probs(logits)
            a = 0
            if m:
                at = torch.arange(m, device=self.device)
                u = torch.rand(m, generator=self.generator, device=self.device)
                a = _leading_true(u < acceptance_prob(p[at, x], q[at, x]))
            # After a rejection at a: the residual there; after m acceptances: a bonus from p.
            dist = residual(p[a], q[a]) if a < m else p[a]
            nxt = sampling.sample(dist, self.generator)
        if self.trace is not None:
            self.note(i, L, x.tolist(), a, int(nxt))
        self.write(L + a, nxt.view(1), by=i)
        self.meter.round_time(i, m, t0, t1)
        self.after_round(i, m, a)
        return a, None if p is None else p[: a + 1]

    def propose(self, j: int, L: int, m: int) -> tuple[int, Tensor | None]:
        """Level j proposes up to m tokens after buf[:L], written at buf[L:]. Returns how many, and
        (sampling) the distribution each was drawn from, rows [n, vocab]; None when greedy."""
        level = self.levels[j]
        if is_proposer(level):
            host = self._host_sequence(j, L)
            t0 = self.meter.start()
            tokens = level.propose(host, m)[:m]
            self.meter.stop(j, t0, len(tokens))
            if not tokens:
                return 0, None
            x = torch.tensor(tokens, dtype=torch.long, device=self.device)
            self.write(L, x, by=j)
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

    def after_round(self, i: int, m: int, a: int):
        """Level i accepted a of m proposals: record it, and let the k policy pick the level below's
        next k. k only depends on past outcomes, so the output distribution is unchanged."""
        self.meter.round(i, m, a)
        if i + 1 < len(self.levels) and (m or not self.k[i + 1]):
            used = self.stats[i + 1].k_used
            used[self.k[i + 1]] = used.get(self.k[i + 1], 0) + 1
        self.policy.update(self, i, m, a)

    def note(self, i: int, L: int, proposed: list[int], a: int, token: int, tree_nodes: int = 0):
        """One round in the trace: level i, at position L, kept the first a of the proposed tokens
        (produced by the levels in `by`; for a tree, only the accepted path) and added `token` itself
        at L + a (a correction, a bonus or a plain step's token)."""
        by = self.origin[L : L + len(proposed)]
        self.trace.append(
            dict(level=i, pos=L, proposed=proposed, by=by, accepted=a, token=token, nodes=tree_nodes)
        )

    # -- one generation -------------------------------------------------------------------------------

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

        # Where the kernels run every level's linears, ATen's own small ops take one thread (serial_aten);
        # the models do not change between steps (decoding_loop).
        models = [level.model for level in self.levels if hasattr(level, "model")]
        serial = cpu_kernels.serial_aten(all(cpu_kernels.decodes_on_kernels(m) for m in models))
        with serial, cpu_kernels.decoding_loop():
            sync(self.device)
            t0 = time.perf_counter()
            self.buf = torch.zeros(limit, dtype=torch.long, device=self.device)
            self.buf[:P] = prompt
            self.origin = [-1] * P
            self.seen = [0] * len(self.levels)
            self.lends = [False] * len(self.levels)
            if self.share_kv:
                for i in range(1, len(self.levels)):
                    if hasattr(self.levels[i], "share_features"):
                        self.levels[i].share_features(self.levels[i - 1])
            for i, level in enumerate(self.levels):
                level.reset(self._cache_size(i, limit))
                self.lends[i] = self.share_kv and i > 0 and _shares_kv(level, self.levels[i - 1])
                if P < 2 or is_proposer(level):
                    continue
                # Prefill: every level sees the prompt but its last token (a level sharing its verifier's
                # keys and values copies them instead).
                if not self.catch_up(i, P - 1):
                    self.logits(i, P - 2, P - 1)
            self.policy.start(self)

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
            sync(self.device)
            stats.total_time = time.perf_counter() - t0
        stats.new_tokens = len(out)
        stats.origin = self.origin[P : P + len(out)]
        stats.trace = self.trace
        return torch.tensor(out, dtype=torch.long), stats

    def _cache_size(self, i: int, limit: int) -> int:
        """Positions level i's cache needs: the sequence, plus scratch slots for the trees it verifies
        (their nodes) or drafts (the nodes it expands), within its context."""
        slack = 0
        if i + 1 < len(self.levels) and self.trees[i + 1] is not None:
            slack = self.trees[i + 1].nodes
        if self.trees[i] is not None and not is_proposer(self.levels[i]):
            slack = max(slack, (self.k_max[i] - 1) * self.trees[i].topk)
        context = _context(self.levels[i])
        return limit + slack if context is None else min(limit + slack, context)


def _shares_kv(level, verifier) -> bool:
    shares = getattr(level, "shares_kv_with", None)
    return shares is not None and shares(verifier)


def _leading_true(ok: Tensor) -> int:
    """Length of the leading run of accepted drafts: the one host sync of a verification round."""
    return int(torch.cumprod(ok.int(), 0).sum())


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
    trees: list | None = None,
    trace: bool = False,
    policy: str = "fixed",
    share_kv: bool = True,
) -> tuple[Tensor, SpecStats]:
    """Multi-level speculative decoding. levels[0] is the target; levels[i] proposes k[i-1] tokens per
    round to levels[i-1] (k may be one int for all), producing them by speculative decoding against
    levels[i+1] when there is one. A level is a ModelLevel (or anything with forward(tokens, start_pos)
    -> logits [T, vocab], reset(max_seq_length), vocab_size, name) or a model-free proposer with
    propose(tokens, k) -> list of ids (NgramProposer), which must be the last level.

    temperature 0 is exact greedy: the target's own argmax tokens whatever the drafts. Otherwise the
    output is distributed exactly as sampling from the target with this temperature/top_k/top_p.
    policy: how each level's k changes during the run (policy.py): "fixed", "grow" (+1 after a fully
    accepted round, -1 after a rejection) or "cost" (the k with the most expected tokens per second
    from measured acceptances and forward times, 0 switching a level off); adaptive=True is "grow".
    k is then the initial k. profile: sync around forwards on CUDA to time them.
    trees: one entry per draft level, None (it drafts sequences) or a TreeShape (it drafts token trees
    k deep, which the level above verifies in one forward; see Speculation.tree_round). A model that
    drafts trees must be the last level; the levels above it may be anything. The SpecMQuant stack is
    levels=[target, intermediate, drafter], trees=[None, TreeShape(...)]; EAGLE-2 is [target, drafter],
    trees=[TreeShape(...)].

    A level asked for m tokens asks the level below for at most m - 1 per round (its own correction or
    bonus makes the m-th), so nothing is ever drafted past what is needed: with k[i-1] = 1 level i
    takes plain steps and the levels below it are not used.
    trace: keep one record per verification round in stats.trace (see Speculation.note).
    share_kv: a draft level whose cache has its verifier's shapes (a 4-bit cast of it) takes the
    verifier's keys and values for every position the verifier has computed (the prompt, verified
    tokens) instead of computing its own (Speculation.catch_up); False: every level computes its own.
    Either way the output distribution is the target's.
    Returns the new ids (1-D, ending at the first stop id if one is produced) and SpecStats; its
    `origin` says which level produced each new token (0: the target itself)."""
    run = Speculation(
        levels, k, temperature, top_k, top_p, generator, adaptive, profile, trees, trace, policy,
        share_kv,
    )  # fmt: skip
    return run.generate(prompt, max_new_tokens, stop_ids, on_token)


# ---------------------------------------------------------------------------------------------------
# Input checks: bad input gets a clear error here, not a traceback from deep inside.
# ---------------------------------------------------------------------------------------------------

# A draft's vocabulary may differ from the target's by padding rows only (e.g. 151936 vs 152064): we
# compare on the target's ids. A larger difference means another tokenizer, which levels.py checks.
MAX_VOCAB_PADDING = 1024


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
    for i, level in enumerate(levels):
        above = getattr(level, "above", None)
        if above is not None and (i == 0 or levels[i - 1] is not above):
            raise ValueError(
                f"level {i} ({level.name}) reads the features of level {above.name}: it must sit right "
                f"below it, but the level above it is {levels[i - 1].name if i else 'none'}"
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
