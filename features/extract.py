"""Reading the answer out of generated text: ``\\boxed{}``, GSM8K's ``####``, "The answer is",
the last number, a short factual reply, a probe's completion, and GSM8K's gold field.

What comes out is the answer *as written*; :mod:`features.answers` decides when two answers are
the same (and re-exports the readers, so ``from features.answers import extract_answer``
keeps working). Pure and fast (precompiled patterns, linear scans): these run in the
controller's inner loop.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from features.errors import AnswerError

__all__ = [
    "extract_answer",
    "extract_boxed",
    "extract_short_answer",
    "gsm8k_gold",
    "match_brace",
    "read_probe",
]

# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_START_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_GSM_MARK_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(
    r"\b(?:final\s+answer|the\s+answer|answer)\s*(?:\*\*)?\s*(?:is\b\s*:?|:|=)\s*(?:\*\*)?[ \t]*",
    re.IGNORECASE,
)
# A number as written in running text: sign, thousands commas, decimals, an optional "/denominator".
_NUMBER_TEXT = (
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|(?<![\w.])-?\.\d+"
)
_NUMBER_TEXT_RE = re.compile(_NUMBER_TEXT)
_LEADING_NUMBER_RE = re.compile(r"\s*(?:\\\$|\$)?\s*(" + _NUMBER_TEXT + r")(?![\w^{\\])")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")


def match_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` that closes the ``{`` at ``start``, or None when it is never closed."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in "{}":
            i += 2  # an escaped brace (\{ or \}) is content, not structure
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _closing_braces(text: str) -> dict[int, int]:
    """Index of the ``}`` that closes each closed ``{`` (escaped braces are content), in one
    pass: :func:`match_brace` for every brace at once."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in "{}":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _boxed_at(
    text: str, start: int, closing: Callable[[str, int], int | None] = match_brace
) -> str | None:
    """The content of the ``\\boxed``/``\\fbox`` whose command ends at ``start``, if well formed
    (``closing(text, i)``: the index of the ``}`` that closes the ``{`` at ``i``)."""
    i = start
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] == "{":
        close = closing(text, i)
        if close is None:
            return None
        return text[i + 1 : close]
    if start < n and text[start] in " \t":
        # "\boxed 5": the argument is the next token.
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last balanced ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); a box that is never closed
    (a truncated generation) is skipped in favour of the previous complete one.

    Args:
        text: generated text.

    Returns:
        The box content, stripped, or None when there is no complete box.
    """
    starts = [m.end() for m in _BOX_START_RE.finditer(text)]
    if not starts:
        return None
    content = _boxed_at(text, starts[-1])  # the usual case: the last box is complete
    if content is not None:
        return content.strip()
    # Earlier boxes: their braces from one pass, not one scan each (which is quadratic in a
    # text of many unclosed boxes, such as a model steered to repeat "\\boxed{").
    pairs = _closing_braces(text)
    for start in reversed(starts[:-1]):
        content = _boxed_at(text, start, lambda _, i: pairs.get(i))
        if content is not None:
            return content.strip()
    return None


def _after_gsm8k_mark(text: str) -> str | None:
    marks = _GSM_MARK_RE.findall(text)
    if not marks:
        return None
    line = marks[-1].strip()
    m = _NUMBER_TEXT_RE.search(line)
    if m:
        return m.group(0)
    return line or None


def _after_answer_is(text: str) -> str | None:
    """The answer after the last "The answer is" whose line has one. Matches are read from the
    last back, each with the rest of its line cut only then: a line of many matches costs time
    linear in its length (copying each match's rest of line was quadratic)."""
    ends = [m.end() for m in _ANSWER_IS_RE.finditer(text)]
    for end in reversed(ends):
        stop = text.find("\n", end)
        candidate = _answer_phrase(text[end : stop if stop >= 0 else len(text)])
        if candidate:
            return candidate
    return None


def _answer_phrase(rest: str) -> str | None:
    """The answer at the start of what follows "The answer is"."""
    rest = rest.strip().strip("*").strip()
    for prefix in ("\\(", "\\[", "$$"):
        if rest.startswith(prefix):
            rest = rest[len(prefix) :]
    m = _LEADING_NUMBER_RE.match(rest)
    if m:
        return m.group(1)
    end = _SENTENCE_END_RE.search(rest)
    phrase = rest[: end.start()] if end else rest
    for suffix in ("\\)", "\\]", "$$"):
        if phrase.endswith(suffix):
            phrase = phrase[: -len(suffix)]
    phrase = phrase.strip().rstrip(".").strip("*").strip()
    return phrase or None


def extract_answer(text: str) -> str | None:
    """The model's final answer in a generated solution.

    Tries, in order: the last balanced ``\\boxed{...}``/``\\fbox{...}``; the number after the last
    GSM8K-style ``####``; the last "The answer is X" / "Answer: X" / "Final answer: X"; the last
    number anywhere in the text.

    Args:
        text: a generated solution.

    Returns:
        The answer as written (not normalised; see :func:`normalize_answer`), or None.
    """
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    for finder in (_after_gsm8k_mark, _after_answer_is):
        found = finder(text)
        if found:
            return found
    numbers = _NUMBER_TEXT_RE.findall(text)
    return numbers[-1] if numbers else None


_SHORT_WORDS = 8
_IS_RE = re.compile(
    r"^.*\b(?:is|was|are|were|by|called|named)\s+(?P<x>[^.;\n]{1,80})\.?\s*$", re.IGNORECASE
)
_ARTICLE_RE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)


def extract_short_answer(text: str) -> str | None:
    """A short factual answer (a name, a date, a short phrase) in a generated reply.

    Tries, in order: the last ``\\boxed{...}``; the last "The answer is X" / "Answer: X"; the
    words after the last "is" / "was" / "by" / "called" of the reply's last sentence, when they
    are at most eight, without a leading article (``... in Black Mass is Mira Sorvino.``); the
    whole reply when it is one line of at most eight words (``John Asbury``). Never the last number anywhere, which
    :func:`extract_answer` falls back to for math.

    Args:
        text: a generated reply.

    Returns:
        The answer as written (a trailing period removed), or None.
    """
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    found = _after_answer_is(text)
    if found:
        return found
    reply = text.strip()
    last = re.split(r"(?<=[.!?])\s+", reply)[-1] if reply else ""
    m = _IS_RE.search(last)
    if m and len(m.group("x").split()) <= _SHORT_WORDS:
        found = _ARTICLE_RE.sub("", m.group("x").strip().strip('"').rstrip(".").strip())
        if found:
            return found
    if reply and "\n" not in reply and len(reply.split()) <= _SHORT_WORDS:
        return reply.rstrip(".").strip() or None
    return None


def read_probe(completion: str) -> str | None:
    """Read the answer from a probe completion that continues an already-emitted ``\\boxed{``.

    The completion looks like ``42}`` or ``\\frac{1}{2}} and so on``: the answer runs up to the
    brace that closes the box (nested braces balanced). When no brace closes it (the engine
    stopped on ``}`` and dropped it, or ran out of tokens), the first line is taken.

    Args:
        completion: the text generated after ``\\boxed{``.

    Returns:
        The answer, stripped, or None when it is empty.
    """
    close = match_brace("{" + completion, 0)
    answer = completion[: close - 1] if close is not None else completion.split("\n", 1)[0]
    answer = answer.strip()
    return answer or None


def gsm8k_gold(answer_field: str) -> str:
    """The gold answer after ``####`` in a GSM8K ``answer`` field.

    Args:
        answer_field: the dataset's answer text, ending in ``#### 72``.

    Returns:
        The gold answer, stripped (thousands commas kept; normalisation removes them).

    Raises:
        AnswerError: the field has no ``####`` line or nothing after it.
    """
    marks = _GSM_MARK_RE.findall(answer_field)
    gold = marks[-1].strip() if marks else ""
    if not gold:
        raise AnswerError(
            "GSM8K answer field has no gold answer after '####' "
            f"(field ends with {answer_field[-60:]!r}); pass the dataset's 'answer' column"
        )
    return gold
