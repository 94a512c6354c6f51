"""The testbed's synthetic task: multi-step arithmetic with checkable steps and a difficulty knob.

A question defines a chain of variables, each computed from the previous one::

    Let a = 37. Let b = a + 48. Let c = b * 3. What is c?

A step-by-step solution (``cot`` mode) writes every step in full; a Chain-of-Draft solution
(``draft`` mode) writes only each result, so the model has to compute in its head (shorter, more
error-prone: the real trade-off of Chain-of-Draft)::

    cot:    b = a + 48 = 37 + 48 = 85            draft:  b = 85
            c = b * 3 = 85 * 3 = 255                     c = 255
            The answer is \\boxed{255}.                  The answer is \\boxed{255}.

Difficulty grows with the number of steps and the operand size (:data:`LEVELS`). Every step is
checkable, so generated solutions can be labelled step by step (:func:`label_steps`) to train a
process reward model.

The training text also teaches the behaviours that the generator's controls act on: occasional
re-checks that open with a thought-switch word (``Wait,`` / ``Alternatively,``; what TIP penalises),
a re-derivation after ``Wait,`` once the answer is given (what s1 budget forcing triggers), and a
yes/no verdict on a possibly wrong solution (what the generative self-verifier asks).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from env.types import PromptMode, Question
from features.errors import ConfigError

__all__ = [
    "LEVELS",
    "Level",
    "Problem",
    "StepLabel",
    "make_problem",
    "make_questions",
    "solution_text",
    "prompt_text",
    "judge_text",
    "training_text",
    "label_steps",
    "PROBE_SUFFIX",
    "WAIT_TEXT",
    "EOS",
]

EOS = "<|endoftext|>"
PROBE_SUFFIX = "\nThe answer is \\boxed{"
WAIT_TEXT = "\nWait,"
_VARS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True, slots=True)
class Level:
    """A difficulty level: how many steps, how many digits per operand."""

    steps: int
    digits: int


#: Difficulty levels 1 (easiest) to 8 (hardest).
LEVELS: dict[int, Level] = {
    1: Level(steps=1, digits=1),
    2: Level(steps=2, digits=1),
    3: Level(steps=2, digits=2),
    4: Level(steps=3, digits=2),
    5: Level(steps=4, digits=2),
    6: Level(steps=5, digits=3),
    7: Level(steps=6, digits=3),
    8: Level(steps=8, digits=3),
}


@dataclass(frozen=True, slots=True)
class Step:
    var: str
    src: str
    op: str
    operand: int
    lhs_value: int
    value: int


@dataclass(frozen=True, slots=True)
class Problem:
    """One generated problem: the start value and its steps."""

    level: int
    start_var: str
    start: int
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1].value

    @property
    def values(self) -> dict[str, int]:
        out = {self.start_var: self.start}
        out.update({s.var: s.value for s in self.steps})
        return out

    @property
    def text(self) -> str:
        parts = [f"Let {self.start_var} = {self.start}."]
        parts += [f"Let {s.var} = {s.src} {s.op} {s.operand}." for s in self.steps]
        parts.append(f"What is {self.steps[-1].var}?")
        return " ".join(parts)


def _apply(op: str, x: int, y: int) -> int:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    raise ConfigError(f"unknown operator {op!r}")


def make_problem(level: int, rng: random.Random) -> Problem:
    """Draw a problem of the given difficulty level (1-8)."""
    if level not in LEVELS:
        raise ConfigError(f"difficulty level must be one of {sorted(LEVELS)}, got {level!r}")
    lv = LEVELS[level]
    hi = 10**lv.digits - 1
    lo = 1 if lv.digits == 1 else 10 ** (lv.digits - 1)
    value = rng.randint(lo, hi)
    start = value
    steps: list[Step] = []
    for i in range(lv.steps):
        src, var = _VARS[i], _VARS[i + 1]
        ops = ["+", "-"] + (["*"] if value < 10 ** (lv.digits + 1) and value > 0 else [])
        op = rng.choice(ops)
        if op == "*":
            operand = rng.randint(2, 9)
        elif op == "-":
            operand = (
                rng.randint(lo, max(lo, min(hi, value))) if value >= lo else rng.randint(0, value)
            )
            if operand > value:
                op = "+"
        else:
            operand = rng.randint(lo, hi)
        new = _apply(op, value, operand)
        steps.append(Step(var, src, op, operand, value, new))
        value = new
    return Problem(level=level, start_var=_VARS[0], start=start, steps=tuple(steps))


def make_questions(
    n_per_level: int, *, seed: int, levels: list[int] | None = None, split: str = "test"
) -> list[tuple[Question, Problem]]:
    """``n_per_level`` questions at each level, deterministic in ``seed``."""
    rng = random.Random(f"ponder-arith-{split}-{seed}")
    out: list[tuple[Question, Problem]] = []
    for level in levels or sorted(LEVELS):
        for i in range(n_per_level):
            p = make_problem(level, rng)
            q = Question(
                qid=f"arith/{split}/L{level}/{i}",
                text=p.text,
                gold=str(p.answer),
                dataset="arith",
                difficulty=level,
            )
            out.append((q, p))
    return out


def _step_line(s: Step, mode: PromptMode) -> str:
    if mode == "draft":
        return f"{s.var} = {s.value}"
    return f"{s.var} = {s.src} {s.op} {s.operand} = {s.lhs_value} {s.op} {s.operand} = {s.value}"


def prompt_text(question_text: str, mode: PromptMode = "cot") -> str:
    """The prompt the testbed model was trained on."""
    if mode not in ("cot", "draft"):
        raise ConfigError(f"prompt mode must be 'cot' or 'draft', got {mode!r}")
    head = "Solution" if mode == "cot" else "Draft"
    return f"Question: {question_text}\n{head}:\n"


def solution_text(
    p: Problem,
    mode: PromptMode = "cot",
    *,
    rng: random.Random | None = None,
    p_recheck: float = 0.0,
    p_verify: float = 0.0,
) -> str:
    """A correct solution. With ``rng``: sometimes re-check a step, sometimes re-derive at the end."""
    lines: list[str] = []
    for s in p.steps:
        lines.append(_step_line(s, mode))
        if rng is not None and mode == "cot" and rng.random() < p_recheck:
            opener = rng.choice(["Wait,", "Alternatively,"])
            lines.append(f"{opener} {s.lhs_value} {s.op} {s.operand} = {s.value}")
    lines.append(f"The answer is \\boxed{{{p.answer}}}.")
    if rng is not None and rng.random() < p_verify:
        lines.append("Wait, let me check.")
        lines += [_step_line(s, mode) for s in p.steps]
        lines.append(f"The answer is \\boxed{{{p.answer}}}.")
    return "\n".join(lines)


def _corrupt(p: Problem, rng: random.Random) -> tuple[str, bool]:
    """A full cot solution with one arithmetic slip (propagated), or a correct one; and its label."""
    if rng.random() < 0.5:
        return solution_text(p, "cot"), True
    bad = rng.randrange(len(p.steps))
    lines = []
    value = p.start
    for i, s in enumerate(p.steps):
        new = _apply(s.op, value, s.operand)
        if i == bad:
            new += rng.choice([-10, -2, -1, 1, 2, 10])
        lines.append(f"{s.var} = {s.src} {s.op} {s.operand} = {value} {s.op} {s.operand} = {new}")
        value = new
    lines.append(f"The answer is \\boxed{{{value}}}.")
    return "\n".join(lines), False


def judge_text(question_text: str, solution: str) -> str:
    """The self-verifier prompt; the model answers `` yes`` or `` no``."""
    return f"Question: {question_text}\nCheck:\n{solution.rstrip()}\nCorrect?"


_LEVEL_WEIGHTS = (4, 4, 3, 3, 2, 2, 1, 1)


def training_text(rng: random.Random, level: int | None = None) -> str:
    """One training document (ends with EOS): a cot solution, a draft solution, or a verdict."""
    # Easy levels are drawn more often: their skills (copying operands, digit arithmetic) are what
    # the harder levels compose, and a small model learns them first.
    lvl = level if level is not None else rng.choices(sorted(LEVELS), weights=_LEVEL_WEIGHTS)[0]
    p = make_problem(lvl, rng)
    r = rng.random()
    if r < 0.62:
        body = prompt_text(p.text, "cot") + solution_text(
            p, "cot", rng=rng, p_recheck=0.08, p_verify=0.1
        )
    elif r < 0.82:
        body = prompt_text(p.text, "draft") + solution_text(p, "draft", rng=rng, p_verify=0.05)
    else:
        sol, ok = _corrupt(p, rng)
        body = judge_text(p.text, sol) + (" yes" if ok else " no")
    return body + EOS


@dataclass(frozen=True, slots=True)
class StepLabel:
    """Correctness of one written step.

    Attributes:
        index: position of the step line among the solution's step lines.
        var: the variable the line assigns.
        stated: the value the line states.
        local_ok: the line's arithmetic is right given the operands it states (cot lines only;
            draft lines are checked against the true value).
        prefix_ok: every step up to and including this one states the true value.
        end: character offset in the solution where the line ends.
    """

    index: int
    var: str
    stated: int | None
    local_ok: bool
    prefix_ok: bool
    end: int


_LINE = re.compile(r"^([a-z]) = (.*?)$", re.M)
_NUM = re.compile(r"-?\d+")


def label_steps(p: Problem, solution: str) -> list[StepLabel]:
    """Label each ``x = ...`` line of a generated solution against the true values of ``p``."""
    truth = p.values
    ops = {s.var: s for s in p.steps}
    labels: list[StepLabel] = []
    prefix_ok = True
    for i, m in enumerate(_LINE.finditer(solution)):
        var, rhs = m.group(1), m.group(2)
        nums = [int(x) for x in _NUM.findall(rhs)]
        stated = nums[-1] if nums else None
        true_val = truth.get(var)
        ok_val = stated is not None and stated == true_val
        local_ok = ok_val
        parts = [x.strip() for x in rhs.split("=")]
        if var in ops and len(parts) >= 3:
            m2 = re.fullmatch(r"(-?\d+) ([-+*]) (-?\d+)", parts[-2])
            if m2 and stated is not None:
                x, op, y = int(m2.group(1)), m2.group(2), int(m2.group(3))
                local_ok = _apply(op, x, y) == stated
        prefix_ok = prefix_ok and ok_val
        labels.append(StepLabel(i, var, stated, local_ok, prefix_ok, m.end()))
    return labels
