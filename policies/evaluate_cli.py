"""``ponder evaluate``: evaluate one policy (a heuristic's name or a saved policy folder:
:mod:`policies.registry`) on a bank's questions, with the oracle beside it, per difficulty level.

``ponder evaluate --risk ALPHA`` runs :func:`policies.evaluation.risk_cli.evaluate_main` instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import tyro
from rich.table import Table

from env.console import wide_console
from features.errors import ConfigError
from policies.base import LamConditioned
from policies.cli_common import DEFAULT_BANK, bank_path
from policies.evaluation.oracle import oracle
from policies.evaluation.report import fmt_accuracy, fmt_tokens
from policies.evaluation.runner import Evaluator
from policies.registry import load_policy

__all__ = ["EvaluateArgs", "evaluate_main"]


@dataclass
class EvaluateArgs:
    """Evaluate one policy on a bank's questions: accuracy and tokens with intervals, per level."""

    policy: str
    """a policy spec: a heuristic's name (best-of-16, best-of-4-verifier, s1-256, adaptive-consistency-0.95, probe-agree-3, ...; the grammar is in policies/registry.py) or a saved policy folder"""
    bank: str = DEFAULT_BANK
    """trace bank folder"""
    split: str = "test"
    """questions evaluated: test, train, or dev / fit (the training questions cut for tuning)"""
    seeds: int = 5
    """episodes per question"""
    lam: float | None = None
    """λ a learned policy acts for (default: its own)"""
    episodes_csv: str = ""
    """write the per-episode table here"""
    tracking_uri: str = ""
    """MLflow tracking URI (default MLFLOW_TRACKING_URI or sqlite in --mlruns)"""
    mlruns: str = "mlruns"
    """folder of the embedded MLflow store"""
    track: bool = True
    """log the evaluation as an MLflow run"""


def evaluate_main(argv: list[str] | None = None) -> int:
    """``ponder evaluate``."""
    args = tyro.cli(EvaluateArgs, args=argv, prog="ponder evaluate")
    console = wide_console()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.track:  # before any work: an unreachable store would fail only at the end
        from policies.tracking import check_tracking_uri, resolve_tracking_uri

        check_tracking_uri(resolve_tracking_uri(args.tracking_uri or None, args.mlruns))
    ev = Evaluator(bank_path(args.bank), split=args.split or None, seeds=args.seeds)
    policy = load_policy(args.policy, config=ev.config)
    if args.lam is not None:
        if not isinstance(policy, LamConditioned):
            raise ConfigError(f"{args.policy} takes no λ (only learned policies do)")
        policy = policy.with_lam(args.lam)
    r = ev(policy)
    orc = oracle(ev.bank, split=args.split or None, config=ev.config)
    t = Table(
        title=f"{r.policy} on {r.bank} ({args.split}: {len(ev.questions)} questions x "
        f"{len(ev.seeds)} seeds)",
        title_justify="left",
    )
    for c in (
        "level",
        "questions",
        "accuracy",
        "decoded tokens",
        "oracle accuracy",
        "oracle tokens",
    ):
        t.add_column(c, justify="left" if c == "level" else "right")
    for lv, s in r.by_level.items():
        o = orc.by_level.get(lv)
        t.add_row(
            lv, str(s.questions), fmt_accuracy(s.accuracy), fmt_tokens(s.tokens),
            fmt_accuracy(o.accuracy) if o else "-", fmt_tokens(o.tokens) if o else "-",
        )  # fmt: skip
    t.add_row(
        "all", str(len(ev.questions)), fmt_accuracy(r.accuracy), fmt_tokens(r.tokens),
        fmt_accuracy(orc.accuracy), fmt_tokens(orc.tokens), style="bold",
    )  # fmt: skip
    console.print(t)
    if args.episodes_csv:
        r.write_csv(args.episodes_csv)
    if args.track:
        from policies.tracking import Tracker

        tracker = Tracker(ev.bank, tracking_uri=args.tracking_uri or None, root=args.mlruns)
        run_id = tracker.log_eval(r, nested=False)
        console.print(f"MLflow run {run_id} in experiment {tracker.experiment!r} ({tracker.uri})")
    return 0
