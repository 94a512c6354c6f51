"""The results file and the README's report: the main job's entry point run twice with the same
seeds writes the same results (apart from timings and provenance), `ponder report` renders the
README from results files alone, and the README's numbers are the committed results' numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from features.errors import ConfigError
from policies.evaluation.markdown import (
    blocks,
    end_marker,
    render,
    replace_blocks,
    start_marker,
)
from policies.evaluation.results import (
    SCHEMA,
    VOLATILE,
    comparable,
    dumps,
    num,
    read_results,
    to_float,
    write_results,
)
from policies.report_cli import report_main

ROOT = Path(__file__).resolve().parents[2]
BANK = ROOT / "data" / "banks" / "testbed-arith"


def _run(out: Path, cwd: Path, *extra: str) -> dict[str, Any]:
    """The main job's real entry point, tiny: 2 training seeds, 2 replay seeds, 2 λ values."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "run",
            "--bank",
            str(BANK),
            "--quick",
            "--train-seeds",
            "2",
            "--seeds",
            "2",
            "--refine",
            "0",
            "--out",
            str(out),
            "--no-track",
            "--no-progress",
            *extra,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def twice(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two runs with the same seeds: one training at a time, then two at once (in worker
    processes)."""
    tmp = tmp_path_factory.mktemp("twice")
    return _run(tmp / "a", tmp, "--jobs", "1"), _run(tmp / "b", tmp, "--jobs", "2")


def test_same_seeds_same_results_file(twice: tuple[dict[str, Any], dict[str, Any]]) -> None:
    a, b = twice
    assert a["timings"]["jobs"] == 1 and b["timings"]["jobs"] == 2
    assert comparable(a) == comparable(b)
    assert set(VOLATILE) <= set(a) and comparable(a).keys() == a.keys() - set(VOLATILE)
    # the sections a reader needs
    assert a["schema"] == SCHEMA and a["bank"]["name"] == "testbed-arith"
    assert a["settings"]["train_seeds"] == [0, 10000] and a["settings"]["replay_seeds"] == [0, 1]
    prov = a["provenance"]
    assert prov["machine"]["cores"] >= 1 and prov["machine"]["cpu"]
    assert prov["packages"]["numpy"] and prov["packages"]["torch"]
    assert prov["packages"]["scikit-learn"] and prov["date"]
    # the testbed bank has hidden states: every learned family trains with them too
    base = {"value-chain", "ppo", "ppo-chain", "stop-chain"}
    learned = base | {f"{f}-hidden" for f in base}
    assert set(a["timings"]["train_s"]) == learned
    # every learned point carries its training seed; a heuristic's none
    for fam, f in a["families"].items():
        seeds = {p["train_seed"] for p in f["points"]}
        assert seeds == ({0, 10000} if f["kind"] == "learned" else {None}), fam
    head = a["headline"]["ppo-chain"]
    assert head["seeds"] == [0, 10000] and len(head["tokens_to_match_per_seed"]) == 2
    assert head["representative_seed"] in (0, 10000)
    assert head["diffs"] and all(len(d["per_seed"]) == 2 for d in head["diffs"])
    assert {t["family"] for t in a["targets"]} == learned | {"any-learned"}
    assert a["settings"]["training"]["ppo-chain-hidden"]["hidden_probes"] == "hidden-probes"
    # the testbed's questions have levels 1-8: each family's point splits its tokens per level
    split = a["token_split"]
    assert split["levels"]["L1"] == "easy" and split["levels"]["L8"] == "hard"
    assert set(split["families"]) == set(a["headline"])
    for fam, f in split["families"].items():
        assert f["label"] == a["headline"][fam]["shown"]["label"], fam
        for lv, x in f["by_level"].items():
            assert 0 <= x["deep"] + x["wide"] <= x["tokens"], (fam, lv)
    assert any(x["wide"] > 0 for x in split["families"]["best-of-N"]["by_level"].values())
    assert all("deep" in x for x in a["reference"]["by_level"].values())


def test_report_renders_and_rewrites_the_readme(
    twice: tuple[dict[str, Any], dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = twice[0]
    res = tmp_path / "results"
    write_results(res / "testbed-arith.json", doc)
    assert read_results(res / "testbed-arith.json") == doc
    readme = tmp_path / "README.md"
    key = "testbed-arith"
    readme.write_text(
        f"# x\n\nbefore\n{start_marker(key)}\nold numbers\n{end_marker(key)}\nafter\n"
    )
    assert report_main(["--results-dir", str(res), "--readme", str(readme), "--write-readme"]) == 0
    text = readme.read_text()
    assert blocks(text) == {key: render(doc)}
    assert text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "old numbers" not in text
    body = render(doc)
    for needle in (
        "| family | tokens to match maj@16",
        "ppo-chain (learned)",
        "per training seed",
        "Learned minus the best heuristic",
        "above 0 with 95% confidence at",
        "any-learned",
        "with 2 seeds (0, 10000)",
        "| L1 | easy: stop |",
    ):
        assert needle in body, needle
    # printing: the block with its markers; figures from the file alone
    figs = tmp_path / "figs"
    assert report_main(["--results-dir", str(res), "--figures", str(figs)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(start_marker(key)) and body in printed
    for name in ("frontier.png", "difficulty.png"):
        assert (figs / key / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "other.md"
    other.write_text("no markers\n")
    with pytest.raises(ConfigError, match="no block for testbed-arith"):
        report_main(["--results-dir", str(res), "--readme", str(other), "--write-readme"])
    with pytest.raises(ConfigError, match="no results file for other"):
        report_main(["--results-dir", str(res), "--bank", "other"])
    (res / "bad.json").write_text('{"schema": 0}')
    with pytest.raises(ConfigError, match="results schema 0"):
        read_results(res / "bad.json")


def test_layout_is_compact_and_exact() -> None:
    doc = {"a": [1.5, None, "inf"], "b": {"c": [{"d": 1}, {"d": 2}]}, "e": list(range(60))}
    text = dumps(doc)
    assert json.loads(text) == doc
    assert '"a": [1.5, null, "inf"]' in text and '  {"d": 1},' in text
    assert max(len(line) for line in text.splitlines()) <= 160


def test_numbers_json_cannot_hold() -> None:
    assert [num(x) for x in (1.5, math.nan, math.inf, -math.inf, None)] == [
        1.5, None, "inf", "-inf", None,
    ]  # fmt: skip
    assert math.isnan(to_float(None)) and to_float("inf") == math.inf and to_float(2) == 2.0
    assert num(1 / 3) == 0.33333333 and num(5020.36220472441) == 5020.3622  # 8 digits


def test_replace_blocks_keeps_the_rest() -> None:
    text = f"a\n{start_marker('b1')}\nx\n{end_marker('b1')}\nc\n"
    assert (
        replace_blocks(text, {"b1": "y\n"})
        == f"a\n{start_marker('b1')}\ny\n{end_marker('b1')}\nc\n"
    )
    assert blocks(text) == {"b1": "x\n"}


def test_readme_numbers_are_the_committed_results() -> None:
    """Every committed results file has its block in the README, rendered from it exactly (run
    `ponder report --write-readme` after `ponder run`), and every block has its file."""
    readme = blocks((ROOT / "README.md").read_text())
    files = {p.stem: p for p in sorted((ROOT / "results").glob("*.json"))}
    assert set(readme) == set(files), (
        f"README blocks {sorted(readme)} and results files {sorted(files)} differ: "
        "run `ponder report --write-readme`, or add the bank's markers to the README"
    )
    for name, path in files.items():
        assert readme[name] == render(read_results(path)), (
            f"the README's {name} report differs from {path}: run `ponder report --write-readme`"
        )


def test_ray_gives_the_same_results_file(
    twice: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    """`ponder run --ray local`: the trainings and the evaluation sweeps as tasks of a real local
    Ray cluster (two evaluation actors); the results file equals the one made without Ray."""
    pytest.importorskip("ray", reason="pip install -e '.[ray]'")
    a, _ = twice
    c = _run(tmp_path / "c", tmp_path, "--ray", "local", "--ray-workers", "2")
    assert comparable(c) == comparable(a)
