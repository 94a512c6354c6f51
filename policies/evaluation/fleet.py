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

Every allocator but uniform and the realized oracle is a :class:`Curves` per seed
(:func:`allocator_curves`) handed out by :func:`greedy_plan`; ties between equal gains are broken
in an order drawn with the seed.

The table (every allocator at the budgets of a few chains per question, with intervals) and the
command (``python -m policies.evaluation.fleet BANK``) are in
:mod:`policies.evaluation.fleet_report`.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from env.bank.store import TraceBank
from env.episode.config import EnvConfig
from env.generators.replay import chain_order
from env.types import Question
from features.aggregate import majority_vote
from features.errors import ConfigError
from policies.evaluation.oracle import chain_prefixes

if TYPE_CHECKING:
    from env.bank.hidden import HiddenStates
    from env.probes import LinearProbe

__all__ = [
    "Allocation",
    "CurveFn",
    "Curves",
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
    "allocator_curves",
    "greedy_plan",
    "kernel_curves",
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


# -- every allocator handed out by the greedy plan ---------------------------------------------


def allocator_curves(
    setup: FleetSetup,
    probe: LinearProbe | None,
    extra: Mapping[str, CurveFn] | None,
    *,
    folds: int,
    orders: int,
) -> dict[str, Callable[[int], Curves]]:
    """Every allocator but uniform and the realized oracle, by name in table order: its
    expected curves for a replay seed, which :func:`greedy_plan` hands out (equal gains broken
    in the seed's order).

    Args:
        setup: the questions, chains and training curves.
        probe: the difficulty probe (``None``: no hidden states, no probe row).
        extra: further allocators by name, as expected curves (a learned value, for one).
        folds: folds for the training questions' out-of-fold scores.
        orders: replay orders the test questions' own curves are averaged over.

    Raises:
        ConfigError: an extra allocator named like one of these or of the other rows.
    """
    train, test = setup.train, setup.test
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
    rates = [
        np.asarray([_pass_rate(c) for c in cs]) for cs in (setup.train_chains, setup.test_chains)
    ]
    curves[ORACLE_PASS_RATE] = fixed(kernel_curves(rates[0], setup.train_curves, rates[1], k))
    curves[ORACLE_CURVES] = fixed(mean_curves(setup.test_chains, orders))
    return curves


if __name__ == "__main__":
    # The documented command; the table and its arguments live in fleet_report.
    from policies.evaluation.fleet_report import main

    main()
