"""Tests for features.votes: vote counting, leaders, margins and stopping statistics."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from features.answers import answers_equal
from features.errors import ConfigError
from features.votes import (
    beta_leader_probability,
    dirichlet_leader_probability,
    esc_window_agrees,
    leader,
    n_distinct,
    vote_counts,
    vote_margin,
)

# A pool with equivalent spellings ("0.5" == "1/2" == "\frac{1}{2}", "3" == "3.0") and non-answers.
POOL = ["0.5", "1/2", r"\frac{1}{2}", "3", "3.0", "7", "x+1", "(1, 2)", "", None]
answer_lists = st.lists(st.sampled_from(POOL), min_size=0, max_size=25)
weight = st.floats(0.0, 10.0, allow_nan=False)


@st.composite
def answers_weights_perm(draw: st.DrawFn) -> tuple[list[str | None], list[float], list[int]]:
    answers = draw(answer_lists)
    weights = draw(st.lists(weight, min_size=len(answers), max_size=len(answers)))
    perm = draw(st.permutations(range(len(answers))))
    return answers, weights, list(perm)


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


def test_vote_counts_groups_equivalent_answers() -> None:
    answers = ["0.5", "1/2", None, "3", "", r"\frac{1}{2}", "3.0"]
    assert vote_counts(answers) == {"0.5": 3.0, "3": 2.0}
    assert vote_counts(answers, [1.0, 2.0, 100.0, 0.5, 100.0, 0.25, 1.5]) == {"0.5": 3.25, "3": 2.0}
    assert vote_counts([]) == {}
    assert vote_counts([None, ""]) == {}


def test_vote_counts_key_is_first_seen_answer_as_written() -> None:
    assert list(vote_counts(["1/2", "0.5"])) == ["1/2"]
    assert list(vote_counts(["7", "0.5", "1/2", "7"])) == ["7", "0.5"]


def test_numbers_within_answers_equal_tolerance_are_one_vote() -> None:
    answers = ["3.14159265358979", "3.141592653589793", "3.1415926535897932"]
    assert answers_equal(answers[0], answers[1])
    assert vote_counts(answers) == {"3.14159265358979": 3.0}
    assert n_distinct([*answers, "3.14"]) == 2


@settings(max_examples=300, deadline=None)
@given(
    st.integers(-(10**15), 10**15),
    st.integers(-320, 320),
    st.fractions(Fraction(-3, 10**9), Fraction(3, 10**9)),
)
def test_numbers_are_one_vote_exactly_when_answers_equal(
    mantissa: int, exponent: int, delta: Fraction
) -> None:
    a = Fraction(mantissa) * Fraction(10) ** exponent
    b = a * (1 + delta)
    sa, sb = _ratio(a), _ratio(b)
    assert (n_distinct([sa, sb]) == 1) == answers_equal(sa, sb)
    assert (n_distinct([sb, sa]) == 1) == answers_equal(sa, sb)


def _ratio(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def test_leader_hand_cases_and_tie_rule() -> None:
    assert leader(["7", "3", "3.0"]) == ("3", pytest.approx(2 / 3))
    # ties: the group whose first answer comes first wins
    assert leader(["a", "b"]) == ("a", 0.5)
    assert leader(["b", "a", "a", "b"]) == ("b", 0.5)
    assert leader(["a", "b"], [1.0, 1.0]) == ("a", 0.5)
    # None never votes, so it does not dilute the share
    assert leader(["4", None, None, ""]) == ("4", 1.0)
    assert leader([]) == (None, 0.0)
    assert leader([None, None]) == (None, 0.0)
    # weights
    assert leader(["a", "b", "b"], [3.0, 1.0, 1.0]) == ("a", 0.6)
    # all weights zero: no evidence, no leader
    assert leader(["a", "b"], [0.0, 0.0]) == (None, 0.0)


def test_n_distinct_and_margin_hand_cases() -> None:
    assert n_distinct(["0.5", "1/2", "3", None, ""]) == 2
    assert n_distinct([]) == 0
    assert vote_margin(["1", "1", "2"]) == pytest.approx(1 / 3)
    assert vote_margin(["1", "1"]) == 1.0
    assert vote_margin(["1", "2"]) == 0.0
    assert vote_margin([]) == 0.0
    assert vote_margin([None]) == 0.0
    assert vote_margin(["a", "b", "c"], [2.0, 1.0, 1.0]) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], r"one number per answer \(2\)"),
        ([1.0, math.nan], "NaN at positions \\[1\\]"),
        ([1.0, -0.5], "finite and >= 0"),
        ([1.0, math.inf], "finite and >= 0"),
        ([[1.0, 1.0]], "one number per answer"),
    ],
)
def test_bad_weights_raise(weights: list[float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        vote_counts(["a", "b"], weights)
    with pytest.raises(ConfigError, match=match):
        leader(["a", "b"], weights)


def test_weights_of_non_answers_are_ignored() -> None:
    assert vote_counts(["a", None, ""], [1.0, 50.0, 60.0]) == {"a": 1.0}


@settings(max_examples=300, deadline=None)
@given(answers_weights_perm(), st.booleans())
def test_votes_do_not_depend_on_order(
    data: tuple[list[str | None], list[float], list[int]], weighted: bool
) -> None:
    answers, weights, perm = data
    w = weights if weighted else None
    p_answers = [answers[i] for i in perm]
    p_weights = [weights[i] for i in perm] if weighted else None
    a, b = vote_counts(answers, w), vote_counts(p_answers, p_weights)
    assert sorted(a.values()) == sorted(b.values())
    # each group keeps its votes, whichever answer now names it
    for name, votes in a.items():
        (match,) = [v for k, v in b.items() if answers_equal(k, name)]
        assert match == votes
    la, sa = leader(answers, w)
    lb, sb = leader(p_answers, p_weights)
    assert sa == sb
    values = sorted(a.values(), reverse=True)
    if la is not None and (len(values) == 1 or values[0] > values[1]):
        assert answers_equal(la, lb)
    assert n_distinct(answers) == n_distinct(p_answers)
    assert vote_margin(answers, w) == vote_margin(p_answers, p_weights)


@settings(max_examples=300, deadline=None)
@given(answer_lists)
def test_counts_shares_and_margins_are_consistent(answers: list[str | None]) -> None:
    counts = vote_counts(answers)
    present = [a for a in answers if a is not None and a.strip()]
    assert sum(counts.values()) == len(present)
    assert n_distinct(answers) == len(counts)
    name, share = leader(answers)
    margin = vote_margin(answers)
    if not present:
        assert (name, share, margin) == (None, 0.0, 0.0)
        return
    assert name in counts
    assert counts[name] == max(counts.values())
    assert 1 / len(counts) <= share <= 1.0
    assert 0.0 <= margin <= share


# --------------------------------------------------------------------------------------------
# Beta and Dirichlet stopping statistics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top1", "top2", "prior", "expected"),
    [
        (5, 0, 1.0, 1 - 0.5**6),  # Beta(6, 1): 1 - 0.5^6 = 0.984375
        (1, 0, 1.0, 0.75),  # Beta(2, 1): 1 - 0.5^2
        (2, 1, 1.0, 11 / 16),  # Beta(3, 2): 1 - I_{1/2}(3, 2) = 1 - 5/16
        (0, 0, 1.0, 0.5),
        (3, 3, 1.0, 0.5),
        (0, 5, 1.0, 0.5**6),
        (4, 0, 0.5, 1 - scipy.stats.beta(4.5, 0.5).cdf(0.5)),
    ],
)
def test_beta_leader_probability_hand_cases(
    top1: float, top2: float, prior: float, expected: float
) -> None:
    assert beta_leader_probability(top1, top2, prior) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1.0, 0.0), "top1 must be >= 0"),
        ((1.0, -1.0), "top2 must be >= 0"),
        ((math.nan, 0.0), "top1 must be finite"),
        ((1.0, math.inf), "top2 must be finite"),
        ((1.0, 0.0, 0.0), "prior must be > 0"),
        ((1.0, 0.0, math.nan), "prior must be finite"),
    ],
)
def test_beta_leader_probability_bad_input(args: tuple[float, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        beta_leader_probability(*args)


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 500), st.floats(0, 500), st.floats(0.01, 10), st.floats(0, 50))
def test_beta_leader_probability_properties(a: float, b: float, prior: float, extra: float) -> None:
    p = beta_leader_probability(a, b, prior)
    assert 0.0 <= p <= 1.0
    assert p + beta_leader_probability(b, a, prior) == pytest.approx(1.0, abs=1e-9)
    assert beta_leader_probability(a + extra, b, prior) >= p - 1e-12
    assert p == pytest.approx(scipy.stats.beta(a + prior, b + prior).sf(0.5), abs=1e-9)


def test_dirichlet_leader_probability_hand_cases() -> None:
    assert dirichlet_leader_probability([]) == 0.0
    assert dirichlet_leader_probability([4]) == 1.0
    # two answers: the Dirichlet is the Beta of beta_leader_probability
    mc = dirichlet_leader_probability([5, 0], samples=20000)
    assert mc == pytest.approx(0.984375, abs=0.01)
    mc = dirichlet_leader_probability([2, 1, 0], samples=20000)
    assert 0.3 < mc < 0.8
    # the leader is the first of the largest counts; equal counts of 3 answers: about 1/3
    assert dirichlet_leader_probability([3, 3, 3], samples=20000) == pytest.approx(1 / 3, abs=0.02)


def test_dirichlet_leader_probability_is_deterministic() -> None:
    counts = [4, 3, 1]
    assert dirichlet_leader_probability(counts) == dirichlet_leader_probability(counts)
    assert dirichlet_leader_probability(counts, rng=7) == dirichlet_leader_probability(
        counts, rng=7
    )
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    assert dirichlet_leader_probability(counts, rng=g1) == dirichlet_leader_probability(
        counts, rng=g2
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"counts": [1, -1]}, "finite and >= 0"),
        ({"counts": [1, math.nan]}, "NaN"),
        ({"counts": [[1, 2]]}, "one-dimensional"),
        ({"counts": [1, 2], "prior": 0.0}, "prior must be > 0"),
        ({"counts": [1, 2], "samples": 0}, "samples must be a positive integer"),
    ],
)
def test_dirichlet_leader_probability_bad_input(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dirichlet_leader_probability(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 30), st.integers(0, 30), st.integers(0, 2**32 - 1))
def test_dirichlet_two_answers_agrees_with_beta(a: int, b: int, seed: int) -> None:
    assume(a != b)
    top1, top2 = max(a, b), min(a, b)
    mc = dirichlet_leader_probability([top1, top2], samples=4000, rng=seed)
    exact = beta_leader_probability(top1, top2)
    assert 0.0 <= mc <= 1.0
    assert mc == pytest.approx(exact, abs=0.05)  # > 6 standard errors


# --------------------------------------------------------------------------------------------
# Early-Stopping Self-Consistency
# --------------------------------------------------------------------------------------------


def test_esc_window_agrees_hand_cases() -> None:
    assert esc_window_agrees(["1", "2", "2", "2"], 3)
    assert esc_window_agrees(["0.5", "1/2", r"\frac{1}{2}"], 3)
    assert not esc_window_agrees(["2", "1", "2"], 3)
    assert not esc_window_agrees(["2", "2"], 3)  # not enough answers yet
    assert not esc_window_agrees(["2", None, "2"], 3)  # a missing answer breaks agreement
    assert not esc_window_agrees(["2", "", "2"], 3)
    assert esc_window_agrees(["9"], 1)
    assert not esc_window_agrees([None], 1)
    assert not esc_window_agrees([], 1)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True])
def test_esc_window_agrees_bad_window(bad: object) -> None:
    with pytest.raises(ConfigError, match="window must be a positive integer"):
        esc_window_agrees(["1"], bad)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(answer_lists, st.integers(1, 6))
def test_esc_window_agrees_means_one_group_of_window_votes(
    answers: list[str | None], window: int
) -> None:
    agrees = esc_window_agrees(answers, window)
    tail = answers[-window:] if len(answers) >= window else None
    expected = (
        tail is not None and sum(vote_counts(tail).values()) == window and n_distinct(tail) == 1
    )
    assert agrees == expected
