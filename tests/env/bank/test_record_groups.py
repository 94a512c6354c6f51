"""``ponder record --questions-at-once N``: questions recorded side by side, in fixed groups.

The groups are runs of N consecutive questions of the bank's order (``--group-size G``: of G, N of
them in the batch at once, the next starting as soon as there is room), so a resumed run records
the same groups from the same seeds as an uninterrupted one; each file notes its group and seed; a
code bank's questions are each graded by their own grader; a bad N or G is refused before
anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from env.bank.record import RecordArgs, groups_of, record
from env.bank.sampler import group_seed, question_seed
from env.bank.schema import EXECUTION_KEY, SAMPLING_KEY
from env.bank.store import TraceBank
from features.errors import ConfigError


def _args(out: Path, at_once: int, **kw: object) -> RecordArgs:
    base: dict[str, object] = dict(
        out=out, model="fake", dataset="arith", n=8, chains=3, chunk_tokens=8, max_tokens=64
    )
    return RecordArgs(**{**base, **kw}, questions_at_once=at_once)  # type: ignore[arg-type]


def _meta(path: Path) -> dict[bytes, bytes]:
    return dict(pq.read_schema(path).metadata or {})


def _rows(path: Path) -> dict[str, list[object]]:
    return pq.read_table(path).to_pydict()


def test_groups_are_fixed_by_position_and_keep_partial_ones_whole() -> None:
    assert groups_of(8, 3, lambda i: False) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert groups_of(8, 1, lambda i: i < 5) == [[5], [6], [7]]
    # question 4 was written alone (or before an interruption): its whole group is recorded again
    assert groups_of(8, 3, lambda i: i in {0, 1, 2, 4}) == [[3, 4, 5], [6, 7]]
    assert groups_of(8, 3, lambda i: True) == []
    with pytest.raises(ConfigError, match="at least 1"):
        groups_of(8, 0, lambda i: False)


def test_a_group_seed_of_one_question_is_its_own_seed() -> None:
    from env.questions import load_testbed

    qs = load_testbed("test", 1)[:3]
    assert group_seed(5, qs[:1]) == question_seed(5, qs[0].qid)
    assert group_seed(5, qs) == question_seed(5, "|".join(q.qid for q in qs))
    assert group_seed(5, qs) != group_seed(5, qs[:2])


def test_grouped_bank_notes_each_group_and_holds_the_same_chains(tmp_path: Path) -> None:
    record(_args(tmp_path / "alone", 1))
    record(_args(tmp_path / "grouped", 3))
    alone, grouped = TraceBank(tmp_path / "alone"), TraceBank(tmp_path / "grouped")
    qids = grouped.manifest.questions
    assert len(grouped) == len(alone) == len(qids) == 8
    for i, qid in enumerate(qids):
        f = tmp_path / "grouped" / "chunks" / f"{i:05d}.parquet"
        note = json.loads(_meta(f)[SAMPLING_KEY])
        group = qids[3 * (i // 3) : 3 * (i // 3) + 3]
        assert note["group"] == group
        assert note["seed"] == question_seed(0, "|".join(group))
        assert SAMPLING_KEY not in _meta(tmp_path / "alone" / "chunks" / f"{i:05d}.parquet")
        # the fake's text is scripted per question; only its made-up log-probs follow the seed
        a, g = alone[qid], grouped[qid]
        assert a.k == g.k == 3
        for ca, cg in zip(a.chains, g.chains, strict=True):
            assert ca.rows["text"] == cg.rows["text"]
            assert ca.rows["probe_answer"] == cg.rows["probe_answer"]
            assert (ca.answer, ca.correct) == (cg.answer, cg.correct)


def test_resume_records_the_same_groups_as_an_uninterrupted_run(tmp_path: Path) -> None:
    record(_args(tmp_path / "ref", 3))
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "ref", b)
    # an interrupted run: group [3, 4, 5] half written, group [6, 7] not started
    for i in (4, 6, 7):
        (b / "chunks" / f"{i:05d}.parquet").unlink()
    kept = (b / "chunks" / "00003.parquet").read_bytes()
    record(_args(b, 3))
    assert (b / "chunks" / "00003.parquet").read_bytes() == kept  # not written twice
    for i in range(8):
        name = f"chunks/{i:05d}.parquet"
        assert _rows(b / name) == _rows(tmp_path / "ref" / name), name
        assert _meta(b / name) == _meta(tmp_path / "ref" / name), name


def test_raising_the_group_size_mid_bank_records_the_rest_in_groups(tmp_path: Path) -> None:
    out = tmp_path / "bank"
    record(_args(out, 1, limit_minutes=1e-9))  # stops after the first question
    assert len(list((out / "chunks").glob("*.parquet"))) == 1
    first = (out / "chunks" / "00000.parquet").read_bytes()
    record(_args(out, 4))
    assert (out / "chunks" / "00000.parquet").read_bytes() == first
    assert SAMPLING_KEY not in _meta(out / "chunks" / "00000.parquet")
    bank = TraceBank(out)
    assert len(bank) == 8
    for i in range(1, 8):
        note = json.loads(_meta(out / "chunks" / f"{i:05d}.parquet")[SAMPLING_KEY])
        assert note["group"] == bank.manifest.questions[4 * (i // 4) : 4 * (i // 4) + 4]


def test_code_questions_side_by_side_are_each_graded_by_their_own_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from env.code.humaneval import load_tasks

    def script() -> dict[str, str]:  # odd tasks answered wrongly
        return {
            t.prompt: "```python\n"
            + t.prompt
            + ("    return None\n" if t.index % 2 else t.canonical_solution)
            + "```"
            for t in load_tasks()
        }

    monkeypatch.setattr("env.code.reference.reference_script", script)
    args = _args(
        tmp_path / "code", 2, dataset="humaneval", n=3, chains=2, chunk_tokens=256, max_tokens=2048
    )
    args.splits, args.extension_chunks = ("train", "test"), 0
    record(args)
    bank = TraceBank(tmp_path / "code")
    assert len(bank) == 6
    rights = set()
    for i, qid in enumerate(bank.manifest.questions):
        meta = _meta(tmp_path / "code" / "chunks" / f"{i:05d}.parquet")
        assert len(json.loads(meta[SAMPLING_KEY])["group"]) == 2
        execution = json.loads(meta[EXECUTION_KEY])
        right = int(qid.rsplit("/", 1)[-1]) % 2 == 0  # (humaneval/<split>/<index>)
        rights.add(right)
        assert [c["passed"] for c in execution["chains"]] == [right, right], qid
        assert [c.correct for c in bank[qid].chains] == [right, right], qid
    assert rights == {True, False}  # the groups mix right and wrong tasks


def test_a_group_size_below_one_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--questions-at-once must be at least 1"):
        record(_args(tmp_path / "bank", 0))
    assert not (tmp_path / "bank").exists()


def _batches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The question ids of every batch the fake generator extends, as they come."""
    from env.generators.fake import FakeGenerator

    seen: list[list[str]] = []
    extend = FakeGenerator.extend

    def spy(self: FakeGenerator, chains: Any, *args: Any, **kw: Any) -> Any:
        seen.append([c.question.qid for c in chains])
        return extend(self, chains, *args, **kw)

    monkeypatch.setattr(FakeGenerator, "extend", spy)
    return seen


def test_a_larger_group_keeps_the_batch_full_and_records_the_same_chains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record(_args(tmp_path / "alone", 1, n=16))
    seen = _batches(monkeypatch)
    record(_args(tmp_path / "rolling", 2, n=16, group_size=8))
    alone, rolling = TraceBank(tmp_path / "alone"), TraceBank(tmp_path / "rolling")
    qids = rolling.manifest.questions
    assert len(rolling) == len(qids) == 16
    # never more than 2 questions' chains (3 each) in a batch; a question joined the batch
    # while an earlier one of its group was still running
    assert max(len(b) for b in seen) == 6
    order = {q: i for i, q in enumerate(qids)}
    assert any(len({order[q] for q in b}) == 2 and min(order[q] for q in b) % 8 > 0 for b in seen)
    for i, qid in enumerate(qids):
        note = json.loads(_meta(tmp_path / "rolling" / "chunks" / f"{i:05d}.parquet")[SAMPLING_KEY])
        group = qids[8 * (i // 8) : 8 * (i // 8) + 8]
        assert note == {"seed": question_seed(0, "|".join(group)), "group": group, "at_once": 2}
        a, r = alone[qid], rolling[qid]
        assert a.k == r.k == 3
        for ca, cr in zip(a.chains, r.chains, strict=True):
            assert ca.rows["text"] == cr.rows["text"]
            assert ca.rows["ext"] == cr.rows["ext"]  # the budget-forced chunks, as alone
            assert (ca.answer, ca.correct) == (cr.answer, cr.correct)


def test_an_interrupted_rolling_group_resumes_to_the_uninterrupted_bank(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record(_args(tmp_path / "ref", 2, group_size=4))
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "ref", b)
    for i in (1, 5, 6):
        (b / "chunks" / f"{i:05d}.parquet").unlink()
    with caplog.at_level("WARNING", logger="env.bank.record"):
        record(_args(b, 2, group_size=4))
    # the recorder says what resuming a partial group costs: its recorded questions run again
    said = [r.getMessage() for r in caplog.records if "sampled whole again" in r.getMessage()]
    assert len(said) == 2
    assert "questions 0-3 are one group of which 3 are recorded already" in said[0]
    assert "about 75% of the group's time" in said[0]
    assert "questions 4-7 are one group of which 2 are recorded already" in said[1]
    assert not any("skips them" in m for m in said)  # no group size would: they are scattered
    for i in range(8):
        name = f"chunks/{i:05d}.parquet"
        assert _rows(b / name) == _rows(tmp_path / "ref" / name), name
        assert _meta(b / name) == _meta(tmp_path / "ref" / name), name


def test_a_group_size_that_splits_the_recorded_questions_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 8 questions recorded in groups of 2 and the last two lost: resuming in groups of 4 samples
    # 4-7 again whole
    record(_args(tmp_path / "bank", 2))
    for i in (6, 7):
        (tmp_path / "bank" / "chunks" / f"{i:05d}.parquet").unlink()
    with caplog.at_level("WARNING", logger="env.bank.record"):
        record(_args(tmp_path / "bank", 2, group_size=4))
    said = [r.getMessage() for r in caplog.records if "sampled whole again" in r.getMessage()]
    assert len(said) == 1
    assert "questions 4-7 are one group of which 2 are recorded already" in said[0]
    assert "a --group-size that divides 6 (e.g. 3)" in said[0]


def test_a_negative_group_size_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--group-size must be 0"):
        record(_args(tmp_path / "bank", 2, group_size=-1))
    assert not (tmp_path / "bank").exists()
