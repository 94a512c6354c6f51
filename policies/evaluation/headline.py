"""Headline metrics of a comparison: per-family summaries against the reference vote, and the target check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from features.errors import ConfigError
from policies.evaluation.metrics import (
    Interval,
    accuracy_at_budget,
    frontier_area,
    tokens_to_match,
)
from policies.evaluation.runner import MATCH_TOLERANCE, EvalResult

__all__ = [
    "FamilySummary",
    "reference_result",
    "headline",
    "TARGET_SHARE",
    "TargetCheck",
    "ANY_LEARNED",
    "target_check",
]


@dataclass
class FamilySummary:
    """A family's headline numbers (see :func:`headline`).

    Attributes:
        family: its name; ``kind``: heuristic / learned.
        best: its most accurate point (fewest tokens among equals).
        match: its cheapest point within :data:`MATCH_TOLERANCE` of the reference (maj@16)
            accuracy (``None`` if none reaches it).
        tokens_to_match: that point's mean tokens, with a paired bootstrap interval over
            questions (the reference's accuracy recomputed on each resample); ``nan`` if none.
        match_rate: share of bootstrap resamples in which some point matched.
        accuracy_at: best accuracy with mean tokens <= each budget (``nan``: none that cheap).
        area: mean best accuracy over the budget range (:func:`policies.evaluation.metrics.frontier_area`).
        oracle_gap: oracle accuracy - the family's best accuracy (``nan`` without an oracle).
    """

    family: str
    kind: str
    points: list[EvalResult]
    best: EvalResult
    match: EvalResult | None
    tokens_to_match: Interval
    match_rate: float
    accuracy_at: dict[float, float]
    area: float
    oracle_gap: float
    extra: dict[str, float] = field(default_factory=dict)


def reference_result(results: dict[str, list[EvalResult]], n: int = 16) -> EvalResult | None:
    """The best-of-``n`` majority result (maj@n) among ``results`` (the largest N up to ``n``)."""
    fam = results.get("best-of-N", [])
    best = None
    for r in fam:
        k = int(r.param.removeprefix("N=")) if r.param.startswith("N=") else 0
        if k <= n and (best is None or k > int(best.param.removeprefix("N="))):
            best = r
    return best


def _bootstrap_idx(nq: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, nq, size=(n_boot, nq))


def headline(
    results: dict[str, list[EvalResult]],
    *,
    reference: EvalResult,
    budgets: Sequence[float],
    area_range: tuple[float, float],
    oracle_accuracy: float | None = None,
    kinds: dict[str, str] | None = None,
    tolerance: float = MATCH_TOLERANCE,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[FamilySummary]:
    """Per-family headline metrics against ``reference`` (maj@16).

    Every result must cover the same questions (one :class:`Evaluator`): the bootstrap for
    tokens-to-match resamples questions once for all points and the reference together.
    """
    ref_q, ref_acc, _ = reference.per_question()
    idx = _bootstrap_idx(len(ref_q), n_boot, seed)
    ref_b = ref_acc[idx].mean(axis=1)
    out = []
    for fam, res in results.items():
        if not res:
            continue
        pts = [(r.tokens.mean, r.accuracy.mean) for r in res]
        best = max(res, key=lambda r: (r.accuracy.mean, -r.tokens.mean))
        target = reference.accuracy.mean
        t_match = tokens_to_match(pts, target, tolerance)
        match = None
        if not math.isnan(t_match):
            match = min(
                (r for r in res if r.accuracy.mean >= target - tolerance),
                key=lambda r: r.tokens.mean,
            )
        accs, toks = [], []
        for r in res:
            q, a, t = r.per_question()
            if q != ref_q:
                raise ConfigError(f"{r.label} was evaluated on other questions than the reference")
            accs.append(a[idx].mean(axis=1))
            toks.append(t[idx].mean(axis=1))
        a_b, t_b = np.stack(accs), np.stack(toks)  # [points, n_boot]
        ok = a_b >= ref_b[None, :] - tolerance
        tm = np.where(ok, t_b, np.inf).min(axis=0)
        found = np.isfinite(tm)
        rate = float(found.mean())
        if math.isnan(t_match):
            interval = Interval(float("nan"), float("nan"), float("nan"))
        else:
            # Resamples where nothing matches count as "more than any point": the upper end
            # is then unbounded (inf), which the table shows as such.
            # (quantiles without interpolation: between two inf resamples it would give nan)
            lo, hi = np.quantile(np.where(found, tm, np.inf), [0.025, 0.975], method="inverted_cdf")
            interval = Interval(t_match, float(lo), float(hi))
        acc_at = {float(b): accuracy_at_budget(pts, float(b)) for b in budgets}
        lo_t, hi_t = area_range
        area = frontier_area(pts, lo_t, hi_t) if hi_t > lo_t else float("nan")
        gap = oracle_accuracy - best.accuracy.mean if oracle_accuracy is not None else float("nan")
        out.append(
            FamilySummary(
                family=fam,
                kind=(kinds or {}).get(fam, "heuristic"),
                points=res,
                best=best,
                match=match,
                tokens_to_match=interval,
                match_rate=rate,
                accuracy_at=acc_at,
                area=area,
                oracle_gap=gap,
            )
        )
    return out


# -- the product's target ----------------------------------------------------------------------

#: The target: a learned policy matches maj@16 with at most this share of its mean tokens ...
TARGET_SHARE = 0.15


@dataclass
class TargetCheck:
    """How one learned family stands against the product's target (:func:`target_check`).

    Attributes:
        family: the learned family.
        share: its tokens to match maj@16 / maj@16's mean tokens (``nan``: it never matches).
        budgets: the budgets compared: every heuristic operating point's mean tokens up to
            maj@16's.
        shortfalls: ``(budget, heuristic point, its accuracy, the family's best accuracy at <=
            budget)`` where the family is more than the tolerance below the best heuristic
            (``nan`` accuracy: it has no point that cheap).
        clear: the shortfalls' budgets where the family has a point that cheap and is below
            beyond sampling noise: the paired bootstrap interval over questions (95%) of the heuristic's
            accuracy minus the family's lies wholly above the tolerance. The others may be noise.
    """

    family: str
    share: float
    budgets: list[float]
    shortfalls: list[tuple[float, str, float, float]]
    clear: list[float] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        """Matches maj@16 with at most :data:`TARGET_SHARE` of its tokens."""
        return math.isfinite(self.share) and self.share <= TARGET_SHARE

    @property
    def frontier_ok(self) -> bool:
        """At or above the best heuristic at every budget (within the tolerance)."""
        return not self.shortfalls

    @property
    def met(self) -> bool:
        return self.matches and self.frontier_ok

    @property
    def worst(self) -> tuple[float, str, float, float] | None:
        """The largest shortfall among budgets where the family has a point that cheap."""
        gaps = [x for x in self.shortfalls if not math.isnan(x[3])]
        return max(gaps, key=lambda x: x[2] - x[3]) if gaps else None

    def describe(self) -> str:
        """One line: both halves of the target, with the numbers behind them."""
        if math.isfinite(self.share):
            head = f"matches maj@16 with {100 * self.share:.0f}% of its tokens"
        else:
            head = "never matches maj@16"
        head += f" (target <= {100 * TARGET_SHARE:.0f}%: {'met' if self.matches else 'not met'})"
        n, k = len(self.budgets), len(self.shortfalls)
        if not k:
            return f"{head}; at or above the best heuristic at all {n} budgets (met)"
        parts = [
            f"{head}; below the best heuristic at {k} of {n} budgets (not met; "
            f"{len(self.clear)} of them beyond the paired 95% interval)"
        ]
        worst = self.worst
        if worst is not None:
            b, label, h_acc, l_acc = worst
            parts.append(
                f"most at {b:.0f} tokens: {label} {100 * h_acc:.1f}% against {100 * l_acc:.1f}%"
            )
        uncovered = [x[0] for x in self.shortfalls if math.isnan(x[3])]
        if uncovered:
            parts.append(
                f"no point as cheap as {len(uncovered)} budget(s) up to {max(uncovered):.0f} tokens"
            )
        return "; ".join(parts)


#: The name of :func:`target_check`'s row for the envelope of all learned families.
ANY_LEARNED = "any-learned"


def target_check(
    results: dict[str, list[EvalResult]],
    *,
    reference: EvalResult,
    kinds: dict[str, str],
    tolerance: float = MATCH_TOLERANCE,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[TargetCheck]:
    """Each learned family against the target: it matches maj@16 (within ``tolerance``) with at
    most :data:`TARGET_SHARE` of its tokens, and at every budget up to maj@16's tokens its best
    accuracy is at or above the best heuristic's (within ``tolerance``). Point estimates decide;
    each shortfall is also tested with a paired bootstrap over questions (``n_boot`` resamples,
    the same for every comparison), and :attr:`TargetCheck.clear` lists those beyond noise.

    With two or more learned families a last row, :data:`ANY_LEARNED`, checks the envelope of
    all their points, which is what the heuristics are held to (the best of every heuristic
    family at each budget)."""
    ref_tokens = reference.tokens.mean
    heur = [
        r
        for fam, res in results.items()
        if kinds.get(fam, "heuristic") == "heuristic"
        for r in res
        if r.tokens.mean <= ref_tokens * (1 + 1e-9)
    ]
    budgets = sorted({r.tokens.mean for r in heur})
    ref_q = reference.per_question()[0]
    idx = _bootstrap_idx(len(ref_q), n_boot, seed)

    def clearly_below(heuristic: EvalResult, mine: EvalResult) -> bool:
        (qh, ah, _), (qm, am, _) = heuristic.per_question(), mine.per_question()
        if qh != ref_q or qm != ref_q:
            raise ConfigError(f"{mine.label} was evaluated on other questions than the reference")
        gap = (ah - am)[idx].mean(axis=1)
        return bool(np.quantile(gap, 0.025) > tolerance)

    def check(fam: str, res: list[EvalResult]) -> TargetCheck:
        pts = [(r.tokens.mean, r.accuracy.mean) for r in res]
        t_match = tokens_to_match(pts, reference.accuracy.mean, tolerance)
        shortfalls, clear = [], []
        for b in budgets:
            best_h = max((r for r in heur if r.tokens.mean <= b), key=lambda r: r.accuracy.mean)
            mine = accuracy_at_budget(pts, b)
            if math.isnan(mine) or mine < best_h.accuracy.mean - tolerance:
                shortfalls.append((b, best_h.label, best_h.accuracy.mean, mine))
                if not math.isnan(mine):
                    at_b = max(
                        (r for r in res if r.tokens.mean <= b),
                        key=lambda r: (r.accuracy.mean, -r.tokens.mean),
                    )
                    if clearly_below(best_h, at_b):
                        clear.append(b)
        return TargetCheck(fam, t_match / ref_tokens, budgets, shortfalls, clear)

    learned = {f: res for f, res in results.items() if kinds.get(f) == "learned" and res}
    out = [check(f, res) for f, res in learned.items()]
    if len(learned) > 1:
        out.append(check(ANY_LEARNED, [r for res in learned.values() for r in res]))
    return out
