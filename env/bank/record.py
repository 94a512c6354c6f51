"""``ponder record``: sample K chains per question once, with probes and verifier scores, into a bank.

For each question the recorder samples ``chains`` independent chains in chunks of
``chunk_tokens`` tokens up to ``max_tokens``. At every chunk boundary it records an answer-forcing
probe and the generative self-verifier's P(yes). A chain that ends before the cap also gets a
budget-forced extension (``Wait,`` appended, ``extension_chunks`` more chunks with their probes), so
that replay can serve "continue" past a chain's natural end (s1-style serial scaling).

Recording is resumable and exact: questions already in the bank are skipped, each question is
written atomically, and before each question the engine's prefix cache is cleared and its sampler
reseeded from ``seed`` and the question id. With the in-process vLLM generator an interrupted and
resumed recording therefore equals an uninterrupted one. ``--model X.gguf`` records with llama.cpp
instead (about twice vLLM's speed on a CPU; seeded per request, see :mod:`env.bank.schema`).
``--questions-at-once N`` records N consecutive questions side by side, their chains in one engine
batch (faster on an engine whose throughput grows with the batch, as vLLM's does on a CPU); the
group is reseeded once from its questions' ids and noted in each file (:func:`groups_of`,
:func:`record_group_as`), so resuming is exact as well. ``--group-size G`` (G > N) keeps the batch
full: a group of G questions, N of them at once, the next starting as soon as a question ends.
One recorder at a time: a run holds the folder's :class:`~env.bank.lock.BankLock` throughout, and
a second one on the same folder is refused with the first one named.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from env.bank.identity import model_sha256
from env.bank.lock import BankLock
from env.bank.manifest import BankManifest
from env.bank.schema import EXECUTION_KEY, METADATA_ROWS, SAMPLING_KEY, answer_correct
from env.bank.writer import BankWriter
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
    "RecordArgs",
    "bank_manifest",
    "describe_generator",
    "make_generator",
    "questions_of",
    "record",
    "record_as",
    "record_group_as",
    "record_questions",
    "group_seed",
    "groups_of",
    "group_size",
    "question_seed",
    "CODE_DATASETS",
    "code_grader",
]


log = logging.getLogger(__name__)


@dataclass
class RecordArgs:
    """Record a trace bank: K chains per question with probes and verifier scores."""

    out: Path
    """bank folder to create or resume"""
    model: str = ""
    """model folder for the in-process vLLM engine (default: the testbed model), or a `.gguf` file
    for the in-process llama.cpp engine (about twice as fast on a CPU); `fake` records from the
    scripted fake generator (for testing the recorder itself)"""
    url: str = ""
    """instead of --model: base URL of a vLLM OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1)"""
    dataset: Literal["arith", "gsm8k", "math500", "humaneval", "factual"] = "arith"
    """question set (humaneval: code, graded by running it, see env.code; its chains are read and run at every boundary instead of probed and judged by the model)"""
    splits: tuple[str, ...] = ("test",)
    """splits to draw from; several are interleaved so a partial bank stays balanced"""
    n: int = 16
    """questions per split (for arith: rounded up to a multiple of 8 levels)"""
    split_n: tuple[str, ...] = ()
    """per-split counts that override --n, as SPLIT=N (e.g. train=400 test=200); the splits stay interleaved, so raising one split's count of gsm8k or math500 appends its questions after the ones recorded (a recorded bank grows by resuming; arith's draws are stratified by level, so a larger arith draw reorders and is refused)"""
    question_seed: int = 0
    """seed of the question subset"""
    template: str = ""
    """prompt template: testbed, chat, code, factual, reasoning or testbed-reasoning (default: chat if the model has a chat template; a template with a thinking section is recorded s1-style: the README, "Reasoning models")"""
    mode: Literal["cot", "draft"] = "cot"
    """prompt mode"""
    chains: int = 16
    """chains per question (K)"""
    chunk_tokens: int = 64
    """tokens per chunk (T)"""
    max_tokens: int = 512
    """token cap per chain"""
    temperature: float = 0.7
    """sampling temperature"""
    top_p: float = 1.0
    """nucleus sampling mass"""
    top_logprobs: int = 5
    """top log-probabilities kept per token for the confidence statistics"""
    extension_chunks: int = 2
    """budget-forced chunks recorded after a chain's natural end (0: none)"""
    probe_tokens: int = 16
    """tokens a probe may read"""
    judge: bool = True
    """record the self-verifier's P(yes) at every boundary"""
    seed: int = 0
    """recording seed"""
    limit_minutes: float = 0.0
    """stop after the question (or group: --questions-at-once, --group-size) in progress once this many minutes have passed (0: no limit)"""
    kv_cache_gib: float = 2.0
    """vLLM CPU KV cache size"""
    dtype: str = ""
    """vLLM weight dtype (auto, bfloat16, float32; default: float32 on CPU, auto on GPU)"""
    max_model_len: int = 0
    """context length per chain (0: the model's own, capped at 4096 for vLLM, 2048 for llama.cpp)"""
    slots: int = 0
    """llama.cpp parallel slots (0: one per chain of the questions recorded at once)"""
    threads: int = 0
    """llama.cpp CPU threads (0: all cores)"""
    questions_at_once: int = 1
    """questions whose chains share the engine's batch (vLLM on a CPU samples more tokens a second in a larger batch, and one question's last long chains share their steps with the others'); with a larger --group-size the next question of the group starts as soon as there is room for its chains, so the batch stays full; 1: each question alone, from its own seed"""
    group_size: int = 0
    """questions sampled from one seed (0: --questions-at-once): groups of this many consecutive questions of the bank's order, from a seed drawn from their ids and noted in each file (`ponder.sampling`), so that a resumed run records the same groups and chains; an interrupted group is recorded whole again and only its missing files written"""
    fake_token_ms: float = 0.0
    """--model fake only: milliseconds per generated token, standing in for an engine's speed (benchmarks, tests)"""
    ray: str = ""
    """record on a Ray cluster (pip install -e '.[ray]'): `local` starts one on this machine, `auto` joins the one running here, `ray://HOST:10001` a remote one; questions are spread over --ray-workers actors, each with its own generator, and the driver writes each question's file once (empty: no Ray)"""
    ray_workers: int = 2
    """Ray actors recording side by side (each takes one CPU, or --ray-gpus)"""
    ray_gpus: float = 0.0
    """GPUs each Ray actor takes (an in-process vLLM engine per GPU)"""


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
        import json

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
    import json

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


def group_size(args: RecordArgs) -> int:
    """The questions ``args`` samples from one seed: ``--group-size``, or ``--questions-at-once``."""
    return args.group_size or args.questions_at_once


def groups_of(n_questions: int, size: int, done: Callable[[int], bool]) -> list[list[int]]:
    """The groups ``ponder record --questions-at-once size`` records, as question positions:
    consecutive runs of ``size`` in the bank's order (the last may be shorter), those with a
    question still to record. A group is fixed by position, not by what is left, so a resumed
    run records the same groups (with the same seeds) as an uninterrupted one; a group of which
    some files exist (written before an interruption, or alone before the size was raised) is
    recorded whole again and only its missing files are written."""
    if size < 1:
        raise ConfigError(f"--questions-at-once must be at least 1, got {size}")
    out = []
    for lo in range(0, n_questions, size):
        group = list(range(lo, min(lo + size, n_questions)))
        if not all(done(i) for i in group):
            out.append(group)
    return out


def code_grader(question: Question) -> CodeGrader:
    """The execution grader of a code question (its task's visible calls and hidden tests)."""
    from env.code.grade import grader_for

    return grader_for(question.qid)


def _chat_template(args: RecordArgs) -> str:
    """The chat template a data set's questions are asked with by default."""
    if args.dataset in CODE_DATASETS:
        return "code"
    return "factual" if args.dataset == "factual" else "chat"


def make_generator(args: RecordArgs):  # type: ignore[no-untyped-def]
    from env.types import SamplingConfig

    sampling = SamplingConfig(
        temperature=args.temperature,
        top_p=args.top_p,
        top_logprobs=args.top_logprobs,
        max_chain_tokens=args.max_tokens,
    )
    if args.model == "fake":
        from env.generators.fake import FakeGenerator

        extra: dict[str, Any] = {}
        if args.dataset in CODE_DATASETS:  # it writes each task's reference solution
            from env.code.reference import reference_script

            extra = {"script": reference_script(), "template": "code", "chat": True}
        elif args.template:
            extra = {"template": args.template}
        fake = FakeGenerator(
            sampling=sampling, seed=args.seed, token_delay_s=args.fake_token_ms / 1000, **extra
        )
        return fake, {
            "name": "fake",
            "path": "",
            "sha256": "fake",
        }
    if args.url:
        from env.generators.openai import OpenAIGenerator

        gen = OpenAIGenerator(
            args.url, template=args.template or _chat_template(args), sampling=sampling
        )
        return gen, {"name": gen.model_name, "path": args.url, "sha256": ""}
    if args.model.endswith(".gguf"):
        return _make_llamacpp(args, sampling)
    from env.generators.vllm import VLLMGenerator, build_engine
    from env.models.testbed.model import testbed_model_path

    path = Path(args.model) if args.model else testbed_model_path()
    sha = model_sha256(path)
    max_len = args.max_model_len
    if max_len <= 0:
        import json as _json

        cfg = (
            _json.loads((path / "config.json").read_text())
            if (path / "config.json").exists()
            else {}
        )
        max_len = min(4096, int(cfg.get("max_position_embeddings", 2048)))
    llm = build_engine(
        path,
        seed=args.seed,
        kv_cache_gib=args.kv_cache_gib,
        dtype=args.dtype or None,
        max_model_len=max_len,
    )
    template = args.template
    if not template:
        has_chat = getattr(llm.get_tokenizer(), "chat_template", None)
        template = _chat_template(args) if has_chat else "testbed"
    vgen = VLLMGenerator(llm, template=template, sampling=sampling)
    name = path.name
    meta = path / "ponder_model.json"
    if meta.exists():
        import json

        name = json.loads(meta.read_text()).get("name", name)
    # The weights' precision decides the chains as much as the weights do: a bank records it,
    # and a resume in another precision is refused (BankManifest.compatible).
    dtype = str(llm.model_config.dtype).removeprefix("torch.")
    return vgen, {"name": name, "path": str(path), "sha256": sha, "engine": "vllm", "dtype": dtype}


def _make_llamacpp(args: RecordArgs, sampling: Any):  # type: ignore[no-untyped-def]
    import json

    from env.generators.llamacpp import LlamaCppGenerator, find_tokenizer_folder

    path = Path(args.model)
    if not path.is_file():
        raise ConfigError(f"no GGUF file at {str(path)!r}")
    gen = LlamaCppGenerator(
        path,
        template=args.template or _chat_template(args),
        sampling=sampling,
        slots=args.slots or args.chains * max(1, args.questions_at_once),
        context=args.max_model_len or 2048,
        threads=args.threads,
        seed=args.seed,
    )
    name = path.stem
    folder = find_tokenizer_folder(path)
    if folder is not None and (folder / "ponder_model.json").exists():
        name = json.loads((folder / "ponder_model.json").read_text()).get("name", name)
    return gen, {
        "name": name,
        "path": str(path),
        "sha256": model_sha256(path),
        "engine": "llama.cpp",
    }


def split_counts(splits: Sequence[str], n: int, split_n: Sequence[str]) -> dict[str, int]:
    """Questions to draw per split: ``n`` for each, overridden by ``SPLIT=N`` entries.

    Raises:
        ConfigError: an entry that is not ``SPLIT=N`` with a positive N, or names a split not in
            ``splits``.
    """
    out = {s: int(n) for s in splits}
    for item in split_n:
        name, sep, value = str(item).partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(
                f"--split-n takes SPLIT=N with a positive N (e.g. train=400), got {item!r}"
            )
        if name not in out:
            raise ConfigError(
                f"--split-n names split {name!r}, which --splits ({' '.join(splits)}) does not draw"
            )
        out[name] = int(value)
    return out


def questions_of(args: RecordArgs) -> list[Question]:
    from env.questions import load_questions

    counts = split_counts(args.splits, args.n, args.split_n)
    per_split = [
        load_questions(args.dataset, s, counts[s], seed=args.question_seed) for s in args.splits
    ]
    out: list[Question] = []
    for i in range(max(len(p) for p in per_split)):
        out.extend(p[i] for p in per_split if i < len(p))
    return out


def record(args: RecordArgs, stats: dict[str, float] | None = None) -> Path:
    """Create or resume the bank at ``args.out``, holding its :class:`BankLock` throughout (a
    second recorder of the same folder is refused with the first one named). On Ray,
    ``stats`` receives where the driver's time went (:func:`env.bank.ray_record.record_on_ray`)."""
    if args.chains < 1 or args.chunk_tokens < 1 or args.max_tokens < args.chunk_tokens:
        raise ConfigError("need chains >= 1, chunk_tokens >= 1 and max_tokens >= chunk_tokens")
    if args.ray_workers < 1 or args.ray_gpus < 0:
        raise ConfigError("need --ray-workers >= 1 and --ray-gpus >= 0")
    if args.questions_at_once < 1:
        raise ConfigError(
            f"--questions-at-once must be at least 1 (1: each question alone), "
            f"got {args.questions_at_once}"
        )
    if args.group_size < 0:
        raise ConfigError(
            f"--group-size must be 0 (the same as --questions-at-once) or more, got {args.group_size}"
        )
    if args.ray:
        from env.ray_cluster import check_ray

        check_ray(args.ray)  # (Ray installed, the address well-formed: before the lock)
    with BankLock(args.out, "ponder record"):
        if args.ray:
            from env.bank.ray_record import record_on_ray

            return record_on_ray(args, stats)
        return _record(args)


def describe_generator(gen: Generator, args: RecordArgs) -> tuple[str, dict[str, str]]:
    """``(template name, prompt texts)`` of ``gen`` for the bank manifest."""
    tmpl = getattr(gen, "template", None)
    template = getattr(tmpl, "name", args.template)
    prompts = tmpl.prompt_texts() if tmpl is not None and hasattr(tmpl, "prompt_texts") else {}
    return str(template), dict(prompts)


def bank_manifest(
    args: RecordArgs,
    questions: Sequence[Question],
    model: dict[str, Any],
    template: str,
    prompts: dict[str, str],
) -> BankManifest:
    """The manifest ``ponder record`` writes for ``args`` (recorded by ``model``)."""
    return BankManifest(
        model=model,
        dataset=args.dataset,
        questions=[q.qid for q in questions],
        template=template,
        mode=args.mode,
        sampling={
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_logprobs": args.top_logprobs,
        },
        chains=args.chains,
        chunk_tokens=args.chunk_tokens,
        max_tokens=args.max_tokens,
        extension_chunks=args.extension_chunks,
        probe_tokens=args.probe_tokens,
        judge=args.judge,
        seed=args.seed,
        prompts=prompts,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _record(args: RecordArgs) -> Path:
    from tqdm import tqdm

    questions = questions_of(args)
    gen, model = make_generator(args)
    manifest = bank_manifest(args, questions, model, *describe_generator(gen, args))
    writer = BankWriter(args.out, manifest, questions)
    todo = [i for i in range(len(questions)) if not writer.done(i)]
    t0 = time.time()
    tokens = 0
    bar = tqdm(
        total=len(questions),
        initial=len(questions) - len(todo),
        desc=f"record {args.out}",
        unit="q",
    )
    for group in groups_of(len(questions), group_size(args), writer.done):

        def write(j: int, cols: dict[str, Any], group: list[int] = group) -> None:
            nonlocal tokens
            i = group[j]
            tokens += int(sum(cols["n_tokens"])) + int(sum(cols["probe_tokens"]))
            if not writer.done(i):  # (written before: only the group's missing files are written)
                writer.write(i, cols)
                bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / max(1e-9, time.time() - t0):.1f}")

        record_group_as(
            gen,
            [questions[i] for i in group],
            manifest,
            at_once=args.questions_at_once,
            on_done=write,
        )
        if args.limit_minutes > 0 and time.time() - t0 > args.limit_minutes * 60:
            log.warning(
                "time limit reached after %d questions; rerun the same command to resume", bar.n
            )
            break
    bar.close()
    return Path(args.out)


def main(argv: list[str] | None = None) -> None:
    import tyro

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = tyro.cli(RecordArgs, args=argv, prog="ponder record")
    path = record(args)
    from env.bank.store import TraceBank

    bank = TraceBank(path)
    print(f"bank {path}: {len(bank)} of {len(bank.manifest.questions)} questions recorded")


if __name__ == "__main__":
    main()
