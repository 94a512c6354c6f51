"""``ponder route``: a router that picks a strategy per query kind, against one strategy for all.

Several banks (say GSM8K, HumanEval, MATH-500) make one mixed question set. Every candidate
strategy (a heuristic's name, or a saved policy valid on every bank) is evaluated on each bank's
training and test questions. The router reads each question's kind from its text
(:class:`policies.routing.QueryClassifier`, fitted on the shipped training questions, never on
these test questions) and, at a price λ per token, gives each kind the candidate with the best
mean ``correct - λ · tokens`` on the *training* questions of that kind; the single-policy
baseline gives every question the one candidate that is best on all training questions. Both
are then scored on the mixed *test* questions (each question weighs the same).

Target (issue "More real domains"): on the mixed set the router is at or above the best single
policy at every budget: for each point of the single policy's frontier (chosen on training
questions exactly as the router's is), some router point with no more tokens has an accuracy
at most :data:`~policies.evaluation.runner.MATCH_TOLERANCE` below it. A stricter comparison is
printed beside it: against every candidate's own test point, which picks the single policy
with hindsight of the test questions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from env.bank.store import TraceBank
from features.errors import ConfigError
from policies.evaluation.runner import MATCH_TOLERANCE
from policies.routing import QueryClassifier, kind_of_dataset, training_questions

__all__ = [
    "DEFAULT_CANDIDATES",
    "RouteArgs",
    "RoutePoint",
    "RoutingResult",
    "evaluate_routing",
    "main",
]

#: Strategies the router chooses among by default: one chain, votes of 2-16, execution or
#: self-verification, and the adaptive rules.
DEFAULT_CANDIDATES = (
    "best-of-1",
    "best-of-2",
    "best-of-4",
    "best-of-8",
    "best-of-16",
    "best-of-4-verifier",
    "best-of-16-verifier",
    "adaptive-consistency-0.8",
    "adaptive-consistency-0.95",
    "esc-4",
)

#: Prices per token swept (the router's and the single policy's frontier).
DEFAULT_LAMS = tuple(float(x) for x in np.geomspace(1e-6, 3e-3, 48))


@dataclass(frozen=True)
class RoutePoint:
    """One λ's choice and its score on the mixed test questions.

    Attributes:
        lam: the price per token.
        accuracy: mean correctness over the test questions.
        tokens: mean decoded tokens over the test questions.
        choice: the candidate chosen per predicted kind (the router), or ``{"all": name}``.
    """

    lam: float
    accuracy: float
    tokens: float
    choice: dict[str, str]


@dataclass
class RoutingResult:
    """What :func:`evaluate_routing` found.

    Attributes:
        router: the router's points, one per λ.
        single: the single policy's points, one per λ.
        candidates: each candidate's own (tokens, accuracy) on the mixed test questions.
        classifier: the classifier's accuracy by true kind on the test questions.
        questions: test questions per true kind.
        shortfalls: ``(single policy, its tokens, its accuracy, the router's best accuracy at
            no more tokens)`` where the router is more than the tolerance below the single
            policy's frontier (the target).
        hindsight: the same against every candidate's own test point.
    """

    router: list[RoutePoint]
    single: list[RoutePoint]
    candidates: dict[str, tuple[float, float]]
    classifier: dict[str, float]
    questions: dict[str, int]
    shortfalls: list[tuple[str, float, float, float]] = field(default_factory=list)
    hindsight: list[tuple[str, float, float, float]] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return not self.shortfalls


def _per_question(
    bank: TraceBank, split: str, specs: Sequence[str], seeds: int
) -> dict[str, dict[str, tuple[float, float]]]:
    """spec -> qid -> (mean correctness, mean tokens) on ``split``."""
    from policies.evaluation.runner import Evaluator
    from policies.registry import load_policy

    ev = Evaluator(bank, split=split, seeds=seeds)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for spec in specs:
        res = ev(load_policy(spec, config=ev.config))
        qids, acc, tok = res.per_question()
        out[spec] = {q: (float(a), float(t)) for q, a, t in zip(qids, acc, tok, strict=True)}
    return out


def _best(
    scores: dict[str, dict[str, tuple[float, float]]],
    qids: Sequence[str],
    lam: float,
    specs: Sequence[str],
) -> str:
    def value(spec: str) -> float:
        return float(np.mean([scores[spec][q][0] - lam * scores[spec][q][1] for q in qids]))

    return max(specs, key=lambda s: (value(s), -specs.index(s)))


def _score(
    scores: dict[str, dict[str, tuple[float, float]]], pick: dict[str, str], kind_of: dict[str, str]
) -> tuple[float, float]:
    acc = [scores[pick[kind_of[q]]][q][0] for q in kind_of]
    tok = [scores[pick[kind_of[q]]][q][1] for q in kind_of]
    return float(np.mean(acc)), float(np.mean(tok))


def evaluate_routing(
    banks: Sequence[TraceBank | str | Path],
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    *,
    seeds: int = 3,
    lams: Sequence[float] = DEFAULT_LAMS,
    classifier: QueryClassifier | None = None,
) -> RoutingResult:
    """Evaluate the router and the single-policy baseline on the banks' mixed test questions
    (module docstring). ``classifier`` defaults to one fitted on the shipped training questions."""
    opened = [b if isinstance(b, TraceBank) else TraceBank(b) for b in banks]
    if not opened or not candidates:
        raise ConfigError("routing needs at least one bank and one candidate policy")
    if classifier is None:
        qs, kinds = training_questions()
        classifier = QueryClassifier.fit([q.text for q in qs], kinds)
    train: dict[str, dict[str, tuple[float, float]]] = {s: {} for s in candidates}
    test: dict[str, dict[str, tuple[float, float]]] = {s: {} for s in candidates}
    predicted: dict[str, dict[str, str]] = {"train": {}, "test": {}}
    truth: dict[str, str] = {}
    for bank in opened:
        for split, into in (("train", train), ("test", test)):
            got = _per_question(bank, split, candidates, seeds)
            for spec in candidates:
                into[spec].update(got[spec])
            qs = [q for q in bank.questions if q.qid in got[candidates[0]]]
            for q, kind in zip(qs, classifier.predict([q.text for q in qs]), strict=True):
                predicted[split][q.qid] = kind
                if split == "test":
                    truth[q.qid] = kind_of_dataset(q.dataset)
    router, single = [], []
    specs = list(candidates)
    train_qids = list(predicted["train"])
    for lam in lams:
        one = _best(train, train_qids, lam, specs)
        pick: dict[str, str] = {}
        for kind in sorted(set(predicted["test"].values())):
            mine = [q for q, k in predicted["train"].items() if k == kind]
            pick[kind] = _best(train, mine, lam, specs) if mine else one
        acc, tok = _score(test, pick, predicted["test"])
        router.append(RoutePoint(lam, acc, tok, pick))
        acc1, tok1 = _score(test, dict.fromkeys(pick, one), predicted["test"])
        single.append(RoutePoint(lam, acc1, tok1, {"all": one}))
    everyone = dict.fromkeys(set(predicted["test"].values()), "")
    cand_points: dict[str, tuple[float, float]] = {}
    for spec in specs:
        acc, tok = _score(test, dict.fromkeys(everyone, spec), predicted["test"])
        cand_points[spec] = (tok, acc)

    def below(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float, float]]:
        out = []
        for name, tok, acc in points:
            best = max((p.accuracy for p in router if p.tokens <= tok + 1e-9), default=math.nan)
            if math.isnan(best) or best < acc - MATCH_TOLERANCE:
                out.append((name, tok, acc, best))
        return out

    single_points = {(p.choice["all"], p.tokens, p.accuracy) for p in single}
    shortfalls = below(sorted(single_points, key=lambda x: x[1]))
    hindsight = below([(name, tok, acc) for name, (tok, acc) in cand_points.items()])
    by_kind = {k: sum(1 for t in truth.values() if t == k) for k in sorted(set(truth.values()))}
    agree = {
        k: float(np.mean([predicted["test"][q] == k for q, t in truth.items() if t == k]))
        for k in by_kind
    }
    agree["all"] = float(np.mean([predicted["test"][q] == t for q, t in truth.items()]))
    return RoutingResult(router, single, cand_points, agree, by_kind, shortfalls, hindsight)


@dataclass
class RouteArgs:
    """Evaluate routing by query type on several banks' mixed test questions."""

    bank: tuple[str, ...] = ()
    """bank folders (at least one; their data sets give the true kinds): e.g. --bank data/banks/gsm8k-qwen2.5-coder-1.5b PATH/TO/humaneval-bank"""
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    """the strategies the router chooses among (heuristic names, or saved policies valid on every bank)"""
    seeds: int = 3
    """episodes per question"""


def main(argv: list[str] | None = None) -> None:
    import tyro
    from rich.table import Table

    from env.console import wide_console

    args = tyro.cli(RouteArgs, args=argv, prog="ponder route")
    if not args.bank:
        raise SystemExit("ponder route: give the banks with --bank PATH [PATH ...]")
    console = wide_console()
    res = evaluate_routing(list(args.bank), args.candidates, seeds=args.seeds)
    console.print(
        "test questions by kind: "
        + ", ".join(f"{k} {n}" for k, n in res.questions.items())
        + "; the classifier's accuracy: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in res.classifier.items())
    )
    table = Table(
        title="router (a strategy per predicted kind) against one strategy for all",
        min_width=150,
    )
    for col in (
        "λ",
        "router acc",
        "router tokens",
        "choices",
        "single acc",
        "single tokens",
        "single",
    ):
        table.add_column(col, justify="right")
    for r, s in zip(res.router, res.single, strict=True):
        table.add_row(
            f"{r.lam:.2g}",
            f"{100 * r.accuracy:.1f}",
            f"{r.tokens:,.0f}",
            " ".join(f"{k}={v}" for k, v in r.choice.items()),
            f"{100 * s.accuracy:.1f}",
            f"{s.tokens:,.0f}",
            s.choice["all"],
        )
    console.print(table)
    verdict = "met" if res.met else f"not met at {len(res.shortfalls)} budget(s)"
    console.print(
        f"target: the router at or above the single policy (chosen on training questions) at "
        f"every budget of its frontier ({100 * MATCH_TOLERANCE:.1f} pt tolerance): {verdict}"
    )
    for spec, tok, acc, best in res.shortfalls:
        console.print(
            f"  {spec}: {100 * acc:.1f}% with {tok:,.0f} tokens; the router at no more tokens: "
            + ("none" if math.isnan(best) else f"{100 * best:.1f}%")
        )
    console.print(
        f"with hindsight (every candidate's own test point): the router is below at "
        f"{len(res.hindsight)} of {len(res.candidates)}"
        + "".join(
            f"; {spec} {100 * acc:.1f}% with {tok:,.0f} against "
            + ("none" if math.isnan(best) else f"{100 * best:.1f}%")
            for spec, tok, acc, best in res.hindsight
        )
    )


if __name__ == "__main__":
    main()
