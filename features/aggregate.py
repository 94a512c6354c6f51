"""Final-answer aggregation over a question's chains: plain, weighted and filtered votes.

Every function returns ``(answer, share)`` like :func:`features.votes.leader`: the winning
group's first answer as written and its share of the (weighted) vote, ``(None, 0.0)`` when
nothing votes. None and blank answers never vote. Ties go to the group whose first answer comes
first in the input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from features._checks import as_weights, percent_in_range
from features.answers import normalize_answer
from features.errors import ConfigError
from features.votes import leader

__all__ = [
    "confidence_weighted_vote",
    "majority_vote",
    "verifier_weighted_vote",
    "weighted_vote",
]

_COUNT_EPS = 1e-9  # see features.confidence: 10% of 30 chains is 3, not 4


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """Self-consistency: the most frequent answer and its share of the answers given."""
    return leader(answers)


def weighted_vote(
    answers: Sequence[str | None], weights: Sequence[float] | npt.ArrayLike
) -> tuple[str | None, float]:
    """The answer with the largest total weight and its share of the total.

    Args:
        answers: one answer per chain.
        weights: one weight per chain, finite and >= 0.

    Raises:
        ConfigError: ``weights`` has the wrong length or holds a NaN, infinite or negative weight.
    """
    return leader(answers, as_weights(weights, len(answers), "weights"))


def confidence_weighted_vote(
    answers: Sequence[str | None],
    confidences: Sequence[float] | npt.ArrayLike,
    keep_top_percent: float = 100.0,
) -> tuple[str | None, float]:
    """DeepConf offline voting: keep the most confident chains, then weight votes by confidence.

    Of the chains with an answer and a confidence, the ``ceil(keep_top_percent% of them)`` most
    confident (at least one; every chain tied with the last one kept too, so the result does not
    depend on chain order) vote, each with its confidence as weight. DeepConf keeps the top 10%
    (aggressive) or 90% (conservative).

    Args:
        answers: one answer per chain.
        confidences: one chain confidence per chain (e.g. its lowest group confidence), finite
            and >= 0; NaN (no confidence) drops that chain from the vote.
        keep_top_percent: share of chains to keep, in ``(0, 100]``.

    Raises:
        ConfigError: wrong length, an infinite or negative confidence, or a bad percentage.
    """
    pct = percent_in_range(keep_top_percent, "keep_top_percent")
    conf = as_weights(confidences, len(answers), "confidences", allow_nan=True)
    voting = ~np.isnan(conf) & np.array([normalize_answer(a) is not None for a in answers], bool)
    if pct < 100 and voting.any():
        ranked = np.sort(conf[voting])[::-1]
        m = max(1, math.ceil(pct * ranked.size / 100.0 - _COUNT_EPS))
        voting &= conf >= ranked[m - 1]
    kept = [a if v else None for a, v in zip(answers, voting, strict=True)]
    return leader(kept, np.where(voting, conf, 0.0))


def verifier_weighted_vote(
    answers: Sequence[str | None], p_yes: Sequence[float] | npt.ArrayLike
) -> tuple[str | None, float]:
    """Votes weighted by a verifier's probability that each chain is correct.

    Args:
        answers: one answer per chain.
        p_yes: one verifier score per chain, in ``[0, 1]``; NaN (not verified) drops that chain
            from the vote.

    Raises:
        ConfigError: wrong length or a score outside ``[0, 1]``.
    """
    p = as_weights(p_yes, len(answers), "p_yes", allow_nan=True)
    if (p > 1).any():
        raise ConfigError(f"p_yes must be probabilities in [0, 1], got {p[p > 1]}")
    scored = ~np.isnan(p)
    kept = [a if s else None for a, s in zip(answers, scored, strict=True)]
    return leader(kept, np.where(scored, p, 0.0))
