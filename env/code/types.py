"""Records shared by the code domain: a call to run, what it gave, and a test verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Call", "CallOutcome", "TestVerdict", "Verdict"]

#: How a sandboxed run ended. ``ok``: it ran to the end; ``error``: an exception or a non-zero
#: exit; ``timeout``: the wall-clock or CPU limit; ``memory``: the memory limit; ``output``: it
#: wrote more than the output limit; ``blocked``: it tried something the sandbox forbids (a
#: socket, a new process, writing outside its folder); ``killed``: a signal ended it otherwise.
Verdict = Literal["ok", "error", "timeout", "memory", "output", "blocked", "killed"]


@dataclass(frozen=True, slots=True)
class Call:
    """One call of the function under test, as Python source.

    Attributes:
        args: the argument list as written between the call's parentheses (``"[1, 2], 3"``).
        expected: the expected value as a Python expression, or None where the example gives
            none (the call still counts for behaviour).
    """

    args: str
    expected: str | None = None


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What one call gave.

    Attributes:
        value: ``repr`` of the returned value, or ``!ExceptionName`` when it raised, or
            ``!timeout`` / ``!crash`` when the call did not finish.
        matched: whether the value equals the call's expected value (None without one).
    """

    value: str
    matched: bool | None = None


@dataclass(frozen=True, slots=True)
class TestVerdict:
    """The result of running a program against unit tests.

    Attributes:
        passed: every test passed (the test code ran to its end without an exception).
        verdict: how the run ended (:data:`Verdict`); ``ok`` when passed.
        detail: a one-line reason (the exception, the limit reached, what was blocked).
    """

    passed: bool
    verdict: Verdict
    detail: str = ""
