"""The narrow engine interface the live generators are built on.

:class:`env.generators.live.LiveGenerator` implements the whole :class:`Generator` protocol
(chains, chunking, branching, probes, budget forcing, TIP, self-verification) on top of a
:class:`Backend`, which only has to run a batch of raw token-level completions. Backends:
in-process vLLM, a vLLM OpenAI-compatible server, and a scripted fake for unit tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from env.types import FloatArray, IntArray

__all__ = ["TipRequest", "CompletionRequest", "Completion", "Backend", "HFTokenizer"]


@dataclass(frozen=True, slots=True)
class TipRequest:
    """Per-request TIP state for a logits processor.

    Attributes:
        token_ids: ids whose logits are lowered (the first token of each switch word).
        penalty: how much to subtract.
        window: the penalty applies while fewer than ``window`` tokens have passed since the start
            of the current thought.
        since_switch: tokens already generated since the start of the current thought, before this
            request's first new token.
    """

    token_ids: tuple[int, ...]
    penalty: float
    window: int
    since_switch: int


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """One raw completion: continue ``prompt_ids`` by at most ``max_tokens`` tokens.

    Attributes:
        prompt_ids: the full context (prompt and chain so far) as token ids.
        max_tokens: at most this many new tokens.
        temperature: 0 means greedy.
        top_p: nucleus mass.
        top_logprobs: how many top alternatives to return per token (0: none).
        stop: stop strings (the matched string is not included in the output).
        tip: thought-switching penalty, if any.
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float = 1.0
    top_logprobs: int = 5
    stop: tuple[str, ...] = ()
    tip: TipRequest | None = None


@dataclass(slots=True)
class Completion:
    """What a backend returns for one request.

    Attributes:
        token_ids: new tokens, shape ``[n]``.
        text: their text.
        logprobs: log-probability of each new token, shape ``[n]``.
        top_logprobs: top-``m`` log-probabilities per position, descending, shape ``[n, m]``
            (``m = 0`` when not requested).
        top_token_ids: their ids, shape ``[n, m]``.
        finish_reason: ``length`` (hit ``max_tokens``) or ``stop`` (EOS or a stop string).
        prompt_tokens: length of the prompt.
        cached_tokens: prompt tokens served from the prefix cache.
        stop_reason: the request's stop string that ended it (not in ``text``, as the
            engines drop it); ``""`` when a stop string ended it but the engine does not say
            which of several (llama.cpp); None when it ended otherwise (EOS, ``length``) or the
            engine does not say (an OpenAI-compatible server other than vLLM's). What
            budget forcing on the end of a thinking section reads.
    """

    token_ids: IntArray
    text: str
    logprobs: FloatArray
    top_logprobs: FloatArray
    top_token_ids: IntArray
    finish_reason: Literal["length", "stop"]
    prompt_tokens: int
    cached_tokens: int
    stop_reason: str | None = None


@runtime_checkable
class Backend(Protocol):
    """A token-level completion engine."""

    #: Human-readable model name (used in manifests and errors).
    model_name: str
    #: End-of-sequence token id.
    eos_token_id: int

    @property
    def max_model_len(self) -> int | None:
        """The context size in tokens (``None``: unknown or unbounded)."""
        ...

    def reset(self, seed: int) -> None:
        """Clear the prefix cache and reseed the sampler where the engine can (a server cannot:
        its ``reset`` does nothing)."""
        ...

    def complete(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Run a batch of completions (one engine call where the engine allows)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``."""
        ...

    def apply_chat(self, messages: list[dict[str, str]]) -> str | None:
        """The prompt for ``messages`` under the model's chat template, or ``None`` if it has none."""
        ...


class HFTokenizer:
    """The tokenizer half of :class:`Backend` over a Hugging Face tokenizer in ``self.tokenizer``
    (shared by the in-process vLLM and llama.cpp backends)."""

    tokenizer: Any

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def apply_chat(self, messages: list[dict[str, str]]) -> str | None:
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return str(
            self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
