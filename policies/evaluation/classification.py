"""How well a score ranks and predicts binary outcomes, on every bootstrap resample at once.

Each function takes per-item labels and scores and a weight matrix ``w`` ``[rows, n]`` (one row
per resample, e.g. :class:`~policies.evaluation.bootstrap.Draws` ``.questions`` spread over each
question's items) and returns one number per row. Weights stand for repeated items, so a row
with integer-proportional weights gives exactly what the metric gives on the resample written
out; row 0 of uniform weights gives the plain metric (AUROC as scikit-learn's
``roc_auc_score``, Spearman as scipy's ``spearmanr``, ties averaged in both).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "auroc_rows",
    "brier_rows",
    "ece_rows",
    "group_mean_rows",
    "spearman_rows",
]


def _as_rows(w: np.ndarray, n: int) -> np.ndarray:
    w = np.asarray(w, np.float64)
    if w.ndim == 1:
        w = w[None, :]
    if w.shape[1] != n:
        raise ValueError(f"weights of shape {w.shape} for {n} items")
    return w


def _tie_groups(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, group of each sorted item)`` for the values of ``x`` sorted."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    return order, np.flatnonzero(new), np.cumsum(new) - 1


def auroc_rows(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted AUROC per row: P(score of a right item > a wrong one's), ties half; NaN for a
    row without weight on both classes."""
    y = np.asarray(y, bool)
    s = np.asarray(score, np.float64)
    w = _as_rows(w, y.size)
    if y.size == 0:
        return np.full(w.shape[0], np.nan)
    order, starts, _ = _tie_groups(s)
    ws, ys = w[:, order], y[order]
    pos = np.add.reduceat(ws * ys, starts, axis=1)
    neg = np.add.reduceat(ws * ~ys, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def brier_rows(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted mean squared error of probabilities ``p`` against outcomes ``y``."""
    err = (np.asarray(p, np.float64) - np.asarray(y, np.float64)) ** 2
    w = _as_rows(w, err.size)
    return (w @ err) / w.sum(axis=1)


def ece_rows(y: np.ndarray, p: np.ndarray, w: np.ndarray, bins: int = 10) -> np.ndarray:
    """Expected calibration error over ``bins`` equal-width bins of ``p`` on [0, 1]: the
    weighted mean over bins of |mean outcome - mean probability|, each bin by its weight."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    gap = np.asarray(y, np.float64) - p
    w = _as_rows(w, p.size)
    b = np.minimum((p * bins).astype(int), bins - 1)
    onehot = np.zeros((p.size, bins))
    onehot[np.arange(p.size), b] = 1.0
    return np.abs((w * gap) @ onehot).sum(axis=1) / w.sum(axis=1)


def _weighted_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mid-ranks of ``x`` per row as if each item were repeated by its weight: ``[rows, n]``."""
    order, starts, group = _tie_groups(x)
    gw = np.add.reduceat(w[:, order], starts, axis=1)
    mid = np.cumsum(gw, axis=1) - gw / 2
    out = np.empty_like(w)
    out[:, order] = mid[:, group]
    return out


def spearman_rows(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Spearman correlation per row: the weighted Pearson correlation of the weighted
    mid-ranks; NaN where a side is constant."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    w = _as_rows(w, a.size)
    ra, rb = _weighted_ranks(a, w), _weighted_ranks(b, w)
    tot = w.sum(axis=1, keepdims=True)
    ma = (w * ra).sum(axis=1, keepdims=True) / tot
    mb = (w * rb).sum(axis=1, keepdims=True) / tot
    da, db = ra - ma, rb - mb
    cov = (w * da * db).sum(axis=1)
    var = (w * da * da).sum(axis=1) * (w * db * db).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 1e-300, cov / np.sqrt(np.where(var > 0, var, 1.0)), np.nan)


def group_mean_rows(values: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """Weighted mean per row of per-group values, skipping NaN groups (e.g. the within-question
    AUROC of a question whose chains are all right); NaN for a row with no weight left."""
    v = np.asarray(values, np.float64)
    w = _as_rows(wq, v.size)
    ok = np.isfinite(v)
    wk = w[:, ok]
    tot = wk.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, (wk @ v[ok]) / np.where(tot > 0, tot, 1.0), np.nan)
