"""The weighted classification metrics equal the plain ones, and weights equal repetition."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from policies.evaluation.classification import (
    auroc_rows,
    brier_rows,
    ece_rows,
    group_mean_rows,
    spearman_rows,
)


def _data(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.uniform(size=n) < 0.4
    s = np.round(rng.uniform(size=n) + 0.5 * y, 1)  # rounded: plenty of ties
    counts = rng.integers(0, 4, size=n).astype(float)
    return y, s, counts


@pytest.mark.parametrize("seed", range(5))
def test_uniform_weights_give_the_plain_metrics(seed: int) -> None:
    y, s, _ = _data(seed)
    p = np.clip(s / 1.5, 0, 1)
    w = np.ones((1, y.size))
    assert auroc_rows(y, s, w)[0] == pytest.approx(roc_auc_score(y, s))
    assert spearman_rows(s, p + y, w)[0] == pytest.approx(spearmanr(s, p + y).statistic)
    assert brier_rows(y, p, w)[0] == pytest.approx(np.mean((p - y) ** 2))
    bins = np.minimum((p * 10).astype(int), 9)
    ece = sum(
        (bins == b).mean() * abs(y[bins == b].mean() - p[bins == b].mean())
        for b in range(10)
        if (bins == b).any()
    )
    assert ece_rows(y, p, w)[0] == pytest.approx(ece)


@pytest.mark.parametrize("seed", range(5))
def test_weights_equal_repeating_items(seed: int) -> None:
    y, s, counts = _data(seed)
    rep = np.repeat(np.arange(y.size), counts.astype(int))
    p = np.clip(s / 1.5, 0, 1)
    w = counts[None, :] / counts.sum()
    ones = np.ones((1, rep.size))
    assert auroc_rows(y, s, w)[0] == pytest.approx(auroc_rows(y[rep], s[rep], ones)[0])
    assert spearman_rows(s, p + y, w)[0] == pytest.approx(spearmanr(s[rep], (p + y)[rep]).statistic)
    assert brier_rows(y, p, w)[0] == pytest.approx(brier_rows(y[rep], p[rep], ones)[0])
    assert ece_rows(y, p, w)[0] == pytest.approx(ece_rows(y[rep], p[rep], ones)[0])


def test_rows_are_independent_and_degenerate_rows_are_nan() -> None:
    y, s, counts = _data(0)
    w = np.vstack([np.ones(y.size), counts, np.where(y, 1.0, 0.0)])
    a = auroc_rows(y, s, w)
    assert a[0] == pytest.approx(roc_auc_score(y, s))
    assert a[1] == pytest.approx(roc_auc_score(y, s, sample_weight=counts))
    assert np.isnan(a[2])  # only right items weigh
    v = np.array([0.5, np.nan, 1.0])
    g = group_mean_rows(v, np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 0.0, 1.0]]))
    assert g[0] == pytest.approx(0.75)
    assert np.isnan(g[1])
    assert g[2] == pytest.approx(2 / 3)
