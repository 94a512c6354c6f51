"""The data model that flows through ponder: questions, chains and their chunks, token accounting,
sampling settings, probe and verifier results."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from features.confidence import token_confidence, token_entropy
from features.errors import ConfigError

__all__ = [
    "CODE_DATASETS",
    "SHORT_ANSWER_DATASETS",
    "SYMBOLIC_DATASETS",
    "FinishReason",
    "INJECT_ALLOWANCE",
    "PromptMode",
    "TokenUsage",
    "SamplingConfig",
    "BudgetForcing",
    "TipConfig",
    "Question",
    "FloatArray",
    "IntArray",
    "token_stats",
    "Chunk",
    "Chain",
    "ProbeResult",
    "JudgeResult",
]

#: Why a chunk ended. ``length``: the chunk reached ``k`` tokens (the chain may go on);
#: ``stop``: the model ended the chain (EOS or a stop string); ``forced``: budget forcing ended the
#: chain by forcing a final answer; ``cap``: the chain reached its token cap without an answer.
FinishReason = Literal["length", "stop", "forced", "cap"]

#: Data sets whose answers are programs, read and graded by running them (:mod:`env.code`).
CODE_DATASETS = frozenset({"humaneval"})

#: Data sets of short factual questions, whose replies are read for a short answer (a name, a
#: date) rather than a number (:func:`features.answers.extract_short_answer`).
SHORT_ANSWER_DATASETS = frozenset({"factual"})

#: Data sets whose answers are compared symbolically as well (math-verify,
#: :func:`features.answers.symbolic_equal`): competition math, where equal values are often
#: written differently.
SYMBOLIC_DATASETS = frozenset({"math500"})

#: Tokens budgeted for an injected ``Wait,`` when budget forcing continues an ended chain.
INJECT_ALLOWANCE = 16

#: Prompt style. ``cot``: ordinary step-by-step reasoning; ``draft``: Chain-of-Draft (terse steps).
PromptMode = Literal["cot", "draft"]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Exact token accounting, additive.

    Attributes:
        generated: tokens sampled into chains.
        prefill: prompt tokens the engine computed (not served from the prefix cache).
        cached: prompt tokens served from the prefix cache (free or nearly so).
        probe: tokens sampled by answer-forcing probes (their prefill is counted in ``prefill``).
        injected: tokens ponder appended to chains itself (``Wait,``, answer-forcing suffixes).
        judge: tokens sampled by the generative self-verifier.
    """

    generated: int = 0
    prefill: int = 0
    cached: int = 0
    probe: int = 0
    injected: int = 0
    judge: int = 0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self))
        )

    @property
    def total(self) -> int:
        """Every token the engine processed or produced, cached prompt tokens excluded."""
        return self.generated + self.prefill + self.probe + self.injected + self.judge

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """How chains are sampled.

    Attributes:
        temperature: sampling temperature (0 means greedy).
        top_p: nucleus sampling mass.
        top_logprobs: how many top alternatives to keep per token (at least 5 by default; the
            confidence features need them).
        max_chain_tokens: hard cap on the generated tokens of one chain.
    """

    temperature: float = 0.7
    top_p: float = 1.0
    top_logprobs: int = 5
    max_chain_tokens: int = 512

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_logprobs < 1:
            raise ConfigError(f"top_logprobs must be >= 1, got {self.top_logprobs}")
        if self.max_chain_tokens < 1:
            raise ConfigError(f"max_chain_tokens must be >= 1, got {self.max_chain_tokens}")


@dataclass(frozen=True, slots=True)
class BudgetForcing:
    """s1-style budget forcing for a chain.

    A chain that ends before ``min_tokens`` gets ``wait_text`` appended and goes on; a chain that
    reaches ``max_tokens`` gets the answer-forcing suffix appended and a short final answer read.

    Attributes:
        min_tokens: below this many generated tokens, an ending is suppressed with ``wait_text``.
        max_tokens: at this many generated tokens, the final answer is forced.
        wait_text: what is appended to suppress an ending.
        answer_tokens: how many tokens the forced final answer may take.
    """

    min_tokens: int = 0
    max_tokens: int = 512
    wait_text: str = "Wait,"
    answer_tokens: int = 16

    def __post_init__(self) -> None:
        if self.min_tokens < 0 or self.max_tokens < 1 or self.min_tokens > self.max_tokens:
            raise ConfigError(
                f"budget forcing needs 0 <= min_tokens <= max_tokens and max_tokens >= 1, "
                f"got min_tokens={self.min_tokens}, max_tokens={self.max_tokens}"
            )
        if self.answer_tokens < 1:
            raise ConfigError(f"answer_tokens must be >= 1, got {self.answer_tokens}")


@dataclass(frozen=True, slots=True)
class TipConfig:
    """Thought-switching penalty (TIP): lower the logits of switch tokens early in a thought.

    Attributes:
        penalty: how much to subtract from the logits of switch tokens (lambda; 0 disables).
        window: for how many tokens after the start of a thought (the last switch, or the chain's
            start) the penalty applies.
        words: words that open a new thought; every token that starts one of them is penalised.
    """

    penalty: float = 3.0
    window: int = 600
    words: tuple[str, ...] = ("Alternatively", " Alternatively", "Wait", " Wait", "Hmm", " Hmm")

    def __post_init__(self) -> None:
        if self.penalty < 0:
            raise ConfigError(f"TIP penalty must be >= 0, got {self.penalty}")
        if self.window < 0:
            raise ConfigError(f"TIP window must be >= 0, got {self.window}")


@dataclass(frozen=True, slots=True)
class Question:
    """One question of a data set.

    Attributes:
        qid: stable id within its data set (for example ``gsm8k/test/17``).
        text: the question as shown to the model.
        gold: the reference answer (``None`` when unknown: correctness cannot be scored).
        dataset: data set name (``gsm8k``, ``math``, ``arith``, ...).
        difficulty: a difficulty level when the data set has one (MATH level, testbed level).
        context: the conversation before the question, as ``(role, content)`` pairs in order
            (``system``, ``user``, ``assistant``): a chat client's system prompt and earlier
            turns. They go through the model's chat template ahead of the question (a system
            message replaces the template's own); empty for data-set questions.
        accepted: canonical answers judged right by other means than equality with ``gold``.
            Factual questions carry their answer's aliases; code questions carry the behaviour
            classes whose programs pass the hidden unit tests (from a bank's execution results, :mod:`env.code`); when it is given (even
            empty: no class is right) it alone decides correctness (:func:`features.answers.judged_correct`). Like ``gold``
            it is for scoring only: no policy reads it.
    """

    qid: str
    text: str
    gold: str | None = None
    dataset: str = ""
    difficulty: int | None = None
    context: tuple[tuple[str, str], ...] = ()
    accepted: tuple[str, ...] | None = None

    @property
    def is_code(self) -> bool:
        """Whether the answer is a program, read and graded by running it (:mod:`env.code`)."""
        return self.dataset in CODE_DATASETS

    @property
    def scorable(self) -> bool:
        """Whether correctness can be scored: a gold answer or accepted answers exist."""
        return self.gold is not None or self.accepted is not None

    def is_right(self, answer: str | None) -> bool:
        """Whether ``answer`` is right for this question (:func:`features.answers.judged_correct`)."""
        from features.answers import judged_correct

        return judged_correct(
            answer, self.gold, self.accepted, symbolic=self.dataset in SYMBOLIC_DATASETS
        )


FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]


def token_stats(top_logprobs: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Per-token confidence and entropy from top-``m`` log-probabilities of shape ``[n, m]``.

    Confidence is DeepConf's ``-mean`` of the top-``m`` log-probabilities (higher = more
    confident); entropy is that of the top-``m`` probabilities renormalised to sum to one
    (:func:`features.confidence.token_confidence` and :func:`~features.confidence.token_entropy`).
    Missing entries (``-inf``) are ignored; rows with none give ``nan``, and so does every row
    of an input that is not ``[n, m]`` with ``m >= 1``.
    """
    lp = np.asarray(top_logprobs, dtype=np.float32)
    if lp.ndim != 2 or lp.shape[1] == 0:
        n = lp.shape[0] if lp.ndim >= 1 else 0
        nan = np.full(n, np.nan, dtype=np.float32)
        return nan, nan.copy()
    return token_confidence(lp), token_entropy(lp)


@dataclass(slots=True)
class Chunk:
    """One piece of a chain: at most ``k`` tokens sampled in one step.

    Attributes:
        token_ids: ids of the tokens in the chunk (injected tokens first, if any), shape ``[n]``.
        text: their text.
        logprobs: log-probability of each token under the sampler, shape ``[n]``; injected tokens
            have ``nan`` here (they were not sampled).
        top_logprobs: top-``m`` log-probabilities at each position, descending, shape ``[n, m]``.
        top_token_ids: their token ids, shape ``[n, m]``.
        finish_reason: why the chunk ended (see :data:`FinishReason`).
        usage: tokens this chunk cost.
        n_injected: how many leading tokens ponder appended itself rather than sampled.
        confidence: per-token confidence, ``-mean(top_logprobs)`` (DeepConf), shape ``[n]``;
            filled from ``top_logprobs`` when not given (a replayed bank stores it instead).
        entropy: per-token entropy of the renormalised top-``m`` distribution, shape ``[n]``.
        hidden: the model's state after the chunk's last token, reduced as the generator's
            ``traits.hidden`` says (:class:`~env.bank.hidden.HiddenManifest`: layers, projected
            dimensions), float32 ``[n_layers, dims]``; ``None`` unless the generator captures
            states (a replayed annotated bank, or a live engine behind
            :class:`~env.generators.capture.Capturing`).
    """

    token_ids: IntArray
    text: str
    logprobs: FloatArray
    top_logprobs: FloatArray
    top_token_ids: IntArray
    finish_reason: FinishReason
    usage: TokenUsage
    n_injected: int = 0
    confidence: FloatArray | None = None
    entropy: FloatArray | None = None
    hidden: FloatArray | None = None

    def __post_init__(self) -> None:
        if self.confidence is None or self.entropy is None:
            conf, ent = token_stats(self.top_logprobs)
            if self.confidence is None:
                self.confidence = conf
            if self.entropy is None:
                self.entropy = ent

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass(slots=True)
class Chain:
    """A reasoning chain: a prompt and the chunks generated after it.

    Held by the caller; a generator appends chunks. ``handle`` is the generator's own reference
    (a recorded chain index for replay, unused by live generators).

    Attributes:
        chain_id: unique within a question's episode.
        question: the question this chain answers.
        mode: prompt style.
        prompt_ids: the tokens of the prompt.
        chunks: what was generated, in order.
        finished: ``True`` once the model ended the chain or the budget forced an answer.
        finish_reason: why the last chunk ended.
        parent: ``chain_id`` of the chain it branched from, if any.
        branch_point: generated-token offset in the parent where it branched.
        budget: budget forcing, if any.
        handle: the generator's own reference.
        prompt_hidden: the model's state at the prompt's last token, reduced as the chunks'
            ``hidden`` (``None`` unless the generator captures states).
    """

    chain_id: int
    question: Question
    mode: PromptMode
    prompt_ids: list[int]
    chunks: list[Chunk] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    parent: int | None = None
    branch_point: int | None = None
    budget: BudgetForcing | None = None
    handle: int | None = None
    #: For branches: the parent's generated tokens and text before ``branch_point``.
    prefix_ids: list[int] = field(default_factory=list)
    prefix_text: str = ""
    prompt_hidden: FloatArray | None = None

    @property
    def token_ids(self) -> list[int]:
        """All generated tokens (a branch's inherited prefix included)."""
        out = list(self.prefix_ids)
        for c in self.chunks:
            out.extend(int(t) for t in c.token_ids)
        return out

    @property
    def num_tokens(self) -> int:
        return len(self.prefix_ids) + sum(len(c) for c in self.chunks)

    @property
    def text(self) -> str:
        return self.prefix_text + "".join(c.text for c in self.chunks)

    @property
    def usage(self) -> TokenUsage:
        total = TokenUsage()
        for c in self.chunks:
            total = total + c.usage
        return total


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of an answer-forcing probe on a chain.

    Attributes:
        chain_id: the probed chain.
        at_tokens: the chain's length when probed.
        text: the completion after the suffix (for example ``42}``).
        answer: the answer read from it, ``None`` when nothing could be read.
        logprobs: per-token log-probabilities of the completion.
        usage: what the probe cost (its generated tokens are in ``probe``).
    """

    chain_id: int
    at_tokens: int
    text: str
    answer: str | None
    logprobs: FloatArray
    usage: TokenUsage


@dataclass(frozen=True, slots=True)
class JudgeResult:
    """A verifier's verdict on a chain (the self-verifier's, or a PRM's).

    Attributes:
        chain_id: the judged chain.
        at_tokens: the chain's length when judged.
        p_yes: probability mass on "yes" among yes/no answers, in [0, 1].
        usage: what it cost (its sampled token is in ``judge``).
    """

    chain_id: int
    at_tokens: int
    p_yes: float
    usage: TokenUsage
