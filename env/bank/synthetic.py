"""Synthetic trace banks for tests: hand-made chains, or recorded from the fake generator.

The one place tests (and anything else that needs a small bank) build one, so a bank made by
hand holds what a recorded one would: the derived columns (``start``, ``ext``, ``n_injected``,
``probe_text``, ``answer``, ``correct``, ``probe_correct``) come from the recorder's rules, and
the bank is written by :class:`~env.bank.writer.BankWriter` with its identity.

* :func:`write_synthetic_bank` writes chains given chunk by chunk (:class:`SyntheticChunk`);
* :func:`record_fake_bank` records questions from the scripted
  :class:`~env.generators.fake.FakeGenerator` as ``ponder record`` would
  (:func:`~env.bank.sampler.record_as`);
* :func:`synthetic_manifest` is the manifest both use, any field overridden.

Example::

    bank = write_synthetic_bank(
        tmp_path / "bank",
        [(question, [[("Let me see. ", 8, "length", "3"), ("\\\\boxed{7}", 4, "stop")]])],
        chunk_tokens=8,
    )
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from env.bank.manifest import BankManifest
from env.bank.schema import CHUNK_SCHEMA, answer_correct
from env.bank.store import TraceBank
from env.bank.writer import BankWriter
from env.types import Question
from features.errors import ConfigError

if TYPE_CHECKING:
    from env.generators.fake import FakeGenerator

__all__ = [
    "ChunkSpec",
    "FAKE_MODEL",
    "SyntheticChunk",
    "record_fake_bank",
    "record_fake_thinking_bank",
    "record_fake_question",
    "synthetic_manifest",
    "synthetic_rows",
    "write_synthetic_bank",
]

#: The manifest's ``model`` for banks recorded from the fake generator (as ``ponder record
#: --model fake`` writes it).
FAKE_MODEL = {"name": "fake", "path": "", "sha256": "fake"}

_SYNTHETIC_MODEL = {"name": "synthetic", "path": "", "sha256": "synthetic"}

Values = float | Sequence[float] | npt.NDArray[Any]


@dataclass(frozen=True)
class SyntheticChunk:
    """One chunk of a hand-made chain: what a recorder would have seen at it.

    Per-token values (``confidence``, ``entropy``, ``logprob``, ``top1_logprob``) are a scalar,
    repeated for every token, or one value per token. A chunk after the chain's first chunk that
    finished with ``stop`` is a budget-forced extension (``ext``), as the recorder extends only
    chains that ended on their own.
    """

    text: str
    n_tokens: int
    finish_reason: str = "length"
    """``length``, ``stop``, ``forced`` or ``cap``"""
    probe_answer: str | None = None
    """the normalised answer the probe at the chunk's end gave (``None``: none)"""
    probe_tokens: int = 0
    judge_p_yes: float = 0.5
    """the self-verifier's P(yes) (``nan``: not recorded)"""
    confidence: Values = 1.0
    entropy: Values = 0.5
    logprob: Values = -0.5
    top1_logprob: Values = -0.1
    token_ids: Sequence[int] | None = None
    """``None``: ``0 .. n_tokens - 1``"""
    n_injected: int | None = None
    """``None``: two (``Wait,``) in an extension chunk, capped at ``n_tokens``; else none"""
    probe_text: str | None = None
    """``None``: the probe answer closed by ``}`` (as the probe completes ``\\boxed{``), or
    empty without an answer"""
    prefill: int = 0
    cached: int = 0
    probe_prefill: int = 0
    probe_cached: int = 0
    judge_prefill: int = 0
    judge_cached: int = 0


#: A chunk: a :class:`SyntheticChunk`, or a tuple of its fields in order (``(text, n_tokens,
#: finish_reason, probe_answer, probe_tokens, ...)``).
ChunkSpec = SyntheticChunk | tuple[Any, ...]

_PER_TOKEN = ("confidence", "entropy", "logprob", "top1_logprob")
# Fields stored as given; the others are per-token values or have derived defaults.
_DIRECT = [
    f.name
    for f in fields(SyntheticChunk)
    if f.name not in (*_PER_TOKEN, "n_injected", "probe_text", "token_ids", "probe_answer")
]


def _per_token(name: str, value: Values, n: int) -> list[float]:
    if np.ndim(value) == 0:
        return [float(cast(float, value))] * n
    out = [float(v) for v in cast(Sequence[float], value)]
    if len(out) != n:
        raise ConfigError(
            f"{name}: {len(out)} per-token values for a chunk of {n} tokens; give one value "
            "per token, or a scalar for all of them"
        )
    return out


def synthetic_rows(
    question: Question, chains: Sequence[Sequence[ChunkSpec]], *, all_wrong: bool = False
) -> dict[str, list[Any]]:
    """One question's chunk rows as columns (what :meth:`BankWriter.write` takes), chain ``h``
    of ``chains`` being chain ``h`` of the question.

    Derived as the recorder derives them: ``start`` (tokens before the chunk), ``ext``,
    ``answer`` (the normalised answer extracted from the chain's main text, before any
    extension), ``correct`` and ``probe_correct`` (:func:`~env.bank.schema.answer_correct` with
    the gold answer). ``all_wrong`` stores ``correct`` and ``probe_correct`` as ``False``
    everywhere instead, whatever the answers: for tests that need the stored correctness (what
    ``difficulty="auto"`` fits on) constant; ``ponder bank info`` reports such a bank's files
    where a chain's answer is right."""
    from features.answers import extract_answer, normalize_answer

    cols: dict[str, list[Any]] = {f.name: [] for f in CHUNK_SCHEMA}
    for h, chain in enumerate(chains):
        chunks = [c if isinstance(c, SyntheticChunk) else SyntheticChunk(*c) for c in chain]
        start, ended = 0, False
        main: list[str] = []
        for i, c in enumerate(chunks):
            n = c.n_tokens
            row: dict[str, Any] = {name: getattr(c, name) for name in _DIRECT}
            row.update({name: _per_token(name, getattr(c, name), n) for name in _PER_TOKEN})
            probe = c.probe_answer
            injected = min(2, n) if ended else 0
            probe_text = f"{probe}}}" if probe else ""
            row.update(
                qid=question.qid,
                chain=h,
                chunk=i,
                ext=ended,
                start=start,
                n_injected=injected if c.n_injected is None else c.n_injected,
                token_ids=list(range(n)) if c.token_ids is None else [int(t) for t in c.token_ids],
                probe_answer=probe,
                probe_text=probe_text if c.probe_text is None else c.probe_text,
                probe_correct=not all_wrong and answer_correct(probe, question.gold),
            )
            for name, value in row.items():
                cols[name].append(value)
            if not ended:
                main.append(c.text)
            start += n
            ended = ended or c.finish_reason == "stop"
        answer = normalize_answer(extract_answer("".join(main)))
        correct = not all_wrong and answer_correct(answer, question.gold)
        cols["answer"].extend([answer] * len(chunks))
        cols["correct"].extend([correct] * len(chunks))
    return cols


def synthetic_manifest(questions: Sequence[str] = (), **overrides: Any) -> BankManifest:
    """A bank manifest for the question ids ``questions``: small settings (4 chains, chunks of
    16 tokens, 128-token cap, 2 extension chunks, 16 probe tokens, the verifier on, seed 0, the
    testbed template in ``cot`` mode), any field replaced by ``overrides``."""
    fields_: dict[str, Any] = {
        "model": dict(_SYNTHETIC_MODEL),
        "dataset": "synthetic",
        "questions": list(questions),
        "template": "testbed",
        "mode": "cot",
        "sampling": {"temperature": 0.7, "top_p": 1.0, "top_logprobs": 5},
        "chains": 4,
        "chunk_tokens": 16,
        "max_tokens": 128,
        "extension_chunks": 2,
        "probe_tokens": 16,
        "judge": True,
        "seed": 0,
    }
    return BankManifest(**{**fields_, **overrides})


def _manifest_for(questions: Sequence[Question], **overrides: Any) -> BankManifest:
    datasets = {q.dataset for q in questions}
    defaults: dict[str, Any] = {"dataset": datasets.pop()} if len(datasets) == 1 else {}
    return synthetic_manifest([q.qid for q in questions], **{**defaults, **overrides})


def write_synthetic_bank(
    path: str | Path,
    questions: Sequence[tuple[Question, Sequence[Sequence[ChunkSpec]]]],
    *,
    all_wrong: bool = False,
    **manifest_overrides: Any,
) -> TraceBank:
    """Write a bank of hand-made chains at ``path`` and open it.

    Args:
        path: the bank folder (created).
        questions: each question with its chains, a chain being its chunks in order
            (:data:`ChunkSpec`).
        all_wrong: store ``correct`` and ``probe_correct`` as ``False`` everywhere (see
            :func:`synthetic_rows`).
        **manifest_overrides: :func:`synthetic_manifest` fields; ``chains`` defaults to the
            most chains any question has, ``dataset`` to the questions' data set.
    """
    qs = [q for q, _ in questions]
    chains = max((len(c) for _, c in questions), default=1)
    manifest = _manifest_for(qs, **{"chains": chains, **manifest_overrides})
    writer = BankWriter(path, manifest, qs)
    for i, (q, chain_specs) in enumerate(questions):
        writer.write(i, synthetic_rows(q, chain_specs, all_wrong=all_wrong))
    return TraceBank(path)


def _fake_generator(manifest: BankManifest) -> FakeGenerator:
    from env.generators.fake import FakeGenerator
    from env.types import SamplingConfig

    return FakeGenerator(sampling=SamplingConfig(max_chain_tokens=manifest.max_tokens))


def record_fake_question(
    question: Question, manifest: BankManifest, generator: FakeGenerator | None = None
) -> dict[str, list[Any]]:
    """``question`` recorded from the fake generator (a new one unless ``generator`` is given)
    as ``ponder record`` records it for the bank of ``manifest``
    (:func:`~env.bank.sampler.record_as`): the columns a bank file holds. The same question and
    settings give the same columns."""
    from env.bank.sampler import record_as

    return record_as(
        _fake_generator(manifest) if generator is None else generator, question, manifest
    )


def record_fake_bank(
    path: str | Path, questions: Sequence[Question], **manifest_overrides: Any
) -> TraceBank:
    """Record ``questions`` from the fake generator into a bank at ``path`` and open it
    (``manifest_overrides``: :func:`synthetic_manifest` fields; the model is
    :data:`FAKE_MODEL`, the data set the questions')."""
    manifest = _manifest_for(questions, **{"model": dict(FAKE_MODEL), **manifest_overrides})
    writer = BankWriter(path, manifest, questions)
    gen = _fake_generator(manifest)
    for i, q in enumerate(questions):
        writer.write(i, record_fake_question(q, writer.manifest, gen))
    return TraceBank(path)


def record_fake_code_bank(path: str | Path, *, n: int, chains: int = 4) -> Path:
    """HumanEval's first ``n`` train and ``n`` test tasks recorded by ``ponder record`` from the
    fake generator, which writes each task's reference solution
    (:func:`env.code.reference.reference_script`) in one chunk, into a bank at ``path``."""
    from env.bank.record import RecordArgs, record

    out = Path(path)
    record(
        RecordArgs(
            out=out,
            model="fake",
            dataset="humaneval",
            splits=("train", "test"),
            n=n,
            chains=chains,
            chunk_tokens=256,
            max_tokens=2048,
            extension_chunks=0,
        )
    )
    return out


def record_fake_thinking_bank(
    path: str | Path,
    *,
    per_level: int = 2,
    levels: Sequence[int] = (2, 4),
    **manifest_overrides: Any,
) -> TraceBank:
    """A bank recorded s1-style (:func:`~env.bank.sampler.record_questions`) from a scripted
    reasoning "model" with the ``testbed-reasoning`` template: for each testbed question it
    writes a thinking section (a first pass whose steps may slip, one re-check) and its answer.
    The fake's tokens are characters, so the defaults (chunks of 32 tokens, a 640-token cap,
    3 extension chunks) cover a natural end of thinking and the extension after it."""
    import random

    from env.generators.fake import FakeGenerator
    from env.generators.prompts import TESTBED_REASONING
    from env.models.testbed.reasoning import reasoning_trace
    from env.models.testbed.task import make_questions
    from env.types import SamplingConfig

    pairs = make_questions(per_level, seed=0, levels=list(levels), split="eval")
    script = {
        q.text: reasoning_trace(p, random.Random(q.qid), p_slip=0.3, checks=1).text
        for q, p in pairs
    }
    questions = [q for q, _ in pairs]
    settings: dict[str, Any] = {
        "model": dict(FAKE_MODEL),
        "template": TESTBED_REASONING.name,
        "prompts": TESTBED_REASONING.prompt_texts(),
        "chunk_tokens": 32,
        "max_tokens": 640,
        "extension_chunks": 3,
        "judge": False,
    }
    manifest = _manifest_for(questions, **{**settings, **manifest_overrides})
    gen = FakeGenerator(
        script,
        template=TESTBED_REASONING,
        sampling=SamplingConfig(max_chain_tokens=manifest.max_tokens),
    )
    writer = BankWriter(path, manifest, questions)
    for i, q in enumerate(questions):
        writer.write(i, record_fake_question(q, writer.manifest, gen))
    return TraceBank(path)
