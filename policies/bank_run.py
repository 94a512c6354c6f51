"""One bank's run of the main job (:func:`policies.main.run`), step by step.

:func:`run_bank` fixes numpy's threads and runs the steps in order:

1. :func:`_prepare`: the bank, its splits and output folder, the difficulty predictor, the
   hidden-state probes of a run that trains nothing, the oracle, the MLflow tracker;
2. :func:`_train`: the learned families (:func:`policies.training.train_learned`), each
   training logged as a nested MLflow run;
3. :func:`_evaluate`: every heuristic over its grid and every learned policy over λ (then
   refined where its tokens jump), on the evaluated questions;
4. :func:`_compare`: the reference (maj@16), the headline metrics, the printed tables;
5. :func:`_write`: the plots, tables and results file, and the parent run's metrics.

The steps share a :class:`_Job` (what :func:`_prepare` set up) and hand on what they made; the
order of their work, their console output and the results file are those of one function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    PointMap,
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
from policies.training import Trained, job_count, train_learned, train_seeds

if TYPE_CHECKING:
    from policies.main import RunArgs
    from policies.tracking import Tracker

__all__ = ["BankRun", "print_token_split", "question_counts", "run_bank", "vote_floors"]


@dataclass
class BankRun:
    """What :func:`policies.main.run` produced for one bank.

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


def question_counts(bank: TraceBank, split: str = "test") -> tuple[int, int]:
    """Recorded questions of the split policies train on and of ``split`` (the evaluated one)."""
    qs = bank.questions
    return len(select_split(qs, training_split(split))), len(select_split(qs, split))


def run_bank(path: Path, args: RunArgs, console: Console) -> BankRun:
    """The main job on the bank at ``path``: train, evaluate, compare, write, track."""
    from threadpoolctl import threadpool_limits

    # numpy's BLAS threads fixed for the whole job (the learned policies act through matrix
    # products): the same seed gives the same numbers on every run of one machine.
    with threadpool_limits(max(1, args.threads)):
        return _run_bank_fixed(path, args, console)


def resolved_aggregate(args: RunArgs, bank: TraceBank) -> RunArgs:
    """``args`` with ``--aggregate auto`` made the bank's: ``verifier`` on a code bank, where
    the verifier runs the visible tests (see the README's "Policies"), ``confidence``
    elsewhere (chosen on the GSM8K dev questions, see :class:`RunArgs`)."""
    if args.aggregate != "auto":
        return args
    code = bank.manifest.dataset in CODE_DATASETS
    return dataclasses.replace(args, aggregate="verifier" if code else "confidence")


@dataclass
class _Job:
    """What :func:`_prepare` set up for one bank, read by the later steps.

    ``probes`` are the hidden-state probes the policies read (:func:`_train` sets them when
    they are fitted beside the trainings); ``probes_dir`` where they are saved."""

    path: Path
    bank: TraceBank
    name: str
    split: str
    trained_on: str
    suffix: str
    out: Path
    train_n: int
    test_n: int
    seeds: tuple[int, ...]
    diff: Any
    probes: HiddenProbes | None
    probes_dir: Path | None
    cfg: EnvConfig
    orc: OracleResult
    tracker: Tracker | None
    lams: tuple[float, ...]
    t_start: float


@dataclass
class _Evaluated:
    """What :func:`_evaluate` produced: the results by family, each family's kind, the seconds."""

    evaluator: Evaluator
    results: dict[str, list[EvalResult]]
    kinds: dict[str, str]
    eval_s: float


@dataclass
class _Compared:
    """What :func:`_compare` produced: maj@16, the budgets and area range, the headline."""

    reference: EvalResult
    budgets: tuple[float, ...]
    area_range: tuple[float, float]
    summaries: list[FamilySummary]
    targets: list[TargetCheck]
    floors: list[VoteFloor]
    verified: EvalResult | None = None
    verified_targets: list[TargetCheck] = field(default_factory=list)


@dataclass
class _Written:
    """What :func:`_write` produced: the job's wall time, the results document and file, the run."""

    wall: float
    doc: dict[str, Any]
    published: Path | None
    run_id: str | None


def _run_bank_fixed(path: Path, args: RunArgs, console: Console) -> BankRun:
    """:func:`run_bank`'s steps, with numpy's threads fixed."""
    job = _prepare(path, args, console)
    args = resolved_aggregate(args, job.bank)  # _prepare does not read --aggregate
    with _parent_run(job, args) as parent:
        if job.tracker is not None:
            import mlflow

            mlflow.log_metrics(job.orc.metrics())
            if job.diff is not None:
                mlflow.log_artifact(str(job.out / "difficulty.json"))
        trained = _train(job, args, console)
        ev = _evaluate(job, args, console, trained)
        cmp = _compare(job, args, console, ev, trained)
        written = _write(job, args, console, parent, trained, ev, cmp)
    return BankRun(
        bank=job.name,
        out=job.out,
        results=ev.results,
        oracle=job.orc,
        summaries=cmp.summaries,
        reference=cmp.reference,
        train_s=trained.seconds,
        wall_s=written.wall,
        parent_run_id=written.run_id,
        targets=cmp.targets,
        floors=cmp.floors,
        seeds=job.seeds,
        document=written.doc,
        results_path=written.published,
    )


def _prepare(path: Path, args: RunArgs, console: Console) -> _Job:
    """The bank and its splits, the output folder, the difficulty predictor fitted on the
    training questions, the probes of a run that trains nothing, the oracle, the tracker."""
    t_start = time.perf_counter()
    bank = TraceBank(path)
    name = path.resolve().name
    split = args.eval_split
    trained_on = training_split(split)
    suffix = "-dev" if split == "dev" else ""
    out = Path(args.out) if args.out else Path("runs") / f"{name}{suffix}"
    out.mkdir(parents=True, exist_ok=True)
    train_n, test_n = question_counts(bank, split)
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
    return _Job(
        path=path, bank=bank, name=name, split=split, trained_on=trained_on, suffix=suffix,
        out=out, train_n=train_n, test_n=test_n, seeds=seeds, diff=diff, probes=probes,
        probes_dir=probes_dir, cfg=cfg, orc=orc, tracker=tracker, lams=lams, t_start=t_start,
    )  # fmt: skip


def _parent_run(job: _Job, args: RunArgs) -> contextlib.AbstractContextManager[Any]:
    """The job's parent MLflow run (``ponder run <bank>``), with the arguments as its params;
    a context that does nothing without a tracker."""
    params = {
        **{k: v for k, v in dataclasses.asdict(args).items() if k not in ("tracking_uri",)},
        "bank": str(job.path),
        "lams": ",".join(f"{x:g}" for x in job.lams),
        "train_seed_list": ",".join(map(str, job.seeds)),
        "train_questions": job.train_n,
        "eval_questions": job.test_n,
        "train_split": job.trained_on,
    }
    return (
        job.tracker.run(
            f"ponder run {job.name}{job.suffix}",
            params=params,
            tags={"ponder.kind": "main", "ponder.split": job.split},
        )
        if job.tracker
        else contextlib.nullcontext()
    )


def _train(job: _Job, args: RunArgs, console: Console) -> Trained:
    """Train the learned families (none without ``--learned``), read back the hidden-state
    probes fitted beside them (into ``job.probes``) and log each training as a nested run."""
    trained = Trained({}, {}, {}, 0.0, 0)
    if args.learned:
        trained = train_learned(
            job.path, args, difficulty=job.diff, console=console, out=job.out,
            hidden_probes=job.probes_dir,
        )  # fmt: skip
        if job.probes_dir is not None:
            job.probes = loaded_probes(job.probes_dir, job.trained_on, trained.probes_s, console)
        for lname, by_seed in trained.policies.items():
            for s, pol in by_seed.items():
                if job.tracker is not None:
                    _log_training(
                        job.tracker, lname, s, pol, trained.used[lname],
                        trained.seconds[lname][s], job.cfg, args,
                    )  # fmt: skip
    return trained


def _families(job: _Job, trained: Trained) -> tuple[list[Family], dict[str, str]]:
    """Every heuristic family over its grid, then each learned policy over ``job.lams``, with
    each family's kind by name."""
    cfg = job.cfg
    families: list[Family] = heuristic_sweeps(
        cfg.max_chains,
        max_chain_tokens=cfg.max_chain_tokens,
        chunk_tokens=cfg.chunk_tokens,
        extension_chunks=cfg.extension_chunks,
        hidden=job.probes is not None,
        execution=job.bank.manifest.dataset in CODE_DATASETS,
    )
    kinds = {f.name: f.kind for f in families}
    for lname, by_seed in trained.policies.items():
        for s, pol in by_seed.items():
            fam = learned_sweep(lname, pol, job.lams, train_seed=s)
            families.append(fam)
            kinds[fam.name] = "learned"
    return families, kinds


def _evaluate(job: _Job, args: RunArgs, console: Console, trained: Trained) -> _Evaluated:
    """Evaluate every family on the evaluated questions (each once per seed) under a progress
    bar, each result logged as a nested run, then refine the learned policies' sweeps."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tracker = job.tracker
    evaluator = Evaluator(
        job.bank, split=job.split, seeds=args.seeds, difficulty=job.diff, hidden=job.probes,
        config=job.cfg,
    )  # fmt: skip
    t_eval = time.perf_counter()
    families, kinds = _families(job, trained)

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
            points_map: PointMap | None = None
            pool = None
            if args.ray:
                from policies.ray_run import RayEvaluators

                points_map = RayEvaluators(evaluator, _ray_workers(args), args.threads)
            elif (jobs := min(job_count(args), total)) > 1:
                from policies.evaluation.parallel import ProcessEvaluators

                points_map = pool = ProcessEvaluators(evaluator, jobs, args.threads)
            try:
                results = evaluate_families(
                    evaluator, families, on_result=done, points_map=points_map
                )
            finally:
                if pool is not None:
                    pool.close()
            refine = min(args.refine, 1) if args.quick else args.refine
            n_runs = sum(len(v) for v in trained.policies.values())
            if refine > 0 and n_runs:
                bar.update(task, total=total + refine * n_runs)
                _refine(evaluator, results, trained, refine, done)
    eval_s = time.perf_counter() - t_eval
    return _Evaluated(evaluator, results, kinds, eval_s)


def _refine(
    evaluator: Evaluator,
    results: dict[str, list[EvalResult]],
    trained: Trained,
    refine: int,
    done: Callable[[EvalResult], None],
) -> None:
    """Add ``refine`` λ values to each learned policy's sweep where its tokens jump
    (:func:`~policies.evaluation.sweeps.refine_sweep`), in place in ``results``."""
    for lname, by_seed in trained.policies.items():
        refined: list[EvalResult] = []
        for s, pol in by_seed.items():
            mine = [r for r in results[lname] if r.train_seed == s]
            assert isinstance(pol, LamConditioned)  # learned_sweep checked it
            refined += refine_sweep(
                evaluator, lname, pol, mine, extra=refine, on_result=done, train_seed=s
            )
        results[lname] = refined


def _compare(
    job: _Job, args: RunArgs, console: Console, ev: _Evaluated, trained: Trained
) -> _Compared:
    """The comparison: maj@16 as the reference, the budgets, each family's headline metrics,
    the printed tables (targets, floors, token split), the representative policies copied out
    and, with probes, the shared-budget (fleet) table."""
    bank, orc, results, kinds = job.bank, job.orc, ev.results, ev.kinds
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
        console, job.name, results, summaries, orc, reference, budgets, area_range,
        len(ev.evaluator.questions), len(ev.evaluator.seeds), job.split,
    )  # fmt: skip
    print_differences(console, summaries)
    targets = target_check(results, reference=reference, kinds=kinds)
    print_targets(console, targets)
    verified = verified_reference(results) if bank.manifest.dataset in CODE_DATASETS else None
    verified_targets: list[TargetCheck] = []
    if verified is not None:  # code: execution verification is the reference to beat
        verified_targets = target_check(
            results,
            reference=verified,
            kinds=kinds,
            reference_name=f"best-of-{verified.param.removeprefix('N=')}-verifier",
            target_share=VERIFIED_TARGET_SHARE,
        )
        print_targets(console, verified_targets)
    floors = vote_floors(bank, job.split, job.cfg, reference)
    print_floors(console, floors, reference)
    split_section = token_split(summaries)
    if split_section is not None:
        print_token_split(console, split_section)
    _representatives(job.out, summaries)
    if job.probes is not None:
        fleet_table_of_run(bank, args, job.probes, job.out, console, trained, job.lams)
    return _Compared(
        reference, budgets, area_range, summaries, targets, floors, verified, verified_targets
    )


def _write(
    job: _Job,
    args: RunArgs,
    console: Console,
    parent: Any,
    trained: Trained,
    ev: _Evaluated,
    cmp: _Compared,
) -> _Written:
    """The frontier and per-level plots, the comparison / headline / oracle tables, the results
    file (also to ``--results-dir`` for a report run), the parent run's metrics and artifacts."""
    name, out, results, evaluator = job.name, job.out, ev.results, ev.evaluator
    title = (
        f"{name}: {len(evaluator.questions)} {job.split} questions x {len(evaluator.seeds)} seeds"
    )
    frontier = plot_frontier(
        out / "frontier.png", results, job.orc, cmp.reference, title=title, kinds=ev.kinds,
        floors=cmp.floors,
    )  # fmt: skip
    by_level = plot_by_difficulty(
        out / "difficulty.png", cmp.summaries, job.orc, cmp.reference, title=title
    )
    comp = write_rows(out / "comparison.csv", comparison_rows(results, job.orc))
    head = write_rows(out / "headline.csv", headline_rows(cmp.summaries))
    oracle_csv = write_rows(out / "oracle.csv", job.orc.rows())
    wall = time.perf_counter() - job.t_start
    doc = _document(job, args, trained, ev, cmp, wall)
    res_file = write_results(out / "results.json", doc)
    published = None
    if args.results_dir and job.split == "test" and not args.quick:
        published = write_results(Path(args.results_dir) / f"{name}.json", doc)
    run_id = None
    if job.tracker is not None:
        import mlflow

        mlflow.log_metrics(
            {
                **headline_metrics(cmp.summaries),
                **target_metrics(cmp.targets),
                **floor_metrics(cmp.floors, cmp.reference),
                "maj16/accuracy": cmp.reference.accuracy.mean,
                "maj16/tokens": cmp.reference.tokens.mean,
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
    return _Written(wall, doc, published, run_id)


def _document(
    job: _Job, args: RunArgs, trained: Trained, ev: _Evaluated, cmp: _Compared, wall: float
) -> dict[str, Any]:
    """The results file's document (:func:`~policies.evaluation.results.results_document`)."""
    bank = job.bank
    return results_document(
        bank={
            "name": job.name,
            "id": bank.manifest.bank_id or None,
            "recorded_questions": len(bank),
            "split": job.split,
            "train_split": job.trained_on,
            "train_questions": job.train_n,
            "eval_questions": job.test_n,
        },
        settings=_settings(args, job.seeds, job.lams, cmp.budgets, ev.evaluator, trained),
        results=ev.results,
        kinds=ev.kinds,
        reference=cmp.reference,
        oracle=job.orc,
        summaries=cmp.summaries,
        targets=cmp.targets,
        floors=cmp.floors,
        timings={
            "wall_s": round(wall, 1),
            "train_wall_s": round(trained.wall_s, 1),
            "eval_s": round(ev.eval_s, 1),
            "jobs": trained.jobs,
            "probes_s": round(trained.probes_s, 1),
            "train_s": {k: [round(x, 1) for x in v.values()] for k, v in trained.seconds.items()},
        },
        verified=cmp.verified,
        verified_targets=cmp.verified_targets,
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
        "hidden_aggregate": args.hidden_aggregate,
        "chain_probes": args.chain_probes,
        "hidden": args.hidden,
        "probe_choices": args.probe_choices,
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
    """One training as a run nested under the job's: its arguments, its seconds and the numbers
    of the policy's metadata, and (with ``--log-models``) the policy as an MLflow model."""
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
