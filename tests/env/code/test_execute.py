"""Running model-written functions on calls and on HumanEval-style tests, in the sandbox.

``TestVerdict`` is used through ``types.`` so that pytest does not take it for a test class.
"""

from __future__ import annotations

import pytest

from env.code import types
from env.code.execute import MAX_REPR, run_calls, run_tests
from env.code.sandbox import Limits
from env.code.types import Call, CallOutcome
from features.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

ADD = "def add(a, b):\n    return a + b\n"
CHECK_ADD = (
    "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n"
)
SHORT = Limits(wall_s=3, cpu_s=2)


# --- run_calls ----------------------------------------------------------------------------------


def test_a_correct_program_matches_every_call() -> None:
    calls = [Call("1, 2", "3"), Call("[1], [2]", "[1, 2]"), Call("'a', 'b'", "'ab'")]
    assert run_calls(ADD, "add", calls) == [
        CallOutcome("3", True),
        CallOutcome("[1, 2]", True),
        CallOutcome("'ab'", True),
    ]


def test_an_incorrect_program_does_not_match() -> None:
    program = "def add(a, b):\n    return a - b\n"
    assert run_calls(program, "add", [Call("1, 2", "3"), Call("2, 0", "2")]) == [
        CallOutcome("-1", False),
        CallOutcome("2", True),
    ]


def test_a_call_without_expected_value_has_no_match() -> None:
    assert run_calls(ADD, "add", [Call("1, 1")]) == [CallOutcome("2", None)]


def test_a_raising_call_gives_its_exception_and_the_next_calls_still_run() -> None:
    program = "def inv(x):\n    return 1 / x\n"
    outcomes = run_calls(program, "inv", [Call("0", "1"), Call("0"), Call("2", "0.5")])
    assert outcomes == [
        CallOutcome("!ZeroDivisionError", False),
        CallOutcome("!ZeroDivisionError", None),
        CallOutcome("0.5", True),
    ]


def test_a_looping_call_times_out_and_the_next_calls_still_run() -> None:
    program = "def f(x):\n    while x == 0:\n        pass\n    return x\n"
    outcomes = run_calls(program, "f", [Call("0", "0"), Call("1", "1")], call_timeout_s=0.3)
    assert outcomes == [CallOutcome("!timeout", False), CallOutcome("1", True)]


def test_a_call_that_swallows_its_timeout_ends_the_process_and_keeps_finished_calls() -> None:
    program = (
        "def f(x):\n"
        "    while x == 0:\n"
        "        try:\n"
        "            while True:\n"
        "                pass\n"
        "        except BaseException:\n"
        "            pass\n"
        "    return x\n"
    )
    calls = [Call("1", "1"), Call("0", "0"), Call("2", "2")]
    outcomes = run_calls(program, "f", calls, limits=SHORT, call_timeout_s=0.3)
    assert outcomes == [
        CallOutcome("1", True),
        CallOutcome("!timeout", False),
        CallOutcome("!timeout", False),
    ]


def test_a_call_the_sandbox_blocks_crashes_the_rest() -> None:
    program = "import os\ndef f(x):\n    if x == 2:\n        os.fork()\n    return x\n"
    outcomes = run_calls(program, "f", [Call("1", "1"), Call("2", "2"), Call("3")])
    assert outcomes == [
        CallOutcome("1", True),
        CallOutcome("!crash", False),
        CallOutcome("!crash", None),
    ]


@pytest.mark.parametrize(
    ("program", "error"),
    [
        ("def f(x:\n    return x\n", "!SyntaxError"),
        ("raise ValueError('at import')\ndef f(x):\n    return x\n", "!ValueError"),
        ("import sys\nsys.exit(3)\n", "!SystemExit"),
        ("def g(x):\n    return x\n", "!NameError"),
    ],
    ids=["syntax", "import-error", "exit", "undefined"],
)
def test_a_program_that_defines_no_function_fails_every_call(program: str, error: str) -> None:
    outcomes = run_calls(program, "f", [Call("1", "1"), Call("2")])
    assert outcomes == [CallOutcome(error, False), CallOutcome(error, None)]


def test_a_program_looping_at_import_times_out_every_call() -> None:
    outcomes = run_calls("while True:\n    pass\n", "f", [Call("1", "1")], limits=SHORT)
    assert outcomes == [CallOutcome("!timeout", False)]


@pytest.mark.parametrize(
    ("returned", "expected", "matched"),
    [
        ("0.1 + 0.2", "0.3", True),
        ("1.0000001", "1", True),
        ("1.001", "1.0", False),
        ("[0.1 + 0.2, [1, 2.0000000001]]", "[0.3, [1, 2]]", True),
        ("(0.1 + 0.2,)", "(0.3,)", True),
        ("(1.0,)", "[1.0]", False),
        ("{'a': 0.1 + 0.2}", "{'a': 0.3}", True),
        ("{'a': 1}", "{'b': 1}", False),
        ("True", "1", True),
        ("'1'", "1", False),
        ("10**400", "1.0", False),
        ("float('inf')", "float('inf')", True),
    ],
)
def test_floats_match_within_a_tolerance(returned: str, expected: str, matched: bool) -> None:
    program = f"def f():\n    return {returned}\n"
    [outcome] = run_calls(program, "f", [Call("", expected)])
    assert outcome.matched is matched


def test_an_expected_value_that_does_not_evaluate_has_no_match() -> None:
    assert run_calls(ADD, "add", [Call("1, 2", "3 +")]) == [CallOutcome("3", None)]


def test_arguments_are_fresh_for_every_call() -> None:
    program = "def f(xs):\n    xs.append(1)\n    return xs\n"
    outcomes = run_calls(program, "f", [Call("[]", "[1]"), Call("[]", "[1]")])
    assert outcomes == [CallOutcome("[1]", True), CallOutcome("[1]", True)]


def test_an_object_equal_to_everything_does_not_match() -> None:
    program = (
        "class Anything:\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "    def __repr__(self):\n"
        "        return 'Anything()'\n"
        "def f():\n"
        "    return Anything()\n"
    )
    assert run_calls(program, "f", [Call("", "3")]) == [CallOutcome("Anything()", False)]


def test_a_long_value_is_cut() -> None:
    [outcome] = run_calls("def f():\n    return 'x' * 5000\n", "f", [Call("")])
    assert len(outcome.value) == MAX_REPR
    assert outcome.value.startswith("'xxx")


def test_the_program_cannot_report_by_itself() -> None:
    program = "report({'outcomes': [['3', True]]})\ndef f():\n    return 0\n"
    assert run_calls(program, "f", [Call("", "3")]) == [CallOutcome("!NameError", False)]


def test_run_calls_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="entry_point"):
        run_calls(ADD, "add(1); import os", [Call("1, 2")])
    with pytest.raises(ConfigError, match="call_timeout_s"):
        run_calls(ADD, "add", [Call("1, 2")], call_timeout_s=0)


def test_no_calls_give_no_outcomes() -> None:
    assert run_calls(ADD, "add", []) == []


# --- run_tests ----------------------------------------------------------------------------------


def test_a_correct_program_passes_its_tests() -> None:
    assert run_tests(ADD, CHECK_ADD, "add") == types.TestVerdict(
        passed=True, verdict="ok", detail=""
    )


def test_a_wrong_program_fails_with_the_assertion() -> None:
    verdict = run_tests("def add(a, b):\n    return 3\n", CHECK_ADD, "add")
    assert verdict == types.TestVerdict(
        passed=False, verdict="error", detail="exit 1: AssertionError"
    )


def test_a_raising_program_fails_with_its_exception() -> None:
    verdict = run_tests("def add(a, b):\n    return a / 0\n", CHECK_ADD, "add")
    assert not verdict.passed
    assert verdict.detail == "exit 1: ZeroDivisionError: division by zero"


@pytest.mark.parametrize(
    "cheat",
    [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "report('passed')\n",
    ],
    ids=["sys-exit", "os-exit", "report"],
)
def test_a_program_that_exits_before_the_tests_does_not_pass(cheat: str) -> None:
    verdict = run_tests(cheat + "def add(a, b):\n    return 0\n", CHECK_ADD, "add")
    assert not verdict.passed
    assert verdict.verdict == "error"


def test_an_infinite_loop_in_the_tests_times_out() -> None:
    verdict = run_tests(
        ADD, "def check(candidate):\n    while True:\n        pass\n", "add", limits=SHORT
    )
    assert not verdict.passed
    assert verdict.verdict == "timeout"


def test_a_blocked_program_does_not_pass() -> None:
    verdict = run_tests("import socket\nsocket.socket()\n" + ADD, CHECK_ADD, "add")
    assert verdict == types.TestVerdict(
        passed=False, verdict="blocked", detail="blocked: socket.__new__"
    )


def test_a_main_block_does_not_run() -> None:
    program = ADD + "if __name__ == '__main__':\n    input()\n"
    assert run_tests(program, CHECK_ADD, "add").passed


def test_run_tests_rejects_a_bad_entry_point() -> None:
    with pytest.raises(ConfigError, match="entry_point"):
        run_tests(ADD, CHECK_ADD, "")


def test_sets_read_the_same_in_every_interpreter() -> None:
    # string hashes differ between interpreters, and so does a set's repr order: the outcome
    # shows sets sorted, so the same behaviour always gets the same answer
    program = "def f(words):\n    return set(words), (frozenset(words),), {'k': set(words)}\n"
    calls = [Call("['pear', 'apple', 'fig', 'kiwi', 'plum', 'date']")]
    seen = {run_calls(program, "f", calls)[0].value for _ in range(4)}
    assert len(seen) == 1
    (value,) = seen
    assert value.startswith("(set({'apple', 'date', 'fig'")
    assert run_calls("def f():\n    return set()\n", "f", [Call("")])[0].value == "set()"
    assert run_calls("def f():\n    return (1,)\n", "f", [Call("")])[0].value == "(1,)"
