"""Features of a chain's intermediate answers, thought switches and verifier scores.

Probe answers are what answer-forcing probes read from a chain as it grows (oldest first); None or
blank means the probe gave no answer. Two probe answers agree when
:func:`features.answers.answers_equal` says so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from features._checks import positive_int
from features.answers import answers_equal, normalize_answer
from features.errors import ConfigError

__all__ = [
    "DEFAULT_SWITCH_WORDS",
    "probe_stability",
    "probe_streak",
    "switch_count",
    "verifier_stats",
]

#: Words that open a new line of thought (Wang et al. 2025, "Thoughts Are All Over the Place").
DEFAULT_SWITCH_WORDS: tuple[str, ...] = (
    "Alternatively",
    "Wait",
    "Hmm",
    "Let me try",
    "Another approach",
)


def probe_stability(probe_answers: Sequence[str | None], last: int = 3) -> float:
    """Certaindex-style stability: how many of the latest probes agree with the latest one.

    Args:
        probe_answers: probe answers, oldest first.
        last: how many of the latest probes to look at (>= 1); with fewer probes, all of them.

    Returns:
        The fraction of those probes (the latest included) equal to the latest probe answer,
        in ``[1/last, 1]``; 0.0 when there are no probes or the latest gave no answer.

    Raises:
        ConfigError: ``last`` is not a positive int.
    """
    n = positive_int(last, "last")
    if not probe_answers or normalize_answer(probe_answers[-1]) is None:
        return 0.0
    latest = probe_answers[-1]
    window = probe_answers[-n:]
    return sum(answers_equal(latest, a) for a in window) / len(window)


def probe_streak(probe_answers: Sequence[str | None]) -> int:
    """How many consecutive latest probes gave the latest probe's answer.

    Returns:
        The streak length, the latest probe included; 0 when there are no probes or the latest
        gave no answer.
    """
    if not probe_answers:
        return 0
    latest = probe_answers[-1]
    streak = 0
    for a in reversed(probe_answers):
        if not answers_equal(latest, a):
            break
        streak += 1
    return streak


@lru_cache(maxsize=64)
def _switch_re(words: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so a phrase wins over a shorter word it starts with ("Let me try" over
    # "Let"); matches never overlap, so each switch counts once.
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})")


def switch_count(text: str, words: Sequence[str] = DEFAULT_SWITCH_WORDS) -> int:
    """Thought-switch count: how often ``text`` starts a word with one of ``words``.

    Matching is case-sensitive, as in the underthinking paper (``Wait,`` counts, ``wait`` in the
    middle of a sentence does not). A match must start a word (no letter, digit or underscore
    just before it) but need not end one, so ``Hmmm`` counts as ``Hmm``. Matches do not overlap.

    Args:
        text: generated text.
        words: the switch words or phrases; none of them may be empty.

    Returns:
        The number of matches (0 for no words).

    Raises:
        ConfigError: an empty or non-string word.
    """
    if isinstance(words, str):
        raise ConfigError(f"words must be a sequence of strings, got the string {words!r}")
    ws = tuple(words)
    if not ws:
        return 0
    if any(not isinstance(w, str) or not w for w in ws):
        raise ConfigError(f"switch words must be non-empty strings, got {ws!r}")
    return sum(1 for _ in _switch_re(ws).finditer(text))


def verifier_stats(p_yes: Sequence[float] | npt.ArrayLike) -> tuple[float, float, float]:
    """Summary of a chain's self-verification scores over time.

    Args:
        p_yes: the verifier's probability of "yes", oldest first, each in ``[0, 1]``; NaN marks a
            missing score and is ignored.

    Returns:
        ``(last, mean, min)`` of the non-NaN scores; ``(nan, nan, nan)`` when there is none.

    Raises:
        ConfigError: not 1-D, or a score outside ``[0, 1]`` (infinities included).
    """
    p = np.asarray(p_yes, dtype=np.float64)
    if p.ndim != 1:
        raise ConfigError(f"p_yes must be one-dimensional, got shape {p.shape}")
    p = p[~np.isnan(p)]
    if ((p < 0) | (p > 1)).any():
        raise ConfigError(f"p_yes must be probabilities in [0, 1], got {p[(p < 0) | (p > 1)]}")
    if p.size == 0:
        return math.nan, math.nan, math.nan
    return float(p[-1]), float(p.mean()), float(p.min())
