"""Token trees: EAGLE-2's dynamic draft trees, verified in one forward with a tree mask.

A tree round: level i+1 drafts a token tree after buf[:L] (draft_tree), level i runs one forward over
all its nodes with a tree mask (tree_logits), walks down from the root accepting one child per depth
(greedy: the child equal to its argmax; sampling: the children as deterministic candidates, below),
then moves the accepted path's keys/values from the scratch slots L, L+1, ... where the nodes were
computed to the slots sequential decoding would have used. Level i's cache is then what a sequential
run writes, and the round hands up a sequence like any other round, so a tree link can sit anywhere in
a stack (SpecMQuant: target < intermediate < tree drafter).

The functions take the running `speculate.Speculation` as `sp`: its shared buffer, levels and meter.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

import sampling
from sampling import RESIDUAL_EPS


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


def check_trees(levels, trees) -> list:
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
        if _is_proposer(level) and not hasattr(level, "propose_tree"):
            raise ValueError(f"level {i} ({level.name}) cannot propose trees (no propose_tree)")
        if not _is_proposer(level) and i < n:
            raise ValueError(
                f"level {i} ({level.name}) drafts trees with its own forwards, so it must be the last "
                "level: a tree cannot itself be verified by the level below it"
            )
        if not hasattr(above, "forward_tree"):
            raise ValueError(f"level {i - 1} ({above.name}) cannot verify trees (no forward_tree)")
    return trees


def tree_round(sp, i: int, L: int, m: int) -> tuple[int, Tensor | None]:
    """round() when level i+1 drafts trees: depth at most m, so it never overshoots either."""
    nodes = min(sp.trees[i + 1].nodes, room(sp, i, L))
    tree = draft_tree(sp, i + 1, L, m, nodes) if nodes > 0 else Tree([], [])
    if not len(tree):  # e.g. no n-gram match: a plain step
        return sp.round(i, L, 0)
    logits = tree_logits(sp, i, L, tree)  # row 0: the root (position L-1); row 1 + n: node n
    p = None if sp.temperature == 0 else sp.probs(logits)
    path, nxt = walk_greedy(tree, logits) if p is None else walk_sampled(sp, tree, p)
    a = len(path)
    sp.write(L, torch.tensor([tree.tokens[n] for n in path], device=sp.device), by=i + 1)
    sp.write(L + a, torch.tensor([nxt], device=sp.device), by=i)
    if sp.trace is not None:
        sp.note(i, L, [tree.tokens[n] for n in path], a, int(nxt), len(tree))
    if a:
        src = torch.tensor(path, device=sp.device) + L
        sp.levels[i].move_kv(src, torch.arange(L, L + a, device=sp.device))
    sp.seen[i] = L + a  # the path's keys/values now sit at L..L+a-1, as a sequence's would
    sp.after_round(i, max(tree.depth), a)
    sp.meter.levels[i + 1].tree_nodes += len(tree)
    return a, None if p is None else p[[0] + [1 + n for n in path]]


def tree_logits(sp, i: int, L: int, tree: Tree) -> Tensor:
    """Level i's logits at the root (position L-1) and at every node of the tree, given buf[:L]: one
    forward that first feeds the context level i has not seen, then the nodes at scratch slots
    L + n, each rotated as position L - 1 + depth and seeing the context and its own path."""
    s, N = sp.seen[i], len(tree)
    assert s <= L - 1, f"cache bookkeeping: level {i} has seen {s} positions, asked from {L - 1}"
    tokens = torch.cat([sp.buf[s:L], torch.tensor(tree.tokens, device=sp.device)])
    node_slots = [L + n for n in range(N)]  # node n at scratch slot L + n
    positions = list(range(s, L)) + [L - 1 + d for d in tree.depth]
    visible = [[L + a for a in tree.path(n)] for n in range(N)]
    out = forward_tree(sp, i, tokens, s, L, node_slots, positions, visible)
    sp.seen[i] = L  # the scratch slots hold nodes, not the sequence
    return out[L - 1 - s :]


def walk_greedy(tree: Tree, logits: Tensor) -> tuple[list[int], int]:
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


def walk_sampled(sp, tree: Tree, p: Tensor) -> tuple[list[int], int]:
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
            return path, int(sampling.sample(row, sp.generator))
        cand = torch.tensor([tree.tokens[c] for c in kids], device=sp.device)
        accept = candidate_acceptance(row[cand].double().tolist(), float(row.double().sum()))
        u = torch.rand(len(kids), generator=sp.generator, device=sp.device).tolist()
        child = next((c for c, a, uc in zip(kids, accept, u) if uc < a), None)
        if child is None:
            return path, int(sampling.sample(candidate_residual(row, cand), sp.generator))
        path.append(child)
        node = child


def draft_tree(sp, j: int, L: int, depth: int, nodes: int) -> Tree:
    """Level j's tree after buf[:L], at most `depth` deep and `nodes` big. A proposer builds it from
    the sequence; a model grows it as EAGLE-2 does: score every candidate by its cumulative draft
    log-probability, expand the topk best new nodes of each depth with their topk children (one
    forward per depth, the expanded nodes in scratch slots with a tree mask), then keep the best
    `nodes` candidates of all depths. A child never outscores its parent, so the kept set is a tree."""
    level, shape = sp.levels[j], sp.trees[j]
    if _is_proposer(level):
        host = sp._host_sequence(j, L)
        t0 = sp.meter.start()
        tree = level.propose_tree(host, depth, nodes)
        sp.meter.stop(j, t0, len(tree))
        return tree
    tokens, parents, scores, depths = [], [], [], []  # every candidate of every depth
    chain = {-1: []}  # expanded candidate -> the scratch slots of its path (its own last)

    def expand(logits: Tensor, frontier: list[int], d: int) -> list[int]:
        # Each frontier node's topk children become candidates; the topk best of them are the
        # next frontier. Zero-probability children (outside a draft's vocabulary subset, or cut
        # by top-k/top-p when sampling) are not candidates.
        lp = torch.log_softmax(logits, -1) if sp.temperature == 0 else sp.probs(logits).log()
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

    frontier = expand(sp.logits(j, L - 1, L), [-1], 1)
    for d in range(2, depth + 1):
        used = len(chain) - 1
        frontier = frontier[: max(0, room(sp, j, L) - used)]
        if not frontier:
            break
        slots = [L + used + t for t in range(len(frontier))]
        for c, sl in zip(frontier, slots):
            chain[c] = chain[parents[c]] + [sl]
        x = torch.tensor([tokens[c] for c in frontier], device=sp.device)
        positions = [L + d - 2] * len(frontier)  # the frontier is at depth d-1: position L-1+(d-1)
        logits = forward_tree(sp, j, x, L, L, slots, positions, [chain[c] for c in frontier])
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


def forward_tree(sp, i, tokens: Tensor, start: int, L: int, node_slots, positions, visible) -> Tensor:
    """Level i's logits for `tokens`: first the context buf[start:L] at its own slots (each sees the
    slots up to its own), then tree nodes at node_slots, node t seeing buf[:L] and the slots
    visible[t]; `positions` are the RoPE positions of all of them."""
    level = sp.levels[i]
    mask = tree_mask(level.max_seq_length, start, L, node_slots, visible).to(sp.device)
    if level.vocab_size < sp.vocab:
        tokens = tokens.clamp(max=level.vocab_size - 1)
    slots = torch.tensor(list(range(start, L)) + node_slots, device=sp.device)
    sp.tell_features(i)
    t0 = sp.meter.start()
    out = level.forward_tree(tokens, slots, torch.tensor(positions, device=sp.device), mask)
    sp.meter.stop(i, t0, tokens.numel())
    return out[:, : sp.vocab]


def room(sp, i: int, L: int) -> int:
    """Scratch slots level i's cache has from position L on."""
    size = getattr(sp.levels[i], "max_seq_length", None)
    return size - L if size is not None else 1 << 30


def _is_proposer(level) -> bool:
    return hasattr(level, "propose")
