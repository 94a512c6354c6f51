"""Fuzzing the bank reader: damaged bank files give a clear :class:`BankError`, never another
exception or a hang.

A small bank is recorded once from the fake generator; every example copies it, damages one of
its files (bytes flipped, cut, inserted or replaced in a chunk file, ``questions.parquet`` or
``manifest.json``; fields of the manifest given other JSON values) and reads the whole bank back.
Bounded in time: a fixed number of examples, each under a deadline.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from env.bank.manifest import BankManifest
from env.bank.store import TraceBank
from env.bank.synthetic import record_fake_bank
from env.questions import load_questions
from features.errors import PonderError

FILES = ("manifest.json", "questions.parquet", "chunks/00000.parquet", "chunks/00001.parquet")
FUZZ = settings(
    max_examples=150,
    deadline=5000,  # ms per example: a hang fails, not a slow machine
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples every run (a failure reproduces)
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "bank"
    record_fake_bank(path, load_questions("arith", "test", 8, seed=0)[:2], seed=0)
    return path


@pytest.fixture
def copy(pristine: Path) -> Iterator[Any]:
    """``copy()``: a fresh copy of the pristine bank, removed afterwards."""
    dirs: list[tempfile.TemporaryDirectory[str]] = []

    def make() -> Path:
        d = tempfile.TemporaryDirectory()
        dirs.append(d)
        return Path(shutil.copytree(pristine, Path(d.name) / "bank"))

    yield make
    for d in dirs:
        d.cleanup()


def read_everything(path: Path) -> None:
    """What a replay reads: the manifest, the questions, every chunk file and its rows."""
    bank = TraceBank(path)
    for qt in bank:
        for ct in qt.chains:
            _ = (ct.n_main, ct.n_chunks, ct.main_tokens, ct.finish_reason, ct.answer)


def read_and_check(path: Path) -> None:
    try:
        read_everything(path)
    except PonderError as e:
        assert str(e).strip(), "a bank error must say what is wrong"


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("replace"), st.integers(0, 64), st.integers(0, 255)),
)


@FUZZ
@given(
    name=st.sampled_from(FILES),
    edits=st.lists(mutations, min_size=1, max_size=4),
    junk=st.binary(max_size=64),
)
def test_damaged_bytes_give_a_bank_error(
    copy: Any, name: str, edits: list[tuple[str, int, int]], junk: bytes
) -> None:
    path = copy()
    target = path / name
    data = bytearray(target.read_bytes())
    for op, at, value in edits:
        at = at % (len(data) + 1)
        if op == "flip" and data:
            data[at % len(data)] ^= value
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = bytes([value]) + junk
        elif op == "replace":
            data = bytearray(junk[:at] or bytes([value]))
    target.write_bytes(bytes(data))
    read_and_check(path)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


FIELDS = [f.name for f in dataclasses.fields(BankManifest)] + ["unknown"]


@FUZZ
@given(key=st.sampled_from(FIELDS), value=json_values, drop=st.booleans(), stamp=st.booleans())
def test_damaged_manifest_fields_give_a_bank_error(
    copy: Any, key: str, value: Any, drop: bool, stamp: bool
) -> None:
    """A manifest edited by hand: fields of other types, removed, or added. ``stamp`` also
    drops the identity (as in banks from before identities, where no fingerprint guards the
    settings), so the fields' own checks are reached."""
    path = copy()
    mpath = path / "manifest.json"
    raw = json.loads(mpath.read_text())
    if drop and key in raw:
        del raw[key]
    else:
        raw[key] = value
    if stamp:
        for k in ("bank_id", "fingerprint"):
            raw.pop(k, None)
        for chunk in (path / "chunks").iterdir():
            _strip_identity(chunk)
    mpath.write_text(json.dumps(raw))
    read_and_check(path)


def _strip_identity(path: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({}), path)


def test_the_pristine_bank_reads() -> None:
    """The fuzzers start from a bank that reads without error (else they test nothing)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bank"
        record_fake_bank(path, load_questions("arith", "test", 8, seed=0)[:2], seed=0)
        read_everything(path)
        assert len(TraceBank(path)) == 2
