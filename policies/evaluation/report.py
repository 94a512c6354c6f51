"""The main job's tables and plots: comparison and headline rows, printed tables, frontier and difficulty plots."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.table import Table

from policies.evaluation.headline import (
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
    "print_differences",
    "plot_frontier",
    "save_figure",
    "plot_by_difficulty",
    "plot_levels",
    "plot_results",
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
                    "train_seed": "" if r.train_seed is None else r.train_seed,
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
            "train_seed": "",
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


def _seed_list(values: dict[int | None, float], seeds: Sequence[int | None]) -> str:
    """Per-seed values joined by ``;`` in seed order (``inf``: never)."""
    return ";".join(f"{_inf_if_nan(values.get(s, math.nan)):.6g}" for s in seeds)


def _inf_if_nan(x: float) -> float:
    return math.inf if math.isnan(x) else x


def headline_rows(summaries: Sequence[FamilySummary]) -> list[dict[str, Any]]:
    """The per-family headline metrics as flat rows (a learned family's per-seed values joined
    by ``;`` in the order of ``train_seeds``; ``inf`` there: that seed never matches)."""
    rows = []
    for s in summaries:
        learned = s.kind == "learned"
        row: dict[str, Any] = {
            "family": s.family,
            "kind": s.kind,
            "train_seeds": ";".join(str(x) for x in s.seeds) if learned else "",
            "representative_seed": s.representative if learned else "",
            "best": s.best.label,
            "best_accuracy": s.best_accuracy,
            "best_tokens": s.best.tokens.mean,
            "tokens_to_match": s.tokens_to_match.mean,
            "tokens_to_match_low": s.tokens_to_match.low,
            "tokens_to_match_high": s.tokens_to_match.high,
            "tokens_to_match_per_seed": (
                _seed_list(s.seed_tokens_to_match, s.seeds) if learned else ""
            ),
            "match_point": s.match.label if s.match is not None else "",
            "match_rate": s.match_rate,
            "area": s.area,
            "area_per_seed": _seed_list(s.seed_area, s.seeds) if learned else "",
            "oracle_gap": s.oracle_gap,
        }
        for b, a in s.accuracy_at.items():
            row[f"accuracy_at_{b:.0f}"] = a
        for b in s.accuracy_at:
            d = s.diff_at.get(b)
            row[f"diff_at_{b:.0f}"] = d.diff.mean if d is not None else ""
            row[f"diff_at_{b:.0f}_low"] = d.diff.low if d is not None else ""
            row[f"diff_at_{b:.0f}_high"] = d.diff.high if d is not None else ""
        row["budgets_compared"] = len(s.diffs) if learned else ""
        row["budgets_above"] = ";".join(f"{b:.0f}" for b in s.above) if learned else ""
        row["budgets_below"] = ";".join(f"{b:.0f}" for b in s.below) if learned else ""
        rows.append(row)
    return rows


def headline_metrics(summaries: Sequence[FamilySummary]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in summaries:
        f = s.family
        out[f"headline/{f}/best_accuracy"] = s.best_accuracy
        out[f"headline/{f}/tokens_to_match"] = s.tokens_to_match.mean
        out[f"headline/{f}/tokens_to_match_low"] = s.tokens_to_match.low
        out[f"headline/{f}/tokens_to_match_high"] = s.tokens_to_match.high
        out[f"headline/{f}/area"] = s.area
        out[f"headline/{f}/oracle_gap"] = s.oracle_gap
        for b, a in s.accuracy_at.items():
            out[f"headline/{f}/accuracy_at_{b:.0f}"] = a
        if s.kind == "learned":
            for seed in s.seeds:
                out[f"headline/{f}/seed_{seed}/tokens_to_match"] = s.seed_tokens_to_match[seed]
                out[f"headline/{f}/seed_{seed}/area"] = s.seed_area[seed]
            for b, d in s.diff_at.items():
                out[f"headline/{f}/diff_at_{b:.0f}"] = d.diff.mean
                out[f"headline/{f}/diff_at_{b:.0f}_low"] = d.diff.low
                out[f"headline/{f}/diff_at_{b:.0f}_high"] = d.diff.high
            out[f"headline/{f}/budgets_above"] = float(len(s.above))
            out[f"headline/{f}/budgets_below"] = float(len(s.below))
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
    ref, share = targets[0].reference, targets[0].target_share
    console.print(
        f"target: a learned policy matches {ref} with <= {100 * share:.0f}% of its "
        f"tokens and is at or above the best heuristic at every budget up to {ref}'s tokens "
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
    """The full comparison (every point, of every training seed) and the per-family headline
    table (a learned family: the mean of its seeds' frontiers, intervals over questions and
    training seeds, and each seed's tokens to match)."""
    t = Table(
        title=f"{bank}: every operating point on {questions} {split} questions x {seeds} seeds; "
        "accuracy in %, mean [95% bootstrap interval over questions]",
        title_justify="left",
    )
    names = [r.family for res in results.values() for r in res] + [s.family for s in summaries]
    for c in ("family", "training seed", "point", "accuracy %", "decoded tokens", "chains"):
        if c == "family":
            _family_column(t, names)
        else:
            t.add_column(c, justify="left" if c == "point" else "right")
    for res in results.values():
        for r in res:
            t.add_row(
                r.family,
                "" if r.train_seed is None else str(r.train_seed),
                r.param,
                fmt_accuracy(r.accuracy),
                fmt_tokens(r.tokens),
                f"{np.mean([e.chains for e in r.episodes]):.1f}",
            )
    t.add_row(
        "oracle", "", "", fmt_accuracy(orc.accuracy), fmt_tokens(orc.tokens), "1.0", style="bold"
    )
    console.print(t)
    ref = reference
    b_cols = [f"acc@{b:.0f}" for b in budgets]
    h = Table(
        title=(
            f"{bank}: headline per family (accuracy in %). maj@16 ({ref.label}): "
            f"{fmt_accuracy(ref.accuracy)} at {ref.tokens.mean:.0f} tokens; oracle: {fmt_accuracy(orc.accuracy)} "
            f"at {orc.tokens.mean:.0f} tokens.\n"
            "A learned family is the mean of its training seeds' frontiers; intervals (95%) are "
            "over questions and training seeds together. tokens to match: fewest mean tokens "
            "within 0.5 pt of maj@16 (paired interval; ∞: not matched in > 2.5% of resamples); "
            "per seed: each seed's own; acc@B: accuracy at <= B mean tokens; area: mean best "
            f"accuracy over [{area_range[0]:.0f}, {area_range[1]:.0f}] tokens; oracle gap: oracle "
            "accuracy - best accuracy (pt)"
        ),
        title_justify="left",
    )
    for c in ("family", "seeds", "best accuracy", "tokens to match maj@16", "per seed",
              *b_cols, "area", "oracle gap"):  # fmt: skip
        if c == "family":
            _family_column(h, names)
        else:
            h.add_column(c, justify="right")
    for s in sorted(summaries, key=lambda s: -s.area if math.isfinite(s.area) else 0.0):
        learned = s.kind == "learned"
        match = fmt_tokens(s.tokens_to_match)
        if not math.isnan(s.tokens_to_match.mean):
            match += f" ({100 * s.tokens_to_match.mean / ref.tokens.mean:.0f}%)"
        per_seed = (
            " / ".join(_fmt_never(s.seed_tokens_to_match[x]) for x in s.seeds) if learned else ""
        )
        h.add_row(
            s.family,
            str(len(s.seeds)) if learned else "",
            f"{100 * s.best_accuracy:.1f}",
            match,
            per_seed,
            *(
                "-"
                if math.isnan(i.mean)
                else f"{100 * i.mean:.1f} [{100 * i.low:.1f}, {100 * i.high:.1f}]"
                for i in s.accuracy_at_interval.values()
            ),
            "-" if math.isnan(s.area) else f"{100 * s.area:.1f}",
            f"{100 * s.oracle_gap:.1f}",
            style="bold" if learned else None,
        )
    console.print(h)


def _family_column(table: Table, names: Sequence[str]) -> None:
    """A family's name is what a reader types next (`--families`), so a narrow terminal
    squeezes the numbers, never the name into "best-of-N-…"."""
    width = max(len(n) for n in ("family", "oracle", *names))  # header, oracle row, families
    table.add_column("family", justify="left", no_wrap=True, min_width=width)


def _fmt_never(x: float) -> str:
    return "never" if math.isnan(x) or math.isinf(x) else f"{x:.0f}"


def print_differences(console: Console, summaries: Sequence[FamilySummary]) -> None:
    """Each learned family minus the best heuristic, paired on the same questions, with the
    95% interval over questions and training seeds: at the headline budgets, and the budgets
    (of all where a heuristic has a point, up to maj@16's tokens) where it is above or below
    zero with 95% confidence."""
    learned = [s for s in summaries if s.kind == "learned"]
    if not learned:
        return
    budgets = list(learned[0].accuracy_at)
    t = Table(
        title="learned minus the best heuristic (pt of accuracy; paired, 95% interval over "
        "questions and training seeds)",
        title_justify="left",
    )
    for c in ("family", *(f"at {b:.0f}" for b in budgets), "above 0 at", "below 0 at"):
        if c == "family":
            _family_column(t, [s.family for s in learned])
        else:
            t.add_column(c, justify="right")
    for s in learned:
        cells = []
        for b in budgets:
            d = s.diff_at.get(b)
            if d is None or math.isnan(d.diff.mean):
                cells.append("-")
            else:
                pt = [
                    f"{round(100 * x, 9) + 0.0:+.1f}"
                    for x in (d.diff.mean, d.diff.low, d.diff.high)
                ]
                cells.append(f"{pt[0]} [{pt[1]}, {pt[2]}] vs {d.heuristic}")
        n = len(s.diffs)
        above = ", ".join(f"{b:.0f}" for b in s.above) or "none"
        below = ", ".join(f"{b:.0f}" for b in s.below) or "none"
        t.add_row(
            s.family, *cells, f"{len(s.above)} of {n}: {above}", f"{len(s.below)} of {n}: {below}"
        )
    console.print(t)


class Plotted(Protocol):
    """What the plots read from a point (an :class:`EvalResult`, the oracle, or a point read
    back from a results file)."""

    @property
    def tokens(self) -> Interval: ...

    @property
    def accuracy(self) -> Interval: ...


class PlottedPoint(Plotted, Protocol):
    @property
    def train_seed(self) -> int | None: ...


class LevelLike(Protocol):
    @property
    def tokens(self) -> Interval: ...

    @property
    def accuracy(self) -> Interval: ...


def save_figure(fig: Any, path: str | Path, dpi: int = 130) -> Path:
    """Lay out ``fig``, write it to ``path`` (its folder made if missing), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    return p


def plot_frontier(
    path: str | Path,
    results: Mapping[str, Sequence[PlottedPoint]],
    orc: Plotted,
    reference: Plotted,
    *,
    title: str = "",
    kinds: Mapping[str, str] | None = None,
    floors: Sequence[VoteFloor] = (),
) -> Path:
    """Accuracy vs mean decoded tokens: one line per family through its sweep (a learned family:
    one line per training seed, in one colour; error bars: the bootstrap intervals over
    questions), the oracle point, the maj@16 accuracy as a line, and the vote floors (grey
    markers on that line: the fewest tokens an oracle voter needs to match it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6.5))
    cmap = plt.get_cmap("tab20")
    for i, (fam, res) in enumerate(results.items()):
        learned = (kinds or {}).get(fam) == "learned"
        seeds: dict[int | None, list[PlottedPoint]] = {}
        for r in res:
            seeds.setdefault(r.train_seed, []).append(r)
        for k, (seed, group) in enumerate(seeds.items()):
            pts = sorted(group, key=lambda r: r.tokens.mean)
            x = np.array([r.tokens.mean for r in pts])
            y = np.array([r.accuracy.mean for r in pts])
            xerr = np.array([[r.tokens.mean - r.tokens.low for r in pts],
                             [r.tokens.high - r.tokens.mean for r in pts]])  # fmt: skip
            yerr = np.array([[r.accuracy.mean - r.accuracy.low for r in pts],
                             [r.accuracy.high - r.accuracy.mean for r in pts]])  # fmt: skip
            label = fam if seed is None else f"{fam} ({len(seeds)} training seeds)"
            eb = ax.errorbar(
                x,
                y,
                xerr=np.maximum(xerr, 0),
                yerr=np.maximum(yerr, 0),
                marker="o" if not learned else "D",
                ms=4 if not learned else 5,
                lw=1.2 if not learned else 1.8,
                elinewidth=0.6,
                capsize=2,
                alpha=0.9 if len(seeds) == 1 else 0.7,
                color=cmap(i % 20),
                label=label if k == 0 else None,
            )
            for bars in eb[2]:
                bars.set_alpha(0.3)
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
    return save_figure(fig, path, dpi=130)


def plot_by_difficulty(
    path: str | Path,
    summaries: Sequence[FamilySummary],
    orc: OracleResult,
    reference: EvalResult,
    *,
    title: str = "",
) -> Path:
    """Accuracy and mean tokens per difficulty level: the oracle, maj@16 and each family's
    cheapest point matching maj@16 (else its most accurate one; a learned family's from its
    representative seed)."""
    lines: list[tuple[str, Mapping[str, LevelLike]]] = [
        ("oracle", orc.by_level),
        (f"maj@16 ({reference.label})", reference.by_level),
    ]
    for s in summaries:
        r = s.match if s.match is not None else s.best
        if r is not reference:
            lines.append((r.label, r.by_level))
    return plot_levels(path, lines, title=title)


def plot_levels(
    path: str | Path, lines: Sequence[tuple[str, Mapping[str, LevelLike]]], *, title: str = ""
) -> Path:
    """Accuracy and mean tokens per difficulty level, one line per ``(label, by_level)``; the
    first two are drawn as the oracle and the reference (maj@16), the levels are the first's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(lines[0][1])
    xs = np.arange(len(levels))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")

    def line(by: Mapping[str, LevelLike], label: str, **kw: Any) -> None:
        acc = [by[lv].accuracy.mean if lv in by else np.nan for lv in levels]
        toks = [by[lv].tokens.mean if lv in by else np.nan for lv in levels]
        a1.plot(xs, acc, marker="o", label=label, **kw)
        a2.plot(xs, toks, marker="o", label=label, **kw)

    for i, (label, by) in enumerate(lines):
        if i == 0:
            line(by, label, color="black", lw=2.5)
        elif i == 1:
            line(by, label, color="0.4", lw=2, ls="--")
        else:
            line(by, label, color=cmap((i - 2) % 20), lw=1.2, alpha=0.85)
    for ax, what in ((a1, "accuracy"), (a2, "mean decoded tokens")):
        ax.set_xticks(xs, levels)
        ax.set_xlabel("difficulty level")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.25)
    a2.set_yscale("log")
    a2.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.suptitle(title)
    return save_figure(fig, path, dpi=120)


def plot_results(doc: Mapping[str, Any], folder: str | Path) -> list[Path]:
    """The frontier and per-level figures of a results file
    (:mod:`policies.evaluation.results`), drawn from it alone into ``folder``."""
    from policies.evaluation.oracle import VoteFloor
    from policies.evaluation.results import PointRecord, to_float

    out = Path(folder)
    points = PointRecord.points(doc)
    kinds = {f: str(v["kind"]) for f, v in doc["families"].items()}
    orc = PointRecord.featured(doc["oracle"])
    ref = PointRecord.featured(doc["reference"])
    floors = [
        VoteFloor(
            vote=str(f["vote"]),
            target=ref.accuracy.mean,
            tokens=to_float(f["tokens"]),
            accuracy=to_float(f["accuracy"]),
            all_chains=math.nan,
        )
        for f in doc.get("floors", [])
    ]
    bank = doc["bank"]
    title = (
        f"{bank['name']}: {bank['eval_questions']} {bank['split']} questions x "
        f"{len(doc['settings']['replay_seeds'])} seeds"
    )
    frontier = plot_frontier(
        out / "frontier.png", points, orc, ref, title=title, kinds=kinds, floors=floors
    )
    lines: list[tuple[str, Mapping[str, LevelLike]]] = [
        ("oracle", orc.by_level),
        (f"maj@16 ({ref.family})", ref.by_level),
    ]
    for s in doc["headline"].values():
        shown = PointRecord.featured(s["shown"])
        if shown.family != ref.family:
            lines.append((shown.family, shown.by_level))
    levels = plot_levels(out / "difficulty.png", lines, title=title)
    return [frontier, levels]
