"""``ponder testbed curve``: accuracy against the forced thinking budget (a scripted model; the
real testbed reasoning model's curve is measured by the command itself)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from env.generators.fake import FakeGenerator
from env.models.testbed.reasoning import reasoning_trace
from env.models.testbed.task import make_questions
from env.models.testbed.thinking import CurveArgs, rising_doublings, thinking_curve
from env.types import SamplingConfig
from features.errors import ConfigError

LEVELS = (2, 4)


def scripted(wrong: bool = False) -> FakeGenerator:
    """A 'model' that writes each question's full thinking solution (its answer off by one when
    ``wrong``)."""
    script = {}
    for q, p in make_questions(3, seed=0, levels=list(LEVELS), split="eval"):
        text = reasoning_trace(p, random.Random(0), p_slip=0.0, checks=len(p.steps)).text
        if wrong:
            text = text.replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{p.answer + 1}}}")
        script[q.text] = text
    return FakeGenerator(
        script,
        template="testbed-reasoning",
        sampling=SamplingConfig(temperature=0.7, max_chain_tokens=1200),
    )


def args(tmp_path: Path, **kw: object) -> CurveArgs:
    base: dict[str, object] = {
        "budgets": (16, 32, 64),
        "per_level": 3,
        "samples": 2,
        "levels": LEVELS,
        "out": tmp_path / "curve.json",
        "free_cap": 800,
    }
    base.update(kw)
    return CurveArgs(**base)  # type: ignore[arg-type]


def test_each_budget_is_thought_exactly_and_the_unforced_column_reads_the_answer(
    tmp_path: Path,
) -> None:
    curves = thinking_curve(args(tmp_path), scripted())
    assert [c.level for c in curves] == list(LEVELS)
    for c in curves:
        for b in (16, 32, 64):
            # forced to think B tokens: the closing marker on its own line comes on top
            assert b <= c.thinking[str(b)] <= b + len("\n</think>")
        assert c.pass1["free"] == 1.0 and c.maj["free"] == 1.0
        assert c.thinking["free"] > 64
    doc = json.loads((tmp_path / "curve.json").read_text())
    assert doc["budgets"] == [16, 32, 64] and set(doc["levels"]) == {"2", "4"}
    assert doc["levels"]["2"]["pass1"]["free"] == 1.0
    png = (tmp_path / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_wrong_answers_score_zero(tmp_path: Path) -> None:
    curves = thinking_curve(args(tmp_path, budgets=(16,)), scripted(wrong=True))
    assert all(c.pass1["free"] == 0.0 and c.maj["free"] == 0.0 for c in curves)


@pytest.mark.parametrize(
    ("values", "rises"),
    [
        ([0.1, 0.2, 0.3, 0.4], 3),
        ([0.1, 0.2, 0.2, 0.4, 0.5], 2),
        ([0.5, 0.4, 0.3], 0),
        ([0.3], 0),
    ],
)
def test_rising_doublings_counts_the_longest_run(values: list[float], rises: int) -> None:
    assert rising_doublings(values) == rises


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"budgets": ()}, "--budgets"),
        ({"budgets": (64, 32)}, "increasing"),
        ({"budgets": (0, 32)}, "positive"),
        ({"levels": (9,)}, "--levels"),
        ({"samples": 0}, "--samples"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, kw: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        args(tmp_path, **kw)


def test_a_template_without_thinking_is_refused(tmp_path: Path) -> None:
    gen = FakeGenerator(template="testbed")
    with pytest.raises(ConfigError, match="no thinking section"):
        thinking_curve(args(tmp_path), gen)


def test_a_budget_past_the_context_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at most 864 tokens"):
        args(tmp_path, budgets=(32, 2048))
