"""``ponder run --ray ADDRESS``: the main job's trainings and evaluation sweeps as Ray tasks.

* **Trainings** (:func:`train_on_ray`): each training seed of each learned family is one Ray task
  (:func:`policies.training.train_one`, the function the process pool runs), the hidden-state
  probes one more, and the ``-hidden`` families start once it is saved, as without Ray. Every
  training is seeded and single-threaded, so the policies are the same.
* **Evaluation** (:class:`RayEvaluators`): actors each holding an
  :class:`~policies.evaluation.runner.Evaluator` over the same bank, questions, seeds,
  difficulty predictor and probes; the sweeps' points are spread over them, one at a time each.
  An evaluation is seeded and does not depend on what ran before it in its process, so the
  results, and the results file, are the same as without Ray (``tests/policies/test_ray_run.py``).

Policies travel to the actors as Ray objects; trained policies are saved to, and read back
from, the run's folder, which the cluster's nodes must share (one machine, or a shared
filesystem).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from env.episode.config import EnvConfig
from env.episode.hidden import HiddenProbes
from policies.evaluation.runner import EvalResult, Evaluator
from policies.evaluation.sweeps import Point

__all__ = ["EvalWorker", "RayEvaluators", "probes_key", "train_on_ray"]

#: One training: family, seed, trainer, its arguments, its folder.
Task = tuple[str, int, str, dict[str, Any], Path]


def train_on_ray(
    bank: Path,
    plain: Sequence[Task],
    hidden: Sequence[Task],
    probe_args: tuple[str, str, str, int] | None,
    threads: int,
    finished: Callable[[str, int, float], None],
) -> float:
    """Run the trainings ``plain``, and ``hidden`` once the probes of ``probe_args`` (the
    arguments of :func:`policies.hidden_run.fit_probes`) are saved, as Ray tasks of
    ``threads`` CPUs each; ``finished(family, seed, seconds)`` after each. Returns the probes'
    fit seconds (0 without)."""
    import ray

    from policies.hidden_run import fit_probes
    from policies.training import train_one

    cpus = max(1, threads)
    train: Any = ray.remote(num_cpus=cpus, max_retries=2)(train_one)
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


class EvalWorker:
    """What an evaluation actor runs: one :class:`Evaluator`, one point per call."""

    def __init__(
        self,
        bank: str,
        split: str,
        seeds: int | Sequence[int],
        difficulty: Any,
        hidden: HiddenProbes | str | None,
        config: EnvConfig,
        threads: int,
    ) -> None:
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(max(1, threads))  # (held for the actor's life)
        self.evaluator = Evaluator(
            bank, split=split, seeds=seeds, difficulty=difficulty, hidden=hidden, config=config
        )
        self._probes: dict[int, HiddenProbes] = {}

    @staticmethod
    def args_of(evaluator: Evaluator, threads: int) -> tuple[Any, ...]:
        """The constructor arguments of a worker like ``evaluator``: its bank, split, seeds,
        difficulty predictor, probes and settings, with ``threads`` BLAS threads."""
        return (
            str(evaluator.bank.path),
            evaluator.split,
            list(evaluator.seeds),
            evaluator.difficulty,
            evaluator.hidden_probes,
            evaluator.config,
            max(1, threads),
        )

    def evaluate(
        self,
        policy: Any,
        family: str,
        param: str,
        train_seed: int | None,
        probes_key: int | None = None,
    ) -> EvalResult:
        """Evaluate one point. ``probes_key`` names the policy's hidden-state probes as the
        sender shares them (:func:`probes_key`): every point arrives with its own copy of
        them, and the evaluator builds one replay per probes object, so the copies of one
        sender's object are replaced by the first one received."""
        if probes_key is not None and policy.hidden_probes is not None:
            policy.hidden_probes = self._probes.setdefault(probes_key, policy.hidden_probes)
        return self.evaluator(policy, family=family, param=param, train_seed=train_seed)


def probes_key(policy: Any) -> int | None:
    """What names ``policy``'s hidden-state probes in the sending process (their ``id``: the
    sender holds every policy, and so its probes, until the evaluation ends); ``None`` for a
    policy without probes of its own."""
    probes = getattr(policy, "hidden_probes", None)
    return None if probes is None else id(probes)


class RayEvaluators:
    """A :data:`~policies.evaluation.sweeps.PointMap` over ``workers`` Ray actors, each an
    :class:`EvalWorker` like ``evaluator`` (its bank, split, seeds, predictor, probes and
    settings)."""

    def __init__(self, evaluator: Evaluator, workers: int, threads: int = 1) -> None:
        import ray

        actor = ray.remote(num_cpus=max(1, threads), max_restarts=2, max_task_retries=2)(EvalWorker)
        self.actors: list[Any] = [
            actor.remote(*EvalWorker.args_of(evaluator, threads))  # type: ignore[attr-defined]
            for _ in range(max(1, workers))
        ]

    def __call__(
        self, points: Sequence[Point], on_result: Callable[[EvalResult], None] | None
    ) -> list[EvalResult]:
        import ray

        results: list[EvalResult | None] = [None] * len(points)
        todo = list(range(len(points)))[::-1]
        pending: dict[Any, tuple[int, Any]] = {}

        def give(actor: Any) -> None:
            if todo:
                i = todo.pop()
                policy, family, param, train_seed = points[i]
                ref = actor.evaluate.remote(policy, family, param, train_seed, probes_key(policy))
                pending[ref] = (i, actor)

        for a in self.actors:
            give(a)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(ref)
            results[i] = r = ray.get(ref)
            if on_result is not None:
                on_result(r)
            give(actor)
        return [r for r in results if r is not None]
