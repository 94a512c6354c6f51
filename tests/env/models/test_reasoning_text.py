"""The testbed reasoning model's training text: slips in a first pass, re-checks that fix them."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from env.models.testbed.reasoning import (
    THINK_END,
    THINK_START,
    careful_line,
    reasoning_text,
    reasoning_trace,
)
from env.models.testbed.task import EOS, LEVELS, make_problem
from features.answers import extract_answer
from features.errors import ConfigError


@pytest.mark.parametrize(
    ("x", "op", "y", "line"),
    [
        (37, "+", 48, "37 + 48: 7 + 8 = 15, write 5 carry 1; 3 + 4 + 1 = 8; so 85"),
        (
            85,
            "*",
            3,
            "85 * 3: 5 * 3 = 15, write 5 carry 1; 8 * 3 + 1 = 25, write 5 carry 2; so 255",
        ),
        (52, "-", 17, "52 - 17: 12 - 7 = 5, borrow 1; 4 - 1 = 3; so 35"),
    ],
)
def test_careful_lines(x: int, op: str, y: int, line: str) -> None:
    assert careful_line(x, op, y) == line


@given(st.integers(0, 999), st.sampled_from("+-*"), st.integers(0, 999))
def test_careful_lines_end_with_the_true_value(x: int, op: str, y: int) -> None:
    y = y % 10 if op == "*" else y
    value = x + y if op == "+" else x - y if op == "-" else x * y
    assert careful_line(x, op, y).endswith(f"so {value}")


def test_checking_every_step_fixes_every_slip() -> None:
    rng = random.Random(0)
    fixed = slipped = 0
    for i in range(300):
        p = make_problem(1 + i % 8, rng)
        t = reasoning_trace(p, rng, p_slip=0.5, checks=len(p.steps))
        assert t.answer == p.answer  # every slip found
        assert extract_answer(t.text) == str(p.answer)
        assert t.text.startswith(THINK_START) and THINK_END in t.text
        fixed += bool(t.slips)
        u = reasoning_trace(p, random.Random(i), p_slip=0.5, checks=0)
        slipped += u.answer != p.answer
    assert fixed > 100 and slipped > 100  # slips happen, and without checks they stay


def test_more_checks_fix_more_slips() -> None:
    # The property the reasoning model is to learn: accuracy rises with the checks allowed.
    rng = random.Random(1)
    problems = [make_problem(7, rng) for _ in range(400)]
    acc = []
    for checks in range(LEVELS[7].steps + 1):
        right = sum(
            reasoning_trace(p, random.Random(k), p_slip=0.25, checks=checks).answer == p.answer
            for k, p in enumerate(problems)
        )
        acc.append(right / len(problems))
    assert all(b >= a for a, b in itertools.pairwise(acc)) and acc[-1] == 1.0
    assert acc[0] < 0.4


def test_a_correction_names_the_old_value_and_recomputes_what_follows() -> None:
    rng = random.Random(3)
    p = make_problem(5, rng)
    while True:
        t = reasoning_trace(p, rng, p_slip=1.0, checks=1)
        if 0 in t.slips:
            break
    m = re.search(r"Wait, check b = (-?\d+): .*\. b = -?\d+, not (-?\d+)\.", t.text)
    assert m and m.group(1) == m.group(2)  # the check restates the value it corrects


def test_training_documents() -> None:
    rng = random.Random(5)
    docs = [reasoning_text(rng) for _ in range(50)]
    assert all(d.endswith(EOS) and d.startswith("Question: ") for d in docs)
    assert all(d.count(THINK_START) == d.count(THINK_END) == 1 for d in docs)
    assert any("Wait, check" in d for d in docs) and any("Wait" not in d for d in docs)
    with pytest.raises(ConfigError):
        reasoning_trace(make_problem(1, rng), rng, p_slip=2.0, checks=1)


def test_the_answer_follows_the_section_as_a_probe_asks_for_it() -> None:
    from env.generators.prompts import TESTBED_REASONING

    t = reasoning_trace(make_problem(3, random.Random(9)), random.Random(9), p_slip=0.0, checks=1)
    forced = TESTBED_REASONING.probe_text(thinking_open=True)  # what a forced end writes
    assert (
        forced in t.text
    )  # the same words as the trained text: "</think>\n\nThe answer is \boxed{"


@pytest.mark.timeout(300)
def test_the_trainer_trains_on_reasoning_text(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from env.models.testbed.train import TrainArgs, train

    out = train(
        TrainArgs(
            out=tmp_path / "m",
            task="reasoning",
            steps=2,
            batch=2,
            block=64,
            hidden=64,
            layers=1,
            threads=1,
            warmup=1,
        )
    )
    assert (out / "model.safetensors").exists()
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    text = "<think>\nWait, check b: 37 + 48: 7 + 8 = 15, write 5 carry 1\n</think>"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_checking_starts_over_after_the_last_step() -> None:
    p = make_problem(3, random.Random(4))
    n = len(p.steps)
    t = reasoning_trace(p, random.Random(4), p_slip=0.5, checks=n + 2)
    checked = re.findall(r"Wait, check (\w) = ", t.text)
    assert checked == [s.var for s in p.steps] + [s.var for s in p.steps[:2]]
    # a second round agrees everywhere: every slip was fixed in the first
    second = t.text.split("Wait, check ")[n + 1 :]
    assert all(", not " not in line.split("\n")[0] for line in second)
    assert t.answer == p.answer and t.checks == n + 2
