"""The bank lock: one writer per bank folder; a stale lock is taken over.

Before the lock, two `ponder record` on one folder both recorded every question and overwrote
each other's files, breaking the promise that a written question is never rewritten.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from env.bank.lock import LOCK_NAME, BankLock, _proc_start
from env.bank.maintain import compact, stamp
from env.bank.store import TraceBank
from features.errors import BankError

ROOT = Path(__file__).resolve().parents[3]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

MakeBank = Callable[..., TraceBank]
RecordCmd = Callable[..., list[str]]  # the `record_cmd` fixture (conftest.py)


def _files(bank: Path) -> dict[str, tuple[int, int, bytes]]:
    """Each chunk file's inode, modification time and bytes: a rewrite changes them."""
    out = {}
    for p in sorted((bank / "chunks").glob("*.parquet")):
        st = p.stat()
        out[p.name] = (st.st_ino, st.st_mtime_ns, p.read_bytes())
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(bank: Path, **fields: object) -> None:
    bank.mkdir(parents=True, exist_ok=True)
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": "ponder record",
        "started": "2026-01-01T00:00:00+00:00",
        "pid_start": "",
        "token": "t",
        **fields,
    }
    (bank / LOCK_NAME).write_text(json.dumps(owner))


@pytest.mark.timeout(300)  # hang guard for the polling loop (not a speed target)
def test_second_recorder_on_one_folder_is_refused_and_rewrites_nothing(
    tmp_path: Path, record_cmd: RecordCmd
) -> None:
    bank = tmp_path / "bank"
    n = 200  # questions: the first recorder is still at it when the second starts
    first = subprocess.Popen(
        record_cmd(bank, n=n), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while len(list((bank / "chunks").glob("*.parquet"))) < 2:  # hang: the test's timeout
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.01)
        owner = BankLock(bank, "test").read_owner()
        assert owner is not None and owner.pid == first.pid
        before = _files(bank)

        second = subprocess.run(
            record_cmd(bank, n=n), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert first.poll() is None  # the first was still recording throughout
        assert second.returncode != 0
        assert f"is locked by pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "ponder record" in second.stderr and "Nothing was changed" in second.stderr
        after = _files(bank)
        assert {k: after[k] for k in before} == before  # nothing rewritten
        assert BankLock(bank, "test").read_owner() == owner
        with pytest.raises(BankError, match=f"locked by pid {first.pid}"):
            compact(bank)
        with pytest.raises(BankError, match=f"locked by pid {first.pid}"):
            stamp(bank)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
        first.wait()

    # Killed without releasing: its lock is stale, and the next recorder takes it over.
    assert (bank / LOCK_NAME).exists()
    recorded = _files(bank)
    third = subprocess.run(
        record_cmd(bank, "--limit-minutes", "0.0001", n=n),
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert third.returncode == 0, third.stderr
    assert f"took over the stale lock {bank / LOCK_NAME} of pid {first.pid}" in third.stderr
    after = _files(bank)
    assert {k: after[k] for k in recorded} == recorded
    assert len(after) > len(recorded)
    assert not (bank / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead)
    with caplog.at_level(logging.WARNING), BankLock(tmp_path, "ponder record") as lock:
        assert lock.owner is not None and lock.owner.pid == os.getpid()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"took over the stale lock {tmp_path / LOCK_NAME} of pid {dead}" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_reused_pid_is_stale(tmp_path: Path) -> None:
    # The pid is alive (this process) but started at another time: a pid reused after the
    # owner died (e.g. after a reboot).
    if not _proc_start(os.getpid()):
        pytest.skip("no /proc here")
    _write_lock(tmp_path, pid_start="1")
    with BankLock(tmp_path, "ponder record"):
        pass


def test_live_owner_is_named_and_its_lock_kept(tmp_path: Path) -> None:
    with BankLock(tmp_path, "ponder record") as held:
        content = (tmp_path / LOCK_NAME).read_text()
        with pytest.raises(BankError, match=f"locked by pid {os.getpid()} on host") as e:
            BankLock(tmp_path, "ponder bank annotate").acquire()
        assert "(ponder record, since " in str(e.value)
        assert (tmp_path / LOCK_NAME).read_text() == content
        assert held.read_owner() == held.owner


def test_lock_of_another_host_is_never_taken_over(tmp_path: Path) -> None:
    _write_lock(tmp_path, pid=_dead_pid(), host="elsewhere")
    with pytest.raises(BankError, match="on host elsewhere") as e:
        BankLock(tmp_path, "ponder record").acquire()
    assert "delete the lock file by hand" in str(e.value)
    assert (tmp_path / LOCK_NAME).exists()


def test_lock_is_released_on_exceptions(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), BankLock(tmp_path / "new", "ponder record"):
        assert (tmp_path / "new" / LOCK_NAME).exists()
        raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()  # made for the lock, empty: removed again
    with BankLock(tmp_path, "ponder record"):
        pass  # and it can be taken again
