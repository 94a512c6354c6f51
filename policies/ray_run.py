"""``ponder run --ray ADDRESS``: the main job's trainings and evaluation sweeps as Ray tasks.

* **Trainings** (:func:`train_on_ray`): each training seed of each learned family is one Ray task
  (:func:`policies.training.train_one`, the function the process pool runs), the hidden-state
  probes one more, and the ``-hidden`` families start once it is saved, as without Ray. Every
  training is seeded and single-threaded, so the policies are the same.
* **Evaluation** (:class:`RayEvaluators`): actors each holding an
  :class:`~policies.evaluation.runner.Evaluator` over the same bank, questions, seeds,
  difficulty predictor and probes; the sweeps' points are spread over them, one at a time each.
  An evaluation is seeded and does not depend on what ran before it in its process, so the
  results, and the results file, are the same as without Ray (``tests/policies/test_results.py``).
  The actors run :class:`~policies.evaluation.parallel.EvalWorker`, and the points are handed out
  by :func:`~policies.evaluation.parallel.map_points`, as the local processes of ``--jobs`` are.

Policies travel to the actors as Ray objects; trained policies are saved to, and read back
from, the run's folder, which the cluster's nodes must share (one machine, or a shared
filesystem).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from policies.evaluation.parallel import EvalWorker, map_points, probes_key
from policies.evaluation.runner import EvalResult, Evaluator
from policies.evaluation.sweeps import Point

__all__ = ["RayEvaluators", "train_on_ray"]

#: One training: family, seed, trainer, its arguments, its folder.
Task = tuple[str, int, str, dict[str, Any], Path]


def train_on_ray(
    bank: Path,
    plain: Sequence[Task],
    hidden: Sequence[Task],
    probe_args: tuple[str, str, str, int, str] | None,
    threads: int,
    finished: Callable[[str, int, float], None],
) -> float:
    """Run the trainings ``plain``, and ``hidden`` once the probes of ``probe_args`` (the
    arguments of :func:`policies.hidden_run.fit_probes`) are saved, as Ray tasks of
    ``threads`` CPUs each; ``finished(family, seed, seconds)`` after each. Returns the probes'
    fit seconds (0 without)."""
    import ray

    from policies.hidden_run import fit_probes

    cpus = max(1, threads)
    train: Any = ray.remote(num_cpus=cpus, max_retries=2)(_train_sharing)
    fit: Any = ray.remote(num_cpus=cpus, max_retries=2)(fit_probes)

    def submit(tasks: Sequence[Task]) -> dict[Any, tuple[str, int]]:
        return {
            train.remote(str(bank), trainer, kw, str(folder), threads): (name, seed)
            for name, seed, trainer, kw, folder in tasks
        }

    probe_ref: Any = fit.remote(*probe_args) if probe_args is not None else None
    running = submit(plain)
    pending: list[Any] = list(running) + ([probe_ref] if probe_ref is not None else [])
    probes_s = 0.0
    while pending:
        (ref,), pending = ray.wait(pending, num_returns=1)
        if ref is probe_ref:
            probes_s = float(ray.get(ref))
            later = submit(hidden)
            running.update(later)
            pending += list(later)
        else:
            name, seed = running[ref]
            finished(name, seed, float(ray.get(ref)))
    return probes_s


def _train_sharing(*args: Any) -> float:
    """:func:`policies.training.train_one` in a Ray worker, which reads and flattens the bank
    once for every training it runs (:func:`env.bank.store.share_reads`)."""
    from env.bank.store import share_reads
    from policies.training import train_one

    share_reads()
    return train_one(*args)


class _SharingWorker(EvalWorker):
    """An :class:`EvalWorker` in its own process (a Ray actor), which keeps what it reads of
    the bank (:func:`env.bank.store.share_reads`)."""

    def __init__(self, *args: Any) -> None:
        from env.bank.store import share_reads

        share_reads()
        super().__init__(*args)


class RayEvaluators:
    """A :data:`~policies.evaluation.sweeps.PointMap` over ``workers`` Ray actors, each an
    :class:`EvalWorker` like ``evaluator`` (its bank, split, seeds, predictor, probes and
    settings)."""

    def __init__(self, evaluator: Evaluator, workers: int, threads: int = 1) -> None:
        import ray

        actor = ray.remote(num_cpus=max(1, threads), max_restarts=2, max_task_retries=2)(
            _SharingWorker
        )
        self.actors: list[Any] = [
            actor.remote(*EvalWorker.args_of(evaluator, threads))  # type: ignore[attr-defined]
            for _ in range(max(1, workers))
        ]

    def __call__(
        self, points: Sequence[Point], on_result: Callable[[EvalResult], None] | None
    ) -> list[EvalResult]:
        import ray

        def submit(actor: Any, point: Point) -> Any:
            return actor.evaluate.remote(*point, probes_key(point[0]))

        def first_done(refs: list[Any]) -> Any:
            (ref,), _ = ray.wait(refs, num_returns=1)
            return ref

        return map_points(points, self.actors, submit, first_done, ray.get, on_result)
