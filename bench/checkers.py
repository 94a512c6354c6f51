"""The two answer checkers side by side: ponder's hand-written rule and math-verify.

    python bench/checkers.py [--bank data/banks/gsm8k-qwen2.5-coder-1.5b] [--examples 5]

For every recorded chain of a math bank: is it right by the hand-written rule
(:func:`features.answers.answers_equal` of its extracted answer and the gold answer) and by
math-verify (``verify(parse(gold), parse(chain text))``)? Prints how often they disagree, in
which direction, examples, and the time per check. Then the same on MATH-500's reference
solutions against their answers (all should be right) and against another problem's answer of
the same subject and level (all should be wrong), the only MATH outputs there are until a
MATH-500 bank is recorded. Decides where the hand-written rule may stay: where it is right
and faster (:data:`env.types.SYMBOLIC_DATASETS` lists where math-verify is asked as well).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    """Compare the hand-written answer checker with math-verify."""

    bank: str = "data/banks/gsm8k-qwen2.5-coder-1.5b"
    """a math bank (its recorded chains are checked both ways)"""
    examples: int = 5
    """disagreements printed per direction"""


def _boxed(answer: str) -> str:
    return f"$\\boxed{{{answer}}}$"


def main(args: Args) -> None:
    from math_verify import parse, verify
    from rich.table import Table

    from env.bank.store import TraceBank
    from env.console import wide_console
    from features.answers import extract_answer, judged_correct

    console = wide_console()
    table = Table(title="hand-written rule against math-verify")
    for col in (
        "data",
        "checks",
        "both right",
        "only hand",
        "only math-verify",
        "hand µs",
        "math-verify µs",
    ):
        table.add_column(col, justify="right")
    examples: dict[tuple[str, bool], list[str]] = {}

    def tally(name: str, cases: list[tuple[str, str, str | None, str]]) -> None:
        """cases: (gold, full text, extracted answer, label)."""
        counts: Counter[tuple[bool, bool]] = Counter()
        th = tm = 0.0
        for gold, text, answer, label in cases:
            t0 = time.perf_counter()
            h = judged_correct(answer, gold)
            t1 = time.perf_counter()
            m = bool(verify(parse(_boxed(gold)), parse(text)))
            tm += time.perf_counter() - t1
            th += t1 - t0
            counts[h, m] += 1
            if h != m:
                ex = examples.setdefault((name, h), [])
                if len(ex) < args.examples:
                    ex.append(
                        f"{label}: gold {gold!r}, hand read {answer!r}, text ...{text[-100:]!r}"
                    )
        n = max(1, len(cases))
        table.add_row(
            name,
            f"{len(cases):,}",
            f"{counts[True, True]:,}",
            f"{counts[True, False]:,}",
            f"{counts[False, True]:,}",
            f"{1e6 * th / n:.0f}",
            f"{1e6 * tm / n:.0f}",
        )

    bank = TraceBank(ROOT / args.bank if not Path(args.bank).is_absolute() else args.bank)
    cases = []
    for qt in bank:
        for c in qt.chains:
            text = "".join(t for t, e in zip(c.rows["text"], c.rows["ext"], strict=True) if not e)
            cases.append(
                (str(qt.question.gold), text, c.answer, f"{qt.question.qid} chain {c.chain}")
            )
    tally(f"{bank.path.name} chains", cases)

    rows = [json.loads(line) for line in (ROOT / "data/math/math500_test.jsonl").open()]
    tally(
        "MATH-500 reference solutions",
        [(r["answer"], r["solution"], extract_answer(r["solution"]), r["unique_id"]) for r in rows],
    )
    rng = random.Random(0)
    groups: dict[tuple[str, int], list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["subject"], r["level"]), []).append(r)
    wrong = []
    for r in rows:
        o = rng.choice(groups[r["subject"], r["level"]])
        if o["answer"].strip() != r["answer"].strip():
            wrong.append(
                (
                    r["answer"],
                    o["solution"],
                    extract_answer(o["solution"]),
                    f"{r['unique_id']} vs {o['unique_id']}",
                )
            )
    tally("MATH-500, another problem's solution", wrong)
    console.print(table)
    for (name, hand), ex in examples.items():
        console.print(
            f"[bold]{name}: {'only the hand-written rule' if hand else 'only math-verify'} says right[/]"
        )
        for e in ex:
            console.print("  " + e, markup=False)


if __name__ == "__main__":
    main(tyro.cli(Args))
