"""The one :class:`Generator` protocol and the typed records that flow through it.

A generator owns an LLM engine (in-process vLLM, a vLLM OpenAI-compatible server, a recorded trace
bank, or a scripted fake) and exposes the operations a compute controller needs:

======================  ===================================================================
operation               meaning
======================  ===================================================================
``start``               new chains for a question (independent samples from the prompt)
``extend``              continue each given chain by one chunk of at most ``k`` tokens
``branch``              new chains from the prompt or from a prefix of an existing chain
``probe``               append an answer-forcing suffix, read a short greedy completion,
                        leave the chain untouched (Dynasor-style probe)
``judge``               ask the same model whether a chain is correct so far: P(yes)
======================  ===================================================================

Chains are plain dataclasses held by the caller; generators append :class:`Chunk` records to them.
Every record carries exact token accounting in a :class:`TokenUsage`.

What callers read of a generator besides these operations is declared on the protocol too: its
:class:`GeneratorTraits` (``traits``: fixed for its life) and what it has left in an episode
(``ahead``, ``remaining_chains``, ``can_extend``). :class:`GeneratorBase` gives every generator
their defaults, so that a generator says only where it differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from env.types import (
    BudgetForcing,
    Chain,
    Chunk,
    JudgeResult,
    ProbeResult,
    PromptMode,
    Question,
    SamplingConfig,
    TipConfig,
)
from features.errors import ConfigError

__all__ = [
    "Generator",
    "GeneratorBase",
    "GeneratorTraits",
    "GeneratorWrapper",
    "validate_count",
    "validate_k",
    "validate_question",
]


@dataclass(frozen=True, slots=True)
class GeneratorTraits:
    """What a generator can do, fixed for its life (``generator.traits``).

    Attributes:
        chunk_tokens: the one chunk size it serves (a replayed bank's: the env must use it), or
            ``None``: any size (a live engine).
        splits_chunks: :meth:`Generator.split_chunk` cuts a chunk into the ones it would have
            returned one call at a time (read-ahead needs it: a live generator).
        thread_safe: concurrent questions may call it at once (the controller locks any other).
        can_judge: :meth:`Generator.judge` can run (a bank recorded without verifier scores
            cannot).
        hidden: what the model states its chunks carry are (``Chunk.hidden`` and
            ``Chain.prompt_hidden``): the :class:`~env.bank.hidden.HiddenManifest` of the
            capture (model sha256, layers, projection), which a probe checks before it reads
            them; ``None``: it captures none.
        thinking_end: the marker that closes the model's thinking section (its template's), or
            ``None`` for a model without one. A chain that ends without it (a suppressed end of
            thinking, or the end of a recorded budget-forced extension) is answered by closing
            the section: :func:`env.episode.rules.ended_in_thinking`.
    """

    chunk_tokens: int | None = None
    splits_chunks: bool = False
    thread_safe: bool = False
    can_judge: bool = True
    hidden: Any = None
    thinking_end: str | None = None


@runtime_checkable
class Generator(Protocol):
    """What every generator offers. All methods are batched over chains.

    Implementations: :class:`env.generators.VLLMGenerator` (in-process vLLM),
    :class:`env.generators.OpenAIGenerator` (a vLLM OpenAI-compatible server),
    :class:`env.generators.FakeGenerator` (scripted, for unit tests of logic), the replay
    generator over a recorded trace bank and :class:`~env.generators.lookahead.Lookahead`. They
    inherit :class:`GeneratorBase`, which gives the members below their defaults.
    """

    @property
    def sampling(self) -> SamplingConfig:
        """How it samples."""
        ...

    @property
    def traits(self) -> GeneratorTraits:
        """What it can do (see :class:`GeneratorTraits`)."""
        ...

    @property
    def ahead(self) -> int:
        """Decoded tokens it generated ahead that no call has returned yet (a lookahead's; the
        env's token cap counts them). 0 for a generator that only answers calls."""
        ...

    def remaining_chains(self, question: Question) -> int | None:
        """Chains :meth:`start` can still hand out for ``question`` in this episode (``None``:
        no limit; a replayed bank: the recorded chains not handed out yet)."""
        ...

    def can_extend(self, chain: Chain) -> bool:
        """Whether :meth:`extend` can give ``chain`` another chunk (a replayed bank: whether it
        holds one)."""
        ...

    def split_chunk(self, chunk: Chunk, k: int) -> list[Chunk]:
        """Cut ``chunk`` into chunks of ``k`` tokens, as :meth:`extend` would have returned them
        one call at a time (only where ``traits.splits_chunks``)."""
        ...

    def reset(self, seed: int) -> None:
        """Start afresh: restart chain ids and reseed, so the same calls give the same results."""
        ...

    def start(
        self,
        question: Question,
        n: int = 1,
        *,
        mode: PromptMode = "cot",
        budget: BudgetForcing | None = None,
    ) -> list[Chain]:
        """Create ``n`` new chains for ``question`` (nothing is generated yet)."""
        ...

    def extend(
        self, chains: Sequence[Chain], k: int, *, tip: TipConfig | None = None
    ) -> list[Chunk]:
        """Continue every unfinished chain by at most ``k`` tokens; return the new chunks.

        Finished chains are skipped (and get no chunk), unless budget forcing reopens them.
        """
        ...

    def branch(self, chain: Chain, n: int = 1, *, at: int | None = None) -> list[Chain]:
        """New chains sharing ``chain``'s first ``at`` generated tokens (default: all of them)."""
        ...

    def probe(self, chains: Sequence[Chain], *, max_tokens: int = 16) -> list[ProbeResult]:
        """Answer-forcing probe of every chain; chains are left unchanged."""
        ...

    def judge(self, chains: Sequence[Chain]) -> list[JudgeResult]:
        """Ask the model whether each chain is correct so far; chains are left unchanged."""
        ...


class GeneratorBase:
    """The defaults of a :class:`Generator`'s traits and episode queries; every generator
    inherits it and overrides what differs: a live engine with any chunk size, no limit on
    chains, nothing generated ahead, no chunk splitting, not thread-safe, able to judge."""

    @property
    def traits(self) -> GeneratorTraits:
        return _DEFAULT_TRAITS

    @property
    def ahead(self) -> int:
        return 0

    def remaining_chains(self, question: Question) -> int | None:
        return None

    def can_extend(self, chain: Chain) -> bool:
        return True

    def split_chunk(self, chunk: Chunk, k: int) -> list[Chunk]:
        raise ConfigError(
            f"{type(self).__name__} cannot split chunks (traits.splits_chunks is false)"
        )


_DEFAULT_TRAITS = GeneratorTraits()


class GeneratorWrapper(GeneratorBase):
    """A generator around another (``inner``): every member below forwards to it explicitly,
    and a subclass overrides what it changes (:class:`~env.generators.lookahead.Lookahead`,
    :class:`~env.generators.capture.Capturing`). It sets ``inner`` and ``_traits`` (the inner
    generator's traits as the wrapper changes them)."""

    inner: Generator
    _traits: GeneratorTraits

    @property
    def sampling(self) -> SamplingConfig:
        return self.inner.sampling

    @property
    def traits(self) -> GeneratorTraits:
        return self._traits

    @property
    def ahead(self) -> int:
        return self.inner.ahead

    def remaining_chains(self, question: Question) -> int | None:
        return self.inner.remaining_chains(question)

    def can_extend(self, chain: Chain) -> bool:
        return self.inner.can_extend(chain)

    def split_chunk(self, chunk: Chunk, k: int) -> list[Chunk]:
        return self.inner.split_chunk(chunk, k)

    def probe(self, chains: Sequence[Chain], *, max_tokens: int = 16) -> list[ProbeResult]:
        return self.inner.probe(chains, max_tokens=max_tokens)

    def judge(self, chains: Sequence[Chain]) -> list[JudgeResult]:
        return self.inner.judge(chains)


def validate_count(n: int, what: str) -> int:
    """Check a count (chains, branches, tokens): a positive int; ``what`` names it in the error."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


def validate_k(k: int) -> int:
    """Check a chunk size: a positive int."""
    return validate_count(k, "chunk size k")


def validate_question(question: Question) -> Question:
    """Check a question: it must have non-blank text."""
    if not isinstance(question, Question):
        raise ConfigError(f"expected a Question, got {type(question).__name__}")
    if not question.text or not question.text.strip():
        raise ConfigError(f"question {question.qid!r} is empty: give it some text")
    for i, turn in enumerate(question.context):
        if (
            not isinstance(turn, tuple)
            or len(turn) != 2
            or not all(isinstance(x, str) for x in turn)
        ):
            raise ConfigError(
                f"question {question.qid!r}: context[{i}] must be a (role, content) pair of "
                f"strings, got {turn!r}"
            )
    return question
