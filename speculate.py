"""Decoding: the autoregressive baseline and (recursive, multi-level) speculative decoding.

Blind to weight formats: a level is any object with the small interface below, whether a BF16 model,
its MXFP4 cast, a smaller checkpoint or a model-free proposer. Nothing here imports mxfp4 or kernels.
"""

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

import sampling

# Compiled levels (see ModelLevel._compiled and reset). Every level shares Transformer.forward's code
# object, so each (model, T) pair is one of dynamo's cache entries for it: the default limit of 8 was
# exhausted within two prompts of a two-level run (steps, verifications of each length, trees), and under
# fullgraph=True the next shape is a hard error. Levels x distinct T stay far below 256 entries; every
# cache growth compiles them all again (new buffer shapes), which doubling keeps to a few growths over
# a run, within dynamo's accumulated limit once that is raised alike.
COMPILE_MAX_TOKENS = 64
MIN_COMPILED_CACHE = 256
RECOMPILE_LIMIT = 256


def _allow_recompiles(limit: int):
    config = torch._dynamo.config
    # recompile_limit was cache_size_limit before torch 2.7; accumulated_recompile_limit likewise.
    for names, value in (
        (("recompile_limit", "cache_size_limit"), limit),
        (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 8 * limit),
    ):
        name = next((n for n in names if hasattr(config, n)), None)
        if name is not None:
            setattr(config, name, max(getattr(config, name), value))


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
            _allow_recompiles(RECOMPILE_LIMIT)

    def _compiled(self, T: int, start_pos: int | None = None) -> bool:
        """Whether a forward of T tokens takes the compiled path. Only decode-sized ones do: a
        prefill (start_pos 0) or a forward longer than COMPILE_MAX_TOKENS runs eagerly, as gpt-fast's
        prefill does. It is compute-bound, so launch overhead hardly counts there, and compiling it
        would cost one compilation per prompt length."""
        return self.compile and T <= COMPILE_MAX_TOKENS and start_pos != 0

    def reset(self, max_seq_length: int):
        """Fresh cache for a new sequence. Reallocates only when it must grow, so that captured CUDA
        graphs stay valid: stale entries from the last sequence are masked, never read."""
        if max_seq_length > self.max_seq_length:
            if self.compile:  # new buffer shapes recompile every graph: grow by doubling, not per prompt
                size = max(MIN_COMPILED_CACHE, 1 << (max_seq_length - 1).bit_length())
                max_seq_length = min(size, self.model.config.block_size)
            self.model.setup_caches(1, max_seq_length)
            self.max_seq_length = max_seq_length
        # The modules holding caches, for move_kv (walking the whole model per tree round cost ~2 ms).
        self._caches = [m for m in self.model.modules() if hasattr(m, "k_cache") and hasattr(m, "v_cache")]

    def _run(self, args: tuple, start_pos: int | None = None) -> Tensor:
        """The model on args (tokens [1, T] first), compiled or eager (see _compiled): float32 [T, V]."""
        if not self._compiled(args[0].shape[1], start_pos):
            return self.model(*args)[0].float()
        # Clone out of the CUDA graph's static output buffer before the next replay reuses it.
        return self._forward(*args)[0].float().clone()

    @torch.no_grad()
    def forward(self, tokens: Tensor, start_pos: int) -> Tensor:
        pos = torch.arange(start_pos, start_pos + tokens.numel(), device=self.device)
        return self._run((tokens.view(1, -1), pos), start_pos)

    @torch.no_grad()
    def forward_tree(self, tokens: Tensor, slots: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """A forward over tokens that need not form a sequence (a token tree): token t's key/value go to
        cache slot slots[t], it is rotated as position positions[t], and it attends to the slots that
        mask[t] (bool [T, max_seq_length]) allows. Returns float32 logits [T, vocab]."""
        return self._run((tokens.view(1, -1), slots, mask, positions))

    @torch.no_grad()
    def move_kv(self, src: Tensor, dst: Tensor):
        """Copy the cached keys/values of slots src to slots dst in every layer: after a tree round the
        accepted path moves from its scratch slots to the positions sequential decoding would use.
        The gather happens before the scatter, so overlapping ranges are safe."""
        for cache in self._caches:
            cache.k_cache[:, :, dst] = cache.k_cache[:, :, src]
            cache.v_cache[:, :, dst] = cache.v_cache[:, :, src]


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


def candidate_acceptance(mass: list[float], total: float = 1.0) -> list[float]:
    """Deterministic candidates x1, x2, ... with p(x_j) = mass[j] (p sums to total): [j] is the chance
    of accepting x_j once x1..x_{j-1} have been rejected and removed from p, p(x_j) / (total - p(x1) -
    ... - p(x_{j-1})). Tried in order, x_j is then the output with probability exactly p(x_j)."""
    out, left = [], total
    for pc in mass:
        out.append(min(1.0, pc / left) if left > 0 else 1.0)
        left -= pc
    return out


def candidate_residual(p: Tensor, candidates: Tensor) -> Tensor:
    """What to sample after every candidate was rejected: p without them, renormalised. If they held
    all of p's mass (within rounding) that happens with probability ~0, and any draw from p will do."""
    rest = p.index_fill(-1, candidates, 0.0)
    total = rest.sum(-1, keepdim=True)
    return rest / total if float(total) > RESIDUAL_EPS else p


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


@dataclass(frozen=True)
class TreeShape:
    """How a level drafts a token tree instead of a sequence (EAGLE-2's dynamic trees). Its depth is
    the level's k, as for a sequence: the most tokens one round can accept.

    nodes: the tree's size after the final rerank (what the level above verifies in one forward).
    topk: children per expanded node, and nodes expanded per depth (EAGLE-2 uses one number for both).
    """

    nodes: int = 30
    topk: int = 10

    def __post_init__(self):
        if self.nodes < 1 or self.topk < 1:
            raise ValueError(f"a tree needs nodes >= 1 and topk >= 1, got {self}")


class Tree:
    """A draft tree over a context buf[:L]. Node n holds token tokens[n] and hangs under parents[n]
    (-1: under the root, which is the context's last token buf[L-1]). Parents come before their
    children, and a node's children are distinct tokens in the order the verifier tries them."""

    def __init__(self, tokens: list[int], parents: list[int]):
        self.tokens, self.parents, self.depth = [], [], []
        self.children: dict[int, list[int]] = {-1: []}
        for x, parent in zip(tokens, parents):
            self.add(x, parent)

    def add(self, token: int, parent: int) -> int:
        if not -1 <= parent < len(self.tokens):
            raise ValueError(f"node {len(self.tokens)}: parent {parent} must be an earlier node or -1")
        if any(self.tokens[c] == token for c in self.children[parent]):
            raise ValueError(f"token {token} is already a child of node {parent}")
        n = len(self.tokens)
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.depth.append(1 if parent < 0 else self.depth[parent] + 1)
        self.children[parent].append(n)
        self.children[n] = []
        return n

    def __len__(self) -> int:
        return len(self.tokens)

    def path(self, n: int) -> list[int]:
        """The nodes from the root's child down to n."""
        out = []
        while n >= 0:
            out.append(n)
            n = self.parents[n]
        return out[::-1]


def tree_mask(S: int, start: int, L: int, node_slots: list[int], visible: list[list[int]]) -> Tensor:
    """The attention mask [T, S] of a forward that feeds the context tokens at slots start..L-1 (each
    sees the slots up to its own) and then tree nodes at node_slots, node t seeing the context buf[:L]
    and the slots visible[t] (its ancestors' and its own)."""
    rows = torch.arange(start, L)[:, None] >= torch.arange(S)[None, :]
    nodes = (torch.arange(S) < L).repeat(len(node_slots), 1)
    for t, slots in enumerate(visible):
        nodes[t, slots] = True
    return torch.cat([rows, nodes])


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
    time_by_tokens[T]: [forwards, seconds] of this level's forwards over T tokens (when timed): the
        cost of verifying a sequence or a tree of each size.
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
    tree_nodes: int = 0

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
        what = "depth" if s.tree_nodes else "position"
        lines.append(f"acceptance by {what}, level {i} {s.name}: {pos or '-'}")
        if s.tree_nodes:
            lines.append(f"mean tree verified, level {i} {s.name}: {s.mean_tree_nodes:.1f} nodes")
    for i, s in enumerate(stats.levels):
        if len(s.time_by_tokens) > 1:
            ms = " ".join(f"{t}:{1e3 * sec / n:.1f}" for t, (n, sec) in sorted(s.time_by_tokens.items()))
            lines.append(f"ms per forward by tokens fed, level {i} {s.name}: {ms}")
    return "\n".join(lines)


def _context(level) -> int | None:
    model = getattr(level, "model", None)
    return model.config.block_size if model is not None else None


def _check_trees(levels, trees) -> list:
    """trees: None, or one entry per draft level (None for a sequence draft, a TreeShape for a tree)."""
    n = len(levels) - 1
    if trees is None:
        return [None] * n
    trees = list(trees)
    if len(trees) != n:
        raise ValueError(f"trees has {len(trees)} entries but there are {n} draft levels")
    for i, shape in enumerate(trees, start=1):
        if shape is None:
            continue
        if not isinstance(shape, TreeShape):
            raise ValueError(f"trees[{i - 1}] must be None or a TreeShape, got {shape!r}")
        level, above = levels[i], levels[i - 1]
        if is_proposer(level) and not hasattr(level, "propose_tree"):
            raise ValueError(f"level {i} ({level.name}) cannot propose trees (no propose_tree)")
        if not is_proposer(level) and i < n:
            raise ValueError(
                f"level {i} ({level.name}) drafts trees with its own forwards, so it must be the last "
                "level: a tree cannot itself be verified by the level below it"
            )
        if not hasattr(above, "forward_tree"):
            raise ValueError(f"level {i - 1} ({above.name}) cannot verify trees (no forward_tree)")
    return trees


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
        trees=None,
    ):
        self.k = [None] + _check_levels(levels, k, temperature, top_k, top_p)
        self.trees = [None] + _check_trees(levels, trees)
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
        self._tock(i, t0, end - s)
        self.seen[i] = end
        # Compare on the target's ids: drop a draft's extra padding rows.
        return out[start - s :, : self.vocab]

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

    def _forward_tree(self, i, tokens: Tensor, start: int, L: int, node_slots, positions, visible) -> Tensor:
        """Level i's logits for `tokens`: first the context buf[start:L] at its own slots (each sees the
        slots up to its own), then tree nodes at node_slots, node t seeing buf[:L] and the slots
        visible[t]; `positions` are the RoPE positions of all of them."""
        level = self.levels[i]
        mask = tree_mask(level.max_seq_length, start, L, node_slots, visible).to(self.device)
        if level.vocab_size < self.vocab:
            tokens = tokens.clamp(max=level.vocab_size - 1)
        slots = torch.tensor(list(range(start, L)) + node_slots, device=self.device)
        t0 = self._tick()
        out = level.forward_tree(tokens, slots, torch.tensor(positions, device=self.device), mask)
        self._tock(i, t0, tokens.numel())
        return out[:, : self.vocab]

    def _tick(self):
        if not self.timed:
            return 0.0
        _sync(self.device)
        return time.perf_counter()

    def _tock(self, i, t0, tokens):
        """Close the timing of one forward of level i over `tokens` tokens, and count it."""
        s = self.stats[i]
        s.forwards += 1
        s.tokens_fed += tokens
        if self.timed:
            _sync(self.device)
            dt = time.perf_counter() - t0
            s.forward_time += dt
            n, sec = s.time_by_tokens.get(tokens, (0, 0.0))
            s.time_by_tokens[tokens] = (n + 1, sec + dt)

    # -- the recursion ------------------------------------------------------------------------------

    def propose(self, j: int, L: int, m: int) -> tuple[int, Tensor | None]:
        """Level j proposes up to m tokens after buf[:L], written at buf[L:]. Returns how many, and
        (sampling) the distribution each was drawn from, rows [n, vocab]; None when greedy."""
        level = self.levels[j]
        if is_proposer(level):
            host = self._host_sequence(j, L)
            t0 = self._tick()
            tokens = level.propose(host, m)[:m]
            self._tock(j, t0, len(tokens))
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
        if m > 0 and self.trees[i + 1] is not None:
            return self.tree_round(i, L, m)
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

    # -- trees ------------------------------------------------------------------------------------
    #
    # A tree round: level i+1 drafts a token tree after buf[:L] (draft_tree), level i runs one forward
    # over all its nodes with a tree mask (tree_logits), walks down from the root accepting one child
    # per depth (greedy: the child equal to its argmax; sampling: the children as deterministic
    # candidates, below), then moves the accepted path's keys/values from the scratch slots L, L+1, ...
    # where the nodes were computed to the slots sequential decoding would have used. Level i's cache
    # is then what a sequential run writes, and the round hands up a sequence like any other round,
    # so a tree link can sit anywhere in a stack (SpecMQuant: target < intermediate < tree drafter).

    def tree_round(self, i: int, L: int, m: int) -> tuple[int, Tensor | None]:
        """round() when level i+1 drafts trees: depth at most m, so it never overshoots either."""
        nodes = min(self.trees[i + 1].nodes, self._room(i, L))
        tree = self.draft_tree(i + 1, L, m, nodes) if nodes > 0 else Tree([], [])
        if not len(tree):  # e.g. no n-gram match: a plain step
            return self.round(i, L, 0)
        logits = self.tree_logits(i, L, tree)  # row 0: the root (position L-1); row 1 + n: node n
        p = None if self.temperature == 0 else self.probs(logits)
        path, nxt = self._walk_greedy(tree, logits) if p is None else self._walk_sampled(tree, p)
        a = len(path)
        self.write(L, torch.tensor([tree.tokens[n] for n in path] + [nxt], device=self.device))
        if a:
            src = torch.tensor(path, device=self.device) + L
            self.levels[i].move_kv(src, torch.arange(L, L + a, device=self.device))
        self.seen[i] = L + a  # the path's keys/values now sit at L..L+a-1, as a sequence's would
        self._record(i, max(tree.depth), a)
        self.stats[i + 1].tree_nodes += len(tree)
        return a, None if p is None else p[[0] + [1 + n for n in path]]

    def tree_logits(self, i: int, L: int, tree: Tree) -> Tensor:
        """Level i's logits at the root (position L-1) and at every node of the tree, given buf[:L]: one
        forward that first feeds the context level i has not seen, then the nodes at scratch slots
        L + n, each rotated as position L - 1 + depth and seeing the context and its own path."""
        s, N = self.seen[i], len(tree)
        assert s <= L - 1, f"cache bookkeeping: level {i} has seen {s} positions, asked from {L - 1}"
        tokens = torch.cat([self.buf[s:L], torch.tensor(tree.tokens, device=self.device)])
        node_slots = [L + n for n in range(N)]  # node n at scratch slot L + n
        positions = list(range(s, L)) + [L - 1 + d for d in tree.depth]
        visible = [[L + a for a in tree.path(n)] for n in range(N)]
        out = self._forward_tree(i, tokens, s, L, node_slots, positions, visible)
        self.seen[i] = L  # the scratch slots hold nodes, not the sequence
        return out[L - 1 - s :]

    def _walk_greedy(self, tree: Tree, logits: Tensor) -> tuple[list[int], int]:
        """Follow the verifier's argmax down the tree: the accepted path and the token after it."""
        best = sampling.greedy(logits).tolist()
        path, node = [], -1
        while True:
            b = best[node + 1]
            child = next((c for c in tree.children[node] if tree.tokens[c] == b), None)
            if child is None:
                return path, b
            path.append(child)
            node = child

    def _walk_sampled(self, tree: Tree, p: Tensor) -> tuple[list[int], int]:
        """Exact sampling from the verifier's p down the tree. At a node with children x1, x2, ...
        (deterministic candidates: fixed before the verifier's randomness), accept x1 with probability
        p(x1); if rejected, remove it (p(x1) = 0, renormalise) and accept x2 with its new probability
        p(x2) / (1 - p(x1)), and so on; if all are rejected, sample the renormalised rest. Each x_j thus
        comes out with probability exactly p(x_j) and every other token with p(x), whatever the drafts
        were: the output is a draw from p at every depth."""
        path, node = [], -1
        while True:
            row, kids = p[node + 1], tree.children[node]
            if not kids:
                return path, int(sampling.sample(row, self.generator))
            cand = torch.tensor([tree.tokens[c] for c in kids], device=self.device)
            accept = candidate_acceptance(row[cand].double().tolist(), float(row.double().sum()))
            u = torch.rand(len(kids), generator=self.generator, device=self.device).tolist()
            child = next((c for c, a, uc in zip(kids, accept, u) if uc < a), None)
            if child is None:
                return path, int(sampling.sample(candidate_residual(row, cand), self.generator))
            path.append(child)
            node = child

    def draft_tree(self, j: int, L: int, depth: int, nodes: int) -> Tree:
        """Level j's tree after buf[:L], at most `depth` deep and `nodes` big. A proposer builds it from
        the sequence; a model grows it as EAGLE-2 does: score every candidate by its cumulative draft
        log-probability, expand the topk best new nodes of each depth with their topk children (one
        forward per depth, the expanded nodes in scratch slots with a tree mask), then keep the best
        `nodes` candidates of all depths. A child never outscores its parent, so the kept set is a tree."""
        level, shape = self.levels[j], self.trees[j]
        if is_proposer(level):
            host = self._host_sequence(j, L)
            t0 = self._tick()
            tree = level.propose_tree(host, depth, nodes)
            self._tock(j, t0, len(tree))
            return tree
        tokens, parents, scores, depths = [], [], [], []  # every candidate of every depth
        chain = {-1: []}  # expanded candidate -> the scratch slots of its path (its own last)

        def expand(logits: Tensor, frontier: list[int], d: int) -> list[int]:
            # Each frontier node's topk children become candidates; the topk best of them are the
            # next frontier. Zero-probability children (outside a draft's vocabulary subset, or cut
            # by top-k/top-p when sampling) are not candidates.
            lp = torch.log_softmax(logits, -1) if self.temperature == 0 else self.probs(logits).log()
            values, ids = lp.topk(min(shape.topk, lp.shape[-1]), dim=-1)
            new = []
            for f, vals, xs in zip(frontier, values.tolist(), ids.tolist()):
                base = scores[f] if f >= 0 else 0.0
                for v, x in zip(vals, xs):
                    if v == float("-inf"):
                        break
                    new.append(len(tokens))
                    tokens.append(x)
                    parents.append(f)
                    scores.append(base + min(v, 0.0))  # log p <= 0 up to rounding: never above the parent
                    depths.append(d)
            return sorted(new, key=lambda c: -scores[c])[: shape.topk]

        frontier = expand(self.logits(j, L - 1, L), [-1], 1)
        for d in range(2, depth + 1):
            used = len(chain) - 1
            frontier = frontier[: max(0, self._room(j, L) - used)]
            if not frontier:
                break
            slots = [L + used + t for t in range(len(frontier))]
            for c, sl in zip(frontier, slots):
                chain[c] = chain[parents[c]] + [sl]
            x = torch.tensor([tokens[c] for c in frontier], device=self.device)
            positions = [L + d - 2] * len(frontier)  # the frontier is at depth d-1: position L-1+(d-1)
            logits = self._forward_tree(j, x, L, L, slots, positions, [chain[c] for c in frontier])
            frontier = expand(logits, frontier, d)
        # The rerank: best score first, a parent before its children on equal scores.
        keep = sorted(range(len(tokens)), key=lambda c: (-scores[c], depths[c], c))[:nodes]
        # Breadth-first order (parents first); siblings stay best first, the order they are tried in.
        keep.sort(key=lambda c: (depths[c], -scores[c], c))
        index, tree = {-1: -1}, Tree([], [])
        for c in keep:
            if parents[c] in index:  # always true (see the docstring), kept as a guard
                index[c] = tree.add(tokens[c], index[parents[c]])
        return tree

    def _room(self, i: int, L: int) -> int:
        """Scratch slots level i's cache has from position L on."""
        size = getattr(self.levels[i], "max_seq_length", None)
        return size - L if size is not None else 1 << 30

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
            level.reset(self._cache_size(i, limit))
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
    trees: list | None = None,
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
    trees: one entry per draft level, None (it drafts sequences) or a TreeShape (it drafts token trees
    k deep, which the level above verifies in one forward; see Speculation.tree_round). A model that
    drafts trees must be the last level; the levels above it may be anything. The SpecMQuant stack is
    levels=[target, intermediate, drafter], trees=[None, TreeShape(...)]; EAGLE-2 is [target, drafter],
    trees=[TreeShape(...)].

    A level asked for m tokens asks the level below for at most m - 1 per round (its own correction or
    bonus makes the m-th), so nothing is ever drafted past what is needed: with k[i-1] = 1 level i
    takes plain steps and the levels below it are not used.
    Returns the new ids (1-D, ending at the first stop id if one is produced) and SpecStats."""
    run = Speculation(levels, k, temperature, top_k, top_p, generator, adaptive, profile, trees)
    return run.generate(prompt, max_new_tokens, stop_ids, on_token)
