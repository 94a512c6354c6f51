"""The main job's tables and plots: comparison and headline rows, printed tables, frontier and difficulty plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from policies.evaluation.headline import (
    TARGET_SHARE,
    FamilySummary,
    TargetCheck,
)
from policies.evaluation.metrics import Interval
from policies.evaluation.oracle import OracleResult, VoteFloor
from policies.evaluation.runner import MATCH_TOLERANCE, EvalResult

__all__ = [
    "fmt_accuracy",
    "fmt_tokens",
    "comparison_rows",
    "headline_rows",
    "headline_metrics",
    "target_metrics",
    "print_targets",
    "floor_metrics",
    "print_floors",
    "print_tables",
    "plot_frontier",
    "plot_by_difficulty",
]


def fmt_accuracy(i: Interval) -> str:
    """An accuracy in percent with its interval: ``47.5 [28.3, 67.5]``."""
    if math.isnan(i.mean):
        return "-"
    return f"{100 * i.mean:.1f} [{100 * i.low:.1f}, {100 * i.high:.1f}]"


def fmt_tokens(i: Interval) -> str:
    if math.isnan(i.mean):
        return "-"
    hi = "∞" if math.isinf(i.high) else f"{i.high:.0f}"
    return f"{i.mean:.0f} [{i.low:.0f}, {hi}]"


def comparison_rows(
    results: dict[str, list[EvalResult]], orc: OracleResult
) -> list[dict[str, Any]]:
    """Every operating point (and the oracle) as flat rows: the comparison table."""
    rows: list[dict[str, Any]] = []
    for res in results.values():
        for r in res:
            rows.append(
                {
                    "family": r.family,
                    "param": r.param,
                    "policy": r.policy,
                    "accuracy": r.accuracy.mean,
                    "accuracy_low": r.accuracy.low,
                    "accuracy_high": r.accuracy.high,
                    "tokens": r.tokens.mean,
                    "tokens_low": r.tokens.low,
                    "tokens_high": r.tokens.high,
                    "chains": float(np.mean([e.chains for e in r.episodes])),
                    "episodes": len(r.episodes),
                }
            )
    rows.append(
        {
            "family": "oracle",
            "param": "",
            "policy": "oracle",
            "accuracy": orc.accuracy.mean,
            "accuracy_low": orc.accuracy.low,
            "accuracy_high": orc.accuracy.high,
            "tokens": orc.tokens.mean,
            "tokens_low": orc.tokens.low,
            "tokens_high": orc.tokens.high,
            "chains": 1.0,
            "episodes": len(orc.questions),
        }
    )
    return rows


def headline_rows(summaries: Sequence[FamilySummary]) -> list[dict[str, Any]]:
    """The per-family headline metrics as flat rows."""
    rows = []
    for s in summaries:
        row: dict[str, Any] = {
            "family": s.family,
            "kind": s.kind,
            "best": s.best.label,
            "best_accuracy": s.best.accuracy.mean,
            "best_tokens": s.best.tokens.mean,
            "tokens_to_match": s.tokens_to_match.mean,
            "tokens_to_match_low": s.tokens_to_match.low,
            "tokens_to_match_high": s.tokens_to_match.high,
            "match_point": s.match.label if s.match is not None else "",
            "match_rate": s.match_rate,
            "area": s.area,
            "oracle_gap": s.oracle_gap,
        }
        for b, a in s.accuracy_at.items():
            row[f"accuracy_at_{b:.0f}"] = a
        rows.append(row)
    return rows


def headline_metrics(summaries: Sequence[FamilySummary]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in summaries:
        f = s.family
        out[f"headline/{f}/best_accuracy"] = s.best.accuracy.mean
        out[f"headline/{f}/tokens_to_match"] = s.tokens_to_match.mean
        out[f"headline/{f}/area"] = s.area
        out[f"headline/{f}/oracle_gap"] = s.oracle_gap
        for b, a in s.accuracy_at.items():
            out[f"headline/{f}/accuracy_at_{b:.0f}"] = a
    return {k: v for k, v in out.items() if math.isfinite(v)}


def target_metrics(targets: Sequence[TargetCheck]) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in targets:
        if math.isfinite(t.share):
            out[f"target/{t.family}/match_share"] = t.share
        out[f"target/{t.family}/budgets_below"] = float(len(t.shortfalls))
        out[f"target/{t.family}/budgets_clearly_below"] = float(len(t.clear))
        out[f"target/{t.family}/met"] = float(t.met)
    if targets:
        out["target/met"] = float(any(t.met for t in targets))
    return out


def print_targets(console: Console, targets: Sequence[TargetCheck]) -> None:
    """The product's target, per learned family: met or not, and by how much."""
    if not targets:
        return
    console.print(
        f"target: a learned policy matches maj@16 with <= {100 * TARGET_SHARE:.0f}% of its "
        "tokens and is at or above the best heuristic at every budget up to maj@16's tokens "
        f"(point estimates, {100 * MATCH_TOLERANCE:.1f} pt tolerance)"
    )
    for t in targets:
        style = "green" if t.met else "yellow"
        console.print(f"  [{style}]{t.family}[/]: {t.describe()}")


def floor_metrics(floors: Sequence[VoteFloor], reference: EvalResult) -> dict[str, float]:
    out: dict[str, float] = {}
    for f in floors:
        if math.isfinite(f.tokens):
            out[f"floor/{f.vote}/tokens"] = f.tokens
            out[f"floor/{f.vote}/match_share"] = f.share(reference.tokens.mean)
    return out


def print_floors(console: Console, floors: Sequence[VoteFloor], reference: EvalResult) -> None:
    """How cheaply an oracle that samples whole chains could match maj@16: the floor under the
    target's first half for policies that only decide when to stop sampling."""
    parts = []
    for f in floors:
        how = "answering with the majority" if f.vote == "majority" else "with any chain sampled"
        if math.isfinite(f.tokens):
            share = 100 * f.share(reference.tokens.mean)
            parts.append(f"{f.tokens:,.0f} tokens ({share:.1f}% of maj@16's) {how}")
        else:
            parts.append(f"more than it has {how} (it reaches {100 * f.accuracy:.1f}%)")
    if parts:
        console.print(
            "floor: to match maj@16, an oracle that knows which answers are right but samples "
            "whole chains needs " + "; ".join(parts)
        )


def print_tables(
    console: Console,
    bank: str,
    results: dict[str, list[EvalResult]],
    summaries: Sequence[FamilySummary],
    orc: OracleResult,
    reference: EvalResult,
    budgets: Sequence[float],
    area_range: tuple[float, float],
    questions: int,
    seeds: int,
    split: str = "test",
) -> None:
    """The full comparison (every point) and the per-family headline table."""
    t = Table(
        title=f"{bank}: every operating point on {questions} {split} questions x {seeds} seeds; "
        "accuracy in %, mean [95% bootstrap interval over questions]",
        title_justify="left",
    )
    for c in ("family", "point", "accuracy %", "decoded tokens", "chains"):
        t.add_column(c, justify="left" if c in ("family", "point") else "right")
    for res in results.values():
        for r in res:
            t.add_row(
                r.family,
                r.param,
                fmt_accuracy(r.accuracy),
                fmt_tokens(r.tokens),
                f"{np.mean([e.chains for e in r.episodes]):.1f}",
            )
    t.add_row("oracle", "", fmt_accuracy(orc.accuracy), fmt_tokens(orc.tokens), "1.0", style="bold")
    console.print(t)
    ref = reference
    b_cols = [f"acc@{b:.0f}" for b in budgets]
    h = Table(
        title=(
            f"{bank}: headline per family (accuracy in %). maj@16 ({ref.label}): "
            f"{fmt_accuracy(ref.accuracy)} at {ref.tokens.mean:.0f} tokens; oracle: {fmt_accuracy(orc.accuracy)} "
            f"at {orc.tokens.mean:.0f} tokens.\n"
            "tokens to match: fewest mean tokens within 0.5 pt of maj@16 (paired bootstrap "
            "interval; the point); acc@B: best accuracy at <= B mean tokens; area: mean best "
            f"accuracy over [{area_range[0]:.0f}, {area_range[1]:.0f}] tokens; oracle gap: oracle "
            "accuracy - best accuracy (pt)"
        ),
        title_justify="left",
    )
    for c in ("family", "best point", "best accuracy", "tokens", "tokens to match maj@16",
              *b_cols, "area", "oracle gap"):  # fmt: skip
        h.add_column(c, justify="left" if c in ("family", "best point") else "right")
    for s in sorted(summaries, key=lambda s: -s.area if math.isfinite(s.area) else 0.0):
        match = fmt_tokens(s.tokens_to_match)
        if s.match is not None:
            match += f" ({s.match.param})"
        h.add_row(
            s.family,
            s.best.param,
            fmt_accuracy(s.best.accuracy),
            f"{s.best.tokens.mean:.0f}",
            match,
            *("-" if math.isnan(a) else f"{100 * a:.1f}" for a in s.accuracy_at.values()),
            "-" if math.isnan(s.area) else f"{100 * s.area:.1f}",
            f"{100 * s.oracle_gap:.1f}",
            style="bold" if s.kind == "learned" else None,
        )
    console.print(h)


def plot_frontier(
    path: str | Path,
    results: dict[str, list[EvalResult]],
    orc: OracleResult,
    reference: EvalResult,
    *,
    title: str = "",
    kinds: dict[str, str] | None = None,
    floors: Sequence[VoteFloor] = (),
) -> Path:
    """Accuracy vs mean decoded tokens: one line per family through its sweep (error bars: the
    bootstrap intervals), the oracle point, the maj@16 accuracy as a line, and the vote floors
    (grey markers on that line: the fewest tokens an oracle voter needs to match it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6.5))
    cmap = plt.get_cmap("tab20")
    for i, (fam, res) in enumerate(results.items()):
        pts = sorted(res, key=lambda r: r.tokens.mean)
        x = np.array([r.tokens.mean for r in pts])
        y = np.array([r.accuracy.mean for r in pts])
        xerr = np.array([[r.tokens.mean - r.tokens.low for r in pts],
                         [r.tokens.high - r.tokens.mean for r in pts]])  # fmt: skip
        yerr = np.array([[r.accuracy.mean - r.accuracy.low for r in pts],
                         [r.accuracy.high - r.accuracy.mean for r in pts]])  # fmt: skip
        learned = (kinds or {}).get(fam) == "learned"
        eb = ax.errorbar(
            x,
            y,
            xerr=np.maximum(xerr, 0),
            yerr=np.maximum(yerr, 0),
            marker="o" if not learned else "D",
            ms=4 if not learned else 6,
            lw=1.2 if not learned else 2.4,
            elinewidth=0.6,
            capsize=2,
            alpha=0.9,
            color=cmap(i % 20),
            label=fam,
        )
        for bars in eb[2]:
            bars.set_alpha(0.35)
    ax.axhline(reference.accuracy.mean, color="0.3", ls="--", lw=1, label="maj@16")
    ax.axhspan(reference.accuracy.low, reference.accuracy.high, color="0.5", alpha=0.08)
    ax.errorbar(
        [orc.tokens.mean],
        [orc.accuracy.mean],
        xerr=[[orc.tokens.mean - orc.tokens.low], [orc.tokens.high - orc.tokens.mean]],
        yerr=[[orc.accuracy.mean - orc.accuracy.low], [orc.accuracy.high - orc.accuracy.mean]],
        marker="*",
        ms=16,
        color="black",
        capsize=3,
        ls="none",
        label="oracle",
    )
    for f, marker in zip(floors, "Dv^", strict=False):
        if math.isfinite(f.tokens):
            ax.plot([f.tokens], [reference.accuracy.mean], marker=marker, ms=8, ls="none",
                    color="0.45", label=f"vote floor ({f.vote})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("mean decoded tokens per question (generated + injected + probes + verifier)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=130)
    plt.close(fig)
    return p


def plot_by_difficulty(
    path: str | Path,
    summaries: Sequence[FamilySummary],
    orc: OracleResult,
    reference: EvalResult,
    *,
    title: str = "",
) -> Path:
    """Accuracy and mean tokens per difficulty level: the oracle, maj@16 and each family's
    cheapest point matching maj@16 (else its most accurate one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(orc.by_level)
    xs = np.arange(len(levels))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")

    def line(by: dict[str, Any], label: str, **kw: Any) -> None:
        acc = [by[lv].accuracy.mean if lv in by else np.nan for lv in levels]
        fmt_tokens = [by[lv].tokens.mean if lv in by else np.nan for lv in levels]
        a1.plot(xs, acc, marker="o", label=label, **kw)
        a2.plot(xs, fmt_tokens, marker="o", label=label, **kw)

    line(orc.by_level, "oracle", color="black", lw=2.5)
    line(reference.by_level, f"maj@16 ({reference.label})", color="0.4", lw=2, ls="--")
    for i, s in enumerate(summaries):
        r = s.match if s.match is not None else s.best
        if r is reference:
            continue
        line(r.by_level, r.label, color=cmap(i % 20), lw=1.2, alpha=0.85)
    for ax, what in ((a1, "accuracy"), (a2, "mean decoded tokens")):
        ax.set_xticks(xs, levels)
        ax.set_xlabel("difficulty level")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.25)
    a2.set_yscale("log")
    a2.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


# -- the job -----------------------------------------------------------------------------------
