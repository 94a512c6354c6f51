"""Execution grading of code chains: what a chain's code answers, what verifying it reads, and
whether it is right.

Three readings of one program (the code a chain wrote, after the task's prompt so that its
imports and helpers are defined: :func:`features.code.assemble_program`), all run in the
sandbox (:mod:`env.code.sandbox`):

* **answer**: the program's behaviour on the calls the prompt's docstring shows
  (:attr:`env.code.humaneval.CodeTask.visible`): the ``repr`` of each result, or the exception
  it raised, hashed into ``code:<hex>`` (:func:`features.code.behaviour_signature`). Chains
  with the same outputs give the same answer, so majority votes and Adaptive-Consistency work
  on code as on math. A task whose docstring shows no call gives every program that compiles
  one answer (votes cannot tell its programs apart), and one that does not compile another.
* **verify**: the share of the visible calls with an expected value whose result equals it
  (:func:`features.code.visible_pass_rate`): the signal the ``verify`` action may use; 0.5
  ("no evidence") when there is no code yet or no call has an expected value.
* **correct**: the hidden unit tests (:attr:`~env.code.humaneval.CodeTask.test`) pass. They
  decide correctness only and never reach a policy.

A question's answer is a behaviour class, not one program, and programs that agree on the
visible calls can still differ on the hidden tests. A class is therefore judged right when at
least half of its recorded programs pass the hidden tests (:func:`accepted_answers`): the
chance that a program drawn from the class passes is then at least one half. The bank keeps
every program's own verdict beside it (pass@1 and pass@k in ``ponder bank info`` count those).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from env.code.execute import run_calls, run_tests
from env.code.humaneval import CodeTask
from env.code.sandbox import Limits
from env.code.types import TestVerdict
from features.code import assemble_program, behaviour_signature, extract_code, visible_pass_rate

__all__ = [
    "NO_EVIDENCE",
    "ChainExecution",
    "CodeGrader",
    "accepted_answers",
    "grader_for",
]

#: What ``verify`` reads when nothing can be run: no code yet, or no expected value to compare.
NO_EVIDENCE = 0.5

_DEFINED = "<compiles>"
_NOT_COMPILING = "!SyntaxError"


@dataclass(frozen=True, slots=True)
class ChainExecution:
    """What running one chain's final code gave.

    Attributes:
        chain: the chain's index within its question.
        answer: its behaviour class (``code:<hex>``), None when it wrote no code.
        visible: each visible call's result (``repr`` or ``!Exception``), in call order.
        visible_pass: share of the visible calls with an expected value that it passes (None
            without such calls or without code).
        passed: the hidden unit tests pass.
        verdict: how the hidden-test run ended (``ok``, ``error``, ``timeout``, ...; ``none``
            without code).
        detail: one line on why (the failed assertion, the limit reached).
        program_sha256: sha256 of the program that ran (prompt + the chain's code).
    """

    chain: int
    answer: str | None
    visible: tuple[str, ...]
    visible_pass: float | None
    passed: bool
    verdict: str
    detail: str
    program_sha256: str

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["visible"] = list(self.visible)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChainExecution:
        return cls(
            chain=int(d["chain"]),
            answer=d["answer"],
            visible=tuple(str(v) for v in d["visible"]),
            visible_pass=None if d["visible_pass"] is None else float(d["visible_pass"]),
            passed=bool(d["passed"]),
            verdict=str(d["verdict"]),
            detail=str(d["detail"]),
            program_sha256=str(d["program_sha256"]),
        )


class CodeGrader:
    """Runs a task's chains, each distinct program once (results are cached by program).

    Args:
        task: the task (its prompt, visible calls and hidden tests).
        limits: sandbox limits for one run (default: :class:`~env.code.sandbox.Limits`).
        call_timeout_s: time limit of one visible call.
    """

    def __init__(
        self, task: CodeTask, *, limits: Limits | None = None, call_timeout_s: float = 2.0
    ) -> None:
        self.task = task
        self.limits = limits
        self.call_timeout_s = call_timeout_s
        self._visible: dict[str, tuple[tuple[str, ...], float | None]] = {}
        self._hidden: dict[str, TestVerdict] = {}

    def program(self, text: str, *, ended: bool = True) -> str | None:
        """The program a chain's text holds so far (None: no complete code block yet)."""
        code = extract_code(text, self.task.entry_point, ended=ended)
        if code is None:
            return None
        return assemble_program(self.task.prompt, code, self.task.entry_point)

    def _run_visible(self, program: str) -> tuple[tuple[str, ...], float | None]:
        got = self._visible.get(program)
        if got is None:
            if self.task.visible:
                outcomes = run_calls(
                    program,
                    self.task.entry_point,
                    self.task.visible,
                    limits=self.limits,
                    call_timeout_s=self.call_timeout_s,
                )
                got = (
                    tuple(o.value for o in outcomes),
                    visible_pass_rate([o.matched for o in outcomes]),
                )
            else:
                got = ((_DEFINED if _compiles(program) else _NOT_COMPILING,), None)
            self._visible[program] = got
        return got

    def read(self, text: str, *, ended: bool) -> tuple[str | None, float]:
        """``(answer, verify score)`` of a chain's text so far: its behaviour class and the
        share of visible examples it passes (:data:`NO_EVIDENCE` when unknown)."""
        program = self.program(text, ended=ended)
        if program is None:
            return None, NO_EVIDENCE
        values, rate = self._run_visible(program)
        return behaviour_signature(values), NO_EVIDENCE if rate is None else rate

    def grade(self, chain: int, text: str) -> ChainExecution:
        """The final grading of an ended chain: its answer, visible results and hidden tests."""
        program = self.program(text, ended=True)
        if program is None:
            return ChainExecution(chain, None, (), None, False, "none", "no code", "")
        values, rate = self._run_visible(program)
        verdict = self._hidden.get(program)
        if verdict is None:
            verdict = run_tests(program, self.task.test, self.task.entry_point, limits=self.limits)
            self._hidden[program] = verdict
        return ChainExecution(
            chain=chain,
            answer=behaviour_signature(values),
            visible=values,
            visible_pass=rate,
            passed=verdict.passed,
            verdict=verdict.verdict,
            detail=verdict.detail[:300],
            program_sha256=hashlib.sha256(program.encode()).hexdigest(),
        )


@lru_cache(maxsize=256)
def grader_for(qid: str) -> CodeGrader:
    """The grader of code question ``qid``, one per process (its runs are cached)."""
    from env.code.humaneval import task_of

    return CodeGrader(task_of(qid))


def _compiles(program: str) -> bool:
    try:
        ast.parse(program)
    except (SyntaxError, ValueError):
        return False
    return True


def accepted_answers(executions: Sequence[ChainExecution]) -> tuple[str, ...]:
    """The behaviour classes judged right: those where at least half the programs pass the
    hidden tests (sorted, for a stable file)."""
    seen: dict[str, list[bool]] = {}
    for e in executions:
        if e.answer is not None:
            seen.setdefault(e.answer, []).append(e.passed)
    return tuple(sorted(a for a, ok in seen.items() if 2 * sum(ok) >= len(ok)))
