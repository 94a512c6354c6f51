"""HumanEval (``data/code/humaneval.jsonl.gz``, MIT licence in ``data/code/LICENSE-humaneval``).

Each of the 164 tasks is a Python prompt (imports, helpers, and the target function's ``def``
with only its docstring) that the model is asked to complete. Two kinds of calls matter:

- The *visible* calls: the examples the docstring shows, parsed by :func:`visible_calls`.
  They are what a policy may see run (the ``verify`` action), and a chain's outputs on them
  are its answer (:func:`features.code.behaviour_signature`), so votes work on code.
- The *hidden* unit tests (:attr:`CodeTask.test`): they decide correctness only. They stay in
  :class:`CodeTask`; the :class:`~env.types.Question` a policy sees holds the prompt alone.

Question ids are ``humaneval/<split>/<index>`` (``humaneval/test/17`` is ``HumanEval/17``), so
:func:`env.questions.question_split` reads their split as for GSM8K.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from env.code.types import Call
from env.questions import DATA_DIR, take_subset
from env.types import Question
from features.answers import closing_bracket
from features.errors import ConfigError

__all__ = [
    "DEFAULT_PATH",
    "CodeTask",
    "code_question",
    "load_humaneval",
    "load_tasks",
    "task_of",
    "task_split",
    "visible_calls",
]

#: Where the shipped HumanEval file lies.
DEFAULT_PATH = DATA_DIR / "code" / "humaneval.jsonl.gz"

_QID_RE = re.compile(r"humaneval/(train|test)/(\d+)")


@dataclass(frozen=True, slots=True)
class CodeTask:
    """One HumanEval task.

    Attributes:
        task_id: HumanEval's id (``HumanEval/17``).
        index: the number in the id.
        prompt: the code shown to the model (ends with the target's docstring).
        entry_point: the name of the function to complete.
        visible: the docstring's example calls (:func:`visible_calls`).
        test: the hidden unit tests (a ``check(candidate)`` function): correctness only,
            never shown to a policy, left out of ``repr``.
        canonical_solution: the reference body (left out of ``repr`` too).
    """

    task_id: str
    index: int
    prompt: str = field(repr=False)
    entry_point: str
    visible: tuple[Call, ...]
    test: str = field(repr=False)
    canonical_solution: str = field(repr=False)


# --------------------------------------------------------------------------------------------
# Visible calls: the docstring's examples
# --------------------------------------------------------------------------------------------

_OPEN, _CLOSE = "([{", ")]}"

# What may stand between a call and its expected value: ``f(x) == 3``, ``==> 3``, ``=> 3``,
# ``-> 3``, ``➞ 3``, ``= 3``, ``# returns 3``, ``# => 3``, ``should return 3``, ``returns 3``,
# ``the output should be 3``.
_SEPARATOR_RE = re.compile(
    r"[ \t]*(?:#[ \t]*)?"
    r"(?:==>|=>|==|->|➞|=|should\s+return\b|returns\b"
    r"|,?[ \t]*the[ \t]+(?:output|result)[ \t]+should[ \t]+be\b)[ \t]*"
)
_ASSIGNMENT_RE = re.compile(r"\s*([A-Za-z_]\w*)\s*[:=]\s*(\S.*?)\s*", re.DOTALL)
_INPUT_RE = re.compile(r"^[ \t]*Input[ \t]*:[ \t]*(.*)$", re.MULTILINE | re.IGNORECASE)
_OUTPUT_RE = re.compile(r"^[ \t]*Output[ \t]*:[ \t]*(.*)$", re.MULTILINE | re.IGNORECASE)
_FOR_RE = re.compile(
    r"^[ \t]*for[ \t]+(.*?)[ \t,]*the[ \t]+(?:output|result)[ \t]+should[ \t]+be[ \t]+(.*)$",
    re.MULTILINE | re.IGNORECASE,
)
_HEADING_RE = re.compile(
    r"^[ \t]*(?:for[ \t]+)?examples?(?:[ \t]+\d+)?[ \t]*:?[ \t]*$", re.MULTILINE | re.IGNORECASE
)
_BARE_EQUALS_RE = re.compile(r"(?<![=<>!])=(?![=>])")
_OPERATOR_START = tuple("+-*/%<>=&|^@")
_LITERAL_ERRORS = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)


def _mask(text: str) -> str:
    """``text`` with the insides of one-line string literals replaced by ``_`` (same length),
    so that brackets, ``#`` and ``=`` left in it are code. A quote that is not closed on its
    line is prose (an apostrophe), not a string."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "'\"":
            j = i + 1
            while j < n and text[j] not in (c, "\n"):
                j += 2 if text[j] == "\\" else 1
            if j < n and text[j] == c:
                out[i + 1 : j] = "_" * (j - i - 1)
                i = j + 1
                continue
        i += 1
    return "".join(out)


def _line_end(masked: str) -> int:
    """Length of the logical line at the start of ``masked``: up to the first newline outside
    brackets (the physical line when a bracket is never closed)."""
    depth = 0
    for i, c in enumerate(masked):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(0, depth - 1)
        elif c == "\n" and depth == 0:
            return i
    if depth == 0:
        return len(masked)
    newline = masked.find("\n")
    return len(masked) if newline < 0 else newline


def _split_top(text: str) -> list[str]:
    """``text`` cut at commas outside brackets and strings."""
    masked = _mask(text)
    parts, depth, start = [], 0, 0
    for i, c in enumerate(masked):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _literal(text: str) -> str | None:
    """``text`` stripped of a sentence's trailing punctuation if it is a Python literal
    (``true`` / ``false`` read as ``True`` / ``False``), else None."""
    t = text.strip().rstrip(".,;:").strip()
    if t in ("true", "false"):
        return t.capitalize()
    if not t:
        return None
    try:
        ast.literal_eval(t)
    except _LITERAL_ERRORS:
        return None
    return t


def _expected(text: str) -> str | None:
    """The expected value written at the start of ``text`` (the rest of an example's line).

    The whole text (a trailing ``# comment`` dropped) if it is a literal; else, when it holds a
    bare ``=`` (``19 - 5 - 6 = 8``, ``1 + 9 + 0 + 0 = 10``), what follows the last one; else
    its longest literal prefix that ends at a space and is not followed by an operator
    (``15 and closest_integer(...)`` gives ``15``; ``1 + 9`` gives nothing).
    """
    masked = _mask(text)
    comment = masked.find("#")
    if comment >= 0:
        text, masked = text[:comment], masked[:comment]
    whole = _literal(text)
    if whole is not None:
        return whole
    equals = [m.start() for m in _BARE_EQUALS_RE.finditer(masked)]
    if equals:
        return _expected(text[equals[-1] + 1 :])
    depth, ends = 0, []
    for i, c in enumerate(masked):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(0, depth - 1)
        elif c in " \t\n" and depth == 0:
            ends.append(i)
    for i in reversed(ends):
        if text[i:].lstrip().startswith(_OPERATOR_START):
            continue
        prefix = _literal(text[:i])
        if prefix is not None:
            return prefix
    return None


def _doctest_output(doc: str, after_call: int) -> str | None:
    """The expected output of a ``>>> f(...)`` line: the lines after it up to a blank line, the
    next ``>>>`` or the docstring's end (empty output is doctest's ``None``). None when
    something other than a comment follows the call on its line, or the output is no literal."""
    line_end = doc.find("\n", after_call)
    line_end = len(doc) if line_end < 0 else line_end
    rest = doc[after_call:line_end]
    comment = _mask(rest).find("#")
    if (rest if comment < 0 else rest[:comment]).strip():
        return None
    output: list[str] = []
    for line in doc[line_end + 1 :].splitlines():
        if not line.strip() or line.strip().startswith(">>>"):
            break
        output.append(line.strip())
    return _literal(" ".join(output)) if output else "None"


def _compact(args: str) -> str:
    """An argument list written over several lines, on one."""
    args = re.sub(r"([\[({])\s*\n\s*", r"\1", args)
    args = re.sub(r"\s*\n\s*([\])}])", r"\1", args)
    return re.sub(r"\s*\n\s*", " ", args).strip()


@dataclass(frozen=True, slots=True)
class _Params:
    names: tuple[str, ...]
    required: int
    varargs: bool

    def fits(self, n: int) -> bool:
        return self.required <= n and (self.varargs or n <= len(self.names))


@dataclass(frozen=True, slots=True)
class _Example:
    at: int
    args: str
    expected: str | None


def _args_from_assignments(text: str, params: _Params, *, prefix_only: bool) -> str | None:
    """``arr = [1, 2], k = 3`` (or ``grid : [...]``) as an argument list (``[1, 2], 3``),
    in parameter order when the names are the parameters', else as written. With
    ``prefix_only`` the leading assignments count (``N = 1000, the sum of ...``)."""
    pairs: list[tuple[str, str]] = []
    for part in _split_top(text):
        if not part.strip():
            continue
        m = _ASSIGNMENT_RE.fullmatch(part)
        if m is None:
            if prefix_only:
                break
            return None
        pairs.append((m.group(1), m.group(2)))
    if not pairs:
        return None
    names = [name for name, _ in pairs]
    if len(set(names)) == len(names) and set(names) <= set(params.names):
        pairs.sort(key=lambda p: params.names.index(p[0]))
    return ", ".join(value for _, value in pairs)


def _call_examples(doc: str, entry_point: str) -> list[_Example]:
    """``f(args)`` anywhere in the docstring, with what follows it."""
    out: list[_Example] = []
    for m in re.finditer(rf"(?<![\w.]){re.escape(entry_point)}\(", doc):
        open_at = m.end() - 1
        close_rel = closing_bracket(_mask(doc[open_at:]))
        if close_rel is None:
            continue
        close = open_at + close_rel
        line_start = doc.rfind("\n", 0, m.start()) + 1
        separator = _SEPARATOR_RE.match(doc, close + 1)
        expected: str | None = None
        if separator is not None:
            start = separator.end()
            expected = _expected(doc[start : start + _line_end(_mask(doc[start:]))])
        elif re.fullmatch(r"[ \t]*>>>[ \t]*", doc[line_start : m.start()]):
            expected = _doctest_output(doc, close + 1)
        out.append(_Example(m.start(), doc[open_at + 1 : close], expected))
    return out


def _input_output_examples(doc: str, params: _Params) -> list[_Example]:
    """``Input: X`` (or ``Input: a = X, b = Y``, or ``Input:`` and ``name : X`` lines) up to
    the next ``Output: Y``."""
    out: list[_Example] = []
    inputs = list(_INPUT_RE.finditer(doc))
    outputs = list(_OUTPUT_RE.finditer(doc))
    for k, inp in enumerate(inputs):
        following = next((o for o in outputs if o.start() > inp.end()), None)
        if following is None or (k + 1 < len(inputs) and inputs[k + 1].start() < following.start()):
            continue
        pieces = [inp.group(1), *doc[inp.end() : following.start()].splitlines()]
        text = ", ".join(p.strip() for p in pieces if p.strip())
        args = _args_from_assignments(text, params, prefix_only=False) or text
        out.append(_Example(inp.start(), args, _expected(following.group(1))))
    return out


def _for_examples(doc: str, params: _Params) -> list[_Example]:
    """``For lst = [1, 2] the output should be 3`` (``the result should be`` too)."""
    out: list[_Example] = []
    for m in _FOR_RE.finditer(doc):
        args = _args_from_assignments(m.group(1), params, prefix_only=True)
        if args is not None:
            out.append(_Example(m.start(), args, _expected(m.group(2))))
    return out


def _target(prompt: str, entry_point: str) -> tuple[str, _Params] | None:
    """The raw source of ``entry_point``'s docstring (escapes as written, quotes removed) and
    its parameters, or None when the prompt does not define it with a docstring."""
    try:
        tree = ast.parse(prompt)
    except (SyntaxError, ValueError):
        return None
    for node in tree.body:
        if not (isinstance(node, ast.FunctionDef) and node.name == entry_point):
            continue
        a = node.args
        names = tuple(p.arg for p in [*a.posonlyargs, *a.args])
        params = _Params(names, len(names) - len(a.defaults), a.vararg is not None)
        for stmt in node.body:  # the docstring may follow an import (HumanEval/115)
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                source = ast.get_source_segment(prompt, stmt.value)
                if isinstance(stmt.value.value, str) and source is not None:
                    source = source.lstrip("rRuU")
                    quote = 3 if source[:3] in ('"""', "'''") else 1
                    return source[quote:-quote], params
        return None
    return None


def visible_calls(prompt: str, entry_point: str) -> list[Call]:
    """The example calls of ``entry_point`` that its docstring shows, in order, deduplicated.

    Formats read, with how many of the 164 prompts use each (measured; 155 tasks have at least
    one call, 154 at least one expected value; 452 calls, 445 with an expected value):

    - doctest ``>>> f(args)`` with the output on the lines after it, up to a blank line or the
      next ``>>>`` (no output is ``None``, as in doctest): 70 tasks; ``>>> f(args) == value``:
      6 tasks;
    - ``f(args) <sep> value`` with ``<sep>`` one of ``==``, ``==>``, ``=>``, ``->``, ``➞``,
      ``=``, ``should return``, ``returns``, ``# returns``, ``# =>``, ``the output should
      be`` (also ``for f(args) == value``): 68 tasks;
    - ``Input: X`` / ``Output: Y`` pairs, ``X`` an argument list or assignments
      (``arr = [..], k = 3``, or ``name : value`` lines), in parameter order: 8 tasks;
    - ``For lst = [..] the output should be Y`` (``the result should be``): 6 tasks;
    - a call inside a larger expression (``>>> round(find_zero([1, 2]), 2)``) or in prose
      without a value: kept without an expected value (HumanEval/32).

    Not read (no calls): ``arr = [..]`` / ``return [..]`` walk-throughs (HumanEval/105), the
    operator/operand example of HumanEval/160, and prompts without examples (38, 41, 50, 83).

    A value that is no expression is read leniently: ``-> 19 - 5 - 6 = 8`` gives ``8`` (after
    the last ``=``), ``returns 15 and ...`` gives ``15``, ``true`` is ``True``; one that still
    does not ``ast.literal_eval`` gives ``expected=None`` and the call stays. A call whose
    arguments are not all positional literals (``is_happy(a)``, HumanEval/80: no calls), or do
    not fit the function's parameters (``next_smallest()`` in prose), is dropped, and so are
    calls of other functions (HumanEval/81 shows ``grade_equation(...)``, HumanEval/149
    ``list_sort(...)``: no calls).
    Calls with equal arguments are one call, with the first expected value given. When the
    expected values disagree in type (HumanEval/130's prose defines ``tri(n)`` as a number,
    its example returns a list) only those after the last ``Example(s):`` heading are kept.

    Args:
        prompt: a HumanEval prompt.
        entry_point: the function whose calls to read.

    Returns:
        The calls: arguments as written (on one line), expected values as written.
    """
    target = _target(prompt, entry_point)
    if target is None:
        return []
    doc, params = target
    examples = sorted(
        [
            *_call_examples(doc, entry_point),
            *_input_output_examples(doc, params),
            *_for_examples(doc, params),
        ],
        key=lambda e: e.at,
    )
    merged: dict[str, list[tuple[str, str | None, int]]] = {}
    for e in examples:
        try:
            node = ast.parse(f"f({e.args})", mode="eval").body
            if not isinstance(node, ast.Call) or node.keywords:
                continue
            values = tuple(ast.literal_eval(a) for a in node.args)
        except _LITERAL_ERRORS:
            continue
        if not params.fits(len(values)):
            continue
        merged.setdefault(repr(values), []).append((_compact(e.args), e.expected, e.at))
    calls: list[tuple[str, str | None, int]] = []
    for seen in merged.values():
        given = [s for s in seen if s[1] is not None]
        calls.append(given[0] if given else seen[0])
    kinds = {type(ast.literal_eval(exp)) for _, exp, _ in calls if exp is not None} - {type(None)}
    headings = [m.end() for m in _HEADING_RE.finditer(doc)]
    if len(kinds) > 1 and headings and any(at > headings[-1] for _, exp, at in calls if exp):
        calls = [(args, exp if at > headings[-1] else None, at) for args, exp, at in calls]
    return [Call(args, expected) for args, expected, _ in calls]


# --------------------------------------------------------------------------------------------
# Tasks, splits, questions
# --------------------------------------------------------------------------------------------


def _read_tasks(path: Path) -> list[CodeTask]:
    if not path.exists():
        raise ConfigError(
            f"HumanEval file {path} is missing: it ships in the repository's data/ folder "
            f"(data/code/humaneval.jsonl.gz)"
        )
    tasks: list[CodeTask] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for r in rows:
            task_id = str(r["task_id"])
            prompt, entry_point = str(r["prompt"]), str(r["entry_point"])
            tasks.append(
                CodeTask(
                    task_id=task_id,
                    index=int(task_id.rsplit("/", 1)[-1]),
                    prompt=prompt,
                    entry_point=entry_point,
                    visible=tuple(visible_calls(prompt, entry_point)),
                    test=str(r["test"]),
                    canonical_solution=str(r["canonical_solution"]),
                )
            )
    except (OSError, EOFError, ValueError, KeyError) as e:
        raise ConfigError(
            f"HumanEval file {path} is unreadable ({type(e).__name__}: {e}): restore it from "
            f"the repository's data/ folder"
        ) from e
    return tasks


@lru_cache(maxsize=1)
def _shipped_tasks() -> tuple[CodeTask, ...]:
    return tuple(_read_tasks(DEFAULT_PATH))


def load_tasks(path: Path | None = None) -> list[CodeTask]:
    """The HumanEval tasks in file order (default: the shipped file, read once).

    Raises:
        ConfigError: the file is missing or unreadable.
    """
    return list(_shipped_tasks()) if path is None else _read_tasks(Path(path))


def _id_hash(task_id: str) -> bytes:
    return hashlib.sha256(task_id.encode()).digest()


def _split_map(tasks: Sequence[CodeTask]) -> dict[str, str]:
    ordered = sorted(tasks, key=lambda t: (len(t.prompt), _id_hash(t.task_id)))
    splits: dict[str, str] = {}
    for i in range(0, len(ordered), 2):
        pair = ordered[i : i + 2]
        first = min(pair, key=lambda t: _id_hash(t.task_id))
        for t in pair:
            splits[t.task_id] = "test" if t is first else "train"
    return splits


@lru_cache(maxsize=1)
def _shipped_splits() -> dict[str, str]:
    return _split_map(_shipped_tasks())


def task_split(task: CodeTask, tasks: Sequence[CodeTask] | None = None) -> str:
    """``train`` or ``test``: the task's half of ``tasks`` (default: the shipped 164, 82 each).

    The tasks, sorted by prompt length (ties by the sha256 of their id), are taken in
    consecutive pairs; of each pair the task whose id has the smaller sha256 is a test task,
    the other a training task (an odd one out is a test task). So both halves have the same
    spread of prompt lengths (a proxy for how much a task asks), the cut is the same on every
    machine, and it does not depend on the file's order.

    Raises:
        ConfigError: the task is not among ``tasks``.
    """
    splits = _shipped_splits() if tasks is None else _split_map(tasks)
    if task.task_id not in splits:
        raise ConfigError(
            f"{task.task_id} is not among the given tasks: pass the task set it belongs to"
        )
    return splits[task.task_id]


def code_question(task: CodeTask, split: str, gold: str | None = None) -> Question:
    """The question a policy sees for ``task``: its prompt, never its tests.

    Args:
        task: the task.
        split: ``train`` or ``test`` (its :func:`task_split`); it goes into the id.
        gold: the reference answer, the behaviour signature of the canonical solution on the
            visible calls (:func:`features.code.behaviour_signature`), computed by running it
            elsewhere; None when unknown.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"HumanEval split must be 'train' or 'test', got {split!r}")
    return Question(
        qid=f"humaneval/{split}/{task.index}",
        text=task.prompt,
        gold=gold,
        dataset="humaneval",
        difficulty=None,
    )


def load_humaneval(
    split: str = "test",
    n: int | None = None,
    *,
    seed: int | None = None,
    golds: Mapping[str, str] | None = None,
) -> list[Question]:
    """HumanEval questions of ``split`` (``train`` or ``test``, :func:`task_split`) in index
    order, optionally a seeded random subset (as :func:`env.questions.load_gsm8k`).

    Args:
        split: ``train`` or ``test``.
        n: how many (all of them when None).
        seed: shuffle with this seed before taking ``n``.
        golds: reference behaviour signatures by task id (``HumanEval/17``); tasks missing
            from it get ``gold=None``.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"HumanEval split must be 'train' or 'test', got {split!r}")
    golds = golds or {}
    items = [
        code_question(t, split, golds.get(t.task_id))
        for t in _shipped_tasks()
        if task_split(t) == split
    ]
    return take_subset(items, n, seed)


def task_of(qid: str, tasks: Sequence[CodeTask] | None = None) -> CodeTask:
    """The task behind a question id such as ``humaneval/test/17``.

    Args:
        qid: a HumanEval question id.
        tasks: the task set (default: the shipped one).

    Raises:
        ConfigError: the id is not a HumanEval id, names no task, or names the wrong split.
    """
    m = _QID_RE.fullmatch(qid)
    if m is None:
        raise ConfigError(
            f"{qid!r} is not a HumanEval question id: expected humaneval/<train|test>/<index>"
        )
    pool = _shipped_tasks() if tasks is None else tasks
    index = int(m.group(2))
    task = next((t for t in pool if t.index == index), None)
    if task is None:
        raise ConfigError(f"{qid!r} names no HumanEval task: there is no HumanEval/{index}")
    if task_split(task, tasks) != m.group(1):
        raise ConfigError(
            f"{qid!r} names the wrong split: HumanEval/{index} is a {task_split(task, tasks)} task"
        )
    return task
