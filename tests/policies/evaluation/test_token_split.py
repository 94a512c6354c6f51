"""Where a policy's tokens go per difficulty level: deep (past a chain's own end), wide (the
chains after the first), beside the rule of thumb (easy: stop, medium: parallel, hard: serial):
the per-level aggregation, the results file's section, its table, the report and the console."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from env.episode.config import EnvConfig
from policies.evaluation.headline import FamilySummary
from policies.evaluation.markdown import TOKEN_SPLIT_HEADER, render, token_split_table
from policies.evaluation.metrics import Interval
from policies.evaluation.results import (
    PointRecord,
    dumps,
    read_results,
    token_split,
)
from policies.evaluation.runner import (
    RULE_OF_THUMB,
    EvalResult,
    LevelStats,
    difficulty_regimes,
    summarize_scores,
)
from policies.main import print_token_split

ROOT = Path(__file__).resolve().parents[3]
NAN = Interval(float("nan"), float("nan"), float("nan"))


def test_difficulty_regimes_split_the_levels_present_in_terciles() -> None:
    eight = difficulty_regimes(f"L{i}" for i in (8, 1, 2, 3, 4, 5, 6, 7, 3))
    assert eight == {
        **dict.fromkeys(["L1", "L2", "L3"], "easy"),
        **dict.fromkeys(["L4", "L5"], "medium"),
        **dict.fromkeys(["L6", "L7", "L8"], "hard"),
    }
    assert list(eight) == [f"L{i}" for i in range(1, 9)]  # in level order
    assert difficulty_regimes(["L2", "L9", "L10", "L4"]) == {
        "L2": "easy", "L4": "medium", "L9": "medium", "L10": "hard",
    }  # fmt: skip
    assert difficulty_regimes(["L3", "L5"]) == {"L3": "easy", "L5": "hard"}
    assert difficulty_regimes(["L5", "-"]) == {"L5": "medium"}
    assert difficulty_regimes(["-", "-"]) == {}
    assert set(RULE_OF_THUMB) == {"easy", "medium", "hard"}
    assert (RULE_OF_THUMB["easy"], RULE_OF_THUMB["medium"], RULE_OF_THUMB["hard"]) == (
        "stop", "parallel", "serial",
    )  # fmt: skip


def _by_level() -> dict[str, LevelStats]:
    """Questions a (two seeds) and b on level 1, c on level 2."""
    _, _, by = summarize_scores(
        ["a", "a", "b", "c"],
        ["L1", "L1", "L1", "L2"],
        [1.0, 0.0, 1.0, 1.0],
        [100.0, 200.0, 300.0, 400.0],
        n_boot=50,
        deep=[10.0, 30.0, 0.0, 40.0],
        wide=[50.0, 50.0, 100.0, 0.0],
    )
    return by


def test_level_means_of_deep_and_wide_are_over_questions() -> None:
    by = _by_level()
    # level 1: question a's means (150 tokens, 20 deep, 50 wide) and b's (300, 0, 100)
    assert by["L1"].tokens.mean == pytest.approx(225.0)
    assert (by["L1"].deep, by["L1"].wide) == (pytest.approx(10.0), pytest.approx(75.0))
    assert (by["L2"].deep, by["L2"].wide) == (pytest.approx(40.0), pytest.approx(0.0))
    _, _, plain = summarize_scores(["a"], ["L1"], [1.0], [5.0], n_boot=10)
    assert plain["L1"].deep is None and plain["L1"].wide is None  # not counted (the oracle)


def _result(family: str, param: str, by_level: dict[str, LevelStats]) -> EvalResult:
    return EvalResult(
        policy=family, family=family, param=param, bank="b", split="test", seeds=(0,),
        config=EnvConfig(), episodes=[], accuracy=NAN, tokens=NAN, by_level=by_level,
    )  # fmt: skip


def _summary(family: str, best: EvalResult, match: EvalResult | None) -> FamilySummary:
    return FamilySummary(
        family=family, kind="heuristic", points=[best], best=best, match=match,
        tokens_to_match=NAN, match_rate=0.0, accuracy_at={}, area=0.0, oracle_gap=0.0,
    )  # fmt: skip


@pytest.fixture
def section() -> dict[str, Any]:
    by = _by_level()
    cheap = _result("best-of-N", "N=4", by)
    wide = _result("best-of-N", "N=16", by)
    deep = _result("s1", "budget=512", {"L2": by["L2"]})
    out = token_split(
        [_summary("best-of-N", wide, cheap), _summary("s1", deep, None)]  # s1 never matches
    )
    assert out is not None
    return out


def test_section_holds_each_familys_shown_point(section: dict[str, Any]) -> None:
    assert section["levels"] == {"L1": "easy", "L2": "hard"}
    assert section["rule"] == RULE_OF_THUMB
    fams = section["families"]
    assert fams["best-of-N"]["label"] == "best-of-N N=4"  # its point matching maj@16
    assert fams["s1"]["label"] == "s1 budget=512"  # else its most accurate
    assert fams["best-of-N"]["by_level"]["L1"] == {"tokens": 225.0, "deep": 10.0, "wide": 75.0}
    assert list(fams["s1"]["by_level"]) == ["L2"]
    assert json.loads(dumps(section)) == section  # as the results file holds it
    no_levels = _result("best-of-N", "N=1", {"-": _by_level()["L1"]})
    assert token_split([_summary("best-of-N", no_levels, None)]) is None


def test_table_rows(section: dict[str, Any]) -> None:
    assert token_split_table(section) == [
        ["L1", "easy: stop", "best-of-N N=4", "225", "4", "33"],  # 10 / 225 deep, 75 / 225 wide
        ["L2", "hard: serial", "best-of-N N=4", "400", "10", "0"],
        ["", "", "s1 budget=512", "400", "10", "0"],
    ]
    unknown = {
        **section,
        "families": {"x": {"label": "x", "by_level": {"L1": {"tokens": 0, "deep": None,
                                                            "wide": 0}}}},
    }  # fmt: skip
    assert token_split_table(unknown) == [["L1", "easy: stop", "x", "0", "-", "-"]]


def test_report_and_console_show_the_table(section: dict[str, Any]) -> None:
    full = read_results(ROOT / "results" / "gsm8k-qwen2.5-coder-1.5b.json")
    doc = {k: v for k, v in full.items() if k != "token_split"}  # as a file from before it
    before = render(doc)
    assert "rule of thumb" not in before  # a file without the section renders as it did
    assert render({**doc, "token_split": None}) == before
    assert "rule of thumb" in render(full)
    body = render({**doc, "token_split": section})
    lines = body.split("\n")
    i = next(k for k, line in enumerate(lines) if line.startswith("How each family's point"))
    j = lines.index("", i + 2)  # the paragraph, a blank line, the table, a blank line
    assert lines[:i] + lines[j + 1 :] == before.split("\n")  # the rest as it was
    assert "| " + " | ".join(TOKEN_SPLIT_HEADER) + " |" in body
    assert "| L1 | easy: stop | best-of-N N=4 | 225 | 4 | 33 |" in body
    assert "|  |  | s1 budget=512 | 400 | 10 | 0 |" in body
    # files written before the split was recorded read back without it
    levels = doc["reference"]["by_level"]
    old_ref = {
        **doc["reference"],
        "by_level": {
            lv: {k: v for k, v in d.items() if k not in ("deep", "wide")}
            for lv, d in levels.items()
        },
    }
    ref = PointRecord.featured(old_ref)
    assert all(x.deep is None and x.wide is None for x in ref.by_level.values())
    assert all(x.deep is not None for x in PointRecord.featured(doc["reference"]).by_level.values())
    rec = PointRecord.featured(
        {
            "label": "p",
            "accuracy": [0.5, 0.4, 0.6],
            "tokens": [225, 200, 250],
            "by_level": {
                "L1": {"questions": 2, "accuracy": [0.5, 0, 1], "tokens": [225, 150, 300],
                       "deep": 10.0, "wide": 75.0},
            },
        }
    )  # fmt: skip
    assert (rec.by_level["L1"].deep, rec.by_level["L1"].wide) == (10.0, 75.0)
    console = Console(record=True, width=200)
    print_token_split(console, section)
    text = console.export_text()
    assert "rule of thumb" in text and "easy: stop" in text and "hard: serial" in text
    assert "s1 budget=512" in text
