"""Bank maintenance: re-encode (``compact``), give an older bank its identity (``stamp``), and summarise (``ponder bank info``): each reads every file and changes none of its values."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from env.bank.identity import check_identity, check_qids, chunk_identity
from env.bank.lock import BankLock
from env.bank.manifest import BankManifest
from env.bank.schema import BANK_ID_KEY
from env.bank.store import QuestionTrace, TraceBank, read_chunk_table
from env.bank.writer import atomic_write_bytes, encode_chunk_table
from env.types import Question
from features.errors import BankError

__all__ = [
    "CompactReport",
    "compact",
    "StampReport",
    "stamp",
    "correct_mismatches",
    "summarize",
    "summarize_extension",
    "same_table",
]


@dataclass(frozen=True)
class CompactReport:
    """What :func:`compact` did: files rewritten (smaller) and bytes before and after."""

    files: int
    rewritten: int
    before: int
    after: int


def compact(path: str | Path) -> CompactReport:
    """Re-encode every chunk file of the bank at ``path`` as :meth:`BankWriter.write` writes it
    now (older ponder wrote the float columns without byte-stream-split).

    Each file is read, checked to be this bank's (its identity, see the module docstring),
    re-encoded with its metadata, read back and compared column by column (float bits included)
    before it atomically replaces the old one, and only if it is smaller: an interruption at any
    point leaves every file whole. It holds the bank's :class:`BankLock`, so it refuses to run
    beside a ``ponder record`` or ``ponder bank stamp`` of the same bank (run it afterwards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _bank_root(path)
    with BankLock(root, "ponder bank compact"):
        bank = TraceBank(root)
        rewritten = before = after = 0
        files = _recorded_files(bank)
        for f, question in files:
            table = read_chunk_table(f, "Nothing was changed in it")
            _check_file(f, table, bank.manifest, question)
            data = encode_chunk_table(table)
            size = f.stat().st_size
            before += size
            if len(data) >= size:
                after += size
                continue
            back = pq.read_table(pa.BufferReader(data))
            if not same_table(table, back) or back.schema.metadata != table.schema.metadata:
                raise BankError(
                    f"re-encoding {f} did not read back identically; it was left as it was"
                )
            atomic_write_bytes(f, data)
            rewritten += 1
            after += len(data)
    return CompactReport(files=len(files), rewritten=rewritten, before=before, after=after)


@dataclass(frozen=True)
class StampReport:
    """What :func:`stamp` did: the bank's identity, whether it is new, files stamped."""

    bank_id: str
    fingerprint: str
    new_identity: bool
    files: int
    stamped: int


def stamp(path: str | Path) -> StampReport:
    """Give the bank at ``path`` an identity (``ponder bank stamp``): a bank id and settings
    fingerprint in ``manifest.json``, and both with the question's hash in every chunk file.

    For banks recorded before ponder wrote identities, and for files such a ponder added to a
    bank that has one (stamping vouches for them: run it only on files you know are this bank's
    own). Every file is checked first (it holds its question's chunks; a file that carries an
    identity must be this bank's), and nothing is written if one fails. Then the manifest is
    written, and each file lacking its identity is re-encoded with it, read back and compared
    bit for bit, and atomically replaces the old one: values never change, and an interrupted
    run is finished by running it again. If the manifest has no identity but files carry one (a
    manifest replaced by an older copy), their bank id is kept. Holds the bank's
    :class:`BankLock`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _bank_root(path)
    with BankLock(root, "ponder bank stamp"):
        bank = TraceBank(root)
        files = _recorded_files(bank)
        metas: list[dict[bytes, bytes]] = []
        for f, question in files:
            try:
                metas.append(pq.read_metadata(f).metadata or {})
                check_qids(f, pq.read_table(f, columns=["qid"]), question)
            except BankError:
                raise
            except Exception as e:
                raise BankError(
                    f"{f} is corrupt or truncated ({e}). Nothing was changed: move it away, then "
                    "re-run `ponder record` on this bank to re-record that question"
                ) from e
        m = bank.manifest
        new_identity = not m.bank_id
        if new_identity:
            m = m.identified()
            carried = Counter(meta[BANK_ID_KEY].decode() for meta in metas if BANK_ID_KEY in meta)
            if carried:
                m = dataclasses.replace(m, bank_id=carried.most_common(1)[0][0])
        for (f, question), meta in zip(files, metas, strict=True):
            if BANK_ID_KEY in meta:  # vouched for once already: must be this bank's
                check_identity(f, meta, m, question)
        if new_identity:
            atomic_write_bytes(root / "manifest.json", m.to_json().encode())
        stamped = 0
        for (f, question), meta in zip(files, metas, strict=True):
            want = chunk_identity(m, question)
            if all(meta.get(k) == v for k, v in want.items()):
                continue
            table = read_chunk_table(f, "Nothing was changed in it")
            marked = table.replace_schema_metadata({**(table.schema.metadata or {}), **want})
            data = encode_chunk_table(marked)
            back = pq.read_table(pa.BufferReader(data))
            if not same_table(table, back) or back.schema.metadata != marked.schema.metadata:
                raise BankError(
                    f"stamping {f} did not read back identically; it was left as it was"
                )
            atomic_write_bytes(f, data)
            stamped += 1
    return StampReport(
        bank_id=m.bank_id,
        fingerprint=m.fingerprint,
        new_identity=new_identity,
        files=len(files),
        stamped=stamped,
    )


def _bank_root(path: str | Path) -> Path:
    root = Path(path)
    if not (root / "manifest.json").is_file():
        raise BankError(f"{root} is not a trace bank (no manifest.json)")
    return root


def _recorded_files(bank: TraceBank) -> list[tuple[Path, Question]]:
    """Each recorded question's chunk file and question, in recording order."""
    return [
        (bank.chunk_file(i), bank.question(qid))
        for i, qid in enumerate(bank.manifest.questions)
        if qid in bank
    ]


def _check_file(path: Path, table: Any, manifest: BankManifest, question: Question) -> None:
    """Refuse a chunk table that is not this bank's recording of ``question``."""
    check_qids(path, table, question)
    check_identity(path, table.schema.metadata, manifest, question)


def same_table(a: Any, b: Any) -> bool:
    """Equal schemas and columns; float lists compared bit for bit (NaN equals NaN)."""
    import pyarrow as pa

    if not a.schema.equals(b.schema):
        return False
    for name in a.schema.names:
        x, y = a[name].combine_chunks(), b[name].combine_chunks()
        t = a.schema.field(name).type
        if pa.types.is_list(t) and pa.types.is_floating(t.value_type):
            if not x.offsets.equals(y.offsets) or x.null_count != y.null_count:
                return False
            vx = x.flatten().to_numpy(zero_copy_only=False)
            vy = y.flatten().to_numpy(zero_copy_only=False)
            if vx.dtype != vy.dtype or not np.array_equal(vx.view(np.uint8), vy.view(np.uint8)):
                return False
        elif not x.equals(y):
            return False
    return True


def correct_mismatches(bank: TraceBank) -> list[tuple[Path, str, list[int]]]:
    """Chunk files whose stored ``correct`` column disagrees with :func:`answer_correct` of
    their answers and the gold answer: ``(file, question id, chains)`` for each."""
    out = []
    for i, qid in enumerate(bank.manifest.questions):
        if qid not in bank:
            continue
        qt = bank[qid]
        wrong = [c.chain for c in qt.chains if c.correct != qt.question.is_right(c.answer)]
        if wrong:
            out.append((bank.chunk_file(i), qid, wrong))
    return out


def summarize(bank: TraceBank) -> dict[str, dict[str, float]]:
    """Per-difficulty and overall statistics: questions, chains, tokens, pass@1, maj@k, pass@k.

    Correctness is recomputed from each chain's answer and the gold answer
    (:func:`answer_correct`, as evaluation does), not read from the stored ``correct`` column
    (:func:`correct_mismatches` finds files where the two disagree)."""
    groups: dict[str, list[QuestionTrace]] = {}
    for qt in bank:
        key = str(qt.question.difficulty) if qt.question.difficulty is not None else "-"
        groups.setdefault(key, []).append(qt)
        groups.setdefault("all", []).append(qt)
    out: dict[str, dict[str, float]] = {}
    for key, qts in groups.items():
        pass1: list[float] = []
        maj: list[float] = []
        passk: list[float] = []
        toks: list[int] = []
        chains = 0
        for qt in qts:
            corr = [qt.question.is_right(c.answer) for c in qt.chains]
            pass1.append(float(np.mean(corr)))
            passk.append(float(any(corr)))
            votes = Counter(c.answer for c in qt.chains if c.answer is not None)
            if votes:
                top = max(votes.values())
                leaders = sorted(a for a, v in votes.items() if v == top)
                lead_correct = [qt.question.is_right(a) for a in leaders]
                maj.append(float(np.mean(lead_correct)))  # ties split evenly
            else:
                maj.append(0.0)
            toks.extend(c.main_tokens for c in qt.chains)
            chains += qt.k
        out[key] = {
            "questions": len(qts),
            "chains": chains,
            "tokens": float(np.sum(toks)),
            "tokens_per_chain": float(np.mean(toks)) if toks else 0.0,
            "pass@1": float(np.mean(pass1)),
            "maj@k": float(np.mean(maj)),
            "pass@k": float(np.mean(passk)),
        }
    return out


def summarize_extension(bank: TraceBank) -> dict[str, dict[str, float]]:
    """What thinking past a chain's own end buys, per difficulty and overall: of the chains
    with budget-forced extension chunks (``extended``, their share of all chains), the share
    right at their own end (``at_end``: the chain's answer), right at the end of the extension
    (``after``: the last extension chunk's probe) and right at some extension boundary
    (``any``: what a stopper that knew when to stop would get). Empty for a bank without
    extensions. Correctness is recomputed from the answers, as in :func:`summarize`."""
    groups: dict[str, list[tuple[bool, bool, bool]]] = {}
    totals: dict[str, int] = {}
    for qt in bank:
        key = str(qt.question.difficulty) if qt.question.difficulty is not None else "-"
        for c in qt.chains:
            for g in (key, "all"):
                totals[g] = totals.get(g, 0) + 1
            ext = [a for a, e in zip(c.rows["probe_answer"], c.rows["ext"], strict=True) if e]
            if not ext:
                continue
            right = [qt.question.is_right(a) for a in ext]
            row = (qt.question.is_right(c.answer), right[-1], any(right))
            for g in (key, "all"):
                groups.setdefault(g, []).append(row)
    if not groups:
        return {}
    return {
        key: {
            "chains": float(totals[key]),
            "extended": len(rows) / totals[key],
            "at_end": float(np.mean([r[0] for r in rows])),
            "after": float(np.mean([r[1] for r in rows])),
            "any": float(np.mean([r[2] for r in rows])),
        }
        for key, rows in groups.items()
    }
