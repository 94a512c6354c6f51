"""The risk-control command line: ``--risk ALPHA`` for ``ponder evaluate`` and ``ponder serve``.

``ponder evaluate --risk ALPHA`` runs :func:`evaluate_main`; ``ponder serve --risk ALPHA
--calibration-bank BANK`` calibrates with :class:`ServeRiskArgs` at startup. On the command line
``ALPHA`` is in accuracy points (``--risk 2``: at most 2 points lost, i.e. ``alpha = 0.02``);
the functions of :mod:`policies.evaluation.risk` take fractions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro

from features.errors import ConfigError
from policies.cli_common import DEFAULT_BANK, bank_path
from policies.evaluation.ltt import Method, check_level
from policies.evaluation.risk import RiskResult, calibrate

__all__ = [
    "RiskEvaluateArgs",
    "ServeRiskArgs",
    "alpha_from_points",
    "evaluate_main",
    "risk_table",
    "summary_lines",
]


def alpha_from_points(points: float) -> float:
    """``--risk`` in accuracy points (``2`` = 2 points = 0.02) as a fraction.

    Raises:
        ConfigError: not a finite number strictly between 0 and 100.
    """
    p = float(points)
    if not (math.isfinite(p) and 0 < p < 100):
        raise ConfigError(
            f"--risk is the accuracy, in points, you accept to lose against the full vote "
            f"(--risk 2 allows 2 points, i.e. 0.02): a number strictly between 0 and 100, got "
            f"{points!r}"
        )
    return p / 100.0


# -- reporting ---------------------------------------------------------------------------------


def _pts(x: float) -> str:
    return f"{100 * x:+.2f}" if x else "0.00"


def summary_lines(result: RiskResult) -> list[str]:
    """What was chosen and what it gave, in plain sentences."""
    a, d = 100 * result.alpha, result.delta
    head = (
        f"{result.family}: alpha = {a:g} point{'' if a == 1 else 's'}, delta = {d:g}, "
        f"{result.questions} "
        f"{result.split} questions x {len(result.seeds)} seeds, "
        f"{'Hoeffding-Bentkus' if result.method == 'hb' else 'binomial'} p-values"
    )
    lines = [head]
    if result.chosen is None:
        lines.append(
            f"no {result.param} certified: the full vote ({result.full_vote}, "
            f"{result.full_tokens:.0f} tokens) is what keeps the loss within alpha"
        )
        if result.alpha < result.min_alpha:
            lines.append(
                f"with {result.questions} calibration questions nothing can be certified below "
                f"alpha = {100 * result.min_alpha:.2f} points (a candidate with no loss at all "
                f"needs (1 - alpha)^n <= delta, i.e. n >= "
                f"{math.ceil(math.log(d) / math.log(1 - result.alpha))} questions); --risk is in "
                "points (--risk 2 allows 2 points)"
            )
    else:
        c = result.chosen
        lines.append(
            f"chose {c.policy} ({result.param} = {c.value:g}): calibration loss "
            f"{_pts(c.loss)} points (clipped {100 * c.risk:.2f}), {c.tokens:.0f} tokens vs "
            f"{result.full_tokens:.0f} for the full vote ({result.full_vote}), p = {c.p_value:.3g}"
        )
    t = result.test
    if t is not None:
        ok = "within" if t.within_alpha else "NOT within"
        lines.append(
            f"test ({t.questions} {t.split} questions): {result.policy_name} loses "
            f"{100 * t.loss.mean:.2f} [{100 * t.loss.low:.2f}, {100 * t.loss.high:.2f}] points "
            f"({ok} alpha; clipped {100 * t.clipped_loss.mean:.2f}), accuracy "
            f"{100 * t.accuracy.mean:.1f} vs {100 * t.full_accuracy.mean:.1f}, tokens "
            f"{t.tokens.mean:.0f} vs {t.full_tokens.mean:.0f}: {100 * t.saved.mean:.1f}% "
            f"[{100 * t.saved.low:.1f}, {100 * t.saved.high:.1f}] saved"
        )
    return lines


def risk_table(result: RiskResult) -> Any:
    """The candidates as a rich table (loss in points)."""
    from rich.table import Table

    t = Table(
        title=f"{result.family} on {result.bank}: loss against {result.full_vote} "
        f"({result.split}, alpha = {100 * result.alpha:g} points, delta = {result.delta:g})",
        title_justify="left",
    )
    for c in ("policy", "loss", "clipped loss", "accuracy", "tokens", "p-value", "status"):
        t.add_column(c, justify="left" if c in ("policy", "status") else "right")
    t.add_row(
        f"{result.full_vote} (full vote)", "0.00", "0.00", f"{100 * result.full_accuracy:.1f}",
        f"{result.full_tokens:.0f}", "-", "reference",
    )  # fmt: skip
    for r in result.rows:
        chosen = result.chosen is not None and r.value == result.chosen.value
        t.add_row(
            r.policy, _pts(r.loss), f"{100 * r.risk:.2f}", f"{100 * r.accuracy:.1f}",
            f"{r.tokens:.0f}", f"{r.p_value:.3g}", r.status + (" (chosen)" if chosen else ""),
            style="bold" if chosen else None,
        )  # fmt: skip
    return t


# -- command line ------------------------------------------------------------------------------


@dataclass
class RiskEvaluateArgs:
    """Calibrate a policy family's stopping parameter on a bank's calibration questions so that the accuracy lost against the full vote is at most --risk points with probability at least 1 - --delta (Learn-then-Test), and report it on the test questions."""

    policy: str
    """a family whose parameter is calibrated: adaptive-consistency (threshold), esc (max chains), best-of (N), probe-agree (k), s1 (budget), deepconf-online (keep percent), or a learned policy's folder (λ)"""
    risk: float
    """the accuracy you accept to lose against the full vote (maj@16), in points: 2 = 2 points (0.02)"""
    delta: float = 0.1
    """the probability that the guarantee fails, a fraction in (0, 1)"""
    bank: str = DEFAULT_BANK
    """trace bank folder"""
    calibration_split: str = "train"
    """the calibration questions: train, or dev (for a learned policy trained on fit)"""
    split: str = "test"
    """the questions reported on (none: no report)"""
    seeds: int = 5
    """replay seeds per question (a question's loss is its mean over them)"""
    grid: tuple[float, ...] = ()
    """the parameter values tried (default: the family's grid)"""
    method: Method = "hb"
    """p-value: hb (Hoeffding-Bentkus, any loss in [0, 1]) or binomial (0/1 losses: one seed)"""
    json: str = ""
    """write the result (every candidate, the choice, the test report) as JSON here"""


def _run(args: RiskEvaluateArgs | ServeRiskArgs, bank: str, test_split: str | None) -> RiskResult:
    alpha = alpha_from_points(args.risk)
    delta = check_level(args.delta, "--delta")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    return calibrate(
        args.policy,
        bank_path(bank),
        alpha=alpha,
        delta=delta,
        split=args.calibration_split,
        test_split=test_split,
        seeds=args.seeds,
        method=args.method,
        grid=args.grid or None,
    )


def evaluate_main(argv: list[str] | None = None) -> int:
    """``ponder evaluate --risk ALPHA``: calibrate, print the candidates and the choice."""
    from env.console import wide_console

    args = tyro.cli(RiskEvaluateArgs, args=argv, prog="ponder evaluate")
    split = None if args.split.lower() in ("none", "") else args.split
    result = _run(args, args.bank, split)
    console = wide_console()
    console.print(risk_table(result))
    for line in summary_lines(result):
        console.print(line, highlight=False, markup=False)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


@dataclass
class ServeRiskArgs:
    """ponder serve --risk ALPHA --calibration-bank BANK: calibrate the policy family's stopping parameter on the bank at startup (Learn-then-Test), then serve the chosen policy. Every other option is ponder serve's (see ponder serve --help)."""

    risk: float
    """the accuracy you accept to lose against the full vote (maj@16), in points: 2 = 2 points (0.02)"""
    calibration_bank: str
    """the trace bank calibrated on: recorded with the served model and the same chunk size, chain cap, chains and temperature"""
    policy: str = "adaptive-consistency"
    """a family whose parameter is calibrated: adaptive-consistency (threshold), esc, best-of, probe-agree, s1, deepconf-online, or a learned policy's folder (λ)"""
    delta: float = 0.1
    """the probability that the guarantee fails, a fraction in (0, 1)"""
    calibration_split: str = "train"
    """the bank's calibration questions: train, or dev (for a learned policy trained on fit)"""
    seeds: int = 5
    """replay seeds per calibration question"""
    grid: tuple[float, ...] = ()
    """the parameter values tried (default: the family's grid)"""
    method: Method = "hb"
    """p-value: hb (Hoeffding-Bentkus) or binomial (0/1 losses: one seed)"""

    def calibrate(self) -> RiskResult:
        """Calibrate on the bank's calibration questions (no test report)."""
        return _run(self, self.calibration_bank, None)

    @property
    def bank_folder(self) -> Path:
        return bank_path(self.calibration_bank)
