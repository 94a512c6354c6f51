"""Bank identity: a chunk file is checked to be its bank's recording of its question.

Each test reproduces a way a careless user (or an attacker) got another bank's chains accepted
before banks carried an identity: question ids such as ``arith/test/L1/0`` are the same in every
arith bank whatever its question seed or model, so a copied chunk file used to read as this
bank's, and a manifest cut short silently hid the rest of the bank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from env.bank.maintain import compact, same_table, stamp, summarize, summarize_extension
from env.bank.store import TraceBank
from env.bank.writer import BankWriter, atomic_write_bytes, encode_chunk_table
from env.questions import load_questions
from features.errors import BankError

ROOT = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160"}


MakeBank = Callable[..., TraceBank]


def strip_identity(bank: Path) -> None:
    """Make ``bank`` look recorded by a ponder from before bank identities."""
    m = json.loads((bank / "manifest.json").read_text())
    del m["bank_id"], m["fingerprint"]
    (bank / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    for f in (bank / "chunks").glob("*.parquet"):
        strip_file(f)


def strip_file(f: Path) -> None:
    """Remove a chunk file's identity metadata, its values untouched."""
    table = pq.read_table(f)
    atomic_write_bytes(f, encode_chunk_table(table.replace_schema_metadata(None)))


def _ponder(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=120,
    )


def _snapshot(bank: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(bank)): p.read_bytes() for p in sorted(bank.rglob("*")) if p.is_file()
    }


def test_chunk_file_copied_from_another_bank_with_colliding_ids_is_refused(
    make_bank: MakeBank,
) -> None:
    a = make_bank("a", question_seed_=0)
    b = make_bank("b", question_seed_=1)  # other questions behind the same ids
    assert a.manifest.questions == b.manifest.questions
    assert a.manifest.bank_id != b.manifest.bank_id
    shutil.copy(b.chunk_file(0), a.chunk_file(0))
    qid = a.manifest.questions[0]

    with pytest.raises(BankError, match=r"00000\.parquet belongs to another bank") as e:
        TraceBank(a.path)[qid]
    assert b.manifest.bank_id in str(e.value) and a.manifest.bank_id in str(e.value)
    assert "re-run `ponder record`" in str(e.value)
    # A resumed recorder does not take it for a recorded question (and rewrites nothing).
    before = _snapshot(a.path)
    questions = load_questions("arith", "test", 8, seed=0)[:3]
    settings = dataclasses.replace(a.manifest, bank_id="", fingerprint="")  # as `record` passes
    with pytest.raises(BankError, match="belongs to another bank"):
        BankWriter(a.path, settings, questions).done(0)
    with pytest.raises(BankError, match="belongs to another bank"):
        compact(a.path)
    with pytest.raises(BankError, match="belongs to another bank"):
        stamp(a.path)
    assert _snapshot(a.path) == before
    proc = _ponder("bank", "info", str(a.path))
    assert proc.returncode == 1
    assert "00000.parquet belongs to another bank" in proc.stderr


def test_chunk_file_of_the_same_settings_from_another_bank_is_refused(
    make_bank: MakeBank,
) -> None:
    # Identical settings and questions: the fingerprints agree, the bank ids do not.
    a, b = make_bank("a"), make_bank("b")
    assert a.manifest.fingerprint == b.manifest.fingerprint
    shutil.copy(b.chunk_file(2), a.chunk_file(2))
    with pytest.raises(BankError, match=r"00002\.parquet belongs to another bank"):
        TraceBank(a.path)[a.manifest.questions[2]]


def test_chunk_file_without_identity_in_a_bank_with_one_is_refused(make_bank: MakeBank) -> None:
    a = make_bank("a")
    strip_file(a.chunk_file(1))  # as a ponder from before identities wrote it
    with pytest.raises(BankError, match=r"00001\.parquet carries no bank identity") as e:
        TraceBank(a.path)[a.manifest.questions[1]]
    assert "ponder bank stamp" in str(e.value)


def test_questions_of_another_question_seed_are_refused(make_bank: MakeBank) -> None:
    a = make_bank("a", question_seed_=0)
    b = make_bank("b", question_seed_=1)
    shutil.copy(b.path / "questions.parquet", a.path / "questions.parquet")
    with pytest.raises(BankError, match="recorded for another question") as e:
        TraceBank(a.path)[a.manifest.questions[0]]
    assert "questions.parquet" in str(e.value)


def test_manifest_edited_after_recording_is_refused(make_bank: MakeBank) -> None:
    a = make_bank("a")
    m = json.loads((a.path / "manifest.json").read_text())
    m["seed"] = 1
    (a.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankError, match=r"manifest\.json was edited after the bank was recorded"):
        TraceBank(a.path)


def test_manifest_cut_short_names_the_files_it_drops(make_bank: MakeBank) -> None:
    a = make_bank("a")
    full = (a.path / "manifest.json").read_text()
    m = json.loads(full)
    m["questions"] = m["questions"][:1]
    (a.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankError, match="does not list") as e:
        TraceBank(a.path)
    assert "00001.parquet, 00002.parquet" in str(e.value)
    assert "cut short" in str(e.value)
    proc = _ponder("bank", "info", str(a.path))
    assert proc.returncode == 1 and "00001.parquet, 00002.parquet" in proc.stderr
    # A stray file under another name is named too.
    (a.path / "manifest.json").write_text(full)
    assert len(TraceBank(a.path)) == 3
    shutil.copy(a.chunk_file(0), a.path / "chunks" / "copy.parquet")
    with pytest.raises(BankError, match=r"copy\.parquet"):
        TraceBank(a.path)


def test_bank_info_recomputes_a_tampered_correct_column(make_bank: MakeBank) -> None:
    a = make_bank("a")
    truth = summarize(a)
    extension = summarize_extension(a)
    assert extension  # the bank has budget-forced extensions: info reports them too
    path = a.chunk_file(0)
    table = pq.read_table(path)
    flipped = pa.array([not c for c in table.column("correct").to_pylist()])
    tampered = table.set_column(table.schema.get_field_index("correct"), "correct", flipped)
    path.write_bytes(encode_chunk_table(tampered))  # the identity metadata is kept

    bank = TraceBank(a.path)
    assert [c.correct for c in bank[bank.manifest.questions[0]].chains] != [
        c.correct for c in a[a.manifest.questions[0]].chains
    ]
    assert summarize(bank) == truth and summarize_extension(bank) == extension
    proc = _ponder("bank", "info", str(a.path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps({**truth, "extension": extension}))
    assert "00000.parquet" in proc.stderr and "disagrees" in proc.stderr
    assert "00001.parquet" not in proc.stderr


def test_stamp_gives_an_old_bank_its_identity_values_unchanged(make_bank: MakeBank) -> None:
    a = make_bank("a")
    strip_identity(a.path)
    old = TraceBank(a.path)  # read as before: no identity in the manifest, none in the files
    assert not old.manifest.bank_id
    tables = {p.name: pq.read_table(p) for p in sorted((a.path / "chunks").glob("*.parquet"))}
    chains = {q: [(c.answer, c.correct, c.n_chunks) for c in old[q].chains] for q in old.recorded}

    proc = _ponder("bank", "stamp", str(a.path))
    assert proc.returncode == 0, proc.stderr
    assert "3 of 3 chunk files stamped" in proc.stdout
    new = TraceBank(a.path)
    assert new.manifest.bank_id and new.manifest.fingerprint
    for name, before in tables.items():
        after = pq.read_table(a.path / "chunks" / name)
        assert same_table(before, after)
        assert after.schema.metadata[b"ponder.bank_id"] == new.manifest.bank_id.encode()
    assert {
        q: [(c.answer, c.correct, c.n_chunks) for c in new[q].chains] for q in new.recorded
    } == chains
    assert not (a.path / "bank.lock").exists()
    # Stamped once: a second run changes nothing, and another bank's file is now refused.
    before = _snapshot(a.path)
    again = stamp(a.path)
    assert (again.new_identity, again.stamped, again.bank_id) == (
        False,
        0,
        new.manifest.bank_id,
    )
    assert _snapshot(a.path) == before
    b = make_bank("b")
    shutil.copy(b.chunk_file(0), a.chunk_file(0))
    with pytest.raises(BankError, match="belongs to another bank"):
        TraceBank(a.path)[a.manifest.questions[0]]


def test_old_manifest_with_stamped_files_is_refused_then_restamped(make_bank: MakeBank) -> None:
    a = make_bank("a")
    bank_id = a.manifest.bank_id
    m = json.loads((a.path / "manifest.json").read_text())
    del m["bank_id"], m["fingerprint"]  # an older copy of the manifest put back
    (a.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankError, match="has no bank identity"):
        TraceBank(a.path)[a.manifest.questions[0]]
    r = stamp(a.path)
    assert (r.bank_id, r.new_identity, r.stamped) == (bank_id, True, 0)
    TraceBank(a.path)[a.manifest.questions[0]]


def test_shipped_banks_carry_their_identity() -> None:
    for path in sorted((ROOT / "data" / "banks").iterdir()):
        bank = TraceBank(path)
        assert bank.manifest.bank_id and bank.manifest.fingerprint, path
        for i, _ in enumerate(bank.recorded):
            meta = pq.read_metadata(bank.chunk_file(i)).metadata
            assert meta[b"ponder.bank_id"] == bank.manifest.bank_id.encode(), bank.chunk_file(i)
            assert meta[b"ponder.fingerprint"] == bank.manifest.fingerprint.encode()


def test_resuming_with_another_question_seed_is_refused_and_changes_nothing(
    tmp_path: Path,
) -> None:
    from env.bank.record import RecordArgs, record

    def args(question_seed: int) -> RecordArgs:
        return RecordArgs(
            out=tmp_path / "bank",
            model="fake",
            n=8,
            chains=2,
            chunk_tokens=8,
            max_tokens=64,
            question_seed=question_seed,
        )

    record(args(0))
    before = _snapshot(tmp_path / "bank")
    with pytest.raises(BankError, match="holds other questions under the ids") as e:
        record(args(1))  # the same ids ("arith/test/L1/0", ...), other questions
    assert "--question-seed" in str(e.value)
    assert _snapshot(tmp_path / "bank") == before
