"""Tests for features.confidence: token confidence/entropy and DeepConf chain summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from env.types import token_stats
from features.confidence import (
    ChainConfidence,
    bottom_percent_confidence,
    chain_confidence,
    group_confidence,
    lowest_group_confidence,
    mean_confidence,
    tail_confidence,
    token_confidence,
    token_entropy,
)
from features.errors import ConfigError, PonderError

NAN = math.nan
INF = math.inf

# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

logprob = st.one_of(
    st.floats(-30.0, 0.0, allow_nan=False, width=32),
    st.just(-INF),
    st.just(NAN),
)
top_logprobs = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=12),
    elements=logprob,
)
confidences = st.lists(
    st.one_of(st.floats(0.0, 20.0, allow_nan=False), st.just(NAN)), min_size=0, max_size=80
)
windows = st.integers(1, 100)


def naive_groups(conf: list[float], window: int) -> list[float]:
    """Group confidences the slow, obvious way."""
    if not conf:
        return []
    w = min(window, len(conf))
    out = []
    for i in range(len(conf) - w + 1):
        vals = [c for c in conf[i : i + w] if not math.isnan(c)]
        out.append(sum(vals) / len(vals) if vals else NAN)
    return out


# --------------------------------------------------------------------------------------------
# Token confidence and entropy
# --------------------------------------------------------------------------------------------


def test_token_confidence_hand_cases() -> None:
    lp = np.array([[-1.0, -2.0, -3.0], [-0.5, -INF, NAN], [-INF, -INF, NAN]], dtype=np.float32)
    out = token_confidence(lp)
    assert out.dtype == np.float32
    assert out.shape == (3,)
    np.testing.assert_allclose(out[:2], [2.0, 0.5])
    assert math.isnan(out[2])


def test_token_entropy_hand_cases() -> None:
    lp = np.array(
        [
            [math.log(0.25)] * 4,  # uniform over 4 -> log 4
            [0.0, -INF, -INF, -INF],  # one alternative -> 0
            [-1.0, -1.0, -INF, NAN],  # two equal, unnormalised -> log 2
            [-INF, -INF, -INF, -INF],  # nothing -> nan
        ],
        dtype=np.float32,
    )
    out = token_entropy(lp)
    np.testing.assert_allclose(out[:3], [math.log(4), 0.0, math.log(2)], atol=1e-6)
    assert math.isnan(out[3])


def test_token_functions_handle_empty_inputs() -> None:
    assert token_confidence(np.zeros((0, 5))).shape == (0,)
    assert token_entropy(np.zeros((0, 5))).shape == (0,)
    # k == 0: every row has no entries
    assert np.isnan(token_confidence(np.zeros((3, 0)))).all()
    assert np.isnan(token_entropy(np.zeros((3, 0)))).all()


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_token_functions_reject_wrong_shapes(shape: tuple[int, ...]) -> None:
    lp = np.zeros(shape)
    with pytest.raises(ConfigError, match=r"shape \[n_tokens, k\]"):
        token_confidence(lp)
    with pytest.raises(ConfigError, match=r"shape \[n_tokens, k\]"):
        token_entropy(lp)


@settings(max_examples=200, deadline=None)
@given(top_logprobs)
def test_token_stats_are_identical_to_env(lp: np.ndarray) -> None:
    conf, ent = token_stats(lp)
    np.testing.assert_array_equal(token_confidence(lp), conf)
    np.testing.assert_array_equal(token_entropy(lp), ent)


@settings(max_examples=200, deadline=None)
@given(top_logprobs)
def test_token_confidence_and_entropy_ranges(lp: np.ndarray) -> None:
    conf, ent = token_confidence(lp), token_entropy(lp)
    finite = np.isfinite(lp)
    has = finite.any(axis=1)
    # NaN exactly where a row has no finite log-prob
    np.testing.assert_array_equal(np.isnan(conf), ~has)
    np.testing.assert_array_equal(np.isnan(ent), ~has)
    assert (conf[has] >= 0).all()  # log-probs <= 0
    k = np.maximum(finite.sum(axis=1), 1)
    assert (ent[has] >= -1e-6).all()
    assert (ent[has] <= np.log(k[has]) + 1e-5).all()
    for row, c in zip(lp[has], conf[has], strict=True):
        vals = row[np.isfinite(row)].astype(np.float64)
        assert c == pytest.approx(-vals.mean(), rel=1e-5, abs=1e-5)


# --------------------------------------------------------------------------------------------
# Group, lowest, tail, mean, bottom-percent
# --------------------------------------------------------------------------------------------


def test_group_confidence_hand_cases() -> None:
    np.testing.assert_allclose(group_confidence([1.0, 2.0, 3.0, 4.0], 2), [1.5, 2.5, 3.5])
    np.testing.assert_allclose(group_confidence([1.0, 2.0, 3.0, 4.0], 4), [2.5])
    # fewer tokens than the window: one group of all of them
    np.testing.assert_allclose(group_confidence([1.0, 2.0, 3.0, 4.0], 10), [2.5])
    # NaN tokens are left out of their groups; an all-NaN group is NaN
    np.testing.assert_allclose(group_confidence([1.0, NAN, 3.0], 2), [1.0, 3.0])
    np.testing.assert_array_equal(group_confidence([NAN, NAN, 1.0], 2), [NAN, 1.0])
    out = group_confidence([], 3)
    assert out.shape == (0,)
    assert out.dtype == np.float64


def test_lowest_tail_mean_bottom_hand_cases() -> None:
    conf = [3.0, 1.0, 1.0, 3.0, 3.0]  # groups of 2: [2, 1, 2, 3]
    assert lowest_group_confidence(conf, 2) == 1.0
    assert tail_confidence(conf, 2) == 3.0
    assert tail_confidence(conf, 100) == pytest.approx(11 / 5)
    assert mean_confidence(conf) == pytest.approx(11 / 5)
    assert bottom_percent_confidence(conf, 2, 50.0) == 1.5  # lowest 2 of 4 groups: 1, 2
    assert bottom_percent_confidence(conf, 2, 10.0) == 1.0  # at least one group
    assert bottom_percent_confidence(conf, 2, 100.0) == 2.0  # all groups
    # 10% of 30 groups is 3 groups (0.1 * 30 is 3.0000000000000004 in floating point)
    assert bottom_percent_confidence(list(range(30)), 1) == 1.0


def test_nan_handling_is_documented_behaviour() -> None:
    assert mean_confidence([1.0, NAN, 3.0]) == 2.0
    assert tail_confidence([1.0, NAN], 1) != tail_confidence([1.0, NAN], 1)  # NaN
    assert tail_confidence([1.0, NAN], 2) == 1.0
    for f in (
        lambda c: lowest_group_confidence(c, 2),
        lambda c: tail_confidence(c, 2),
        mean_confidence,
        lambda c: bottom_percent_confidence(c, 2),
    ):
        assert math.isnan(f([]))
        assert math.isnan(f([NAN, NAN, NAN]))


def test_chain_confidence_hand_case() -> None:
    conf = [3.0, 1.0, 1.0, 3.0, 3.0]
    cc = chain_confidence(conf, window=2, tail=2)
    assert cc == ChainConfidence(mean=2.2, lowest_group=1.0, tail=3.0, bottom10=1.0)
    empty = chain_confidence([])
    assert all(math.isnan(v) for v in (empty.mean, empty.lowest_group, empty.tail, empty.bottom10))
    with pytest.raises(AttributeError):
        cc.mean = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None, "3"])
def test_bad_window_and_tail_raise(bad: object) -> None:
    with pytest.raises(ConfigError, match="window must be a positive integer"):
        group_confidence([1.0], bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="window must be a positive integer"):
        lowest_group_confidence([1.0], bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tail must be a positive integer"):
        tail_confidence([1.0], bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tail must be a positive integer"):
        chain_confidence([1.0], window=2, tail=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0.0, -5.0, 100.5, NAN, INF])
def test_bad_percent_raises(bad: float) -> None:
    with pytest.raises(ConfigError, match="percent"):
        bottom_percent_confidence([1.0, 2.0], 1, bad)


def test_bad_confidences_raise() -> None:
    with pytest.raises(ConfigError, match="one-dimensional"):
        group_confidence(np.zeros((2, 2)), 1)
    with pytest.raises(ConfigError, match="infinity at position 1"):
        mean_confidence([1.0, INF])
    with pytest.raises(PonderError):
        chain_confidence([-INF])


@settings(max_examples=300, deadline=None)
@given(confidences, windows)
def test_group_confidence_matches_the_obvious_definition(conf: list[float], window: int) -> None:
    got = group_confidence(np.array(conf, dtype=np.float64), window)
    want = naive_groups(conf, window)
    assert got.shape == (len(want),)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    vals = [c for c in conf if not math.isnan(c)]
    ok = got[~np.isnan(got)]
    if ok.size:
        assert ok.min() >= min(vals) - 1e-9
        assert ok.max() <= max(vals) + 1e-9


@settings(max_examples=300, deadline=None)
@given(confidences, windows, st.floats(0.5, 100.0), st.floats(0.5, 100.0))
def test_summaries_are_ordered(conf: list[float], window: int, p: float, q: float) -> None:
    groups = group_confidence(conf, window)
    ok = groups[~np.isnan(groups)]
    low = lowest_group_confidence(conf, window)
    lo_p, hi_p = sorted((p, q))
    b_lo = bottom_percent_confidence(conf, window, lo_p)
    b_hi = bottom_percent_confidence(conf, window, hi_p)
    if ok.size == 0:
        assert math.isnan(low) and math.isnan(b_lo) and math.isnan(b_hi)
        return
    assert low == ok.min()
    # lowest <= bottom p% <= bottom q% (p <= q) <= mean of all groups
    assert low <= b_lo + 1e-12
    assert b_lo <= b_hi + 1e-9
    assert b_hi <= ok.mean() + 1e-9
    assert bottom_percent_confidence(conf, window, 100.0) == pytest.approx(ok.mean())


@settings(max_examples=200, deadline=None)
@given(confidences, windows, st.integers(1, 100))
def test_chain_confidence_agrees_with_the_single_functions(
    conf: list[float], window: int, tail: int
) -> None:
    cc = chain_confidence(conf, window=window, tail=tail)
    expected = [
        mean_confidence(conf),
        lowest_group_confidence(conf, window),
        tail_confidence(conf, tail),
        bottom_percent_confidence(conf, window, 10.0),
    ]
    np.testing.assert_array_equal([cc.mean, cc.lowest_group, cc.tail, cc.bottom10], expected)
    vals = [c for c in conf if not math.isnan(c)]
    if vals:
        assert cc.mean == pytest.approx(sum(vals) / len(vals))
    else:
        assert math.isnan(cc.mean)


def test_chain_confidence_on_real_token_confidences() -> None:
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(5), size=200)).astype(np.float32)
    lp = -np.sort(-lp, axis=1)
    lp[7, 2:] = -np.inf  # fewer alternatives at one position
    conf = token_confidence(lp)
    cc = chain_confidence(conf)  # window 32, tail 64 by default
    assert cc.lowest_group <= cc.bottom10 <= float(np.mean(group_confidence(conf, 32)))
    assert cc.tail == pytest.approx(float(conf[-64:].mean()), rel=1e-6)
