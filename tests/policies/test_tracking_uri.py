"""A tracking URI that cannot take runs fails at once, in one line naming it (issue 26)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from features.errors import ConfigError
from policies.tracking import Tracker, check_tracking_uri

ROOT = Path(__file__).resolve().parents[2]
BANK = ROOT / "data" / "banks" / "testbed-arith"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# MLflow alone retried for about 4 minutes; the check gives up within its 5 s timeout. The
# bound is a hang guard (pytest-timeout), not a performance target.
@pytest.mark.timeout(60)
def test_a_server_with_nothing_listening_is_named_at_once() -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ConfigError, match=f"{uri} did not answer"):
        Tracker(experiment="x", tracking_uri=uri)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_sqlite_folder_is_named(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ConfigError, match="not writable"):
        check_tracking_uri(f"sqlite:///{ro}/mlflow.db")


def test_a_sqlite_path_under_a_file_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot create"):
        check_tracking_uri(f"sqlite:///{blocker}/sub/mlflow.db")


def test_a_writable_local_store_passes(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert check_tracking_uri(uri) == uri
    assert (tmp_path / "runs").is_dir()


def test_ponder_evaluate_gives_a_one_line_error(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "controller.cli", "evaluate", "--policy", "best-of-2"]
    cmd += ["--bank", str(BANK)]
    cmd += ["--tracking-uri", uri]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and uri in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
