"""Answer equivalence for GSM8K-style numbers and MATH-style ``\\boxed{}`` answers.

Reading the answer out of a generation is :mod:`features.extract`; its functions are
re-exported here, so one import gives both.

Votes, rewards and evaluation all need to know when two generated answers are "the same":
``0.5``, ``\\frac{1}{2}``, ``1/2`` and ``\\dfrac12`` are one answer; so are ``1,000``, ``1000`` and
``1000.0``, and ``$18``, ``18 dollars`` and ``18``. :func:`normalize_answer` maps an answer to a
canonical string (numbers become exact rationals such as ``"1/2"`` or ``"-3/4"``), and
:func:`answers_equal`, :func:`is_correct` and :func:`group_answers` compare canonical forms.

Conventions worth knowing:

* A percent sign is dropped, not divided out: ``10\\%`` equals ``10``, not ``0.1`` (how MATH and
  GSM8K golds are written).
* A trailing unit is dropped: ``\\text{ cm}``, ``^\\circ``, ``dollars``, ``cm^2``, ``18 apples``.
* ``x=3`` equals ``3`` when the left side is a single variable.
* A decimal with six or more decimals that lies within ``1e-9`` (relative) of a fraction with a
  denominator up to 1000 is read as that fraction (``0.3333333333`` is ``1/3``); other decimals are
  read exactly from their decimal string.
* The hand-written rule has no symbolic algebra: ``\\frac{\\sqrt3}{2}`` and
  ``\\frac{1}{2}\\sqrt{3}`` stay different under :func:`answers_equal`; :func:`symbolic_equal`
  asks ``math-verify`` (sympy) where that matters (MATH-500).

Everything here is pure and fast (precompiled patterns, a cached :func:`normalize_answer`): these
functions run in the controller's inner loop.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from functools import lru_cache

from features.errors import AnswerError
from features.extract import (
    extract_answer,
    extract_boxed,
    extract_short_answer,
    gsm8k_gold,
    match_brace,
    read_probe,
)

__all__ = [
    "answers_equal",
    "extract_answer",
    "closing_bracket",
    "extract_boxed",
    "extract_short_answer",
    "group_answers",
    "judged_correct",
    "symbolic_equal",
    "gsm8k_gold",
    "is_correct",
    "normalize_answer",
    "read_probe",
]

# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_REMOVE_RE = re.compile(
    r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\displaystyle|\\[!,;:>]|\\quad|\\qquad"
    r"|\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\%|%|\\\$|\$|\\mathdollar"
)
_FRAC_ALIAS_RE = re.compile(r"\\[dtc]frac")
_TEXT_ALIAS_RE = re.compile(r"\\(?:textbf|textrm|textit|mathrm|mathbf|mathit|mbox|text)\s*\{")
_TEXT_RE = re.compile(r"\\text\{([^{}]*)\}")
_TRAILING_TEXT_RE = re.compile(r"^(.*?[\w})\]])\s*\\text\{[^{}]*\}\s*(?:\^\s*\{?\d\}?)?\s*\.?\s*$")
_UNITS = (
    "dollars?|cents?|euros?|pounds?|yuan|rupees?|usd|"
    "km|cm|mm|m|meters?|metres?|centimeters?|centimetres?|millimeters?|kilometers?|"
    "inch|inches|in|ft|feet|foot|yards?|yd|miles?|mi|"
    "square\\s+(?:units|feet|inches|meters|centimeters|miles|yards)|sq\\s*(?:units|ft|in|m|cm)|"
    "units?|degrees?|deg|radians?|rad|"
    "hours?|hrs?|h|minutes?|mins?|seconds?|secs?|s|days?|weeks?|months?|years?|"
    "kg|g|grams?|kilograms?|lbs?|ounces?|oz|liters?|litres?|l|ml|gallons?|cups?|"
    "mph|kph|km/h|m/s|percent|points?|people|persons?"
)
_TRAILING_UNIT_RE = re.compile(
    r"^(.*?[\d}.])\s*(?:" + _UNITS + r")(?:\s*\^\s*\{?[23]\}?|[23])?\s*\.?\s*$", re.IGNORECASE
)
# "18 apples", "3 more cookies": a plain number followed by words.
_TRAILING_WORDS_RE = re.compile(r"^([-+]?[\d.,]*\d)\s+[a-zA-Z]{2,}(?:\s+[a-zA-Z]+){0,3}\s*\.?\s*$")
_ASSIGN_RE = re.compile(
    r"^\s*(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*(?:=|\\in(?![a-zA-Z]))\s*([^=]+)$"
)
_THOUSANDS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d]|,\d)")
_WS_RE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])|\s+")
_SUPER_RE = re.compile(r"\^\{(\w)\}")
_TIMES_RE = re.compile(r"\\times(?![a-zA-Z])|\\cdot(?![a-zA-Z])")
_CMD_RE = re.compile(r"\\[a-zA-Z]+|\\.")
_FRAC_OR_SQRT_RE = re.compile(r"\\(frac|sqrt)")
_ATOM_RE = re.compile(r"^-?[A-Za-z0-9.]+$|^-?\d*\\[a-zA-Z]+(?:\{[^{}]*\})*$")
_MIXED_RE = re.compile(r"^(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$")
_DECIMAL_RE = re.compile(r"^[-+]?(?:\d+\.?(\d*)|\.(\d+))(?:[eE][-+]?\d{1,3})?$")
_RATIO_RE = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+))/([-+]?(?:\d+\.?\d*|\.\d+))$")
_CANONICAL_NUMBER_RE = re.compile(r"^-?\d+(?:/\d+)?$")
_WORDS_RE = re.compile(r"^[A-Za-z][A-Za-z ]+$")
_CHOICE_RE = re.compile(r"^\(([A-Ea-e])\)$")
_OPEN = "([{"
_CLOSE = ")]}"
_REL_TOL = Fraction(1, 10**9)
_MAX_PASSES = 4
_MAX_DEPTH = 40
_MAX_NUMBER_CHARS = 400


def _decimal_fraction(text: str) -> Fraction | None:
    m = _DECIMAL_RE.match(text)
    if not m:
        return None
    value = Fraction(text)
    decimals = len(m.group(1) or m.group(2) or "")
    if decimals >= 6 and "e" not in text.lower():
        # A rounded repeating decimal such as 0.3333333333: read it as the fraction it rounds.
        simple = value.limit_denominator(1000)
        if simple != value and abs(simple - value) <= _REL_TOL * abs(value):
            return simple
    return value


def _to_fraction(text: str) -> Fraction | None:
    """The exact value of a plain number, decimal or ``a/b`` ratio, else None."""
    if len(text) > _MAX_NUMBER_CHARS:
        return None  # Python refuses to convert ints of more than 4300 digits
    value = _decimal_fraction(text)
    if value is not None:
        return value
    m = _RATIO_RE.match(text)
    if m:
        num, den = _decimal_fraction(m.group(1)), _decimal_fraction(m.group(2))
        if num is not None and den:
            return num / den
    m = _MIXED_RE.match(text)
    if m and int(m.group(4)):
        whole = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        return -whole if m.group(1) else whole
    return None


def _fraction_str(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def _read_arg(text: str, i: int) -> tuple[str, int] | None:
    """The next LaTeX argument at ``i``: a braced group, a command, or one character."""
    n = len(text)
    while i < n and text[i] == " ":
        i += 1
    if i >= n:
        return None
    c = text[i]
    if c == "{":
        close = match_brace(text, i)
        if close is None:
            return None
        return text[i + 1 : close], close + 1
    if c == "\\":
        m = _CMD_RE.match(text, i)
        if m is None or _FRAC_OR_SQRT_RE.match(m.group(0)):
            return None  # "\frac\frac..." is malformed: leave it as written
        return m.group(0), m.end()
    if c in "}^_":
        return None
    return c, i + 1


def _wrap(part: str) -> str:
    if _ATOM_RE.match(part) or _is_wrapped(part, "(", ")"):
        return part
    return f"({part})"


def _rewrite_commands(text: str, depth: int = 0) -> str:
    """``\\frac{a}{b}`` -> ``a/b`` (parenthesised when needed), ``\\sqrt2`` -> ``\\sqrt{2}``."""
    if depth > _MAX_DEPTH:
        return text
    out: list[str] = []
    i = 0
    while True:
        m = _FRAC_OR_SQRT_RE.search(text, i)
        if m is None:
            out.append(text[i:])
            break
        out.append(text[i : m.start()])
        j = m.end()
        if m.group(1) == "sqrt":
            index = ""
            if j < len(text) and text[j] == "[":
                close = text.find("]", j)
                if close == -1:
                    out.append(text[m.start() :])
                    break
                index, j = text[j : close + 1], close + 1
            arg = _read_arg(text, j)
            if arg is None:
                out.append(text[m.start() :])
                break
            out.append(f"\\sqrt{index}{{{_rewrite_commands(arg[0], depth + 1)}}}")
            i = arg[1]
            continue
        num = _read_arg(text, j)
        den = _read_arg(text, num[1]) if num is not None else None
        if num is None or den is None:
            out.append(text[m.start() :])
            break
        a, b = _rewrite_commands(num[0], depth + 1), _rewrite_commands(den[0], depth + 1)
        piece = f"{_wrap(a)}/{_wrap(b)}"
        prev = out[-1][-1:] if out and out[-1] else ""
        if prev and (prev.isdigit() or prev == ".") and piece[:1].isdigit():
            piece = "*" + piece  # never glue "2" and "1/2" into "21/2"
        out.append(piece)
        i = den[1]
    return "".join(out)


def closing_bracket(text: str) -> int | None:
    """Index of the bracket that closes the one ``text`` opens with (round, square and curly
    brackets counted together, not paired by kind), or None when none closes it."""
    depth = 0
    for k, c in enumerate(text):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0:
                return k
    return None


def _is_wrapped(text: str, opens: str, closes: str) -> bool:
    """Whether the bracket opening ``text`` is closed by its last character."""
    if len(text) < 2 or text[0] not in opens or text[-1] not in closes:
        return False
    return closing_bracket(text) == len(text) - 1


def _split_top(text: str) -> list[str]:
    """Split at commas outside any brackets."""
    parts: list[str] = []
    depth = 0
    start = 0
    for k, c in enumerate(text):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:k])
            start = k + 1
    parts.append(text[start:])
    return parts


def _strip_units(text: str) -> str:
    for _ in range(3):
        before = text
        m = _TRAILING_TEXT_RE.match(text)
        if m:
            text = m.group(1)
        m = _TRAILING_UNIT_RE.match(text)
        if m:
            text = m.group(1)
        m = _TRAILING_WORDS_RE.match(text)
        if m:
            text = m.group(1)
        text = text.strip()
        if text == before:
            break
    return text


def _clean(text: str) -> str:
    """Remove LaTeX decoration and units; keep the mathematical content."""
    text = text.replace("\u2212", "-").replace("{,}", ",")
    text = _REMOVE_RE.sub("", text)
    text = text.replace("\\ ", " ").replace("~", " ")
    text = _FRAC_ALIAS_RE.sub(r"\\frac", text)
    text = _TEXT_ALIAS_RE.sub(r"\\text{", text)
    text = _TIMES_RE.sub("*", text)
    text = _strip_units(text.strip())
    text = _TEXT_RE.sub(r"\1", text)
    text = _strip_units(text.strip()).rstrip(".").strip()
    m = _ASSIGN_RE.match(text)
    if m:
        text = m.group(1).strip()
    return text


def _normalize_once(text: str, depth: int = 0) -> str:
    text = text.strip()
    if depth > _MAX_DEPTH:
        return text  # absurdly deep nesting: leave it as written
    value = _to_fraction(text)  # fast path: plain numbers, the common case
    if value is not None:
        return _fraction_str(value)
    if "\\boxed" in text or "\\fbox" in text:
        boxed = extract_boxed(text)
        if boxed is not None:
            text = boxed
    text = _clean(text)
    if not text:
        return ""

    choice = _CHOICE_RE.match(text)
    if choice:
        return choice.group(1).upper()

    set_braces = text.startswith("\\{") and text.endswith("\\}") and len(text) >= 4
    if set_braces:
        inner = text[2:-2]
        return "\\{" + ", ".join(_normalize_once(p, depth + 1) for p in _split_top(inner)) + "\\}"
    wrapped = _is_wrapped(text, "([", ")]")
    if not wrapped:
        text = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), text)
    parts = _split_top(text[1:-1] if wrapped else text)
    if len(parts) > 1:
        body = ", ".join(_normalize_once(p, depth + 1) for p in parts)
        return f"{text[0]}{body}{text[-1]}" if wrapped else body
    if wrapped and text[0] == "(" and text[-1] == ")":
        return _normalize_once(text[1:-1], depth + 1)

    text = _WS_RE.sub(lambda m: m.group(1) + " " if m.group(1) else "", text)
    value = _to_fraction(text)
    if value is not None:
        return _fraction_str(value)
    text = _rewrite_commands(text)
    text = _SUPER_RE.sub(r"^\1", text)
    value = _to_fraction(text)
    if value is not None:
        return _fraction_str(value)
    if _WORDS_RE.match(text):
        return text.lower()
    return text


@lru_cache(maxsize=1 << 16)
def normalize_answer(ans: str | None) -> str | None:
    """The canonical form of an answer, so that equal answers compare equal as strings.

    Numbers become exact rationals (``"18"``, ``"1/2"``, ``"-3/4"``), from integers, decimals
    (read exactly from their digits), ``a/b``, ``\\frac{a}{b}``/``\\dfrac{a}{b}``/``\\frac ab``
    and mixed numbers (``2\\frac{1}{2}``). LaTeX decoration is removed (``\\left``, ``\\right``,
    ``\\!``, ``\\,``, spaces, ``^\\circ``, ``\\%``, dollar signs, ``\\text{}`` units, a trailing
    period), ``\\sqrt2`` becomes ``\\sqrt{2}``, a surrounding ``\\boxed{}`` is unwrapped, and tuples,
    intervals and lists are normalised element by element (``"(1/2, 3)"``). Other answers come
    back as the cleaned string (plain words lower-cased). The rewrite rules are applied until the
    result is stable, so ``normalize_answer(normalize_answer(x)) == normalize_answer(x)``.

    Args:
        ans: an answer as extracted from a solution, or None.

    Returns:
        The canonical string, or None when ``ans`` is None or blank.
    """
    if ans is None:
        return None
    result = _normalize_once(ans)
    if _CANONICAL_NUMBER_RE.match(result):
        return result
    for _ in range(_MAX_PASSES):
        again = _normalize_once(result)
        if again == result:
            break
        result = again
    return result or None


@lru_cache(maxsize=1 << 16)
def _canonical_value(canonical: str) -> Fraction | None:
    return _to_fraction(canonical)


def answers_equal(a: str | None, b: str | None) -> bool:
    """Whether two answers are the same answer.

    True iff both normalise to the same canonical form, or both are numbers equal within a
    relative tolerance of ``1e-9``. A None or blank answer equals nothing, not even itself.

    Args:
        a: an answer, or None.
        b: another answer, or None.

    Returns:
        Whether they are equal.
    """
    na, nb = normalize_answer(a), normalize_answer(b)
    if na is None or nb is None:
        return False
    if na == nb:
        return True
    va, vb = _canonical_value(na), _canonical_value(nb)
    if va is None or vb is None:
        return False
    return abs(va - vb) <= _REL_TOL * max(abs(va), abs(vb))


def is_correct(pred: str | None, gold: str | None) -> bool:
    """Whether a predicted answer matches the gold answer.

    Args:
        pred: the model's answer; None (no answer) is never correct.
        gold: the reference answer.

    Returns:
        Whether ``pred`` equals ``gold`` (see :func:`answers_equal`).

    Raises:
        AnswerError: ``gold`` is None or blank.
    """
    if gold is None or normalize_answer(gold) is None:
        raise AnswerError(
            f"correctness needs a gold answer, got {gold!r}: give the question a gold answer "
            "(Question.gold) or skip correctness for unlabelled questions"
        )
    return answers_equal(pred, gold)


def judged_correct(
    answer: str | None,
    gold: str | None,
    accepted: Sequence[str] | None = None,
    *,
    symbolic: bool = False,
) -> bool:
    """Whether an answer counts as right: the one rule every scorer applies.

    Without ``accepted`` (math, the testbed): the answer equals ``gold``
    (:func:`answers_equal`); no gold answer means nothing is right. With ``accepted`` given
    (code: the behaviour classes whose programs pass the hidden unit tests, see
    :mod:`env.code`; empty when none does), the answer is right iff its canonical form is one
    of them, whatever ``gold`` says.

    Args:
        answer: the answer to score, or None.
        gold: the reference answer, or None.
        accepted: canonical answers judged right by other means (None: use ``gold``).
        symbolic: where the hand-written rule finds the two unequal, ask math-verify too
            (:func:`symbolic_equal`; MATH-500).

    Returns:
        Whether the answer is right.
    """
    if accepted is not None:
        key = normalize_answer(answer)
        return key is not None and key in accepted
    if gold is None:
        return False
    return symbolic_equal(answer, gold) if symbolic else answers_equal(answer, gold)


@lru_cache(maxsize=1 << 14)
def symbolic_equal(a: str | None, b: str | None) -> bool:
    """:func:`answers_equal`, and where it says no, Hugging Face's ``math-verify`` (sympy):
    equal values written differently (``3\\sqrt{13}`` and ``\\sqrt{117}``, a set in another
    order) are equal.

    The hand-written rule decides alone where it says yes, and it alone scores GSM8K: on the
    GSM8K bank's 9,600 chains the two disagree 23 times (``python bench/checkers.py``; the
    README, "Competition math"), mostly chains cut off at the token cap after computing the
    answer but before stating it (the hand-written rule reads the last result, math-verify
    reads nothing); the hand-written rule takes about 10 µs a check, math-verify 0.8-7 ms. On
    MATH-500's reference solutions both find all 500 right.

    math-verify is given :data:`SYMBOLIC_CPU_SECONDS` of this process's CPU time for the two
    parses and the comparison together, not its own wall-clock alarm: on a loaded machine a
    wall-clock limit cut checks that finish here in milliseconds (``\\boxed{angela}`` timed out
    while a recorder held both cores), so the same chains could be scored differently from run to
    run. Out of time counts as not shown equal. The limit is a signal, so it applies on the main
    thread only; elsewhere math-verify runs without one.
    """
    if answers_equal(a, b):
        return True
    if a is None or b is None or not a.strip() or not b.strip():
        return False
    try:
        with _cpu_limit(SYMBOLIC_CPU_SECONDS):
            return _math_verify_equal(a, b)
    except _OutOfCpuTime:
        return False


#: CPU seconds :func:`symbolic_equal` gives math-verify for one pair of answers.
SYMBOLIC_CPU_SECONDS = 5.0


class _OutOfCpuTime(BaseException):
    """Raised by the CPU-time signal; a BaseException so that sympy's and math-verify's own
    ``except Exception`` blocks do not swallow it halfway."""


@contextmanager
def _cpu_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_OutOfCpuTime` once the block has used ``seconds`` of this process's CPU
    time (``ITIMER_PROF``); no limit off the main thread, where signals cannot be handled."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    armed = [True]  # disarmed first on the way out, so a late signal cannot skip the clean-up

    def _expire(signum: int, frame: object) -> None:
        if armed[0]:
            raise _OutOfCpuTime

    previous = signal.signal(signal.SIGPROF, _expire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def _math_verify_equal(a: str, b: str) -> bool:
    """math-verify's parse and verify, with its own wall-clock timeouts off (the caller limits
    CPU time) and its note that they are off silenced; its failures count as not equal."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        pa = parse(f"$\\boxed{{{a}}}$", parsing_timeout=None)  # type: ignore[arg-type]
        pb = parse(f"$\\boxed{{{b}}}$", parsing_timeout=None)  # type: ignore[arg-type]
        return bool(pa and pb and verify(pa, pb, timeout_seconds=None))
    except Exception:  # math-verify's own failures (it logs them): not shown equal
        return False


def group_answers(answers: Sequence[str | None]) -> dict[str, list[int]]:
    """Group equal answers, for majority votes.

    Args:
        answers: answers in sample order; None and blank answers are skipped.

    Returns:
        Canonical answer -> indices (ascending) of the answers that normalise to it, keys in order
        of first appearance. As a partition of the indices it does not depend on the order of
        ``answers``.
    """
    groups: dict[str, list[int]] = {}
    for i, ans in enumerate(answers):
        key = normalize_answer(ans)
        if key is not None:
            groups.setdefault(key, []).append(i)
    return groups
