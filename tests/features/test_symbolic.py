"""Symbolic answer equivalence (math-verify) beside the hand-written rule."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from env.types import Question
from features import answers
from features.answers import answers_equal, judged_correct, symbolic_equal


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("3\\sqrt{13}", "\\sqrt{117}"),  # simplified radicals
        ("\\{1,2\\}", "\\{2,1\\}"),  # a set in another order
        ("\\frac{\\pi}{2}", "\\dfrac{\\pi}{2}"),
        ("18", "18.0"),  # the hand-written rule's own cases still hold
    ],
)
def test_equal_values_written_differently(a: str, b: str) -> None:
    assert symbolic_equal(a, b) and symbolic_equal(b, a)


@pytest.mark.parametrize(
    ("a", "b"), [("3\\sqrt{13}", "\\sqrt{118}"), ("2\\pi", "6.2832"), ("x", "")]
)
def test_different_values_stay_different(a: str, b: str) -> None:
    assert not symbolic_equal(a, b)
    assert not symbolic_equal(None, b)


def test_only_symbolic_data_sets_ask_math_verify() -> None:
    assert not answers_equal("\\sqrt{117}", "3\\sqrt{13}")
    assert not judged_correct("\\sqrt{117}", "3\\sqrt{13}")
    assert judged_correct("\\sqrt{117}", "3\\sqrt{13}", symbolic=True)
    math = Question("math500/test/x", "t", gold="3\\sqrt{13}", dataset="math500")
    gsm = Question("gsm8k/test/0", "t", gold="3\\sqrt{13}", dataset="gsm8k")
    assert math.is_right("\\sqrt{117}") and not gsm.is_right("\\sqrt{117}")


def test_it_works_off_the_main_thread() -> None:
    out: list[bool] = []
    worker = threading.Thread(target=lambda: out.append(symbolic_equal("2\\sqrt{2}", "\\sqrt{8}")))
    worker.start()
    worker.join()
    assert out == [True]


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[object, float], None]]:
    """Replace math-verify with a check under a CPU limit, the cache emptied before and after."""

    def replace(check: object, seconds: float) -> None:
        monkeypatch.setattr(answers, "_math_verify_equal", check)
        monkeypatch.setattr(answers, "SYMBOLIC_CPU_SECONDS", seconds)

    symbolic_equal.cache_clear()
    yield replace
    symbolic_equal.cache_clear()


def test_a_check_out_of_cpu_time_counts_unequal_and_leaves_no_timer(
    fresh: Callable[[object, float], None],
) -> None:
    def spin(a: str, b: str) -> bool:
        while True:  # a parse that never ends, as sympy's can
            pass

    fresh(spin, 0.05)
    handler = signal.getsignal(signal.SIGPROF)
    assert not symbolic_equal("x^{x^{x}}", "y")
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGPROF) is handler


def test_waiting_is_not_cpu_time(fresh: Callable[[object, float], None]) -> None:
    """A loaded machine makes a check wait, not work: only CPU time counts, so the verdict does
    not depend on what else runs (a wall-clock limit of 0.05 s would have cut this one)."""

    def slow_but_idle(a: str, b: str) -> bool:
        time.sleep(0.3)
        return True

    fresh(slow_but_idle, 0.05)
    assert symbolic_equal("\\sqrt{8}", "2\\sqrt{2}")
