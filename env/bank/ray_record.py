"""``ponder record --ray ADDRESS``: a bank recorded by Ray actors side by side.

Each actor owns a generator (built from the same :class:`~env.bank.record.RecordArgs` as the
single-process recorder: an in-process vLLM engine per GPU with ``--ray-gpus 1``, llama.cpp, a
client of a vLLM server with ``--url``, or the fake); the driver hands each actor one question at
a time (or one group of ``--questions-at-once`` questions, the same groups as without Ray) and
writes what comes back into the same atomic per-question files, once each. So:

* **Same bank.** A question is recorded as the single-process recorder records it (its engine
  reset and reseeded from the question's id: :func:`~env.bank.sampler.record_as`), whichever actor
  takes it: a bank recorded on Ray equals one recorded without (same files, same rows).
* **Resume.** Questions already in the bank are skipped, as without Ray.
* **A dead actor.** Actors are restarted by Ray and their task retried (``max_restarts`` and
  ``max_task_retries`` unbounded); the driver writes a question only if its file is not there,
  so nothing is written twice.

The driver runs where ``ponder record`` runs, holds the bank's lock and is its only writer; the
actors only generate. ``local`` starts a Ray instance on this machine for the run (and stops it
after); ``auto`` or ``ray://HOST:PORT`` joins a running cluster, whose nodes must have ponder
installed (``pip install -e '.[ray]'``) and see the model files.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from env.bank.manifest import BankManifest
from env.bank.record import (
    RecordArgs,
    bank_manifest,
    describe_generator,
    group_size,
    groups_of,
    make_generator,
    questions_of,
)
from env.bank.sampler import record_group_as
from env.bank.writer import BankWriter
from env.ray_cluster import connect
from env.types import Question

__all__ = ["RecordWorker", "record_on_ray"]

log = logging.getLogger(__name__)


class RecordWorker:
    """What a Ray actor runs: its own generator, recording one question per call."""

    def __init__(self, args: RecordArgs) -> None:
        self.args = args
        self.gen, self.model = make_generator(args)

    def describe(self) -> tuple[dict[str, Any], str, dict[str, str]]:
        """``(model, template name, prompt texts)`` for the bank manifest."""
        return (self.model, *describe_generator(self.gen, self.args))

    def record(
        self, questions: list[Question], manifest: BankManifest
    ) -> list[dict[str, list[Any]]]:
        """The rows of ``questions`` (a group recorded side by side, or one question) as the
        bank of ``manifest`` records them."""
        return record_group_as(self.gen, questions, manifest, at_once=self.args.questions_at_once)

    def pid(self) -> int:
        return os.getpid()


def record_on_ray(args: RecordArgs, stats: dict[str, float] | None = None) -> Path:
    """Record (or resume) the bank of ``args`` on Ray (see the module docstring). The caller
    holds the bank's lock. ``stats``, when given, receives where the driver's time went:
    ``setup_s`` (cluster, actors, their generators), ``record_s`` (from the first question
    handed out to the last written), ``write_s`` (writing files), ``questions``."""
    import ray
    from tqdm import tqdm

    questions = questions_of(args)
    t_setup = time.perf_counter()
    started = connect(args.ray, args.ray_workers, args.ray_gpus)
    try:
        worker_cls: Any = ray.remote(max_restarts=-1, max_task_retries=-1)(RecordWorker)
        actors: list[Any] = [
            worker_cls.options(num_cpus=1, num_gpus=args.ray_gpus or None).remote(args)
            for _ in range(args.ray_workers)
        ]
        model, template, prompts = ray.get(actors[0].describe.remote())
        manifest = bank_manifest(args, questions, model, template, prompts)
        writer = BankWriter(args.out, manifest, questions)
        manifest = writer.manifest
        todo = deque(groups_of(len(questions), group_size(args), writer.done))
        bar = tqdm(
            total=len(questions),
            initial=sum(writer.done(i) for i in range(len(questions))),
            desc=f"record {args.out} on Ray ({len(actors)} actors)",
            unit="q",
        )
        t0 = time.time()
        setup_s, write_s, written = time.perf_counter() - t_setup, 0.0, 0
        pending: dict[Any, tuple[list[int], Any]] = {}

        def give(actor: Any) -> None:
            if todo and not (args.limit_minutes > 0 and time.time() - t0 > args.limit_minutes * 60):
                group = todo.popleft()
                ref = actor.record.remote([questions[i] for i in group], manifest)
                pending[ref] = (group, actor)

        for a in actors:
            give(a)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            group, actor = pending.pop(ref)
            recorded = ray.get(ref)
            tw = time.perf_counter()
            for i, rows in zip(group, recorded, strict=True):
                # (a retried task, or a group recorded whole again, never writes a file twice)
                if not writer.done(i):
                    writer.write(i, rows)
                    written += 1
                    bar.update(1)
            write_s += time.perf_counter() - tw
            give(actor)
        bar.close()
        if stats is not None:
            stats.update(
                setup_s=setup_s, record_s=time.time() - t0, write_s=write_s, questions=written
            )
        if todo:
            log.warning(
                "time limit reached with %d questions left; rerun the same command to resume",
                sum(not writer.done(i) for g in todo for i in g),
            )
        return Path(args.out)
    finally:
        if started:
            ray.shutdown()
