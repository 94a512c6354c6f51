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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

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
    "validate_count",
    "validate_k",
    "validate_question",
]


@runtime_checkable
class Generator(Protocol):
    """What every generator offers. All methods are batched over chains.

    Implementations: :class:`env.generators.VLLMGenerator` (in-process vLLM),
    :class:`env.generators.OpenAIGenerator` (a vLLM OpenAI-compatible server),
    :class:`env.generators.FakeGenerator` (scripted, for unit tests of logic) and the replay
    generator over a recorded trace bank.
    """

    sampling: SamplingConfig

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
    return question
