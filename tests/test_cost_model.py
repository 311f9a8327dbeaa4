"""The cost model (bench_lib.expected_speedup) against closed forms (Leviathan et al. 2023)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench_lib import acceptance_from_mean_length, best_k, expected_speedup

prob = st.floats(0.0, 0.999)
ks = st.integers(1, 8)
times = st.floats(1e-4, 1.0)


@given(a=prob, k=ks, c=st.floats(0.0, 1.0))
def test_one_level_is_leviathans_formula(a, k, c):
    """Verification at the cost of a step, a draft at c of a step: (1 - a^(k+1)) / ((1 - a)(kc + 1))."""
    expected = (1 - a ** (k + 1)) / ((1 - a) * (k * c + 1))
    assert math.isclose(expected_speedup([1.0, c], [1.0], [a], [k]), expected, rel_tol=1e-12)


@given(k=ks, t0=times, tv=times, t1=times)
def test_acceptance_zero_and_one(k, t0, tv, t1):
    assert math.isclose(expected_speedup([t0, t1], [tv], [0.0], [k]), t0 / (tv + k * t1), rel_tol=1e-12)
    assert math.isclose(
        expected_speedup([t0, t1], [tv], [1.0], [k]), t0 * (k + 1) / (tv + k * t1), rel_tol=1e-12
    )


@given(a=prob, k=ks, k1=ks, t0=times, tv=times, tv1=times)
def test_a_perfect_free_inner_draft_makes_level_one_cost_its_verification_per_token(a, k, k1, t0, tv, tv1):
    """Level 2 is free and always right: level 1 then costs tv1 / (k1 + 1) per token."""
    two = expected_speedup([t0, 123.0, 0.0], [tv, tv1], [a, 1.0], [k, k1])
    one = expected_speedup([t0, tv1 / (k1 + 1)], [tv], [a], [k])
    assert math.isclose(two, one, rel_tol=1e-9)


@given(a=prob, b=prob, k=ks, t=st.lists(times, min_size=3, max_size=3))
def test_monotone_in_acceptance(a, b, k, t):
    lo, hi = min(a, b), max(a, b)
    s_lo = expected_speedup([t[0], t[1]], [t[2]], [lo], [k])
    s_hi = expected_speedup([t[0], t[1]], [t[2]], [hi], [k])
    assert s_lo <= s_hi * (1 + 1e-12)


@given(a=st.floats(0.0, 0.99), k=ks)
def test_acceptance_from_mean_length_inverts_the_round_length(a, k):
    mean = (1 - a ** (k + 1)) / (1 - a)
    assert math.isclose(acceptance_from_mean_length(mean, k), a, abs_tol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError):
        acceptance_from_mean_length(5.5, 4)
    with pytest.raises(ValueError):
        expected_speedup([1.0, 0.5, 0.1], [1.0], [0.5], [4])


@given(e=st.floats(1.0, 5.0), t0=times, tv=times, td=times, c=st.floats(0.0, 1.0), k=ks)
def test_tree_rounds_use_measured_tokens_and_drafting(e, t0, tv, td, c, k):
    """A tree round emits e tokens (measured) for one verification of the tree and the drafter's
    forwards (td): t0 * e / (tv + td), whatever k and the drafter's per-token cost say."""
    got = expected_speedup([t0, c], [tv], [0.3], [k], emitted=[e, None], drafting=[td, None])
    assert math.isclose(got, t0 * e / (tv + td), rel_tol=1e-12)
    # With no override, the i.i.d. sequence rule is unchanged.
    assert expected_speedup([t0, c], [tv], [0.3], [k], [None, None], [None, None]) == expected_speedup(
        [t0, c], [tv], [0.3], [k]
    )


@given(a=prob, t0=times, t1=st.floats(0.0, 1.0))
def test_best_k_is_the_best_of_the_grid(a, t0, t1):
    """best_k searches k in 1..kmax and returns the grid's maximum and its k."""
    verify = lambda i, k: t0 * (1 + 0.1 * k)  # noqa: E731
    sp, ks = best_k([t0, t1], verify, [a], kmax=(6,))
    grid = {k: expected_speedup([t0, t1], [verify(0, k)], [a], [k]) for k in range(1, 7)}
    assert math.isclose(sp, max(grid.values()), rel_tol=1e-12) and grid[ks[0]] == sp
