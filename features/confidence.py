"""Token- and chain-level confidence from top-k log-probabilities (DeepConf, Fu et al. 2025).

Token confidence is ``-mean`` of the top-k log-probabilities at a position (higher = more
confident). Chain-level measures summarise a chain's per-token confidences: the mean, the lowest
sliding-window ("group") mean, the mean of the last tokens ("tail") and the mean of the lowest 10%
of groups ("bottom 10%").

NaN policy: a NaN token confidence (a position with no log-probabilities) is ignored by every
chain-level measure; a measure with nothing left to average is NaN. Infinite confidences are
rejected with :class:`~features.errors.ConfigError` (they cannot come from finite log-probs and
would poison every window that holds them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from features._checks import percent_in_range, positive_int
from features.errors import ConfigError

__all__ = [
    "ChainConfidence",
    "bottom_percent_confidence",
    "chain_confidence",
    "group_confidence",
    "lowest_group_confidence",
    "mean_confidence",
    "tail_confidence",
    "token_confidence",
    "token_entropy",
]

FloatArray = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]

# Tolerance for the number of groups in "the lowest p percent": 10% of 30 groups is 3, not 4
# because 0.1 * 30 is 3.0000000000000004 in binary floating point.
_COUNT_EPS = 1e-9


def _top_logprobs(top_logprobs: npt.ArrayLike) -> FloatArray:
    lp = np.asarray(top_logprobs, dtype=np.float32)
    if lp.ndim != 2:
        raise ConfigError(
            f"top_logprobs must have shape [n_tokens, k], got shape {lp.shape}: "
            "pass one row of top-k log-probabilities per token"
        )
    return lp


def token_confidence(top_logprobs: npt.ArrayLike) -> FloatArray:
    """DeepConf token confidence: ``-mean`` of each row's top-k log-probabilities.

    Non-finite entries (``-inf`` or NaN, e.g. fewer than k alternatives) are ignored; a row with
    no finite entry gives NaN. Same definition and arithmetic as
    :func:`env.types.token_stats`.

    Args:
        top_logprobs: log-probabilities of shape ``[n, k]``.

    Returns:
        Confidences of shape ``[n]``, float32.

    Raises:
        ConfigError: the input is not two-dimensional.
    """
    lp = _top_logprobs(top_logprobs)
    if lp.shape[1] == 0:
        return np.full(lp.shape[0], np.nan, dtype=np.float32)
    finite = np.isfinite(lp)
    cnt = finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = -np.where(finite, lp, 0.0).sum(axis=1) / cnt
    conf = np.where(cnt > 0, conf, np.nan)
    return conf.astype(np.float32)


def token_entropy(top_logprobs: npt.ArrayLike) -> FloatArray:
    """Entropy (nats) of each row's top-k probabilities renormalised to sum to one.

    Non-finite entries are ignored; a row with no finite entry gives NaN. Same definition and
    arithmetic as :func:`env.types.token_stats`.

    Args:
        top_logprobs: log-probabilities of shape ``[n, k]``.

    Returns:
        Entropies of shape ``[n]``, float32, each in ``[0, log k]``.

    Raises:
        ConfigError: the input is not two-dimensional.
    """
    lp = _top_logprobs(top_logprobs)
    if lp.shape[1] == 0:
        return np.full(lp.shape[0], np.nan, dtype=np.float32)
    finite = np.isfinite(lp)
    cnt = finite.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(finite, np.exp(np.where(finite, lp, 0.0)), 0.0)
        z = p.sum(axis=1, keepdims=True)
        q = p / z
        ent = -np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(axis=1)
    ent = np.where(cnt > 0, ent, np.nan)
    return ent.astype(np.float32)


def _confidences(conf: npt.ArrayLike) -> Float64Array:
    c = np.asarray(conf, dtype=np.float64)
    if c.ndim != 1:
        raise ConfigError(
            f"token confidences must be one-dimensional [n_tokens], got shape {c.shape}"
        )
    if np.isinf(c).any():
        raise ConfigError(
            "token confidences must be finite or NaN (NaN marks a token without log-probs), "
            f"got an infinity at position {int(np.flatnonzero(np.isinf(c))[0])}"
        )
    return c


def _nanmean(x: Float64Array) -> float:
    """Mean of the non-NaN values of ``x``; NaN (without a warning) when there are none."""
    keep = x[~np.isnan(x)]
    return float(keep.mean()) if keep.size else math.nan


def _groups(c: Float64Array, window: int) -> Float64Array:
    n = c.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.float64)
    w = min(window, n)
    valid = ~np.isnan(c)
    sums = np.concatenate(([0.0], np.cumsum(np.where(valid, c, 0.0))))
    cnts = np.concatenate(([0], np.cumsum(valid)))
    window_sums = sums[w:] - sums[:-w]
    window_cnts = cnts[w:] - cnts[:-w]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = window_sums / window_cnts
    return np.where(window_cnts > 0, out, np.nan)


def _bottom_percent(groups: Float64Array, percent: float) -> float:
    g = groups[~np.isnan(groups)]
    if g.size == 0:
        return math.nan
    m = max(1, math.ceil(percent * g.size / 100.0 - _COUNT_EPS))
    return float(np.partition(g, m - 1)[:m].mean())


def group_confidence(conf: npt.ArrayLike, window: int) -> Float64Array:
    """DeepConf group confidence: the mean confidence of every window of ``window`` tokens.

    Group ``i`` covers tokens ``i .. i + window - 1`` (so the group ending at each token from
    ``window - 1`` on). With fewer tokens than ``window``, there is one group of all tokens.
    NaN tokens are left out of their groups' means; a group of only NaN tokens is NaN.

    Args:
        conf: per-token confidences, shape ``[n]``.
        window: group size in tokens (>= 1).

    Returns:
        Group confidences, float64, shape ``[max(n - window + 1, 1)]``, or ``[0]`` when ``n == 0``.

    Raises:
        ConfigError: ``conf`` is not 1-D or holds an infinity, or ``window`` is not a positive int.
    """
    w = positive_int(window, "window")
    return _groups(_confidences(conf), w)


def lowest_group_confidence(conf: npt.ArrayLike, window: int) -> float:
    """DeepConf lowest group confidence: the minimum of :func:`group_confidence`.

    Returns:
        The lowest non-NaN group confidence; NaN when there is none (no tokens, or all NaN).
    """
    g = group_confidence(conf, window)
    g = g[~np.isnan(g)]
    return float(g.min()) if g.size else math.nan


def tail_confidence(conf: npt.ArrayLike, tail: int) -> float:
    """DeepConf tail confidence: the mean confidence of the last ``tail`` tokens (NaNs ignored).

    Returns:
        The mean, or NaN when those tokens are all NaN or there are none.

    Raises:
        ConfigError: bad ``conf`` (see :func:`group_confidence`) or ``tail`` not a positive int.
    """
    t = positive_int(tail, "tail")
    return _nanmean(_confidences(conf)[-t:])


def mean_confidence(conf: npt.ArrayLike) -> float:
    """The mean confidence over all tokens (NaNs ignored); NaN when there is nothing to average."""
    return _nanmean(_confidences(conf))


def bottom_percent_confidence(conf: npt.ArrayLike, window: int, percent: float = 10.0) -> float:
    """DeepConf bottom-percent group confidence: the mean of the lowest ``percent``% of groups.

    Of the non-NaN groups of :func:`group_confidence`, the ``ceil(percent% of them)`` lowest (at
    least one) are averaged.

    Args:
        conf: per-token confidences, shape ``[n]``.
        window: group size in tokens (>= 1).
        percent: share of groups to keep, in ``(0, 100]``; 100 gives the mean group confidence.

    Returns:
        The mean, or NaN when there is no non-NaN group.

    Raises:
        ConfigError: bad ``conf`` or ``window``, or ``percent`` outside ``(0, 100]``.
    """
    p = percent_in_range(percent, "percent")
    return _bottom_percent(group_confidence(conf, window), p)


@dataclass(frozen=True, slots=True)
class ChainConfidence:
    """A chain's confidence summaries (see :func:`chain_confidence`); NaN where undefined.

    Attributes:
        mean: mean token confidence.
        lowest_group: lowest group confidence.
        tail: mean confidence of the last tokens.
        bottom10: mean of the lowest 10% of group confidences.
    """

    mean: float
    lowest_group: float
    tail: float
    bottom10: float


def chain_confidence(conf: npt.ArrayLike, window: int = 32, tail: int = 64) -> ChainConfidence:
    """All of a chain's confidence summaries at once (groups computed once).

    DeepConf uses ``window=2048`` on long reasoning traces; the default 32 suits the short chains
    and chunk-by-chunk decisions ponder makes.

    Args:
        conf: per-token confidences, shape ``[n]``.
        window: group size in tokens (>= 1).
        tail: tail size in tokens (>= 1).

    Returns:
        The summaries.

    Raises:
        ConfigError: bad ``conf``, ``window`` or ``tail``.
    """
    c = _confidences(conf)
    w = positive_int(window, "window")
    t = positive_int(tail, "tail")
    groups = _groups(c, w)
    valid = groups[~np.isnan(groups)]
    return ChainConfidence(
        mean=_nanmean(c),
        lowest_group=float(valid.min()) if valid.size else math.nan,
        tail=_nanmean(c[-t:]),
        bottom10=_bottom_percent(groups, 10.0),
    )
