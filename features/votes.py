"""Votes over sampled answers and the stopping statistics of adaptive self-consistency.

An answer is a string or None. None and blank answers are "no answer": they never count as a vote
and their weights are ignored (though still checked). Two answers are the same vote when
:func:`features.answers.answers_equal` says so: answers with the same canonical form
(:func:`features.answers.group_answers`), and numbers within its ``1e-9`` relative tolerance
(``3.14159265358979`` and ``3.141592653589793``). Since tolerance is not transitive, numbers are
grouped by chaining neighbours in sorted order, which gives one partition whatever the order of
the answers.

Ties between groups go to the group whose first answer comes first in the input; a group is
named by that first answer, as written.

Stopping statistics: :func:`beta_leader_probability` and :func:`dirichlet_leader_probability`
(Adaptive-Consistency, Aggarwal et al. 2023), :func:`esc_window_agrees` (Early-Stopping
Self-Consistency, Li et al. 2024).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from itertools import pairwise

import numpy as np
import numpy.typing as npt
from scipy.special import betainc

from features._checks import as_weights, finite_number, positive_int
from features.answers import answers_equal, group_answers, normalize_answer
from features.errors import ConfigError

__all__ = [
    "beta_leader_probability",
    "dirichlet_leader_probability",
    "esc_window_agrees",
    "leader",
    "n_distinct",
    "vote_counts",
    "vote_margin",
]

# The canonical form of a number (see features.answers.normalize_answer): "18", "-3/4".
_CANONICAL_NUMBER_RE = re.compile(r"-?\d+(?:/\d+)?")
# Twice answers_equal's tolerance: float rounding cannot make a pair it accepts fail this test.
_NEAR_REL = 2e-9


@lru_cache(maxsize=1 << 14)
def _value(canonical_number: str) -> Fraction:
    return Fraction(canonical_number)


def _near(a: Fraction, b: Fraction) -> bool:
    """A cheap necessary condition for :func:`answers_equal` on two numbers (1e-9 relative)."""
    try:
        fa, fb = float(a), float(b)
    except OverflowError:
        return True
    scale = max(abs(fa), abs(fb))
    if scale < 1e-290:  # near the subnormals float rounding is too coarse to rule anything out
        return True
    return abs(fa - fb) <= _NEAR_REL * scale


def _partition(answers: Sequence[str | None]) -> list[list[int]]:
    """Equal answers' indices (ascending), groups in order of first appearance."""
    by_key = group_answers(answers)
    numbers = sorted((_value(key), key) for key in by_key if _CANONICAL_NUMBER_RE.fullmatch(key))
    merged: dict[str, str] = {}  # canonical key -> key of the group it joins
    for (va, a), (vb, b) in pairwise(numbers):
        if _near(va, vb) and answers_equal(a, b):
            merged[b] = merged.get(a, a)
    groups: dict[str, list[int]] = {}
    for key, indices in by_key.items():
        groups.setdefault(merged.get(key, key), []).extend(indices)
    parts = [sorted(ix) for ix in groups.values()]
    parts.sort(key=lambda ix: ix[0])
    return parts


def _tally(
    answers: Sequence[str | None], weights: Sequence[float] | npt.ArrayLike | None
) -> list[tuple[str, float]]:
    """(first answer, votes) per group, in order of first appearance."""
    parts = _partition(answers)
    if weights is None:
        return [(_named(answers, ix), float(len(ix))) for ix in parts]
    w = as_weights(weights, len(answers), "weights")
    # fsum is exactly rounded, so a group's total does not depend on the order of its votes.
    return [(_named(answers, ix), math.fsum(float(w[i]) for i in ix)) for ix in parts]


def _named(answers: Sequence[str | None], indices: list[int]) -> str:
    name = answers[indices[0]]
    assert name is not None  # group_answers skips None
    return name


def vote_counts(
    answers: Sequence[str | None], weights: Sequence[float] | npt.ArrayLike | None = None
) -> dict[str, float]:
    """Votes per distinct answer.

    Args:
        answers: answers in sample order; None and blank answers are not votes.
        weights: one weight per answer (finite, >= 0); None counts each answer once.

    Returns:
        First answer of each group, as written -> its count or summed weight, in order of first
        appearance. The values, as a multiset, do not depend on the order of the answers.

    Raises:
        ConfigError: ``weights`` has the wrong length or holds a NaN, infinite or negative weight.
    """
    return dict(_tally(answers, weights))


def _leader(tally: list[tuple[str, float]]) -> tuple[str | None, float]:
    total = math.fsum(v for _, v in tally)
    if total <= 0:
        return None, 0.0
    best, best_votes = tally[0]
    for name, votes in tally[1:]:
        if votes > best_votes:  # strict: a tie keeps the group that appeared first
            best, best_votes = name, votes
    return best, best_votes / total


def leader(
    answers: Sequence[str | None], weights: Sequence[float] | npt.ArrayLike | None = None
) -> tuple[str | None, float]:
    """The leading answer and its share of the votes.

    Ties go to the group whose first answer comes first in ``answers``.

    Args:
        answers: answers in sample order; None and blank answers are not votes.
        weights: one weight per answer (finite, >= 0); None counts each answer once.

    Returns:
        ``(answer, share)``: the leading group's first answer as written and its share in
        ``(0, 1]`` of the total vote; ``(None, 0.0)`` when there are no votes or they all weigh 0.

    Raises:
        ConfigError: bad ``weights`` (see :func:`vote_counts`).
    """
    return _leader(_tally(answers, weights))


def n_distinct(answers: Sequence[str | None]) -> int:
    """How many distinct answers there are (None and blank answers not counted)."""
    return len(_partition(answers))


def vote_margin(
    answers: Sequence[str | None], weights: Sequence[float] | npt.ArrayLike | None = None
) -> float:
    """The leader's share minus the runner-up's (0 for a runner-up with no votes).

    Returns:
        A margin in ``[0, 1]``: 1.0 when all votes agree, 0.0 for a tie or when there are no
        votes.

    Raises:
        ConfigError: bad ``weights`` (see :func:`vote_counts`).
    """
    votes = sorted((v for _, v in _tally(answers, weights)), reverse=True)
    total = math.fsum(votes)
    if total <= 0:
        return 0.0
    second = votes[1] if len(votes) > 1 else 0.0
    return (votes[0] - second) / total


def beta_leader_probability(top1: float, top2: float, prior: float = 1.0) -> float:
    """Adaptive-Consistency's Beta stopping statistic: how sure we are the leader leads.

    ``P(p1 > p2)`` when ``p1 / (p1 + p2) ~ Beta(top1 + prior, top2 + prior)``, that is
    ``P(X > 1/2)`` for ``X`` of that Beta distribution, computed exactly with the regularised
    incomplete Beta function. For example ``top1=5, top2=0, prior=1`` gives
    ``1 - 0.5**6 = 0.984375``; equal counts give 0.5.

    Args:
        top1: votes of the leading answer (>= 0; weights allowed, not only counts).
        top2: votes of the runner-up (>= 0).
        prior: pseudo-count added to both (> 0); 1 is the uniform prior of the paper.

    Returns:
        The probability, in ``[0, 1]``.

    Raises:
        ConfigError: a negative, NaN or infinite count, or ``prior <= 0``.
    """
    a = finite_number(top1, "top1", minimum=0.0)
    b = finite_number(top2, "top2", minimum=0.0)
    p = finite_number(prior, "prior")
    if p <= 0:
        raise ConfigError(f"prior must be > 0, got {prior!r}")
    # P(X > 1/2) for X ~ Beta(a', b') is I_{1/2}(b', a') by the symmetry of the incomplete Beta.
    return float(betainc(b + p, a + p, 0.5))


def dirichlet_leader_probability(
    counts: Sequence[float] | npt.ArrayLike,
    prior: float = 1.0,
    samples: int = 2000,
    rng: np.random.Generator | int | None = None,
) -> float:
    """Adaptive-Consistency's Dirichlet stopping statistic, by Monte Carlo.

    The probability that the current leader (the first of the largest counts) has the largest
    share when shares are drawn from ``Dirichlet(counts + prior)``.

    Args:
        counts: votes per distinct answer (each >= 0).
        prior: pseudo-count added to every answer (> 0).
        samples: Monte Carlo draws (>= 1); the standard error is at most ``0.5 / sqrt(samples)``.
        rng: a generator, or a seed; None means seed 0, so the result is a pure function of
            the arguments.

    Returns:
        The estimated probability, in ``[0, 1]``: 1.0 for a single answer, 0.0 for no answers
        (there is no leader).

    Raises:
        ConfigError: a negative, NaN or infinite count, ``prior <= 0`` or a bad ``samples``.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1:
        raise ConfigError(f"counts must be one-dimensional, got shape {c.shape}")
    c = as_weights(c, c.shape[0], "counts")
    p = finite_number(prior, "prior")
    if p <= 0:
        raise ConfigError(f"prior must be > 0, got {prior!r}")
    n = positive_int(samples, "samples")
    if c.size == 0:
        return 0.0
    if c.size == 1:
        return 1.0
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)
    draws = gen.dirichlet(c + p, size=n)
    return float(np.mean(np.argmax(draws, axis=1) == int(np.argmax(c))))


def esc_window_agrees(answers: Sequence[str | None], window: int) -> bool:
    """Early-Stopping Self-Consistency: whether the last ``window`` answers all agree.

    Args:
        answers: answers in sample order.
        window: how many of the latest answers must agree (>= 1).

    Returns:
        True when there are at least ``window`` answers and the last ``window`` are all present
        (not None or blank) and all the same answer.

    Raises:
        ConfigError: ``window`` is not a positive int.
    """
    w = positive_int(window, "window")
    if len(answers) < w:
        return False
    last = list(answers[-w:])
    if any(normalize_answer(a) is None for a in last):
        return False
    return len(_partition(last)) == 1
