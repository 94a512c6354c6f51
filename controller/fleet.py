"""A fleet's allocation: questions that share one token budget, stepped where it pays most.

:meth:`~controller.controller.Controller.solve_fleet` gives every question its base share and
hands the runs to :func:`run_fleet`, which runs them within their shares and then spends the
rest of the budget greedily, one admitted step at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from controller.result import Result
from controller.run import QuestionRun

__all__ = ["run_fleet"]

#: Smallest difficulty used by the proportional fleet split (so an easy question is not starved).
_MIN_DIFFICULTY = 0.05


def run_fleet(runs: Sequence[QuestionRun], total: int, k: int) -> tuple[Result, ...]:
    """The results of ``runs`` (each with its base share as its allowance) under a budget of
    ``total`` decoded tokens, with at most ``k`` steps (or questions, in the base phase) in
    flight at once; a question still pending at the end finishes with ``fleet budget``
    (``latency cap`` past the deadline)."""
    deadline = runs[0].deadline
    pool = ThreadPoolExecutor(min(k, len(runs)), thread_name_prefix="ponder-fleet")
    try:
        # Base phase: every question runs within its share.
        _wait_all(pool, [(r, r.advance) for r in runs], deadline)
        # Greedy phase: the rest, one admitted step at a time.
        greedy = _Greedy(runs)
        while deadline is None or time.monotonic() < deadline:
            left = total - sum(r.committed for r in runs)
            chosen = greedy.choose(left, k)
            if not chosen:
                break
            for r, bound in chosen:
                r.allowance = r.decoded + bound
            _wait_all(pool, [(r, r.advance) for r, _ in chosen], deadline)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for r in runs:
        if not r.settled:
            r.finish("latency cap" if r.past_deadline() else "fleet budget")
    return tuple(r.outcome() for r in runs)


class _Greedy:
    """The greedy phase of a fleet budget: which pending questions step next.

    With value estimates, the highest value per token of the pending step goes first (questions
    whose value is not positive get nothing). Without, each question may take up to its target,
    a share of what is left in proportion to its difficulty; when no target admits a step, the
    targets are recomputed from what is left, and the last crumbs go to the question furthest
    below its share.
    """

    def __init__(self, runs: Sequence[QuestionRun]) -> None:
        self.runs = runs
        self.start = [r.decoded for r in runs]
        self.target: dict[int, float] = {}

    def extra(self, i: int) -> int:
        return self.runs[i].decoded - self.start[i]

    def choose(self, left: int, k: int) -> list[tuple[QuestionRun, int]]:
        pending = [
            (i, r, r.bound(r.pending))
            for i, r in enumerate(self.runs)
            if not r.settled and r.pending is not None
        ]
        if not pending:
            return []
        values = {i: r.value() for i, r, _ in pending}
        if any(v is not None for v in values.values()):
            scored = [
                (v / max(b, 1), i, r, b)
                for i, r, b in pending
                if (v := values[i]) is not None and v > 0
            ]
            return _fit(scored, left, k)
        diff = {i: max(r.difficulty(), _MIN_DIFFICULTY) for i, r, _ in pending}

        def eligible() -> list[tuple[float, int, QuestionRun, int]]:
            return [
                (-(self.extra(i) + b) / diff[i], i, r, b)
                for i, r, b in pending
                if self.extra(i) + b <= self.target.get(i, -1.0)
            ]

        scored = eligible()
        if not _fit(scored, left, k):
            total = sum(diff.values())
            for i, _, _ in pending:
                self.target[i] = self.extra(i) + left * diff[i] / total
            scored = eligible()
        chosen = _fit(scored, left, k)
        if chosen:
            return chosen
        crumbs = [(-(self.extra(i) + b) / diff[i], i, r, b) for i, r, b in pending]
        return _fit(crumbs, left, 1)


def _fit(
    scored: list[tuple[float, int, QuestionRun, int]], left: int, k: int
) -> list[tuple[QuestionRun, int]]:
    """The best-scored steps (ties: the earlier question) that fit in ``left``, at most ``k``."""
    chosen: list[tuple[QuestionRun, int]] = []
    for _, _, r, bound in sorted(scored, key=lambda s: (-s[0], s[1])):
        if bound <= left:
            chosen.append((r, bound))
            left -= bound
            if len(chosen) == k:
                break
    return chosen


def _wait_all(
    pool: ThreadPoolExecutor,
    work: Sequence[tuple[QuestionRun, Callable[[], None]]],
    deadline: float | None,
) -> None:
    """Run every job in the pool; at the deadline abandon the runs still going."""
    futures: dict[Future[None], QuestionRun] = {pool.submit(fn): r for r, fn in work}
    pending = set(futures)
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
        for f in done:
            exc = f.exception()
            if exc is not None:
                for p in pending:
                    futures[p].abandon("cancelled")
                raise exc
        if not done and pending:
            for f in pending:
                futures[f].abandon("latency cap")
            return
