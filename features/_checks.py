"""Argument checks shared by the feature modules; each raises :class:`ConfigError` on bad input."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from features.errors import ConfigError

__all__ = ["as_weights", "positive_int", "finite_number", "percent_in_range"]


def positive_int(value: int, what: str) -> int:
    """``value`` as an int, checked to be an integer >= 1 (``what`` names it in the error)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def finite_number(value: float, what: str, *, minimum: float | None = None) -> float:
    """``value`` as a float, checked to be finite and (optionally) ``>= minimum``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ConfigError(f"{what} must be finite, got {value!r}")
    if minimum is not None and x < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {value!r}")
    return x


def percent_in_range(value: float, what: str) -> float:
    """``value`` checked to be a percentage in ``(0, 100]``."""
    x = finite_number(value, what)
    if not 0 < x <= 100:
        raise ConfigError(f"{what} must be in (0, 100], got {value!r}")
    return x


def as_weights(
    values: Sequence[float] | npt.ArrayLike, n: int, what: str, *, allow_nan: bool = False
) -> npt.NDArray[np.float64]:
    """``values`` as a 1-D float64 array of length ``n``, each finite and ``>= 0``.

    With ``allow_nan`` a NaN passes through (the caller drops it); infinities never do.
    """
    try:
        w = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be numbers, got {values!r}") from None
    if w.ndim != 1 or w.shape[0] != n:
        raise ConfigError(f"{what} must be one number per answer ({n}), got shape {w.shape}")
    nan = np.isnan(w)
    if nan.any() and not allow_nan:
        raise ConfigError(
            f"{what} contain NaN at positions {np.flatnonzero(nan).tolist()}: "
            "give every answer a finite weight (use 0.0 to give it no say)"
        )
    bad = ~nan & (~np.isfinite(w) | (w < 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"{what} must be finite and >= 0, got {w[i]!r} at position {i}")
    return w
