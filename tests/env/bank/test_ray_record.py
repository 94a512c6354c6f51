"""``ponder record --ray``: a bank recorded by actors of a REAL local Ray cluster equals one
recorded in one process; resuming records only what is missing; a worker killed with SIGKILL
mid-recording is restarted, its question retried, and the bank is still the same; questions
recorded side by side (``--questions-at-once``) form the same groups as without Ray; a Ray address
that cannot be used is refused before anything is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray", reason="pip install -e '.[ray]'")

from env.bank.record import RecordArgs, record
from features.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
COMMON = ["--model", "fake", "--dataset", "arith", "--chains", "4", "--max-tokens", "128"]


def _rows(path: Path) -> bytes:
    """A chunk file's rows (without the bank identity in its metadata), NaN bits included."""
    table = pq.read_table(path).replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def assert_same_bank(a: Path, b: Path) -> None:
    files = sorted(p.name for p in (a / "chunks").iterdir())
    assert files == sorted(p.name for p in (b / "chunks").iterdir())
    assert files and all(_rows(a / "chunks" / f) == _rows(b / "chunks" / f) for f in files)


def _ponder_record(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "record", "--out", str(out), *COMMON, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bank recorded in one process (the reference)."""
    out = tmp_path_factory.mktemp("plain") / "bank"
    record(RecordArgs(out=out, model="fake", dataset="arith", n=16, chains=4, max_tokens=128))
    return out


def test_ray_records_the_same_bank_and_resumes(plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "bank"
    args = RecordArgs(
        out=out, model="fake", dataset="arith", n=16, chains=4, max_tokens=128, ray="local"
    )
    record(args)
    assert_same_bank(out, plain)
    # resume: three questions lost, only they are recorded again
    lost = sorted((out / "chunks").iterdir())[3:6]
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").iterdir() if p not in lost}
    for p in lost:
        p.unlink()
    record(args)
    assert_same_bank(out, plain)
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "chunks").iterdir() if p.name in kept
    } == kept


def test_ray_records_the_same_groups_of_questions_side_by_side(tmp_path: Path) -> None:
    from env.bank.schema import SAMPLING_KEY

    common = dict(model="fake", dataset="arith", n=8, chains=4, max_tokens=128)
    record(RecordArgs(out=tmp_path / "plain", questions_at_once=3, **common))  # type: ignore[arg-type]
    out = tmp_path / "ray"
    record(RecordArgs(out=out, questions_at_once=3, ray="local", **common))  # type: ignore[arg-type]
    assert_same_bank(out, tmp_path / "plain")
    for p in (out / "chunks").iterdir():
        mine = pq.read_schema(p).metadata[SAMPLING_KEY]
        assert mine == pq.read_schema(tmp_path / "plain" / "chunks" / p.name).metadata[SAMPLING_KEY]


@pytest.mark.timeout(600)
def test_a_worker_killed_mid_recording_changes_nothing(plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "bank"
    # (the fake engine at 3 ms a token: seconds per question, time to kill a worker mid-way)
    proc = _ponder_record(out, "--n", "16", "--ray", "local", "--ray-workers", "2",
                          "--fake-token-ms", "3")  # fmt: skip
    try:
        victim = None
        while victim is None:  # (the test's timeout bounds a hang)
            assert proc.poll() is None, proc.communicate()[0][-2000:]
            done = list((out / "chunks").glob("*.parquet")) if (out / "chunks").exists() else []
            if len(done) >= 2:
                pids = subprocess.run(
                    ["pgrep", "-f", "ray::RecordWorker"], capture_output=True, text=True
                ).stdout.split()
                victim = int(pids[0]) if pids else None
            time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "16 of 16 questions recorded" in output
    assert_same_bank(out, plain)


def test_a_ray_address_that_cannot_be_used_is_refused_first(tmp_path: Path) -> None:
    out = tmp_path / "bank"
    with pytest.raises(ConfigError, match="cannot reach the Ray cluster"):
        record(RecordArgs(out=out, model="fake", n=8, ray="127.0.0.1:1"))
    with pytest.raises(ConfigError, match="give local"):
        record(RecordArgs(out=out, model="fake", n=8, ray="not an address"))
    with pytest.raises(ConfigError, match="ray-workers"):
        record(RecordArgs(out=out, model="fake", n=8, ray="local", ray_workers=0))
    assert not out.exists()
