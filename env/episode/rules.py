"""The rules of an episode, written once: pure functions over one chain's state.

Every implementation of an episode applies these and no copy of them:
:class:`~env.episode.single.ComputeAllocationEnv` on live chains one step at a time,
:class:`~env.episode.vector.BatchedReplayEnv` on every recorded chunk of a bank at once (its tables
are built with them, and its action mask is :func:`action_mask` on arrays),
:mod:`policies.evaluation.oracle` on recorded chains, and
:class:`~env.generators.replay.ReplayGenerator`, which ends a recorded chain with
:func:`replay_chain_end`. ``tests/env/episode/test_vector.py`` runs the first two side by side.

A chain's state is a :class:`ChainFold`: what its chunks so far add up to (confidences, entropies,
thought switches, probe answers, its answer). :func:`fold_chunk` and :func:`fold_answer` fold one
more chunk into it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from env.episode.config import Action, EnvConfig
from env.types import SHORT_ANSWER_DATASETS, Question
from features.answers import extract_answer, extract_short_answer, normalize_answer
from features.probes import switch_count

if TYPE_CHECKING:
    from env.bank.store import ChainTrace

__all__ = [
    "text_reader",
    "ended_in_thinking",
    "INFO_KEYS",
    "REASONS",
    "UNSCORED",
    "ChainFold",
    "Reason",
    "ReplayedChunk",
    "action_mask",
    "can_continue",
    "fold_answer",
    "fold_chunk",
    "reason_text",
    "replay_chain",
    "replay_chain_end",
    "replay_has_chunk",
    "unavailable_reason",
    "verifier_score",
]


# -- a chain's state -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class ChainFold:
    """What a chain's chunks so far add up to (what the observation and the votes read).

    Attributes:
        probes: the normalised answers of its probes, oldest first.
        answer: its answer: the final one once it has ended, else its latest probe's.
        history: its answer after each boundary so far (:func:`fold_answer`), oldest first.
        extensions: chunks it was continued past its end (budget forcing).
        conf_sum: the sum of its finite token confidences.
        conf_n: how many there were.
        chunk_conf: each chunk's mean finite token confidence (chunks with none are skipped).
        chunk_entropy: each chunk's mean finite token entropy (likewise).
        switches: thought switches in its text.
        right: the chain-correctness probe's P(right) at its latest boundary (0.5 until a probe
            reads it; :mod:`env.episode.hidden`).
    """

    probes: list[str | None] = field(default_factory=list)
    answer: str | None = None
    history: list[str | None] = field(default_factory=list)
    extensions: int = 0
    conf_sum: float = 0.0
    conf_n: int = 0
    chunk_conf: list[float] = field(default_factory=list)
    chunk_entropy: list[float] = field(default_factory=list)
    switches: int = 0
    right: float = 0.5

    @property
    def mean_confidence(self) -> float:
        """Mean token confidence (DeepConf); NaN before any finite one."""
        return self.conf_sum / self.conf_n if self.conf_n else float("nan")

    @property
    def confidence_weight(self) -> float:
        """The chain's weight in confidence voting: its mean confidence, 0 when unknown."""
        mean = self.mean_confidence
        return mean if math.isfinite(mean) else 0.0


def fold_chunk(
    s: ChainFold, text: str, confidence: npt.ArrayLike | None, entropy: npt.ArrayLike | None
) -> None:
    """Fold one chunk's token confidences, entropies and thought switches into ``s``.

    Confidences and entropies are read as float64 (a replayed chunk's are the bank's float16 as
    float32); NaN entries (no log-probabilities) are skipped.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ent = np.asarray(entropy, dtype=np.float64)
    ok = np.isfinite(conf)
    if ok.any():
        s.conf_sum += float(conf[ok].sum())
        s.conf_n += int(ok.sum())
        s.chunk_conf.append(float(conf[ok].mean()))
    oke = np.isfinite(ent)
    if oke.any():
        s.chunk_entropy.append(float(ent[oke].mean()))
    s.switches += switch_count(text)


def fold_answer(
    s: ChainFold,
    *,
    final_text: str | None,
    probe: Callable[[], str | None] | None,
    read: Callable[[str], str | None] | None = None,
) -> bool:
    """Set the chain's answer after a chunk (and add it to its ``history``); return whether it
    was probed.

    Args:
        s: the chain's state.
        final_text: the chain's whole text if the chunk ended it (its answer is then the final
            answer in it), ``None`` while it is open.
        probe: what probing the open chain answers (called only then), or ``None`` when the env
            does not probe (an open chain then keeps its answer).
        read: how an ended chain's text is read (default: the math answer in it,
            :func:`features.answers.extract_answer`; code questions read the behaviour class of
            the program in it, :mod:`env.code.grade`).
    """
    probed = False
    if final_text is not None:
        raw = read(final_text) if read is not None else extract_answer(final_text)
        s.answer = normalize_answer(raw)
    elif probe is not None:
        s.answer = normalize_answer(probe())
        s.probes.append(s.answer)
        probed = True
    s.history.append(s.answer)
    return probed


#: The verifier score of a chain not scored (yet), in the features and in verifier voting.
UNSCORED = 0.5


def verifier_score(p_yes: float) -> float:
    """The score a chain keeps from a verification: P(yes), or :data:`UNSCORED` when not finite."""
    return p_yes if math.isfinite(p_yes) else UNSCORED


def can_continue(
    *,
    ended: bool,
    finish_reason: str | None,
    past_end: bool,
    extensions: int,
    tokens: int,
    config: EnvConfig,
) -> bool:
    """Whether the episode's rules let a chain be continued (the generator's edge and the token
    cap are checked apart: ``generator.can_extend`` and :func:`action_mask`).

    Args:
        ended: the chain has ended.
        finish_reason: why its last chunk ended.
        past_end: it has ended, or it was continued past an end (budget forcing).
        extensions: times it was continued past an end.
        tokens: its tokens so far.
        config: the episode's settings.
    """
    if ended and finish_reason != "stop":
        return False  # the token cap or a forced answer ended it
    if past_end and extensions >= config.extension_chunks:
        return False
    return past_end or tokens < config.max_chain_tokens


# -- what can run, and why not -------------------------------------------------------------------


class Reason(enum.IntEnum):
    """Why an episode ended: ``info["reason_code"]`` in both environments; :data:`REASONS` words
    each (``info["reason"]``). The unavailable-action reasons are :func:`unavailable_reason`'s."""

    NONE = 0  # the episode has not ended
    STOP = 1
    TOKEN_CAP = 2
    MAX_STEPS = 3
    NO_CONTINUE = 4
    MAX_CHAINS = 5
    NO_CHAINS = 6
    NO_VERIFY = 7
    NO_CHAIN_YET = 8
    TIME_CAP = 9
    GENERATOR_EDGE = 10


#: The words of each :class:`Reason`, by code; :func:`reason_text` fills them in.
REASONS: tuple[str, ...] = (
    "",
    "stop",
    "token cap",
    "max steps",
    "the current chain cannot be continued",
    "max_chains ({max_chains}) reached",
    "the generator has no more chains for this question",
    "nothing new to verify",
    "no chain yet: branch first",
    "time cap",
    "generator edge: {detail}",
)
assert len(REASONS) == len(Reason)


#: The ``info`` keys both environments give, and what they mean in both. The single environment
#: gives one value; :class:`~env.episode.vector.BatchedReplayEnv` an array with one entry per
#: episode, and the keys after ``cost_delta`` only for the episodes that ended on the step (the
#: mask ``info["_<key>"]``). Each environment's docstring lists the keys only it gives.
INFO_KEYS: dict[str, str] = {
    "action_mask": "which of continue, branch, verify, stop can run now (bool [4])",
    "correct_now": "whether stopping now would be correct (None without a gold answer)",
    "cost_delta": "the priced cost this step's reward charges (-lam * cost_delta)",
    "correct": "whether the answer equals the gold answer",
    "answer": (
        "the aggregated answer, normalised (None for none); the batched replay gives its "
        "answer class's canonical text, equal to it under features.answers.answers_equal"
    ),
    "reason_code": "why the episode ended: a Reason (int)",
    "reason": "the same in words (reason_text; a generator edge adds the generator's message)",
    "return": "correct_reward * correct - lam * cost",
    "cost": "the priced cost of the episode",
    "decoded": "decoded tokens (what token_cap counts)",
    "tokens_base": (
        "decoded tokens of the first chain's chunks up to its own end, with their probes; "
        "decoded - tokens_base - tokens_deep - tokens_wide is the verifier's (a token per chain "
        "scored)"
    ),
    "tokens_deep": (
        "decoded tokens of the chunks reached past a chain's own end (budget forcing: thinking "
        "longer), with their probes"
    ),
    "tokens_wide": (
        "decoded tokens of the other chains' chunks up to their own ends (sampling wider), with "
        "their probes"
    ),
    "steps": "decisions taken",
    "chains": "chains started",
}


def reason_text(code: int, config: EnvConfig, detail: str = "") -> str:
    """``info["reason"]``: the words of reason ``code`` (``detail``: the generator's message)."""
    return REASONS[code].format(max_chains=config.max_chains, detail=detail)


def action_mask(
    *,
    cur_can_continue: Any,
    chains: Any,
    chains_left: Any,
    to_verify: Any,
    can_judge: bool,
    room: Any,
    config: EnvConfig,
) -> tuple[Any, Any, Any]:
    """Whether continue, branch and verify can run (stop always can).

    Every argument but ``config`` and ``can_judge`` is a scalar, or an array with one entry per
    episode (the answers are then arrays).

    Args:
        cur_can_continue: the current chain can be continued (:func:`can_continue` and the
            generator's edge; false without a chain).
        chains: chains started.
        chains_left: the generator can start another chain for the question.
        to_verify: chains whose end changed since the verifier last scored them.
        can_judge: the verifier (or the generator's self-verification) can score chains.
        room: decoded tokens the token cap leaves.
        config: the episode's settings.
    """
    cont = cur_can_continue & (room >= config.bound(Action.CONTINUE))
    branch = (chains < config.max_chains) & (room >= config.bound(Action.BRANCH)) & chains_left
    verify = (to_verify > 0) & (room >= config.bound(Action.VERIFY, to_verify)) & can_judge
    return cont, branch, verify


def unavailable_reason(
    action: Any, *, chains: Any, room: Any, to_verify: Any, config: EnvConfig
) -> Any:
    """Why ``action``, masked by :func:`action_mask`, cannot run (with the same arguments): a
    :class:`Reason` code; scalars, or arrays with one entry per episode (the answer is then an
    array; a 0-d one for scalars)."""
    cont = np.where(
        chains == 0,
        Reason.NO_CHAIN_YET,
        np.where(room < config.bound(Action.CONTINUE), Reason.TOKEN_CAP, Reason.NO_CONTINUE),
    )
    branch = np.where(
        chains >= config.max_chains,
        Reason.MAX_CHAINS,
        np.where(room < config.bound(Action.BRANCH), Reason.TOKEN_CAP, Reason.NO_CHAINS),
    )
    verify = np.where(to_verify == 0, Reason.NO_VERIFY, Reason.TOKEN_CAP)
    return np.where(
        action == Action.CONTINUE, cont, np.where(action == Action.BRANCH, branch, verify)
    )


# -- replayed chains -----------------------------------------------------------------------------


def replay_has_chunk(ct: ChainTrace, i: int) -> bool:
    """Whether the bank holds chunk ``i`` of the recorded chain (sampled or budget-forced)."""
    return i < ct.n_chunks


def replay_chain_end(ct: ChainTrace, i: int, wants_more: bool | None = None) -> tuple[bool, str]:
    """Whether a replayed chain has ended after its chunk ``i``, and its finish reason.

    Args:
        ct: the recorded chain.
        i: the chunk it has just reached.
        wants_more: whether the chain's budget forcing still asks for tokens after the chunk
            (``chain.num_tokens < chain.budget.min_tokens``). ``None``: as the env forces
            budgets: chunks past the sampled end are reached only by asking for one more token
            than the chain had, so the chain wants more only if such a chunk brought no token.
            The rule then needs no episode state.
    """
    r = ct.rows
    fr = str(r["finish_reason"][i])
    if wants_more is None:
        wants_more = i >= ct.n_main and int(r["n_tokens"][i]) == 0
    if fr in ("cap", "forced"):
        return True, fr
    if i == ct.n_main - 1 and ct.finish_reason == "stop":
        return not wants_more, fr
    if i == ct.n_main - 1 or i + 1 >= ct.n_chunks:
        # the recording ended here (token cap, or the end of a budget-forced extension)
        if wants_more:
            return False, fr
        return True, "cap" if fr == "length" else fr
    return False, fr


@dataclass(slots=True)
class ReplayedChunk:
    """A recorded chain after its chunk ``i``, as an episode that opened it and continued it
    ``i`` times holds it.

    Attributes:
        i: the chunk.
        tokens: the chain's tokens so far.
        ended: it has ended.
        finish_reason: why the chunk ended.
        probed: the env probed it after the chunk.
        can_continue: it can be continued (the bank holds a next chunk and
            :func:`can_continue` allows it; the token cap is checked apart).
        fold: its state (one object, updated in place as the walk goes on).
    """

    i: int
    tokens: int
    ended: bool
    finish_reason: str
    probed: bool
    can_continue: bool
    fold: ChainFold


def text_reader(question: Question) -> Callable[[str], str | None]:
    """How the ended chain of a (non-code) question is read: the math answer in it
    (:func:`features.answers.extract_answer`), or for short factual questions the short answer
    (:func:`features.answers.extract_short_answer`). Code is read by running it
    (:mod:`env.code.grade`)."""
    return extract_short_answer if question.dataset in SHORT_ANSWER_DATASETS else extract_answer


def ended_in_thinking(text: str, thinking_end: str | None) -> bool:
    """Whether a chain that has ended did so inside its thinking section: the model has one
    (``thinking_end``, :attr:`env.generators.base.GeneratorTraits.thinking_end`) and the chain
    has not written its closing marker. That happens where a recording ended a chain at the
    model's own end of thinking (suppressed, so that budget forcing can go on from there) or
    at the end of a budget-forced extension. Its answer is then what closing the section gives:
    the answer-forcing probe at that point (which closes the section first), the recorded
    boundary's ``probe_answer`` in a bank; like any final answer it is not charged as a probe.
    """
    return thinking_end is not None and thinking_end not in text


def replay_chain(
    ct: ChainTrace,
    config: EnvConfig,
    *,
    signals: bool = True,
    question: Question | None = None,
) -> Iterator[ReplayedChunk]:
    """Walk a recorded chain chunk by chunk as the env reaches it (opened, then continued past
    its end as far as the bank holds budget-forced chunks).

    Args:
        ct: the recorded chain.
        config: the episode's settings (probing, chain cap, extensions).
        signals: fold the confidences, entropies and switches too (``False``: answers only).
        question: the question the chain answers, which says how its end is read
            (:func:`text_reader`; default: math). A code question's final answer is the one
            the recorder graded (the behaviour class of its program, :mod:`env.code.grade`),
            read from the bank rather than by running the program again.
    """
    r = ct.rows
    fold = ChainFold()
    tokens = 0
    text = ""
    read: Callable[[str], str | None] | None = None
    if question is not None:
        read = (lambda _text: ct.answer) if question.is_code else text_reader(question)
    for i in range(ct.n_chunks):
        tokens += int(r["n_tokens"][i])
        text += r["text"][i]
        ended, reason = replay_chain_end(ct, i)
        if signals:
            fold_chunk(
                fold,
                r["text"][i],
                np.asarray(r["confidence"][i], np.float32),
                np.asarray(r["entropy"][i], np.float32),
            )
        end_read = read
        if ended and ended_in_thinking(text, ct.thinking_end):
            end_read = _recorded_read(r["probe_answer"][i])
        probed = fold_answer(
            fold,
            final_text=text if ended else None,
            probe=_recorded(r["probe_answer"][i]) if config.probe else None,
            read=end_read,
        )
        fold.extensions = max(0, i + 1 - ct.n_main)
        ok = replay_has_chunk(ct, i + 1) and can_continue(
            ended=ended,
            finish_reason=reason,
            past_end=ended or i >= ct.n_main,
            extensions=fold.extensions,
            tokens=tokens,
            config=config,
        )
        yield ReplayedChunk(i, tokens, ended, reason, probed, ok, fold)


def _recorded(answer: str | None) -> Callable[[], str | None]:
    """A probe that answers what the bank recorded."""
    return lambda: answer


def _recorded_read(answer: str | None) -> Callable[[str], str | None]:
    """A reader of an ended chain that answers what the bank recorded."""
    return lambda _text: answer
