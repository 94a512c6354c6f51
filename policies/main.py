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
never reads a test question; the plain run then reports on test once. ``ponder evaluate`` evaluates one policy (a heuristic's name or a saved policy folder: :mod:`policies.registry`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tyro
from rich.console import Console
from rich.table import Table

from env.bank.store import TraceBank
from env.episode.config import EnvConfig
from env.episode.difficulty import bank_difficulty
from env.episode.hidden import HiddenProbes
from env.questions import select_split, training_split
from env.types import CODE_DATASETS
from features.errors import ConfigError
from policies.base import LamConditioned, Policy, Saveable
from policies.evaluation.headline import (
    VERIFIED_TARGET_SHARE,
    FamilySummary,
    TargetCheck,
    headline,
    reference_result,
    target_check,
    verified_reference,
)
from policies.evaluation.markdown import TOKEN_SPLIT_HEADER, token_split_table
from policies.evaluation.oracle import OracleResult, VoteFloor, oracle, oracle_check, vote_floor
from policies.evaluation.report import (
    comparison_rows,
    floor_metrics,
    fmt_accuracy,
    fmt_tokens,
    headline_metrics,
    headline_rows,
    plot_by_difficulty,
    plot_frontier,
    print_differences,
    print_floors,
    print_tables,
    print_targets,
    target_metrics,
)
from policies.evaluation.results import results_document, token_split, write_results
from policies.evaluation.runner import MATCH_TOLERANCE, EvalResult, Evaluator, write_rows
from policies.evaluation.sweeps import (
    Family,
    evaluate_families,
    heuristic_sweeps,
    learned_sweep,
    refine_sweep,
)
from policies.hidden_run import (
    fleet_table_of_run,
    loaded_probes,
    probes_wanted,
    run_probes,
)
from policies.registry import load_policy
from policies.training import (
    FULL_TRAIN_SEEDS,
    TRAIN_SEED_STRIDE,
    Trained,
    train_learned,
    train_one,
    train_seeds,
)

__all__ = [
    "EvaluateArgs",
    "ReportArgs",
    "RunArgs",
    "evaluate_main",
    "main",
    "run",
    "DEFAULT_BANK",
    "FALLBACK_BANK",
    "SWEEP_LAMS",
    "BankRun",
    "FULL_TRAIN_SEEDS",
    "TRAIN_SEED_STRIDE",
    "Trained",
    "report_main",
    "train_learned",
    "train_one",
    "train_seeds",
    "vote_floors",
    "pick_banks",
    "print_token_split",
]

log = logging.getLogger(__name__)

DEFAULT_BANK = "data/banks/gsm8k-qwen2.5-coder-1.5b"
FALLBACK_BANK = "data/banks/testbed-arith-xl"
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
    """trainings run at once, each in its own process with --threads threads (0: one per CPU this process may use); the results do not depend on it"""
    results_dir: str = "results"
    """folder for <bank>.json, the results file the README's report is made of (written by runs on the test questions without --quick; "" for none); <out>/results.json is always written"""
    learned: bool = True
    """train and evaluate the learned policies (value / fitted-Q deciding between chains, PPO deciding at every chunk, PPO deciding between chains)"""
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
    aggregate: str = "confidence"
    """how the learned policies' answer is chosen when they stop: majority, confidence (votes weighted by each chain's mean token confidence) or verifier"""
    # off was chosen on dev (trained on fit, evaluated on dev over 25 λ values; GSM8K's 14 dev
    # questions of 109, testbed-arith-xl's 40): frontier area with probes -> without,
    # value-chain 67.6 -> 68.7 (GSM8K) and 44.2 -> 45.9 (testbed), one seed; ppo-chain
    # 67.8 -> 68.3 and 47.9 -> 48.1, mean of three seeds. One chain costs 307 tokens, not 318.
    chain_probes: bool = False
    hidden: str = "auto"
    """the model's hidden states (issue 20): auto (used when every recorded question of the bank has them: `ponder bank annotate`), on (required) or off. With them the job fits the hidden-state probes on the training questions, adds the probe rules (probe-stop, best-of-N-probe-best), trains every learned family with hidden-state features beside the same family without, and prints the fleet allocation table"""
    """run answer-forcing probes for the learned policies that decide only between chains (value-chain, ppo-chain): they then also read the probe features, but pay for a probe at every chunk; without them (the default) their one chain costs what best-of-1's does"""
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


@dataclass
class BankRun:
    """What :func:`run` produced for one bank.

    ``train_s`` holds each training's seconds by family and training seed; ``results_path``
    the results file written to ``--results-dir`` (``None``: not a report run)."""

    bank: str
    out: Path
    results: dict[str, list[EvalResult]]
    oracle: OracleResult
    summaries: list[FamilySummary]
    reference: EvalResult
    train_s: dict[str, dict[int, float]]
    wall_s: float
    parent_run_id: str | None = None
    targets: list[TargetCheck] = dataclasses.field(default_factory=list)
    floors: list[VoteFloor] = dataclasses.field(default_factory=list)
    seeds: tuple[int, ...] = ()
    document: dict[str, Any] = dataclasses.field(default_factory=dict)
    results_path: Path | None = None


def vote_floors(
    bank: TraceBank, split: str, config: EnvConfig, reference: EvalResult
) -> list[VoteFloor]:
    """The oracle voters' floors (:func:`~policies.evaluation.oracle.vote_floor`) for matching maj@16."""
    target = reference.accuracy.mean - MATCH_TOLERANCE
    return [
        vote_floor(bank, target=target, split=split, vote=v, config=config)
        for v in ("majority", "any")
    ]


def _counts(bank: TraceBank, split: str = "test") -> tuple[int, int]:
    """Recorded questions of the split policies train on and of ``split`` (the evaluated one)."""
    qs = bank.questions
    return len(select_split(qs, training_split(split))), len(select_split(qs, split))


def _bank_path(spec: str) -> Path:
    """A bank folder: as given, else relative to the repository (the default banks ship there)."""
    p = Path(spec)
    if p.is_dir() or p.is_absolute():
        return p
    repo = Path(__file__).resolve().parents[1] / p
    return repo if repo.is_dir() else p


def pick_banks(args: RunArgs, console: Console) -> list[Path]:
    """The bank to run: the one given with ``--bank`` (if it has test and train questions at
    all), else the default bank, or the fallback (with a clear message) while it holds too little.

    ``--eval-split dev`` picks the bank the test run would (by its test questions), so the
    tuning and the report run on the same bank, and it needs dev and fit questions too."""
    chosen = bool(args.bank)
    path = _bank_path(args.bank or DEFAULT_BANK)
    reason = ""
    if not path.is_dir():
        reason = f"there is no bank at {path}"
    else:
        b = TraceBank(path)
        train, test = _counts(b)
        total = len(b.manifest.questions)
        console.print(
            f"bank {path.name}: {len(b)} of {total} questions recorded ({train} train, {test} test)"
        )
        few = f"{test} recorded test and {train} train questions"
        fit, dev = _counts(b, "dev")
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
    fb = _bank_path(args.fallback_bank) if args.fallback_bank else None
    if fb is None or not fb.is_dir() or fb.resolve() == path.resolve():
        raise ConfigError(reason + "; give another --bank")
    console.print(f"[bold yellow]{reason}; running {fb} instead.[/]")
    return [fb]


def run(args: RunArgs, console: Console | None = None) -> list[BankRun]:
    """The main job on the bank of ``args`` (or its fallback). Returns what each bank produced."""
    console = console or _console()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    if args.aggregate not in ("majority", "confidence", "verifier"):
        raise ConfigError(
            f"--aggregate must be majority, confidence or verifier, got {args.aggregate!r}"
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
        return [_run_bank(path, args, console) for path in pick_banks(args, console)]
    finally:
        if started:
            import ray

            ray.shutdown()


def _run_bank(path: Path, args: RunArgs, console: Console) -> BankRun:
    from threadpoolctl import threadpool_limits

    # numpy's BLAS threads fixed for the whole job (the learned policies act through matrix
    # products): the same seed gives the same numbers on every run of one machine.
    with threadpool_limits(max(1, args.threads)):
        return _run_bank_fixed(path, args, console)


def _run_bank_fixed(path: Path, args: RunArgs, console: Console) -> BankRun:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t_start = time.perf_counter()
    bank = TraceBank(path)
    name = path.resolve().name
    split = args.eval_split
    trained_on = training_split(split)
    suffix = "-dev" if split == "dev" else ""
    out = Path(args.out) if args.out else Path("runs") / f"{name}{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    train_n, test_n = _counts(bank, split)
    seeds = train_seeds(args) if args.learned else ()
    if split == "dev":
        console.print(
            f"tuning run: training on {train_n} fit questions, evaluating on {test_n} dev "
            "questions (both from the bank's train split; no test question is read)"
        )

    diff = bank_difficulty(bank, trained_on)
    if diff is not None:
        diff.save(out / "difficulty.json")
        console.print(f"difficulty predictor fitted on {train_n} {trained_on} questions")

    # The probes are fitted in the training phase, beside the trainings that do not read them
    # (a run that trains nothing fits them here).
    probes: HiddenProbes | None = None
    probes_dir: Path | None = None
    if args.learned:
        probes_dir = out / "hidden-probes" if probes_wanted(bank, args, console) else None
    else:
        probes, probes_dir = run_probes(bank, args, trained_on, out, console)
    cfg = EnvConfig.from_manifest(bank.manifest)
    orc = oracle(bank, split=split, config=cfg)

    tracker = None
    if args.track:
        from policies.tracking import Tracker

        tracker = Tracker(bank, tracking_uri=args.tracking_uri or None, root=args.mlruns)
        console.print(f"MLflow: experiment {tracker.experiment!r} at {tracker.uri}")

    lams = (args.lams[0], args.lams[-1]) if args.quick and len(args.lams) > 2 else args.lams
    params = {
        **{k: v for k, v in dataclasses.asdict(args).items() if k not in ("tracking_uri",)},
        "bank": str(path),
        "lams": ",".join(f"{x:g}" for x in lams),
        "train_seed_list": ",".join(map(str, seeds)),
        "train_questions": train_n,
        "eval_questions": test_n,
        "train_split": trained_on,
    }
    ctx = (
        tracker.run(
            f"ponder run {name}{suffix}",
            params=params,
            tags={"ponder.kind": "main", "ponder.split": split},
        )
        if tracker
        else contextlib.nullcontext()
    )
    with ctx as parent:
        if tracker is not None:
            import mlflow

            mlflow.log_metrics(orc.metrics())
            if diff is not None:
                mlflow.log_artifact(str(out / "difficulty.json"))

        trained = Trained({}, {}, {}, 0.0, 0)
        if args.learned:
            trained = train_learned(
                path, args, difficulty=diff, console=console, out=out, hidden_probes=probes_dir
            )
            if probes_dir is not None:
                probes = loaded_probes(probes_dir, trained_on, trained.probes_s, console)
            for lname, by_seed in trained.policies.items():
                for s, pol in by_seed.items():
                    if tracker is not None:
                        _log_training(
                            tracker, lname, s, pol, trained.used[lname],
                            trained.seconds[lname][s], cfg, args,
                        )  # fmt: skip

        evaluator = Evaluator(
            bank, split=split, seeds=args.seeds, difficulty=diff, hidden=probes, config=cfg
        )
        t_eval = time.perf_counter()
        families: list[Family] = heuristic_sweeps(
            cfg.max_chains,
            max_chain_tokens=cfg.max_chain_tokens,
            chunk_tokens=cfg.chunk_tokens,
            extension_chunks=cfg.extension_chunks,
            hidden=probes is not None,
        )
        kinds = {f.name: f.kind for f in families}
        for lname, by_seed in trained.policies.items():
            for s, pol in by_seed.items():
                fam = learned_sweep(lname, pol, lams, train_seed=s)
                families.append(fam)
                kinds[fam.name] = "learned"

        total = sum(len(f.points) for f in families)
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not args.progress,
            transient=True,
        ) as bar:
            task = bar.add_task(
                f"evaluating {total} policies x {evaluator.episodes} episodes", total=total
            )

            def done(r: EvalResult) -> None:
                if tracker is not None:
                    extra = {} if r.train_seed is None else {"train_seed": r.train_seed}
                    tracker.log_eval(r, extra=extra)
                bar.update(task, advance=1, description=f"evaluated {r.label}")

            with warnings.catch_warnings():
                # DeepConf's warm-up percentile over episodes that have no warm-up chain yet
                warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
                points_map = None
                if args.ray:
                    from policies.ray_run import RayEvaluators

                    points_map = RayEvaluators(evaluator, _ray_workers(args), args.threads)
                results = evaluate_families(
                    evaluator, families, on_result=done, points_map=points_map
                )
                refine = min(args.refine, 1) if args.quick else args.refine
                n_runs = sum(len(v) for v in trained.policies.values())
                if refine > 0 and n_runs:
                    bar.update(task, total=total + refine * n_runs)
                    for lname, by_seed in trained.policies.items():
                        refined: list[EvalResult] = []
                        for s, pol in by_seed.items():
                            mine = [r for r in results[lname] if r.train_seed == s]
                            assert isinstance(pol, LamConditioned)  # learned_sweep checked it
                            refined += refine_sweep(
                                evaluator, lname, pol, mine, extra=refine, on_result=done,
                                train_seed=s,
                            )  # fmt: skip
                        results[lname] = refined
        eval_s = time.perf_counter() - t_eval

        beaten = [m for res in results.values() for r in res for m in oracle_check(r, orc)]
        if beaten:  # cannot happen if the oracle counts as the env does: say so loudly
            console.print(f"[bold red]{len(beaten)} episodes beat the oracle, e.g. {beaten[0]}[/]")

        reference = reference_result(results, 16)
        if reference is None:
            raise ConfigError("the sweeps hold no best-of-N majority result (maj@16)")
        budgets = args.budgets or tuple(
            float(round(reference.tokens.mean * f)) for f in (0.125, 0.25, 0.5)
        )
        cheapest = min(r.tokens.mean for res in results.values() for r in res)
        area_range = (cheapest, reference.tokens.mean)
        summaries = headline(
            results,
            reference=reference,
            budgets=budgets,
            area_range=area_range,
            oracle_accuracy=orc.accuracy.mean,
            kinds=kinds,
        )

        print_tables(
            console, name, results, summaries, orc, reference, budgets, area_range,
            len(evaluator.questions), len(evaluator.seeds), split,
        )  # fmt: skip
        print_differences(console, summaries)
        targets = target_check(results, reference=reference, kinds=kinds)
        print_targets(console, targets)
        verified = verified_reference(results) if bank.manifest.dataset in CODE_DATASETS else None
        if verified is not None:  # code: execution verification is the reference to beat
            print_targets(
                console,
                target_check(
                    results,
                    reference=verified,
                    kinds=kinds,
                    reference_name=f"best-of-{verified.param.removeprefix('N=')}-verifier",
                    target_share=VERIFIED_TARGET_SHARE,
                ),
            )
        floors = vote_floors(bank, split, cfg, reference)
        print_floors(console, floors, reference)
        split_section = token_split(summaries)
        if split_section is not None:
            print_token_split(console, split_section)
        _representatives(out, summaries)
        if probes is not None:
            fleet_table_of_run(bank, args, probes, out, console, trained, lams)

        title = (
            f"{name}: {len(evaluator.questions)} {split} questions x {len(evaluator.seeds)} seeds"
        )
        frontier = plot_frontier(
            out / "frontier.png", results, orc, reference, title=title, kinds=kinds, floors=floors
        )
        by_level = plot_by_difficulty(
            out / "difficulty.png", summaries, orc, reference, title=title
        )
        comp = write_rows(out / "comparison.csv", comparison_rows(results, orc))
        head = write_rows(out / "headline.csv", headline_rows(summaries))
        oracle_csv = write_rows(out / "oracle.csv", orc.rows())
        wall = time.perf_counter() - t_start
        doc = results_document(
            bank={
                "name": name,
                "id": bank.manifest.bank_id or None,
                "recorded_questions": len(bank),
                "split": split,
                "train_split": trained_on,
                "train_questions": train_n,
                "eval_questions": test_n,
            },
            settings=_settings(args, seeds, lams, budgets, evaluator, trained),
            results=results,
            kinds=kinds,
            reference=reference,
            oracle=orc,
            summaries=summaries,
            targets=targets,
            floors=floors,
            timings={
                "wall_s": round(wall, 1),
                "train_wall_s": round(trained.wall_s, 1),
                "eval_s": round(eval_s, 1),
                "jobs": trained.jobs,
                "probes_s": round(trained.probes_s, 1),
                "train_s": {
                    k: [round(x, 1) for x in v.values()] for k, v in trained.seconds.items()
                },
            },
        )
        res_file = write_results(out / "results.json", doc)
        published = None
        if args.results_dir and split == "test" and not args.quick:
            published = write_results(Path(args.results_dir) / f"{name}.json", doc)
        run_id = None
        if tracker is not None:
            import mlflow

            mlflow.log_metrics(
                {
                    **headline_metrics(summaries),
                    **target_metrics(targets),
                    **floor_metrics(floors, reference),
                    "maj16/accuracy": reference.accuracy.mean,
                    "maj16/tokens": reference.tokens.mean,
                    "job/wall_s": wall,
                    "job/train_wall_s": trained.wall_s,
                    **{f"train/{k}_wall_s": sum(v.values()) for k, v in trained.seconds.items()},
                }
            )
            for p in (frontier, by_level, comp, head, oracle_csv, res_file):
                mlflow.log_artifact(str(p))
            run_id = str(parent.info.run_id) if parent is not None else None
        console.print(
            f"wrote {frontier}, {by_level}, {comp}, {head}, {res_file}"
            + (f", {published}" if published else "")
            + f" ({wall:.0f} s; training {trained.wall_s:.0f} s, {trained.jobs} at once)"
        )
    return BankRun(
        bank=name,
        out=out,
        results=results,
        oracle=orc,
        summaries=summaries,
        reference=reference,
        train_s=trained.seconds,
        wall_s=wall,
        parent_run_id=run_id,
        targets=targets,
        floors=floors,
        seeds=seeds,
        document=doc,
        results_path=published,
    )


def _ray_workers(args: RunArgs) -> int:
    """Evaluation actors: ``--ray-workers``, else one per CPU of the cluster."""
    import ray

    return args.ray_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))


def _settings(
    args: RunArgs,
    seeds: Sequence[int],
    lams: Sequence[float],
    budgets: Sequence[float],
    evaluator: Evaluator,
    trained: Trained,
) -> dict[str, Any]:
    """The arguments that shape the numbers (what two runs must share to agree)."""
    return {
        "train_seeds": list(seeds),
        "replay_seeds": list(evaluator.seeds),
        "lams": [float(x) for x in lams],
        "refine": args.refine,
        "budgets": [float(b) for b in budgets],
        "aggregate": args.aggregate,
        "chain_probes": args.chain_probes,
        "hidden": args.hidden,
        "threads": args.threads,
        "quick": args.quick,
        "bootstrap": {"resamples": 2000, "seed": 0, "level": 0.95},
        "training": {
            name: {
                # the probes' folder is the run's own: named relative to it
                k: (
                    list(v) if isinstance(v, tuple) else Path(v).name if k == "hidden_probes" else v
                )
                for k, v in kw.items()
                if k not in ("progress", "threads")
            }
            for name, kw in trained.used.items()
        },
    }


def print_token_split(console: Console, section: Mapping[str, Any]) -> None:
    """The results file's ``token_split`` section as a table
    (:func:`~policies.evaluation.markdown.token_split_table`): per difficulty level, how each
    family's shown point splits its decoded tokens, beside the rule of thumb for the level."""
    t = Table(
        title="tokens per difficulty level at each family's shown point (its cheapest matching "
        "maj@16, else its most accurate; a learned family's from its median seed): deep = past "
        "a chain's own end (thinking longer), wide = in the chains after the first (sampling "
        "wider), the rest the first chain's and the verifier's; beside it the rule of thumb "
        "(levels split in terciles)",
        title_justify="left",
    )
    for c in TOKEN_SPLIT_HEADER:
        t.add_column(c, justify="left" if c in ("level", "rule of thumb", "point") else "right")
    rows = token_split_table(section)
    for i, row in enumerate(rows):
        t.add_row(*row, end_section=i + 1 == len(rows) or rows[i + 1][0] != "")
    console.print(t)


def _representatives(out: Path, summaries: Sequence[FamilySummary]) -> None:
    """Copy each learned family's representative seed (the median one,
    :attr:`FamilySummary.representative`) to ``out/policies/<family>/``, so that folder is a
    policy ``ponder serve`` and ``ponder evaluate`` take."""
    import shutil

    for s in summaries:
        seed = s.representative
        if s.kind != "learned" or seed is None:
            continue
        src = out / "policies" / s.family / f"seed-{seed}"
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, out / "policies" / s.family / f.name)


def _log_training(
    tracker: Any,
    name: str,
    seed: int,
    policy: Policy,
    used: dict[str, Any],
    seconds: float,
    config: EnvConfig,
    args: RunArgs,
) -> None:
    import mlflow

    from policies.tracking import flat_config, log_policy_model

    params = {f"train.{k}": v for k, v in {**used, "seed": seed}.items()}
    with tracker.run(
        f"train {name} seed={seed}",
        params={"policy": name, "train_seed": seed, **params, **flat_config(config)},
        tags={"ponder.kind": "training"},
        nested=True,
    ):
        metrics = {"train/wall_s": seconds}
        if isinstance(policy, Saveable):
            # numbers at the top of the policy's metadata, and those of its "metrics"
            meta = policy.meta
            nested = meta.get("metrics")
            items = [*meta.items(), *(nested.items() if isinstance(nested, dict) else [])]
            for k, v in items:
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    metrics[k if "/" in k else f"train/{k}"] = float(v)
        mlflow.log_metrics(metrics)
        if args.log_models:
            log_policy_model(policy, config)


def _console() -> Console:
    """A console wide enough for the tables, also when writing to a file or a pipe."""
    return Console() if sys.stdout.isatty() else Console(width=180)


def main(argv: list[str] | None = None) -> int:
    """``ponder run``."""
    args = tyro.cli(RunArgs, args=argv, prog="ponder run")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run(args)
    return 0


# -- ponder evaluate ---------------------------------------------------------------------------


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
    console = _console()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.track:  # before any work: an unreachable store would fail only at the end
        from policies.tracking import check_tracking_uri, resolve_tracking_uri

        check_tracking_uri(resolve_tracking_uri(args.tracking_uri or None, args.mlruns))
    ev = Evaluator(_bank_path(args.bank), split=args.split or None, seeds=args.seeds)
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


# -- ponder report -----------------------------------------------------------------------------


@dataclass
class ReportArgs:
    """Render the README's report from the results files that `ponder run` writes: print it as Markdown, or write it into the README."""

    results_dir: str = "results"
    """folder of the results files (<bank>.json)"""
    bank: tuple[str, ...] = ()
    """only these banks (by name; default: every results file in --results-dir)"""
    readme: str = "README.md"
    """the README that --write-readme rewrites"""
    write_readme: bool = False
    """rewrite each bank's block of the README (between <!-- report:<bank>:start --> and <!-- report:<bank>:end -->) instead of printing"""
    figures: str = ""
    """draw each bank's frontier and per-level figures from its results file into <figures>/<bank>/ ("" for none)"""


def report_main(argv: list[str] | None = None) -> int:
    """``ponder report``: the README's tables (and figures) from the results files alone."""
    from policies.evaluation.markdown import end_marker, render, replace_blocks, start_marker
    from policies.evaluation.report import plot_results
    from policies.evaluation.results import read_results

    args = tyro.cli(ReportArgs, args=argv, prog="ponder report")
    folder = Path(args.results_dir)
    files = sorted(folder.glob("*.json"))
    if args.bank:
        missing = sorted(set(args.bank) - {f.stem for f in files})
        if missing:
            raise ConfigError(
                f"no results file for {', '.join(missing)} in {folder}: run `ponder run` on it"
            )
        files = [f for f in files if f.stem in args.bank]
    if not files:
        raise ConfigError(f"no results files in {folder}: run `ponder run` first")
    bodies: dict[str, str] = {}
    for f in files:
        doc = read_results(f)
        name = str(doc["bank"]["name"])
        bodies[name] = render(doc)
        if args.figures:
            for p in plot_results(doc, Path(args.figures) / name):
                sys.stderr.write(f"wrote {p}\n")
    if args.write_readme:
        readme = Path(args.readme)
        text = readme.read_text()
        new = replace_blocks(text, bodies)
        if new != text:
            readme.write_text(new)
        sys.stderr.write(
            f"{readme}: {'rewrote' if new != text else 'already up to date:'} {', '.join(bodies)}\n"
        )
        return 0
    for name, body in bodies.items():
        sys.stdout.write(f"{start_marker(name)}\n{body}{end_marker(name)}\n\n")
    return 0
