"""Intervals over test questions and training seeds together: the two-way bootstrap.

A heuristic's numbers vary with the test questions; a learned family's also with the seed it
was trained with, and on a 127-question bank the second is as large as the first (one commit
matched maj@16 with 3,138 tokens at one training seed and 2,761 at another). Every interval of
the main job's headline therefore resamples both.

**Which bootstrap, and why.** Questions and training seeds are *crossed*, not nested: every
training seed is evaluated on the same test questions. Each resample draws the questions with
replacement (one draw for every policy, so every comparison is paired on the same questions)
and, independently, the training seeds with replacement (one draw of seed *positions* for every
learned family, so the envelope of all learned families pairs the seeds of one job). This is
Owen's pigeonhole bootstrap for crossed factors (Owen 2007, *Ann. Appl. Stat.* 1(1)); it is
mildly conservative (the question-by-seed interaction is counted twice). A hierarchical
bootstrap (seeds, then questions within each seed) would treat the seeds as if each had seen
other questions; picking one seed per resample would give the interval of a single training
run rather than of the job's mean over its seeds. With 3 seeds the seed part is coarse (a
bootstrap over 3 values sees about 2/3 of their variance): the per-seed values are reported
beside every interval.

**What a family's number is.** Each training seed gives a frontier: its envelope, the best
accuracy at <= B mean tokens. A family's is the mean of its seeds' envelopes, ``E(B)``: what
one training run gets at budget B, on average. Accuracy at a budget, tokens to match maj@16
(the fewest tokens where ``E`` reaches maj@16's accuracy minus the tolerance) and the paired
difference to the best heuristic are read from ``E``, so a seed that never matches lowers the
family's accuracy instead of making the family "never". A heuristic family (or the envelope of
every heuristic) is a family with one seed, and then ``E`` is its plain envelope.

Selections: tokens to match is re-read on every resample (the point that matches may change).
Accuracy at a budget and the differences keep the points chosen on the full sample (each
seed's best point at <= B mean tokens, and the best heuristic point there) and resample their
accuracies, the usual paired comparison of two chosen operating points. Row 0 of every
resampled array is the full sample itself (the point estimate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from features.errors import ConfigError
from policies.evaluation.metrics import Interval

__all__ = [
    "Draws",
    "ScoredPoint",
    "SeededFamily",
    "draws",
    "interval",
]

#: Stands for "no point that cheap" in sums over seeds (a finite number, so 0 x it stays 0).
_NONE = -1e6


class ScoredPoint(Protocol):
    """What the bootstrap reads from an evaluated operating point
    (:class:`~policies.evaluation.runner.EvalResult` is one)."""

    @property
    def label(self) -> str: ...

    @property
    def train_seed(self) -> int | None: ...

    @property
    def accuracy(self) -> Interval: ...

    @property
    def tokens(self) -> Interval: ...

    def per_question(self) -> tuple[list[str], np.ndarray, np.ndarray]: ...


@dataclass
class Draws:
    """The resamples: question weights (shared by every policy) and, per number of seeds,
    seed weights (shared by every learned family). Row 0 is the full sample.

    Attributes:
        questions: ``float[1 + n_boot, nq]``: each question's weight in each resample (rows
            sum to 1; row 0 is uniform).
        n_boot: resamples (rows after the first).
        seed: seeds the draws.
    """

    questions: np.ndarray
    n_boot: int
    seed: int
    _seeds: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def means(self, x: np.ndarray) -> np.ndarray:
        """``float[..., 1 + n_boot]``: the mean of per-question values ``x[..., nq]`` in each
        resample (row 0: ``x.mean(-1)`` itself, exactly as the results report it)."""
        out = x @ self.questions.T
        out[..., 0] = x.mean(axis=-1)
        return out

    def seeds(self, n: int) -> np.ndarray:
        """``float[1 + n_boot, n]``: each training seed's weight in each resample (rows sum to
        1; row 0 is uniform): ``n`` seed positions drawn with replacement."""
        if n < 1:
            raise ConfigError(f"a family needs at least one seed, got {n}")
        w = self._seeds.get(n)
        if w is None:
            w = np.full((self.n_boot + 1, n), 1.0 / n)
            if n > 1:
                pick = np.random.default_rng([self.seed, n]).integers(0, n, (self.n_boot, n))
                w[1:] = _counts(pick, n) / n
            self._seeds[n] = w
        return w


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """``float[rows, n]``: how often each of ``0..n-1`` occurs in each row of ``idx``."""
    out = np.zeros((idx.shape[0], n))
    np.add.at(out, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    return out


def draws(nq: int, n_boot: int = 2000, seed: int = 0) -> Draws:
    """``n_boot`` resamples of ``nq`` questions (and, on demand, of training seeds)."""
    if nq < 1 or n_boot < 1:
        raise ConfigError(f"need questions and resamples, got nq={nq}, n_boot={n_boot}")
    idx = np.random.default_rng(seed).integers(0, nq, size=(n_boot, nq))
    w = np.vstack([np.full((1, nq), 1.0 / nq), _counts(idx, nq) / nq])
    return Draws(w, n_boot, seed)


def interval(x: np.ndarray, level: float = 0.95) -> Interval:
    """Row 0 of ``x`` with the percentile interval of the other rows (``inf`` counts as more
    than any value: quantiles without interpolation, so two ``inf`` give ``inf``, not ``nan``)."""
    x = np.asarray(x, np.float64)
    if math.isnan(x[0]):
        return Interval(float("nan"), float("nan"), float("nan"))
    a = (1 - level) / 2
    lo, hi = np.quantile(x[1:], [a, 1 - a], method="inverted_cdf")
    return Interval(float(x[0]), float(lo), float(hi))


class SeededFamily:
    """A family's operating points by training seed, with their resampled means.

    Args:
        name: the family.
        by_seed: its points per training seed, in a fixed order (``None``: a heuristic's one
            "seed").
        qids: the questions every point must have been evaluated on, in this order.
        d: the resamples.

    Raises:
        ConfigError: a point evaluated on other questions, or a seed without points.
    """

    def __init__(
        self,
        name: str,
        by_seed: Mapping[int | None, Sequence[ScoredPoint]],
        qids: Sequence[str],
        d: Draws,
    ) -> None:
        if not by_seed or any(not pts for pts in by_seed.values()):
            raise ConfigError(f"{name}: every training seed needs at least one point")
        self.name = name
        self.seeds = list(by_seed)
        self.points = [list(pts) for pts in by_seed.values()]
        self.weights = d.seeds(len(self.seeds))  # [R, S]
        self.acc: list[np.ndarray] = []  # per seed: [P, R]
        self.tok: list[np.ndarray] = []
        for pts in self.points:
            a, t = [], []
            for p in pts:
                q, acc, tok = p.per_question()
                if list(q) != list(qids):
                    raise ConfigError(
                        f"{p.label} was evaluated on other questions than the reference"
                    )
                a.append(acc)
                t.append(tok)
            acc_r, tok_r = d.means(np.asarray(a, np.float64)), d.means(np.asarray(t, np.float64))
            # row 0: the means the results report (equal up to rounding)
            acc_r[:, 0] = [p.accuracy.mean for p in pts]
            tok_r[:, 0] = [p.tokens.mean for p in pts]
            self.acc.append(acc_r)
            self.tok.append(tok_r)

    def seed_points(self, i: int) -> list[tuple[float, float]]:
        """Seed ``i``'s ``(tokens, accuracy)`` points on the full sample."""
        return [
            (float(t), float(a)) for t, a in zip(self.tok[i][:, 0], self.acc[i][:, 0], strict=True)
        ]

    def _envelope(self, budgets: np.ndarray) -> np.ndarray:
        """``float[C, R]``: ``E`` at ``budgets[C, R]`` in each resample (``-inf``: a seed that
        counts in that resample has no point that cheap)."""
        total = np.zeros(budgets.shape)
        step = max(1, 2_000_000 // max(1, budgets.shape[0] * max(len(a) for a in self.acc)))
        for r in range(0, budgets.shape[1], step):  # in blocks of resamples: [C, P, r] arrays
            b = budgets[:, None, r : r + step] * (1 + 1e-12)
            for i in range(len(self.seeds)):
                ok = self.tok[i][None, :, r : r + step] <= b
                best = np.where(ok, self.acc[i][None, :, r : r + step], _NONE).max(axis=1)
                total[:, r : r + step] += self.weights[None, r : r + step, i] * best
        return np.where(total < _NONE / 2 / len(self.seeds), -np.inf, total)

    def tokens_to_match(self, target: np.ndarray, tolerance: float) -> np.ndarray:
        """``float[R]``: the fewest mean tokens at which ``E`` reaches ``target - tolerance``
        (``target[R]``: maj@16's accuracy in each resample); ``inf`` where it never does."""
        cand = np.concatenate(self.tok, axis=0)  # [C, R]: E changes only at these
        e = self._envelope(cand)
        ok = e >= target[None, :] - tolerance
        return np.where(ok, cand, np.inf).min(axis=0)

    def chosen(self, budget: float) -> list[int] | None:
        """Each seed's best point at <= ``budget`` mean tokens on the full sample (fewest
        tokens among equals), as an index into its points; ``None`` if some seed has no point
        that cheap."""
        out = []
        for i in range(len(self.seeds)):
            t, a = self.tok[i][:, 0], self.acc[i][:, 0]
            ok = np.flatnonzero(t <= budget * (1 + 1e-12))
            if ok.size == 0:
                return None
            out.append(int(max(ok, key=lambda k: (a[k], -t[k], -k))))
        return out

    def at_budget(self, budget: float) -> np.ndarray:
        """``float[R]``: the accuracy of the points :meth:`chosen` at ``budget``, averaged
        over the seeds of each resample (``nan`` everywhere if a seed has no point that
        cheap)."""
        picked = self.chosen(budget)
        if picked is None:
            return np.full(self.weights.shape[0], np.nan)
        rows = np.stack([self.acc[i][j] for i, j in enumerate(picked)], axis=1)  # [R, S]
        return (rows * self.weights).sum(axis=1)

    def best_accuracy(self) -> float:
        """The mean over seeds of each seed's best accuracy (``E`` at unlimited tokens)."""
        return float(np.mean([a[:, 0].max() for a in self.acc]))
