"""Fuzzing the answer parser: any string a model (or a hostile client) can write goes through
:func:`extract_answer`, :func:`normalize_answer`, :func:`answers_equal`, :func:`read_probe` and
:func:`group_answers` without an exception, and fast (no pattern backtracks for long).

Answers come from generated text, which a client's question steers: the parser is on the
request path of the proxy. Bounded in time: a fixed number of examples, each under a deadline.
"""

from __future__ import annotations

import contextlib
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from features.answers import (
    answers_equal,
    extract_answer,
    extract_boxed,
    group_answers,
    normalize_answer,
    read_probe,
)
from features.errors import AnswerError

FUZZ = settings(max_examples=300, deadline=2000, derandomize=True)

#: Pieces the parser looks for, so that random text reaches its deep paths.
PIECES = [
    "\\boxed{",
    "\\fbox{",
    "{",
    "}",
    "\\frac",
    "\\dfrac",
    "\\sqrt",
    "\\left(",
    "\\right)",
    "\\text{",
    "\\%",
    "^\\circ",
    "$",
    "\\$",
    "The answer is ",
    "final answer: ",
    "answer = ",
    "####",
    "**",
    "x=",
    "(",
    ")",
    "[",
    "]",
    ",",
    ".",
    "-",
    "/",
    "^",
    " ",
    "\n",
    "0",
    "1",
    "2",
    "9",
    "1,000",
    "0.333333333",
    "e",
    "cm",
    "dollars",
    "\\",
    "\ud800",  # a lone surrogate (what a JSON body can smuggle in)
    "\x00",
    "٣",  # a non-ASCII digit
]

texts = st.one_of(
    st.text(max_size=200),
    st.text(st.characters(codec=None), max_size=100),  # any code point, surrogates included
    st.lists(st.sampled_from(PIECES), max_size=80).map("".join),
    st.lists(st.sampled_from(PIECES) | st.text(max_size=3), max_size=40).map("".join),
)


@FUZZ
@given(texts)
def test_extraction_never_crashes(text: str) -> None:
    for fn in (extract_answer, extract_boxed, read_probe):
        out = fn(text)
        assert out is None or isinstance(out, str)


@FUZZ
@given(texts)
def test_normalisation_never_crashes(text: str) -> None:
    out = normalize_answer(text)
    assert out is None or isinstance(out, str)
    extracted = extract_answer(text)
    assert normalize_answer(extracted) is None or extracted is not None


@FUZZ
@given(texts, texts)
def test_equivalence_never_crashes(a: str, b: str) -> None:
    assert answers_equal(a, b) == answers_equal(b, a)
    groups = group_answers([a, b, None, a])
    assert all(isinstance(k, str) and v for k, v in groups.items())


def test_documented_errors_only() -> None:
    """The one exception the module raises on purpose, for a gold answer that is missing."""
    from features.answers import gsm8k_gold, is_correct

    for bad in (None, "", "  "):
        try:
            is_correct("1", bad)
        except AnswerError:
            pass
        else:
            raise AssertionError(f"is_correct(gold={bad!r}) should raise AnswerError")
    for field in ("no mark here", "", "#### "):
        with contextlib.suppress(AnswerError):
            gsm8k_gold(field)


def test_long_adversarial_text_is_parsed_in_linear_time() -> None:
    """Text a model could be steered to write, 20k characters of the parser's own pieces: each
    call stays well under a second (a backtracking pattern would take minutes)."""
    cases = [
        "\\boxed{" * 5000,  # was 11 s in extract_boxed, 26 s in normalize_answer (one scan per box)
        "\\boxed{1}" + "\\boxed{" * 5000,
        "\\boxed{\\frac{" * 3000,
        "\\frac{" * 4000,
        "(1," * 5000,
        "{" * 10000 + "}" * 5000,
        "The answer is " * 1500,
        "1," * 10000,
        "0." + "3" * 20000,
        "\\frac" * 4000,
        "\\sqrt" * 4000,
        "-" * 20000 + "1",
        "((" * 5000,
        "answer: " + "1/" * 8000,
        "#### " * 4000,
        "\\text{" * 3000 + "}" * 3000,
        "1" * 4400,  # past Python's int-conversion limit
    ]
    for text in cases:
        t0 = time.monotonic()
        extract_answer(text)
        normalize_answer(text)
        answers_equal(text, text[::-1])
        read_probe(text)
        assert time.monotonic() - t0 < 2.0, text[:40]
