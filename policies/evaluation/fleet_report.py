"""The fleet table: every allocator of :mod:`policies.evaluation.fleet` sharing one token budget
among a bank's test questions, at the budgets of a few chains per question, with intervals; and
its command, ``python -m policies.evaluation.fleet BANK`` (:func:`main`).

**Budgets.** The tokens uniform allocation spends at ``n`` chains per question (default 2, 4
and 8) on the test questions, the mean over the replay seeds (rounded down): every allocator
gets the same ``B`` on every seed.

**Intervals.** 95% percentile bootstrap over test questions and replay seeds together (crossed,
:mod:`policies.evaluation.bootstrap`); a difference between two allocators is paired on the
same draws. A shared budget couples the questions (one question's chains are another's lack);
the bootstrap treats each question's outcome as given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import tyro

from env.bank.store import TraceBank
from env.episode.config import EnvConfig
from env.questions import select_split
from env.types import Question
from features.errors import BankError, ConfigError
from policies.evaluation.bootstrap import draws, interval
from policies.evaluation.fleet import (
    BASELINES,
    MEAN_CURVE,
    ORACLE_REALIZED,
    UNIFORM,
    Allocation,
    CurveFn,
    Curves,
    FleetSetup,
    Outcomes,
    QuestionChains,
    allocator_curves,
    greedy_plan,
    mean_curves,
    oracle_allocation,
    outcomes,
    question_chains,
    run_plan,
    uniform_plan,
)
from policies.evaluation.metrics import Interval
from policies.evaluation.results import num

if TYPE_CHECKING:
    from env.bank.hidden import HiddenStates
    from env.probes import LinearProbe

__all__ = [
    "FleetArgs",
    "FleetReport",
    "FleetRow",
    "fleet_table",
    "main",
]


# -- the report --------------------------------------------------------------------------------


@dataclass
class FleetRow:
    """One allocator at one budget, over the replay seeds.

    Attributes:
        allocator: its name.
        chains_per_question: the budget's ``n`` (uniform allocation's chains per question).
        budget: the shared budget in tokens.
        accuracy: share of test questions right, interval over questions and seeds.
        diffs: accuracy minus each of :data:`~policies.evaluation.fleet.BASELINES`' (but
            itself), paired.
        tokens: mean tokens spent per seed (all test questions together).
        max_tokens: the most spent on any seed (never more than ``budget``).
        chains: mean chains that voted per question.
        per_seed: accuracy on each seed.
        correct, spent, voted: ``[nq, seeds]`` per question and seed (not serialised).
    """

    allocator: str
    chains_per_question: int
    budget: int
    accuracy: Interval
    diffs: dict[str, Interval]
    tokens: float
    max_tokens: int
    chains: float
    per_seed: list[float]
    correct: np.ndarray = field(repr=False)
    spent: np.ndarray = field(repr=False)
    voted: np.ndarray = field(repr=False)


def _iv(i: Interval) -> list[float | str | None]:
    return [num(i.mean), num(i.low), num(i.high)]


def _pct(i: Interval) -> str:
    if not math.isfinite(i.mean):
        return "-"
    return f"{100 * i.mean:.1f} [{100 * i.low:.1f}, {100 * i.high:.1f}]"


def _signed(i: Interval) -> str:
    return f"{100 * i.mean:+.1f} [{100 * i.low:+.1f}, {100 * i.high:+.1f}]"


@dataclass
class FleetReport:
    """Every allocator at every budget (:func:`fleet_table`).

    Attributes:
        bank: the bank's folder name.
        questions: counts: ``train``, ``test``, ``recorded``, ``annotated`` (``None``: no
            hidden states).
        seeds: the replay seeds.
        budgets: ``n`` -> the shared budget in tokens.
        allocators: their names, in table order.
        rows: one per allocator and budget.
        settings: what shaped the numbers (curve orders, folds, bootstrap, the probe's choice).
        notes: what the table's reader needs to know.
    """

    bank: str
    questions: dict[str, int | None]
    seeds: tuple[int, ...]
    budgets: dict[int, int]
    allocators: list[str]
    rows: list[FleetRow]
    settings: dict[str, Any]
    notes: list[str]

    def row(self, allocator: str, n: int) -> FleetRow:
        """The row of ``allocator`` at the budget of ``n`` chains per question."""
        for r in self.rows:
            if r.allocator == allocator and r.chains_per_question == n:
                return r
        raise KeyError(f"no row for {allocator!r} at n={n}")

    def markdown(self) -> str:
        """Accuracy and tokens of every allocator, its paired differences to each of
        :data:`~policies.evaluation.fleet.BASELINES`, and the notes, as Markdown."""
        ns = list(self.budgets)
        nq = self.questions["test"] or 1
        head = ["allocator"]
        for n in ns:
            head += [f"n={n}: accuracy %", "tokens/q"]
        lines = [
            f"### One budget shared by the test questions: {self.bank}",
            "",
            f"{self.questions['test']} test questions, {self.questions['train']} training "
            f"questions; replay seeds {', '.join(map(str, self.seeds))}. Budgets (total "
            "tokens, the mean over seeds of what maj@n spends): "
            + ", ".join(f"n={n}: {b:,} ({b / nq:.0f}/question)" for n, b in self.budgets.items())
            + ".",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
        ]
        for a in self.allocators:
            cells = [a]
            for n in ns:
                r = self.row(a, n)
                cells += [_pct(r.accuracy), f"{r.tokens / nq:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        for base in BASELINES:
            if base not in self.allocators:
                continue
            diff_head = [f"allocator − {base} (points, paired)", *(f"n={n}" for n in ns)]
            lines += [
                "",
                "| " + " | ".join(diff_head) + " |",
                "|" + "|".join("---" for _ in diff_head) + "|",
            ]
            for a in self.allocators:
                if a in BASELINES[: BASELINES.index(base) + 1]:
                    continue
                cells = [a, *(_signed(self.row(a, n).diffs[base]) for n in ns)]
                lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """Every number as JSON holds it (:func:`~policies.evaluation.results.num`)."""
        return {
            "schema": 1,
            "bank": self.bank,
            "questions": dict(self.questions),
            "seeds": list(self.seeds),
            "budgets": [
                {"chains_per_question": n, "total_tokens": b} for n, b in self.budgets.items()
            ],
            "allocators": list(self.allocators),
            "rows": [
                {
                    "allocator": r.allocator,
                    "chains_per_question": r.chains_per_question,
                    "budget": r.budget,
                    "accuracy": _iv(r.accuracy),
                    "diffs": {k: _iv(v) for k, v in r.diffs.items()},
                    "tokens": num(r.tokens),
                    "max_tokens": r.max_tokens,
                    "chains": num(r.chains),
                    "per_seed": [num(x) for x in r.per_seed],
                }
                for r in self.rows
            ],
            "settings": self.settings,
            "notes": list(self.notes),
        }


def _questions(
    bank: TraceBank, hs: HiddenStates | None, probe: LinearProbe | None
) -> tuple[list[Question], list[Question], LinearProbe | None, dict[str, Any]]:
    """Training and test questions (the annotated ones when there are hidden states) and the
    difficulty probe (fitted here unless given)."""
    from env.probes import fit_probes

    info: dict[str, Any] = {}
    if hs is None:
        qs = bank.questions
        return select_split(qs, "train"), select_split(qs, "test"), None, info
    if probe is None:
        # The difficulty half of fit_probes, as `ponder probes` fits it; its chain-correctness
        # grid is cut to one point, since that probe is not read here.
        fit = fit_probes(
            bank, hs, c_grid=(1.0,), extra_choices=((),), weight_grid=(1.0,), ended_states=False
        )
        probe = fit.difficulty
        train = [bank.question(q) for q in fit.splits["train"]]
        test = [bank.question(q) for q in fit.splits["test"]]
        info = {
            "fit": len(fit.splits["fit"]),
            "dev": len(fit.splits["dev"]),
            "chosen": probe.params.get("chosen", ""),
        }
    else:
        done = set(hs.annotated)
        qs = [q for q in bank.questions if q.qid in done]
        train, test = select_split(qs, "train"), select_split(qs, "test")
        seen = set(probe.meta.get("questions", ())) & {q.qid for q in test}
        if seen:
            raise ConfigError(
                f"the difficulty probe was fitted on {len(seen)} test question(s) of "
                f"{bank.path} (e.g. {sorted(seen)[0]!r}): fit it on the training questions"
            )
    info.update({"layers": list(probe.layers), "alpha": probe.params.get("alpha")})
    return train, test, probe, info


def fleet_table(
    bank: TraceBank | str | Path,
    *,
    seeds: int | Sequence[int] = 5,
    budgets: Sequence[int] = (2, 4, 8),
    hidden: bool | None = None,
    probe: LinearProbe | None = None,
    extra: Mapping[str, CurveFn] | None = None,
    orders: int = 64,
    folds: int = 4,
    config: EnvConfig | None = None,
    n_boot: int = 2000,
    boot_seed: int = 0,
) -> FleetReport:
    """Every allocator (see :mod:`policies.evaluation.fleet`) at the budgets of ``budgets``
    chains per question, on the bank's test questions, over replay ``seeds``.

    Args:
        bank: a :class:`~env.bank.store.TraceBank` or its folder.
        seeds: replay seeds: a count (``0..seeds-1``) or the seeds.
        budgets: chains per question whose uniform cost sets each shared budget.
        hidden: read the bank's hidden states for the probe (``None``: if it has them). With
            them, only the annotated questions are used (train and test alike), and the table
            says so when that is not all of them.
        probe: the difficulty probe (default: fitted here on the training questions, chosen on
            ``dev``, as ``ponder probes`` fits it).
        extra: further allocators by name, as expected curves (a learned value, for one).
        orders: replay orders the curves are averaged over.
        folds: folds for the training questions' out-of-fold scores.
        config: env settings chains are counted under (default the bank's).
        n_boot, boot_seed: the bootstrap.

    Raises:
        BankError: ``hidden=True`` for a bank without hidden states.
        ConfigError: too few questions, or a bad argument.
    """
    b = bank if isinstance(bank, TraceBank) else TraceBank(bank)
    seed_list, ns = _seeds_and_budgets(seeds, budgets)
    setup, probe, probe_info, annotated = _fleet_setup(b, hidden, probe, orders, config)
    outs, totals = _budgets(setup.test_chains, seed_list, ns)
    curves = allocator_curves(setup, probe, extra, folds=folds, orders=orders)
    names = [UNIFORM, *curves, ORACLE_REALIZED]
    res = _allocate(names, curves, outs, totals, setup.k_test, seed_list, ns)
    nq = len(setup.test)
    rows = _rows(names, res, totals, ns, nq, len(seed_list), n_boot, boot_seed)
    notes = _notes(b, setup.hidden, annotated, probe, orders, folds, n_boot)
    settings = {
        "orders": orders,
        "folds": max(2, folds),
        "bootstrap": {"resamples": n_boot, "seed": boot_seed, "unit": "test question x seed"},
        "probe": probe_info,
    }
    return FleetReport(
        bank=b.path.resolve().name,
        questions={
            "train": len(setup.train),
            "test": nq,
            "recorded": len(b),
            "annotated": annotated,
        },
        seeds=tuple(seed_list),
        budgets=totals,
        allocators=names,
        rows=rows,
        settings=settings,
        notes=notes,
    )


def _seeds_and_budgets(
    seeds: int | Sequence[int], budgets: Sequence[int]
) -> tuple[list[int], list[int]]:
    """The replay seeds and the budgets' chains per question, checked."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or any(s < 0 for s in seed_list):
        raise ConfigError(f"seeds must be a positive count or non-negative seeds, got {seeds}")
    ns = [int(n) for n in budgets]
    if not ns or any(n < 1 for n in ns):
        raise ConfigError(f"budgets are chains per question, each >= 1: got {list(budgets)}")
    return seed_list, ns


def _fleet_setup(
    b: TraceBank,
    hidden: bool | None,
    probe: LinearProbe | None,
    orders: int,
    config: EnvConfig | None,
) -> tuple[FleetSetup, LinearProbe | None, dict[str, Any], int | None]:
    """The setup every allocator works from, the difficulty probe (fitted here unless given or
    without hidden states), what shaped the probe, and the questions with hidden states
    (``None``: none read)."""
    from env.bank.hidden import HiddenStates

    hs = None if hidden is False else HiddenStates.open(b.path, b)
    if hidden and hs is None:
        raise BankError(f"{b.path} has no hidden states: run `ponder bank annotate {b.path}` first")
    train, test, probe, probe_info = _questions(b, hs, probe)
    annotated = len(hs.annotated) if hs is not None else None
    if len(train) < 2 or not test:
        raise ConfigError(
            f"{b.path} has {len(train)} training and {len(test)} test question(s) to use; the "
            "allocation needs at least 2 and 1"
        )
    cfg = config if config is not None else EnvConfig.from_manifest(b.manifest)
    train_chains = [question_chains(b, q, cfg) for q in train]
    test_chains = [question_chains(b, q, cfg) for q in test]
    setup = FleetSetup(
        b, train, test, train_chains, test_chains, mean_curves(train_chains, orders), hs
    )
    return setup, probe, probe_info, annotated


def _budgets(
    test_chains: Sequence[QuestionChains], seed_list: list[int], ns: list[int]
) -> tuple[dict[int, Outcomes], dict[int, int]]:
    """Each seed's outcomes of the test questions, and each budget: the tokens uniform
    allocation spends at ``n`` chains per question, the mean over the seeds (rounded down)."""
    outs = {s: outcomes(test_chains, s) for s in seed_list}
    kmax = outs[seed_list[0]].tokens.shape[1] - 1
    if max(ns) > kmax:
        raise ConfigError(f"the bank holds at most {kmax} chains per question; got {max(ns)}")
    totals = {
        n: math.floor(float(np.mean([o.tokens[:, n].sum() for o in outs.values()]))) for n in ns
    }
    return outs, totals


def _allocate(
    names: list[str],
    curves: Mapping[str, Callable[[int], Curves]],
    outs: Mapping[int, Outcomes],
    totals: Mapping[int, int],
    k: np.ndarray,
    seed_list: list[int],
    ns: list[int],
) -> dict[tuple[str, int], list[Allocation]]:
    """Every allocator on every seed at every budget: uniform's plan, the greedy plan on each
    allocator's curves (equal gains broken in the seed's order), or the realized oracle."""
    res: dict[tuple[str, int], list[Allocation]] = {}
    for name in names:
        for s in seed_list:
            out = outs[s]
            if name == ORACLE_REALIZED:
                allocs = [oracle_allocation(out, totals[n]) for n in ns]
            else:
                plan = uniform_plan(k, s) if name == UNIFORM else greedy_plan(curves[name](s), s)
                allocs = [run_plan(plan, out, totals[n]) for n in ns]
            for n, a in zip(ns, allocs, strict=True):
                res.setdefault((name, n), []).append(a)
    return res


def _rows(
    names: list[str],
    res: Mapping[tuple[str, int], list[Allocation]],
    totals: Mapping[int, int],
    ns: list[int],
    nq: int,
    n_seeds: int,
    n_boot: int,
    boot_seed: int,
) -> list[FleetRow]:
    """One row per allocator and budget: accuracy and its paired differences to each of
    :data:`~policies.evaluation.fleet.BASELINES`, bootstrapped over test questions and seeds."""
    d = draws(nq, n_boot, boot_seed)
    ws = d.seeds(n_seeds)

    def resampled(x: np.ndarray) -> np.ndarray:
        r = np.einsum("rq,qs,rs->r", d.questions, x, ws)
        r[0] = x.mean()
        return r

    def right(name: str, n: int) -> np.ndarray:
        return np.stack([a.correct for a in res[(name, n)]], axis=1).astype(np.float64)

    rows = []
    for name in names:
        for n in ns:
            allocs = res[(name, n)]
            correct = right(name, n)
            spent = np.stack([a.tokens for a in allocs], axis=1)
            voted = np.stack([a.chains for a in allocs], axis=1)
            rows.append(
                FleetRow(
                    allocator=name,
                    chains_per_question=n,
                    budget=totals[n],
                    accuracy=interval(resampled(correct)),
                    diffs={
                        base: interval(resampled(correct - right(base, n)))
                        for base in BASELINES
                        if base != name
                    },
                    tokens=float(spent.sum(axis=0).mean()),
                    max_tokens=int(spent.sum(axis=0).max()),
                    chains=float(voted.mean()),
                    per_seed=[float(x) for x in correct.mean(axis=0)],
                    correct=correct.astype(np.bool_),
                    spent=spent,
                    voted=voted,
                )
            )
    return rows


def _notes(
    b: TraceBank,
    hs: HiddenStates | None,
    annotated: int | None,
    probe: LinearProbe | None,
    orders: int,
    folds: int,
    n_boot: int,
) -> list[str]:
    """What the table's reader needs to know: how a question is answered and charged, how the
    curves are read, what the oracles know, the intervals, and which questions are used."""
    notes = [
        "each question's answer is the majority vote of the chains it got, handed out in the "
        "replay order of the seed; a chain costs what best-of-N decodes for it (no probes); "
        "the chain running when the budget runs out is cut (its tokens count, it does not vote)",
        "curves (expected maj@n accuracy and chain cost) are read off the training questions "
        f"with a similar score (Gaussian kernel; training scores out of {max(2, folds)} folds), "
        f"averaged over {orders} replay orders; chains handed out greedily by expected accuracy "
        "gained per token, jumps of several chains allowed (a vote of two answers as its first "
        "chain does unless that one gave none, so uniform at n = 2 spends half its budget on "
        f"votes that change almost nothing); '{MEAN_CURVE}' is that greedy plan on one curve for all "
        "questions: what it gains without any signal about the question",
        "oracle rows know what no allocator does: the true pass rate (through the same curves), "
        "each test question's true expected curve, or (realized) every chain's answer; only the "
        "realized oracle is an upper bound",
        f"95% intervals: bootstrap over test questions and replay seeds ({n_boot} resamples), "
        "differences paired",
    ]
    if hs is not None and annotated is not None and annotated < len(b):
        notes.insert(
            0,
            f"hidden states cover {annotated} of the bank's {len(b)} recorded questions: every "
            "row uses the annotated ones only (training and test alike)",
        )
    if probe is None:
        notes.insert(0, "no hidden states: the difficulty probe is not evaluated")
    return notes


# -- the command -------------------------------------------------------------------------------


@dataclass
class FleetArgs:
    """Evaluate one token budget shared by a bank's test questions, allocated uniformly, by
    the difficulty probe, by the current difficulty predictor and by oracles, at the budgets
    uniform allocation spends at a few chains per question."""

    bank: Annotated[Path, tyro.conf.Positional]
    """bank folder"""
    seeds: int = 5
    """replay seeds (0..seeds-1)"""
    budgets: tuple[int, ...] = (2, 4, 8)
    """chains per question whose uniform cost sets each budget"""
    orders: int = 64
    """replay orders the expected curves are averaged over"""
    boot: int = 2000
    """bootstrap resamples"""
    boot_seed: int = 0
    """seed of the bootstrap"""
    json: Path | None = None
    """also write every number to this JSON file"""
    threads: int = 1
    """BLAS threads"""


def main(argv: list[str] | None = None) -> FleetReport:
    """``python -m policies.evaluation.fleet BANK``: print the table."""
    from threadpoolctl import threadpool_limits

    args = tyro.cli(FleetArgs, args=argv, prog="python -m policies.evaluation.fleet")
    with threadpool_limits(max(1, args.threads)):
        report = fleet_table(
            args.bank,
            seeds=args.seeds,
            budgets=args.budgets,
            orders=args.orders,
            n_boot=args.boot,
            boot_seed=args.boot_seed,
        )
    print(report.markdown())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
    return report
