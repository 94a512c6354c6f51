"""How a bank's questions are sampled: chains side by side in one engine batch, a probe and a
verifier reading at every boundary, and each question's rows as the columns of its file.

:func:`record_questions` drives a :class:`~env.generators.base.Generator` over a batch of
questions (rolling admission: the next question joins as soon as there is room for all its
chains; a chain that ends on its own takes its budget-forced extension at once).
:func:`record_group_as` records a group as the bank of a manifest records it, from the group's
seed (:func:`group_seed`), and notes the group in each file; :func:`record_as` is the group of
one question. ``ponder record`` (:mod:`env.bank.record`) and its Ray actors
(:mod:`env.bank.ray_record`) both sample through these, so a question is recorded the same way
wherever it runs. The columns are :mod:`env.bank.schema`'s.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from env.bank.manifest import BankManifest
from env.bank.schema import EXECUTION_KEY, METADATA_ROWS, SAMPLING_KEY, answer_correct
from env.generators.base import Generator
from env.types import (
    CODE_DATASETS,
    Chain,
    Chunk,
    JudgeResult,
    ProbeResult,
    PromptMode,
    Question,
    TokenUsage,
)
from features.errors import ConfigError

if TYPE_CHECKING:
    from env.code.grade import CodeGrader

__all__ = [
    "code_grader",
    "group_seed",
    "question_seed",
    "record_as",
    "record_group_as",
    "record_questions",
]


def question_seed(seed: int, qid: str) -> int:
    """The per-question sampler seed: a stable hash of the bank seed and the question id."""
    h = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


@dataclass
class _ChainRecord:
    chain: Chain
    index: int
    rows: list[dict[str, Any]] = field(default_factory=list)


def _chunk_row(
    chain: Chain, chain_index: int, index: int, start: int, chunk: Chunk, ext: bool
) -> dict[str, Any]:
    top1 = chunk.top_logprobs[:, 0] if chunk.top_logprobs.shape[1] else np.full(len(chunk), np.nan)
    return {
        "qid": chain.question.qid,
        "chain": chain_index,
        "chunk": index,
        "ext": ext,
        "start": start,
        "n_tokens": len(chunk),
        "n_injected": chunk.n_injected,
        "text": chunk.text,
        "finish_reason": chunk.finish_reason,
        "token_ids": [int(t) for t in chunk.token_ids],
        "logprob": chunk.logprobs,
        "confidence": chunk.confidence,
        "entropy": chunk.entropy,
        "top1_logprob": top1,
        "prefill": chunk.usage.prefill,
        "cached": chunk.usage.cached,
    }


def _boundary(
    row: dict[str, Any], probe: ProbeResult | None, judge: JudgeResult | None, question: Question
) -> None:
    from features.answers import normalize_answer

    if probe is not None:
        norm = normalize_answer(probe.answer)
        row.update(
            probe_text=probe.text,
            probe_answer=norm,
            probe_correct=question.is_right(norm),
            probe_tokens=probe.usage.probe,
            probe_prefill=probe.usage.prefill,
            probe_cached=probe.usage.cached,
        )
    else:
        row.update(
            probe_text="",
            probe_answer=None,
            probe_correct=False,
            probe_tokens=0,
            probe_prefill=0,
            probe_cached=0,
        )
    if judge is not None:
        row.update(
            judge_p_yes=float(judge.p_yes),
            judge_prefill=judge.usage.prefill,
            judge_cached=judge.usage.cached,
        )
    else:
        row.update(judge_p_yes=math.nan, judge_prefill=0, judge_cached=0)


def record_questions(
    gen: Generator,
    questions: Sequence[Question],
    *,
    chains: int,
    chunk_tokens: int,
    max_tokens: int,
    extension_chunks: int,
    probe_tokens: int,
    judge: bool,
    mode: PromptMode = "cot",
    seed: int | None = None,
    graders: Sequence[CodeGrader] | None = None,
    live_chains: int = 0,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Record ``questions`` side by side; return each one's chunk rows as columns (see
    :mod:`env.bank.schema`), in order. Every step extends, probes and judges all their active
    chains in one call to ``gen``, so an engine whose throughput grows with its batch (vLLM on a
    CPU) samples several questions faster than one at a time, and one question's last long
    chains share their steps with the others' chains. The engine is reset once, with ``seed``.

    ``live_chains`` (0: all of them) bounds the chains in the batch: the questions start in
    order, the next one as soon as there is room for all its chains, so that the batch stays
    full while the questions' chains end at different lengths. A chain that ends on its own
    goes on to its budget-forced extension (below) at once, in the same batch. ``on_done(i,
    columns)`` is called as each question ``i`` ends (to write it before the others end).

    With ``graders`` (code questions, :mod:`env.code.grade`; one per question) the model is
    neither probed nor asked to judge: at each boundary the chain's code so far is run by its
    question's grader instead. Its behaviour class is the boundary's probe answer (reading code
    costs no tokens, so the probe's token columns are 0) and the share of visible examples it
    passes is ``judge_p_yes``; the final answer is the class of the chain's final code,
    ``correct`` says whether that class is judged right (:func:`env.code.grade.accepted_answers`),
    and every chain's execution results go into the file's metadata
    (:data:`env.bank.schema.EXECUTION_KEY`).

    A reasoning model's chains (a template with a thinking section) with ``extension_chunks``
    are recorded as s1 forces them: the model's own end of thinking is suppressed and ends the
    sampled chain there, its final answer is the probe at that boundary (closing the section,
    :func:`env.episode.rules.ended_in_thinking`), and the extension continues the thinking
    itself with ``Wait,``, so that thinking longer is what "continue" past the end buys. A chain
    that thinks up to ``max_tokens`` gets its answer forced there."""
    from env.episode.rules import ended_in_thinking, text_reader
    from env.types import BudgetForcing
    from features.answers import normalize_answer

    if not questions:
        return []
    if graders is not None and len(graders) != len(questions):
        raise ConfigError("record_questions needs one grader per question")
    thinking_end = gen.traits.thinking_end if graders is None else None
    forced = thinking_end is not None and extension_chunks > 0
    if seed is not None:
        gen.reset(seed)
    budget = BudgetForcing(min_tokens=max_tokens, max_tokens=max_tokens) if forced else None
    room = live_chains if live_chains > 0 else chains * len(questions)
    waiting = deque(range(len(questions)))
    recs: dict[int, _ChainRecord] = {}
    owner: dict[int, int] = {}  # chain id -> position of its question in `questions`
    own: list[list[int]] = [[] for _ in questions]  # each question's chain ids, in order
    running = [0] * len(questions)  # each question's chains not done yet
    answers: dict[int, str | None] = {}  # at each chain's own end
    executions: list[dict[int, Any]] = [{} for _ in questions]  # code: chain index -> result
    extending: dict[int, int] = {}  # chain id -> budget-forced chunks still to record
    out: list[dict[str, Any]] = [{} for _ in questions]
    active: list[Chain] = []

    def admit() -> None:
        # The next questions' chains join the batch while there is room for all of a question's
        # (the first always does), in the order given: the batch stays full on an engine that
        # samples more tokens a second in a larger one.
        while waiting and (not active or len(active) + chains <= room):
            qi = waiting.popleft()
            for i, c in enumerate(gen.start(questions[qi], chains, mode=mode, budget=budget)):
                recs[c.chain_id] = _ChainRecord(c, i)
                owner[c.chain_id] = qi
                own[qi].append(c.chain_id)
                active.append(c)
            running[qi] = chains

    def thought_to_end(c: Chain) -> bool:
        # a suppressed end of thinking: the chain's own end, which the budget keeps open
        return forced and not c.finished and c.chunks[-1].finish_reason == "stop"

    def step(batch: list[Chain]) -> None:
        starts = {c.chain_id: c.num_tokens for c in batch}
        chunks = gen.extend(batch, chunk_tokens)
        if len(chunks) != len(batch):
            raise ConfigError("generator returned a different number of chunks than chains")
        probes: Sequence[ProbeResult | None]
        judges: Sequence[JudgeResult | None]
        if graders is not None:
            probes, judges = _executed([graders[owner[c.chain_id]] for c in batch], batch)
        else:
            probes = gen.probe(batch, max_tokens=probe_tokens)
            judges = gen.judge(batch) if judge else [None] * len(batch)
        for c, ch, pr, jd in zip(batch, chunks, probes, judges, strict=True):
            rec = recs[c.chain_id]
            ext = c.chain_id in extending
            row = _chunk_row(c, rec.index, len(rec.rows), starts[c.chain_id], ch, ext)
            _boundary(row, pr, jd, questions[owner[c.chain_id]])
            rec.rows.append(row)

    def settle(c: Chain) -> bool:
        """Read the answer of a chain that reached its own end (or the cap); reopen it for the
        budget-forced extension when it ended before the cap. Whether it goes on."""
        cid, qi = c.chain_id, owner[c.chain_id]
        rec = recs[cid]
        if graders is not None:
            executions[qi][rec.index] = graders[qi].grade(rec.index, c.text)
            answers[cid] = executions[qi][rec.index].answer
        elif ended_in_thinking(c.text, thinking_end):
            answers[cid] = rec.rows[-1]["probe_answer"]  # (normalised) closing the section
        else:
            answers[cid] = normalize_answer(text_reader(questions[qi])(c.text))
        ended = thought_to_end(c) if forced else c.finish_reason == "stop"
        if extension_chunks > 0 and ended and c.num_tokens < max_tokens:
            target = c.num_tokens + extension_chunks * chunk_tokens
            c.budget = BudgetForcing(
                min_tokens=target, max_tokens=max(target, max_tokens) + chunk_tokens
            )
            c.finished = False
            extending[cid] = extension_chunks
            return True
        return False

    def done(c: Chain) -> None:
        qi = owner[c.chain_id]
        running[qi] -= 1
        if running[qi] == 0:
            out[qi] = _question_columns(
                questions[qi],
                [recs[cid] for cid in own[qi]],
                [answers[cid] for cid in own[qi]],
                [executions[qi][i] for i in range(chains)] if graders is not None else None,
            )
            if on_done is not None:
                on_done(qi, out[qi])

    admit()
    while active:
        step(active)
        going: list[Chain] = []
        for c in active:
            cid = c.chain_id
            if cid in extending:
                extending[cid] -= 1
                more = not c.finished and extending[cid] > 0
            else:
                more = (not c.finished and not thought_to_end(c)) or settle(c)
            if more:
                going.append(c)
            else:
                done(c)
        active[:] = going
        admit()
    return out


def _question_columns(
    question: Question,
    recs: Sequence[_ChainRecord],
    answers: Sequence[str | None],
    executions: Sequence[Any] | None,
) -> dict[str, Any]:
    """One recorded question's chunk rows as columns: its chains in order, each row with its
    chain's final answer and whether it is right (for code, judged by execution; the chains'
    results go into the file's metadata)."""
    coded = executions is not None
    accepted: Any = None
    if executions is not None:
        from env.code.grade import accepted_answers

        accepted = accepted_answers(list(executions))
    cols: dict[str, Any] = {}
    for rec, ans in zip(recs, answers, strict=True):
        ok = question.is_right(ans) if not coded else answer_correct(ans, None, accepted)
        for row in rec.rows:
            row["answer"] = ans
            row["correct"] = ok
            if coded:  # (a code probe's class is judged once all are graded)
                row["probe_correct"] = answer_correct(row["probe_answer"], None, accepted)
            for k, v in row.items():
                cols.setdefault(k, []).append(v)
    if executions is not None:
        blob = {"accepted": list(accepted), "chains": [e.as_json() for e in executions]}
        cols[METADATA_ROWS] = {EXECUTION_KEY: json.dumps(blob, separators=(",", ":")).encode()}
    return cols


def _executed(
    graders: Sequence[CodeGrader], chains: Sequence[Chain]
) -> tuple[list[ProbeResult | None], list[JudgeResult | None]]:
    """A code boundary's probe and verify readings: each chain's code so far, run by its
    question's grader (``graders[i]`` for ``chains[i]``)."""
    probes: list[ProbeResult | None] = []
    judges: list[JudgeResult | None] = []
    for grader, c in zip(graders, chains, strict=True):
        answer, score = grader.read(c.text, ended=c.finished)
        probes.append(
            ProbeResult(c.chain_id, c.num_tokens, "", answer, np.zeros(0, np.float32), TokenUsage())
        )
        judges.append(JudgeResult(c.chain_id, c.num_tokens, score, TokenUsage()))
    return probes, judges


def record_as(gen: Generator, question: Question, manifest: BankManifest) -> dict[str, list[Any]]:
    """Record ``question`` as the bank of ``manifest`` records it (``ponder record``): with its
    settings and the question's seed (:func:`question_seed`)."""
    (cols,) = record_group_as(gen, [question], manifest)
    return cols


def group_seed(seed: int, questions: Sequence[Question]) -> int:
    """The sampler seed of questions recorded side by side: :func:`question_seed` of the one
    question alone, and of the group's ids joined (``a|b|c``) for several."""
    return question_seed(seed, "|".join(q.qid for q in questions))


def record_group_as(
    gen: Generator,
    questions: Sequence[Question],
    manifest: BankManifest,
    *,
    at_once: int = 0,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, list[Any]]]:
    """Record ``questions`` side by side (:func:`record_questions`) as the bank of ``manifest``
    records them, from their group's seed (:func:`group_seed`); each question's columns carry
    the group in its file metadata (:data:`SAMPLING_KEY`) when it has more than one question.

    ``at_once`` (0: all) bounds the questions whose chains share the batch: with fewer than the
    group, the next question starts as soon as there is room for its chains, and the note says
    so (``"at_once"``). ``on_done(i, columns)`` receives each question as it ends."""
    seed = group_seed(manifest.seed, questions)
    coded = manifest.dataset in CODE_DATASETS
    rolling = 0 < at_once < len(questions)
    note: bytes | None = None
    if len(questions) > 1:
        sampling: dict[str, Any] = {"seed": seed, "group": [q.qid for q in questions]}
        if rolling:
            sampling["at_once"] = at_once
        note = json.dumps(sampling).encode()

    def noted(i: int, cols: dict[str, Any]) -> None:
        if note is not None:
            cols[METADATA_ROWS] = {**cols.get(METADATA_ROWS, {}), SAMPLING_KEY: note}
        if on_done is not None:
            on_done(i, cols)

    return record_questions(
        gen,
        questions,
        chains=manifest.chains,
        chunk_tokens=manifest.chunk_tokens,
        max_tokens=manifest.max_tokens,
        extension_chunks=manifest.extension_chunks,
        probe_tokens=manifest.probe_tokens,
        judge=manifest.judge,
        mode=cast(PromptMode, manifest.mode),
        seed=seed,
        graders=[code_grader(q) for q in questions] if coded else None,
        live_chains=at_once * manifest.chains if rolling else 0,
        on_done=noted,
    )


def code_grader(question: Question) -> CodeGrader:
    """The execution grader of a code question (its task's visible calls and hidden tests)."""
    from env.code.grade import grader_for

    return grader_for(question.qid)
