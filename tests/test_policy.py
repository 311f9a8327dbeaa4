"""The k policies (policy.py): whatever k they pick, from past outcomes only, the output is the target's.

The cost policy also has to decide well: switch off a draft that costs more than it saves, and grow k
for a draft that is cheap and always right."""

import itertools
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_speculate import (
    ALPHA,
    PROMPT,
    distribution_p_value,
    draft_pool,
    greedy_reference,
    level,
    stack,
    tiny_model,
)

import policy
import stats
from speculate import ModelLevel, format_stats, speculative_decode

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class SlowLevel(ModelLevel):
    """A level whose every forward takes `delay` seconds longer: a dear model, as the cost model sees it."""

    def __init__(self, model, name, delay):
        super().__init__(model, name)
        self.delay = delay

    def forward(self, tokens, start_pos, last=None):
        time.sleep(self.delay)
        return super().forward(tokens, start_pos, last)


@settings(max_examples=40, deadline=None)
@given(
    names=st.lists(st.sampled_from(["s1", "near", "copy", "mid"]), min_size=1, max_size=2, unique=True),
    ngram_last=st.booleans(),
    ks=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    n_new=st.integers(1, 20),
    name=st.sampled_from(policy.POLICIES),
)
def test_greedy_is_the_targets_own_under_every_policy(names, ngram_last, ks, n_new, name):
    names = names + ["ngram"] if ngram_last else names
    out, _ = speculative_decode(stack(names), torch.tensor(PROMPT), n_new, k=ks[: len(names)], policy=name)
    assert out.tolist() == greedy_reference(PROMPT, n_new)


def test_cost_policy_keeps_the_targets_distribution(monkeypatch):
    """No warm-up and frequent probes, so k changes within each run's 3 tokens; G-test at ALPHA. A fake
    clock (1 ms per reading) makes the policy's choices, and so this seeded test, deterministic."""
    ticks = itertools.count()
    monkeypatch.setattr(stats, "clock", lambda: next(ticks) * 1e-3)
    monkeypatch.setattr(policy.CostModel, "WARMUP", 0)
    monkeypatch.setattr(policy.CostModel, "PROBE", 2)
    pv = distribution_p_value(["s1", "near"], [2, 1], temperature=0.7, policy="cost")
    print(f"cost policy: G-test p-value {pv:.3g}")
    assert pv > ALPHA


def test_cost_policy_switches_off_a_dear_draft():
    """A draft that takes 20 ms per forward against a sub-millisecond target can never pay: the policy
    turns it off (k = 0), says so in the stats, and the output is still the target's."""
    levels = [level(tiny_model(0), "target"), SlowLevel(draft_pool()["near"], "slow", 0.02)]
    out, stats = speculative_decode(levels, torch.tensor(PROMPT), 40, k=[3], policy="cost")
    assert out.tolist() == greedy_reference(PROMPT, 40)
    used = stats.levels[1].k_used
    assert used.get(0, 0) > used.get(3, 0), used
    assert "k chosen" in format_stats(stats)


def test_cost_policy_grows_k_for_a_cheap_exact_draft():
    """An exact copy of a target that takes 50 ms per forward: every proposal is accepted and drafting
    is cheap, so the policy grows k past its initial value."""
    levels = [SlowLevel(tiny_model(0), "slow target", 0.05), level(draft_pool()["copy"], "copy")]
    out, stats = speculative_decode(levels, torch.tensor(PROMPT), 40, k=[2], policy="cost")
    assert out.tolist() == greedy_reference(PROMPT, 40)
    assert max(stats.levels[1].k_used) > 2, stats.levels[1].k_used


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown k policy"):
        speculative_decode(stack(["s1"]), torch.tensor(PROMPT), 4, k=[2], policy="magic")
