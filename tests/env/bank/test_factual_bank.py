"""A bank of factual questions keeps each question's answer aliases (they are not in the bank's
questions file: they come back from the shipped set)."""

from __future__ import annotations

from pathlib import Path

from env.bank.maintain import correct_mismatches
from env.bank.record import RecordArgs, record
from env.bank.store import TraceBank
from env.questions import load_factual


def test_a_factual_bank_scores_with_the_aliases(tmp_path: Path) -> None:
    path = record(
        RecordArgs(
            out=tmp_path / "f",
            model="fake",
            dataset="factual",
            splits=("train", "test"),
            n=3,
            chains=2,
        )
    )
    bank = TraceBank(path)
    shipped = {q.qid: q for q in load_factual(None)}
    assert len(bank) == 6
    for qt in bank:
        q = qt.question
        assert q.accepted and q.accepted == shipped[q.qid].accepted
        alias = q.accepted[-1]
        assert q.is_right(alias) and not q.is_right("42")
    assert correct_mismatches(bank) == []  # the stored `correct` is the aliases' verdict
