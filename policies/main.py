"""The main job (``ponder run``, ``make run``): train, evaluate and compare every policy on a bank.

On a trace bank (default: the GSM8K bank, ``data/banks/gsm8k-qwen2.5-coder-1.5b``):

1. fit the difficulty predictor on the training questions;
2. train the learned policies (:mod:`policies.learned`: value / fitted-Q deciding between
   chains, PPO deciding at every chunk, PPO deciding only between chains) on the training questions, with the same predictor
   (small budgets by default: minutes on 2 cores);
3. evaluate every fixed heuristic over its parameter grid, the learned policies over λ, and the
   oracle, on the *test* questions, each question once per seed (>= 5 seeds);
4. log everything to MLflow (:mod:`policies.tracking`: one experiment per bank; a parent run
   ``ponder run`` with one nested run per training and per evaluation);
5. print the comparison (rich tables with bootstrap intervals and the headline metrics: tokens
   to match maj@16, accuracy at fixed budgets, area under the frontier, gap to the oracle) and
   write the frontier plots and tables to ``runs/<bank-name>/``.

A bank still being recorded may hold too few test questions to say anything: below
``--min-test-questions`` the job says so and runs ``--fallback-bank`` (the shipped testbed bank)
instead.

Tuning (λ grids, training budgets, features) looks at results, so it must not look at the test
questions: ``--eval-split dev`` trains on the ``fit`` part of the training questions and
evaluates on the other part, ``dev`` (a quarter, :func:`env.questions.select_split`), and
never reads a test question; the plain run then reports on test once.

This module is the entry point: its arguments (:class:`RunArgs`), the bank it runs
(:func:`pick_banks`) and :func:`run`; one bank's run, step by step, is
:mod:`policies.bank_run`. ``ponder evaluate`` (one policy) is :mod:`policies.evaluate_cli`,
``ponder report`` (the README's report from the results files) :mod:`policies.report_cli`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from rich.console import Console

from env.bank.store import TraceBank
from env.console import wide_console
from env.episode.config import PROBE_AGGREGATES
from features.errors import ConfigError
from policies.bank_run import BankRun, print_token_split, question_counts, run_bank, vote_floors
from policies.cli_common import DEFAULT_BANK, FALLBACK_BANK, bank_path
from policies.training import (
    FULL_TRAIN_SEEDS,
    TRAIN_SEED_STRIDE,
    Trained,
    train_learned,
    train_one,
    train_seeds,
)

__all__ = [
    "RunArgs",
    "main",
    "run",
    "DEFAULT_BANK",
    "FALLBACK_BANK",
    "SWEEP_LAMS",
    "BankRun",
    "FULL_TRAIN_SEEDS",
    "TRAIN_SEED_STRIDE",
    "Trained",
    "train_learned",
    "train_one",
    "train_seeds",
    "vote_floors",
    "pick_banks",
    "print_token_split",
]

log = logging.getLogger(__name__)

#: The λ values the main job evaluates each learned policy at: 25 log-spaced from 1e-6 to 3e-3
#: (two significant digits), the range over which the policies go from 16 chains to one chunk.
SWEEP_LAMS: tuple[float, ...] = tuple(float(f"{x:.2g}") for x in np.geomspace(1e-6, 3e-3, 25))


@dataclass
class RunArgs:
    """Train the learned policies, evaluate every policy on the test questions, compare, track."""

    bank: str = ""
    """trace bank folder: learned policies train on its train questions; all are evaluated on its test questions (default: the GSM8K bank, or --fallback-bank while that holds fewer than --min-test-questions)"""
    fallback_bank: str = FALLBACK_BANK
    """bank run instead of the default one while it is too small ("" for none)"""
    min_test_questions: int = 50
    """recorded test questions (and at least 2 train questions) the default bank needs to be run; a bank given with --bank runs with fewer, with a warning (the intervals are then wider than the differences)"""
    eval_split: str = "test"
    """questions evaluated: test (the report), or dev to tune (training then uses only the fit part of the train questions; no test question is read)"""
    out: str = ""
    """folder for plots and tables (default runs/<bank-name>, runs/<bank-name>-dev for --eval-split dev)"""
    seeds: int = 5
    """episodes per test question (generator seeds 0..seeds-1)"""
    seed: int = 0
    """first training seed of the learned policies (training seed i is seed + 10000 i)"""
    # 3 by default, so that a stranger's `make run` reports the spread of training as well as
    # of the questions (one seed put ppo-chain's tokens to match maj@16 anywhere from 55% to
    # 72% of maj@16's); 5 with --full.
    train_seeds: int = 3
    """training seeds per learned family: each seed is trained and evaluated on its own; the headline reads the mean of their frontiers, with intervals over questions and training seeds together"""
    full: bool = False
    """the full report: at least 5 training seeds"""
    jobs: int = 0
    """processes run at once, each with --threads threads, for the trainings and then for the evaluation sweeps (0: one per CPU this process may use); the results do not depend on it"""
    results_dir: str = "results"
    """folder for <bank>.json, the results file the README's report is made of (written by runs on the test questions without --quick; "" for none); <out>/results.json is always written"""
    learned: bool = True
    """train and evaluate the learned policies (value / fitted-Q deciding between chains, PPO deciding at every chunk, PPO deciding between chains, the stop policy between chains)"""
    # 25 log-spaced values (SWEEP_LAMS): evaluating a trained policy at a λ costs well under a
    # second, and a sparse grid misses where a policy's spending changes. On the GSM8K dev
    # questions (27, x5 seeds) the learned policies' envelope went from below the best heuristic
    # at 16 of 31 budgets (and matching maj@16 with 52% of its tokens) with the earlier 9-value
    # grid (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 6e-4, 1e-3, 3e-3) plus --refine 3, to 14 (44%)
    # with these 25 values alone.
    lams: tuple[float, ...] = SWEEP_LAMS
    """λ values the learned policies are evaluated at (their frontier sweep)"""
    refine: int = 3
    """extra λ values per learned policy, each where its sweep's mean tokens jump more than 2x between neighbouring λ (placed by tokens, never by accuracy; 0: the grid only)"""
    # confidence was chosen on dev: on the GSM8K bank's train questions (27, x10 seeds) weighting
    # votes by confidence lifts best-of-2 from 61.9% to 65.9% and best-of-3 from 68.5% to 71.1%,
    # the 2-3 chains where a policy must match maj@16 within 15% of its tokens; trained with it,
    # the learned policies' frontier areas on the GSM8K dev questions (only 7 yet) went 71.3 ->
    # 74.4 (ppo-chain), 69.3 -> 71.1 (value-chain), 67.0 -> 67.6 (ppo); on testbed-arith-xl's dev
    # questions, where confidence tells less, 48.4 -> 47.1, 46.3 -> 46.6, 47.7 -> 49.3.
    aggregate: str = "auto"
    """how the learned policies' answer is chosen when they stop: majority, confidence (votes weighted by each chain's mean token confidence), verifier (weighted by the verifier's score), or auto: verifier on a code bank (its verifier runs the visible tests), confidence elsewhere"""
    # off was chosen on dev (trained on fit, evaluated on dev over 25 λ values; GSM8K's 14 dev
    # questions of 109, testbed-arith-xl's 40): frontier area with probes -> without,
    # value-chain 67.6 -> 68.7 (GSM8K) and 44.2 -> 45.9 (testbed), one seed; ppo-chain
    # 67.8 -> 68.3 and 47.9 -> 48.1, mean of three seeds. One chain costs 307 tokens, not 318.
    # probe was chosen on the training questions (each read through the probes that did not see
    # it, x10 replay orders): best-of-2 / 4 / 8 / 16 got 63.6 / 70.6 / 74.7 / 76.4% weighted by
    # confidence and 65.3 / 71.4 / 75.3 / 76.4% weighted by the probe's P(right) (majority: 57.2
    # / 68.3 / 73.8 / 76.4); the 32 dev questions alone tell them apart by less than a question.
    hidden_aggregate: str = "probe"
    """how the learned policies that read hidden states choose their answer when they stop: probe (votes weighted by each chain's P(right) from the chain-correctness probe), probe-best (the chain the probe rates highest), or any --aggregate value"""
    chain_probes: bool = False
    """run answer-forcing probes for the learned policies that decide only between chains (value-chain, ppo-chain, stop-chain): they then also read the probe features, but pay for a probe at every chunk; without them (the default) their one chain costs what best-of-1's does"""
    hidden: str = "auto"
    """the model's hidden states (issue 20): auto (used when every recorded question of the bank has them: `ponder bank annotate`), on (required) or off. With them the job fits the hidden-state probes on the training questions, adds the probe rules (probe-stop, best-of-N-probe, best-of-N-probe-best), trains every learned family with hidden-state features beside the same family without, and prints the fleet allocation table"""
    # Searching the probes' grid on dev took 148 of the 161 s of their fit on the GSM8K bank
    # (343 logistic regressions); refitting the point `ponder probes` chose gives the same probes.
    probe_choices: str = "auto"
    """how the hidden-state probes' settings are chosen: auto (the point `ponder probes` chose on dev, kept in the bank's hidden/probe-choices.json, where it was chosen on this annotation and these training questions; else as dev) or dev (search the whole grid on dev again)"""
    value_transitions: int = 60_000
    """decisions collected to train the value policy"""
    value_fqi_iters: int = 10
    """fitted-Q iterations of the value policy"""
    # 2, not the trainer's 3: the third round fits on the most rows (the first two's and the
    # states its greedy policy reached): a value training on the GSM8K train questions took 263 s
    # of CPU with 3 rounds and 134 s with 2 (one thread). On the GSM8K dev
    # questions (trained on fit, 3 training seeds, x5 replay seeds) value-chain's frontier area
    # was 71.9 with 3 rounds and 71.9 with 2; tokens to match maj@16 5,540 (seeds: never, never,
    # 2,575) and 2,966 (2,966, 3,113, 2,516); acc@604 / 1,208 / 2,416 70.6 / 74.4 / 76.0 and
    # 67.5 / 71.7 / 76.7 (intervals +-12 pt). Fewer fitted-Q iterations (5) did worse (area
    # 70.9, acc 69.0 / 70.6 / 74.0), as did halving PPO's steps (areas 73.0 -> 68.5 for ppo and
    # 72.7 -> 68.2 for ppo-chain), so those stay.
    value_rounds: int = 2
    """fitting rounds of the value policy (each after the first adds the states its greedy policy reaches)"""
    ppo_steps: int = 1_000_000
    """environment steps of PPO training"""
    stop_orders: int = 48
    """replayed episodes per training question the stop policy learns from (each a random order of its chains)"""
    budgets: tuple[float, ...] = ()
    """mean-token budgets for the accuracy-at-budget columns (default: 1/8, 1/4, 1/2 of maj@16's tokens)"""
    quick: bool = False
    """a smoke run: tiny training budgets, two λ values (about a minute)"""
    tracking_uri: str = ""
    """MLflow tracking URI (an `mlflow server` URL, ...); default MLFLOW_TRACKING_URI or sqlite in --mlruns"""
    mlruns: str = "mlruns"
    """folder of the embedded MLflow store (when no tracking URI is given)"""
    track: bool = True
    """log runs to MLflow"""
    log_models: bool = True
    """log the learned policies as MLflow models (pyfunc, from code)"""
    threads: int = 1
    """BLAS / torch threads of each training and of the evaluation (fixed, so that a seed gives the same numbers on every run)"""
    ray: str = ""
    """run the trainings and the evaluation sweeps as Ray tasks (pip install -e '.[ray]'): local (a Ray instance on this machine), auto (the cluster running here) or a cluster address; the results file is the same as without Ray (the nodes must share the run's folder)"""
    ray_workers: int = 0
    """evaluation actors on Ray (0: one per CPU of the cluster)"""
    progress: bool = True
    """show progress bars"""


def pick_banks(args: RunArgs, console: Console) -> list[Path]:
    """The bank to run: the one given with ``--bank`` (if it has test and train questions at
    all), else the default bank, or the fallback (with a clear message) while it holds too little.

    ``--eval-split dev`` picks the bank the test run would (by its test questions), so the
    tuning and the report run on the same bank, and it needs dev and fit questions too."""
    chosen = bool(args.bank)
    path = bank_path(args.bank or DEFAULT_BANK)
    reason = ""
    if not path.is_dir():
        reason = f"there is no bank at {path}"
    else:
        b = TraceBank(path)
        train, test = question_counts(b)
        total = len(b.manifest.questions)
        console.print(
            f"bank {path.name}: {len(b)} of {total} questions recorded ({train} train, {test} test)"
        )
        few = f"{test} recorded test and {train} train questions"
        fit, dev = question_counts(b, "dev")
        if test < 1 or train < 2:
            reason = f"the bank {path} holds only {few}: too few to train and evaluate on"
        elif args.eval_split == "dev" and (dev < 1 or fit < 2):
            reason = (
                f"the bank {path} holds only {dev} dev and {fit} fit questions (of its {train} "
                "train questions): too few to tune on"
            )
        elif test < args.min_test_questions and chosen:
            console.print(
                f"[bold yellow]the bank {path} holds only {few} (fewer than "
                f"--min-test-questions {args.min_test_questions}): the intervals will be wider "
                "than most differences between policies.[/]"
            )
        elif test < args.min_test_questions:
            reason = (
                f"the bank {path} holds only {few} (fewer than --min-test-questions "
                f"{args.min_test_questions}): too few to compare policies (is `ponder record` "
                "still filling it?)"
            )
    if not reason:
        return [path]
    if chosen:
        raise ConfigError(reason)
    fb = bank_path(args.fallback_bank) if args.fallback_bank else None
    if fb is None or not fb.is_dir() or fb.resolve() == path.resolve():
        raise ConfigError(reason + "; give another --bank")
    console.print(f"[bold yellow]{reason}; running {fb} instead.[/]")
    return [fb]


def run(args: RunArgs, console: Console | None = None) -> list[BankRun]:
    """The main job on the bank of ``args`` (or its fallback). Returns what each bank produced."""
    console = console or wide_console()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    if args.aggregate not in ("auto", "majority", "confidence", "verifier"):
        raise ConfigError(
            f"--aggregate must be auto, majority, confidence or verifier, got {args.aggregate!r}"
        )
    if args.hidden_aggregate not in ("majority", "confidence", "verifier", *PROBE_AGGREGATES):
        raise ConfigError(
            f"--hidden-aggregate must be majority, confidence, verifier, "
            f"{' or '.join(PROBE_AGGREGATES)}, got {args.hidden_aggregate!r}"
        )
    if args.eval_split not in ("test", "dev"):
        raise ConfigError(
            f"--eval-split must be test (the report) or dev (tuning), got {args.eval_split!r}"
        )
    if args.track:  # before any work: an unreachable store would fail only at the end
        from policies.tracking import check_tracking_uri, resolve_tracking_uri

        check_tracking_uri(resolve_tracking_uri(args.tracking_uri or None, args.mlruns))
    if args.ray_workers < 0:
        raise ConfigError("--ray-workers must be >= 0 (0: one per CPU of the cluster)")
    started = False
    if args.ray:
        from env.ray_cluster import check_ray, connect

        check_ray(args.ray)
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        started = connect(args.ray, args.jobs or usable)
    try:
        return [run_bank(path, args, console) for path in pick_banks(args, console)]
    finally:
        if started:
            import ray

            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    """``ponder run``."""
    args = tyro.cli(RunArgs, args=argv, prog="ponder run")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run(args)
    return 0
