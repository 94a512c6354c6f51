"""Accuracy-versus-tokens metrics with bootstrap confidence intervals.

Episodes are grouped by question: a question's score is the mean over its seeds, and intervals
come from resampling questions (the unit that varies between benchmarks), never episodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from features.errors import ConfigError

__all__ = [
    "Interval",
    "FrontierPoint",
    "accuracy_at_budget",
    "bootstrap_mean",
    "frontier_area",
    "pareto_front",
    "per_question_means",
    "tokens_to_match",
]


@dataclass(frozen=True, slots=True)
class Interval:
    """A mean and its bootstrap interval."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True, slots=True)
class FrontierPoint:
    """One operating point of a policy: its mean tokens and accuracy (with intervals)."""

    policy: str
    param: str
    tokens: Interval
    accuracy: Interval


def per_question_means(qids: Sequence[str], values: Sequence[float]) -> np.ndarray:
    """Mean of ``values`` per question (in first-seen order of ``qids``)."""
    if len(qids) != len(values):
        raise ConfigError(f"{len(qids)} question ids for {len(values)} values")
    if not qids:
        raise ConfigError("no episodes to summarise")
    order: dict[str, int] = {}
    idx = np.fromiter((order.setdefault(q, len(order)) for q in qids), dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    sums = np.bincount(idx, weights=v, minlength=len(order))
    counts = np.bincount(idx, minlength=len(order))
    return sums / counts


def bootstrap_mean(
    per_question: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> Interval:
    """The mean of per-question values and its percentile bootstrap interval over questions."""
    x = np.asarray(per_question, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ConfigError("bootstrap_mean needs a non-empty 1-d array of per-question values")
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    a = (1 - level) / 2
    return Interval(float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (tokens, accuracy) points no other point beats on both, sorted by tokens."""
    best: list[tuple[float, float]] = []
    for t, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if not best or a > best[-1][1]:
            best.append((t, a))
    return best


def accuracy_at_budget(points: Sequence[tuple[float, float]], budget: float) -> float:
    """Best accuracy reachable with mean tokens <= ``budget`` (``nan`` if none is that cheap)."""
    ok = [a for t, a in points if t <= budget]
    return max(ok) if ok else float("nan")


def tokens_to_match(
    points: Sequence[tuple[float, float]], target: float, tolerance: float = 0.005
) -> float:
    """Fewest mean tokens among points with accuracy >= ``target - tolerance`` (``nan`` if none)."""
    ok = [t for t, a in points if a >= target - tolerance]
    return min(ok) if ok else float("nan")


def frontier_area(points: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """Area under the step frontier (best accuracy at each budget) over ``[lo, hi]`` tokens,
    divided by ``hi - lo``: the mean best accuracy over that budget range (budgets where no point
    is cheap enough count as 0)."""
    if not hi > lo:
        raise ConfigError(f"need hi > lo, got [{lo}, {hi}]")
    front = pareto_front(points)
    area = 0.0
    for i, (t, a) in enumerate(front):
        start = max(t, lo)
        end = min(front[i + 1][0] if i + 1 < len(front) else hi, hi)
        if end > start:
            area += a * (end - start)
    return area / (hi - lo)
