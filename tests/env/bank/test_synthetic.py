"""env.bank.synthetic: a hand-made or fake-recorded bank is a bank like a recorded one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from env.bank.cli import BankInfoArgs, info
from env.bank.identity import question_sha256
from env.bank.maintain import correct_mismatches
from env.bank.store import TraceBank
from env.bank.synthetic import (
    SyntheticChunk,
    record_fake_bank,
    synthetic_manifest,
    write_synthetic_bank,
)
from env.generators.replay import ReplayGenerator
from env.questions import load_questions
from env.types import Question
from features.errors import ConfigError

T = 8
Q = [Question(f"hand/test/{i}", f"question {i}", gold, "hand", 1) for i, gold in enumerate("73")]
CHAINS = [
    [  # question 0: right at its end, then a forced extension that answers otherwise
        [("Let me see. ", T, "length", "3", 2), ("\\boxed{7}", 5, "stop", "7", 2),
         ("Wait, \\boxed{4}", T, "length", "4", 2)],
        [SyntheticChunk("so \\boxed{2}", 6, "stop", None, confidence=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                        judge_p_yes=float("nan"))],
    ],
    [  # question 1: wrong, capped
        [("a", T, "length"), ("b", T, "cap", "3", 1)],
    ],
]  # fmt: skip


def _check_bank(bank: TraceBank, questions: list[Question]) -> None:
    """Loads, passes `ponder bank info`'s correctness check, and carries a real bank's identity."""
    assert [q.qid for q in bank.questions] == [q.qid for q in questions]
    assert correct_mismatches(bank) == []
    info(BankInfoArgs(bank.path, json=True))
    m = bank.manifest
    assert m.bank_id and m.fingerprint == m.settings_fingerprint()
    for i, q in enumerate(questions):
        meta = pq.read_metadata(bank.chunk_file(i)).metadata
        assert meta[b"ponder.bank_id"] == m.bank_id.encode()
        assert meta[b"ponder.fingerprint"] == m.fingerprint.encode()
        assert meta[b"ponder.question_sha256"] == question_sha256(q).encode()
    gen = ReplayGenerator(bank)
    for qt in bank:  # every chain replays as written
        chains = gen.start(qt.question, qt.k)
        while open_ := [c for c in chains if not c.finished]:
            gen.extend(open_, m.chunk_tokens)
        for c in chains:
            ct = qt.chains[c.handle]
            assert [ch.text for ch in c.chunks] == ct.rows["text"][: ct.n_main]
            assert [len(ch) for ch in c.chunks] == ct.rows["n_tokens"][: ct.n_main]


def test_written_bank_derives_the_recorders_columns(tmp_path: Path, capsys) -> None:
    bank = write_synthetic_bank(tmp_path / "b", list(zip(Q, CHAINS, strict=True)), chunk_tokens=T)
    _check_bank(bank, Q)
    assert "warning" not in capsys.readouterr().err
    assert bank.manifest == synthetic_manifest(
        [q.qid for q in Q],
        dataset="hand",
        chains=2,
        chunk_tokens=T,
        bank_id=bank.manifest.bank_id,
        fingerprint=bank.manifest.fingerprint,
    )
    first, second = bank[Q[0].qid].chains
    r = first.rows
    assert r["ext"] == [False, False, True] and r["start"] == [0, T, T + 5]
    assert r["n_injected"] == [0, 0, 2] and r["token_ids"][1] == [0, 1, 2, 3, 4]
    assert r["probe_text"] == ["3}", "7}", "4}"] and r["probe_correct"] == [False, True, False]
    assert (first.answer, first.correct) == ("7", True)  # the answer at the chain's own end
    assert (second.answer, second.correct) == ("2", False)
    np.testing.assert_array_equal(second.rows["confidence"][0], [1, 2, 3, 4, 5, 6])
    assert np.isnan(second.rows["judge_p_yes"][0]) and second.rows["entropy"][0] == [0.5] * 6
    assert bank[Q[1].qid].chains[0].answer is None


def test_all_wrong_stores_every_chain_wrong(tmp_path: Path, capsys) -> None:
    bank = write_synthetic_bank(
        tmp_path / "b", list(zip(Q, CHAINS, strict=True)), all_wrong=True, chunk_tokens=T
    )
    assert not any(c.correct or any(c.rows["probe_correct"]) for qt in bank for c in qt.chains)
    assert [(qid, chains) for _, qid, chains in correct_mismatches(bank)] == [(Q[0].qid, [0])]
    info(BankInfoArgs(bank.path, json=True))
    assert "disagrees" in capsys.readouterr().err


def test_per_token_values_must_fit_the_chunk(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="entropy: 2 per-token values for a chunk of 3 tokens"):
        write_synthetic_bank(tmp_path / "b", [(Q[0], [[SyntheticChunk("x", 3, entropy=[1, 2])]])])


def test_fake_recorded_bank(tmp_path: Path) -> None:
    questions = load_questions("arith", "test", 8, seed=0)[:2]
    bank = record_fake_bank(tmp_path / "b", questions, seed=3)
    _check_bank(bank, questions)
    assert bank.manifest.model["name"] == "fake" and bank.manifest.dataset == "arith"
    assert bank.manifest.seed == 3 and all(qt.k == 4 for qt in bank)
    again = record_fake_bank(tmp_path / "c", questions, seed=3)
    for q in questions:
        assert [c.rows["token_ids"] for c in again[q.qid].chains] == [
            c.rows["token_ids"] for c in bank[q.qid].chains
        ]
