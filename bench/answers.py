"""Answer parsing on long adversarial text: how long it takes, and how that grows with the length.

    python bench/answers.py [--size 20000] [--repeats 3]

The shapes are those of ``tests/features/test_answers_fuzz.py`` that grow with a size: the
parser's own pieces repeated, text a model could be steered to write (the parser is on the proxy's
request path). For each, the time of ``extract_answer``, ``normalize_answer`` (its cache cleared),
``answers_equal`` and ``read_probe`` on the text, best of ``repeats``, at ``size`` and at a quarter
of it. Prints a table: shape, characters, seconds, and the growth from a quarter of the length to
the whole (about 4 for a linear scan, 16 for a quadratic one).

The target: every shape linear (growth near 4) and well under a second at the default size. Before
the fixes, ``"\\boxed{" * 5000`` took 11 s in ``extract_boxed`` and 26 s in ``normalize_answer``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    """Time the answer parser on long adversarial text."""

    size: int = 20_000
    """repetitions of each shape's piece (scaled per shape, as in the test)"""
    repeats: int = 3
    """timed runs per shape and size; the best is kept"""


def shapes(n: int) -> dict[str, str]:
    """The adversarial texts of the fuzz test at size ``n``."""
    return {
        "open-boxes": "\\boxed{" * n,
        "closed-box-then-open": "\\boxed{1}" + "\\boxed{" * n,
        "open-boxed-fracs": "\\boxed{\\frac{" * (n * 3 // 5),
        "open-fracs": "\\frac{" * (n * 4 // 5),
        "tuples": "(1," * n,
        "unbalanced-braces": "{" * (2 * n) + "}" * n,
        "answer-phrases": "The answer is " * (n * 3 // 10),
        "comma-list": "1," * (2 * n),
        "long-decimal": "0." + "3" * (4 * n),
        "bare-frac": "\\frac" * (n * 4 // 5),
        "bare-sqrt": "\\sqrt" * (n * 4 // 5),
        "dashes": "-" * (4 * n) + "1",
        "open-parens": "((" * n,
        "slashes": "answer: " + "1/" * (n * 8 // 5),
        "gsm8k-marks": "#### " * (n * 4 // 5),
        "nested-text": "\\text{" * (n * 3 // 5) + "}" * (n * 3 // 5),
    }


def parse_seconds(text: str, repeats: int) -> float:
    """Best time of one pass of the parser's entry points over ``text``."""
    from features.answers import answers_equal, extract_answer, normalize_answer, read_probe

    reverse = text[::-1]
    best = float("inf")
    for _ in range(repeats):
        normalize_answer.cache_clear()  # time the work, not the cache
        t0 = time.perf_counter()
        extract_answer(text)
        normalize_answer(text)
        answers_equal(text, reverse)
        read_probe(text)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    import tyro
    from rich.table import Table

    from env.console import wide_console

    args = tyro.cli(Args)
    quarter = shapes(max(1, args.size // 4))
    table = Table(title=f"answer parsing on adversarial text (size {args.size:,})")
    for col in ("shape", "characters", "seconds", "growth from 1/4 length"):
        table.add_column(col, justify="left" if col == "shape" else "right")
    worst = 0.0
    for name, text in shapes(args.size).items():
        whole = parse_seconds(text, args.repeats)
        part = parse_seconds(quarter[name], args.repeats)
        worst = max(worst, whole)
        table.add_row(name, f"{len(text):,}", f"{whole:.3f}", f"{whole / part:.1f}")
    wide_console().print(table)
    print(f"slowest shape: {worst:.3f} s")


if __name__ == "__main__":
    main()
