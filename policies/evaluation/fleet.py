"""Across questions: one token budget shared by all test questions (the fleet mode, on banks).

The controller's fleet mode (:meth:`controller.Controller.solve_fleet`) answers a batch of
questions under one total token budget. This module measures, offline and exactly on a bank, how
much *where* the budget goes matters: which questions get more chains. Predictive Scheduling
(arXiv 2602.01237) predicts each query's reasoning need from its hidden state and spreads a
budget across queries; the difficulty probe (:mod:`env.probes`) is that prediction here.

**What a question gets.** Question ``q`` gets ``n_q`` whole chains, handed out in the order a
:class:`~env.generators.replay.ReplayGenerator` reset with the seed hands them out
(:func:`~env.generators.replay.chain_order`); its answer is the majority vote of their answers
(:func:`features.aggregate.majority_vote`, ties to the first chain), as best-of-N voting answers
in the env. A chain costs the tokens the evaluation runner counts for it when best-of-N runs it
to its end without probes (:func:`~policies.evaluation.oracle.chain_prefixes`, the count
:func:`~policies.evaluation.oracle.vote_floor` uses for maj@K). So ``n_q = n`` everywhere is
exactly maj@n (a test runs the two side by side).

**The budget is a hard cap.** An allocator plans, before seeing any test chain, an order in
which to hand out chains (every question's first chain first, then one question's next chain at
a time); the chains run in that order until the shared budget ``B`` is spent. The chain running
when it runs out is cut there: it counts the tokens it decoded (what was left) and casts no
vote, and nothing runs after it. No allocator reads a test chain's length or answer before
running it, and none spends more than ``B`` tokens.

**Allocators.**

* *uniform*: every question's first chain, then every question's second, and so on, the
  questions in one order drawn with the replay seed each round (so a budget between two whole
  numbers of chains per question gives one more chain to a fixed random subset);
* *mean curve (no signal)*: the greedy plan below on one expected curve for every question
  (the training questions' mean): what handing out chains by expected gain achieves without
  knowing anything about the question. A majority vote of two chains answers as its first chain
  does unless that one gave no answer (a tie goes to the first), so maj@2 is all but maj@1 and
  uniform allocation at two chains per question spends half its budget on votes that change
  almost nothing; this row separates that from
  what a difficulty signal adds;
* *difficulty probe*: the predicted pass rate ``p̂`` from the prompt's hidden state (the probe
  fitted on the training questions, its layers and strength chosen on ``dev``:
  :func:`~env.probes.fit_probes`); an expected maj@n accuracy curve and an expected chain cost
  for each test question, read off the *training* questions with a similar ``p̂`` (a Gaussian
  kernel over ``p̂``, :func:`kernel_curves`, with the training questions' ``p̂`` out of fold,
  so the map is fitted on predictions as noisy as the test questions'), and the chains handed
  out greedily by expected accuracy gained per expected token (:func:`greedy_plan`);
* *current predictor*: the same, with the difficulty predictor the env has had so far
  (:mod:`env.episode.difficulty`: the question's length and numbers, and the first chunk of
  the first chain handed out, which every allocator runs anyway), fitted on the same training
  questions;
* *oracle: true pass rate*: the same machinery fed each question's true pass rate (a perfect
  difficulty predictor: the ceiling of the probe's approach);
* *oracle: true maj@n curves*: the greedy plan on each test question's own expected maj@n
  curve and chain cost (what a predictor of the whole curve could reach);
* *oracle: realized (upper bound)*: knows every test chain's answer and length in the seed's
  order and answers the most questions the budget allows (each question's cheapest correct
  prefix, cheapest first). It is an upper bound on every allocator here: any allocation's
  correct questions cost at least their cheapest correct prefixes.

A *learned value* allocator (a policy with ``value(obs)``, :class:`~policies.base.HasValue`)
plugs in through ``extra``: a function from the :class:`FleetSetup` and a seed to
:class:`Curves` (its expected accuracy of ``n`` chains per test question; :func:`kernel_curves`
maps any per-question score through the training questions). The main job adds one
(:func:`policies.hidden_run.value_curves`): the value-chain policy's value of going on at each
question's opening state, mapped through the training questions' curves (their scores are
in-sample: the policy trained on them). ``Controller.solve_fleet`` itself is not run here: it
lives in ``controller``, which ``policies`` may not import, and its live fleet runs each policy's
own chunk-level episodes (probes, early stops, its own answers), so what it spends and answers is
not a maj@n allocation comparable row by row.

Every allocator but uniform and the realized oracle is a :class:`Curves` per seed handed out by
:func:`greedy_plan`; ties between equal gains are broken in an order drawn with the seed.

**Budgets.** The tokens uniform allocation spends at ``n`` chains per question (default 2, 4
and 8) on the test questions, the mean over the replay seeds (rounded down): every allocator
gets the same ``B`` on every seed.

**Intervals.** 95% percentile bootstrap over test questions and replay seeds together (crossed,
:mod:`policies.evaluation.bootstrap`); a difference between two allocators is paired on the
same draws. A shared budget couples the questions (one question's chains are another's lack);
the bootstrap treats each question's outcome as given.
"""

from __future__ import annotations

import dataclasses
import heapq
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
from env.generators.replay import chain_order
from env.questions import select_split
from env.types import Question
from features.aggregate import majority_vote
from features.errors import BankError, ConfigError
from policies.evaluation.bootstrap import draws, interval
from policies.evaluation.metrics import Interval
from policies.evaluation.oracle import chain_prefixes
from policies.evaluation.results import num

if TYPE_CHECKING:
    from env.bank.hidden import HiddenStates
    from env.probes import LinearProbe

__all__ = [
    "Allocation",
    "CurveFn",
    "Curves",
    "FleetArgs",
    "FleetReport",
    "FleetRow",
    "FleetSetup",
    "Outcomes",
    "QuestionChains",
    "BASELINES",
    "UNIFORM",
    "MEAN_CURVE",
    "PROBE",
    "CURRENT",
    "ORACLE_PASS_RATE",
    "ORACLE_CURVES",
    "ORACLE_REALIZED",
    "fleet_table",
    "greedy_plan",
    "kernel_curves",
    "main",
    "mean_curves",
    "oracle_allocation",
    "outcomes",
    "question_chains",
    "run_plan",
    "uniform_plan",
]

UNIFORM = "uniform"
MEAN_CURVE = "mean curve (no signal)"
PROBE = "difficulty probe"
CURRENT = "current predictor"
ORACLE_PASS_RATE = "oracle: true pass rate"
ORACLE_CURVES = "oracle: true maj@n curves"
ORACLE_REALIZED = "oracle: realized (upper bound)"
#: The allocators every other is compared with, paired: uniform, and the greedy plan on one
#: curve for every question (what the machinery gains without any signal about the question).
BASELINES = (UNIFORM, MEAN_CURVE)

#: Curves are estimated over the chain orders of these replay seeds (``_CURVE_SEED + i``): far
#: from the evaluation's seeds, so the curve oracle knows expectations, not the realized orders.
_CURVE_SEED = 1_000_000
#: A greedy step must gain more than this expected accuracy per token (what rounding leaves of
#: a zero gain is no gain).
_MIN_GAIN = 1e-12


# -- a question's chains -----------------------------------------------------------------------


@dataclass(frozen=True)
class QuestionChains:
    """One question's recorded chains as best-of-N runs them: whole, without probes.

    Attributes:
        question: the question.
        tokens: int64 ``[K]``: decoded tokens of each recorded chain run to its end.
        answers: each chain's final answer (normalised; ``None``: none).
    """

    question: Question
    tokens: np.ndarray
    answers: tuple[str | None, ...]

    @property
    def k(self) -> int:
        return len(self.answers)


def question_chains(bank: TraceBank, question: Question, config: EnvConfig) -> QuestionChains:
    """``question``'s chains, each counted as the evaluator counts best-of-N's (``config``
    without probes: a policy that reads none is not charged for them)."""
    cfg = config if not config.probe else _no_probes(config)
    tokens, answers = [], []
    for ct in bank[question.qid].chains:
        pre = chain_prefixes(ct, question, cfg)
        end = next((p for p in pre if p.ended), pre[-1])
        tokens.append(end.tokens)
        answers.append(end.answer)
    return QuestionChains(question, np.asarray(tokens, np.int64), tuple(answers))


def _no_probes(config: EnvConfig) -> EnvConfig:
    return dataclasses.replace(config, probe=False)


@dataclass(frozen=True)
class Outcomes:
    """What ``n`` chains give each question in one replay seed's order, ``n = 0..K``.

    Attributes:
        tokens: int64 ``[nq, K + 1]``: tokens of the first ``n`` chains (``tokens[:, 0] = 0``).
        correct: bool ``[nq, K + 1]``: their majority vote is right (``False`` at ``n = 0``).
        k: int64 ``[nq]``: chains each question has (columns past it repeat its last).
    """

    tokens: np.ndarray
    correct: np.ndarray
    k: np.ndarray


def outcomes(chains: Sequence[QuestionChains], seed: int) -> Outcomes:
    """Every question's maj@n and its tokens for ``n = 0..K`` in replay seed ``seed``'s order."""
    kmax = max((c.k for c in chains), default=0)
    tokens = np.zeros((len(chains), kmax + 1), np.int64)
    correct = np.zeros((len(chains), kmax + 1), np.bool_)
    for i, c in enumerate(chains):
        order = chain_order(seed, c.question.qid, c.k)
        answers = [c.answers[j] for j in order]
        tokens[i, 1 : c.k + 1] = np.cumsum(c.tokens[order])
        for n in range(1, c.k + 1):
            answer, _ = majority_vote(answers[:n])
            correct[i, n] = c.question.is_right(answer)
        tokens[i, c.k + 1 :] = tokens[i, c.k]
        correct[i, c.k + 1 :] = correct[i, c.k]
    return Outcomes(tokens, correct, np.asarray([c.k for c in chains], np.int64))


# -- expected curves ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Curves:
    """What an allocator expects of each question.

    Attributes:
        accuracy: float ``[nq, K + 1]``: expected accuracy of the majority vote of ``n``
            chains (``accuracy[:, 0] = 0``: no chain, no answer).
        cost: float ``[nq]``: expected tokens of one more chain.
        k: int64 ``[nq]``: chains each question has.
    """

    accuracy: np.ndarray
    cost: np.ndarray
    k: np.ndarray


def mean_curves(chains: Sequence[QuestionChains], orders: int) -> Curves:
    """Each question's maj@n accuracy averaged over ``orders`` replay orders, and its mean
    chain cost (what the curve oracle knows; the training questions' curves)."""
    if orders < 1:
        raise ConfigError(f"orders must be >= 1, got {orders}")
    acc: np.ndarray | None = None
    for i in range(orders):
        o = outcomes(chains, _CURVE_SEED + i)
        acc = o.correct.astype(np.float64) if acc is None else acc + o.correct
    assert acc is not None
    cost = np.asarray([float(c.tokens.mean()) for c in chains], np.float64)
    return Curves(acc / orders, cost, np.asarray([c.k for c in chains], np.int64))


def kernel_curves(
    x_train: np.ndarray,
    train: Curves,
    x_test: np.ndarray,
    k_test: np.ndarray,
    *,
    bandwidth: float | None = None,
) -> Curves:
    """Expected curves for test questions from a per-question score, read off the training
    questions: each test question's curve and chain cost are the training questions' averaged
    with Gaussian weights in the score (Nadaraya-Watson).

    Args:
        x_train: float ``[nt]``: the training questions' scores (out of fold, for a fitted
            predictor, so they are as noisy as the test questions').
        train: the training questions' curves (:func:`mean_curves`).
        x_test: float ``[nq]``: the test questions' scores.
        k_test: chains each test question has (a longer training curve is cut, a shorter one
            held at its last value).
        bandwidth: the kernel's width (default Silverman's rule, ``1.06 σ n^(-1/5)``; equal
            weights when the training scores do not vary).
    """
    xt = np.asarray(x_train, np.float64)
    xq = np.asarray(x_test, np.float64)
    if xt.shape != (train.accuracy.shape[0],):
        raise ConfigError(f"{xt.shape[0]} training scores for {train.accuracy.shape[0]} curves")
    h = bandwidth if bandwidth is not None else 1.06 * float(xt.std()) * len(xt) ** -0.2
    if h <= 1e-9:
        w = np.ones((len(xq), len(xt)))
    else:
        z2 = ((xq[:, None] - xt[None, :]) / h) ** 2
        # relative to the nearest training score: a test score far from all of them gets its
        # nearest ones, not 0/0
        w = np.exp(-0.5 * (z2 - z2.min(axis=1, keepdims=True)))
    w = w / w.sum(axis=1, keepdims=True)
    kt = int(train.accuracy.shape[1] - 1)
    kmax = int(max(int(np.max(k_test, initial=0)), kt))
    acc_t = np.concatenate(
        [train.accuracy, np.repeat(train.accuracy[:, -1:], kmax - kt, axis=1)], axis=1
    )
    acc = w @ acc_t
    k = np.asarray(k_test, np.int64)
    for i, kq in enumerate(k):
        acc[i, kq + 1 :] = acc[i, kq]
    acc[:, 0] = 0.0
    return Curves(acc, w @ train.cost, k)


# -- plans and their runs ----------------------------------------------------------------------


def uniform_plan(k: np.ndarray, seed: int) -> list[int]:
    """Every question's first chain (in question order), then round after round one more chain
    for every question that has one left, the questions in one order drawn with ``seed``."""
    k = np.asarray(k, np.int64)
    perm = np.random.default_rng([int(seed), len(k)]).permutation(len(k))
    plan = [q for q in range(len(k)) if k[q] >= 1]
    for n in range(2, int(np.max(k, initial=0)) + 1):
        plan += [int(q) for q in perm if k[q] >= n]
    return plan


def greedy_plan(curves: Curves, seed: int | None = None) -> list[int]:
    """Every question's first chain (in question order), then chains by expected accuracy
    gained per expected token: each step gives the question whose best jump from its ``n``
    chains to some ``m > n`` (the upper hull of its curve: a majority vote of two chains
    answers as the first does, so a vote gains at odd counts) pays most per token its ``m - n``
    chains, until no question gains. Equal gains go to the question first in an order drawn
    with ``seed`` (question order for ``None``)."""
    acc, k = curves.accuracy, np.asarray(curves.k, np.int64)
    cost = np.maximum(np.asarray(curves.cost, np.float64), 1.0)
    n = np.minimum(k, 1)
    plan = [q for q in range(len(k)) if k[q] >= 1]
    rank = np.arange(len(k))
    if seed is not None:
        rank[np.random.default_rng([int(seed), len(k)]).permutation(len(k))] = np.arange(len(k))

    def best(q: int) -> tuple[float, int] | None:
        lo, hi = int(n[q]), int(k[q])
        if hi <= lo:
            return None
        ratio = (acc[q, lo + 1 : hi + 1] - acc[q, lo]) / (np.arange(1, hi - lo + 1) * cost[q])
        j = int(np.argmax(ratio))
        return (float(ratio[j]), lo + j + 1) if ratio[j] > _MIN_GAIN else None

    heap: list[tuple[float, int, int, int]] = []
    for q in range(len(k)):
        b = best(q)
        if b is not None:
            heap.append((-b[0], int(rank[q]), q, b[1]))
    heapq.heapify(heap)
    while heap:
        _, _, q, m = heapq.heappop(heap)
        plan += [q] * (m - int(n[q]))
        n[q] = m
        b = best(q)
        if b is not None:
            heapq.heappush(heap, (-b[0], int(rank[q]), q, b[1]))
    return plan


@dataclass(frozen=True)
class Allocation:
    """What one allocator got on one seed at one budget, per test question.

    Attributes:
        chains: int64 ``[nq]``: chains that ran to their end (and voted).
        tokens: int64 ``[nq]``: tokens decoded (a cut chain's included).
        correct: bool ``[nq]``.
    """

    chains: np.ndarray
    tokens: np.ndarray
    correct: np.ndarray

    @property
    def spent(self) -> int:
        return int(self.tokens.sum())


def run_plan(plan: Sequence[int], out: Outcomes, budget: int) -> Allocation:
    """Run ``plan``'s chains in order until ``budget`` tokens are spent: the chain that does not
    fit is cut where the budget ends (its tokens count, it does not vote), and nothing runs
    after it. A question asked for more chains than it has gets none."""
    nq = out.k.size
    n = np.zeros(nq, np.int64)
    tokens = np.zeros(nq, np.int64)
    left = int(budget)
    for q in plan:
        if n[q] >= out.k[q]:
            continue
        c = int(out.tokens[q, n[q] + 1] - out.tokens[q, n[q]])
        if c > left:
            tokens[q] += max(left, 0)
            break
        left -= c
        n[q] += 1
        tokens[q] += c
    return Allocation(n, tokens, out.correct[np.arange(nq), n])


def oracle_allocation(out: Outcomes, budget: int) -> Allocation:
    """The most questions ``budget`` can answer right when every chain's answer and length in
    the seed's order are known: each question's cheapest right prefix (a majority of its first
    ``n`` chains), cheapest first while they fit. An upper bound on :func:`run_plan` of any
    plan at that budget."""
    nq = out.k.size
    cost = np.full(nq, np.iinfo(np.int64).max)
    need = np.zeros(nq, np.int64)
    for q in range(nq):
        right = np.flatnonzero(out.correct[q, 1 : out.k[q] + 1])
        if right.size:
            need[q] = int(right[0]) + 1
            cost[q] = int(out.tokens[q, need[q]])
    chains = np.zeros(nq, np.int64)
    tokens = np.zeros(nq, np.int64)
    left = int(budget)
    for q in np.argsort(cost, kind="stable"):
        if need[q] == 0 or cost[q] > left:
            break
        left -= int(cost[q])
        chains[q], tokens[q] = need[q], cost[q]
    return Allocation(chains, tokens, chains > 0)


# -- the setup a learned allocator plugs into ---------------------------------------------------


@dataclass
class FleetSetup:
    """The questions, chains and training curves every allocator works from (what an ``extra``
    allocator receives).

    Attributes:
        bank: the bank.
        train, test: the training and test questions (the annotated ones when restricted).
        train_chains, test_chains: their chains (:func:`question_chains`).
        train_curves: the training questions' maj@n curves over ``orders`` replay orders.
        hidden: the bank's hidden states (``None`` without).
    """

    bank: TraceBank
    train: list[Question]
    test: list[Question]
    train_chains: list[QuestionChains]
    test_chains: list[QuestionChains]
    train_curves: Curves
    hidden: HiddenStates | None = None

    @property
    def k_test(self) -> np.ndarray:
        return np.asarray([c.k for c in self.test_chains], np.int64)

    def first_chunk(self, q: Question, chain: int) -> tuple[str, Any, Any, str]:
        """``(question text, confidences, entropies, text)`` of recorded ``chain``'s first
        chunk: the current difficulty predictor's input."""
        r = self.bank[q.qid].chains[chain].rows
        return (q.text, r["confidence"][0], r["entropy"][0], str(r["text"][0]))


#: An allocator given as expected curves: ``(setup, replay seed) -> Curves`` of the test
#: questions; :func:`greedy_plan` hands out the chains.
CurveFn = Callable[[FleetSetup, int], Curves]


def _pass_rate(c: QuestionChains) -> float:
    return float(np.mean([c.question.is_right(a) for a in c.answers]))


def _folds(n: int, folds: int) -> np.ndarray:
    return np.arange(n) % max(2, min(folds, n))


def _probe_curves(setup: FleetSetup, probe: LinearProbe, folds: int) -> Curves:
    """The difficulty probe's curves: training scores out of fold (the probe's layers and
    strength refitted without each fold), test scores from the probe itself."""
    from env.probes import fit_difficulty_probe, prompt_set

    hs = setup.hidden
    assert hs is not None
    alpha = probe.params.get("alpha")
    if alpha is None:
        raise ConfigError("the difficulty probe has no 'alpha' in its params: refit it")
    data = prompt_set(setup.bank, hs, setup.train)
    fold = _folds(len(setup.train), folds)
    x_train = np.empty(len(setup.train))
    for f in np.unique(fold):
        keep = [q for q, g in zip(setup.train, fold, strict=True) if g != f]
        p = fit_difficulty_probe(
            prompt_set(setup.bank, hs, keep), hs.manifest, layers=probe.layers, alpha=float(alpha)
        )
        x_train[fold == f] = p(data.states[fold == f], data.layers)
    test = prompt_set(setup.bank, hs, setup.test)
    x_test = probe(test.states, test.layers)
    return kernel_curves(x_train, setup.train_curves, x_test, setup.k_test)


def _current_curves(setup: FleetSetup, folds: int) -> Callable[[int], Curves]:
    """The current difficulty predictor's curves, per seed: a test question's score reads the
    first chunk of the first chain that seed hands out; a training question's (out of fold)
    its recorded chain 0's."""
    from env.episode.difficulty import difficulty_features, fit_difficulty

    def score(model: Any, rows: list[tuple[str, Any, Any, str]]) -> np.ndarray:
        return 1.0 - np.asarray(model.predict(np.stack([difficulty_features(*r) for r in rows])))

    fold = _folds(len(setup.train), folds)
    x_train = np.empty(len(setup.train))
    for f in np.unique(fold):
        keep = [q for q, g in zip(setup.train, fold, strict=True) if g != f]
        held = [setup.first_chunk(q, 0) for q, g in zip(setup.train, fold, strict=True) if g == f]
        x_train[fold == f] = score(fit_difficulty(setup.bank, keep), held)
    model = fit_difficulty(setup.bank, setup.train)

    def curves(seed: int) -> Curves:
        rows = [
            setup.first_chunk(c.question, chain_order(seed, c.question.qid, c.k)[0])
            for c in setup.test_chains
        ]
        return kernel_curves(x_train, setup.train_curves, score(model, rows), setup.k_test)

    return curves


# -- the report --------------------------------------------------------------------------------


@dataclass
class FleetRow:
    """One allocator at one budget, over the replay seeds.

    Attributes:
        allocator: its name.
        chains_per_question: the budget's ``n`` (uniform allocation's chains per question).
        budget: the shared budget in tokens.
        accuracy: share of test questions right, interval over questions and seeds.
        diffs: accuracy minus each of :data:`BASELINES`' (but itself), paired.
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
        :data:`BASELINES`, and the notes, as Markdown."""
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
    """Every allocator (see the module docstring) at the budgets of ``budgets`` chains per
    question, on the bank's test questions, over replay ``seeds``.

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
    from env.bank.hidden import HiddenStates

    b = bank if isinstance(bank, TraceBank) else TraceBank(bank)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or any(s < 0 for s in seed_list):
        raise ConfigError(f"seeds must be a positive count or non-negative seeds, got {seeds}")
    ns = [int(n) for n in budgets]
    if not ns or any(n < 1 for n in ns):
        raise ConfigError(f"budgets are chains per question, each >= 1: got {list(budgets)}")
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
    outs = {s: outcomes(test_chains, s) for s in seed_list}
    kmax = outs[seed_list[0]].tokens.shape[1] - 1
    if max(ns) > kmax:
        raise ConfigError(f"the bank holds at most {kmax} chains per question; got {max(ns)}")
    totals = {
        n: math.floor(float(np.mean([o.tokens[:, n].sum() for o in outs.values()]))) for n in ns
    }

    # Every allocator but uniform and the realized oracle: expected curves per seed, handed out
    # by the greedy plan (equal gains broken in the seed's order).
    k = setup.k_test

    def fixed(c: Curves) -> Callable[[int], Curves]:
        return lambda s: c

    curves: dict[str, Callable[[int], Curves]] = {
        MEAN_CURVE: fixed(
            kernel_curves(np.zeros(len(train)), setup.train_curves, np.zeros(len(test)), k)
        )
    }
    if probe is not None:
        curves[PROBE] = fixed(_probe_curves(setup, probe, folds))
    curves[CURRENT] = _current_curves(setup, folds)
    for name, fn in (extra or {}).items():
        if name in curves or name in (UNIFORM, ORACLE_PASS_RATE, ORACLE_CURVES, ORACLE_REALIZED):
            raise ConfigError(f"an extra allocator may not be named {name!r}")
        curves[name] = lambda s, fn=fn: fn(setup, s)  # type: ignore[misc]
    rates = [np.asarray([_pass_rate(c) for c in cs]) for cs in (train_chains, test_chains)]
    curves[ORACLE_PASS_RATE] = fixed(kernel_curves(rates[0], setup.train_curves, rates[1], k))
    curves[ORACLE_CURVES] = fixed(mean_curves(test_chains, orders))

    names = [UNIFORM, *curves, ORACLE_REALIZED]
    nq, ns_ = len(test), len(seed_list)
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

    d = draws(nq, n_boot, boot_seed)
    ws = d.seeds(ns_)

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
    settings = {
        "orders": orders,
        "folds": max(2, folds),
        "bootstrap": {"resamples": n_boot, "seed": boot_seed, "unit": "test question x seed"},
        "probe": probe_info,
    }
    return FleetReport(
        bank=b.path.resolve().name,
        questions={
            "train": len(train),
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


if __name__ == "__main__":
    main()
