"""The flattened bank a batched replay steps over: per-chunk arrays built once, at construction.

:class:`~env.episode.vector.BatchedReplayEnv` runs episodes as array operations over these
tables: every recorded chunk's cost pieces, current-chain features, answer class and verifier
score (:func:`build_tables`), each question's right answer classes, the ``difficulty`` feature
of every opening chain (:func:`difficulty_table`) and, with hidden-state probes, every chunk's
P(right) (:func:`hidden_tables`). Each is built by walking the bank with the same rules the
single environment steps by (:func:`env.episode.rules.replay_chain`), so the two agree (the
lockstep test in ``tests/env/episode/test_vector.py``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from env.bank.store import TraceBank
from env.episode.config import EnvConfig
from env.episode.hidden import HiddenProbes
from env.episode.observation import (
    CURRENT_CHAIN_FEATURES,
    FEATURE_NAMES,
    N_FEATURES,
    clip01,
    current_chain_features,
)
from env.episode.rules import UNSCORED, replay_chain, verifier_score
from env.generators.replay import ReplayGenerator
from env.types import Chain, PromptMode
from features.answers import answers_equal, normalize_answer

__all__ = [
    "Tables",
    "answer_classes",
    "build_tables",
    "difficulty_table",
    "hidden_tables",
    "int_scale",
    "to_int",
]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_IX = {n: i for i, n in enumerate(FEATURE_NAMES)}
# Features of the current chain alone: one row per recorded chunk, gathered in one go.
_CUR0 = _IX[CURRENT_CHAIN_FEATURES[0]]

_CANONICAL_NUMBER_RE = re.compile(r"-?\d+(?:/\d+)?")


def difficulty_table(bank: TraceBank, questions: Sequence[Any], kmax: int, fn: Any) -> FloatArray:
    """``[Q * kmax]``: the ``difficulty`` feature of an episode of question ``q`` whose opening
    chain is recorded chain ``h`` (entry ``q * kmax + h``; 0.5 without a predictor).

    As :class:`~env.episode.single.ComputeAllocationEnv` computes it: ``fn(question, first_chunk)``
    on the opening chain's first chunk, the very :class:`~env.types.Chunk` that
    :class:`~env.generators.replay.ReplayGenerator` serves for it, clipped to [0, 1].
    """
    out = np.full(len(questions) * kmax, 0.5, np.float64)
    if fn is None:
        return out
    gen = ReplayGenerator(bank)
    mode = cast(PromptMode, bank.manifest.mode)
    for qi, q in enumerate(questions):
        for h in range(bank[q.qid].k):
            (chunk,) = gen.extend([Chain(0, q, mode, [], handle=h)], bank.manifest.chunk_tokens)
            out[qi * kmax + h] = clip01(float(fn(q, chunk)))
    return out


def hidden_tables(
    bank: TraceBank, questions: Sequence[Any], cfg: EnvConfig, probes: HiddenProbes
) -> tuple[FloatArray, FloatArray]:
    """``([N + 1], [Q])``: each recorded chunk's P(right) as the single environment reads it
    after reaching it (entry ``N``, the sentinel: 0.5), and each question's predicted pass rate.

    The chunks are walked in :func:`build_tables`'s order (:func:`replay_chain`, folding the
    signals the probe's extra inputs read, as the single environment folds each chunk); an
    extension chunk reads its chain's last main boundary, as :class:`ReplayGenerator` serves it.
    """
    from env.bank.hidden import require_hidden

    hs = require_hidden(bank)
    probes.check(hs.manifest, where=str(bank.path), what="the environment's hidden-state features")
    layers = hs.layers
    right: list[np.ndarray] = []
    rates = np.empty(len(questions), np.float64)
    for qi, q in enumerate(questions):
        t = bank[q.qid]
        rates[qi] = probes.pass_rate(q.qid, hs.prompt(q.qid), layers)
        states, extras = [], []
        for ct in t.chains:
            r = ct.rows
            for c in replay_chain(ct, cfg, signals=True, question=q):
                states.append(hs.at(q.qid, ct.chain, int(r["chunk"][c.i])))
                extras.append(probes.extras(c.fold, c.tokens, r["finish_reason"][c.i] == "stop"))
        if states:
            right.append(probes.right(q.qid, np.stack(states), layers, extras))
    right.append(np.array([0.5]))
    return np.concatenate(right).astype(np.float64), rates


def int_scale(max_weight: float, k: int) -> int:
    """The binary exponent that turns weights into int64 sums with no overflow (see ``Tables``)."""
    top = max(max_weight, 1e-300) * max(k, 1)
    return 61 - max(0, math.ceil(math.log2(top)) + 1)


def to_int(w: npt.ArrayLike, scale: int) -> IntArray:
    return np.floor(np.ldexp(np.asarray(w, dtype=np.float64), scale)).astype(np.int64)


@dataclass
class Tables:
    """A bank flattened for one :class:`EnvConfig`.

    Chunks are numbered ``0..N-1`` in (question, chain, chunk) order, so a chain's next chunk is
    the next number; entry ``N`` (index ``-1``) is a sentinel read by empty chain slots. Each
    per-chunk array holds what reaching that chunk means: its cost (the chunk and, when the chain
    is still open, its probe), the current-chain features after it, the chain's answer class after
    it, whether it can be continued.

    Answers become per-question integer classes with the equivalence of
    :func:`features.answers.answers_equal` (as :mod:`features.votes` groups them). Vote weights
    (chain confidence, verifier P(yes)) are kept as int64 multiples of ``2**-scale`` so that
    per-answer sums are exact whatever the order of the chains, as ``math.fsum`` makes them in
    :mod:`features.votes`: ties then break exactly as there.
    """

    kmax: int
    n_classes: int
    cbase: IntArray  # [Q, kmax]: number of chunk 0 of each chain
    kq: IntArray  # [Q]: chains recorded per question
    right: BoolArray  # [Q, classes + 1]: the class is a right answer (last column: none)
    names: list[list[str]]  # per question: each class's canonical answer
    # [Q * (n_classes + 1)]: entry q * (n_classes + 1) + c is question q's class c's canonical
    # answer (None for "no answer", class n_classes, and past the question's classes)
    answer_text: npt.NDArray[np.object_]
    step_cost: FloatArray  # priced cost of reaching the chunk (the chunk and its probe)
    step_dec: IntArray  # tokens it decodes (what the token cap counts)
    step_deep: IntArray  # step_dec of a chunk past its chain's own end (budget forcing), else 0
    judge_cost: FloatArray  # priced cost of scoring the chain there
    judge_p: FloatArray  # the verifier score a chain gets there (0.5 when not finite)
    judge_int: IntArray
    answer: IntArray  # class of the chain's answer there; n_classes for none
    conf_int: IntArray  # the chain's vote weight for confidence voting
    cont_ok: BoolArray  # the chain can be continued (before the token cap is checked)
    ended: IntArray  # 1 if the chain has ended there
    obs: npt.NDArray[np.float32]  # [N + 1, N_FEATURES]: the current-chain features there
    conf_scale: int
    ver_scale: int


def answer_classes(
    answers: Sequence[str], gold: str | None, qid: str
) -> tuple[dict[str, int], list[str]]:
    """Answer classes of one question: canonical answer -> class, and each class's name.

    Numbers within ``answers_equal``'s tolerance chain into one class in sorted order, as
    :func:`features.votes.vote_counts` groups them. That grouping is the same for every subset of
    the answers (what an episode holds) when equality is transitive on them; it is checked.
    """
    keys = list(dict.fromkeys(a for a in [*answers, gold] if a is not None))
    numbers = sorted((Fraction(k), k) for k in keys if _CANONICAL_NUMBER_RE.fullmatch(k))
    joins: dict[str, str] = {}
    for (_, a), (_, b) in pairwise(numbers):
        if answers_equal(a, b):
            joins[b] = joins.get(a, a)
    cls: dict[str, int] = {}
    names: list[str] = []
    for k in keys:
        root = joins.get(k, k)
        if root not in cls:
            cls[root] = len(names)
            names.append(root)
        cls[k] = cls[root]
    members: dict[int, list[str]] = {}
    for k in keys:
        members.setdefault(cls[k], []).append(k)
    for group in members.values():
        if len(group) > 2 and not all(answers_equal(a, b) for a in group for b in group):
            log.warning(
                "question %r: answers %s are equal only through each other (numeric tolerance); "
                "an episode holding some of them may group them differently from the vectorised "
                "replay",
                qid,
                group,
            )
    return cls, names


def build_tables(bank: TraceBank, questions: Sequence[Any], cfg: EnvConfig) -> Tables:
    traces = [bank[q.qid] for q in questions]
    kmax = max(t.k for t in traces)
    nq = len(traces)
    cbase = np.zeros((nq, kmax), np.int64)
    kq = np.array([t.k for t in traces], np.int64)
    right_classes: list[list[int]] = []
    names: list[list[str]] = []
    fields = ("gen", "probe", "inj", "prefill", "jpre", "jp", "ans", "conf", "ok", "deep", "cur")
    cols: dict[str, list[Any]] = {k: [] for k in fields}
    for qi, t in enumerate(traces):
        raw_answers: list[str | None] = []
        for h, ct in enumerate(t.chains):
            cbase[qi, h] = len(cols["gen"])
            r = ct.rows
            # Each chunk as the single env reaches it, by the same rules.
            for c in replay_chain(ct, cfg, question=t.question):
                i, fold, probed = c.i, c.fold, c.probed
                n, inj = int(r["n_tokens"][i]), int(r["n_injected"][i])
                raw_answers.append(fold.answer)
                cols["gen"].append(n - inj)
                cols["inj"].append(inj)
                cols["probe"].append(int(r["probe_tokens"][i]) if probed else 0)
                cols["prefill"].append(
                    int(r["prefill"][i]) + (int(r["probe_prefill"][i]) if probed else 0)
                )
                cols["jpre"].append(int(r["judge_prefill"][i]))
                cols["jp"].append(verifier_score(float(r["judge_p_yes"][i])))
                cols["ans"].append(fold.answer)
                cols["conf"].append(fold.confidence_weight)
                cols["ok"].append(c.can_continue)
                cols["deep"].append(fold.extensions > 0)
                cols["cur"].append(
                    current_chain_features(fold, tokens=c.tokens, ended=c.ended, config=cfg)
                )
        gold_key = normalize_answer(t.question.gold)
        cls, qnames = answer_classes(
            [a for a in raw_answers if a is not None], gold_key, t.question.qid
        )
        # Number the classes by how often chunks hold them: the vote cells episodes touch then
        # crowd into the first rows of the vote tables (a class's number means nothing else).
        start = int(cbase[qi, 0])
        ids = [-1 if a is None else cls[a] for a in cols["ans"][start:]]
        freq = np.bincount([i for i in ids if i >= 0], minlength=len(qnames))
        rank = np.empty(len(qnames), np.int64)
        rank[np.argsort(-freq, kind="stable")] = np.arange(len(qnames))
        cols["ans"][start:] = [-1 if i < 0 else int(rank[i]) for i in ids]
        names.append([qnames[i] for i in np.argsort(-freq, kind="stable")])
        # Every class the question's own rule calls right: the gold answer's (numbers within
        # tolerance are joined into it above), the classes math-verify finds equal to it on
        # symbolic data sets, or a code question's accepted behaviour classes.
        right_classes.append(sorted({int(rank[cls[a]]) for a in cls if t.question.is_right(a)}))
    n_classes = max(len(x) for x in names)
    ans = np.array([*cols["ans"], -1], np.int64)
    ans[ans < 0] = n_classes
    right = np.zeros((nq, n_classes + 1), np.bool_)
    for qi, good in enumerate(right_classes):
        right[qi, good] = True
    answer_text = np.full(nq * (n_classes + 1), None, object)
    for qi, qnames in enumerate(names):
        answer_text[qi * (n_classes + 1) : qi * (n_classes + 1) + len(qnames)] = qnames

    def arr(name: str, fill: float = 0, dtype: Any = np.int64) -> Any:
        return np.array([*cols[name], fill], dtype)

    conf = arr("conf", 0.0, np.float64)
    jp = arr("jp", UNSCORED, np.float64)
    conf_scale = int_scale(float(conf.max()), kmax)
    ver_scale = int_scale(1.0, kmax)
    step = {k: arr(k) for k in ("gen", "probe", "inj", "prefill")}
    step_dec = step["gen"] + step["probe"] + step["inj"]
    pr = cfg.prices
    obs = np.zeros((len(cols["cur"]) + 1, N_FEATURES), np.float32)
    obs[:-1, _CUR0 : _CUR0 + len(CURRENT_CHAIN_FEATURES)] = cols["cur"]
    obs[:, _IX["difficulty"]] = 0.5
    return Tables(
        kmax=kmax,
        n_classes=n_classes,
        cbase=cbase,
        kq=kq,
        right=right,
        names=names,
        answer_text=answer_text,
        # Priced term by term in Prices.cost's order: with integer prices the sums are exact.
        step_cost=(
            pr.generated * step["gen"]
            + pr.probe * step["probe"]
            + pr.judge * 0
            + pr.injected * step["inj"]
            + pr.prefill * step["prefill"]
        ),
        step_dec=step_dec,
        step_deep=np.where(arr("deep", False, np.bool_), step_dec, 0),
        judge_cost=pr.judge * 1 + pr.prefill * arr("jpre"),
        judge_p=jp,
        judge_int=to_int(jp, ver_scale),
        answer=ans,
        conf_int=to_int(conf, conf_scale),
        cont_ok=arr("ok", False, np.bool_),
        ended=obs[:, _IX["cur_ended"]].astype(np.int64),
        obs=obs,
        conf_scale=conf_scale,
        ver_scale=ver_scale,
    )
