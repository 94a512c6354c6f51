"""The testbed's synthetic task: deterministic questions, checkable steps, a difficulty knob."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from env.models.testbed.task import (
    EOS,
    LEVELS,
    label_steps,
    make_problem,
    make_questions,
    prompt_text,
    solution_text,
    training_text,
)
from features.answers import extract_answer
from features.errors import ConfigError


@given(st.integers(1, 8), st.integers(0, 10_000))
@settings(max_examples=200, deadline=None)
def test_correct_solutions_label_every_step_correct(level: int, seed: int) -> None:
    p = make_problem(level, random.Random(seed))
    for mode in ("cot", "draft"):
        sol = solution_text(p, mode)
        labels = label_steps(p, sol)
        assert len(labels) == LEVELS[level].steps
        assert all(lab.local_ok and lab.prefix_ok for lab in labels)
        assert extract_answer(sol) == str(p.answer)


def test_a_slip_is_labelled_at_its_step_and_after() -> None:
    p = make_problem(5, random.Random(3))
    lines = solution_text(p, "cot").split("\n")
    # break step 2's result: its arithmetic is now wrong, and every later value is off
    head, _, _ = lines[1].rpartition(" = ")
    lines[1] = f"{head} = {p.steps[1].value + 1}"
    labels = label_steps(p, "\n".join(lines))
    assert [lab.prefix_ok for lab in labels] == [True, False, False, False]
    assert labels[1].local_ok is False and labels[0].local_ok is True


def test_draft_is_shorter_and_difficulty_grows() -> None:
    p = make_problem(6, random.Random(0))
    assert len(solution_text(p, "draft")) < len(solution_text(p, "cot"))
    assert prompt_text("q", "draft") != prompt_text("q", "cot")
    steps = [LEVELS[lv].steps for lv in sorted(LEVELS)]
    digits = [LEVELS[lv].digits for lv in sorted(LEVELS)]
    assert steps == sorted(steps) and digits == sorted(digits)


def test_questions_are_deterministic_and_splits_differ() -> None:
    a = make_questions(3, seed=1, split="test")
    b = make_questions(3, seed=1, split="test")
    c = make_questions(3, seed=1, split="train")
    assert [q.text for q, _ in a] == [q.text for q, _ in b]
    assert [q.text for q, _ in a] != [q.text for q, _ in c]
    assert len(a) == 3 * len(LEVELS)


def test_training_documents_end_with_eos_and_teach_the_controls() -> None:
    rng = random.Random(0)
    docs = [training_text(rng) for _ in range(600)]
    assert all(d.endswith(EOS) for d in docs)
    assert any("Draft:" in d for d in docs)
    assert any("Correct? no" in d for d in docs) and any("Correct? yes" in d for d in docs)
    assert any("Alternatively," in d for d in docs) and any(
        "Wait, let me check." in d for d in docs
    )


def test_bad_level() -> None:
    with pytest.raises(ConfigError, match="difficulty level"):
        make_problem(9, random.Random(0))
    with pytest.raises(ConfigError, match="prompt mode"):
        prompt_text("q", "fast")  # type: ignore[arg-type]
