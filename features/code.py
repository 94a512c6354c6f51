"""Code answers: the model's code from a completion, the program to run, the answer it gives.

A code chain's *answer* is its behaviour: the values its function returns on the calls shown in
the question's docstring. :func:`behaviour_signature` turns those values into an answer string
(``code:`` and 16 hex digits), so chains that behave the same on the visible calls share an
answer and votes, margins and the other answer features work on code unchanged.

Everything here is pure: nothing is executed (running code is :mod:`env.code.sandbox`'s job).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "SIGNATURE_PREFIX",
    "assemble_program",
    "behaviour_signature",
    "extract_code",
    "visible_pass_rate",
]

#: What every behaviour signature starts with.
SIGNATURE_PREFIX = "code:"

#: Fence languages that hold Python (a bare fence included).
_PYTHON_LANGS = frozenset({"", "python", "py", "python3", "py3"})
_FENCE_RE = re.compile(r"^\s*```\s*([\w+-]*)")
_CODE_START_RE = re.compile(r"^\s*(?:import\s|from\s+[\w.]+\s+import\s|(?:async\s+)?def\s)")


def _def_re(entry_point: str) -> re.Pattern[str]:
    return re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class _Block:
    code: str
    python: bool
    closed: bool


def _fenced_blocks(lines: list[str]) -> list[_Block]:
    """Markdown code blocks in order; the last one may be unclosed."""
    blocks: list[_Block] = []
    lang: str | None = None
    body: list[str] = []
    for line in lines:
        m = _FENCE_RE.match(line)
        if lang is None:
            if m:
                lang, body = m.group(1).lower(), []
        elif line.strip() == "```":
            blocks.append(_Block("\n".join(body).strip("\n"), lang in _PYTHON_LANGS, True))
            lang = None
        else:
            body.append(line)
    if lang is not None:
        blocks.append(_Block("\n".join(body).strip("\n"), lang in _PYTHON_LANGS, False))
    return blocks


def _parses(code: str) -> bool:
    try:
        ast.parse(textwrap.dedent(code))
    except (SyntaxError, ValueError):
        return False
    return True


def extract_code(text: str, entry_point: str, *, ended: bool = True) -> str | None:
    """The model's code in a chat completion, or None when it holds none.

    The rules, in order:

    1. Among the fenced blocks (```` ```python ````, ```` ```py ```` or a bare ```` ``` ````)
       that define ``entry_point``, the last complete one.
    2. Else the last complete such block that parses as Python (a body without its ``def``
       counts: it is parsed dedented).
    3. Else, when the text has no fence at all but defines ``entry_point``, the text from its
       first ``import`` / ``from ... import`` / ``def`` line to the end.

    A block is complete when it is closed, or when it runs to the end of a text that ended
    (``ended``): a chain still being generated may add to an unclosed block, so with
    ``ended=False`` it is not complete, and neither is rule 3's unfenced code (its end is the
    text's end, known only once the chain ended).

    Args:
        text: the completion (explanation, code blocks, more explanation).
        entry_point: the name of the function asked for.
        ended: whether the completion is finished.

    Returns:
        The code as written (fence lines removed, indentation kept), or None.
    """
    lines = text.splitlines()
    blocks = [b for b in _fenced_blocks(lines) if b.python and b.code.strip()]
    complete = [b for b in blocks if b.closed or ended]
    defines = _def_re(entry_point)
    for b in reversed(complete):
        if defines.search(b.code):
            return b.code
    for b in reversed(complete):
        if _parses(b.code):
            return b.code
    if ended and not any(_FENCE_RE.match(line) for line in lines) and defines.search(text):
        start = next(i for i, line in enumerate(lines) if _CODE_START_RE.match(line))
        return "\n".join(lines[start:]).strip("\n")
    return None


def _function_end_and_indent(prompt: str, entry_point: str) -> tuple[int, str] | None:
    """The last line (1-based) of the prompt's ``entry_point`` and its body's indentation."""
    try:
        tree = ast.parse(prompt)
    except (SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == entry_point:
            end = node.end_lineno if node.end_lineno is not None else node.lineno
            return end, " " * node.body[-1].col_offset
    return None


def assemble_program(prompt: str, code: str, entry_point: str) -> str:
    """A module that defines ``entry_point`` from the question's prompt and the model's code.

    The HumanEval prompt comes first (its imports, helper functions and the target ``def``,
    whose body is its docstring): the model's code may rely on them. Code that defines
    ``entry_point`` follows it whole and re-defines the function. Code without that ``def``
    (the model wrote only the body) becomes the body of the prompt's function instead,
    indented as the docstring is, right after the docstring.

    Nothing is executed; the result may not even parse (the sandbox reports that as an error).

    Args:
        prompt: the HumanEval prompt (valid Python ending with the target's docstring).
        code: the model's code (from :func:`extract_code`).
        entry_point: the name of the function asked for.

    Returns:
        The program's source.
    """
    code = textwrap.dedent(code).strip("\n")
    if _def_re(entry_point).search(code):
        return prompt.rstrip() + "\n\n\n" + code + "\n"
    where = _function_end_and_indent(prompt, entry_point)
    lines = prompt.rstrip().splitlines()
    end, indent = where if where is not None else (len(lines), "    ")
    body = [indent + line if line.strip() else "" for line in code.splitlines()]
    return "\n".join([*lines[:end], *body, *lines[end:]]) + "\n"


def behaviour_signature(values: Sequence[str]) -> str:
    """The answer string of a chain whose function gave ``values`` on the visible calls.

    ``values`` are the calls' outcomes in call order (``CallOutcome.value``: a ``repr`` or an
    ``!Exception`` marker). The signature is ``"code:"`` and the first 16 hex digits of the
    sha256 of their JSON list: the same on every machine and run, equal for two chains exactly
    when their outputs on the visible calls are equal (up to hash collisions), and its own
    canonical form under :func:`features.answers.normalize_answer`, so votes group code
    chains by behaviour.

    Args:
        values: one string per visible call, in call order.

    Returns:
        ``code:`` followed by 16 lower-case hex digits.
    """
    digest = hashlib.sha256(json.dumps(list(values)).encode("utf-8")).hexdigest()
    return SIGNATURE_PREFIX + digest[:16]


def visible_pass_rate(matched: Sequence[bool | None]) -> float | None:
    """Share of the calls with an expected value whose result matched it.

    Args:
        matched: ``CallOutcome.matched`` of each call (None for a call without an expected
            value).

    Returns:
        A share in [0, 1], or None when no call has an expected value.
    """
    checked = [m for m in matched if m is not None]
    if not checked:
        return None
    return sum(checked) / len(checked)
