"""Evaluating the main job's sweep points in several local processes (``ponder run --jobs``).

:class:`ProcessEvaluators` is a :data:`~policies.evaluation.sweeps.PointMap` over a pool of
spawned worker processes, each holding its own :class:`~policies.evaluation.runner.Evaluator`
over the same bank, questions, seeds, difficulty predictor, probes and settings (the
:class:`~policies.ray_run.EvalWorker` the Ray actors hold). An evaluation is seeded and does not
depend on what ran before it in its process, so the results are those of one process, in the
same order; the points travel to the workers as in-memory objects (nothing is written or read
back from a file). A worker keeps one copy of each policy's hidden-state probes (its first):
the evaluator builds one replay per probes object, and a fresh copy with every point would
rebuild it for every point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

from policies.evaluation.runner import EvalResult, Evaluator
from policies.evaluation.sweeps import Point
from policies.ray_run import EvalWorker, probes_key

__all__ = ["ProcessEvaluators"]

_WORKER: Any = None


def _start(args: tuple[Any, ...]) -> None:
    global _WORKER
    _WORKER = EvalWorker(*args)


def _evaluate(
    policy: Any, family: str, param: str, train_seed: int | None, key: int | None
) -> EvalResult:
    assert _WORKER is not None, "the pool's initializer builds the worker"
    return _WORKER.evaluate(policy, family, param, train_seed, key)  # type: ignore[no-any-return]


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
        results: list[EvalResult | None] = [None] * len(points)
        todo = list(range(len(points)))[::-1]
        pending: dict[Future[EvalResult], int] = {}

        def give() -> None:
            if todo:
                i = todo.pop()
                key = probes_key(points[i][0])
                pending[self._pool.submit(_evaluate, *points[i], key)] = i

        # a few points queued per worker keeps each busy while its last result travels back
        for _ in range(2 * self.workers):
            give()
        try:
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    results[i] = r = fut.result()
                    if on_result is not None:
                        on_result(r)
                    give()
        except BaseException:
            self.close(cancel=True)
            raise
        return [r for r in results if r is not None]

    def close(self, *, cancel: bool = False) -> None:
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)

    def __enter__(self) -> ProcessEvaluators:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
