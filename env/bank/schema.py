"""Trace banks' on-disk format: many chains per question recorded once, replayed exactly.

A bank is a folder::

    manifest.json            what was recorded and how (schema below), written first
    questions.parquet        the questions (id, text, gold answer, data set, difficulty)
    chunks/00000.parquet     one file per recorded question: every chunk of every chain
    chunks/00001.parquet     ...

Each question's file is written whole and atomically (temporary file, fsync, rename), so killing
the recorder at any moment loses at most the question in progress and never leaves a partial file
under its final name. With the in-process vLLM engine, recording is deterministic per question
(the engine's prefix cache is cleared and its sampler reseeded from the bank seed and the question
id before each question), so an interrupted and resumed recording equals an uninterrupted one.
With llama.cpp (the fast engine on a CPU) every request is seeded the same way, but llama.cpp
batches concurrent chains by thread timing, so a re-recorded question agrees in distribution and
usually token for token, not bit for bit; a question once written is never rewritten.

Schema version 1, one row per chunk (columns of ``chunks/*.parquet``):

=================  ==============  =============================================================
column             type            meaning
=================  ==============  =============================================================
qid                string          question id
chain              int16           chain index within the question, 0..K-1
chunk              int16           chunk index within the chain (extension chunks continue it)
ext                bool            a budget-forced extension chunk (after ``Wait,`` past the
                                   chain's natural end); main-chain chunks are ``False``
start              int32           generated tokens in the chain before this chunk
n_tokens           int16           tokens in the chunk (injected ones included)
n_injected         int16           leading tokens ponder appended (``Wait,``, answer suffix)
text               string          the chunk's text
finish_reason      string          ``length`` / ``stop`` / ``forced`` / ``cap``
token_ids          list<int32>     token ids
logprob            list<float16>   log-probability of each sampled token (nan when injected)
confidence         list<float16>   per-token -mean top-k log-probability (DeepConf)
entropy            list<float16>   per-token entropy over the renormalised top-k
top1_logprob       list<float16>   per-token top-1 log-probability
prefill            int32           prompt tokens computed for the chunk
cached             int32           prompt tokens served from the prefix cache
probe_text         string          probe completion at the chunk's end boundary
probe_answer       string?         normalised probe answer (null if none)
probe_correct      bool            probe answer equals gold
probe_tokens       int16           tokens sampled by the probe
probe_prefill      int32           probe prompt tokens computed
probe_cached       int32           probe prompt tokens cached
judge_p_yes        float32         self-verifier P(yes) at the boundary (nan if not recorded)
judge_prefill      int32           verifier prompt tokens computed
judge_cached       int32           verifier prompt tokens cached
answer             string?         the chain's final answer, normalised (same on every row)
correct            bool            the chain's final answer equals gold (same on every row)
=================  ==============  =============================================================

``manifest.json`` (schema version 1): ``schema_version``, ``ponder_version``, ``created``,
``model`` (``name``, ``path``, ``sha256``, ``engine``: ``vllm`` or ``llama.cpp``), ``dataset``,
``questions`` (ids in recording order), ``template``, ``prompts`` (the template's exact wording:
system, question, probe suffix, wait text, verifier question), ``mode``, ``sampling``
(temperature, top_p, top_logprobs), ``chains``, ``chunk_tokens``, ``max_tokens``,
``extension_chunks``, ``probe_tokens``, ``judge``, ``seed``, ``bank_id``, ``fingerprint``.

Identity. A bank carries ``bank_id`` (random, made when the bank is created) and ``fingerprint``
(sha256 over the recording settings: model sha256 and engine, data set, template, prompt wording,
mode, sampling, chains, chunk tokens, token cap, extension chunks, probe tokens, judge, seed) in
its manifest, and every chunk file repeats both in its Parquet key-value metadata
(``ponder.bank_id``, ``ponder.fingerprint``) beside ``ponder.question_sha256`` (sha256 of the
question's id, text and gold answer). Reading a file checks all three against the manifest and
``questions.parquet``, so a chunk file copied in from another bank whose question ids collide
(``arith/train/L1/0`` is in every arith bank, whatever its question seed or model) is refused
with the file named. The question list is not in the fingerprint, since a bank grows by appending
questions; each file is bound to its own question instead, and chunk files beyond the manifest's
list are refused. Banks from before identities (no ``bank_id`` in the manifest) are read as
before; :func:`~env.bank.maintain.stamp` (``ponder bank stamp PATH``) gives one its identity.

Code questions (:mod:`env.code`) add one more key to their chunk file's metadata,
``ponder.execution`` (:data:`EXECUTION_KEY`): JSON with ``accepted`` (the behaviour classes
judged right) and ``chains`` (each chain's answer, visible outputs and pass share, hidden-test
verdict and detail, program sha256), written in the same atomic file as the chunks; reading
puts ``accepted`` on the question (:attr:`env.types.Question.accepted`).

Questions recorded side by side (``ponder record --questions-at-once N``) add
``ponder.sampling`` (:data:`SAMPLING_KEY`): JSON ``{"seed": S, "group": [qid, ...]}``, the
questions whose chains shared the engine's batch and the sampler seed they were drawn from
(:func:`env.bank.sampler.group_seed`), with ``"at_once": N`` when the group was larger than N
(``--group-size``: N of its questions in the batch at once, each next one starting as room frees). A file without it was sampled alone, from
:func:`env.bank.sampler.question_seed` of the bank's seed and its question id.

Writers take the bank's lock (:class:`env.bank.lock.BankLock`): ``ponder record`` for its whole
run, :func:`~env.bank.maintain.compact` and :func:`~env.bank.maintain.stamp` too.

The modules that implement it: :mod:`env.bank.schema` (this format: the chunk schema, the
metadata keys, the ``correct`` rule), :mod:`env.bank.manifest` (``manifest.json``),
:mod:`env.bank.identity` (model, question and bank identities and their checks),
:mod:`env.bank.writer` (atomic writes, :class:`~env.bank.writer.BankWriter`) and
:mod:`env.bank.store` (the reader, :class:`~env.bank.store.TraceBank`).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "SCHEMA_VERSION",
    "CHUNK_SCHEMA",
    "BANK_ID_KEY",
    "FINGERPRINT_KEY",
    "QUESTION_KEY",
    "EXECUTION_KEY",
    "SAMPLING_KEY",
    "METADATA_ROWS",
    "answer_correct",
]

SCHEMA_VERSION = 1

# Keys of a chunk file's Parquet key-value metadata that bind it to its bank and question.
BANK_ID_KEY = b"ponder.bank_id"
FINGERPRINT_KEY = b"ponder.fingerprint"
QUESTION_KEY = b"ponder.question_sha256"
#: Key of a code question's execution results in its chunk file (JSON: ``accepted``, the
#: behaviour classes judged right, and ``chains``, each chain's
#: :class:`env.code.grade.ChainExecution`).
EXECUTION_KEY = b"ponder.execution"
#: Key of the group a question was sampled with and its seed (JSON ``{"seed", "group"}``),
#: written only for questions recorded side by side.
SAMPLING_KEY = b"ponder.sampling"
#: The entry of a question's recorded rows that carries extra file metadata (see
#: :meth:`env.bank.writer.BankWriter.write`).
METADATA_ROWS = "_metadata"


def _schema():  # type: ignore[no-untyped-def]
    import pyarrow as pa

    f16 = pa.list_(pa.float16())
    return pa.schema(
        [
            ("qid", pa.string()),
            ("chain", pa.int16()),
            ("chunk", pa.int16()),
            ("ext", pa.bool_()),
            ("start", pa.int32()),
            ("n_tokens", pa.int16()),
            ("n_injected", pa.int16()),
            ("text", pa.string()),
            ("finish_reason", pa.string()),
            ("token_ids", pa.list_(pa.int32())),
            ("logprob", f16),
            ("confidence", f16),
            ("entropy", f16),
            ("top1_logprob", f16),
            ("prefill", pa.int32()),
            ("cached", pa.int32()),
            ("probe_text", pa.string()),
            ("probe_answer", pa.string()),
            ("probe_correct", pa.bool_()),
            ("probe_tokens", pa.int16()),
            ("probe_prefill", pa.int32()),
            ("probe_cached", pa.int32()),
            ("judge_p_yes", pa.float32()),
            ("judge_prefill", pa.int32()),
            ("judge_cached", pa.int32()),
            ("answer", pa.string()),
            ("correct", pa.bool_()),
        ]
    )


CHUNK_SCHEMA = _schema()


def answer_correct(
    answer: str | None, gold: str | None, accepted: Sequence[str] | None = None
) -> bool:
    """Whether a chain's final answer is right: the rule the recorder stores in ``correct`` and
    the evaluator applies (:func:`features.answers.judged_correct`: equality with the gold
    answer, or membership in a code question's ``accepted`` classes)."""
    from features.answers import judged_correct

    return judged_correct(answer, gold, accepted)
