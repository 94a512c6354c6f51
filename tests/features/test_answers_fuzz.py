"""Fuzzing the answer parser: any string a model (or a hostile client) can write goes through
:func:`extract_answer`, :func:`normalize_answer`, :func:`answers_equal`, :func:`read_probe` and
:func:`group_answers` without an exception, and in linear time (no pattern backtracks for long).

Answers come from generated text, which a client's question steers: the parser is on the
request path of the proxy. Bounded in time: a fixed number of examples, each under a deadline,
and long adversarial texts under a hang guard sized so that only a superlinear scan trips it.
"""

from __future__ import annotations

import contextlib

import pytest
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


#: Text a model could be steered to write, up to 160k characters of the parser's own pieces. Such
#: text once made scans go quadratic (``"\\boxed{" * 5000`` took 11 s in extract_boxed and 26 s in
#: normalize_answer, one scan per box); at these sizes a quadratic scan takes minutes and a linear
#: one a fraction of a second, so a generous hang guard tells them apart on any machine.
#: ``bench/answers.py`` prints how long each takes and how that grows with the length.
N = 20_000
ADVERSARIAL = {
    "open-boxes": "\\boxed{" * N,
    "closed-box-then-open": "\\boxed{1}" + "\\boxed{" * N,
    "open-boxed-fracs": "\\boxed{\\frac{" * (N * 3 // 5),
    "open-fracs": "\\frac{" * (N * 4 // 5),
    "tuples": "(1," * N,
    "unbalanced-braces": "{" * (2 * N) + "}" * N,
    "answer-phrases": "The answer is " * (N * 3 // 10),
    "comma-list": "1," * (2 * N),
    "long-decimal": "0." + "3" * (4 * N),
    "bare-frac": "\\frac" * (N * 4 // 5),
    "bare-sqrt": "\\sqrt" * (N * 4 // 5),
    "dashes": "-" * (4 * N) + "1",
    "open-parens": "((" * N,
    "slashes": "answer: " + "1/" * (N * 8 // 5),
    "gsm8k-marks": "#### " * (N * 4 // 5),
    "nested-text": "\\text{" * (N * 3 // 5) + "}" * (N * 3 // 5),
    "past-int-limit": "1" * 4400,  # more digits than Python converts to an int
}


@pytest.mark.timeout(60)  # a hang guard, not a speed target (bench/answers.py times these)
@pytest.mark.parametrize("text", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_long_adversarial_text_is_parsed_and_hides_no_answer(text: str) -> None:
    """Every function ends on the text with a well-typed result, equivalence stays reflexive and
    symmetric, and a final answer written after the text is still the one extracted."""
    for fn in (extract_answer, extract_boxed, read_probe, normalize_answer):
        out = fn(text)
        assert out is None or isinstance(out, str)
    assert answers_equal(text, text)
    assert answers_equal(text, text[::-1]) == answers_equal(text[::-1], text)
    answer = extract_answer(text + "\n\nSo the final answer is $\\boxed{42}$.")
    assert answer == "42" and answers_equal(answer, "42.0")
