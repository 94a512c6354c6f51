"""Tests for features.aggregate: majority, weighted, confidence-filtered and verifier votes."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.aggregate import (
    confidence_weighted_vote,
    majority_vote,
    verifier_weighted_vote,
    weighted_vote,
)
from features.answers import answers_equal, normalize_answer
from features.errors import ConfigError
from features.votes import leader, vote_counts

NAN = math.nan
ROOT = Path(__file__).resolve().parents[2]
POOL = ["0.5", "1/2", "3", "3.0", "7", "x+1", "", None]


@st.composite
def chains(
    draw: st.DrawFn, scores: st.SearchStrategy[float]
) -> tuple[list[str | None], list[float], list[int]]:
    answers = draw(st.lists(st.sampled_from(POOL), max_size=20))
    values = draw(st.lists(scores, min_size=len(answers), max_size=len(answers)))
    perm = list(draw(st.permutations(range(len(answers)))))
    return answers, values, perm


# --------------------------------------------------------------------------------------------
# Hand cases
# --------------------------------------------------------------------------------------------


def test_majority_vote_hand_cases() -> None:
    assert majority_vote(["7", "3", "3.0", None]) == ("3", pytest.approx(2 / 3))
    assert majority_vote(["b", "a"]) == ("b", 0.5)  # tie: first group wins
    assert majority_vote([None, ""]) == (None, 0.0)
    assert majority_vote([]) == (None, 0.0)


def test_weighted_vote_hand_cases() -> None:
    assert weighted_vote(["a", "b", "b"], [3.0, 1.0, 1.0]) == ("a", 0.6)
    assert weighted_vote(["a", "b", "1/2", "0.5"], [1.0, 1.5, 1.0, 1.0]) == ("1/2", 2 / 4.5)
    assert weighted_vote(["a", "b"], [2.0, 2.0]) == ("a", 0.5)
    assert weighted_vote(["a", "b"], [0.0, 0.0]) == (None, 0.0)


@pytest.mark.parametrize("bad", [[1.0], [1.0, -1.0], [1.0, NAN], [1.0, math.inf]])
def test_weighted_vote_bad_weights(bad: list[float]) -> None:
    with pytest.raises(ConfigError):
        weighted_vote(["a", "b"], bad)


def test_confidence_weighted_vote_hand_cases() -> None:
    answers = ["a", "b", "b", "c"]
    conf = [9.0, 2.0, 2.0, 1.0]
    # all chains: a 9, b 4, c 1
    assert confidence_weighted_vote(answers, conf) == ("a", pytest.approx(9 / 14))
    # top 50% = 2 chains, but both b chains tie at the cut: a 9, b 4 -> a with 9/13
    assert confidence_weighted_vote(answers, conf, 50.0) == ("a", pytest.approx(9 / 13))
    # top 25% = 1 chain: a alone
    assert confidence_weighted_vote(answers, conf, 25.0) == ("a", 1.0)
    # top 10% of 4 = 1 chain
    assert confidence_weighted_vote(answers, conf, 10.0) == ("a", 1.0)
    # ties at the cut are all kept, whatever the chain order: the top 50% of [5, 3, 3, 3] is
    # every chain, and c wins with 6 of 14
    assert confidence_weighted_vote(["a", "b", "c", "c"], [5.0, 3.0, 3.0, 3.0], 50.0) == (
        "c",
        pytest.approx(6 / 14),
    )
    assert confidence_weighted_vote(["a", "b", "b", "c"], [2.0, 3.0, 3.0, 9.0], 75.0) == (
        "c",
        pytest.approx(9 / 15),
    )
    # 10% of 30 chains is 3 chains, not 4
    many = [str(i) for i in range(30)]
    assert confidence_weighted_vote(many, [float(i) for i in range(30)], 10.0) == (
        "29",
        pytest.approx(29 / (27 + 28 + 29)),
    )


def test_confidence_weighted_vote_drops_nan_and_ranks_only_answers() -> None:
    # NaN confidence: that chain does not vote
    assert confidence_weighted_vote(["a", "b"], [NAN, 1.0]) == ("b", 1.0)
    assert confidence_weighted_vote(["a"], [NAN]) == (None, 0.0)
    # chains without an answer are not ranked: the top 50% of answers is "b"
    assert confidence_weighted_vote([None, "b", "c"], [100.0, 5.0, 1.0], 50.0) == ("b", 1.0)


@pytest.mark.parametrize(
    ("conf", "pct", "match"),
    [
        ([1.0, -1.0], 100.0, "finite and >= 0"),
        ([1.0, math.inf], 100.0, "finite and >= 0"),
        ([1.0], 100.0, "one number per answer"),
        ([1.0, 1.0], 0.0, "keep_top_percent"),
        ([1.0, 1.0], 120.0, "keep_top_percent"),
    ],
)
def test_confidence_weighted_vote_bad_input(conf: list[float], pct: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        confidence_weighted_vote(["a", "b"], conf, pct)


def test_verifier_weighted_vote_hand_cases() -> None:
    assert verifier_weighted_vote(["a", "b", "b"], [0.9, 0.4, 0.4]) == (
        "a",
        pytest.approx(0.9 / 1.7),
    )
    assert verifier_weighted_vote(["a", "b", "b"], [0.9, 0.5, 0.5]) == ("b", pytest.approx(1 / 1.9))
    assert verifier_weighted_vote(["a", "b"], [NAN, 0.1]) == ("b", 1.0)
    assert verifier_weighted_vote(["a", "b"], [0.0, 0.0]) == (None, 0.0)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        verifier_weighted_vote(["a"], [1.5])
    with pytest.raises(ConfigError):
        verifier_weighted_vote(["a"], [-0.5])


def test_exported_from_the_package_which_imports_no_higher_package() -> None:
    # A subprocess: under pytest, ``features`` can resolve to the tests/features folder.
    code = (
        "import sys, features\n"
        "names = ['majority_vote', 'weighted_vote', 'confidence_weighted_vote',\n"
        "         'verifier_weighted_vote', 'leader', 'vote_counts', 'vote_margin', 'n_distinct',\n"
        "         'beta_leader_probability', 'dirichlet_leader_probability', 'esc_window_agrees',\n"
        "         'token_confidence', 'token_entropy', 'group_confidence', 'ChainConfidence',\n"
        "         'chain_confidence', 'lowest_group_confidence', 'tail_confidence',\n"
        "         'mean_confidence', 'bottom_percent_confidence', 'probe_stability',\n"
        "         'probe_streak', 'switch_count', 'verifier_stats', 'DEFAULT_SWITCH_WORDS',\n"
        "         'answers_equal', 'group_answers', 'ConfigError']\n"
        "missing = [n for n in names if n not in features.__all__ or not hasattr(features, n)]\n"
        "assert not missing, missing\n"
        "assert all(hasattr(features, n) for n in features.__all__)\n"
        "higher = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "                ('env', 'policies', 'controller'))\n"
        "assert not higher, higher\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(chains(st.floats(0.0, 20.0)), st.sampled_from([10.0, 50.0, 90.0, 100.0]))
def test_aggregates_do_not_depend_on_order(
    data: tuple[list[str | None], list[float], list[int]], pct: float
) -> None:
    answers, values, perm = data
    p_answers = [answers[i] for i in perm]
    p_values = [values[i] for i in perm]
    probs = [v / 20.0 for v in values]
    p_probs = [v / 20.0 for v in p_values]
    for f, a, b in (
        (lambda x, _v: majority_vote(x), values, p_values),
        (weighted_vote, values, p_values),
        (lambda x, v: confidence_weighted_vote(x, v, pct), values, p_values),
        (verifier_weighted_vote, probs, p_probs),
    ):
        name, share = f(answers, a)
        p_name, p_share = f(p_answers, b)
        assert share == p_share
        assert 0.0 <= share <= 1.0
        assert (name is None) == (p_name is None)


@settings(max_examples=300, deadline=None)
@given(
    chains(st.one_of(st.floats(0.0, 20.0), st.just(NAN))),
    st.floats(1.0, 100.0),
)
def test_confidence_vote_is_a_weighted_vote_of_the_top_chains(
    data: tuple[list[str | None], list[float], list[int]], pct: float
) -> None:
    answers, conf, _ = data
    got = confidence_weighted_vote(answers, conf, pct)
    voting = [
        (a, c)
        for a, c in zip(answers, conf, strict=True)
        if normalize_answer(a) is not None and not math.isnan(c)
    ]
    if not voting:
        assert got == (None, 0.0)
        return
    ranked = sorted((c for _, c in voting), reverse=True)
    m = max(1, math.ceil(pct * len(ranked) / 100 - 1e-9))
    kept = [(a, c) for a, c in voting if c >= ranked[m - 1]]
    assert len(kept) >= m
    want = leader([a for a, _ in kept], [c for _, c in kept])
    assert got[1] == pytest.approx(want[1])
    if got[0] is None:
        assert want[0] is None
    else:
        assert answers_equal(got[0], want[0])
    if pct == 100.0 and not any(math.isnan(c) for c in conf):
        assert got == weighted_vote(answers, conf)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(POOL), max_size=20))
def test_majority_vote_is_the_unweighted_leader(answers: list[str | None]) -> None:
    name, share = majority_vote(answers)
    assert (name, share) == leader(answers)
    assert (name, share) == weighted_vote(answers, [1.0] * len(answers))
    if name is not None:
        counts = vote_counts(answers)
        assert share == counts[name] / sum(counts.values())
