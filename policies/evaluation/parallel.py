"""Evaluating the main job's sweep points in several workers (``ponder run --jobs`` and ``--ray``).

* :class:`EvalWorker`: what each worker holds, its own
  :class:`~policies.evaluation.runner.Evaluator` over the same bank, questions, seeds,
  difficulty predictor, probes and settings; one point per call.
* :func:`map_points`: hands the points out to the workers and gives the results back in the
  points' order; :class:`ProcessEvaluators` (local processes, here) and
  :class:`~policies.ray_run.RayEvaluators` (Ray actors) differ only in how a point is sent and
  how the first finished one is found.

An evaluation is seeded and does not depend on what ran before it in its process, so the results
are those of one process, in the same order. The points travel to the workers as in-memory
objects (nothing is written or read back from a file). A worker keeps one copy of each policy's
hidden-state probes (its first): the evaluator builds one replay per probes object, and a fresh
copy with every point would rebuild it for every point.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any, TypeVar

from env.bank.store import share_reads
from env.episode.config import EnvConfig
from env.episode.hidden import HiddenProbes
from policies.evaluation.runner import EvalResult, Evaluator
from policies.evaluation.sweeps import Point

__all__ = ["EvalWorker", "ProcessEvaluators", "map_points", "probes_key"]

H = TypeVar("H", bound=Hashable)


class EvalWorker:
    """What an evaluation worker (a local process or a Ray actor) runs: one :class:`Evaluator`,
    one point per call."""

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


def map_points(
    points: Sequence[Point],
    slots: Sequence[Any],
    submit: Callable[[Any, Point], H],
    first_done: Callable[[list[H]], H],
    result: Callable[[H], EvalResult],
    on_result: Callable[[EvalResult], None] | None,
) -> list[EvalResult]:
    """Evaluate ``points`` with one point in flight per slot (a worker, or a place in a pool's
    queue) and return the results in the points' order.

    ``submit(slot, point)`` sends a point and returns its handle; ``first_done(handles)`` waits
    for one of them to finish and returns it; ``result(handle)`` is its result (and raises its
    error). ``on_result`` sees each result as it arrives; the finished slot gets the next point.
    """
    results: list[EvalResult | None] = [None] * len(points)
    todo = iter(range(len(points)))
    pending: dict[H, tuple[int, Any]] = {}

    def give(slot: Any) -> None:
        i = next(todo, None)
        if i is not None:
            pending[submit(slot, points[i])] = (i, slot)

    for slot in slots:
        give(slot)
    while pending:
        handle = first_done(list(pending))
        i, slot = pending.pop(handle)
        results[i] = r = result(handle)
        if on_result is not None:
            on_result(r)
        give(slot)
    return [r for r in results if r is not None]


_WORKER: EvalWorker | None = None


def _start(args: tuple[Any, ...]) -> None:
    global _WORKER
    share_reads()  # a worker process of one run: nothing writes to the bank meanwhile
    _WORKER = EvalWorker(*args)


def _evaluate(
    policy: Any, family: str, param: str, train_seed: int | None, key: int | None
) -> EvalResult:
    assert _WORKER is not None, "the pool's initializer builds the worker"
    return _WORKER.evaluate(policy, family, param, train_seed, key)


def _first_done(futures: list[Future[EvalResult]]) -> Future[EvalResult]:
    done, _ = wait(futures, return_when=FIRST_COMPLETED)
    return next(iter(done))


class ProcessEvaluators:
    """Evaluate points in ``workers`` processes like ``evaluator`` (use as a context manager,
    or call :meth:`close`). Each process runs with ``threads`` BLAS threads."""

    def __init__(self, evaluator: Evaluator, workers: int, threads: int = 1) -> None:
        args = EvalWorker.args_of(evaluator, threads)
        self.workers = max(1, int(workers))
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=get_context("spawn"), initializer=_start, initargs=(args,)
        )

    def __call__(
        self, points: Sequence[Point], on_result: Callable[[EvalResult], None] | None
    ) -> list[EvalResult]:
        def submit(_slot: int, point: Point) -> Future[EvalResult]:
            return self._pool.submit(_evaluate, *point, probes_key(point[0]))

        # two points queued per worker keep each busy while its last result travels back
        slots = range(2 * self.workers)
        try:
            return map_points(points, slots, submit, _first_done, Future.result, on_result)
        except BaseException:
            self.close(cancel=True)
            raise

    def close(self, *, cancel: bool = False) -> None:
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)

    def __enter__(self) -> ProcessEvaluators:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
