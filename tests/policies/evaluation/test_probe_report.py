"""``ponder probes``: fits, saves, reads back and reports on the test questions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from env.probes import LinearProbe
from env.probes.synthetic import planted_bank
from env.questions import select_split
from features.errors import BankError
from policies.evaluation.probes import ProbesArgs, run


def test_probes_command_on_a_planted_bank(tmp_path: Path) -> None:
    bank, hs = planted_bank(tmp_path / "bank", n_train=20, n_test=8, chains=6)
    lines: list[str] = []
    out = tmp_path / "probes"
    report = run(
        ProbesArgs(bank=bank.path, out=out, boot=50, json=tmp_path / "r.json"), lines.append
    )
    text = "\n".join(lines)
    for title in (
        "Choices on dev",
        "Question difficulty",
        "last main boundary",
        "Paired differences",
        "by layer",
        "How early",
    ):
        assert title in text
    assert "mean token confidence" in text and "self-verifier P(yes)" in text
    assert report.summary["questions"] == {"train": 20, "fit": 15, "dev": 5, "test": 8}
    chain = LinearProbe.load(
        out / "chain-correctness", kind="chain-correctness", hidden=hs.manifest
    )
    LinearProbe.load(out / "difficulty", kind="difficulty", hidden=hs.manifest)
    test = {q.qid for q in select_split(bank.questions, "test")}
    assert len(test) == 8 and not set(chain.meta["questions"]) & test
    last = next(t for t in report.tables if "last main boundary" in t.title)
    auroc = last.rows[0][1]
    assert auroc.mean > 0.9  # type: ignore[union-attr]
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["tables"][0]["title"].startswith("Choices on dev")


def test_a_bank_without_hidden_states_says_what_to_run(tmp_path: Path) -> None:
    bank, _ = planted_bank(tmp_path / "bank", n_train=4, n_test=2, chains=2)
    shutil.rmtree(bank.path / "hidden")
    with pytest.raises(BankError, match="ponder bank annotate"):
        run(ProbesArgs(bank=bank.path, out=tmp_path / "p", boot=10), lambda s: None)
