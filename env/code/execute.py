"""Run a model-written program in the sandbox: its function on given calls, or unit tests.

Both functions build a small harness around the program and run it with
:func:`env.code.sandbox.run_python`; they hold no ponder state. The harness runs the program in
a namespace of its own, as HumanEval's harness does: ``report`` is not in it, and neither is a
``__name__`` (so an ``if __name__ == "__main__":`` block does not run).

:func:`run_calls` runs every call in one process, each under its own time limit (``SIGALRM``
inside the child), and reports after each call, so the calls that finished are kept when a
later one takes the whole process down; the calls never reported get ``!timeout`` when the
process ran out of time and ``!crash`` otherwise (memory, blocked, killed, exit).

:func:`run_tests` passes only on the harness's own report after ``check(entry_point)``
returns: a program that exits early (``sys.exit(0)``, ``os._exit(0)``) does not pass.
"""

from __future__ import annotations

import json
import keyword
import logging
import math
from collections.abc import Sequence

from env.code.sandbox import Limits, run_python
from env.code.types import Call, CallOutcome, TestVerdict
from features.errors import ConfigError

__all__ = ["run_calls", "run_tests"]

logger = logging.getLogger(__name__)

#: Longest ``CallOutcome.value`` (a ``repr``), in characters.
MAX_REPR = 1000

_CALLS_HARNESS = r"""
def _harness(report, job):
    import builtins, linecache, math, signal

    class CallTimeout(BaseException):
        pass

    def on_alarm(signum, frame):
        raise CallTimeout

    def close(result, expected):
        numbers = (bool, int, float)
        if type(expected) in numbers and type(result) in numbers:
            if float in (type(expected), type(result)):
                try:
                    return math.isclose(result, expected, rel_tol=1e-6, abs_tol=1e-6)
                except OverflowError:
                    return False
            return result == expected
        if type(result) is not type(expected):  # and so == is the builtin type's own
            return False
        if type(expected) in (list, tuple):
            return len(result) == len(expected) and all(map(close, result, expected))
        if type(expected) is dict:
            return result.keys() == expected.keys() and all(
                close(result[k], expected[k]) for k in expected)
        return result == expected

    def canonical(value, depth=0):
        # A set's repr follows its elements' hashes, which differ between interpreters for
        # strings (hash randomisation, and -I ignores PYTHONHASHSEED): show sets sorted, so
        # the same behaviour reads the same in every run.
        if depth > 20:
            return repr(value)
        if type(value) in (set, frozenset):
            items = sorted(canonical(v, depth + 1) for v in value)
            name = "set" if type(value) is set else "frozenset"
            return name + "({" + ", ".join(items) + "})" if items else name + "()"
        if type(value) in (list, tuple):
            inner = ", ".join(canonical(v, depth + 1) for v in value)
            if type(value) is tuple:
                return "(" + inner + ("," if len(value) == 1 else "") + ")"
            return "[" + inner + "]"
        if type(value) is dict:
            return "{" + ", ".join(
                canonical(k, depth + 1) + ": " + canonical(v, depth + 1) for k, v in value.items()
            ) + "}"
        return repr(value)

    def shown(result):
        try:
            text = canonical(result)
        except Exception:
            text = "<%s object>" % type(result).__name__
        return text[:job["max_repr"]]

    def one(args, expected):
        want, has_want = None, False
        signal.signal(signal.SIGALRM, on_alarm)  # again: the program may have replaced it
        try:
            signal.setitimer(signal.ITIMER_REAL, job["timeout"])
            try:
                if expected is not None:
                    try:
                        want, has_want = eval(expected, {"__builtins__": builtins}), True
                    except Exception:
                        pass
                result = eval(job["entry"] + "(" + args + "\n)", namespace)
                value = shown(result)
                try:
                    matched = close(result, want) if has_want else None
                except Exception:
                    matched = False
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except CallTimeout:
            return "!timeout", False if has_want else None
        except BaseException as exc:
            return "!" + type(exc).__name__, False if has_want else None
        return value, matched

    program = job["program"]
    linecache.cache["<program>"] = (len(program), None, program.splitlines(True), "<program>")
    namespace = {"__builtins__": builtins}
    try:
        exec(compile(program, "<program>", "exec"), namespace)
        if job["entry"] not in namespace:
            raise NameError(job["entry"])
    except BaseException as exc:
        report({"error": type(exc).__name__})
        return
    outcomes = []
    for args, expected in job["calls"]:
        outcomes.append(one(args, expected))
        report({"outcomes": outcomes})


_harness(report, __import__("json").loads(@JOB@))
"""

_TESTS_HARNESS = r"""
def _harness(report, job):
    import builtins, linecache

    source = job["program"] + "\n\n" + job["test"] + "\n\ncheck(" + job["entry"] + ")\n"
    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    exec(compile(source, "<program>", "exec"), {"__builtins__": builtins})
    report("passed")


_harness(report, __import__("json").loads(@JOB@))
"""


def run_calls(
    program: str,
    entry_point: str,
    calls: Sequence[Call],
    *,
    limits: Limits | None = None,
    call_timeout_s: float = 2.0,
) -> list[CallOutcome]:
    """Run ``entry_point`` of ``program`` on each call, in one sandboxed process.

    Each call's arguments are evaluated afresh (no call sees another's mutations). A value
    is the ``repr`` of the result (at most :data:`MAX_REPR` characters), ``!ExceptionName``
    when the call raised, ``!timeout`` past ``call_timeout_s``. ``matched`` compares the
    result with the evaluated ``expected``: floats within ``rel_tol=abs_tol=1e-6``, lists,
    tuples and dicts element by element, anything else with ``==`` on the same type; None
    without an expected or when it does not evaluate, False when the call gave no value.

    Args:
        program: module source that defines ``entry_point``.
        entry_point: the function's name.
        calls: the calls, in order.
        limits: limits of the whole process; by default :class:`Limits` with room for every
            call to use its whole time limit.
        call_timeout_s: wall-clock seconds of one call.

    Returns:
        One outcome per call, in order. Where the program defines no function (a syntax
        error, an exception at import) every value is ``!`` and that error's name; where the
        process died, the calls it did not finish get ``!timeout`` or ``!crash``.

    Raises:
        ConfigError: ``entry_point`` is not an identifier or ``call_timeout_s`` is not > 0.
    """
    _check_entry_point(entry_point)
    if not call_timeout_s > 0:
        raise ConfigError(
            f"call_timeout_s must be > 0, got {call_timeout_s!r}; pass seconds such as 2.0"
        )
    if limits is None:
        wall = max(Limits().wall_s, 5.0 + call_timeout_s * len(calls))
        limits = Limits(wall_s=wall, cpu_s=math.ceil(wall))
    job = {
        "program": program,
        "entry": entry_point,
        "calls": [[call.args, call.expected] for call in calls],
        "timeout": call_timeout_s,
        "max_repr": MAX_REPR,
    }
    result = run_python(_CALLS_HARNESS.replace("@JOB@", repr(json.dumps(job))), limits=limits)
    report = result.report if isinstance(result.report, dict) else {}

    def missed(value: str, call: Call) -> CallOutcome:
        return CallOutcome(value, None if call.expected is None else False)

    error = report.get("error")
    if isinstance(error, str):
        return [missed("!" + error, call) for call in calls]
    outcomes: list[CallOutcome] = []
    for item in report.get("outcomes") or []:
        if len(outcomes) == len(calls) or not _is_outcome(item):
            break
        outcomes.append(CallOutcome(item[0], item[1]))
    if len(outcomes) < len(calls):
        logger.debug(
            "run_calls: %d of %d calls lost (%s)",
            len(calls) - len(outcomes),
            len(calls),
            result.detail,
        )
        lost = "!timeout" if result.verdict == "timeout" else "!crash"
        outcomes += [missed(lost, call) for call in calls[len(outcomes) :]]
    return outcomes


def run_tests(
    program: str, test: str, entry_point: str, *, limits: Limits | None = None
) -> TestVerdict:
    """Run HumanEval-style tests: ``test`` defines ``check(candidate)``.

    Runs ``program``, ``test`` and ``check(entry_point)`` as one module in the sandbox.

    Args:
        program: module source that defines ``entry_point``.
        test: source that defines ``check(candidate)``, which raises when a test fails.
        entry_point: the function's name.
        limits: limits of the run (default :class:`Limits`).

    Returns:
        Passed only when ``check`` returned; otherwise the verdict and its reason (the
        sandbox's detail, such as ``exit 1: AssertionError``).

    Raises:
        ConfigError: ``entry_point`` is not an identifier.
    """
    _check_entry_point(entry_point)
    job = {"program": program, "test": test, "entry": entry_point}
    result = run_python(_TESTS_HARNESS.replace("@JOB@", repr(json.dumps(job))), limits=limits)
    if result.verdict == "ok" and result.report == "passed":
        return TestVerdict(passed=True, verdict="ok")
    if result.verdict == "ok":
        return TestVerdict(
            passed=False, verdict="error", detail="exited before the tests finished (exit 0)"
        )
    return TestVerdict(passed=False, verdict=result.verdict, detail=result.detail)


def _check_entry_point(entry_point: str) -> None:
    if not entry_point.isidentifier() or keyword.iskeyword(entry_point):
        raise ConfigError(
            f"entry_point must be a Python identifier, got {entry_point!r}; "
            "pass the function's name, such as 'has_close_elements'"
        )


def _is_outcome(item: object) -> bool:
    return (
        isinstance(item, list)
        and len(item) == 2
        and isinstance(item[0], str)
        and (item[1] is None or isinstance(item[1], bool))
    )
