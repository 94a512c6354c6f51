"""What a code bank's execution results say, per problem: pass@1, pass@k and verified-pass.

* **pass@1**: the share of a problem's programs that pass the hidden tests (each program's
  own verdict).
* **pass@k**: some program passes.
* **verified-pass**: best-of-k with execution verification: the program that passes the most
  visible examples is submitted (ties: the one whose behaviour class is largest, then the
  first), and its own hidden verdict counts.
* **maj@k**: the largest behaviour class is submitted and counts as right when the class is
  judged right (:func:`env.code.grade.accepted_answers`), as the env scores it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from env.code.grade import ChainExecution

if TYPE_CHECKING:
    from env.bank.store import QuestionTrace, TraceBank

__all__ = ["ProblemRow", "code_rows", "verified_choice"]


@dataclass(frozen=True, slots=True)
class ProblemRow:
    """One problem of a code bank.

    Attributes:
        qid: the question id.
        chains: programs recorded.
        visible: visible calls with an expected value that the best program could be checked
            on (0: verification has nothing to go on).
        pass1: share of programs that pass the hidden tests.
        passk: some program passes.
        verified: the program execution verification picks passes.
        majority: the largest behaviour class is judged right.
        classes: distinct behaviour classes among the programs.
    """

    qid: str
    chains: int
    visible: int
    pass1: float
    passk: bool
    verified: bool
    majority: bool
    classes: int


def verified_choice(executions: list[ChainExecution]) -> ChainExecution | None:
    """The program best-of-k with execution verification submits (None without any code)."""
    with_code = [e for e in executions if e.answer is not None]
    if not with_code:
        return None
    sizes = Counter(e.answer for e in with_code)
    return max(
        with_code,
        key=lambda e: (
            -1.0 if e.visible_pass is None else e.visible_pass,
            sizes[e.answer],
            -e.chain,
        ),
    )


def _row(qt: QuestionTrace) -> ProblemRow:
    if qt.execution is None:
        raise ValueError(f"{qt.question.qid} has no execution results")
    execs = [ChainExecution.from_json(d) for d in qt.execution["chains"]]
    chosen = verified_choice(execs)
    classes = Counter(e.answer for e in execs if e.answer is not None)
    top = classes.most_common(1)[0][0] if classes else None
    from env.code.humaneval import task_of

    task = task_of(qt.question.qid)
    return ProblemRow(
        qid=qt.question.qid,
        chains=len(execs),
        visible=sum(c.expected is not None for c in task.visible),
        pass1=sum(e.passed for e in execs) / max(1, len(execs)),
        passk=any(e.passed for e in execs),
        verified=chosen is not None and chosen.passed,
        majority=qt.question.is_right(top),
        classes=len(classes),
    )


def code_rows(bank: TraceBank) -> list[ProblemRow]:
    """One row per recorded problem of a code bank, in recording order."""
    return [_row(qt) for qt in bank]
