"""MLflow on a real PostgreSQL (issue 24): a throwaway cluster on 127.0.0.1, `mlflow server`
with it as the backend store, `ponder run --quick` against the server, and the runs read back;
a wrong password is one clear error before any work starts.

PostgreSQL is Debian's package (``.ci/run`` installs it where it is missing); the cluster runs
as the ``postgres`` user when the tests run as root (``initdb`` refuses root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("psycopg", reason="pip install -e '.[postgres]'")

from env.generators.server import free_port  # noqa: E402
from features.errors import ConfigError  # noqa: E402
from policies.tracking import check_tracking_uri, masked  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BANK = ROOT / "data" / "banks" / "testbed-arith"
PASSWORD = "ponder-test-pw"


def _bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.skip(f"PostgreSQL is not installed ({name} not found): apt-get install postgresql")
    return found


def _as_owner(cmd: list[str]) -> list[str]:
    """``cmd`` run as ``postgres`` when we are root (PostgreSQL refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 with user ``ponder`` and database ``mlflow``: its URI."""
    initdb, pg_ctl, psql = _bin("initdb"), _bin("pg_ctl"), _bin("psql")
    # (not under pytest's temporary folders: those are private to us, and the server runs as
    # the postgres user)
    base = Path(tempfile.mkdtemp(prefix="ponder-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    subprocess.run(
        _as_owner([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    # password authentication over TCP for everyone but the local superuser
    (data / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
    )
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1"
    subprocess.run(
        _as_owner([pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"]),
        check=True,
        capture_output=True,
    )
    try:
        sql = f"CREATE USER ponder PASSWORD '{PASSWORD}'; CREATE DATABASE mlflow OWNER ponder;"
        for stmt in sql.split("; "):
            subprocess.run(
                _as_owner([psql, "-h", str(sock), "-p", str(port), "-U", "postgres", "-c", stmt]),
                check=True,
                capture_output=True,
            )
        yield f"postgresql://ponder:{PASSWORD}@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            _as_owner([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


def test_a_wrong_password_is_one_clear_error(postgres: str, tmp_path: Path) -> None:
    assert check_tracking_uri(postgres) == postgres
    wrong = postgres.replace(PASSWORD, "not-the-password")
    with pytest.raises(ConfigError, match="password authentication failed") as e:
        check_tracking_uri(wrong)
    assert "not-the-password" not in str(e.value) and "ponder:***@" in str(e.value)
    assert masked(wrong).startswith("postgresql://ponder:***@127.0.0.1:")
    # the main job: refused before it trains or evaluates anything
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", "run", "--bank", str(BANK), "--quick",
         "--out", str(tmp_path / "out"), "--tracking-uri", wrong, "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "password authentication failed" in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.timeout(900)
def test_ponder_run_against_mlflow_server_on_postgres(
    postgres: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    artifacts = tmp_path / "artifacts"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        while True:  # (the test's timeout bounds a hang)
            assert server.poll() is None, "mlflow server exited"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        proc = subprocess.run(
            [sys.executable, "-m", "controller.cli", "run", "--bank", str(BANK), "--quick",
             "--out", str(tmp_path / "out"), "--tracking-uri", url, "--no-progress"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        client = mlflow.tracking.MlflowClient(url)
        exp = client.get_experiment_by_name("testbed-arith")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        kinds = [r.data.tags.get("ponder.kind") for r in runs]
        assert kinds.count("main") == 1 and kinds.count("evaluation") >= 30
        # the runs are in PostgreSQL itself: the store read directly, without the server
        direct = mlflow.tracking.MlflowClient(postgres)
        assert len(direct.search_runs([exp.experiment_id], max_results=1000)) == len(runs)
        assert list(artifacts.rglob("episodes.csv"))  # artifacts in the server's store
        print(f"{len(runs)} runs in PostgreSQL, {kinds.count('evaluation')} evaluations")
        # the frontier notebook reads the same job back from the server
        import nbformat
        from nbclient import NotebookClient

        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        nb = nbformat.read(ROOT / "notebooks" / "01_frontiers.ipynb", as_version=4)
        NotebookClient(
            nb, timeout=600, kernel_name="python3",
            resources={"metadata": {"path": str(ROOT / "notebooks")}},
        ).execute()  # fmt: skip
        text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        main = next(r for r in runs if r.data.tags.get("ponder.kind") == "main")
        assert f"main job {main.info.run_id}" in text and url in text
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
