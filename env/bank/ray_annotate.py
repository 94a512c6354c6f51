"""``ponder bank annotate --ray ADDRESS``: hidden states computed by Ray actors side by side.

Each actor loads the model once (:class:`~env.bank.annotate.AnnotateWorker`) and computes one
question's file per call; the process that runs the command holds the bank's ``hidden/`` lock
and writes each file once, atomically, as without Ray (a question retried after an actor died
is never written twice). The files are the same as without Ray at the same ``--threads``: a
forward pass does not depend on the process that runs it.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from env.bank.annotate import AnnotateArgs, AnnotateWorker
from env.bank.hidden import HiddenManifest
from env.ray_cluster import connect

__all__ = ["annotate_on_ray"]


def annotate_on_ray(
    spec: Any,
    todo: Sequence[tuple[int, str]],
    manifest: HiddenManifest,
    args: AnnotateArgs,
    write: Callable[[int, bytes, int], None],
) -> float:
    """Compute the files of ``todo`` (``(index, qid)``) on ``args.ray_workers`` actors, calling
    ``write(index, data, tokens)`` as each comes back; returns the actors' set-up seconds."""
    import ray

    threads = spec.threads or 1
    started = connect(args.ray, args.ray_workers * threads)
    try:
        t0 = time.perf_counter()
        worker: Any = ray.remote(num_cpus=threads, max_restarts=-1, max_task_retries=-1)(
            AnnotateWorker
        )
        spec = dataclasses.replace(spec, threads=threads)
        actors: list[Any] = [worker.remote(spec) for _ in range(args.ray_workers)]
        setup = time.perf_counter() - t0  # (the actors load the model while the first runs)
        queue = deque(todo)
        pending: dict[Any, tuple[int, Any]] = {}

        def give(actor: Any) -> None:
            if queue:
                i, qid = queue.popleft()
                pending[actor.annotate.remote(i, qid, manifest)] = (i, actor)

        for a in actors:
            give(a)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(ref)
            data, tokens = ray.get(ref)
            write(i, data, tokens)
            give(actor)
        return setup
    finally:
        if started:
            ray.shutdown()
