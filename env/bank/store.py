"""Trace banks: many chains per question recorded once, replayed exactly.

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
before; :func:`stamp` (``ponder bank stamp PATH``) gives one its identity.

Code questions (:mod:`env.code`) add one more key to their chunk file's metadata,
``ponder.execution`` (:data:`EXECUTION_KEY`): JSON with ``accepted`` (the behaviour classes
judged right) and ``chains`` (each chain's answer, visible outputs and pass share, hidden-test
verdict and detail, program sha256), written in the same atomic file as the chunks; reading
puts ``accepted`` on the question (:attr:`env.types.Question.accepted`).

Writers take the bank's lock (:class:`env.bank.lock.BankLock`): ``ponder record`` for its whole
run, :func:`compact` and :func:`stamp` too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from env.types import Question
from features.errors import BankError

__all__ = [
    "SCHEMA_VERSION",
    "BankManifest",
    "ChainTrace",
    "QuestionTrace",
    "TraceBank",
    "BankWriter",
    "CHUNK_SCHEMA",
    "answer_correct",
    "question_sha256",
    "encode_chunk_table",
    "model_sha256",
    "atomic_write_bytes",
    "BANK_ID_KEY",
    "FINGERPRINT_KEY",
    "QUESTION_KEY",
    "EXECUTION_KEY",
    "METADATA_ROWS",
    "chunk_identity",
    "check_qids",
    "check_identity",
    "read_chunk_table",
    "read_question_file",
]

SCHEMA_VERSION = 1
_PONDER_VERSION = "0.1.0"

log = logging.getLogger(__name__)

# Keys of a chunk file's Parquet key-value metadata that bind it to its bank and question.
BANK_ID_KEY = b"ponder.bank_id"
FINGERPRINT_KEY = b"ponder.fingerprint"
QUESTION_KEY = b"ponder.question_sha256"
#: Key of a code question's execution results in its chunk file (JSON: ``accepted``, the
#: behaviour classes judged right, and ``chains``, each chain's
#: :class:`env.code.grade.ChainExecution`).
EXECUTION_KEY = b"ponder.execution"
#: The entry of a question's recorded rows that carries extra file metadata (see
#: :meth:`BankWriter.write`).
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
#: Columns every chunk row has (the others are empty where a chunk had no probe, judge or answer).
_REQUIRED_COLUMNS = (
    "qid",
    "chain",
    "chunk",
    "ext",
    "start",
    "n_tokens",
    "n_injected",
    "text",
    "finish_reason",
    "token_ids",
    "logprob",
    "prefill",
    "cached",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _mapping_of(check: Any) -> Any:
    return lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and check(x) for k, x in v.items())
    )


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


#: What each manifest field holds, and in words (a hand-edited manifest is refused by name).
_MANIFEST_TYPES: dict[str, tuple[Any, str]] = {
    "model": (_mapping_of(_is_str), "an object of strings"),
    "dataset": (_is_str, "a string"),
    "questions": (lambda v: isinstance(v, list) and all(map(_is_str, v)), "a list of ids"),
    "template": (_is_str, "a string"),
    "mode": (_is_str, "a string"),
    "sampling": (_mapping_of(_is_number), "an object of numbers"),
    "chains": (_is_int, "an integer"),
    "chunk_tokens": (_is_int, "an integer"),
    "max_tokens": (_is_int, "an integer"),
    "extension_chunks": (_is_int, "an integer"),
    "probe_tokens": (_is_int, "an integer"),
    "judge": (lambda v: isinstance(v, bool), "true or false"),
    "seed": (_is_int, "an integer"),
    "prompts": (_mapping_of(_is_str), "an object of strings"),
    "schema_version": (_is_int, "an integer"),
    "ponder_version": (_is_str, "a string"),
    "created": (_is_str, "a string"),
    "bank_id": (_is_str, "a string"),
    "fingerprint": (_is_str, "a string"),
}


def _check_manifest_types(path: Path, raw: dict[str, Any]) -> None:
    for name, (ok, what) in _MANIFEST_TYPES.items():
        if name in raw and not ok(raw[name]):
            raise BankError(
                f"{path}: {name} must be {what}, got {str(raw[name])[:80]!r}: the manifest is "
                "damaged; restore it from version control or re-record"
            )


@dataclass(frozen=True)
class BankManifest:
    """What a bank holds and how it was recorded (``manifest.json``)."""

    model: dict[str, str]
    dataset: str
    questions: list[str]
    template: str
    mode: str
    sampling: dict[str, float]
    chains: int
    chunk_tokens: int
    max_tokens: int
    extension_chunks: int
    probe_tokens: int
    judge: bool
    seed: int
    prompts: dict[str, str] = field(default_factory=dict)
    """The template's wording (system, question, probe, wait and judge texts); empty in banks
    recorded before ponder wrote it."""
    schema_version: int = SCHEMA_VERSION
    ponder_version: str = _PONDER_VERSION
    created: str = ""
    bank_id: str = ""
    """Random, made when the bank is created; every chunk file carries it. Empty in banks
    recorded before ponder wrote it (``ponder bank stamp`` adds it)."""
    fingerprint: str = ""
    """:meth:`settings_fingerprint` when the bank was created; every chunk file carries it."""

    @property
    def thinking_end(self) -> str | None:
        """The marker that closes the recorded model's thinking section (its template's), or
        ``None``: a bank of a model without one."""
        return self.prompts.get("thinking_end") or None

    def settings_fingerprint(self) -> str:
        """sha256 over the settings that decide what the chunks hold (not the question list,
        which grows by appending, nor names, paths and dates)."""
        settings = {
            "model_sha256": self.model.get("sha256", ""),
            "engine": self.model.get("engine", ""),
            "dataset": self.dataset,
            "template": self.template,
            "prompts": self.prompts,
            "mode": self.mode,
            "sampling": self.sampling,
            "chains": self.chains,
            "chunk_tokens": self.chunk_tokens,
            "max_tokens": self.max_tokens,
            "extension_chunks": self.extension_chunks,
            "probe_tokens": self.probe_tokens,
            "judge": self.judge,
            "seed": self.seed,
        }
        blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def identified(self) -> BankManifest:
        """This manifest with a new bank id and its fingerprint (for a bank being created)."""
        return dataclasses.replace(
            self, bank_id=uuid.uuid4().hex, fingerprint=self.settings_fingerprint()
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> BankManifest:
        """Read and validate ``manifest.json``."""
        if not path.exists():
            raise BankError(
                f"{path} is missing: this folder is not a trace bank (record one with `ponder record`)"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # (bad UTF-8 and JSON are ValueErrors)
            raise BankError(
                f"{path} is not valid JSON ({type(e).__name__}: {e}); restore it from version "
                "control or re-record"
            ) from e
        if not isinstance(raw, dict):
            raise BankError(
                f"{path} holds a JSON {type(raw).__name__}, not a manifest object: the manifest "
                "is damaged; restore it from version control or re-record"
            )
        _check_manifest_types(path, raw)
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BankError(
                f"{path} has schema version {version!r}, but this ponder reads version {SCHEMA_VERSION}: "
                "upgrade ponder (or re-record the bank with this version)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {
            "created",
            "ponder_version",
            "schema_version",
            "prompts",
            "bank_id",
            "fingerprint",
        }
        missing = names - set(raw) - optional
        if missing:
            raise BankError(
                f"{path} lacks fields {sorted(missing)}: the manifest is damaged; re-record"
            )
        m = cls(**{k: v for k, v in raw.items() if k in names})
        if bool(m.bank_id) != bool(m.fingerprint):
            raise BankError(
                f"{path} has a bank_id without a fingerprint or the other way round: the manifest "
                "is damaged; restore it from version control"
            )
        if m.fingerprint and m.fingerprint != m.settings_fingerprint():
            raise BankError(
                f"{path} was edited after the bank was recorded: its settings no longer match its "
                f"fingerprint ({m.fingerprint[:12]}, the settings hash to "
                f"{m.settings_fingerprint()[:12]}), so its chunks would be read under settings "
                "they were not recorded with. Restore the manifest from version control"
            )
        return m

    def compatible(self, other: BankManifest) -> list[str]:
        """Fields that differ in ways that make two recordings incompatible."""
        keys = (
            "dataset",
            "template",
            "mode",
            "sampling",
            "chains",
            "chunk_tokens",
            "max_tokens",
            "extension_chunks",
            "probe_tokens",
            "judge",
            "seed",
        )
        diffs = [
            f"{k}: {getattr(self, k)!r} vs {getattr(other, k)!r}"
            for k in keys
            if getattr(self, k) != getattr(other, k)
        ]
        # Banks from before the wording was recorded have none: nothing to compare.
        if self.prompts and other.prompts and self.prompts != other.prompts:
            changed = sorted(
                k
                for k in self.prompts.keys() | other.prompts.keys()
                if self.prompts.get(k) != other.prompts.get(k)
            )
            diffs.append(f"prompt wording differs: {changed}")
        if self.model.get("sha256") != other.model.get("sha256"):
            diffs.append(f"model sha256: {self.model.get('sha256')} vs {other.model.get('sha256')}")
        return diffs


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp file, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def model_sha256(path: str | Path) -> str:
    """A fingerprint of a model: sha256 over its weight and config files (or of a single file).

    For a folder, the hash covers ``config.json`` and every ``*.safetensors`` / ``*.gguf`` /
    ``*.bin`` file (names and contents, in sorted order). A sidecar ``.ponder_sha256.json`` caches
    it by file sizes and modification times.
    """
    p = Path(path)
    if not p.exists():
        raise BankError(f"model {p} does not exist")
    if p.is_file():
        files = [p]
    else:
        files = sorted(
            f
            for f in p.iterdir()
            if f.name == "config.json" or f.suffix in (".safetensors", ".gguf", ".bin")
        )
        if any(f.suffix == ".safetensors" for f in files):
            # A GGUF export beside the weights (models/testbed/testbed.gguf) is another model
            # file, fingerprinted on its own when used; it does not change the folder's.
            files = [f for f in files if f.suffix != ".gguf"]
    if not files:
        raise BankError(f"model folder {p} has no config.json or weight files")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = p / ".ponder_sha256.json" if p.is_dir() else None
    if cache is not None and cache.exists():
        try:
            c = json.loads(cache.read_text())
            if c.get("stamp") == stamp:
                return str(c["sha256"])
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    if cache is not None:
        with contextlib.suppress(OSError):  # a read-only model folder just goes uncached
            cache.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    return digest


def question_sha256(question: Question) -> str:
    """sha256 over a question's id, text and gold answer: binds a chunk file to its question
    (ids alone collide across banks: they do not depend on the question seed)."""
    blob = json.dumps([question.qid, question.text, question.gold], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def answer_correct(
    answer: str | None, gold: str | None, accepted: Sequence[str] | None = None
) -> bool:
    """Whether a chain's final answer is right: the rule the recorder stores in ``correct`` and
    the evaluator applies (:func:`features.answers.judged_correct`: equality with the gold
    answer, or membership in a code question's ``accepted`` classes)."""
    from features.answers import judged_correct

    return judged_correct(answer, gold, accepted)


def chunk_identity(manifest: BankManifest, question: Question) -> dict[bytes, bytes]:
    """The key-value metadata every chunk file of a bank with an identity carries."""
    return {
        BANK_ID_KEY: manifest.bank_id.encode(),
        FINGERPRINT_KEY: manifest.fingerprint.encode(),
        QUESTION_KEY: question_sha256(question).encode(),
    }


def check_qids(path: Path, table: Any, question: Question) -> None:
    if any(q != question.qid for q in table.column("qid").to_pylist()):
        raise BankError(
            f"{path} holds chunks of another question than {question.qid!r}: the bank is "
            "inconsistent. Move the file away and re-run `ponder record` on this bank"
        )


def check_identity(
    path: Path, meta: dict[bytes, bytes] | None, manifest: BankManifest, question: Question
) -> None:
    """Refuse a chunk file that is not this bank's recording of ``question``."""
    meta = meta or {}
    bank = path.parent.parent
    theirs = meta.get(BANK_ID_KEY, b"").decode()
    redo = (
        f"move it away and re-run `ponder record` with this bank's settings to record question "
        f"{question.qid!r} again"
    )
    if not manifest.bank_id:
        if theirs:
            raise BankError(
                f"{path} belongs to bank {theirs}, but {bank / 'manifest.json'} has no bank "
                "identity (it was recorded before ponder wrote one, or it was replaced by an older "
                f"manifest). If the manifest was replaced, restore it; if the file was copied in "
                f"from another bank, {redo}"
            )
        return
    if not theirs:
        raise BankError(
            f"{path} carries no bank identity, but {bank} is bank {manifest.bank_id}: the file was "
            f"copied in from another bank (or written by a ponder from before identities): {redo}. "
            f"If you know it is this bank's own recording, `ponder bank stamp {bank}` "
            "vouches for it"
        )
    if theirs != manifest.bank_id:
        raise BankError(
            f"{path} belongs to another bank ({theirs}), not to {bank} (bank {manifest.bank_id}): "
            f"it was copied in from a bank whose question ids collide with this one's: {redo}"
        )
    if meta.get(FINGERPRINT_KEY, b"").decode() != manifest.fingerprint:
        raise BankError(
            f"{path} was recorded with other settings than {bank / 'manifest.json'} lists "
            f"(fingerprint {meta.get(FINGERPRINT_KEY, b'').decode()[:12] or 'none'}, the manifest's "
            f"{manifest.fingerprint[:12]}): the bank is inconsistent; {redo}"
        )
    if meta.get(QUESTION_KEY, b"").decode() != question_sha256(question):
        raise BankError(
            f"{path} was recorded for another question {question.qid!r} than "
            f"{bank / 'questions.parquet'} holds (its text or gold answer differ, e.g. drawn with "
            "another --question-seed): restore questions.parquet from version control, or "
            f"{redo}"
        )


@dataclass
class ChainTrace:
    """One recorded chain: its chunks (main, then budget-forced extension) as column arrays."""

    chain: int
    answer: str | None
    correct: bool
    rows: dict[str, list[Any]] = field(repr=False)
    thinking_end: str | None = None
    """the marker that closes the model's thinking section (:attr:`BankManifest.thinking_end`)"""

    @property
    def n_main(self) -> int:
        """Chunks of the chain as sampled (before any forced extension)."""
        return sum(1 for e in self.rows["ext"] if not e)

    @property
    def n_chunks(self) -> int:
        return len(self.rows["ext"])

    @property
    def main_tokens(self) -> int:
        return int(
            sum(n for n, e in zip(self.rows["n_tokens"], self.rows["ext"], strict=True) if not e)
        )

    @property
    def finish_reason(self) -> str:
        reasons = [
            r for r, e in zip(self.rows["finish_reason"], self.rows["ext"], strict=True) if not e
        ]
        return reasons[-1] if reasons else "length"


@dataclass
class QuestionTrace:
    """All recorded chains of one question.

    ``execution`` holds a code question's execution results as stored (JSON: ``accepted`` and
    ``chains``, see :mod:`env.code.grade`); None for other questions. Its ``accepted`` classes
    are also on ``question.accepted``, where scoring reads them."""

    question: Question
    chains: list[ChainTrace]
    execution: dict[str, Any] | None = None

    @property
    def k(self) -> int:
        return len(self.chains)


class TraceBank:
    """A recorded bank, opened read-only. Questions load lazily from their Parquet files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise BankError(f"no trace bank at {self.path}: the folder does not exist")
        self.manifest = BankManifest.load(self.path / "manifest.json")
        self._questions = self._load_questions()
        self._cache: dict[str, QuestionTrace] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-list which questions are recorded (a bank being recorded grows).

        Raises:
            BankError: ``chunks/`` holds files beyond the manifest's question list (the list was
                cut short, or files were copied in), named in the message.
        """
        names = self._chunk_names()
        extra = self._extra(names)
        if extra:
            # A recorder that appends questions rewrites the manifest before their files.
            grown = BankManifest.load(self.path / "manifest.json")
            if (
                grown.bank_id == self.manifest.bank_id
                and grown.questions[: len(self.manifest.questions)] == self.manifest.questions
                and len(grown.questions) > len(self.manifest.questions)
            ):
                self.manifest = grown
                self._questions = self._load_questions()
                extra = self._extra(names)
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise BankError(
                f"{self.path / 'chunks'} holds {len(extra)} file(s) that "
                f"{self.path / 'manifest.json'} does not list ({shown}; it lists "
                f"{len(self.manifest.questions)} questions): its question list was cut short, or the files were copied in. Restore the "
                "manifest from version control, or move those files out of the bank"
            )
        self._recorded = [
            q for i, q in enumerate(self.manifest.questions) if f"{i:05d}.parquet" in names
        ]
        self._recorded_set = frozenset(self._recorded)
        self._index = {q: i for i, q in enumerate(self.manifest.questions)}

    def _chunk_names(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.path / "chunks") if n.endswith(".parquet")}
        except FileNotFoundError:
            return set()

    def _extra(self, names: set[str]) -> list[str]:
        n = len(self.manifest.questions)
        expected = {f"{i:05d}.parquet" for i in range(n)}
        return sorted(names - expected)

    def _load_questions(self) -> dict[str, Question]:
        qpath = self.path / "questions.parquet"
        if not qpath.exists():
            raise BankError(
                f"{qpath} is missing: the bank is incomplete; re-run `ponder record` to finish it"
            )
        return _questions_file(qpath)

    def chunk_file(self, index: int) -> Path:
        return self.path / "chunks" / f"{index:05d}.parquet"

    @property
    def recorded(self) -> list[str]:
        """Ids of the questions whose chunks are recorded, in recording order (see :meth:`refresh`)."""
        return list(self._recorded)

    @property
    def questions(self) -> list[Question]:
        """The recorded questions."""
        return [self._questions[q] for q in self.recorded]

    def __len__(self) -> int:
        return len(self._recorded)

    def __iter__(self) -> Iterator[QuestionTrace]:
        for qid in self._recorded:
            yield self[qid]

    def question(self, qid: str) -> Question:
        """The question ``qid`` as ``questions.parquet`` holds it."""
        try:
            return self._questions[qid]
        except KeyError:
            raise BankError(
                f"question {qid!r} is not in {self.path / 'questions.parquet'}: the bank is "
                "incomplete; re-run `ponder record` on it to finish it"
            ) from None

    def __contains__(self, qid: object) -> bool:
        return qid in self._recorded_set

    def __getitem__(self, qid: str) -> QuestionTrace:
        if qid in self._cache:
            return self._cache[qid]
        index = self._index.get(qid)
        if index is None:
            raise BankError(f"question {qid!r} is not in the bank at {self.path}")
        path = self.chunk_file(index)
        if not path.exists():
            raise BankError(
                f"question {qid!r} is not recorded yet in {self.path} (no {path.name}); resume `ponder record`"
            )
        trace = read_question_file(path, self.question(qid), self.manifest)
        self._cache[qid] = trace
        return trace


def _questions_file(path: Path) -> dict[str, Question]:
    """The questions in a bank's ``questions.parquet`` by id (none if there is no such file)."""
    import pyarrow.parquet as pq

    if not path.exists():
        return {}
    redo = "delete it and re-run `ponder record` on this folder"
    try:
        table = pq.read_table(path)
        table.validate(full=True)  # damaged values (such as text that is not UTF-8) fail here
        t = table.to_pydict()
    except Exception as e:  # pyarrow raises several types for damaged files
        raise BankError(f"{path} is corrupt ({e}); {redo}") from e
    missing = sorted({"qid", "text", "gold", "dataset", "difficulty"} - set(t))
    if missing:
        raise BankError(f"{path} is corrupt: it lacks the columns {missing}; {redo}")
    if not all(isinstance(v, str) for k in ("qid", "text") for v in t[k]):
        raise BankError(f"{path} is corrupt: a question has no id or no text; {redo}")
    out = {
        qid: Question(qid=qid, text=text, gold=gold, dataset=ds, difficulty=diff)
        for qid, text, gold, ds, diff in zip(
            t["qid"], t["text"], t["gold"], t["dataset"], t["difficulty"], strict=True
        )
    }
    for qid, q in out.items():
        if q.dataset == "factual":  # a factual question's aliases come from the shipped set
            from env.questions import factual_accepted

            out[qid] = dataclasses.replace(q, accepted=factual_accepted(qid))
    return out


def read_chunk_table(path: Path, kept: str) -> Any:
    """A chunk file's Arrow table; a damaged file or one of another schema is a
    :class:`BankError` that names it and says (``kept``) that nothing else was touched."""
    import pyarrow.parquet as pq

    redo = (
        f"{kept}: move it away and re-run `ponder record` on this bank to re-record that question"
    )
    try:
        table = pq.read_table(path)
        table.validate(full=True)  # damaged values (such as text that is not UTF-8) fail here
    except Exception as e:  # truncated or corrupt Parquet
        raise BankError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}). {redo}") from e
    if table.schema.names != CHUNK_SCHEMA.names:
        raise BankError(
            f"{path} has columns {table.schema.names}, expected schema version {SCHEMA_VERSION}"
        )
    missing = [n for n in _REQUIRED_COLUMNS if table.column(n).null_count]
    if missing:
        raise BankError(f"{path} is corrupt: columns {missing} have missing values. {redo}")
    return table


def read_question_file(
    path: Path, question: Question, manifest: BankManifest | None = None
) -> QuestionTrace:
    """Read one question's chunk file, with clear errors for damaged files and (given the
    bank's manifest) for files that are not this bank's recording of ``question``."""
    table = read_chunk_table(path, "Nothing else is affected")
    check_qids(path, table, question)
    if manifest is not None:
        check_identity(path, table.schema.metadata, manifest, question)
    d = table.to_pydict()
    chains: dict[int, dict[str, list[Any]]] = {}
    for i in range(table.num_rows):
        c = d["chain"][i]
        rows = chains.setdefault(c, {k: [] for k in d})
        for k in d:
            rows[k].append(d[k][i])
    out = []
    for c in sorted(chains):
        rows = chains[c]
        order = sorted(range(len(rows["chunk"])), key=lambda j: rows["chunk"][j])
        rows = {k: [v[j] for j in order] for k, v in rows.items()}
        out.append(
            ChainTrace(
                chain=c,
                answer=rows["answer"][0],
                correct=bool(rows["correct"][0]),
                rows=rows,
                thinking_end=None if manifest is None else manifest.thinking_end,
            )
        )
    execution = _execution(path, table.schema.metadata)
    if execution is not None:
        question = dataclasses.replace(question, accepted=tuple(execution["accepted"]))
    return QuestionTrace(question=question, chains=out, execution=execution)


def _execution(path: Path, metadata: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    raw = (metadata or {}).get(EXECUTION_KEY)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        ok = isinstance(d, dict) and isinstance(d.get("chains"), list)
        ok = ok and isinstance(d.get("accepted"), list)
        ok = ok and all(isinstance(a, str) for a in d["accepted"])
    except ValueError:
        ok = False
    if not ok:
        raise BankError(
            f"{path} is corrupt: its execution results ({EXECUTION_KEY.decode()}) are not the "
            "JSON ponder writes. Move it away and re-run `ponder record` on this bank to "
            "re-record that question"
        )
    return dict(d)


class BankWriter:
    """Creates or resumes a bank folder; writes one question at a time, atomically.

    A new bank gets its identity here (:meth:`BankManifest.identified`); a resumed one keeps
    its own. The writer does not lock the folder: its caller holds a :class:`BankLock` (as
    ``ponder record`` does) when another process could write the same bank."""

    def __init__(
        self, path: str | Path, manifest: BankManifest, questions: Sequence[Question]
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.manifest = manifest
        mpath = self.path / "manifest.json"
        if mpath.exists():
            old = BankManifest.load(mpath)
            diffs = old.compatible(manifest)
            if diffs:
                raise BankError(
                    f"{mpath} was recorded with other settings ({'; '.join(diffs)}). Nothing was changed: "
                    "record into a new folder, or use the same settings to resume"
                )
            if old.questions[: len(manifest.questions)] != manifest.questions[: len(old.questions)]:
                raise BankError(
                    f"{mpath} lists other questions in another order: resume with the same question set, "
                    "or grow it only by appending questions"
                )
            kept = _questions_file(self.path / "questions.parquet")
            changed = sorted(
                q.qid
                for q in questions
                if q.qid in kept and question_sha256(kept[q.qid]) != question_sha256(q)
            )
            if changed:
                raise BankError(
                    f"{self.path / 'questions.parquet'} holds other questions under the ids "
                    f"{changed[:3]}{' ...' if len(changed) > 3 else ''} (their text or gold answer "
                    "differ: question ids do not depend on the question seed). Nothing was "
                    "changed: resume with the bank's --question-seed, or record into a new folder"
                )
            if len(manifest.questions) > len(old.questions):
                self.manifest = dataclasses.replace(old, questions=manifest.questions)
                atomic_write_bytes(mpath, self.manifest.to_json().encode())
            else:
                self.manifest = old
            if not old.bank_id:
                log.warning(
                    "%s has no bank identity (recorded before ponder wrote one): new files are "
                    "written without one too; `ponder bank stamp %s` gives the bank its identity",
                    self.path,
                    self.path,
                )
        else:
            kept = {}
            self.path.mkdir(parents=True, exist_ok=True)
            if not manifest.bank_id:
                self.manifest = manifest.identified()
            atomic_write_bytes(mpath, self.manifest.to_json().encode())
        # Questions recorded earlier but not given now stay in questions.parquet.
        by_id = {**kept, **{q.qid: q for q in questions}}
        self._by_id = by_id
        qs = [by_id[q] for q in self.manifest.questions if q in by_id]
        table = pa.table(
            {
                "qid": [q.qid for q in qs],
                "text": [q.text for q in qs],
                "gold": [q.gold for q in qs],
                "dataset": [q.dataset for q in qs],
                "difficulty": pa.array([q.difficulty for q in qs], type=pa.int32()),
            }
        )
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        atomic_write_bytes(self.path / "questions.parquet", buf.getvalue().to_pybytes())
        (self.path / "chunks").mkdir(exist_ok=True)
        for stale in (self.path / "chunks").glob("*.tmp"):
            stale.unlink()  # a write interrupted before its rename: never a complete file

    def done(self, index: int) -> bool:
        """Whether question ``index`` is recorded (its file exists, reads back, and is this
        bank's recording of that question)."""
        path = self.path / "chunks" / f"{index:05d}.parquet"
        if not path.exists():
            return False
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(path).metadata
        except Exception as e:
            raise BankError(
                f"{path} is corrupt or truncated ({e}). It was not overwritten: move it away, then "
                "re-run `ponder record` to re-record that question"
            ) from e
        question = self._by_id.get(self.manifest.questions[index])
        if question is not None:
            check_identity(path, meta, self.manifest, question)
        return True

    def write(self, index: int, rows: dict[str, Any]) -> Path:
        """Write question ``index``'s chunk rows atomically.

        ``rows`` holds a list per chunk column and, optionally, :data:`METADATA_ROWS`: extra
        Parquet key-value metadata for the file (a code question's execution results,
        :data:`EXECUTION_KEY`), written in the same atomic file as the chunks."""
        import pyarrow as pa

        arrays = []
        for f in CHUNK_SCHEMA:
            vals = rows[f.name]
            if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type):
                vals = [np.asarray(v, dtype=np.float16) for v in vals]
            arrays.append(pa.array(vals, type=f.type))
        schema = CHUNK_SCHEMA
        if self.manifest.bank_id:
            qid = self.manifest.questions[index]
            question = self._by_id.get(qid)
            if question is None:
                raise BankError(f"question {qid!r} (index {index}) was not given to the writer")
            schema = schema.with_metadata(chunk_identity(self.manifest, question))
        extra = rows.get(METADATA_ROWS)
        if extra:
            schema = schema.with_metadata({**(schema.metadata or {}), **extra})
        table = pa.Table.from_arrays(arrays, schema=schema)
        path = self.path / "chunks" / f"{index:05d}.parquet"
        atomic_write_bytes(path, encode_chunk_table(table))
        return path


def encode_chunk_table(table: Any) -> bytes:
    """A chunk table as Parquet bytes: zstd, and the per-token float columns byte-stream-split
    (their bytes regrouped by significance before compression: about 28% smaller files on the
    GSM8K bank than plain zstd, the values bit for bit the same)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    floats = [
        f.name
        for f in table.schema
        if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type)
    ]
    others = [n for n in table.schema.names if n not in floats]
    buf = pa.BufferOutputStream()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        compression_level=9,
        use_dictionary=others,
        use_byte_stream_split=floats,
    )
    return buf.getvalue().to_pybytes()
