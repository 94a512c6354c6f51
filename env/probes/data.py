"""What the probes read and predict, gathered from a bank and its hidden states as arrays.

Two tables, one row per question (:class:`PromptSet`) and one per main chunk boundary of every
chain (:class:`BoundarySet`). Both carry beside the hidden states the signals ponder had before
them, read the way the episode reads them, so a report compares on exactly the same rows:

- a boundary's ``confidence`` is the chain's mean token confidence over its main chunks so far
  (:class:`~env.episode.rules.ChainFold`, the DeepConf number the votes read), and its ``p_yes``
  the self-verifier's P(yes) recorded at that chunk (NaN where the bank has none);
- a question's ``first_chunk`` is the first chunk of chain 0, what the current difficulty predictor
  (:mod:`env.episode.difficulty`) sees in an episode before it decides.

A boundary's extra inputs (:data:`BOUNDARY_EXTRAS`) are known online, when the boundary is
reached: the share of the token budget spent and whether the chain ended there. The chain's own
length is not (it is known only once the chain ends), so no feature is relative to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from env.episode.rules import ChainFold, fold_chunk
from features.errors import BankError

if TYPE_CHECKING:
    from env.bank.hidden import HiddenStates
    from env.bank.store import TraceBank
    from env.types import Question

__all__ = [
    "BOUNDARY_EXTRAS",
    "BoundarySet",
    "PromptSet",
    "boundary_set",
    "prompt_set",
]

#: Inputs of a boundary beyond its hidden state, each in [0, 1]:
#: ``budget_fraction`` the chain's main tokens so far over the bank's ``max_tokens``;
#: ``ended`` 1 when the chain's sampling ended at this chunk (its answer is written), else 0.
BOUNDARY_EXTRAS: tuple[str, ...] = ("budget_fraction", "ended")


@dataclass(frozen=True)
class PromptSet:
    """One row per question: the prompt's state and the question's pass rate.

    Attributes:
        qids: the questions, in the order given.
        layers: the layers along the states' second axis (the annotation's).
        states: float32 ``[nq, n_layers, dims]``.
        pass_rate: share of the question's recorded chains whose final answer is right.
        first_chunk: per question, chain 0's first chunk as ``(question text, confidences,
            entropies, text)``: the current difficulty predictor's input.
    """

    qids: list[str]
    layers: tuple[int, ...]
    states: np.ndarray
    pass_rate: np.ndarray
    first_chunk: list[tuple[str, np.ndarray, np.ndarray, str]]


@dataclass(frozen=True)
class BoundarySet:
    """One row per main chunk boundary of every chain, in (question, chain, chunk) order.

    Attributes:
        qids: the questions, in the order given; ``question`` indexes it.
        layers: the layers along the states' second axis (the annotation's).
        question, chain, chunk: int arrays ``[n]`` naming each row (``chunk`` counts the
            chain's main chunks from 0).
        last: the row is its chain's last main boundary.
        states: float32 ``[n, n_layers, dims]``.
        extras: :data:`BOUNDARY_EXTRAS` by name, float64 ``[n]`` each.
        correct: the chain's final answer is right (the label, the same for all its rows).
        confidence: the chain's mean token confidence over its main chunks up to this one.
        p_yes: the self-verifier's P(yes) recorded at this chunk (NaN when not recorded).
    """

    qids: list[str]
    layers: tuple[int, ...]
    question: np.ndarray
    chain: np.ndarray
    chunk: np.ndarray
    last: np.ndarray
    states: np.ndarray
    extras: dict[str, np.ndarray]
    correct: np.ndarray
    confidence: np.ndarray
    p_yes: np.ndarray

    def __len__(self) -> int:
        return int(self.question.size)

    def take(self, rows: np.ndarray) -> BoundarySet:
        """The rows selected by a boolean mask or an index array (questions kept as they are)."""
        return BoundarySet(
            qids=self.qids,
            layers=self.layers,
            question=self.question[rows],
            chain=self.chain[rows],
            chunk=self.chunk[rows],
            last=self.last[rows],
            states=self.states[rows],
            extras={k: v[rows] for k, v in self.extras.items()},
            correct=self.correct[rows],
            confidence=self.confidence[rows],
            p_yes=self.p_yes[rows],
        )

    def at_boundary(self, k: int) -> BoundarySet:
        """One row per chain: its state after its main chunk ``k`` (0-based), or at its last
        main boundary if it ended before (the state it stopped in: the population stays every
        chain, as a controller looking at all chains after ``k`` chunks sees them)."""
        keep = (self.chunk == k) | (self.last & (self.chunk < k))
        return self.take(keep)


def _main_rows(rows: dict[str, list[object]]) -> list[int]:
    return [j for j, e in enumerate(rows["ext"]) if not e]


def prompt_set(bank: TraceBank, hidden: HiddenStates, questions: Sequence[Question]) -> PromptSet:
    """The prompt states and pass rates of ``questions`` (every one must be annotated)."""
    states, rates, first = [], [], []
    for q in questions:
        trace = bank[q.qid]
        states.append(np.asarray(hidden.prompt(q.qid), dtype=np.float32))
        rates.append(float(np.mean([c.correct for c in trace.chains])))
        r = trace.chains[0].rows
        first.append(
            (
                q.text,
                np.asarray(r["confidence"][0], dtype=np.float64),
                np.asarray(r["entropy"][0], dtype=np.float64),
                str(r["text"][0]),
            )
        )
    dims = hidden.dims
    return PromptSet(
        qids=[q.qid for q in questions],
        layers=hidden.layers,
        states=np.stack(states) if states else np.zeros((0, len(hidden.layers), dims), np.float32),
        pass_rate=np.asarray(rates, dtype=np.float64),
        first_chunk=first,
    )


def boundary_set(
    bank: TraceBank, hidden: HiddenStates, questions: Sequence[Question]
) -> BoundarySet:
    """Every main boundary of every chain of ``questions`` (every one must be annotated).

    Raises:
        BankError: the hidden states name other boundaries than the bank's main chunks.
    """
    max_tokens = float(bank.manifest.max_tokens)
    cols: dict[str, list[object]] = {
        k: [] for k in ("question", "chain", "chunk", "last", "correct", "conf", "p_yes")
    }
    extras: dict[str, list[float]] = {k: [] for k in BOUNDARY_EXTRAS}
    states = []
    for qi, q in enumerate(questions):
        chain_chunk, st = hidden.boundaries(q.qid)
        at = {(int(c), int(k)): i for i, (c, k) in enumerate(chain_chunk)}
        for c in bank[q.qid].chains:
            r = c.rows
            main = _main_rows(r)
            fold = ChainFold()
            for n, j in enumerate(main):
                fold_chunk(fold, str(r["text"][j]), r["confidence"][j], r["entropy"][j])
                i = at.get((c.chain, int(r["chunk"][j])))
                if i is None:
                    raise BankError(
                        f"the hidden states of {q.qid!r} lack chunk {r['chunk'][j]} of chain "
                        f"{c.chain}: delete {hidden.path} and re-run `ponder bank annotate "
                        f"{bank.path}`"
                    )
                states.append(st[i])
                cols["question"].append(qi)
                cols["chain"].append(c.chain)
                cols["chunk"].append(n)
                cols["last"].append(n == len(main) - 1)
                cols["correct"].append(bool(c.correct))
                cols["conf"].append(fold.mean_confidence)
                p = r["judge_p_yes"][j]
                cols["p_yes"].append(float("nan") if p is None else float(p))
                tokens = int(r["start"][j]) + int(r["n_tokens"][j])
                extras["budget_fraction"].append(min(tokens / max_tokens, 1.0))
                extras["ended"].append(1.0 if r["finish_reason"][j] == "stop" else 0.0)
    dims = hidden.dims
    return BoundarySet(
        qids=[q.qid for q in questions],
        layers=hidden.layers,
        question=np.asarray(cols["question"], dtype=np.int64),
        chain=np.asarray(cols["chain"], dtype=np.int64),
        chunk=np.asarray(cols["chunk"], dtype=np.int64),
        last=np.asarray(cols["last"], dtype=bool),
        states=(
            np.stack(states).astype(np.float32)
            if states
            else np.zeros((0, len(hidden.layers), dims), np.float32)
        ),
        extras={k: np.asarray(v, dtype=np.float64) for k, v in extras.items()},
        correct=np.asarray(cols["correct"], dtype=bool),
        confidence=np.asarray(cols["conf"], dtype=np.float64),
        p_yes=np.asarray(cols["p_yes"], dtype=np.float64),
    )
