"""Tree drafts are exact too: the proofs of test_speculate.py, for token trees.

1. One tree node, analytically: trying deterministic candidates in order, each accepted with its
   renormalised probability, then the residual, gives exactly p, whatever the candidates.
2. End to end: stacks with a tree link (EAGLE-2: the target verifies the tree; SpecMQuant: an
   intermediate verifies it and hands a sequence up) sample exactly the target's distribution (G-test),
   and a broken rule fails that test.
3. Greedy: any stack with a tree link returns the target's own greedy tokens.
4. Every forward, tree forwards included, matches a no-cache forward of the sequence that row should
   see: tree masks, depth positions and the moved keys/values of accepted paths are all checked.
5. The trees themselves: n-gram tries, the EAGLE-2 rerank, the mask; validation errors; stats.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_speculate import (
    ALPHA,
    PROMPT,
    CheckedLevel,
    CheckedNgram,
    draft_pool,
    exact_sequence_probs,
    g_test,
    greedy_reference,
    level,
    stack,
    tiny_model,
)

import trees
from speculate import NgramProposer, Speculation, format_stats, speculative_decode
from trees import Tree, TreeShape, candidate_acceptance, candidate_residual, tree_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tree_stack(names, shape):
    """stack(names) with the last level drafting trees of `shape`."""
    return stack(names), [None] * (len(names) - 1) + [shape]


# ---------------------------------------------------------------------------------------------------
# 1. One node, analytically.
# ---------------------------------------------------------------------------------------------------


def node_output(p: torch.Tensor, candidates: list[int]) -> torch.Tensor:
    """Exact distribution of the token one tree node emits when its children are `candidates`, by the
    functions under test: reach candidate j (all before it rejected), accept it, or fall to the residual."""
    accept = candidate_acceptance(p[candidates].tolist(), float(p.sum()))
    out, reach = torch.zeros_like(p), 1.0
    for x, a in zip(candidates, accept):
        out[x] += reach * a
        reach *= 1 - a
    return out + reach * candidate_residual(p, torch.tensor(candidates, dtype=torch.long))


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), min_size=2, max_size=8).filter(
        lambda w: sum(w) > 0
    ),
    data=st.data(),
)
def test_one_node_is_exact(weights, data):
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    order = data.draw(st.permutations(range(p.numel())))
    candidates = order[: data.draw(st.integers(1, p.numel()))]
    torch.testing.assert_close(node_output(p, candidates), p, atol=3e-6, rtol=0)


def test_all_mass_on_candidates():
    p = torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64)
    assert candidate_acceptance([0.25, 0.75]) == [0.25, 1.0]  # the last one is then certain
    torch.testing.assert_close(node_output(p, [0, 1]), p)
    torch.testing.assert_close(candidate_residual(p, torch.tensor([0, 1])), p)  # guard: never 0/0


# ---------------------------------------------------------------------------------------------------
# 2. End-to-end distribution (2000 runs of 3 tokens each; about 3-7 s a case on one core).
# ---------------------------------------------------------------------------------------------------


def tree_p_value(names, k, shape, n_runs=2000, n_new=3, seed=0, temperature=1.0, **kw) -> float:
    levels, trees = tree_stack(names, shape)
    exact = exact_sequence_probs(tiny_model(0), PROMPT, n_new, temperature, kw.get("top_k"), kw.get("top_p"))
    g, counts = torch.Generator().manual_seed(seed), {}
    for _ in range(n_runs):
        out, _ = speculative_decode(
            levels, torch.tensor(PROMPT), n_new, k=k, generator=g, temperature=temperature, trees=trees, **kw
        )
        counts[tuple(out.tolist())] = counts.get(tuple(out.tolist()), 0) + 1
    return g_test(counts, exact, n_runs)


TREE_CASES = {
    "eagle-t1.0": (["s1"], [2], TreeShape(nodes=4, topk=2), dict(temperature=1.0)),
    "eagle-near-topp": (["mid"], [3], TreeShape(nodes=6, topk=3), dict(temperature=1.0, top_p=0.8)),
    "specmquant-t0.7": (["mid", "s1"], [3, 2], TreeShape(nodes=5, topk=3), dict(temperature=0.7)),
    "ngram-tree-topk": (["ngram"], [3], TreeShape(nodes=6, topk=3), dict(temperature=1.0, top_k=3)),
    "padded-vocab-tree": (["v8", "v5"], [2, 2], TreeShape(nodes=4, topk=2), dict(temperature=1.0)),
}


@pytest.mark.parametrize("case", list(TREE_CASES))
def test_tree_distribution_matches_target(case):
    names, k, shape, kw = TREE_CASES[case]
    pv = tree_p_value(names, k, shape, **kw)
    print(f"{case}: G-test p-value {pv:.3g}")
    assert pv > ALPHA, f"{case}: G-test p-value {pv:.2e}: the output is not the target's distribution"


def test_broken_tree_rule_is_detected(monkeypatch):
    # A plausible bug: accept each candidate with its raw p(x), forgetting to renormalise after the
    # rejections before it. A sibling after x1 then comes out with (1 - p(x1)) p(x) instead of p(x): a
    # drafter close to the target, whose first child holds much of p, makes that plain (an unrelated
    # drafter would not: p = 0.27 with s1, 7e-4 with mid, 3e-41 with near, 1000 runs).
    monkeypatch.setattr(trees, "candidate_acceptance", lambda mass, total=1.0: list(mass))
    pv = tree_p_value(["near"], [2], TreeShape(nodes=6, topk=3), n_runs=1000)
    print(f"broken tree rule: G-test p-value {pv:.3g}")
    assert pv < 1e-6


# ---------------------------------------------------------------------------------------------------
# 3. Greedy identity.
# ---------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    names=st.lists(st.sampled_from(list(draft_pool())), min_size=1, max_size=2, unique=True),
    ngram_last=st.booleans(),
    ks=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    nodes=st.integers(1, 12),
    topk=st.integers(1, 4),
    prompt=st.lists(st.integers(0, 5), min_size=1, max_size=6),
    n_new=st.integers(1, 14),
    adaptive=st.booleans(),
)
def test_greedy_tree_is_the_targets_own(names, ngram_last, ks, nodes, topk, prompt, n_new, adaptive):
    names = names + ["ngram"] if ngram_last else names
    levels, trees = tree_stack(names, TreeShape(nodes, topk))
    out, stats = speculative_decode(
        levels, torch.tensor(prompt), n_new, k=ks[: len(names)], trees=trees, adaptive=adaptive
    )
    assert out.tolist() == greedy_reference(prompt, n_new)
    assert stats.levels[-1].tree_nodes <= nodes * stats.levels[-1].rounds


def test_a_perfect_tree_drafter_is_always_accepted():
    levels, trees = tree_stack(["copy"], TreeShape(nodes=8, topk=2))
    out, stats = speculative_decode(levels, torch.tensor(PROMPT), 16, k=[3], trees=trees)
    assert out.tolist() == greedy_reference(PROMPT, 16)
    s = stats.levels[1]
    assert s.accepted == s.proposed and s.mean_accepted_length == 4.0  # depth 3 + the bonus


# ---------------------------------------------------------------------------------------------------
# 4. Every forward against a no-cache forward.
# ---------------------------------------------------------------------------------------------------


class CheckedTreeLevel(CheckedLevel):
    """CheckedLevel that also checks tree forwards. It keeps a map of which token each cache slot holds
    (from its own forwards and moves); the visible slots of a tree row, in order, must be exactly the
    sequence that row conditions on, at the position its depth says, and its logits those of a no-cache
    forward of that sequence. A stale key/value anywhere in a visible slot changes the logits."""

    def reset(self, max_seq_length):
        super().reset(max_seq_length)
        self.slot_tokens = {}

    def forward(self, tokens, start_pos, last=None):
        for t, x in enumerate(tokens.tolist()):
            self.slot_tokens[start_pos + t] = x
        return super().forward(tokens, start_pos, last)

    def forward_tree(self, tokens, slots, positions, mask):
        for s, x in zip(slots.tolist(), tokens.tolist()):
            self.slot_tokens[s] = x
        out = super().forward_tree(tokens, slots, positions, mask)
        for t in range(tokens.numel()):
            visible = mask[t].nonzero().view(-1).tolist()
            assert visible[-1] == int(slots[t]) and int(positions[t]) == len(visible) - 1
            seq = torch.tensor([self.slot_tokens[s] for s in visible]).clamp(max=self.vocab_size - 1)
            with torch.no_grad():
                full = self.model(seq.view(1, -1))[0, -1].float()
            torch.testing.assert_close(out[t], full, atol=1e-9, rtol=1e-9)
        self.checked += 1
        return out

    def copy_kv(self, other, start, end):
        self.slot_tokens.update({s: other.slot_tokens[s] for s in range(start, end)})
        super().copy_kv(other, start, end)

    def move_kv(self, src, dst):
        moved = [self.slot_tokens[s] for s in src.tolist()]
        self.slot_tokens.update(zip(dst.tolist(), moved))
        super().move_kv(src, dst)


class CheckedTreeNgram(CheckedNgram):
    def propose_tree(self, tokens, depth, nodes):
        assert tokens == self.run.buf[: len(tokens)].tolist(), "stale host copy of the sequence"
        self.checked += 1
        return super().propose_tree(tokens, depth, nodes)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "names,k,share_kv",
    [
        (["copy"], [3], False),
        (["copy"], [3], True),  # an exact copy may take the verifier's keys and values and still check
        (["s1"], [3], False),
        (["near"], [4], False),
        (["near", "mid"], [4, 2], False),
        (["mid", "ngram"], [3, 3], False),
    ],
)
def test_kv_caches_stay_right_with_trees(names, k, share_kv, temperature):
    """Each level's own cache: drafts that differ from their verifier check only with share_kv off."""
    pool = draft_pool()
    for seed in range(2):
        levels = [CheckedTreeLevel(tiny_model(0), "target")]
        for n in names:
            levels.append(CheckedTreeNgram() if n == "ngram" else CheckedTreeLevel(pool[n], n))
        trees = [None] * (len(names) - 1) + [TreeShape(nodes=6, topk=2)]
        g = torch.Generator().manual_seed(seed)
        run = Speculation(
            levels, k, temperature, generator=g, trees=trees, adaptive=seed == 1, share_kv=share_kv
        )
        for lv in levels:
            lv.run, lv.checked = run, 0
        out, stats = run.generate(torch.tensor(PROMPT), 20)
        assert all(lv.checked > 0 for lv in levels)
        if temperature == 0:
            assert out.tolist() == greedy_reference(PROMPT, 20)


def test_tree_check_catches_unmoved_keys(monkeypatch):
    # Forget to move the accepted path's keys/values: the next forward reads scratch-slot garbage.
    monkeypatch.setattr(CheckedTreeLevel, "move_kv", lambda self, src, dst: None)
    levels = [CheckedTreeLevel(tiny_model(0), "target")]
    levels.append(CheckedTreeLevel(draft_pool()["near"], "near"))
    run = Speculation(levels, [3], trees=[TreeShape(6, 2)], share_kv=False)
    for lv in levels:
        lv.run, lv.checked = run, 0
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        run.generate(torch.tensor(PROMPT), 20)


# ---------------------------------------------------------------------------------------------------
# 5. The trees themselves, errors and stats.
# ---------------------------------------------------------------------------------------------------


def test_tree_structure():
    t = Tree([5, 6, 7, 8], [-1, -1, 0, 2])
    assert t.depth == [1, 1, 2, 3] and t.children[-1] == [0, 1] and t.path(3) == [0, 2, 3]
    with pytest.raises(ValueError, match="already a child"):
        Tree([5, 5], [-1, -1])
    with pytest.raises(ValueError, match="earlier node"):
        Tree([5], [0])


def test_tree_mask():
    # Context slots 2..3 fed (L = 4), then nodes at slots 4 and 5, node 5 under node 4.
    m = tree_mask(8, 2, 4, [4, 5], [[4], [4, 5]])
    assert m.shape == (4, 8)
    assert m[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert m[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert m[2].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert m[3].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]


def test_ngram_tree_merges_every_match():
    seq = [1, 2, 3, 9, 1, 2, 4, 1, 2, 3, 7, 1, 2]
    t = NgramProposer(n=2).propose_tree(seq, depth=2, nodes=10)
    # Matches of (1, 2), most recent first: -> 3 7, -> 4 1, -> 3 9 (3 is shared).
    assert [(t.tokens[n], t.parents[n]) for n in range(len(t))] == [(3, -1), (7, 0), (4, -1), (1, 2), (9, 0)]
    assert len(NgramProposer(n=2).propose_tree(seq, depth=2, nodes=3)) == 3
    assert len(NgramProposer().propose_tree([1, 2, 3], 3, 5)) == 0


def test_eagle_tree_shape():
    # The drafter's tree: at most `nodes`, at most k deep, parents first, siblings best first.
    levels, shapes = tree_stack(["s1"], TreeShape(nodes=7, topk=3))
    run = Speculation(levels, [3], trees=shapes)
    run.generate(torch.tensor(PROMPT), 1)  # sets up caches and buffers
    L = len(PROMPT)
    run.buf[:L] = torch.tensor(PROMPT)
    run.seen = [0, 0]
    tree = trees.draft_tree(run, 1, L, 3, 7)
    assert len(tree) == 7 and max(tree.depth) <= 3
    assert all(p < n for n, p in enumerate(tree.parents))
    assert len(tree.children[-1]) <= 3
    # The root's children are the drafter's top tokens after the context, in order.
    with torch.no_grad():
        logits = tiny_model(1)(torch.tensor([PROMPT]))[0, -1]
    top = logits.topk(3).indices.tolist()
    assert [tree.tokens[c] for c in tree.children[-1]] == top[: len(tree.children[-1])]


def test_tree_validation():
    t, s1 = level(tiny_model(0)), level(tiny_model(1))
    prompt = torch.tensor(PROMPT)
    with pytest.raises(ValueError, match="must be the last level"):
        speculative_decode([t, s1, NgramProposer()], prompt, 4, k=[2, 2], trees=[TreeShape(), None])
    with pytest.raises(ValueError, match="trees has 2 entries"):
        speculative_decode([t, s1], prompt, 4, k=[2], trees=[None, TreeShape()])
    with pytest.raises(ValueError, match="TreeShape"):
        speculative_decode([t, s1], prompt, 4, k=[2], trees=[(4, 2)])
    with pytest.raises(ValueError, match="nodes >= 1"):
        TreeShape(nodes=0)


def test_tree_stats_add_up():
    levels, trees = tree_stack(["mid", "s1"], TreeShape(nodes=5, topk=2))
    out, stats = speculative_decode(levels, torch.tensor(PROMPT), 24, k=[4, 2], trees=trees)
    s = stats.levels[2]
    assert 0 < s.tree_nodes <= 5 * s.rounds and s.proposed <= 2 * s.rounds
    assert stats.levels[1].steps + s.accepted == stats.levels[1].proposed  # tokens level 1 produced
    table = format_stats(stats)
    assert "mean tree verified, level 2 s1" in table and "acceptance by depth" in table
