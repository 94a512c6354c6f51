"""The main job's training: its training seeds, the learned families and their budgets, and
training them side by side (each family once per training seed, with and without the model's
hidden states where the bank has them). :mod:`policies.main` orchestrates; this is its
training phase.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from env.questions import training_split
from features.errors import ConfigError
from policies.base import Policy
from policies.registry import load_policy, save_policy

if TYPE_CHECKING:
    from policies.main import RunArgs

__all__ = [
    "FULL_TRAIN_SEEDS",
    "HIDDEN_FAMILIES",
    "TRAIN_SEED_STRIDE",
    "Trained",
    "default_lams",
    "job_count",
    "train_learned",
    "train_one",
    "train_seeds",
]

log = logging.getLogger(__name__)


#: Training seed ``i`` of the job is ``seed + TRAIN_SEED_STRIDE * i``. The trainers derive
#: their random streams from their seed by small offsets (the value policy's rounds, its
#: behaviour policies and their random actions use seed + 0 to seed + 1002): consecutive seeds
#: would share streams, and their spread would understate training's.
TRAIN_SEED_STRIDE = 10_000
#: Training seeds of ``--full``, at least.
FULL_TRAIN_SEEDS = 5


def train_seeds(args: RunArgs) -> tuple[int, ...]:
    """The job's training seeds: ``--train-seeds`` of them (at least
    :data:`FULL_TRAIN_SEEDS` with ``--full``), from ``--seed`` on, :data:`TRAIN_SEED_STRIDE`
    apart."""
    n = max(args.train_seeds, FULL_TRAIN_SEEDS) if args.full else args.train_seeds
    if n < 1:
        raise ConfigError("--train-seeds must be >= 1")
    return tuple(args.seed + TRAIN_SEED_STRIDE * i for i in range(n))


@dataclass
class Trained:
    """The learned policies :func:`train_learned` trained.

    Attributes:
        policies: by family, then training seed (both in training order).
        seconds: each training's seconds, likewise.
        used: each family's training arguments (without the seed).
        wall_s: the training phase's wall time (trainings run side by side with ``--jobs``).
        jobs: trainings run at once.
        probes_s: seconds of the hidden-state probes' fit (0 when it had none).
    """

    policies: dict[str, dict[int, Policy]]
    seconds: dict[str, dict[int, float]]
    used: dict[str, dict[str, Any]]
    wall_s: float
    jobs: int
    probes_s: float = 0.0


def _training_jobs(args: RunArgs) -> list[tuple[str, str, type, dict[str, Any]]]:
    """``(family, trainer, its arguments' dataclass, budgets)`` of each learned family."""
    from policies import learned  # (imports torch only when training)

    quick = args.quick
    return [
        # The value policy decides only between chains (a running chain is always continued):
        # on the dev split of testbed-arith-xl, deciding at every chunk stopped mid-chain on
        # probes and stayed below a single chain's accuracy at low budgets (45% at 52 tokens,
        # 48.5% at 188; single chain 53.5% at 83), and reached 55% at best (991 tokens); between
        # chains it went 53.5% at 86, 54.5% at 232, 60.5% at 707 (maj@16: 59% at 1,337). On the
        # dev cut stratified by difficulty (harder, like the test questions): chunk 48.0% at best,
        # 41.5% at 74 tokens; between chains 51.5% at best, 47.0% at 165 (one chain: 45% at 110).
        (
            "value-chain",
            "value",
            learned.ValueArgs,
            {
                "transitions": 4_000 if quick else args.value_transitions,
                "fqi_iters": 2 if quick else args.value_fqi_iters,
                "rounds": args.value_rounds,
                "num_envs": 256,
                "decide": "chain",
            },
        ),
        (
            "ppo",
            "ppo",
            learned.PPOArgs,
            {"total_steps": 4_096 if quick else args.ppo_steps, "num_envs": 64 if quick else 256},
        ),
        # PPO deciding only between chains (a chain always runs to its end). Its entropy bonus
        # was chosen on the dev split of testbed-arith-xl (0.02 let it settle on one chain at
        # every λ; 0.1 kept it exploring: 57-60% at 320-1,020 tokens over three seeds, where
        # chunk-level PPO got 53-55% at 300-900 and one seed never left one chain).
        (
            "ppo-chain",
            "ppo",
            learned.PPOArgs,
            {
                "total_steps": 4_096 if quick else args.ppo_steps,
                "num_envs": 64 if quick else 256,
                "decide": "chain",
                "ent_coef": 0.1,
            },
        ),
        # The stop policy: a logistic model of whether the vote's answer is settled, between
        # chains (policies.learned.stop). Seconds to train where the value policy takes minutes.
        (
            "stop-chain",
            "stop",
            learned.StopArgs,
            {"orders": 8 if quick else args.stop_orders, "num_envs": 256, "decide": "chain"},
        ),
    ]


def job_count(args: RunArgs) -> int:
    """Processes the job runs at once (``--jobs``; 0: one per CPU this process may use)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, args.jobs or usable or 1)


def train_one(bank: str, trainer: str, kwargs: dict[str, Any], folder: str, threads: int) -> float:
    """Train one learned policy (``trainer``: ``value``, ``ppo`` or ``stop``) on ``bank`` and
    save it to ``folder``; returns the training's seconds. Runs in a worker process of
    :func:`train_learned` (or in this one): with ``threads`` BLAS and torch threads and torch's
    deterministic algorithms, so one seed gives the same policy in any process."""
    from threadpoolctl import threadpool_limits

    from policies import learned

    if trainer == "ppo":
        import torch

        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(max(1, threads))
    trainers: dict[str, Callable[..., Policy]] = {
        "ppo": learned.train_ppo,
        "value": learned.train_value_policy,
        "stop": learned.train_stop_policy,
    }
    fn = trainers[trainer]
    with threadpool_limits(max(1, threads)):
        t0 = time.perf_counter()
        policy = fn(bank, **kwargs)
        seconds = time.perf_counter() - t0
    save_policy(policy, folder)
    return seconds


#: The learned families also trained with hidden-state features (``<family>-hidden``), when the
#: bank has hidden states: every one, so the tables show each with and without them.
HIDDEN_FAMILIES: tuple[str, ...] = ("value-chain", "ppo", "ppo-chain", "stop-chain")


def train_learned(
    bank: Path,
    args: RunArgs,
    *,
    difficulty: Any,
    console: Console,
    out: Path,
    hidden_probes: Path | None = None,
) -> Trained:
    """Train the learned policies (:mod:`policies.learned`) on ``bank``'s train questions
    (their ``fit`` part when evaluating on ``dev``), each family once per training seed
    (:func:`train_seeds`), and save them to ``out/policies/<family>/seed-<seed>/``.

    They train on the observations they are evaluated on: with the difficulty predictor
    fitted on the train questions (``difficulty="auto"`` is the same fit) when there is one.
    With ``hidden_probes`` (a folder) the phase first fits the hidden-state probes there
    (:func:`policies.hidden_run.fit_probes`) beside the trainings that do not read them, and
    the ``-hidden`` families start once it is saved. ``--jobs`` tasks run at once, each in its
    own process (spawned: nothing is shared) with ``--threads`` threads; every training is
    seeded and single-threaded by default, so the policies, and every number made from them,
    do not depend on ``--jobs``. The policies are read back from their files: what is
    evaluated is what was saved.
    """
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    from env.bank.store import reads_shared, share_reads
    from policies.hidden_run import fit_probes

    seeds = train_seeds(args)
    common: dict[str, Any] = {
        "split": training_split(args.eval_split),
        "lams": tuple(default_lams()),
        "config": {"aggregate": args.aggregate},
        "eval_seeds": 0,
        "threads": args.threads,
        "progress": False,
    }
    plain: list[_Task] = []
    hidden: list[_Task] = []
    used: dict[str, dict[str, Any]] = {}
    for name, trainer, fields_of, extra in _training_jobs(args):
        kwargs: dict[str, Any] = {**common, **extra}
        if extra.get("decide") == "chain" and not args.chain_probes:
            # trained (and so evaluated and served) without probes: see ``uses_probes``
            kwargs["config"] = {**common["config"], "probe": False}
        if difficulty is not None:
            if "difficulty" in {f.name for f in dataclasses.fields(fields_of)}:
                kwargs["difficulty"] = "auto"
            else:
                log.warning("%s trains without the difficulty predictor (difficulty = 0.5)", name)
        variants = [(name, kwargs, plain)]
        if hidden_probes is not None and name in HIDDEN_FAMILIES:
            config = {**kwargs["config"], "aggregate": args.hidden_aggregate}
            variants.append(
                (
                    f"{name}-hidden",
                    {**kwargs, "hidden_probes": str(hidden_probes), "config": config},
                    hidden,
                )
            )
        for vname, vkw, into in variants:
            used[vname] = vkw
            for s in seeds:
                folder = out / "policies" / vname / f"seed-{s}"
                into.append((vname, s, trainer, {**vkw, "seed": s}, folder))
    # the value policy's trainings take most of the time: each group starts with them
    plain.sort(key=lambda t: t[2] != "value")
    hidden.sort(key=lambda t: t[2] != "value")
    n_tasks = len(plain) + len(hidden) + (hidden_probes is not None)
    jobs = min(job_count(args), n_tasks)
    console.print(
        f"training {len(used)} learned families x {len(seeds)} seeds ({', '.join(map(str, seeds))}) "
        f"on the {common['split']} questions"
        + (", after the hidden-state probes they read" if hidden_probes is not None else "")
        + (" as Ray tasks ..." if args.ray else f", {jobs} at once ...")
    )
    seconds: dict[str, dict[int, float]] = {name: {} for name in used}
    probes_s = 0.0
    t0 = time.perf_counter()
    probe_args = (str(bank), common["split"], str(hidden_probes), args.threads, args.probe_choices)

    def finished(name: str, s: int, sec: float) -> None:
        seconds[name][s] = sec
        console.print(f"  {name} seed {s}: {sec:.1f} s")

    if args.ray:
        from policies.ray_run import train_on_ray

        probes_s = train_on_ray(
            bank,
            plain,
            hidden,
            probe_args if hidden_probes is not None else None,
            args.threads,
            finished,
        )
    elif jobs == 1:
        with reads_shared():  # the bank read and flattened once for every training
            if hidden_probes is not None:
                probes_s = fit_probes(*probe_args)
            for name, s, trainer, kwargs, folder in [*plain, *hidden]:
                finished(name, s, train_one(str(bank), trainer, kwargs, str(folder), args.threads))
    else:
        # each worker reads and flattens the bank once for all the trainings it runs
        with ProcessPoolExecutor(
            jobs, mp_context=get_context("spawn"), initializer=share_reads
        ) as pool:

            def submit(tasks: list[_Task]) -> dict[Future[float], tuple[str, int]]:
                return {
                    pool.submit(train_one, str(bank), tr, kw, str(folder), args.threads): (n, s)
                    for n, s, tr, kw, folder in tasks
                }

            probe_fut = pool.submit(fit_probes, *probe_args) if hidden_probes is not None else None
            running = submit(plain)
            pending: set[Future[float]] = set(running) | ({probe_fut} if probe_fut else set())
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        if fut is probe_fut:
                            probes_s = fut.result()
                            console.print(f"  hidden-state probes: {probes_s:.1f} s")
                            later = submit(hidden)
                            running.update(later)
                            pending |= set(later)
                        else:
                            finished(*running[fut], fut.result())
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the first failure ends the job
                raise
    wall = time.perf_counter() - t0
    policies: dict[str, dict[int, Policy]] = {
        name: {s: load_policy(out / "policies" / name / f"seed-{s}") for s in seeds}
        for name in used
    }
    seconds = {name: dict(sorted(v.items())) for name, v in seconds.items()}
    return Trained(policies, seconds, used, wall, jobs, probes_s)


#: One training of :func:`train_learned`: family, seed, trainer, its arguments, its folder.
_Task = tuple[str, int, str, dict[str, Any], Path]


def default_lams() -> tuple[float, ...]:
    from policies.learned import DEFAULT_LAMS

    return tuple(DEFAULT_LAMS)


# -- tables and plots --------------------------------------------------------------------------
