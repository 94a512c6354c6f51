"""``share_reads``: a worker process of one run reads each question file once and flattens a bank
once per setting for all its replays, and gets what it would have got without (the same
episodes); a file the recorder replaced is read again; off, nothing is kept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import env.bank.store as store
from env.bank.store import TraceBank, reads_shared, share_reads, shared
from env.episode.vector import BatchedReplayEnv
from policies.learned.replay import rollout_pinned
from policies.registry import load_policy

ROOT = Path(__file__).resolve().parents[3]
BANK = ROOT / "data" / "banks" / "testbed-arith"


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The question files read, in order."""
    seen: list[str] = []
    real = store.read_question_file

    def counting(path: Path, *a: object, **kw: object) -> store.QuestionTrace:
        seen.append(path.name)
        return real(path, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "read_question_file", counting)
    return seen


def _episodes(env: BatchedReplayEnv) -> dict[str, float]:
    return rollout_pinned(load_policy("adaptive-consistency-0.9"), env)


def test_shared_reads_give_the_same_episodes_from_one_read(reads: list[str]) -> None:
    alone = _episodes(BatchedReplayEnv(BANK, 96, split="test", difficulty="auto"))
    read_alone = len(reads)
    reads.clear()
    with reads_shared():
        envs = [BatchedReplayEnv(BANK, 96, split="test", difficulty="auto") for _ in range(3)]
        once = len(reads)
        assert once == read_alone  # the second and third banks read nothing
        assert envs[0]._t is envs[2]._t  # flattened once
        assert not envs[0]._t.obs.flags.writeable  # and no replay may write to it
        assert all(_episodes(e) == alone for e in envs)
    assert store._SHARED is None  # off again after the block, what was kept dropped
    reads.clear()
    TraceBank(BANK)[TraceBank(BANK).recorded[0]]
    assert len(reads) == 1


def test_a_replaced_file_is_read_again_and_a_new_setting_flattened_anew(
    reads: list[str], tmp_path: Path
) -> None:
    import shutil

    bank_dir = tmp_path / "bank"
    shutil.copytree(BANK, bank_dir)
    with reads_shared():
        first = TraceBank(bank_dir)
        qid = first.recorded[0]
        first[qid]
        TraceBank(bank_dir)[qid]
        assert reads == ["00000.parquet"]
        f = bank_dir / "chunks" / "00000.parquet"
        copy = f.with_suffix(".tmp")
        shutil.copy(f, copy)
        os.replace(copy, f)  # as the recorder writes: a new file in its place
        TraceBank(bank_dir)[qid]
        assert reads == ["00000.parquet", "00000.parquet"]
        a = BatchedReplayEnv(bank_dir, 4, split="test")
        b = BatchedReplayEnv(bank_dir, 4, split="test", aggregate="confidence")
        c = BatchedReplayEnv(bank_dir, 4, split="test")
        assert a._t is c._t and a._t is not b._t


def test_turning_it_on_again_keeps_what_is_kept_and_off_drops_it() -> None:
    made: list[int] = []

    def make() -> int:
        made.append(1)
        return len(made)

    assert shared(lambda: ("k",), make) == 1 and shared(lambda: ("k",), make) == 2  # off
    try:
        share_reads()
        assert shared(lambda: ("k",), make) == 3
        share_reads()
        assert shared(lambda: ("k",), make) == 3
    finally:
        share_reads(False)
    assert shared(lambda: ("k",), make) == 4
    assert np.array_equal(made, [1, 1, 1, 1])


def test_hidden_features_are_shared_between_equal_probes_only(tmp_path: Path) -> None:
    from threadpoolctl import threadpool_limits

    from env.episode.hidden import HiddenProbes

    with threadpool_limits(1):
        fitted = HiddenProbes.fit(TraceBank(BANK), c_grid=(0.1,), alpha_grid=(10.0,), folds=2)
        other = HiddenProbes.fit(TraceBank(BANK), c_grid=(0.01,), alpha_grid=(10.0,), folds=2)
    a = HiddenProbes.load(fitted.save(tmp_path / "a", training=True), training=True)
    b = HiddenProbes.load(fitted.save(tmp_path / "b", training=True), training=True)
    assert a is not b and a.fingerprint() == b.fingerprint() == fitted.fingerprint()
    assert other.fingerprint() != a.fingerprint()
    alone = BatchedReplayEnv(BANK, 8, split="train", probes=a)
    with reads_shared():
        ea = BatchedReplayEnv(BANK, 8, split="train", probes=a)
        eb = BatchedReplayEnv(BANK, 8, split="train", probes=b)
        eo = BatchedReplayEnv(BANK, 8, split="train", probes=other)
    assert ea._right is eb._right and ea._right is not eo._right
    assert not ea._right.flags.writeable and not ea._pass.flags.writeable
    np.testing.assert_array_equal(ea._right, alone._right)
    np.testing.assert_array_equal(ea._pass, alone._pass)
