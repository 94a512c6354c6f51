"""Reading a short factual answer from a reply (features.answers.extract_short_answer)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from env.episode.rules import text_reader
from env.types import Question
from features.answers import extract_answer, extract_short_answer


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ("John Asbury", "John Asbury"),  # a bare answer
        ("Paris.", "Paris"),
        ("It is in France, so \\boxed{Paris}.", "Paris"),  # a box wins
        ("The answer is Herbert Hoover.", "Herbert Hoover"),
        (
            "The actor who played Alex Cross in Along Came a Spider is Morgan Freeman.",
            "Morgan Freeman",
        ),
        ("The outer layer of the skin is the epidermis.", "epidermis"),  # no leading article
        ("Whitey Bulger's girlfriend in Black Mass is played by Julia Roberts.", "Julia Roberts"),
        ("Water flows over the land. The process is called runoff.", "runoff"),
    ],
)
def test_short_answers_are_read(reply: str, answer: str) -> None:
    assert extract_short_answer(reply) == answer


def test_no_number_is_taken_from_a_long_reply() -> None:
    reply = "In 1963 a band formed, and over the years it had many members and many different hits."
    assert extract_short_answer(reply) is None
    assert extract_answer(reply) == "1963"  # what the math reader would take


@given(st.text(max_size=300))
def test_never_raises(text: str) -> None:
    got = extract_short_answer(text)
    assert got is None or (isinstance(got, str) and got.strip())


def test_factual_questions_are_read_with_it() -> None:
    factual = Question("factual/test/0", "Who?", gold="Paris", dataset="factual")
    math = Question("gsm8k/test/0", "How many?", gold="4", dataset="gsm8k")
    assert text_reader(factual) is extract_short_answer
    assert text_reader(math) is extract_answer
