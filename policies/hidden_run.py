"""The main job's use of the model's own state (issue 20): the hidden-state probes fitted once
on the training questions (the trainers and the probe rules read them), and the table of one
token budget shared by the test questions (:mod:`policies.evaluation.fleet`), with the learned
value as one of its allocators.
"""

from __future__ import annotations

import json
import logging
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
    from env.bank.hidden import HiddenStates
    from env.types import Question
    from policies.main import RunArgs

log = logging.getLogger(__name__)

#: ``ponder run --probe-choices``: reuse the bank's ``hidden/probe-choices.json`` where it
#: matches (``auto``), or search the probes' whole grid on dev (``dev``).
PROBE_CHOICES: tuple[str, ...] = ("auto", "dev")

__all__ = [
    "PROBE_CHOICES",
    "fit_probes",
    "fleet_table_of_run",
    "loaded_probes",
    "probe_grid",
    "probes_wanted",
    "run_probes",
    "value_curves",
]


def probes_wanted(bank: TraceBank, args: RunArgs, console: Console) -> bool:
    """Whether the run fits hidden-state probes (``--hidden``): ``off`` never; ``auto`` when
    every question of the bank has hidden states (else it says what to run); ``on`` always,
    refusing a bank without them (naming the command that adds them)."""
    from env.bank.hidden import HiddenStates, require_hidden

    if args.hidden not in ("auto", "on", "off"):
        raise ConfigError(f"--hidden must be auto, on or off, got {args.hidden!r}")
    if args.probe_choices not in PROBE_CHOICES:
        raise ConfigError(f"--probe-choices must be auto or dev, got {args.probe_choices!r}")
    if args.hidden == "off":
        return False
    hs = HiddenStates.open(bank.path, bank)
    if args.hidden == "auto" and (hs is None or not hs.complete):
        have = 0 if hs is None else len(hs.annotated)
        console.print(
            f"no hidden-state families: {have} of {len(bank)} questions have hidden states "
            f"(`ponder bank annotate {bank.path}` adds them; --hidden off silences this)"
        )
        return False
    require_hidden(bank)  # --hidden on: refuses a bank without them, saying what to run
    return True


def fit_probes(
    bank: str, trained_on: str, folder: str, threads: int = 1, choices: str = "auto"
) -> float:
    """Fit the run's hidden-state probes on the ``trained_on`` questions of ``bank`` (all the
    train ones, or their ``fit`` part for a dev run), with the held-out probes the trainers
    read, and save them to ``folder``; returns the fit's seconds. One more task of the
    training phase (:func:`policies.training.train_learned` runs it beside the trainings that
    do not read it), so it runs in a worker process with ``threads`` BLAS threads, like them.

    ``choices``: ``auto`` refits the point ``ponder probes`` chose on dev when the bank's
    ``hidden/probe-choices.json`` was made on this annotation and these questions
    (:func:`probe_grid`), and searches the whole grid on dev otherwise; ``dev`` always
    searches it. The probes' params say which (what :func:`loaded_probes` prints)."""
    from threadpoolctl import threadpool_limits

    from env.bank.hidden import require_hidden

    tb = TraceBank(bank)
    hs = require_hidden(tb)
    pool = tb.questions if trained_on == "train" else select_split(tb.questions, trained_on)
    grid = probe_grid(hs, pool, choices)
    with threadpool_limits(max(1, threads)):
        t0 = time.perf_counter()
        probes = HiddenProbes.fit(tb, hs, pool=pool, **grid)
        seconds = time.perf_counter() - t0
    probes.save(folder, training=True)
    return seconds


def probe_grid(hidden: HiddenStates, pool: Sequence[Question], choices: str) -> dict[str, Any]:
    """The grid arguments of the run's probe fit (see :func:`fit_probes`): the chosen point of
    ``hidden/probe-choices.json`` where it matches the annotation and the training questions
    of ``pool``, else ``{}`` (the whole grid, with a note saying why in the probes' params)."""
    from env.probes.choices import CHOICES_FILE, ProbeChoices

    if choices not in PROBE_CHOICES:
        raise ConfigError(f"--probe-choices must be auto or dev, got {choices!r}")
    if choices == "dev":
        return {}
    path = hidden.path / CHOICES_FILE
    if not path.is_file():
        return {"chosen": f"no {CHOICES_FILE}: the whole grid searched"}
    try:
        chosen = ProbeChoices.load(path)
    except ConfigError as e:
        log.warning("%s; the probes are chosen on dev again", e)
        return {"chosen": f"{CHOICES_FILE} unreadable: the whole grid searched"}
    annotated = set(hidden.annotated)
    train = [q.qid for q in select_split([q for q in pool if q.qid in annotated], "train")]
    why = chosen.mismatch(hidden.manifest, train)
    if why is not None:
        return {"chosen": f"{CHOICES_FILE} was made on {why}: the whole grid searched"}
    return {
        **chosen.grid(),
        "chosen": f"the point {CHOICES_FILE} holds, chosen so by `ponder probes`",
    }


def run_probes(
    bank: TraceBank, args: RunArgs, trained_on: str, out: Path, console: Console
) -> tuple[HiddenProbes | None, Path | None]:
    """The hidden-state probes of a run that trains nothing (the training phase fits them
    otherwise: :func:`policies.training.train_learned`), saved to ``out/hidden-probes``;
    ``(None, None)`` when the run goes without (:func:`probes_wanted`)."""
    if not probes_wanted(bank, args, console):
        return None, None
    folder = out / "hidden-probes"
    seconds = fit_probes(str(bank.path), trained_on, str(folder), args.threads, args.probe_choices)
    return loaded_probes(folder, trained_on, seconds, console), folder


def loaded_probes(folder: Path, trained_on: str, seconds: float, console: Console) -> HiddenProbes:
    """The probes :func:`fit_probes` saved, read back with their held-out ones (what is
    evaluated is what was saved)."""
    probes = HiddenProbes.load(folder, training=True)
    console.print(
        f"hidden-state probes fitted on the {trained_on} questions in {seconds:.0f} s: "
        f"{probes.describe()}; {probes.chain.params.get('chosen', '')}"
    )
    return probes


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
    from policies.evaluation.fleet_report import fleet_table

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
    envs: dict[int, BatchedReplayEnv] = {}  # one per setup: flattening the bank is the cost

    def scores(setup: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The training and test questions' values at their opening state under ``seed``."""
        questions = [*setup.train, *setup.test]
        env = envs.get(id(setup))
        if env is None:
            env = BatchedReplayEnv(setup.bank, len(questions), seed=0, probes=policy.hidden_probes)
            envs[id(setup)] = env
        index = {q.qid: i for i, q in enumerate(env.questions)}
        qs = np.array([index[q.qid] for q in questions], np.int64)
        obs, _ = env.reset(options={"questions": qs, "gen_seeds": np.full(len(qs), seed)})
        value = np.asarray(acting.value(obs), np.float64)  # type: ignore[attr-defined]
        return value[: len(setup.train)], value[len(setup.train) :]

    def fn(setup: Any, seed: int) -> Any:
        train, test = scores(setup, seed)
        return kernel_curves(train, setup.train_curves, test, setup.k_test)

    return fn
