"""Speculative decoding is exact: the proofs, as tests.

1. One verification step, analytically: over all draft outcomes, acceptance + residual give exactly p.
2. End to end: stacks of 1-3 tiny random models (and an n-gram level) sample sequences whose
   distribution matches the target's exact one, enumerated (G-test).
3. Greedy: any stack returns exactly the target's own greedy tokens, stop ids and max_new_tokens included.
4. Every level's KV cache is right at every forward, however many drafts were accepted.
5. A broken acceptance rule fails test 2: the test can fail.
6. Validation errors. 7. One level is the baseline; adaptive k; the stats add up.

The models are tiny random Transformers (vocab 5-8) in float64: no near-ties between greedy candidates,
and different seeds give different distributions, so drafts are often rejected.
"""

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sampling
import speculate
from model import ModelArgs, Transformer
from speculate import (
    ModelLevel,
    NgramProposer,
    Speculation,
    TreeShape,
    acceptance_prob,
    autoregressive_decode,
    format_stats,
    residual,
    speculative_decode,
)

PROMPT = [1, 2, 3, 1, 2]  # repeats, so the n-gram level finds matches

# Significance of each distribution test. With fixed seeds a test is deterministic (it passes for these
# seeds or it does not); alpha is the chance that a correct implementation fails one test for a random
# choice of seeds: about 1e-2 over the ~10 G-tests of this file.
ALPHA = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@functools.cache
def tiny_model(
    seed: int, vocab: int = 6, n_layer: int = 1, dim: int = 16, scale: float = 3.0, block_size: int = 64
) -> Transformer:
    """A random float64 Llama. The output head is scaled up so that distributions are far from uniform
    (and differ a lot between seeds)."""
    torch.manual_seed(seed)
    args = ModelArgs(
        block_size=block_size, vocab_size=vocab, n_layer=n_layer, n_head=2, dim=dim, intermediate_size=32
    )
    model = Transformer(args).double().eval()
    with torch.no_grad():
        model.output.weight.mul_(scale)
    return model


def noisy_copy(model: Transformer, noise: float, seed: int) -> Transformer:
    """The model with its weights perturbed: a draft that agrees with it often but not always."""
    torch.manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(noise * torch.randn_like(p))
    return out


def level(model, name=None):
    return ModelLevel(model, name or f"m{id(model) % 1000}")


def draft_pool() -> dict:
    """Models that may serve as drafts of tiny_model(0): different seeds, other depths, padded or short
    vocabularies, an exact copy (everything accepted) and noisy copies (some accepted)."""
    t = tiny_model(0)
    return {
        "s1": tiny_model(1),
        "s2": tiny_model(2, n_layer=2),
        "s3": tiny_model(3, dim=32),
        "v8": tiny_model(4, vocab=8),
        "v5": tiny_model(5, vocab=5),
        "copy": _copy(t),
        "near": _noisy(t, 0.05),
        "mid": _noisy(t, 0.3),
    }


@functools.cache
def _copy(t):
    return copy.deepcopy(t)


@functools.cache
def _noisy(t, noise):
    return noisy_copy(t, noise, seed=7)


# ---------------------------------------------------------------------------------------------------
# 1. One verification step, analytically.
# ---------------------------------------------------------------------------------------------------


def one_step_output(p, q):
    """Exact distribution of the token one verification step emits, when the draft x ~ q:
    sum_x q(x) [a(x) delta_x + (1 - a(x)) residual], with a = min(1, p/q); the functions under test."""
    a = acceptance_prob(p, q)
    return q * a + (q * (1 - a)).sum() * residual(p, q)


def dist_strategy(v):
    # Some entries exactly 0 (top-k/top-p cuts), the rest spread over several orders of magnitude.
    w = st.one_of(st.just(0.0), st.floats(1e-6, 1.0))
    return st.lists(w, min_size=v, max_size=v).filter(lambda xs: sum(xs) > 0)


@st.composite
def p_and_q(draw):
    v = draw(st.integers(2, 8))
    p = torch.tensor(draw(dist_strategy(v)), dtype=torch.float64)
    if draw(st.booleans()):
        q = torch.tensor(draw(dist_strategy(v)), dtype=torch.float64)
    else:  # q within rounding of p: the residual's guard
        q = p * (1 + 1e-9 * torch.tensor(draw(st.lists(st.floats(-1, 1), min_size=v, max_size=v))))
    return p / p.sum(), q / q.sum()


@settings(max_examples=300, deadline=None)
@given(pq=p_and_q(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_one_step_is_exact(pq, dtype):
    p, q = (x.to(dtype) for x in pq)
    atol = 1e-5 if dtype == torch.float32 else 3e-6  # the guard may cost up to 2 * RESIDUAL_EPS
    torch.testing.assert_close(one_step_output(p, q), p, atol=atol, rtol=0)


@settings(max_examples=200, deadline=None)
@given(pq=p_and_q())
def test_one_step_point_mass_is_exact(pq):
    # An n-gram proposal x is a point mass: accepted with probability p(x), else p without x.
    p, _ = pq
    for x in range(p.numel()):
        q = torch.nn.functional.one_hot(torch.tensor(x), p.numel()).to(p.dtype)
        torch.testing.assert_close(one_step_output(p, q), p, atol=3e-6, rtol=0)


def test_residual_guard():
    p = torch.tensor([0.5, 0.5, 0.0])
    torch.testing.assert_close(residual(p, p.clone()), p)  # sums to 0: fall back to p, never NaN
    torch.testing.assert_close(residual(p, torch.tensor([1.0, 0.0, 0.0])), torch.tensor([0.0, 1.0, 0.0]))


# ---------------------------------------------------------------------------------------------------
# 2. End-to-end distribution.
# ---------------------------------------------------------------------------------------------------


def exact_sequence_probs(model, prompt, n, temperature, top_k=None, top_p=None) -> dict:
    """P(first n new tokens = s) under plain sampling from `model`, for every s: the product of its
    warped conditionals, each from a full no-cache forward."""
    frontier = {(): 1.0}
    for _ in range(n):
        prefixes = list(frontier)
        idx = torch.tensor([prompt + list(s) for s in prefixes])
        with torch.no_grad():
            logits = model(idx)[:, -1].float()  # the same float32 logits a ModelLevel hands over
        probs = sampling.probs(logits, temperature, top_k, top_p).double()
        frontier = {
            s + (t,): frontier[s] * float(pr[t]) for s, pr in zip(prefixes, probs) for t in range(pr.numel())
        }
    return frontier


def g_test(counts: dict, expected: dict, n_runs: int) -> float:
    """p-value of the G-test of observed sequence counts against exact probabilities. Sequences expected
    fewer than 5 times are pooled into one bin (the chi-square approximation needs that); an observed
    sequence of probability 0 fails outright."""
    if any(expected.get(s, 0.0) == 0.0 for s in counts):
        return 0.0
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for s, pr in expected.items():
        e, o = n_runs * pr, counts.get(s, 0)
        if e >= 5:
            obs.append(o)
            exp.append(e)
        else:
            pool_o, pool_e = pool_o + o, pool_e + e
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    o, e = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
    g = 2 * torch.sum(torch.where(o > 0, o * torch.log(o / e), torch.zeros_like(o)))
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), g / 2))


def sample_counts(levels, k, n_runs, n_new, seed, **kw) -> dict:
    g = torch.Generator().manual_seed(seed)  # seeded once: runs follow one another in its stream
    counts = {}
    for _ in range(n_runs):
        out, _ = speculative_decode(levels, torch.tensor(PROMPT), n_new, k=k, generator=g, **kw)
        counts[tuple(out.tolist())] = counts.get(tuple(out.tolist()), 0) + 1
    return counts


def stack(names):
    pool = draft_pool()
    return [level(tiny_model(0), "target")] + [
        NgramProposer(name="ngram") if n == "ngram" else level(pool[n], n) for n in names
    ]


def distribution_p_value(names, k, n_runs=2000, n_new=3, seed=0, temperature=1.0, **kw) -> float:
    levels = stack(names)
    exact = exact_sequence_probs(tiny_model(0), PROMPT, n_new, temperature, kw.get("top_k"), kw.get("top_p"))
    counts = sample_counts(levels, k, n_runs, n_new, seed, temperature=temperature, **kw)
    return g_test(counts, exact, n_runs)


# (draft levels below the target, k, sampling options). 3 new tokens per run, 2000 runs: about 5 s for
# two levels and 8 s for three on one core (each run is a fresh speculative_decode call).
DISTRIBUTION_CASES = {
    "target-only": ([], [], dict(temperature=1.0)),
    "2-levels-t0.7": (["s1"], [2], dict(temperature=0.7)),
    "ngram-t1.0": (["ngram"], [3], dict(temperature=1.0)),
    "3-levels-t1.3": (["s1", "s2"], [2, 2], dict(temperature=1.3)),
    "3-levels-topk": (["s3", "s1"], [1, 3], dict(temperature=1.0, top_k=3)),
    "3-levels-ngram-topp": (["mid", "ngram"], [3, 2], dict(temperature=1.0, top_p=0.8)),
    "3-levels-padded-vocab": (["v8", "v5"], [2, 1], dict(temperature=1.0)),
    "3-levels-adaptive": (["s1", "near"], [2, 1], dict(temperature=0.7, adaptive=True)),
}


@pytest.mark.parametrize("case", list(DISTRIBUTION_CASES))
def test_distribution_matches_target(case):
    names, k, kw = DISTRIBUTION_CASES[case]
    pv = distribution_p_value(names, k, **kw)
    print(f"{case}: G-test p-value {pv:.3g}")
    assert pv > ALPHA, f"{case}: G-test p-value {pv:.2e}: the output is not the target's distribution"


# ---------------------------------------------------------------------------------------------------
# 5. The distribution test can fail: break the acceptance rule and watch it.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "broken",
    {
        "always-accept": ("acceptance_prob", lambda p, q: torch.ones_like(p)),
        "residual-is-p": ("residual", lambda p, q: p),
        "accept-p-not-min": ("acceptance_prob", lambda p, q: p),  # a plausible-looking typo
    }.items(),
    ids=lambda b: b[0],
)
def test_broken_rule_is_detected(monkeypatch, broken):
    _, (name, fn) = broken
    monkeypatch.setattr(speculate, name, fn)
    pv = distribution_p_value(["s1"], [2], n_runs=1000, temperature=1.0)
    print(f"broken rule {broken[0]}: G-test p-value {pv:.3g}")
    assert pv < 1e-6


# ---------------------------------------------------------------------------------------------------
# 3. Greedy identity.
# ---------------------------------------------------------------------------------------------------


def greedy_reference(prompt, n):
    out, _ = autoregressive_decode(level(tiny_model(0)), torch.tensor(prompt), n)
    return out.tolist()


@settings(max_examples=100, deadline=None)
@given(
    names=st.lists(st.sampled_from(list(draft_pool())), max_size=2, unique=True),
    ngram_last=st.booleans(),
    ks=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    prompt=st.lists(st.integers(0, 5), min_size=1, max_size=6),
    n_new=st.integers(1, 14),
    stop_at=st.one_of(st.none(), st.integers(0, 13)),
    adaptive=st.booleans(),
)
def test_greedy_is_the_targets_own(names, ngram_last, ks, prompt, n_new, stop_at, adaptive):
    names = names + ["ngram"] if ngram_last else names
    ref = greedy_reference(prompt, n_new)
    stop_ids = () if stop_at is None or stop_at >= n_new else (ref[stop_at],)
    if stop_ids:  # plain decoding stops at the first occurrence
        ref = ref[: ref.index(stop_ids[0]) + 1]
    out, stats = speculative_decode(
        stack(names), torch.tensor(prompt), n_new, k=ks[: len(names)], stop_ids=stop_ids, adaptive=adaptive
    )
    assert out.tolist() == ref
    assert stats.new_tokens == len(ref)


def test_stop_and_limit_inside_an_accepted_run():
    # An exact copy as the draft: every proposal is accepted, so stop ids and max_new_tokens land inside
    # accepted runs of 4 drafts + a bonus.
    ref = greedy_reference(PROMPT, 12)
    for n_new in range(1, 13):
        out, stats = speculative_decode(stack(["copy"]), torch.tensor(PROMPT), n_new, k=[4])
        assert out.tolist() == ref[:n_new]
        assert stats.levels[1].accepted == stats.levels[1].proposed
    # A stop id that first occurs at a drafted (not bonus) position of a 5-token round.
    first = next(f for f in range(12) if ref.index(ref[f]) == f and f % 5 < 4)
    stop, seen = ref[first], []
    out, stats = speculative_decode(
        stack(["copy", "near"]), torch.tensor(PROMPT), 12, k=[4, 2], stop_ids=(stop, 99), on_token=seen.append
    )
    assert out.tolist() == ref[: first + 1]
    assert seen[-1] == out.tolist()
    # That round verified tokens past the stop: they were accepted but are not returned.
    assert stats.levels[0].steps + stats.levels[1].accepted > stats.new_tokens


# ---------------------------------------------------------------------------------------------------
# 4. KV caches: every forward of every level, checked against a no-cache forward.
# ---------------------------------------------------------------------------------------------------


class CheckedLevel(ModelLevel):
    """A ModelLevel that checks each cached forward against a full no-cache forward of the sequence it
    should condition on: buf[:end] of the running Speculation. A stale cache entry anywhere before the
    fed tokens changes the logits."""

    run = None

    def forward(self, tokens, start_pos, last=None):
        out = super().forward(tokens, start_pos)
        end = start_pos + tokens.numel()
        seq = self.run.buf[:end].clamp(max=self.vocab_size - 1)
        with torch.no_grad():
            full = self.model(seq.view(1, -1))[0, start_pos:end].float()
        torch.testing.assert_close(out, full, atol=1e-9, rtol=1e-9)
        self.checked += 1
        return out if last is None else out[-last:]


class CheckedNgram(NgramProposer):
    """The n-gram level reads a host copy of the sequence: check it against buf at every call."""

    run = None

    def propose(self, tokens, k):
        assert tokens == self.run.buf[: len(tokens)].tolist(), "stale host copy of the sequence"
        self.checked += 1
        return super().propose(tokens, k)


def checked_run(names, k, n_new, temperature, seed, share_kv=False, pool=None, **kw):
    """A run whose every level checks its forwards against no-cache ones. The drafts keep their own
    caches (share_kv=False): a draft reading its verifier's keys and values conditions on something
    no single model computes, except when it is an exact copy."""
    pool = pool or draft_pool()
    levels = [CheckedLevel(tiny_model(0), "target")]
    for n in names:
        levels.append(CheckedNgram() if n == "ngram" else CheckedLevel(pool[n], n))
    run = Speculation(
        levels, k, temperature, generator=torch.Generator().manual_seed(seed), share_kv=share_kv, **kw
    )
    for lv in levels:
        lv.run, lv.checked = run, 0
    out, stats = run.generate(torch.tensor(PROMPT), n_new)
    assert all(lv.checked > 0 for lv in levels)
    return out, stats


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "names,k",
    [
        (["copy"], [3]),  # every round fully accepted: the draft must catch up on its last token + bonus
        (["s1"], [3]),  # mostly rejected at the first draft
        (["near"], [4]),  # in between
        (["near", "mid"], [4, 2]),
        (["copy", "near", "s1"], [3, 2, 2]),
        (["mid", "ngram"], [3, 3]),
        (["v8", "v5"], [2, 2]),
    ],
)
def test_kv_caches_stay_right(names, k, temperature):
    outcomes = set()
    for seed in range(3):
        _, stats = checked_run(names, k, 20, temperature, seed, adaptive=seed == 2)
        s = stats.levels[1]
        outcomes |= {"all" if s.accepted == s.proposed else "some" if s.accepted else "none"}
        if s.reached:
            outcomes |= {"rejected" if s.reached[0] > s.accepted_at[0] else "accepted-first"}
    if names[0] == "copy" and temperature == 0:
        assert "all" in outcomes
    if names[0] == "s1":
        assert "rejected" in outcomes


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_kv_slots_are_the_verifiers(temperature):
    """share_kv: a draft with its verifier's shapes takes the verifier's keys and values for the slots
    it has not computed. With exact copies as drafts those are the very values each draft would compute,
    so every forward must still equal a no-cache forward: a slot copied before the verifier computed
    it, or counted as seen without being copied, would not. (Exactness with drafts that differ is the
    greedy and distribution tests' job: they run with share_kv on, its default.)"""
    pool = draft_pool()
    copies = {"copy": pool["copy"], "copy2": copy.deepcopy(pool["copy"])}
    for seed in range(2):
        for names, k in ((["copy"], [4]), (["copy", "copy2"], [4, 2])):
            _, stats = checked_run(names, k, 20, temperature, seed, share_kv=True, pool=copies)
            assert stats.levels[1].accepted == stats.levels[1].proposed or temperature > 0
    # A draft that differs still skips its prefill and its catch-up tokens: it feeds fewer of them.
    fed = {False: [], True: []}
    for share in (False, True):
        levels = [ModelLevel(tiny_model(0), "target"), ModelLevel(pool["near"], "near")]

        def counted(tokens, *a, _forward=levels[1].forward, _fed=fed[share], **kw):
            _fed.append(tokens.numel())
            return _forward(tokens, *a, **kw)

        levels[1].forward = counted
        out, _ = speculative_decode(levels, torch.tensor(PROMPT), 20, k=[3], share_kv=share)
        assert out.tolist() == greedy_reference(PROMPT, 20)
    assert sum(fed[True]) < sum(fed[False]) - (len(PROMPT) - 2)
    assert max(fed[True]) == 1  # no prefill, and no catch-up: one token per draft forward


def test_kv_check_catches_a_stale_cache(monkeypatch):
    # The classic bug: feed only the tokens asked about, not what the level has not seen yet. After a
    # fully accepted round the draft never sees its own last token, and its cache keeps a stale entry.
    def logits(self, i, start, end):
        out = self.levels[i].forward(self.buf[start:end], start)
        self.seen[i] = end
        return out

    monkeypatch.setattr(Speculation, "logits", logits)
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        checked_run(["near"], [3], 20, 0.0, 0)


def test_missing_invalidation_is_caught(monkeypatch):
    # Writes that forget to lower `seen`: the bookkeeping's own invariant trips.
    def write(self, pos, tokens, by):
        self.buf[pos : pos + tokens.numel()] = tokens

    monkeypatch.setattr(Speculation, "write", write)
    with pytest.raises(AssertionError, match="cache bookkeeping"):
        checked_run(["s1"], [3], 20, 1.0, 0)


# ---------------------------------------------------------------------------------------------------
# 6. Validation.
# ---------------------------------------------------------------------------------------------------


def test_validation_errors():
    prompt = torch.tensor(PROMPT)
    t, d = tiny_model(0), tiny_model(1)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        speculative_decode([level(t), level(d)], prompt, 4, k=[0])
    with pytest.raises(ValueError, match="one k per draft level"):
        speculative_decode([level(t), level(d)], prompt, 4, k=[2, 2])
    with pytest.raises(ValueError, match="k is required"):
        speculative_decode([level(t), level(d)], prompt, 4)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        speculative_decode([level(t), level(d)], prompt, 60, k=[2])
    small_ctx = Transformer(ModelArgs(block_size=8, vocab_size=6, n_layer=1, n_head=2, dim=16))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        speculative_decode([level(t), level(small_ctx)], prompt, 4, k=[2])  # a draft's context counts too
    with pytest.raises(ValueError, match="only be the last level"):
        speculative_decode([level(t), NgramProposer(), level(d)], prompt, 4, k=[2, 2])
    with pytest.raises(ValueError, match="must be a model"):
        speculative_decode([NgramProposer(), level(t)], prompt, 4, k=[2])
    with pytest.raises(ValueError, match="appears twice"):
        speculative_decode([level(t), level(t)], prompt, 4, k=[2])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        speculative_decode([level(t)], prompt, 4, temperature=-1.0)
    big_vocab = Transformer(ModelArgs(block_size=64, vocab_size=2000, n_layer=1, n_head=2, dim=16))
    with pytest.raises(ValueError, match="another tokenizer"):
        speculative_decode([level(t), level(big_vocab)], prompt, 4, k=[2])
    with pytest.raises(ValueError, match="empty"):
        speculative_decode([level(t)], torch.tensor([], dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_decode([level(t)], prompt, 0)


# ---------------------------------------------------------------------------------------------------
# 7. The baseline, adaptive k, stats, the n-gram proposer.
# ---------------------------------------------------------------------------------------------------


def test_one_level_is_autoregressive_decoding():
    t = level(tiny_model(0))
    for prompt in ([3], PROMPT):
        ref, _ = autoregressive_decode(t, torch.tensor(prompt), 15)
        out, _ = speculative_decode([t], torch.tensor(prompt), 15)
        assert out.tolist() == ref.tolist()
        # Sampling consumes the generator exactly as the baseline does: the same tokens for a seed.
        ref, _ = autoregressive_decode(
            t, torch.tensor(prompt), 15, 1.0, generator=torch.Generator().manual_seed(3)
        )
        out, _ = speculative_decode(
            [t], torch.tensor(prompt), 15, temperature=1.0, generator=torch.Generator().manual_seed(3)
        )
        assert out.tolist() == ref.tolist()


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_compiled_levels_over_many_prompts(device):
    """ModelLevel with compile_decode, the default on CUDA (CUDA graphs there, inductor alone on the CPU): a
    float32 target, its MXFP4 cast and a small model, over prompts of 8 lengths and then one long
    enough to grow the caches, drafting sequences and trees, give the eager levels' tokens. Every level
    shares Transformer.forward's code object, and compiling each prompt length (or a small recompile
    limit under fullgraph=True) used to stop such a run with a hard error by the second prompt.
    Prefills run eagerly, so the compiled graphs are the decode-sized shapes only: they do not grow per
    prompt, only (all at once) when a cache doubles."""
    from torch._dynamo.utils import counters

    from accel import compile_decode
    from mxfp4 import quantize_model

    target = copy.deepcopy(tiny_model(0, dim=64, block_size=1024)).float()
    models = [
        target,
        quantize_model(target),
        copy.deepcopy(tiny_model(2, n_layer=2, block_size=1024)).float(),
    ]
    # Copies: a level owns its model's cache, and the two stacks size theirs differently.
    eager = [ModelLevel(copy.deepcopy(m).to(device), f"e{i}") for i, m in enumerate(models)]
    compiled = []
    for i, m in enumerate(models):
        m = copy.deepcopy(m).to(device)
        compiled.append(ModelLevel(m, f"c{i}", compiled=compile_decode(m)))
    runs = [dict(k=[4, 2]), dict(k=[3, 2], trees=[None, TreeShape(nodes=4, topk=2)])]
    graphs = []
    for n in (5, 7, 9, 12, 15, 18, 21, 24, 300):
        prompt = torch.tensor((PROMPT * 60)[:n])
        for kw in runs:
            want = speculative_decode(eager, prompt, 12, **kw)[0]
            assert torch.equal(speculative_decode(compiled, prompt, 12, **kw)[0], want), (n, kw)
        graphs.append(counters["stats"]["unique_graphs"])
        sizes = {level.max_seq_length for level in compiled}
        assert sizes == ({512} if n == 300 else {256}), (n, sizes)  # doubled from 256, not per prompt
    assert graphs[0] > 0 and graphs[7] == graphs[2], graphs  # compiled, and no graph per prompt


def test_deterministic_for_a_generator():
    outs = [
        speculative_decode(stack(["s1", "ngram"]), torch.tensor(PROMPT), 12, k=[3, 2], temperature=1.0,
                           generator=torch.Generator().manual_seed(5))[0].tolist()
        for _ in range(2)
    ]  # fmt: skip
    assert outs[0] == outs[1]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("names,k", [(["near"], [3]), (["near", "mid"], [4, 2]), (["mid", "ngram"], [3, 3])])
def test_stats_add_up(names, k, temperature):
    out, stats = speculative_decode(
        stack(names), torch.tensor(PROMPT), 30, k=k, temperature=temperature,
        generator=torch.Generator().manual_seed(0), adaptive=True,
    )  # fmt: skip
    L = stats.levels
    assert stats.new_tokens == out.numel() == 30
    # Each round of level i adds one token of its own; the rest are accepted drafts of level i+1.
    assert stats.new_tokens == L[0].steps + L[1].accepted
    for i in range(1, len(L)):
        if names[i - 1] != "ngram":  # a model draft makes its proposals by rounds of its own
            below = L[i + 1].accepted if i + 1 < len(L) else 0
            assert L[i].proposed == L[i].steps + below
        assert 0 <= L[i].accepted <= L[i].proposed and L[i].rounds <= L[i - 1].steps
        assert L[i].reached[0] == L[i].rounds and sum(L[i].accepted_at) == L[i].accepted
        assert L[i].mean_accepted_length == pytest.approx(1 + L[i].accepted / L[i].rounds)
        assert all(0 <= a <= 1 for a in L[i].acceptance_by_position)
        assert L[i].k == k[i - 1] and L[i].forwards > 0
    assert L[0].forwards >= L[0].steps  # one forward per round, plus the prefill
    assert 0 < stats.time_to_first_token <= stats.total_time
    table = format_stats(stats)
    assert all(lv.name in table for lv in L)


def test_adaptive_k_moves():
    run = Speculation(stack(["copy"]), [2], adaptive=True)
    run.generate(torch.tensor(PROMPT), 30)
    assert run.k[1] == 4  # all accepted: grew to twice the initial k
    run = Speculation(stack(["s1"]), [3], adaptive=True)
    _, stats = run.generate(torch.tensor(PROMPT), 30)
    assert stats.levels[1].mean_proposed < 3


def test_ngram_proposer():
    ng = NgramProposer(n=3)
    assert ng.propose([5, 6, 7, 8, 9, 5, 6, 7], 3) == [8, 9, 5]  # 3-gram match
    assert ng.propose([2, 9, 1, 2, 9, 3, 2, 9], 2) == [3, 2]  # no 3-gram; the most recent 2-gram wins
    assert ng.propose([4, 0, 1, 2, 4, 1], 5) == [2, 4, 1]  # no 3- or 2-gram: the 1-gram "1"
    assert ng.propose([1, 2, 3], 4) == []  # no match: nothing proposed
    assert ng.propose([7], 4) == []
    # Nothing proposed: the target takes plain steps and the output is still its own.
    out, stats = speculative_decode(stack(["ngram"]), torch.tensor([0, 1, 2, 3]), 5, k=[3])
    assert out.tolist() == greedy_reference([0, 1, 2, 3], 5)
