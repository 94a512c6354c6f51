"""Trace bank: record, replay exactly, resume after kill -9, clear errors on damaged banks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from env.bank.maintain import summarize
from env.bank.record import RecordArgs, record
from env.bank.store import TraceBank
from env.bank.synthetic import record_fake_bank, record_fake_question
from env.bank.writer import BankWriter
from env.generators.replay import ReplayGenerator
from env.questions import load_testbed
from features.errors import BankError, BudgetExhausted, ConfigError

ROOT = Path(__file__).resolve().parents[3]
K, T, CAP = 4, 16, 128
RecordCmd = Callable[..., list[str]]  # the `record_cmd` fixture (conftest.py)


@pytest.fixture
def recorded(tmp_path: Path):
    """A small bank recorded from the fake generator, and the live chains it came from (the
    fake records a question the same way every time)."""
    questions = load_testbed("test", 1)[:3]
    bank = record_fake_bank(tmp_path / "bank", questions, chains=K, chunk_tokens=T, max_tokens=CAP)
    live = {q.qid: record_fake_question(q, bank.manifest) for q in questions}
    return bank, questions, live


def test_bank_round_trip_is_exact(recorded) -> None:
    bank, questions, live = recorded
    assert len(bank) == 3
    for q in questions:
        trace = bank[q.qid]
        cols = live[q.qid]
        assert trace.k == K
        rows = [
            r
            for ch in trace.chains
            for r in zip(
                *(ch.rows[k] for k in ("chain", "chunk", "text", "token_ids")), strict=True
            )
        ]
        assert sorted(rows) == sorted(
            zip(cols["chain"], cols["chunk"], cols["text"], cols["token_ids"], strict=True)
        )
        assert sum(c.main_tokens for c in trace.chains) == sum(
            n for n, e in zip(cols["n_tokens"], cols["ext"], strict=True) if not e
        )


def test_replay_reproduces_recorded_chunks(recorded) -> None:
    bank, questions, _ = recorded
    gen = ReplayGenerator(bank, seed=3)
    q = questions[0]
    chains = gen.start(q, K)
    while any(not c.finished for c in chains):
        gen.extend([c for c in chains if not c.finished], T)
    for c in chains:
        ct = bank[q.qid].chains[c.handle]
        n = ct.n_main
        assert [ch.text for ch in c.chunks] == ct.rows["text"][:n]
        assert [ch.token_ids.tolist() for ch in c.chunks] == ct.rows["token_ids"][:n]
        assert [len(ch) for ch in c.chunks] == ct.rows["n_tokens"][:n]
        assert [ch.usage.prefill for ch in c.chunks] == ct.rows["prefill"][:n]
        for ch, lp in zip(c.chunks, ct.rows["logprob"][:n], strict=True):
            np.testing.assert_array_equal(ch.logprobs, np.asarray(lp, dtype=np.float32))
        probes = gen.probe([c])
        assert probes[0].answer == ct.rows["probe_answer"][n - 1]


def test_replay_same_seed_same_episode(recorded) -> None:
    bank, questions, _ = recorded

    def episode(seed: int) -> list[tuple[int | None, str]]:
        gen = ReplayGenerator(bank, seed=seed)
        chains = gen.start(questions[1], 2)
        gen.extend(chains, T)
        more = gen.branch(chains[0], 1, at=0)
        gen.extend(more, T)
        return [(c.handle, c.text) for c in chains + more]

    assert episode(7) == episode(7)
    orders = {tuple(h for h, _ in episode(s)) for s in range(12)}
    assert len(orders) > 1  # the seed does choose which chains are handed out


def test_replay_budget_edges(recorded) -> None:
    bank, questions, _ = recorded
    gen = ReplayGenerator(bank, seed=0)
    q = questions[0]
    gen.start(q, K - 1)
    with pytest.raises(BudgetExhausted, match="holds 4 chains"):
        gen.start(q, 2)
    with pytest.raises(ConfigError, match="chunks of 16"):
        gen.extend(gen.start(q, 1), 8)
    gen.reset(0)
    chain = gen.start(q, 1)[0]
    gen.extend([chain], T)
    with pytest.raises(BudgetExhausted, match="recorded branches"):
        gen.branch(chain, 1)


def test_replay_budget_forcing_serves_the_recorded_extension(recorded) -> None:
    from env.types import BudgetForcing

    bank, questions, _ = recorded
    gen = ReplayGenerator(bank, seed=0)
    chain = gen.start(questions[0], 1, budget=BudgetForcing(min_tokens=CAP, max_tokens=CAP))[0]
    ct = bank[questions[0].qid].chains[chain.handle]
    assert ct.n_chunks > ct.n_main  # the recording holds an extension
    with pytest.raises(BudgetExhausted, match="budget-forced"):
        for _ in range(50):
            gen.extend([chain], T)
    assert any(ch.n_injected > 0 for ch in chain.chunks)
    assert "Wait," in chain.text


def test_corrupt_chunk_file_is_named_and_kept(recorded, tmp_path: Path) -> None:
    bank, questions, _ = recorded
    path = bank.chunk_file(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BankError, match=r"00001\.parquet is corrupt"):
        TraceBank(bank.path)[questions[1].qid]
    with pytest.raises(BankError, match=r"00001\.parquet is corrupt"):
        BankWriter(bank.path, bank.manifest, questions).done(1)
    assert path.read_bytes() == data[: len(data) // 2]  # nothing overwritten


def test_unknown_schema_version(recorded) -> None:
    bank, _, _ = recorded
    m = json.loads((bank.path / "manifest.json").read_text())
    m["schema_version"] = 99
    (bank.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BankError, match=r"manifest\.json has schema version 99"):
        TraceBank(bank.path)


def test_model_sha_mismatch_refuses_to_resume(recorded) -> None:
    bank, questions, _ = recorded
    before = {p.name: p.read_bytes() for p in (bank.path / "chunks").iterdir()}
    other = replace(bank.manifest, model={**bank.manifest.model, "sha256": "other"})
    with pytest.raises(BankError, match="model sha256"):
        BankWriter(bank.path, other, questions)
    assert {p.name: p.read_bytes() for p in (bank.path / "chunks").iterdir()} == before


def test_not_a_bank(tmp_path: Path) -> None:
    with pytest.raises(BankError, match="does not exist"):
        TraceBank(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BankError, match=r"manifest\.json is missing"):
        TraceBank(tmp_path / "empty")


def test_summary_counts(recorded) -> None:
    bank, _, _ = recorded
    s = summarize(bank)
    assert s["all"]["questions"] == 3
    assert s["all"]["chains"] == 3 * K
    assert 0.0 <= s["all"]["pass@1"] <= s["all"]["pass@k"] <= 1.0


def _tables(path: Path) -> dict[str, bytes]:
    """Each question file's bytes (the Parquet writer is deterministic; NaNs compare equal)."""
    return {p.name: p.read_bytes() for p in sorted((path / "chunks").glob("*.parquet"))}


def _values(path: Path) -> dict[str, bytes]:
    """Each question file's bytes with the bank's random id set aside (after checking every file
    carries it): two banks recorded alike hold the same values and the same other metadata."""
    import pyarrow.parquet as pq

    from env.bank.writer import encode_chunk_table

    bank_id = json.loads((path / "manifest.json").read_text())["bank_id"].encode()
    out = {}
    for p in sorted((path / "chunks").glob("*.parquet")):
        table = pq.read_table(p)
        meta = dict(table.schema.metadata)
        assert meta.pop(b"ponder.bank_id") == bank_id
        out[p.name] = encode_chunk_table(table.replace_schema_metadata(meta))
    return out


def test_kill_9_then_resume_equals_uninterrupted(tmp_path: Path, record_cmd: RecordCmd) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        record_cmd(tmp_path / "a", n=24), check=True, env=env, cwd=ROOT, capture_output=True
    )
    reference = _values(tmp_path / "a")
    assert len(reference) == 24

    # Each run is killed once the bank holds a given number of questions (then a random few
    # milliseconds later, so some kills land inside a write): a fixed delay is blind to how
    # fast the machine is (the whole recording takes ~2 s on an idle one, start-up included).
    b = tmp_path / "b"
    rng = np.random.default_rng(0)
    kills = 0
    for target in sorted(rng.choice(np.arange(2, 20), size=5, replace=False)):
        proc = subprocess.Popen(
            record_cmd(b, n=24),
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list((b / "chunks").glob("*.parquet"))) >= target:
                break
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0.0, 0.04)))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert 0 < len(_tables(b)) < 24  # it was killed part-way
    subprocess.run(record_cmd(b, n=24), check=True, env=env, cwd=ROOT, capture_output=True)
    assert kills >= 3
    assert not list((b / "chunks").glob("*.tmp"))
    assert not (b / "bank.lock").exists()
    assert _values(b) == reference


def test_record_api_resumes_and_rejects_changed_settings(tmp_path: Path) -> None:
    args = RecordArgs(
        out=tmp_path / "bank", model="fake", n=8, chains=2, chunk_tokens=8, max_tokens=64
    )
    record(args)
    first = _tables(tmp_path / "bank")
    record(args)  # nothing left to do
    assert _tables(tmp_path / "bank") == first
    with pytest.raises(BankError, match="chains: 2 vs 3"):
        record(
            RecordArgs(
                out=tmp_path / "bank", model="fake", n=8, chains=3, chunk_tokens=8, max_tokens=64
            )
        )


def test_bank_info_cli(recorded) -> None:
    bank, _, _ = recorded
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [sys.executable, "-m", "env.bank.cli", str(bank.path)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
    ).stdout
    assert "pass@1" in out and "maj@4" in out and "all" in out
    # Piped, the table is as wide as on a wide terminal: no header cut to "difficu…"
    assert "difficulty" in out and "questions" in out and "tokens/chain" in out
    assert "…" not in out


def _same(a: object, b: object) -> bool:
    """Equal, with NaN equal to NaN (float columns keep their NaNs through a rewrite)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


def test_compact_rewrites_smaller_and_reads_back_the_same(recorded, capsys) -> None:
    import pyarrow.parquet as pq

    from controller.cli import main as ponder
    from env.bank.maintain import compact

    bank, questions, _ = recorded
    for i in range(len(questions)):  # as ponder before byte-stream-split wrote them
        path = bank.chunk_file(i)
        pq.write_table(pq.read_table(path), path, compression="zstd", compression_level=9)
    before = {q.qid: TraceBank(bank.path)[q.qid] for q in questions}
    sizes = {p.name: p.stat().st_size for p in (bank.path / "chunks").iterdir()}

    assert ponder(["bank", "compact", str(bank.path)]) == 0
    assert f"{len(questions)} of {len(questions)} chunk files rewritten" in capsys.readouterr().out
    after = TraceBank(bank.path)
    for q in questions:
        old, new = before[q.qid], after[q.qid]
        assert _same([c.rows for c in new.chains], [c.rows for c in old.chains])
        assert [(c.answer, c.correct) for c in new.chains] == [
            (c.answer, c.correct) for c in old.chains
        ]
    assert all(p.stat().st_size < sizes[p.name] for p in (bank.path / "chunks").iterdir())
    assert list((bank.path / "chunks").glob("*.tmp")) == []
    # What the writer writes now is already compact: a second pass changes nothing.
    again = compact(bank.path)
    assert (again.files, again.rewritten, again.before) == (len(questions), 0, again.after)


def test_compact_refuses_a_corrupt_file_and_changes_nothing(recorded) -> None:
    from env.bank.maintain import compact

    bank, _, _ = recorded
    path = bank.chunk_file(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BankError, match=r"00001\.parquet is corrupt or truncated"):
        compact(bank.path)
    assert path.read_bytes() == data[: len(data) // 2]
    with pytest.raises(BankError, match="not a trace bank"):
        compact(bank.path / "chunks")
