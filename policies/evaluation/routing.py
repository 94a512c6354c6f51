"""``ponder route``: a router that picks a strategy per query kind, against one strategy for all.

Several banks (say GSM8K, HumanEval, MATH-500) make one mixed question set. Every candidate
strategy (a heuristic's name, or a saved policy valid on every bank) is evaluated on each bank's
training and test questions. The router reads each question's kind from its text
(:class:`policies.routing.QueryClassifier`, fitted on the shipped training questions, never on
these test questions) and gives each kind one candidate. Its operating points are the
assignments (a candidate per kind) that are Pareto-optimal on the *training* questions: no
other assignment is as accurate there with fewer mean tokens (:func:`_pareto_assignments`, exact,
kind by kind). The single-policy baseline's points are the candidates that are Pareto-optimal on
the same training questions when every question gets the same one. Both are then scored on the
mixed *test* questions (each question weighs the same). Choosing by a price per token instead
would keep only the corners of the router's convex hull, and leave gaps between them where a
single policy between two corners could beat it.

Target (issue "More real domains"): on the mixed set the router is at or above the best single
policy at every budget: for each point of the single policy's frontier (chosen on training
questions exactly as the router's is), some router point with no more tokens has an accuracy
at most :data:`~policies.evaluation.runner.MATCH_TOLERANCE` below it. A stricter comparison is
printed beside it: against every candidate's own test point, which picks the single policy
with hindsight of the test questions.

A trained policy is a candidate too (a saved policy's folder that runs on every bank): it acts
for a price, so it enters as several candidates, one per λ of :data:`LEARNED_LAMS` (``PATH@LAM``
names one). Choosing on the training questions it was trained on flatters it, so route such
candidates with ``choose_on="dev"`` after training them on ``fit`` (``ponder train ... --split
fit``); otherwise the result carries a warning naming them.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from env.bank.store import TraceBank
from features.errors import ConfigError
from policies.evaluation.metrics import bootstrap_mean
from policies.evaluation.results import num
from policies.evaluation.runner import MATCH_TOLERANCE
from policies.routing import QueryClassifier, kind_of_dataset, training_questions

__all__ = [
    "DEFAULT_CANDIDATES",
    "LEARNED_LAMS",
    "RouteArgs",
    "RoutePoint",
    "RoutingResult",
    "Shortfall",
    "evaluate_routing",
    "main",
    "plot_routing",
]

log = logging.getLogger(__name__)

#: Strategies the router chooses among by default: one chain, votes of 2-16, execution or
#: self-verification (best of N, or chains until one passes), and the adaptive rules.
DEFAULT_CANDIDATES = (
    "best-of-1",
    "best-of-2",
    "best-of-4",
    "best-of-8",
    "best-of-16",
    "best-of-4-verifier",
    "best-of-16-verifier",
    "verify-stop-1-max4",
    "verify-stop-1",
    "adaptive-consistency-0.8",
    "adaptive-consistency-0.95",
    "esc-4",
)

#: The prices a trained policy acts for as a candidate (one candidate each).
LEARNED_LAMS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)

#: Which training splits each choice split overlaps (``dev`` and ``fit`` partition ``train``).
_OVERLAPS = {"train": {"train", "dev", "fit"}, "dev": {"train", "dev"}}


@dataclass(frozen=True)
class RoutePoint:
    """One operating point (chosen on the training questions) and its score on the test ones.

    Attributes:
        accuracy: mean correctness over the mixed test questions.
        tokens: mean decoded tokens over the mixed test questions.
        choice: the candidate chosen per predicted kind (the router), or ``{"all": name}``.
        train_accuracy: mean correctness on the questions it was chosen on.
        train_tokens: mean decoded tokens there (the budget a user picks the point by).
        by_kind: true kind -> (accuracy, mean tokens) on that kind's test questions.
    """

    accuracy: float
    tokens: float
    choice: dict[str, str]
    train_accuracy: float
    train_tokens: float
    by_kind: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Shortfall:
    """Where the router is more than the tolerance below a point it is compared with.

    Attributes:
        policy: the point's candidate.
        tokens: its mean tokens on the mixed test questions.
        accuracy: its accuracy there.
        router_accuracy: the router's best accuracy at no more tokens (NaN: no router point).
        interval: the router's minus the point's accuracy, paired on the test questions: the
            95% bootstrap interval over questions (NaNs without a router point). An interval
            that holds 0 is a miss within the noise of this many questions.
    """

    policy: str
    tokens: float
    accuracy: float
    router_accuracy: float
    interval: tuple[float, float]

    def describe(self) -> str:
        head = f"{self.policy}: {100 * self.accuracy:.1f}% with {self.tokens:,.0f} tokens; "
        if math.isnan(self.router_accuracy):
            return head + "the router at no more tokens: none"
        lo, hi = self.interval
        diff = self.router_accuracy - self.accuracy
        return head + (
            f"the router at no more tokens: {100 * self.router_accuracy:.1f}% ({100 * diff:+.1f} "
            f"pt, 95% interval over questions [{100 * lo:+.1f}, {100 * hi:+.1f}])"
        )


@dataclass
class RoutingResult:
    """What :func:`evaluate_routing` found.

    Attributes:
        router: the router's points, by training tokens (Pareto-optimal there).
        single: the single policy's points, by training tokens (Pareto-optimal there).
        candidates: each candidate's own (tokens, accuracy) on the mixed test questions.
        classifier: the classifier's accuracy by true kind on the test questions.
        questions: test questions per true kind.
        shortfalls: where the router is more than the tolerance below the single policy's
            frontier (the target), with the paired interval of the difference.
        hindsight: the same against every candidate's own test point.
        choose_on: the split the choices were made on (``train`` or ``dev``).
        banks: each bank's folder name -> its data set.
        warnings: trained candidates chosen on questions they were trained on.
    """

    router: list[RoutePoint]
    single: list[RoutePoint]
    candidates: dict[str, tuple[float, float]]
    classifier: dict[str, float]
    questions: dict[str, int]
    shortfalls: list[Shortfall] = field(default_factory=list)
    hindsight: list[Shortfall] = field(default_factory=list)
    choose_on: str = "train"
    banks: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return not self.shortfalls

    def to_json(self) -> dict[str, Any]:
        """Every number as JSON holds it (:func:`~policies.evaluation.results.num`)."""

        def point(p: RoutePoint) -> dict[str, Any]:
            return {
                "accuracy": num(p.accuracy),
                "tokens": num(p.tokens),
                "choice": dict(p.choice),
                "train_accuracy": num(p.train_accuracy),
                "train_tokens": num(p.train_tokens),
                "by_kind": {
                    k: {"accuracy": num(a), "tokens": num(t)} for k, (a, t) in p.by_kind.items()
                },
            }

        def miss(m: Shortfall) -> dict[str, Any]:
            return {
                "policy": m.policy,
                "tokens": num(m.tokens),
                "accuracy": num(m.accuracy),
                "router_accuracy": num(m.router_accuracy),
                "difference_interval": [num(x) for x in m.interval],
            }

        return {
            "schema": 2,
            "resamples": _RESAMPLES,
            "banks": dict(self.banks),
            "choose_on": self.choose_on,
            "questions": dict(self.questions),
            "classifier": {k: num(v) for k, v in self.classifier.items()},
            "router": [point(p) for p in self.router],
            "single": [point(p) for p in self.single],
            "candidates": {
                k: {"tokens": num(t), "accuracy": num(a)} for k, (t, a) in self.candidates.items()
            },
            "met": self.met,
            "shortfalls": [miss(m) for m in self.shortfalls],
            "hindsight": [miss(m) for m in self.hindsight],
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class _Candidate:
    """One strategy the router may choose: its name, how to build it for a bank's settings,
    and, for a trained policy, the data set and split it was trained on."""

    name: str
    make: Callable[[Any], Any]
    trained: tuple[str, str] | None = None


def _named(spec: str, config: Any) -> Any:
    from policies.registry import load_policy

    return load_policy(spec, config=config)


def _priced(policy: Any, lam: float, config: Any) -> Any:
    return policy.with_lam(lam)


def _candidates(specs: Sequence[str]) -> list[_Candidate]:
    """Heuristic names as they are; a trained policy once per λ of :data:`LEARNED_LAMS` (or the
    one ``PATH@LAM`` names)."""
    from policies.registry import load_policy

    out: list[_Candidate] = []
    for spec in specs:
        path, at, lam_text = spec.rpartition("@") if "@" in spec else (spec, "", "")
        policy = load_policy(path)
        if not hasattr(policy, "with_lam"):
            if at:
                raise ConfigError(
                    f"candidate {spec!r}: {path} does not act for a price; drop '@{lam_text}'"
                )
            out.append(_Candidate(spec, functools.partial(_named, spec)))
            continue
        try:
            lams = (float(lam_text),) if at else LEARNED_LAMS
        except ValueError:
            raise ConfigError(
                f"candidate {spec!r}: {lam_text!r} is not a price; write PATH@0.0001"
            ) from None
        meta = getattr(policy, "meta", {}) or {}
        trained = (
            str(meta.get("bank", {}).get("dataset", "")),
            str(meta.get("training", {}).get("split", "train")),
        )
        label = Path(path).name or path
        for lam in lams:
            out.append(
                _Candidate(f"{label}@{lam:g}", functools.partial(_priced, policy, lam), trained)
            )
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"candidates must have distinct names, got {names}")
    return out


def _per_question(
    bank: TraceBank, split: str, candidates: Sequence[_Candidate], seeds: int
) -> dict[str, dict[str, tuple[float, float]]]:
    """name -> qid -> (mean correctness, mean tokens) on ``split``."""
    from policies.evaluation.runner import Evaluator

    ev = Evaluator(bank, split=split, seeds=seeds)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for cand in candidates:
        res = ev(cand.make(ev.config))
        qids, acc, tok = res.per_question()
        out[cand.name] = {q: (float(a), float(t)) for q, a, t in zip(qids, acc, tok, strict=True)}
    return out


def _frontier(points: Sequence[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """The ``(tokens, accuracy, what)`` points no other point beats: as accurate or more with
    fewer tokens (of equal points, the first given)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    out: list[tuple[float, float, Any]] = []
    for i in order:
        if not out or points[i][1] > out[-1][1] + 1e-12:
            out.append(points[i])
    return out


def _pareto_assignments(
    totals: dict[str, dict[str, tuple[float, float]]], names: Sequence[str]
) -> list[tuple[float, float, dict[str, str]]]:
    """Every assignment of a candidate to each kind that is Pareto-optimal in (summed tokens,
    summed correctness) over ``totals`` (kind -> candidate -> (correct, tokens) summed over
    that kind's questions). Exact: a Pareto-optimal whole is made of Pareto-optimal parts, so
    the front is merged kind by kind and pruned after each."""
    front: list[tuple[float, float, dict[str, str]]] = [(0.0, 0.0, {})]
    for kind, by_name in totals.items():
        grown = [
            (tok + by_name[n][1], acc + by_name[n][0], {**pick, kind: n})
            for tok, acc, pick in front
            for n in names
        ]
        front = _frontier(grown)
    return front


def _picked(
    scores: dict[str, dict[str, tuple[float, float]]], pick: dict[str, str], kind_of: dict[str, str]
) -> np.ndarray:
    """(correctness, tokens) of each question of ``kind_of`` under ``pick``, a row each."""
    return np.array([scores[pick[kind_of[q]]][q] for q in kind_of], dtype=float).reshape(-1, 2)


def _score(
    scores: dict[str, dict[str, tuple[float, float]]], pick: dict[str, str], kind_of: dict[str, str]
) -> tuple[float, float]:
    acc, tok = _picked(scores, pick, kind_of).mean(axis=0)
    return float(acc), float(tok)


#: Bootstrap resamples of the test questions for a shortfall's interval (seeded: reproducible).
_RESAMPLES = 2000


def _in_sample(cands: Sequence[_Candidate], datasets: set[str], choose_on: str) -> list[str]:
    """A warning for each trained candidate chosen on questions it was trained on."""
    return [
        f"{c.name} was trained on {c.trained[0]}'s {c.trained[1]} questions and is chosen on "
        f"{choose_on} ones: its choice is in-sample (train it with --split fit and route with "
        "--choose-on dev)"
        for c in cands
        if c.trained and c.trained[0] in datasets and c.trained[1] in _OVERLAPS[choose_on]
    ]


def evaluate_routing(
    banks: Sequence[TraceBank | str | Path],
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    *,
    seeds: int = 3,
    classifier: QueryClassifier | None = None,
    choose_on: str = "train",
    progress: Callable[[str], None] | None = None,
) -> RoutingResult:
    """Evaluate the router and the single-policy baseline on the banks' mixed test questions
    (module docstring). ``classifier`` defaults to one fitted on the shipped training questions;
    ``choose_on`` is the split the choices are made on (``train``, or ``dev`` for candidates
    trained on ``fit``); ``progress`` is told each (bank, split) as it starts."""
    if choose_on not in _OVERLAPS:
        raise ConfigError(f"choose_on must be 'train' or 'dev', got {choose_on!r}")
    opened = [b if isinstance(b, TraceBank) else TraceBank(b) for b in banks]
    if not opened or not candidates:
        raise ConfigError("routing needs at least one bank and one candidate policy")
    cands = _candidates(candidates)
    names = [c.name for c in cands]
    datasets = {b.path.resolve().name: b.manifest.dataset for b in opened}
    warnings = _in_sample(cands, set(datasets.values()), choose_on)
    for w in warnings:
        log.warning(w)
    if classifier is None:
        qs, kinds = training_questions()
        classifier = QueryClassifier.fit([q.text for q in qs], kinds)
    train: dict[str, dict[str, tuple[float, float]]] = {s: {} for s in names}
    test: dict[str, dict[str, tuple[float, float]]] = {s: {} for s in names}
    predicted: dict[str, dict[str, str]] = {"train": {}, "test": {}}
    truth: dict[str, str] = {}
    for bank in opened:
        for split, into, key in ((choose_on, train, "train"), ("test", test, "test")):
            if progress is not None:
                progress(f"{bank.path.name} {split}")
            got = _per_question(bank, split, cands, seeds)
            for name in names:
                into[name].update(got[name])
            qs = [q for q in bank.questions if q.qid in got[names[0]]]
            for q, kind in zip(qs, classifier.predict([q.text for q in qs]), strict=True):
                predicted[key][q.qid] = kind
                if key == "test":
                    truth[q.qid] = kind_of_dataset(q.dataset)
    n_train = len(predicted["train"])
    if not n_train:
        raise ConfigError(f"the banks have no {choose_on} questions to choose on")
    totals: dict[str, dict[str, tuple[float, float]]] = {}
    for kind in sorted(set(predicted["train"].values())):
        mine = [q for q, k in predicted["train"].items() if k == kind]
        totals[kind] = {
            n: (sum(train[n][q][0] for q in mine), sum(train[n][q][1] for q in mine)) for n in names
        }
    test_kinds = sorted(set(predicted["test"].values()))

    # each true kind's test questions, with their predicted kinds
    of_truth = {
        kind: {q: k for q, k in predicted["test"].items() if truth[q] == kind}
        for kind in sorted(set(truth.values()))
    }

    def per_kind(pick: dict[str, str]) -> dict[str, tuple[float, float]]:
        """(accuracy, tokens) on each true kind's test questions."""
        return {kind: _score(test, pick, mine) for kind, mine in of_truth.items()}

    # a kind no training question was predicted as follows the kind most questions are
    common = max(totals, key=lambda k: sum(1 for v in predicted["train"].values() if v == k))
    router = []
    for tok_sum, acc_sum, pick in _pareto_assignments(totals, names):
        full = {k: pick.get(k, pick[common]) for k in test_kinds}
        acc, tok = _score(test, full, predicted["test"])
        router.append(
            RoutePoint(acc, tok, full, acc_sum / n_train, tok_sum / n_train, per_kind(full))
        )
    cand_points: dict[str, tuple[float, float]] = {}
    for spec in names:
        acc, tok = _score(test, dict.fromkeys(test_kinds, spec), predicted["test"])
        cand_points[spec] = (tok, acc)
    every = {n: tuple(map(sum, zip(*(totals[k][n] for k in totals), strict=True))) for n in names}
    single = []
    for tok_sum, acc_sum, name in _frontier([(every[n][1], every[n][0], n) for n in names]):
        tok, acc = cand_points[name]  # every question gets the same candidate
        everyone = per_kind(dict.fromkeys(test_kinds, name))
        single.append(
            RoutePoint(acc, tok, {"all": name}, acc_sum / n_train, tok_sum / n_train, everyone)
        )

    def correct(pick: dict[str, str]) -> np.ndarray:
        return _picked(test, pick, predicted["test"])[:, 0]

    def below(points: list[tuple[str, float, float]]) -> list[Shortfall]:
        out = []
        for name, tok, acc in points:
            cheaper = [p for p in router if p.tokens <= tok + 1e-9]
            if not cheaper:
                out.append(Shortfall(name, tok, acc, math.nan, (math.nan, math.nan)))
                continue
            best = max(cheaper, key=lambda p: p.accuracy)
            if best.accuracy < acc - MATCH_TOLERANCE:
                diff = correct(best.choice) - correct(dict.fromkeys(test_kinds, name))
                paired = bootstrap_mean(diff, n_boot=_RESAMPLES)
                out.append(Shortfall(name, tok, acc, best.accuracy, (paired.low, paired.high)))
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
    return RoutingResult(
        router,
        single,
        cand_points,
        agree,
        by_kind,
        shortfalls,
        hindsight,
        choose_on=choose_on,
        banks=datasets,
        warnings=warnings,
    )


def plot_routing(res: RoutingResult, path: str | Path) -> Path:
    """Accuracy against mean tokens on the mixed test questions: the router's points and the
    single policy's (each Pareto-optimal on the ``choose_on`` questions), each with its best
    accuracy at no more tokens as a step line, and every candidate's own point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from policies.evaluation.report import save_figure

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for pts, label, line, mark in (
        (res.router, "router (a strategy per predicted kind)", "-", "o"),
        (res.single, "one strategy for all", "--", "s"),
    ):
        xy = sorted({(p.tokens, p.accuracy) for p in pts})
        x, y = [t for t, _ in xy], [a for _, a in xy]
        # the line: the best accuracy at no more tokens (what the target compares)
        drawn = ax.step(x, np.maximum.accumulate(y), line, where="post", lw=1.4, label=label)
        ax.plot(x, y, mark, ms=4, color=drawn[0].get_color(), alpha=0.8)
    for name, (tok, acc) in res.candidates.items():
        ax.plot([tok], [acc], "x", color="0.4", ms=6)
        ax.annotate(name, (tok, acc), fontsize=6, color="0.35", xytext=(3, -8),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("mean decoded tokens per question (mixed test questions)")
    ax.set_ylabel("accuracy")
    kinds = ", ".join(f"{k} {n}" for k, n in res.questions.items())
    ax.set_title(f"routing by query type ({kinds}; chosen on {res.choose_on})", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


@dataclass
class RouteArgs:
    """Evaluate routing by query type on several banks' mixed test questions."""

    bank: tuple[str, ...] = ()
    """bank folders (at least one; their data sets give the true kinds): e.g. --bank data/banks/gsm8k-qwen2.5-coder-1.5b PATH/TO/humaneval-bank"""
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    """the strategies the router chooses among: heuristic names, or saved policies that run on every bank (each at the prices of LEARNED_LAMS; PATH@LAM for one)"""
    seeds: int = 3
    """episodes per question"""
    choose_on: str = "train"
    """the split the router and the single policy choose on: train, or dev for trained candidates trained on fit (--split fit)"""
    json: Path | None = None
    """write the result here as JSON"""
    plot: Path | None = None
    """write the frontier plot here (PNG)"""


def main(argv: list[str] | None = None) -> None:
    import tyro
    from rich.table import Table

    from env.console import wide_console

    args = tyro.cli(RouteArgs, args=argv, prog="ponder route")
    if not args.bank:
        raise SystemExit("ponder route: give the banks with --bank PATH [PATH ...]")
    console = wide_console()
    with console.status("evaluating the candidates") as status:
        res = evaluate_routing(
            list(args.bank),
            args.candidates,
            seeds=args.seeds,
            choose_on=args.choose_on,
            progress=lambda what: status.update(f"evaluating the candidates on {what}"),
        )
    for w in res.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(
        "test questions by kind: "
        + ", ".join(f"{k} {n}" for k, n in res.questions.items())
        + "; the classifier's accuracy: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in res.classifier.items())
    )
    table = Table(
        title="one strategy for all against the router at no more training tokens "
        f"(points chosen on {res.choose_on} questions, scored on the test questions)",
        min_width=150,
    )
    for col in (
        f"{res.choose_on} tokens",
        "single",
        "single acc",
        "single tokens",
        "router choices (its accuracy, tokens on the kind's test questions)",
        "router acc",
        "router tokens",
    ):
        table.add_column(col, justify="right")
    for s in res.single:
        r = max(
            (p for p in res.router if p.train_tokens <= s.train_tokens + 1e-9),
            key=lambda p: p.train_accuracy,
        )
        table.add_row(
            f"{s.train_tokens:,.0f}",
            s.choice["all"],
            f"{100 * s.accuracy:.1f}",
            f"{s.tokens:,.0f}",
            " ".join(
                f"{k}={v}"
                + (
                    f" ({100 * r.by_kind[k][0]:.0f}%, {r.by_kind[k][1]:,.0f})"
                    if k in r.by_kind
                    else ""
                )
                for k, v in r.choice.items()
            ),
            f"{100 * r.accuracy:.1f}",
            f"{r.tokens:,.0f}",
        )
    console.print(table)
    console.print(
        f"the router's frontier: {len(res.router)} assignments Pareto-optimal on the "
        f"{res.choose_on} questions"
        + (" (all of them in --json, drawn by --plot)" if len(res.router) > len(res.single) else "")
    )
    verdict = "met" if res.met else f"not met at {len(res.shortfalls)} budget(s)"
    console.print(
        f"target: the router at or above the single policy (chosen on {res.choose_on} questions) at "
        f"every budget of its frontier ({100 * MATCH_TOLERANCE:.1f} pt tolerance): {verdict}"
    )
    for m in res.shortfalls:
        console.print(f"  {m.describe()}")
    console.print(
        f"with hindsight (every candidate's own test point): the router is below at "
        f"{len(res.hindsight)} of {len(res.candidates)}"
    )
    for m in res.hindsight:
        console.print(f"  {m.describe()}")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res.to_json(), indent=2, allow_nan=False) + "\n")
        console.print(f"wrote {args.json}")
    if args.plot is not None:
        console.print(f"wrote {plot_routing(res, args.plot)}")


if __name__ == "__main__":
    main()
