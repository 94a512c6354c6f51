"""The notebooks run top to bottom (they import the packages and define no logic of their own)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


#: Notebooks that read the MLflow store (the others get an empty one, never the repository's).
READS_STORE = {"01_frontiers.ipynb"}


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MLflow store; for a notebook that reads it, holding one stray ``ponder evaluate``
    run and no main job.

    The frontier notebook must read the newest *main job*, not whatever evaluation runs the store
    holds (a lone evaluation run once made it fail with "no numeric data to plot").
    """
    import subprocess
    import sys

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    if request.node.callspec.params["path"].name not in READS_STORE:
        return db
    subprocess.run(
        [sys.executable, "-m", "controller.cli", "evaluate", "--policy", "probe-agree-2",
         "--bank", str(ROOT / "data" / "banks" / "testbed-arith"), "--seeds", "1"],
        check=True, capture_output=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    return db


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, store: Path) -> None:
    import mlflow
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    if path.name in READS_STORE:
        # it ran the quick main job into the store it was given, and read that job back
        client = mlflow.tracking.MlflowClient(f"sqlite:///{store}")
        mains = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "tags.`ponder.kind` = 'main'"
        )
        assert len(mains) == 1
        text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        assert f"main job {mains[0].info.run_id}" in text


def test_notebooks_define_no_logic() -> None:
    """Analysis only: no function or class definitions in notebook code."""
    import nbformat

    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                for line in c.source.splitlines():
                    assert not line.lstrip().startswith(("def ", "class ")), (path.name, line)
