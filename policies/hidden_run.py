"""The main job's use of the model's own state (issue 20): the hidden-state probes fitted once
on the training questions (the trainers and the probe rules read them), and the table of one
token budget shared by the test questions (:mod:`policies.evaluation.fleet`), with the learned
value as one of its allocators.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console

from env.bank.store import TraceBank
from env.episode.hidden import HiddenProbes
from env.episode.vector import BatchedReplayEnv
from env.questions import select_split
from features.errors import ConfigError
from policies.base import HasValue, LamConditioned, Policy
from policies.training import Trained

if TYPE_CHECKING:
    from policies.main import RunArgs

__all__ = ["fleet_table_of_run", "run_probes", "value_curves"]


def run_probes(
    bank: TraceBank, args: RunArgs, trained_on: str, out: Path, console: Console
) -> tuple[HiddenProbes | None, Path | None]:
    """The hidden-state probes of the run (``--hidden``): fitted on the training questions
    (``fit`` ones for a dev run), with the held-out probes the trainers read, saved to
    ``out/hidden-probes``; ``(None, None)`` when the run goes without."""
    from env.bank.hidden import HiddenStates, require_hidden

    if args.hidden not in ("auto", "on", "off"):
        raise ConfigError(f"--hidden must be auto, on or off, got {args.hidden!r}")
    if args.hidden == "off":
        return None, None
    hs = HiddenStates.open(bank.path, bank)
    if args.hidden == "auto" and (hs is None or not hs.complete):
        have = 0 if hs is None else len(hs.annotated)
        console.print(
            f"no hidden-state families: {have} of {len(bank)} questions have hidden states "
            f"(`ponder bank annotate {bank.path}` adds them; --hidden off silences this)"
        )
        return None, None
    hs = require_hidden(bank)  # --hidden on: refuses a bank without them, saying what to run
    pool = bank.questions if trained_on == "train" else select_split(bank.questions, trained_on)
    t0 = time.perf_counter()
    probes = HiddenProbes.fit(bank, hs, pool=pool)
    folder = probes.save(out / "hidden-probes", training=True)
    console.print(
        f"hidden-state probes fitted on the {trained_on} questions in "
        f"{time.perf_counter() - t0:.0f} s: {probes.describe()}"
    )
    return probes, folder


def fleet_table_of_run(
    bank: TraceBank,
    args: RunArgs,
    probes: HiddenProbes,
    out: Path,
    console: Console,
    trained: Trained,
    lams: Sequence[float],
) -> None:
    """One token budget shared by the test questions, allocated uniformly, by the difficulty
    probe, by the learned value and by the oracle (:mod:`policies.evaluation.fleet`): printed
    and saved."""
    from policies.evaluation.fleet import fleet_table

    if args.eval_split != "test":
        return
    extra = {}
    for fam in ("value-chain-hidden", "value-chain"):
        by_seed = trained.policies.get(fam)
        if by_seed:
            seed = min(by_seed)
            lam = float(np.exp(np.mean(np.log(lams))))  # the middle of the λ grid
            extra[f"learned value ({fam}, seed {seed})"] = value_curves(by_seed[seed], lam)
    report = fleet_table(
        bank, seeds=args.seeds, probe=probes.difficulty, extra=extra or None, n_boot=400
    )
    (out / "fleet.md").write_text(report.markdown() + "\n")
    (out / "fleet.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    console.print("\n[bold]one budget shared by the test questions[/] (fleet.md)")
    console.print(report.markdown())


def value_curves(policy: Policy, lam: float) -> Any:
    """A fleet allocator (:data:`~policies.evaluation.fleet.CurveFn`) that scores each question
    by the learned policy's value of going on at its opening state (price ``lam``), averaged
    over nothing but that seed's opening chain, and reads curves off the training questions with
    similar scores. The training questions are ones the policy was trained on: their scores are
    in-sample (said in :mod:`policies.evaluation.fleet`'s docstring)."""
    from policies.evaluation.fleet import kernel_curves

    assert isinstance(policy, HasValue) and isinstance(policy, LamConditioned)
    acting = policy.with_lam(lam)

    def scores(setup: Any, questions: Sequence[Any], seed: int) -> np.ndarray:
        env = BatchedReplayEnv(setup.bank, len(questions), seed=0, probes=policy.hidden_probes)
        index = {q.qid: i for i, q in enumerate(env.questions)}
        qs = np.array([index[q.qid] for q in questions], np.int64)
        obs, _ = env.reset(options={"questions": qs, "gen_seeds": np.full(len(qs), seed)})
        return np.asarray(acting.value(obs), np.float64)  # type: ignore[attr-defined]

    def fn(setup: Any, seed: int) -> Any:
        return kernel_curves(
            scores(setup, setup.train, seed),
            setup.train_curves,
            scores(setup, setup.test, seed),
            setup.k_test,
        )

    return fn
