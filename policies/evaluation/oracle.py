"""The oracle: what an allocator that knew correctness would spend (the physical limit).

For each question the oracle answers with the cheapest *single chain prefix* whose answer is
correct. A prefix of recorded chain ``h`` is its first ``i + 1`` chunks, as the environment
reaches them by opening the chain and continuing it ``i`` times (past its sampled end by budget
forcing, as far as the recorded extension chunks go). Its cost is counted exactly as the env
counts decoded tokens:

* every chunk's tokens (generated and injected: ``n_tokens``), plus
* the chunk's answer-forcing probe (``probe_tokens``) only while the chain is still open after
  the chunk (an ended chain is not probed), and only when the env probes (``config.probe``).

The oracle may also run without probes, as a policy that reads none does (``uses_probes``): then
an open chain has no answer, and a chain run to its end costs no probe tokens. It takes the cheaper
of the two.

A prefix's answer is the chain's answer at that point, as the env holds it: its final answer
(extracted from the text so far) once the chain has ended, else its latest probe answer. A chain
has ended after chunk ``i`` when the chunk's finish reason is ``cap`` or ``forced``, or ``i`` is
its last sampled chunk, or the last recorded one (except a budget-forced chunk that brought no
token). The prefixes a chain offers stop where the env could no longer continue it: a chain cut
by the token cap or a forced answer, ``extension_chunks`` extensions past its end, a chain at
``max_chain_tokens``, the last recorded chunk, or a continue that could pass ``token_cap``.

Any policy's correct answer is some chain's answer at the moment it stops, and reaching it cost at
least that chain's prefix, so no policy beats the oracle: its accuracy is at most the oracle's and
a correct episode decodes at least the oracle's tokens for that question (verification and
other chains only add). A question with no correct prefix counts as wrong at the cost of its
cheapest opening chunk (every episode opens one chain).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from env.bank.store import ChainTrace, QuestionTrace, TraceBank
from env.episode.config import Action, EnvConfig
from env.episode.rules import replay_chain
from env.questions import select_split
from env.types import Question
from features.errors import ConfigError
from policies.evaluation.metrics import FrontierPoint, Interval
from policies.evaluation.runner import (
    LevelStats,
    level_label,
    score_metrics,
    summarize_scores,
)

__all__ = [
    "OracleQuestion",
    "OracleResult",
    "Prefix",
    "VoteFloor",
    "chain_prefixes",
    "oracle",
    "oracle_check",
    "vote_floor",
]


@dataclass(frozen=True, slots=True)
class Prefix:
    """One reachable prefix of a chain: chunks ``0..chunk``, what it decoded, its answer."""

    chunk: int
    tokens: int
    answer: str | None
    correct: bool
    ended: bool


@dataclass(frozen=True, slots=True)
class OracleQuestion:
    """The oracle on one question: the cheapest correct prefix (chain, chunks, tokens)."""

    qid: str
    level: str
    correct: bool
    tokens: int
    chain: int  # -1: no correct prefix (tokens is then the cheapest opening chunk)
    chunks: int


@dataclass
class OracleResult:
    """The oracle on a split: per question, and summarised like :class:`EvalResult`."""

    bank: str
    split: str
    config: EnvConfig
    questions: list[OracleQuestion]
    accuracy: Interval
    tokens: Interval
    by_level: dict[str, LevelStats]

    name = "oracle"

    def point(self) -> FrontierPoint:
        return FrontierPoint("oracle", "", self.tokens, self.accuracy)

    def by_qid(self) -> dict[str, OracleQuestion]:
        return {q.qid: q for q in self.questions}

    def metrics(self, prefix: str = "oracle") -> dict[str, float]:
        return score_metrics(prefix, self.accuracy, self.tokens, self.by_level)

    def rows(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(q) for q in self.questions]


def chain_prefixes(ct: ChainTrace, question: Question, config: EnvConfig) -> list[Prefix]:
    """Every prefix of a recorded chain the env can reach, with its decoded tokens and answer."""
    r = ct.rows
    out: list[Prefix] = []
    decoded = 0
    bound_continue = config.bound(Action.CONTINUE)
    # The chain as the env reaches it, by the env's rules (answers only: no signal is read).
    for c in replay_chain(ct, config, signals=False, question=question):
        decoded += int(r["n_tokens"][c.i]) + (int(r["probe_tokens"][c.i]) if c.probed else 0)
        answer = c.fold.answer
        correct = question.is_right(answer)
        out.append(Prefix(c.i, decoded, answer, correct, c.ended))
        if not (c.can_continue and config.token_cap - decoded >= bound_continue):
            break
    return out


def _question(qt: QuestionTrace, config: EnvConfig) -> OracleQuestion:
    q = qt.question
    best: tuple[int, int, int] | None = None  # tokens, chain, chunks
    opening = None
    # A policy that reads no probe runs without them (see ``uses_probes``): so may the oracle.
    configs = [config, dataclasses.replace(config, probe=False)] if config.probe else [config]
    for cfg in configs:
        for h, ct in enumerate(qt.chains):
            pre = chain_prefixes(ct, q, cfg)
            if pre and (opening is None or pre[0].tokens < opening):
                opening = pre[0].tokens
            for p in pre:
                if p.correct and (best is None or p.tokens < best[0]):
                    best = (p.tokens, h, p.chunk + 1)
                    break  # later prefixes of this chain cost more
    if best is None:
        return OracleQuestion(q.qid, level_label(q.difficulty), False, int(opening or 0), -1, 1)
    return OracleQuestion(q.qid, level_label(q.difficulty), True, best[0], best[1], best[2])


def oracle(
    bank: TraceBank | str | Path,
    *,
    split: str | None = "test",
    config: EnvConfig | None = None,
    n_boot: int = 2000,
    **config_fields: Any,
) -> OracleResult:
    """The oracle on the recorded questions of ``split`` (see the module docstring).

    Args:
        bank: a :class:`~env.bank.store.TraceBank` or its folder.
        split: ``test`` / ``train`` (``None``: every recorded question).
        config: env settings (unset fields: the bank's, as the evaluator uses them).
        n_boot: bootstrap resamples for the intervals.
    """
    b = bank if isinstance(bank, TraceBank) else TraceBank(bank)
    if config is not None and config_fields:
        raise ConfigError("pass either config or its fields, not both")
    config = config if config is not None else EnvConfig.from_manifest(b.manifest, **config_fields)
    qs = select_split(b.questions, split)
    if not qs:
        raise ConfigError(f"the bank at {b.path} has no recorded {split or 'any'!r} questions")
    per = [_question(b[q.qid], config) for q in qs]
    acc, tok, by = summarize_scores(
        [p.qid for p in per],
        [p.level for p in per],
        [float(p.correct) for p in per],
        [float(p.tokens) for p in per],
        n_boot=n_boot,
    )
    return OracleResult(
        bank=b.path.resolve().name,
        split=split or "",
        config=config,
        questions=per,
        accuracy=acc,
        tokens=tok,
        by_level=by,
    )


def oracle_check(result: Any, orc: OracleResult, *, slack: int = 0) -> list[str]:
    """Episodes of an :class:`EvalResult` that beat the oracle (none should): correct where
    the oracle is wrong, or correct with fewer tokens than the oracle's."""
    by = orc.by_qid()
    bad = []
    for e in result.episodes:
        o = by.get(e.qid)
        if o is None or not e.correct:
            continue
        if not o.correct or e.decoded + slack < o.tokens:
            bad.append(
                f"{result.label}: {e.qid} seed {e.seed} correct with {e.decoded} tokens, oracle "
                f"{'wrong' if not o.correct else o.tokens}"
            )
    return bad


# -- the floor for policies that sample whole chains -------------------------------------------


@dataclass(frozen=True, slots=True)
class VoteFloor:
    """What an oracle voter needs to reach a target accuracy (:func:`vote_floor`).

    Attributes:
        vote: ``majority`` (answers with the unique most frequent answer so far) or ``any``
            (answers with any chain it has sampled).
        target: the accuracy to reach.
        tokens: its mean decoded tokens per question (``nan``: it cannot reach the target).
        accuracy: the accuracy it reaches (the target, or the most it can).
        all_chains: mean tokens of running every recorded chain (maj@K's cost, counted alike).
    """

    vote: str
    target: float
    tokens: float
    accuracy: float
    all_chains: float

    def share(self, reference_tokens: float) -> float:
        """Its tokens as a share of a reference's mean tokens (maj@16's)."""
        return self.tokens / reference_tokens


def _chain_costs(qt: QuestionTrace, config: EnvConfig) -> list[tuple[int, bool, str | None]]:
    """(tokens, correct, answer) of each chain run without probes to where it ends."""
    out = []
    for ct in qt.chains:
        pre = chain_prefixes(ct, qt.question, config)
        end = next((p for p in pre if p.ended), pre[-1])
        out.append((end.tokens, end.correct, end.answer))
    return out


def vote_floor(
    bank: TraceBank | str | Path,
    *,
    target: float,
    split: str | None = "test",
    vote: Literal["majority", "any"] = "majority",
    config: EnvConfig | None = None,
    orders: int = 200,
    seed: int = 0,
) -> VoteFloor:
    """The fewest mean tokens with which an oracle that samples whole chains reaches ``target``.

    The oracle knows which answers are right, but like best-of-N it runs whole chains (without
    probes) in the replay's random order and answers from them. On each question it either
    stops after the first chain, or keeps sampling until its answer is right (``majority``: the
    unique most frequent answer so far; ``any``: any chain so far) and stops there (or after the
    last chain). It mixes the two across questions as cheaply as it can (a linear programme,
    solved greedily by accuracy gained per extra token): a lower bound on what any policy that
    decides only when to stop sampling needs, for policies that answer with the majority
    (``majority``) or with any sampled chain (``any``, a lower floor). Costs are expectations
    over ``orders`` chain orders (every order when a question has so few chains that there are
    no more than ``orders``).
    """
    if vote not in ("majority", "any"):
        raise ConfigError(f"vote must be 'majority' or 'any', got {vote!r}")
    if orders < 1:
        raise ConfigError(f"orders must be >= 1, got {orders}")
    b = bank if isinstance(bank, TraceBank) else TraceBank(bank)
    config = config if config is not None else EnvConfig.from_manifest(b.manifest)
    config = dataclasses.replace(config, probe=False)
    qs = select_split(b.questions, split)
    if not qs:
        raise ConfigError(f"the bank at {b.path} has no recorded {split or 'any'!r} questions")
    rng = np.random.default_rng(seed)
    one = np.zeros((len(qs), 2))  # first chain only: tokens, accuracy
    full = np.zeros((len(qs), 2))  # until right
    all_chains = np.zeros(len(qs))
    for j, q in enumerate(qs):
        chains = _chain_costs(b[q.qid], config)
        k = len(chains)
        all_chains[j] = sum(c[0] for c in chains)
        if math.factorial(k) <= orders:
            perms: list[Any] = list(itertools.permutations(range(k)))
        else:
            perms = [rng.permutation(k) for _ in range(orders)]
        for perm in perms:
            first = chains[perm[0]]
            one[j] += (first[0], first[1])
            votes: Counter[str] = Counter()
            spent, right = 0, False
            for i in perm:
                tokens, correct, answer = chains[i]
                spent += tokens
                if vote == "any":
                    right = correct
                elif answer is not None:
                    votes[answer] += 1
                    top = votes.most_common(2)
                    right = (len(top) == 1 or top[0][1] > top[1][1]) and _is_right(
                        chains, top[0][0]
                    )
                if right:
                    break
            full[j] += (spent, float(right))
        one[j] /= len(perms)
        full[j] /= len(perms)
    n = len(qs)
    need = target * n
    tokens, acc = one[:, 0].sum(), one[:, 1].sum()
    gain = full[:, 1] - one[:, 1]
    extra = full[:, 0] - one[:, 0]
    order = np.argsort(-gain / np.maximum(extra, 1e-9), kind="stable")
    for j in order:
        if acc >= need - 1e-12 or gain[j] <= 0:
            break
        f = min(1.0, (need - acc) / gain[j])
        acc += f * gain[j]
        tokens += f * extra[j]
    reached = acc >= need - 1e-9
    return VoteFloor(
        vote=vote,
        target=target,
        tokens=float(tokens / n) if reached else math.nan,
        accuracy=float(min(acc / n, target) if reached else acc / n),
        all_chains=float(all_chains.mean()),
    )


def _is_right(chains: list[tuple[int, bool, str | None]], answer: str) -> bool:
    return any(c for _, c, a in chains if a == answer)
