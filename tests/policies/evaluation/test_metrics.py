"""Frontier metrics and bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from features.errors import ConfigError
from policies.evaluation.metrics import (
    accuracy_at_budget,
    bootstrap_mean,
    frontier_area,
    pareto_front,
    per_question_means,
    tokens_to_match,
)

POINTS = [(100.0, 0.50), (200.0, 0.70), (150.0, 0.40), (400.0, 0.80), (300.0, 0.75)]


def test_pareto_front_drops_dominated_points() -> None:
    assert pareto_front(POINTS) == [(100.0, 0.5), (200.0, 0.7), (300.0, 0.75), (400.0, 0.8)]


def test_accuracy_at_budget_and_tokens_to_match() -> None:
    assert accuracy_at_budget(POINTS, 250) == 0.7
    assert np.isnan(accuracy_at_budget(POINTS, 50))
    assert tokens_to_match(POINTS, 0.75) == 300.0
    assert tokens_to_match(POINTS, 0.754, tolerance=0.005) == 300.0
    assert tokens_to_match(POINTS, 0.76, tolerance=0.005) == 400.0
    assert np.isnan(tokens_to_match(POINTS, 0.9))


def test_frontier_area_by_hand() -> None:
    # over [0, 400]: 0 until 100, 0.5 to 200, 0.7 to 300, 0.75 to 400
    expected = (0.5 * 100 + 0.7 * 100 + 0.75 * 100) / 400
    assert frontier_area(POINTS, 0, 400) == pytest.approx(expected)
    with pytest.raises(ConfigError):
        frontier_area(POINTS, 5, 5)


def test_per_question_means_groups_seeds() -> None:
    m = per_question_means(["a", "b", "a", "b"], [1, 0, 0, 0])
    np.testing.assert_allclose(m, [0.5, 0.0])
    with pytest.raises(ConfigError):
        per_question_means(["a"], [1, 2])


@given(st.lists(st.floats(0, 1), min_size=1, max_size=50), st.integers(0, 100))
def test_bootstrap_interval_contains_the_mean(xs: list[float], seed: int) -> None:
    iv = bootstrap_mean(np.array(xs), n_boot=200, seed=seed)
    assert iv.low - 1e-12 <= iv.mean <= iv.high + 1e-12
    assert min(xs) - 1e-12 <= iv.low and iv.high <= max(xs) + 1e-12


def test_bootstrap_interval_shrinks_with_more_questions() -> None:
    rng = np.random.default_rng(0)
    small = bootstrap_mean(rng.integers(0, 2, 20).astype(float))
    large = bootstrap_mean(rng.integers(0, 2, 2000).astype(float))
    assert (large.high - large.low) < (small.high - small.low) / 4
