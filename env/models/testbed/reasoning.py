"""The training text of the testbed *reasoning* model: a thinking section where a first pass may
slip and re-checks find and fix the slips, so that thinking longer really raises accuracy.

The testbed model (:mod:`env.models.testbed.task`) writes each step once; a slip stays. The
reasoning variant thinks inside ``<think>`` ... ``</think>`` (the markers of
:data:`env.generators.prompts.REASONING`) in two phases:

1. **A first pass**: every step in the testbed's one-line form. In the training text a step slips
   with probability ``p_slip`` (its value off by a small amount, propagated), so the model also
   learns what a slipped pass looks like, and that a pass is not the end of thinking.
2. **Re-checks**, each opened by ``Wait,`` (what s1 budget forcing appends): the next step not yet
   checked is recomputed digit by digit (:func:`careful_line`: one digit and its carry at a time,
   the form a small model gets right more often than a whole sum at once), and when the recomputed
   value differs, the step is corrected and every later step recomputed from it::

       <think>
       b = a + 48 = 37 + 48 = 84
       c = b * 3 = 84 * 3 = 252
       Wait, check b = 84: 37 + 48: 7 + 8 = 15, write 5 carry 1; 3 + 4 + 1 = 8; so 85. b = 85, not 84.
       c = b * 3 = 85 * 3 = 255
       Wait, check c = 255: 85 * 3: 5 * 3 = 15, write 5 carry 1; 8 * 3 + 1 = 25; so 255. c = 255.
       </think>

       The answer is \\boxed{255}.

   A training document checks a random number of steps (stopping early, or all of them and a
   few again in a second round), so the model learns to close its thinking at any point and to
   go on checking when told to go on; budget forcing then decides how many checks a
   chain gets: suppressing ``</think>`` below a minimum asks for one more check, and forcing it at
   a maximum cuts them short. The shape targeted (issue "Serial versus parallel"): accuracy rising
   with the thinking budget for several doublings at the middle levels, because every check can
   catch one slip.

This module writes the text only; the model is trained on it like the testbed model
(:mod:`env.models.testbed.train`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from env.models.testbed.task import EOS, LEVELS, Problem, Step, make_problem, prompt_text
from features.errors import ConfigError

__all__ = [
    "THINK_END",
    "THINK_START",
    "ThinkingTrace",
    "careful_line",
    "reasoning_text",
    "reasoning_trace",
]

THINK_START = "<think>"
THINK_END = "</think>"

_SLIPS = (-10, -2, -1, 1, 2, 10)


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def careful_line(x: int, op: str, y: int) -> str:
    """``x op y`` worked digit by digit, ending ``so <value>`` (``y`` is one digit for ``*``).

    Addition and multiplication go from the last digit with their carries; subtraction of a
    larger number is written as the negative of the reverse subtraction.
    """
    if op == "+":
        if x < 0 or y < 0:
            return f"{x} + {y}: so {x + y}"
        return f"{x} + {y}: " + _add_digits(x, y) + f"; so {x + y}"
    if op == "-":
        if x < y:
            return f"{x} - {y} = -({y} - {x}): " + _sub_digits(y, x) + f"; so {x - y}"
        return f"{x} - {y}: " + _sub_digits(x, y) + f"; so {x - y}"
    if op == "*":
        if not 0 <= y <= 9 or x < 0:
            return f"{x} * {y}: so {x * y}"
        return f"{x} * {y}: " + _mul_digits(x, y) + f"; so {x * y}"
    raise ConfigError(f"unknown operator {op!r}")


def _add_digits(x: int, y: int) -> str:
    a, b = _digits(x), _digits(y)
    parts, carry = [], 0
    for i in range(max(len(a), len(b))):
        da = a[i] if i < len(a) else 0
        db = b[i] if i < len(b) else 0
        s = da + db + carry
        expr = f"{da} + {db}" + (f" + {carry}" if carry else "")
        carry, digit = divmod(s, 10)
        parts.append(f"{expr} = {s}" + (f", write {digit} carry {carry}" if carry else ""))
    return "; ".join(parts)


def _sub_digits(x: int, y: int) -> str:
    a, b = _digits(x), _digits(y)
    parts, borrow = [], 0
    for i in range(len(a)):
        da = a[i] - borrow
        db = b[i] if i < len(b) else 0
        if da < db:
            parts.append(f"{da + 10} - {db} = {da + 10 - db}, borrow 1")
            borrow = 1
        else:
            parts.append(f"{da} - {db} = {da - db}")
            borrow = 0
    return "; ".join(parts)


def _mul_digits(x: int, y: int) -> str:
    parts, carry = [], 0
    for d in _digits(x):
        p = d * y + carry
        expr = f"{d} * {y}" + (f" + {carry}" if carry else "")
        carry, digit = divmod(p, 10)
        parts.append(f"{expr} = {p}" + (f", write {digit} carry {carry}" if carry else ""))
    return "; ".join(parts)


def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


@dataclass(frozen=True, slots=True)
class ThinkingTrace:
    """One reasoning solution and what it holds.

    Attributes:
        text: the solution after the prompt (thinking section, then the answer).
        answer: the value the solution states.
        slips: steps whose first-pass value slipped.
        checks: steps re-checked, in order.
    """

    text: str
    answer: int
    slips: tuple[int, ...]
    checks: int


def reasoning_trace(p: Problem, rng: random.Random, *, p_slip: float, checks: int) -> ThinkingTrace:
    """A thinking solution of ``p``: a first pass where each step slips with probability
    ``p_slip``, then ``checks`` re-checks of the steps in order, each correcting its step and
    recomputing the later ones when it disagrees. Past the last step checking starts over from
    the first (in this text a second round agrees everywhere, but a model's own check can slip:
    another round may catch it), so a model forced to think on after checking every step goes
    on checking instead of writing what it never saw."""
    if not 0 <= p_slip <= 1 or checks < 0:
        raise ConfigError(f"need 0 <= p_slip <= 1 and checks >= 0, got {p_slip}, {checks}")
    steps: list[Step] = list(p.steps)
    values = [p.start]
    lines = [THINK_START]
    slips = []
    for i, s in enumerate(steps):
        v = _apply(s.op, values[-1], s.operand)
        if rng.random() < p_slip:
            v += rng.choice(_SLIPS)
            slips.append(i)
        lines.append(
            f"{s.var} = {s.src} {s.op} {s.operand} = {values[-1]} {s.op} {s.operand} = {v}"
        )
        values.append(v)
    for k in range(checks):
        i = k % len(steps)
        s = steps[i]
        true = _apply(s.op, values[i], s.operand)
        work = careful_line(values[i], s.op, s.operand)
        # The check first restates the value it checks, so that the verdict compares two
        # numbers on one line (a small model finds that far easier than looking back).
        head = f"Wait, check {s.var} = {values[i + 1]}: {work}."
        if true == values[i + 1]:
            lines.append(f"{head} {s.var} = {true}.")
            continue
        lines.append(f"{head} {s.var} = {true}, not {values[i + 1]}.")
        values[i + 1] = true
        for j in range(i + 1, len(steps)):  # the later steps follow from the corrected one
            t = steps[j]
            values[j + 1] = _apply(t.op, values[j], t.operand)
            lines.append(
                f"{t.var} = {t.src} {t.op} {t.operand} = {values[j]} {t.op} {t.operand} "
                f"= {values[j + 1]}"
            )
    lines += [THINK_END, ""]  # "</think>\n\n" then the answer, as reasoning models write it
    lines.append(f"The answer is \\boxed{{{values[-1]}}}.")
    return ThinkingTrace("\n".join(lines), values[-1], tuple(slips), checks)


_LEVEL_WEIGHTS = (2, 3, 4, 4, 4, 3, 2, 2)
_EXTRA_CHECKS = 3  # checks of a second round a training document may hold


def reasoning_text(rng: random.Random, level: int | None = None, *, p_slip: float = 0.25) -> str:
    """One training document (ends with EOS): a prompt and a thinking solution whose number of
    checks is drawn at random (none, up to all steps and three of a second round), so every
    length of thinking is seen."""
    lvl = level if level is not None else rng.choices(sorted(LEVELS), weights=_LEVEL_WEIGHTS)[0]
    p = make_problem(lvl, rng)
    checks = rng.randint(0, len(p.steps) + _EXTRA_CHECKS)
    trace = reasoning_trace(p, rng, p_slip=p_slip, checks=checks)
    return prompt_text(p.text, "cot") + trace.text + EOS
