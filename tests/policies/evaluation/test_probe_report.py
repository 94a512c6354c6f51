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
    assert "its answer's share of the vote" in text
    assert "probe-weighted vote share - its answer's share of the vote" in text
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
    # the points chosen on dev are noted beside the states, for `ponder run` to refit
    from env.probes.choices import CHOICES_FILE, ProbeChoices

    noted = ProbeChoices.load(hs.path / CHOICES_FILE)
    assert noted.chain_layers == chain.layers and noted.c == chain.params["C"]
    assert f"the choices noted in {hs.path / CHOICES_FILE}" in text


def test_vote_shares_are_each_chains_share_of_its_answers_vote(tmp_path: Path) -> None:
    import numpy as np

    from env.probes import boundary_set
    from policies.evaluation.probes import vote_shares

    bank, hs = planted_bank(tmp_path / "bank", n_train=4, n_test=3, chains=6)
    every = boundary_set(bank, hs, select_split(bank.questions, "test"))
    last = every.take(every.last)
    ones = np.ones(len(last))
    share, weighted = vote_shares(bank, last, ones)
    assert share.max() > 0
    np.testing.assert_allclose(weighted, share)  # equal weights: the plain vote
    for i, (g, c) in enumerate(zip(last.question, last.chain, strict=True)):
        chains = bank[last.qids[g]].chains
        mine = next(ch.answer for ch in chains if ch.chain == c)
        want = 0.0 if mine is None else sum(ch.answer == mine for ch in chains) / len(chains)
        assert share[i] == pytest.approx(want)
    # all the weight on one chain: its answer's class gets the whole weighted vote
    p = np.where(np.arange(len(last)) == 0, 1.0, 0.0)
    _, w = vote_shares(bank, last, p)
    g0 = last.question == last.question[0]
    if share[0] > 0:
        assert w[0] == 1.0
    assert ((w[g0] == 0.0) | (w[g0] == 1.0)).all()


def test_a_bank_without_hidden_states_says_what_to_run(tmp_path: Path) -> None:
    bank, _ = planted_bank(tmp_path / "bank", n_train=4, n_test=2, chains=2)
    shutil.rmtree(bank.path / "hidden")
    with pytest.raises(BankError, match="ponder bank annotate"):
        run(ProbesArgs(bank=bank.path, out=tmp_path / "p", boot=10), lambda s: None)


def test_a_bank_it_cannot_write_to_still_gets_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from env.probes.choices import CHOICES_FILE, ProbeChoices

    bank, hs = planted_bank(tmp_path / "bank", n_train=12, n_test=4, chains=4)

    def refuse(self: ProbeChoices, hidden_dir: object) -> Path:
        raise PermissionError(13, "Permission denied", str(hidden_dir))

    monkeypatch.setattr(ProbeChoices, "save", refuse)
    lines: list[str] = []
    report = run(ProbesArgs(bank=bank.path, out=tmp_path / "p", boot=10), lines.append)
    assert "choices" not in report.summary and not (hs.path / CHOICES_FILE).exists()
    assert any("could not be noted" in line and "Permission denied" in line for line in lines)
    assert (tmp_path / "p" / "chain-correctness" / "probe.json").is_file()
