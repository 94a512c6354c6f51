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
reached, from what the episode holds of the chain: its tokens so far, whether its sampling ended
there, and its :class:`~env.episode.rules.ChainFold` (its token confidences and entropies and its
answers at each boundary so far).
:func:`boundary_extras` is their one definition, read here and by the environments
(:meth:`~env.episode.hidden.HiddenProbes.extras`). The chain's own length is not known before it
ends, so no input is relative to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from env.episode.config import EnvConfig
from env.episode.rules import ChainFold, replay_chain
from features.errors import BankError

if TYPE_CHECKING:
    from env.bank.hidden import HiddenStates
    from env.bank.store import TraceBank
    from env.types import Question

__all__ = [
    "BOUNDARY_EXTRAS",
    "BoundarySet",
    "PromptSet",
    "boundary_extras",
    "boundary_set",
    "prompt_set",
]

#: Inputs of a boundary beyond its hidden state (:func:`boundary_extras`):
#: ``budget_fraction`` the chain's tokens so far over the bank's ``max_tokens`` (at most 1);
#: ``ended`` 1 when the chain's sampling ended at this chunk (its answer is written), else 0;
#: ``budget_open`` ``budget_fraction`` while the chain is open, 0 once it has ended (a chain's
#: final length ranks questions, not the chains of one question: read at the end it cost the
#: within-question ranking on dev);
#: ``mean_confidence`` the chain's mean token confidence so far (DeepConf, what confidence votes
#: read); ``chunk_confidence`` and ``chunk_entropy`` its latest chunk's mean token confidence and
#: entropy.
#: Its confidence trajectory over its chunks so far (each chunk's mean token confidence):
#: ``conf_min`` the lowest (DeepConf's lowest group confidence with a chunk as the group),
#: ``conf_std`` their spread and ``conf_slope`` their least-squares slope per chunk (0 with one
#: chunk).
#: Its answer's stability over its boundaries so far (:attr:`~env.episode.rules.ChainFold.history`:
#: the probe's answer while open, the final one once ended): ``answer_same`` 1 when the answer
#: now is the one of the boundary before (and not none), else 0; ``answer_distinct`` how many
#: different answers it has given; ``answer_agree`` the share of its boundaries whose answer is
#: the one now (0 without one). These three are NaN for a chain never probed (an environment
#: that does not probe, or a chain that ended at its first chunk), the confidence ones while the
#: chain has no finite confidence; a probe reads a missing value as its training mean
#: (:meth:`~env.probes.model.LinearProbe.inputs`).
BOUNDARY_EXTRAS: tuple[str, ...] = (
    "budget_fraction",
    "ended",
    "budget_open",
    "mean_confidence",
    "chunk_confidence",
    "chunk_entropy",
    "conf_min",
    "conf_std",
    "conf_slope",
    "answer_same",
    "answer_distinct",
    "answer_agree",
)


def boundary_extras(
    fold: ChainFold, *, tokens: int, stopped: bool, max_tokens: int
) -> dict[str, float]:
    """The :data:`BOUNDARY_EXTRAS` of a chain at a boundary.

    Args:
        fold: the chain's chunks so far, this one included (:func:`~env.episode.rules.fold_chunk`
            and :func:`~env.episode.rules.fold_answer`).
        tokens: the chain's tokens so far.
        stopped: its sampling ended at this chunk (finish reason ``stop``).
        max_tokens: the token budget ``budget_fraction`` is relative to (the bank's).
    """
    budget = min(tokens / max_tokens, 1.0)
    ended = 1.0 if stopped else 0.0
    nan = float("nan")
    out = {
        "budget_fraction": budget,
        "ended": ended,
        "budget_open": budget * (1.0 - ended),
        "mean_confidence": fold.mean_confidence,
        "chunk_confidence": fold.chunk_conf[-1] if fold.chunk_conf else nan,
        "chunk_entropy": fold.chunk_entropy[-1] if fold.chunk_entropy else nan,
    }
    out.update(_trajectory(fold.chunk_conf))
    out.update(_stability(fold))
    return out


def _trajectory(chunk_conf: Sequence[float]) -> dict[str, float]:
    """``conf_min``, ``conf_std``, ``conf_slope`` of the chunk confidences so far."""
    if not chunk_conf:
        nan = float("nan")
        return {"conf_min": nan, "conf_std": nan, "conf_slope": nan}
    c = np.asarray(chunk_conf, np.float64)
    slope = 0.0
    if c.size > 1:
        x = np.arange(c.size, dtype=np.float64) - (c.size - 1) / 2.0
        slope = float((x * (c - c.mean())).sum() / (x * x).sum())
    return {"conf_min": float(c.min()), "conf_std": float(c.std()), "conf_slope": slope}


def _stability(fold: ChainFold) -> dict[str, float]:
    """``answer_same``, ``answer_distinct``, ``answer_agree`` of the answers so far."""
    hist = fold.history
    if not fold.probes or not hist:
        nan = float("nan")
        return {"answer_same": nan, "answer_distinct": nan, "answer_agree": nan}
    now = hist[-1]
    same = now is not None and len(hist) > 1 and hist[-2] == now
    return {
        "answer_same": 1.0 if same else 0.0,
        "answer_distinct": float(len({a for a in hist if a is not None})),
        "answer_agree": (sum(a == now for a in hist) / len(hist)) if now is not None else 0.0,
    }


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
    max_tokens = int(bank.manifest.max_tokens)
    cols: dict[str, list[object]] = {
        k: [] for k in ("question", "chain", "chunk", "last", "correct", "conf", "p_yes")
    }
    extras: dict[str, list[float]] = {k: [] for k in BOUNDARY_EXTRAS}
    states = []
    config = EnvConfig(probe=True)
    for qi, q in enumerate(questions):
        chain_chunk, st = hidden.boundaries(q.qid)
        at = {(int(c), int(k)): i for i, (c, k) in enumerate(chain_chunk)}
        for c in bank[q.qid].chains:
            r = c.rows
            n_main = len(_main_rows(r))
            # The chain as an episode reaches it (the probe's recorded answer at each open
            # boundary), so the extras are the ones the environments compute there.
            for n, rc in enumerate(
                x for x in replay_chain(c, config, question=q) if not r["ext"][x.i]
            ):
                j = rc.i
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
                cols["last"].append(n == n_main - 1)
                cols["correct"].append(bool(c.correct))
                cols["conf"].append(rc.fold.mean_confidence)
                p = r["judge_p_yes"][j]
                cols["p_yes"].append(float("nan") if p is None else float(p))
                values = boundary_extras(
                    rc.fold,
                    tokens=rc.tokens,
                    stopped=r["finish_reason"][j] == "stop",
                    max_tokens=max_tokens,
                )
                for k, v in values.items():
                    extras[k].append(v)
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
