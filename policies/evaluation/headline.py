"""Headline metrics of a comparison: per-family summaries against the reference vote, paired
differences to the best heuristic, and the target check.

A learned family is trained with several seeds; its numbers are read from the mean of its
seeds' frontiers and come with intervals over the test questions and the training seeds
together (:mod:`policies.evaluation.bootstrap`, which says how and why).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from policies.evaluation.bootstrap import (
    Draws,
    ScoredPoint,
    SeededFamily,
    draws,
    interval,
)
from policies.evaluation.metrics import (
    Interval,
    frontier_area,
    tokens_to_match,
)
from policies.evaluation.runner import MATCH_TOLERANCE, EvalResult

__all__ = [
    "BudgetDiff",
    "FamilySummary",
    "comparison_budgets",
    "reference_result",
    "headline",
    "TARGET_SHARE",
    "VERIFIED_TARGET_SHARE",
    "verified_reference",
    "TargetCheck",
    "ANY_LEARNED",
    "target_check",
]


@dataclass
class BudgetDiff:
    """A learned family against the best heuristic at one budget (accuracies as fractions).

    Attributes:
        budget: mean tokens per question.
        heuristic: the best heuristic point at <= ``budget`` (its label).
        heuristic_accuracy: its accuracy.
        accuracy: the family's (the mean over its seeds of each seed's best point at <=
            ``budget``; ``nan`` if a seed has no point that cheap).
        diff: ``accuracy - heuristic_accuracy`` with its paired 95% interval over questions
            and training seeds.
        per_seed: the same difference for each training seed's point.
    """

    budget: float
    heuristic: str
    heuristic_accuracy: float
    accuracy: float
    diff: Interval
    per_seed: dict[int | None, float] = field(default_factory=dict)

    @property
    def above(self) -> bool:
        """Above the best heuristic with 95% confidence (the interval's lower end > 0)."""
        return self.diff.low > 0

    @property
    def below(self) -> bool:
        """Below the best heuristic with 95% confidence (the interval's upper end < 0)."""
        return self.diff.high < 0


@dataclass
class FamilySummary:
    """A family's headline numbers (see :func:`headline`).

    Every number is read from the family's frontier: for a learned family the mean of its
    training seeds' frontiers (:mod:`policies.evaluation.bootstrap`), for a heuristic its own.

    Attributes:
        family: its name; ``kind``: heuristic / learned.
        points: every operating point (of every seed).
        best: the most accurate point (fewest tokens among equals) of its representative seed
            (:attr:`representative`).
        match: that seed's cheapest point within :data:`MATCH_TOLERANCE` of the reference
            (maj@16) accuracy (``None`` if none reaches it).
        tokens_to_match: the fewest mean tokens at which the family's frontier reaches the
            reference accuracy (within the tolerance), with its paired interval over questions
            and training seeds (the reference's accuracy recomputed on each resample; ``inf``
            upper end: it does not match in more than 2.5% of them); ``nan`` if it never does.
        match_rate: share of resamples in which it matches.
        accuracy_at: the frontier's accuracy at <= each budget (``nan``: a seed has no point
            that cheap); ``accuracy_at_interval`` the same with intervals.
        area: mean best accuracy over the budget range (:func:`~policies.evaluation.metrics.frontier_area`),
            averaged over the seeds.
        oracle_gap: oracle accuracy - :attr:`best_accuracy` (``nan`` without an oracle).
        seeds: its training seeds (``(None,)`` for a heuristic).
        seed_tokens_to_match, seed_area: each seed's own (``nan``: it never matches).
        best_accuracy: the mean over seeds of each seed's best accuracy.
        diffs: learned families: the paired difference to the best heuristic at every budget
            :func:`comparison_budgets` lists; ``diff_at``: at the headline budgets.
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
    seeds: tuple[int | None, ...] = (None,)
    seed_tokens_to_match: dict[int | None, float] = field(default_factory=dict)
    seed_area: dict[int | None, float] = field(default_factory=dict)
    best_accuracy: float = float("nan")
    accuracy_at_interval: dict[float, Interval] = field(default_factory=dict)
    diffs: list[BudgetDiff] = field(default_factory=list)
    diff_at: dict[float, BudgetDiff] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def representative(self) -> int | None:
        """The seed whose tokens to match is the median of the seeds' (the lower one of two
        middles; a seed that never matches counts as more than any; then by area): its
        points stand for the family in the per-level figure and table."""
        order = sorted(
            range(len(self.seeds)),
            key=lambda i: (
                _inf_if_nan(self.seed_tokens_to_match.get(self.seeds[i], math.nan)),
                -self.seed_area.get(self.seeds[i], 0.0),
                i,
            ),
        )
        return self.seeds[order[(len(order) - 1) // 2]]

    @property
    def above(self) -> list[float]:
        """Budgets where it is above the best heuristic with 95% confidence."""
        return [d.budget for d in self.diffs if d.above]

    @property
    def below(self) -> list[float]:
        """Budgets where it is below the best heuristic with 95% confidence."""
        return [d.budget for d in self.diffs if d.below]


def _inf_if_nan(x: float) -> float:
    return math.inf if math.isnan(x) else x


def reference_result(results: dict[str, list[EvalResult]], n: int = 16) -> EvalResult | None:
    """The best-of-``n`` majority result (maj@n) among ``results`` (the largest N up to ``n``)."""
    fam = results.get("best-of-N", [])
    best = None
    for r in fam:
        k = int(r.param.removeprefix("N=")) if r.param.startswith("N=") else 0
        if k <= n and (best is None or k > int(best.param.removeprefix("N="))):
            best = r
    return best


#: Code banks' target: a learned policy matches best-of-16 with execution verification with at
#: most this share of its tokens (issue "More real domains").
VERIFIED_TARGET_SHARE = 0.30


def verified_reference(results: dict[str, list[EvalResult]], n: int = 16) -> EvalResult | None:
    """Best-of-``n`` with the verifier's vote (on a code bank: execution verification), the
    largest N up to ``n`` among ``results``."""
    best = None
    for r in results.get("best-of-N-verifier", []):
        k = int(r.param.removeprefix("N=")) if r.param.startswith("N=") else 0
        if k <= n and (best is None or k > int(best.param.removeprefix("N="))):
            best = r
    return best


def _seed_key(seed: int | None) -> int:
    return -1 if seed is None else int(seed)


def by_seed(points: Iterable[ScoredPoint]) -> dict[int | None, list[Any]]:
    """Points grouped by training seed (ascending; a heuristic's points under ``None``)."""
    out: dict[int | None, list[Any]] = {}
    for p in points:
        out.setdefault(p.train_seed, []).append(p)
    return dict(sorted(out.items(), key=lambda kv: _seed_key(kv[0])))


def comparison_budgets(
    results: dict[str, list[EvalResult]], *, reference: EvalResult, kinds: dict[str, str]
) -> list[float]:
    """The budgets a learned family is compared with the heuristics at: every heuristic
    operating point's mean tokens up to maj@16's."""
    ref_tokens = reference.tokens.mean
    return sorted(
        {
            r.tokens.mean
            for fam, res in results.items()
            if kinds.get(fam, "heuristic") == "heuristic"
            for r in res
            if r.tokens.mean <= ref_tokens * (1 + 1e-9)
        }
    )


class _Comparison:
    """The resamples, the reference and the envelope of every heuristic, shared by
    :func:`headline` and :func:`target_check`."""

    def __init__(
        self,
        results: dict[str, list[EvalResult]],
        reference: EvalResult,
        kinds: dict[str, str],
        n_boot: int,
        seed: int,
    ) -> None:
        self.kinds = kinds
        qids, ref_acc, _ = reference.per_question()
        self.qids = qids
        self.d: Draws = draws(len(qids), n_boot, seed)
        self.ref = self.d.means(np.asarray(ref_acc, np.float64))  # [R]
        self.ref[0] = reference.accuracy.mean
        heur = [
            r
            for fam, res in results.items()
            if kinds.get(fam, "heuristic") == "heuristic"
            for r in res
        ]
        self.heuristics = SeededFamily("heuristics", {None: heur}, qids, self.d) if heur else None
        self.budgets = comparison_budgets(results, reference=reference, kinds=kinds)

    def diff(self, fam: SeededFamily, budget: float) -> BudgetDiff | None:
        """``fam`` minus the best heuristic at ``budget`` (``None``: no heuristic that cheap)."""
        if self.heuristics is None:
            return None
        h_pick = self.heuristics.chosen(budget)
        if h_pick is None:
            return None
        h = self.heuristics.at_budget(budget)
        mine = fam.at_budget(budget)
        picked = fam.chosen(budget)
        per_seed = (
            {
                s: float(fam.acc[i][j, 0] - h[0])
                for i, (s, j) in enumerate(zip(fam.seeds, picked, strict=True))
            }
            if picked is not None
            else {}
        )
        return BudgetDiff(
            budget=float(budget),
            heuristic=self.heuristics.points[0][h_pick[0]].label,
            heuristic_accuracy=float(h[0]),
            accuracy=float(mine[0]),
            diff=interval(mine - h),
            per_seed=per_seed,
        )


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
    """Per-family headline metrics against ``reference`` (maj@16), and for each learned family
    the paired differences to the best heuristic.

    Every result must cover the same questions (one :class:`Evaluator`): the bootstrap
    resamples questions once for all points and the reference together, and training seeds
    once for every learned family (:mod:`policies.evaluation.bootstrap`).
    """
    kinds = kinds or {}
    cmp = _Comparison(results, reference, kinds, n_boot, seed)
    target = float(cmp.ref[0])
    lo_t, hi_t = area_range
    out = []
    for fam, res in results.items():
        if not res:
            continue
        groups = by_seed(res)
        sf = SeededFamily(fam, groups, cmp.qids, cmp.d)
        tm = sf.tokens_to_match(cmp.ref, tolerance)
        found = np.isfinite(tm)
        rate = float(found[1:].mean())
        ttm = interval(tm) if found[0] else Interval(math.nan, math.nan, math.nan)
        seed_ttm = {
            s: tokens_to_match(sf.seed_points(i), target, tolerance) for i, s in enumerate(sf.seeds)
        }
        seed_area = {
            s: frontier_area(sf.seed_points(i), lo_t, hi_t) if hi_t > lo_t else math.nan
            for i, s in enumerate(sf.seeds)
        }
        acc_iv = {float(b): interval(sf.at_budget(float(b))) for b in budgets}
        kind = kinds.get(fam, "heuristic")
        summary = FamilySummary(
            family=fam,
            kind=kind,
            points=res,
            best=res[0],
            match=None,
            tokens_to_match=ttm,
            match_rate=rate,
            accuracy_at={b: i.mean for b, i in acc_iv.items()},
            area=float(np.mean(list(seed_area.values()))),
            oracle_gap=math.nan,
            seeds=tuple(sf.seeds),
            seed_tokens_to_match=seed_ttm,
            seed_area=seed_area,
            best_accuracy=sf.best_accuracy(),
            accuracy_at_interval=acc_iv,
        )
        rep = groups[summary.representative]
        summary.best = max(rep, key=lambda r: (r.accuracy.mean, -r.tokens.mean))
        matching = [r for r in rep if r.accuracy.mean >= reference.accuracy.mean - tolerance]
        summary.match = min(matching, key=lambda r: r.tokens.mean) if matching else None
        if oracle_accuracy is not None:
            summary.oracle_gap = oracle_accuracy - summary.best_accuracy
        if kind == "learned":
            for b in cmp.budgets:
                d = cmp.diff(sf, b)
                if d is not None:
                    summary.diffs.append(d)
            for b in budgets:
                d = cmp.diff(sf, float(b))
                if d is not None:
                    summary.diff_at[float(b)] = d
        out.append(summary)
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
        share_interval: the 95% interval of ``share`` over the resamples of questions and
            training seeds (``inf`` at an end: it does not match in more than 2.5% of them).
    """

    family: str
    share: float
    budgets: list[float]
    shortfalls: list[tuple[float, str, float, float]]
    clear: list[float] = field(default_factory=list)
    reference: str = "maj@16"
    target_share: float = TARGET_SHARE
    share_interval: tuple[float, float] = (math.nan, math.nan)

    @property
    def matches(self) -> bool:
        """Matches the reference (maj@16) with at most ``target_share`` of its tokens."""
        return math.isfinite(self.share) and self.share <= self.target_share

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
            head = f"matches {self.reference} with {100 * self.share:.0f}% of its tokens"
        else:
            head = f"never matches {self.reference}"
        verdict = "met" if self.matches else "not met"
        head += f" (target <= {100 * self.target_share:.0f}%: {verdict})"
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
    reference_name: str = "maj@16",
    target_share: float = TARGET_SHARE,
) -> list[TargetCheck]:
    """Each learned family against the target: it matches maj@16 (within ``tolerance``) with at
    most :data:`TARGET_SHARE` of its tokens, and at every budget up to maj@16's tokens its
    accuracy is at or above the best heuristic's (within ``tolerance``). A family with several
    training seeds is read from the mean of their frontiers (:mod:`policies.evaluation.bootstrap`).
    Point estimates decide; each shortfall is also tested with the paired bootstrap over
    questions and training seeds (``n_boot`` resamples, the same for every comparison), and
    :attr:`TargetCheck.clear` lists those beyond noise.

    With two or more learned families a last row, :data:`ANY_LEARNED`, checks the envelope of
    all their points, which is what the heuristics are held to (the best of every heuristic
    family at each budget); its seeds pair the families' seeds by position (the first seed of
    every family, the second, ...: what one run of the job with one seed would give).

    Code banks hold the learned policies to another reference as well: best-of-16 with
    execution verification, matched with at most 30% of its tokens (``reference_name`` and
    ``target_share``; :func:`verified_reference`)."""
    cmp = _Comparison(results, reference, kinds, n_boot, seed)
    ref_tokens = reference.tokens.mean

    def check(fam: SeededFamily) -> TargetCheck:
        to_match = interval(fam.tokens_to_match(cmp.ref, tolerance))
        t_match = to_match.mean
        shortfalls, clear = [], []
        for b in cmp.budgets:
            d = cmp.diff(fam, b)
            if d is None:
                continue
            if math.isnan(d.accuracy) or d.accuracy < d.heuristic_accuracy - tolerance:
                shortfalls.append((b, d.heuristic, d.heuristic_accuracy, d.accuracy))
                if not math.isnan(d.accuracy) and d.diff.high < -tolerance:
                    clear.append(b)
        share = t_match / ref_tokens if math.isfinite(t_match) else math.nan
        return TargetCheck(
            fam.name,
            share,
            list(cmp.budgets),
            shortfalls,
            clear,
            reference_name,
            target_share,
            (to_match.low / ref_tokens, to_match.high / ref_tokens),
        )

    learned = {f: res for f, res in results.items() if kinds.get(f) == "learned" and res}
    fams = {f: SeededFamily(f, by_seed(res), cmp.qids, cmp.d) for f, res in learned.items()}
    out = [check(sf) for sf in fams.values()]
    if len(fams) > 1:
        n = min(len(sf.seeds) for sf in fams.values())
        pooled: dict[int | None, list[ScoredPoint]] = {
            i: [p for sf in fams.values() for p in sf.points[i]] for i in range(n)
        }
        out.append(check(SeededFamily(ANY_LEARNED, pooled, cmp.qids, cmp.d)))
    return out
