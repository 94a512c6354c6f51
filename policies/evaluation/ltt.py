"""Learn-then-Test statistics: p-values of ``H0: risk > alpha`` and fixed-sequence testing.

The p-values read the mean of ``n`` losses in ``[0, 1]`` (clip signed losses first: the clipped
risk is never below the signed one, so a bound on it bounds the signed risk too). How
:func:`policies.evaluation.risk.calibrate` uses them, and what the guarantee says, is in
:mod:`policies.evaluation.risk`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import binom

from features.errors import ConfigError

__all__ = [
    "LttOutcome",
    "Method",
    "binomial_p_value",
    "certifiable_alpha",
    "check_level",
    "fixed_sequence",
    "hoeffding_bentkus_p_value",
    "learn_then_test",
]

Method = Literal["hb", "binomial"]


def check_level(value: float, what: str) -> float:
    """``value`` as a float, if it is a fraction strictly between 0 and 1.

    Raises:
        ConfigError: it is not (``what`` names it in the message).
    """
    v = float(value)
    if not (math.isfinite(v) and 0 < v < 1):
        raise ConfigError(f"{what} must be a fraction strictly between 0 and 1, got {value!r}")
    return v


def _bernoulli_kl(a: float, b: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(b)) for ``0 <= a <= 1`` and ``0 < b < 1`` (0 log 0 = 0)."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def hoeffding_bentkus_p_value(risk: float, n: int, alpha: float) -> float:
    """The Hoeffding-Bentkus p-value of ``H0: R > alpha`` from the mean ``risk`` of ``n``
    independent losses in ``[0, 1]`` (Bates et al. 2021, as in Learn-then-Test)::

        min(1, exp(-n KL(min(risk, alpha) || alpha)), e * P(Binom(n, alpha) <= ceil(n risk)))

    Raises:
        ConfigError: ``n < 1``, ``alpha`` not in (0, 1) or ``risk`` not in [0, 1].
    """
    if n < 1:
        raise ConfigError(f"a p-value needs at least one loss, got n = {n}")
    alpha = check_level(alpha, "alpha")
    r = float(risk)
    if not 0 <= r <= 1:
        raise ConfigError(f"the mean loss must be in [0, 1] (clip the losses), got {risk!r}")
    hoeffding = math.exp(-n * _bernoulli_kl(min(r, alpha), alpha))
    # n * r is a sum of losses; rounding keeps float noise (k/n * n = k + 1e-15) from adding one
    k = math.ceil(round(n * r, 9))
    bentkus = math.e * float(binom.cdf(k, n, alpha))
    return min(1.0, hoeffding, bentkus)


def binomial_p_value(failures: int, n: int, alpha: float) -> float:
    """The exact binomial p-value of ``H0: R > alpha`` from ``failures`` losses of 1 among ``n``
    losses of 0 or 1: ``P(Binom(n, alpha) <= failures)`` (valid for 0/1 losses only)."""
    if n < 1:
        raise ConfigError(f"a p-value needs at least one loss, got n = {n}")
    if not 0 <= failures <= n:
        raise ConfigError(f"failures must be in 0..{n}, got {failures}")
    alpha = check_level(alpha, "alpha")
    return min(1.0, float(binom.cdf(int(failures), n, alpha)))


def certifiable_alpha(n: int, delta: float) -> float:
    """The smallest ``alpha`` at which a candidate with no loss at all on ``n`` calibration
    questions is certified at level ``delta`` (both p-values give ``(1 - alpha)^n`` there):
    ``1 - delta^(1/n)``."""
    if n < 1:
        raise ConfigError(f"need at least one calibration question, got {n}")
    return 1.0 - check_level(delta, "delta") ** (1.0 / n)


def fixed_sequence(p_values: Sequence[float], delta: float) -> int:
    """Fixed-sequence testing: how many leading hypotheses are rejected at level ``delta``
    (tested in order, each at ``delta``, stopping at the first ``p > delta``)."""
    delta = check_level(delta, "delta")
    k = 0
    for p in p_values:
        if not p <= delta:  # a NaN stops the sequence too
            break
        k += 1
    return k


@dataclass(frozen=True)
class LttOutcome:
    """Learn-then-Test on a loss matrix."""

    p_values: tuple[float, ...]
    """one per candidate, in the given (conservative-first) order"""
    certified: int
    """how many leading candidates are certified (fixed-sequence testing at ``delta``)"""
    risks: tuple[float, ...]
    """each candidate's mean loss"""


def learn_then_test(
    losses: np.ndarray, alpha: float, delta: float, *, method: Method = "hb"
) -> LttOutcome:
    """p-values and fixed-sequence testing for candidates ordered most conservative first.

    Args:
        losses: ``(candidates, questions)`` losses in ``[0, 1]`` (one row per candidate).
        alpha: the risk level (a fraction).
        delta: the error level (a fraction).
        method: ``hb`` (Hoeffding-Bentkus, any loss in [0, 1]) or ``binomial`` (exact, losses
            of 0 or 1 only).

    Raises:
        ConfigError: an empty matrix, losses outside [0, 1], or fractional losses with
            ``binomial``.
    """
    x = np.asarray(losses, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ConfigError(f"losses must be a (candidates, questions) matrix, got shape {x.shape}")
    if not np.all((x >= 0) & (x <= 1)):
        raise ConfigError("losses must lie in [0, 1]: clip them first (see the module docstring)")
    alpha = check_level(alpha, "alpha")
    delta = check_level(delta, "delta")
    n = x.shape[1]
    if method == "hb":
        ps = [hoeffding_bentkus_p_value(float(row.mean()), n, alpha) for row in x]
    elif method == "binomial":
        if not np.all((x == 0) | (x == 1)):
            raise ConfigError(
                "the binomial p-value needs losses of 0 or 1 (a single replay seed); "
                "with several seeds use method 'hb' (Hoeffding-Bentkus)"
            )
        ps = [binomial_p_value(int(row.sum()), n, alpha) for row in x]
    else:
        raise ConfigError(f"method must be 'hb' or 'binomial', got {method!r}")
    return LttOutcome(tuple(ps), fixed_sequence(ps, delta), tuple(float(r) for r in x.mean(1)))
