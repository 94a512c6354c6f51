"""Accuracy of the testbed reasoning model against its thinking budget: s1's curve.

Run as ``ponder testbed curve``. For each thinking budget ``B`` every chain is budget-forced to
think exactly ``B`` tokens (:class:`~env.types.BudgetForcing` with ``min_tokens = max_tokens =
B`` on the template's thinking section: below ``B`` the end of thinking is suppressed and
``Wait,`` appended, at ``B`` the end is forced and the answer read), through the same
:class:`~env.generators.live.LiveGenerator` every other part of ponder uses. A column without
forcing (the model closes its thinking when it likes) is measured beside them.

Per difficulty level it prints pass@1 (mean single-chain accuracy) and maj@k (majority vote over
``samples`` chains) at every budget, how many doublings of the budget in a row raised pass@1
at each level, and writes ``thinking_curve.json`` and a plot (``thinking_curve.png``) next to
the model.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from env.models.testbed.task import LEVELS, make_questions
from env.types import BudgetForcing, Question, SamplingConfig
from features.errors import ConfigError

__all__ = [
    "REASONING_DIR",
    "CurveArgs",
    "LevelCurve",
    "rising_doublings",
    "thinking_curve",
]

log = logging.getLogger(__name__)

#: Where ``ponder testbed train --task reasoning`` writes the testbed reasoning model by default.
REASONING_DIR = Path(__file__).resolve().parents[3] / "models" / "testbed-reasoning"
#: The column name of chains that think as long as they like.
FREE = "free"
#: The testbed models' context (``max_position_embeddings``): prompt, thinking and answer.
CONTEXT = 1024
_ROOM = 160  # the longest testbed prompt and a forced answer


@dataclass
class CurveArgs:
    """Accuracy of the testbed reasoning model against its forced thinking budget."""

    model: Path = REASONING_DIR
    """model folder (a model trained with ``ponder testbed train --task reasoning``)"""
    budgets: tuple[int, ...] = (32, 64, 128, 256, 512)
    """thinking budgets in tokens; each chain thinks exactly this long (s1 budget forcing)"""
    per_level: int = 30
    """questions per difficulty level"""
    samples: int = 8
    """chains per question (majority vote over them)"""
    levels: tuple[int, ...] = ()
    """difficulty levels to measure (default: all)"""
    temperature: float = 0.7
    """sampling temperature"""
    free_cap: int = 860
    """token cap of the unforced column"""
    seed: int = 0
    """engine seed and question seed (questions come from the 'eval' split)"""
    out: Path | None = None
    """where to write the JSON (default: <model>/thinking_curve.json; the plot goes beside it)"""
    kv_cache_gib: float = 2.0
    """vLLM KV cache on CPU"""

    def __post_init__(self) -> None:
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise ConfigError(f"--budgets must be positive token counts, got {self.budgets}")
        if list(self.budgets) != sorted(set(self.budgets)):
            raise ConfigError(f"--budgets must be distinct and increasing, got {self.budgets}")
        if max(max(self.budgets), self.free_cap) > CONTEXT - _ROOM:
            raise ConfigError(
                f"--budgets and --free-cap must be at most {CONTEXT - _ROOM} tokens: the "
                f"testbed models hold {CONTEXT} tokens of prompt, thinking and answer"
            )
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if bad:
            raise ConfigError(f"--levels {bad} unknown: the testbed has levels {sorted(LEVELS)}")
        if self.per_level < 1 or self.samples < 1:
            raise ConfigError("--per-level and --samples must be at least 1")


@dataclass
class LevelCurve:
    """One level's accuracy at every budget (keys: budgets as strings, and ``"free"``)."""

    level: int
    pass1: dict[str, float] = field(default_factory=dict)
    maj: dict[str, float] = field(default_factory=dict)
    thinking: dict[str, float] = field(default_factory=dict)
    """mean thinking tokens per chain"""


def rising_doublings(values: list[float]) -> int:
    """The most budget doublings in a row over which ``values`` (accuracy at budgets that double)
    strictly rose."""
    best = run = 0
    for a, b in itertools.pairwise(values):
        run = run + 1 if b > a else 0
        best = max(best, run)
    return best


def _run_column(
    gen: Any, items: list[tuple[Question, Any]], samples: int, budget: BudgetForcing | None
) -> list[tuple[Question, list[str | None], list[int]]]:
    """Sample ``samples`` chains per question to the end; their answers and thinking tokens."""
    from env.episode.rules import text_reader

    chains = {q.qid: gen.start(q, samples, budget=budget) for q, _ in items}
    open_ = [c for cs in chains.values() for c in cs]
    while open_:
        gen.extend(open_, 256)
        open_ = [c for c in open_ if not c.finished]
    out = []
    for q, _ in items:
        read = text_reader(q)
        cs = chains[q.qid]
        out.append((q, [read(c.text) for c in cs], [gen.thinking_split(c)[0] for c in cs]))
    return out


def _score(rows: list[tuple[Question, list[str | None], list[int]]]) -> tuple[float, float, float]:
    """pass@1, maj@k and mean thinking tokens over a column's questions."""
    p1 = maj = think = 0.0
    for q, answers, thinking in rows:
        p1 += sum(q.is_right(a) for a in answers) / len(answers)
        votes = Counter(a for a in answers if a is not None)
        maj += float(bool(votes) and q.is_right(votes.most_common(1)[0][0]))
        think += sum(thinking) / len(thinking)
    n = len(rows)
    return p1 / n, maj / n, think / n


def thinking_curve(args: CurveArgs, gen: Any = None) -> list[LevelCurve]:
    """Measure, print and save the curve; ``gen`` is a ready generator (default: vLLM on
    ``args.model`` with the ``testbed-reasoning`` template)."""
    from rich.table import Table
    from tqdm import tqdm

    from env.console import wide_console

    if gen is None:
        from env.generators.vllm import VLLMGenerator, build_engine

        cap = max(max(args.budgets), args.free_cap) + 64
        llm = build_engine(
            args.model, seed=args.seed, kv_cache_gib=args.kv_cache_gib, max_model_len=CONTEXT
        )
        gen = VLLMGenerator(
            llm,
            template="testbed-reasoning",
            sampling=SamplingConfig(temperature=args.temperature, max_chain_tokens=cap),
        )
    if gen.template.thinking is None:
        raise ConfigError(
            f"template {gen.template.name!r} has no thinking section: the curve needs one "
            "(use 'testbed-reasoning')"
        )
    levels = list(args.levels) or sorted(LEVELS)
    items = make_questions(args.per_level, seed=args.seed, levels=levels, split="eval")
    columns: list[tuple[str, BudgetForcing | None]] = [
        (str(b), BudgetForcing(min_tokens=b, max_tokens=b)) for b in args.budgets
    ]
    columns.append((FREE, BudgetForcing(min_tokens=0, max_tokens=args.free_cap)))
    curves = {lv: LevelCurve(lv) for lv in levels}
    t0 = time.time()
    for name, budget in tqdm(columns, desc="thinking budgets", unit="budget"):
        rows = _run_column(gen, items, args.samples, budget)
        for lv in levels:
            p1, maj, think = _score([r for r in rows if r[0].difficulty == lv])
            curves[lv].pass1[name] = p1
            curves[lv].maj[name] = maj
            curves[lv].thinking[name] = think
    elapsed = time.time() - t0

    table = Table(
        title=(
            f"testbed reasoning model: pass@1 / maj@{args.samples} against the forced thinking "
            f"budget ({args.per_level} questions a level, T={args.temperature})"
        )
    )
    table.add_column("level")
    for name, _ in columns:
        table.add_column(f"{name} tok" if name != FREE else "unforced", justify="right")
    table.add_column("doublings that raise pass@1", justify="right")
    for lv in levels:
        c = curves[lv]
        cells = [f"{c.pass1[n]:.0%} / {c.maj[n]:.0%}" for n, _ in columns]
        cells[-1] += f" ({c.thinking[FREE]:.0f} tok)"
        rises = rising_doublings([c.pass1[str(b)] for b in args.budgets])
        table.add_row(str(lv), *cells, str(rises))
    console = wide_console()
    console.print(table)
    console.print(f"measured in {elapsed:.0f} s")

    out = args.out or Path(args.model) / "thinking_curve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "model": _shown(Path(args.model)),
        "budgets": list(args.budgets),
        "per_level": args.per_level,
        "samples": args.samples,
        "temperature": args.temperature,
        "seed": args.seed,
        "levels": {
            str(lv): {
                "pass1": c.pass1,
                "maj": c.maj,
                "thinking_tokens": c.thinking,
                "rising_doublings": rising_doublings([c.pass1[str(b)] for b in args.budgets]),
            }
            for lv, c in curves.items()
        },
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    _plot(curves, args, out.with_suffix(".png"))
    log.info("curve: %s (plot %s)", out, out.with_suffix(".png"))
    return list(curves.values())


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (the JSON ships with the
    model: no machine's absolute path in it)."""
    root = REASONING_DIR.parents[1]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def _plot(curves: dict[int, LevelCurve], args: CurveArgs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = list(args.budgets)
    for lv, c in curves.items():
        ax.plot(xs, [c.pass1[str(b)] for b in xs], marker="o", label=f"level {lv}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("forced thinking budget (tokens)")
    ax.set_ylabel("pass@1")
    ax.set_ylim(0, 1)
    ax.set_title("testbed reasoning model: accuracy against thinking budget")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import tyro

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    thinking_curve(tyro.cli(CurveArgs, args=argv, prog="ponder testbed curve"))


if __name__ == "__main__":
    main()
