"""Tests for features.answers: extraction, normalisation, equivalence and grouping."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.answers import (
    answers_equal,
    extract_answer,
    extract_boxed,
    group_answers,
    gsm8k_gold,
    is_correct,
    normalize_answer,
    read_probe,
)
from features.errors import AnswerError, PonderError

# --------------------------------------------------------------------------------------------
# Hand cases
# --------------------------------------------------------------------------------------------

EQUAL_PAIRS = [
    # fractions vs decimals
    ("0.5", r"\frac{1}{2}"),
    ("0.5", "1/2"),
    ("0.5", r"\dfrac12"),
    (r"\frac{1}{2}", r"\tfrac{1}{2}"),
    (r"\frac 1 2", "1/2"),
    (r"\boxed{\dfrac{3}{4}}", "0.75"),
    (r"\dfrac{3}{4}", ".75"),
    (r"-\frac{3}{4}", "-0.75"),
    (r"\frac{-3}{4}", "-3/4"),
    (r"\frac{6}{8}", r"\frac{3}{4}"),
    ("0.3333333333", r"\frac{1}{3}"),
    (r"2\frac{1}{2}", "2.5"),
    # thousands separators, trailing .0, signs
    ("1,000", "1000"),
    ("1000", "1000.0"),
    ("1,000", "1000.00"),
    ("1{,}000", "1000"),
    (r"1\,000", "1000"),
    ("1,234,567", "1234567"),
    ("+5", "5"),
    ("007", "7"),
    # currency, percent, units
    ("$18", "18"),
    (r"\$18.00", "18"),
    (r"\$1,234.50", "1234.5"),
    ("18 dollars", "18"),
    (r"\boxed{10\%}", "10"),
    ("10%", "10"),
    (r"5 \text{ cm}", "5"),
    (r"5\text{cm}^2", "5"),
    ("5 cm", "5"),
    ("12 apples", "12"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", "30"),
    ("18.", "18"),
    # LaTeX forms
    (r"\sqrt2", r"\sqrt{2}"),
    (r"2\sqrt 3", r"2\sqrt{3}"),
    (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt3}{2}"),
    (r"\frac{1+\sqrt{5}}{2}", r"\frac{1 + \sqrt5}{2}"),
    (r"\frac\pi4", r"\frac{\pi}{4}"),
    (r"\left( 1, 2 \right)", "(1, 2)"),
    ("(1,2)", "(1, 2)"),
    (r"(0.5, \frac{3}{2})", r"\left(\frac12, 1.5\right)"),
    ("[0, 1)", r"\left[0,1\right)"),
    (r"\{1, 2\}", r"\{1,2\}"),
    ("x=3", "3"),
    ("k = 7", "7"),
    (r"x \in [2, 5)", "[2, 5)"),
    (r"\text{(A)}", "(A)"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"x^{2}+1", "x^2 + 1"),
    (r"\boxed{42}", "42"),
    (r"\fbox{42}", "42"),
    (r"\tfrac{3}{4} .", "0.75"),
]

UNEQUAL_PAIRS = [
    ("-2", "2"),
    ("1/2", "2"),
    ("0.5", "5"),
    (r"\frac{1}{2}", r"\frac{2}{1}"),
    ("1,000", "1"),
    ("1000", "100"),
    ("0.333333", r"\frac{1}{3}"),  # six decimals: too coarse to be 1/3
    (r"2\frac{1}{2}", "21/2"),
    ("(1, 2)", "(2, 1)"),
    ("(1, 2)", "[1, 2]"),
    ("[0, 1)", "[0, 1]"),
    (r"\sqrt{2}", "2"),
    (r"\sqrt{2}", r"\sqrt{3}"),
    (r"2\sqrt{3}", r"\sqrt{6}"),
    ("x=3", "x=4"),
    ("10%", "0.1"),  # percent signs are dropped, not divided out
    (r"\pi", "3.14159"),
    ("A", "B"),
    ("18", "18.5"),
    (r"\$1,234.50", "1234.05"),
    ("1e3", "1e4"),
]


@pytest.mark.parametrize(("a", "b"), EQUAL_PAIRS)
def test_equal_pairs(a: str, b: str) -> None:
    assert answers_equal(a, b), (normalize_answer(a), normalize_answer(b))
    assert answers_equal(b, a)


@pytest.mark.parametrize(("a", "b"), UNEQUAL_PAIRS)
def test_unequal_pairs(a: str, b: str) -> None:
    assert not answers_equal(a, b), (normalize_answer(a), normalize_answer(b))
    assert not answers_equal(b, a)


def test_enough_hand_cases() -> None:
    assert len(EQUAL_PAIRS) + len(UNEQUAL_PAIRS) >= 40


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("0.5", "1/2"),
        ("18", "18"),
        ("-0.75", "-3/4"),
        (r"\$1,234.50", "2469/2"),
        ("1000.0", "1000"),
        ("-0", "0"),
        ("(1,2)", "(1, 2)"),
        (r"\frac{1+\sqrt5}{2}", r"(1+\sqrt{5})/2"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"\frac{1}{0}", "1/0"),
        (r"\infty", r"\infty"),
        ("Yes", "yes"),
    ],
)
def test_canonical_forms(raw: str, canonical: str) -> None:
    assert normalize_answer(raw) == canonical


@pytest.mark.parametrize("blank", [None, "", "   ", r"\boxed{}", "$ $"])
def test_blank_answers_normalise_to_none(blank: str | None) -> None:
    assert normalize_answer(blank) is None
    assert not answers_equal(blank, blank)


def test_numeric_tolerance() -> None:
    assert answers_equal("1/3", "0.33333333333333")
    assert answers_equal("1234567.5", "1234567.5000000001")
    assert not answers_equal("0", "0.000000001")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}} then \\boxed{3}.", "3"),
        ("nested \\boxed{\\frac{\\sqrt{2}}{2}} ok", "\\frac{\\sqrt{2}}{2}"),
        ("complete \\boxed{5} then truncated \\boxed{6", "5"),
        ("\\fbox{7}", "7"),
        ("b = 37 + 48 = 85\nThe answer is \\boxed{255}.", "255"),
        ("Natalia sold 48/2 = 24 clips.\nShe sold 48+24 = 72 clips.\n#### 72", "72"),
        ("In total $1,234.\n#### 1,234", "1,234"),
        ("The answer is $18.", "18"),
        ("The answer is 18 dollars.", "18"),
        ("**Final Answer:** 42", "42"),
        ("The answer is: 0.5", "0.5"),
        ("Answer: \\frac{1}{2}.", "\\frac{1}{2}"),
        ("The answer is \\(\\frac{3}{4}\\).", "\\frac{3}{4}"),
        ("answer is 7 because 3+4 = 7", "7"),
        ("The answer is 5. Wait, the answer is 6.", "6"),
        ("we get 3 and then -4.5 in the end", "-4.5"),
        ("I think 5-3 = 2", "2"),
        ("result: 1,234,567 items", "1,234,567"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_boxed() -> None:
    assert extract_boxed("a \\boxed{x^{2}} b") == "x^{2}"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{open") is None


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("42}", "42"),
        ("\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\frac{1}{2}} and then more text", "\\frac{1}{2}"),
        (" 7 }.", "7"),
        ("12", "12"),  # the engine stopped on "}" and dropped it
        ("3\nmore", "3"),
        ("", None),
        ("}", None),
        ("  }", None),
    ],
)
def test_read_probe(completion: str, expected: str | None) -> None:
    assert read_probe(completion) == expected


def test_gsm8k_gold() -> None:
    field = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert gsm8k_gold(field) == "72"
    assert gsm8k_gold("x\n#### 1,234\n") == "1,234"
    for bad in ("no mark here", "#### ", ""):
        with pytest.raises(AnswerError, match="####"):
            gsm8k_gold(bad)


def test_is_correct() -> None:
    assert is_correct("\\boxed{\\dfrac{3}{4}}", "0.75")
    assert not is_correct("-2", "2")
    assert not is_correct(None, "2")
    with pytest.raises(AnswerError, match="gold answer"):
        is_correct("2", None)
    with pytest.raises(PonderError):
        is_correct("2", "  ")


def test_group_answers() -> None:
    answers = ["1/2", "0.5", None, "3", "\\boxed{3}", "", "\\dfrac12", "x"]
    assert group_answers(answers) == {"1/2": [0, 1, 6], "3": [3, 4], "x": [7]}
    assert group_answers([]) == {}
    assert group_answers([None, " "]) == {}


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------

_ANSWER_ALPHABET = st.sampled_from(
    [
        *"0123456789.,-+/ ()[]{}^_=xyz$%",
        *("\\frac", "\\dfrac", "\\sqrt", "\\pi", "\\text{", "\\boxed{", "\\left(", "\\right)"),
        *("\\{", "\\}", "\\,", "\\!", "^\\circ", " cm", " dollars", "\\%", "\\$", "1,000"),
    ]
)
answer_text = st.lists(_ANSWER_ALPHABET, max_size=12).map("".join)


@st.composite
def formatted_answers(draw: st.DrawFn) -> str:
    """Answers in the forms models actually write."""
    n = draw(st.integers(-(10**7), 10**7))
    d = draw(st.integers(1, 40))
    return draw(
        st.sampled_from(
            [
                str(n),
                f"{n}.0",
                f"{n:,}",
                f"\\boxed{{{n}}}",
                f"\\frac{{{n}}}{{{d}}}",
                f"\\dfrac{{{n}}}{{{d}}}",
                f"{n}/{d}",
                f"{n / d:.4f}",
                f"\\${n:,}",
                f"{n} dollars",
                f"({n}, {d})",
                f"\\sqrt{{{abs(n)}}}",
                f"x = {n}",
            ]
        )
    )


@settings(max_examples=300, deadline=None)
@given(st.one_of(answer_text, formatted_answers(), st.text(max_size=20)))
def test_normalize_idempotent(ans: str) -> None:
    once = normalize_answer(ans)
    assert normalize_answer(once) == once


@settings(max_examples=200, deadline=None)
@given(st.one_of(answer_text, formatted_answers()), st.one_of(answer_text, formatted_answers()))
def test_answers_equal_symmetric_and_reflexive(a: str, b: str) -> None:
    assert answers_equal(a, b) == answers_equal(b, a)
    assert answers_equal(a, a) == (normalize_answer(a) is not None)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**12), 10**12))
def test_integer_formats_equal(n: int) -> None:
    forms = [str(n), f"{n}.0", f"{n:,}", f"\\boxed{{{n}}}"]
    assert {normalize_answer(f) for f in forms} == {str(n)}
    assert all(answers_equal(forms[0], f) for f in forms)


@settings(max_examples=200, deadline=None)
@given(st.integers(-10_000, 10_000), st.integers(0, 6), st.integers(0, 6))
def test_terminating_fraction_equals_its_decimal(p: int, twos: int, fives: int) -> None:
    q = 2**twos * 5**fives  # exactly the denominators whose decimals terminate
    value = Fraction(p, q)
    places = max(twos, fives)
    decimal = f"{value.numerator * 10**places // value.denominator}"
    sign, digits = ("-", decimal[1:]) if decimal.startswith("-") else ("", decimal)
    digits = digits.rjust(places + 1, "0")
    text = (
        f"{sign}{digits[: len(digits) - places]}.{digits[len(digits) - places :]}"
        if places
        else decimal
    )
    assert Fraction(text) == value
    assert answers_equal(f"\\frac{{{p}}}{{{q}}}", text)
    assert normalize_answer(f"\\frac{{{p}}}{{{q}}}") == normalize_answer(text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.none(), formatted_answers(), st.sampled_from(["0.5", "1/2", "\\frac12"]))
    ),
    st.randoms(use_true_random=False),
)
def test_group_answers_order_invariant(answers: list[str | None], rnd: random.Random) -> None:
    order = list(range(len(answers)))
    rnd.shuffle(order)
    shuffled = [answers[i] for i in order]

    def partition(groups: dict[str, list[int]], index_map: list[int]) -> set[frozenset[int]]:
        return {frozenset(index_map[i] for i in idx) for idx in groups.values()}

    assert partition(group_answers(answers), list(range(len(answers)))) == partition(
        group_answers(shuffled), order
    )
    grouped = sorted(i for idx in group_answers(answers).values() for i in idx)
    assert grouped == [i for i, a in enumerate(answers) if normalize_answer(a) is not None]
