"""Reading banks: :class:`TraceBank` opens a bank folder read-only and loads each question's
chunk file lazily, checking it against the manifest and ``questions.parquet``.

The on-disk format is described in :mod:`env.bank.schema`; the manifest is
:mod:`env.bank.manifest`, identities and their checks :mod:`env.bank.identity`, and the writer
:mod:`env.bank.writer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from env.bank.identity import check_identity, check_qids
from env.bank.manifest import BankManifest
from env.bank.schema import CHUNK_SCHEMA, EXECUTION_KEY, SCHEMA_VERSION
from env.types import Question
from features.errors import BankError

__all__ = [
    "ChainTrace",
    "QuestionTrace",
    "TraceBank",
    "read_chunk_table",
    "read_question_file",
    "read_questions",
    "reads_shared",
    "share_reads",
    "shared",
]

T = TypeVar("T")

#: What this process keeps of the banks it read (:func:`share_reads`): ``None`` while off.
_SHARED: dict[tuple[Any, ...], Any] | None = None


def share_reads(on: bool = True) -> None:
    """Keep what is read from banks for the rest of this process (``on``), or stop and forget.

    For worker processes of one run (the main job's trainings and evaluators), which open the
    same bank many times while nothing writes to it: each :class:`TraceBank` then reads a
    question file only if no bank in the process has read that file (by path, inode, size and
    modification time) and question before, and :func:`shared` keeps results computed from a
    bank's content (the difficulty predictor, the flattened replay tables) under
    :meth:`TraceBank.content_key`. Turning it on again keeps what is kept. Off by default: a
    test or tool that rewrites a file in place within one clock tick would otherwise read the
    old one.
    """
    global _SHARED
    _SHARED = (_SHARED if _SHARED is not None else {}) if on else None


@contextlib.contextmanager
def reads_shared() -> Iterator[None]:
    """:func:`share_reads` for the ``with`` block, then as before (what was kept is dropped)."""
    global _SHARED
    before = _SHARED
    _SHARED = {} if before is None else before
    try:
        yield
    finally:
        _SHARED = before


def shared(key: Callable[[], tuple[Any, ...]], make: Callable[[], T]) -> T:
    """``make()``, or while :func:`share_reads` is on, the value kept under ``key()`` (made
    once; ``key`` is called only then). What is kept must not be changed by those who get it."""
    if _SHARED is None:
        return make()
    k = key()
    if k not in _SHARED:
        _SHARED[k] = make()
    return cast(T, _SHARED[k])


def _file_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


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


@dataclass
class ChainTrace:
    """One recorded chain: its chunks (main, then budget-forced extension) as column arrays."""

    chain: int
    answer: str | None
    correct: bool
    rows: dict[str, list[Any]] = field(repr=False)
    thinking_end: str | None = None
    """the marker that closes the model's thinking section (:attr:`~env.bank.manifest.BankManifest.thinking_end`)"""

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
        return read_questions(qpath)

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
        question = self.question(qid)
        trace = shared(
            lambda: ("question-file", *_file_key(path), self.manifest.bank_id, question),
            lambda: read_question_file(path, question, self.manifest),
        )
        self._cache[qid] = trace
        return trace

    def content_key(self, *, hidden: bool = False) -> tuple[Any, ...]:
        """What names this bank's recorded content within a process: its id, and the path,
        inode, size and modification time of its manifest, its questions and every recorded
        question's file (the recorder replaces files whole, so new content is a new key), and
        with ``hidden`` those of ``hidden/`` (the annotation's manifest and states). For
        :func:`shared`."""
        files = [
            self.path / "manifest.json",
            self.path / "questions.parquet",
            *(self.chunk_file(self._index[q]) for q in self._recorded),
        ]
        if hidden:
            folder = self.path / "hidden"
            files += sorted(f for f in folder.iterdir() if f.suffix in (".json", ".safetensors"))
        return ("bank", self.manifest.bank_id, tuple(_file_key(f) for f in files))


def read_questions(path: Path) -> dict[str, Question]:
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
