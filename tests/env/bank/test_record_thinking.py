"""Recording a reasoning model s1-style: the sampled chain ends at the model's own end of
thinking (suppressed), its answer is the probe that closes the section, and the budget-forced
extension thinks on with ``Wait,`` (a scripted reasoning model; the real one is recorded by
``ponder record --template testbed-reasoning``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from env.bank.store import TraceBank
from env.bank.synthetic import record_fake_bank, record_fake_thinking_bank
from env.episode.config import EnvConfig
from env.episode.rules import ended_in_thinking, replay_chain
from env.generators.replay import ReplayGenerator
from env.questions import load_testbed


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> TraceBank:
    return record_fake_thinking_bank(tmp_path_factory.mktemp("think") / "bank")


def test_the_manifest_and_the_replay_know_the_thinking_marker(
    bank: TraceBank, tmp_path: Path
) -> None:
    assert bank.manifest.thinking_end == "</think>"
    assert ReplayGenerator(bank).traits.thinking_end == "</think>"
    plain = record_fake_bank(tmp_path / "plain", load_testbed("test", 1)[:1])
    assert plain.manifest.thinking_end is None
    assert ReplayGenerator(plain).traits.thinking_end is None


def test_the_sampled_chain_ends_where_the_model_ends_its_thinking(bank: TraceBank) -> None:
    for q in bank.questions:
        for ct in bank[q.qid].chains:
            r = ct.rows
            last = ct.n_main - 1
            text = "".join(r["text"][: ct.n_main])
            assert r["finish_reason"][last] == "stop" and ct.finish_reason == "stop"
            # the marker is gone, every piece of it, and the thinking line is whole
            assert "</" not in text and text.endswith("\n")
            assert ended_in_thinking(text, ct.thinking_end)
            # its final answer is what closing the section gives: the probe there
            assert ct.answer == r["probe_answer"][last]
            assert ct.correct == (ct.answer == q.gold)


def test_the_extension_thinks_on_after_wait(bank: TraceBank) -> None:
    m = bank.manifest
    for q in bank.questions:
        for ct in bank[q.qid].chains:
            r = ct.rows
            assert ct.n_chunks - ct.n_main == m.extension_chunks
            first = ct.n_main
            assert r["ext"][first] and r["n_injected"][first] > 0
            assert r["text"][first].startswith("Wait,")
            assert all(r["finish_reason"][i] != "forced" for i in range(ct.n_chunks))


def test_replay_answers_an_end_inside_thinking_with_the_recorded_probe(bank: TraceBank) -> None:
    cfg = EnvConfig(extension_chunks=bank.manifest.extension_chunks)
    for q in bank.questions:
        for ct in bank[q.qid].chains:
            ends = {c.i: c.fold.answer for c in replay_chain(ct, cfg, question=q) if c.ended}
            # the chain's own end, and the end of its recorded extension
            assert set(ends) == {ct.n_main - 1, ct.n_chunks - 1}
            assert ends[ct.n_main - 1] == ct.answer
            assert ends[ct.n_chunks - 1] == ct.rows["probe_answer"][ct.n_chunks - 1]


def test_bank_info_says_what_thinking_past_the_end_buys(bank: TraceBank, tmp_path: Path) -> None:
    from env.bank.cli import BankInfoArgs, info
    from env.bank.maintain import summarize_extension

    ext = summarize_extension(bank)
    # recomputed by hand: every chain of this bank is extended
    rows = []
    for q in bank.questions:
        for ct in bank[q.qid].chains:
            probes = [a for a, e in zip(ct.rows["probe_answer"], ct.rows["ext"], strict=True) if e]
            assert probes
            rows.append((ct.answer == q.gold, probes[-1] == q.gold, q.gold in probes))
    assert ext["all"]["extended"] == 1.0 and ext["all"]["chains"] == len(rows)
    for i, key in enumerate(("at_end", "after", "any")):
        assert ext["all"][key] == pytest.approx(sum(r[i] for r in rows) / len(rows))
    assert ext["all"]["any"] >= max(ext["all"]["at_end"], ext["all"]["after"])
    assert set(ext) == {"all", *(str(q.difficulty) for q in bank.questions)}
    assert info(BankInfoArgs(path=bank.path, json=True))["extension"] == ext
    # a bank recorded without extensions has nothing to say
    plain = record_fake_bank(tmp_path / "plain", load_testbed("test", 1)[:1], extension_chunks=0)
    assert summarize_extension(plain) == {}
    assert "extension" not in info(BankInfoArgs(path=plain.path, json=True))
