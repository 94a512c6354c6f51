"""Verifiers behind one protocol, with their cost.

The environment's ``verify`` action asks a :class:`Verifier` for P(correct so far) of each chain
whose end changed (``ComputeAllocationEnv(..., verifier=...)``; without one it asks the
generator itself). Three kinds ship:

* :class:`SelfVerifier`: the generative self-verifier of any model. The model is asked whether
  the chain is correct and answers one token; ``P(yes)`` among yes/no is the score.
* :class:`ExecutionVerifier`: code questions' execution verification (the program run on the
  examples its prompt shows).
* :class:`PRMVerifier`: a step-level process reward model trained on the testbed model's step
  labels (:mod:`env.models.testbed.prm`). It reads the chain and scores each complete step; it decodes
  nothing.

Cost semantics (``JudgeResult.usage``, a :class:`~env.types.TokenUsage`):

* ``judge``: tokens the verifier *decoded* (the self-verifier: one per chain). The env prices
  them at ``Prices.judge`` and counts them against the episode's decoded-token cap.
* ``prefill``: prompt tokens the verifier computed afresh; priced at ``Prices.prefill`` and not
  counted against the cap. A PRM's whole cost is here: the tokens it read that it had not read
  before for that chain.
* ``cached``: tokens served from a cache (a prefix cache, or what the PRM read of that chain
  before); free.

With the env's default prices (``prefill=0``) a PRM verification is free and a self-verification
costs one token per chain; give ``Prices(prefill=...)`` a price to charge the PRM's reading. The
testbed PRM reads with the testbed model itself, so a PRM token costs what a generator prompt
token costs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from env.generators.base import Generator
from env.types import Chain, JudgeResult, TokenUsage
from features.errors import ConfigError

if TYPE_CHECKING:
    from env.models.testbed.prm import Aggregate, PRMState, ProcessRewardModel

__all__ = ["ExecutionVerifier", "PRMVerifier", "SelfVerifier", "Verifier"]


@runtime_checkable
class Verifier(Protocol):
    """What the env's ``verify`` action asks.

    Attributes:
        name: a short name for logs and reports (``self``, ``prm``).
    """

    name: str

    def judge(self, chains: Sequence[Chain]) -> list[JudgeResult]:
        """P(correct so far) of each chain, in order, with what it cost (see the module doc).

        Chains are left unchanged. ``JudgeResult.p_yes`` is in [0, 1]; 0.5 means no evidence.
        """
        ...

    @property
    def can_judge(self) -> bool:
        """Whether :meth:`judge` can run (the env masks ``verify`` when it cannot)."""
        ...

    def reset(self) -> None:
        """Forget what earlier episodes read (the env calls it at every reset), so that no
        episode is cheaper than another for what an earlier one paid."""
        ...


class SelfVerifier:
    """The generative self-verifier: the generator's own yes/no verdict on each chain.

    Costs one decoded token per chain (``usage.judge``), plus the verification prompt's tokens
    that the prefix cache did not hold (``usage.prefill``).

    Args:
        generator: any generator (live, server, llama.cpp, or the replay of a bank recorded with
            verifier scores).
    """

    name = "self"

    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    @property
    def can_judge(self) -> bool:
        """Whether the generator can verify (a bank recorded without verifier scores cannot)."""
        return self.generator.traits.can_judge

    def judge(self, chains: Sequence[Chain]) -> list[JudgeResult]:
        return self.generator.judge(chains)

    def reset(self) -> None:
        """Nothing to forget: the generator keeps its own state."""


class ExecutionVerifier:
    """Execution verification for code questions: a chain's code so far is run on the calls its
    prompt's docstring shows, and its score is the share of their expected values it gives
    (:meth:`env.code.grade.CodeGrader.read`; 0.5 without code or without an expected value).
    The hidden unit tests are never run here. Questions that are not code get the generator's
    own verdict (``fallback``).

    Costs: ``TokenUsage(judge=1)`` per chain, the price of a self-verification's one token,
    so that a verification costs the same in a live episode and in the replay of a code bank
    (whose recorded ``judge_p_yes`` is this score); running the code costs CPU, not tokens.

    Args:
        fallback: the verifier of non-code questions (usually a :class:`SelfVerifier`), or None
            to refuse them.
    """

    name = "execution"

    def __init__(self, fallback: Verifier | None = None) -> None:
        self.fallback = fallback

    @property
    def can_judge(self) -> bool:
        return True

    def judge(self, chains: Sequence[Chain]) -> list[JudgeResult]:
        from env.code.grade import grader_for

        out: list[JudgeResult] = []
        for c in chains:
            if not c.question.is_code:
                if self.fallback is None:
                    raise ConfigError(
                        f"question {c.question.qid!r} is not code: execution verification needs "
                        "a program; give ExecutionVerifier(fallback=SelfVerifier(generator))"
                    )
                out.extend(self.fallback.judge([c]))
                continue
            _, score = grader_for(c.question.qid).read(c.text, ended=c.finished)
            out.append(JudgeResult(c.chain_id, c.num_tokens, score, TokenUsage(judge=1)))
        return out

    def reset(self) -> None:
        """Nothing to forget: runs are cached by program, which costs no tokens."""
        if self.fallback is not None:
            self.fallback.reset()


class PRMVerifier:
    """A step-level process reward model behind the :class:`Verifier` protocol.

    A chain's text so far is split into lines; every complete step line (followed by a newline,
    or the last line of a finished chain) gets P(every step so far is correct), and the chain's
    score is their minimum or product (as the PRM's config chose on validation data). A chain
    with no complete step yet scores 0.5 at no cost.

    Costs: ``TokenUsage(judge=0, prefill=new, cached=reused)``: a PRM decodes nothing; it reads
    the prompt and the chain up to its last complete step. What it read of a chain is kept (the
    encoder's KV cache and per-token features), so re-verifying a longer chain reads, and pays
    for, only the new tokens. The cache holds ``max_chains`` chains (least recently judged go
    first); :meth:`reset` empties it (between episodes, so that costs do not depend on what an
    earlier episode read).

    It works on any chain whose ``text`` is known, replayed ones included. The shipped PRM was
    trained on the testbed model's ``cot`` solutions; on other text it finds no step lines and
    says 0.5.

    Args:
        path: the PRM folder (default ``models/testbed/prm``).
        encoder: the encoder model folder (default: the one the PRM's config names).
        aggregate: override the config's ``min`` / ``product``.
        max_chains: how many chains' reading to keep.

    Raises:
        ModelError: the folder is missing or garbled, or the encoder is not the one the PRM was
            trained on.
    """

    name = "prm"
    can_judge = True

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        encoder: str | Path | None = None,
        aggregate: Aggregate | None = None,
        max_chains: int = 64,
    ) -> None:
        from env.models.testbed.prm import PRM_DIR, ProcessRewardModel

        if aggregate not in (None, "min", "product"):
            raise ConfigError(f"aggregate must be 'min' or 'product', got {aggregate!r}")
        if isinstance(max_chains, bool) or not isinstance(max_chains, int) or max_chains < 1:
            raise ConfigError(f"max_chains must be a positive integer, got {max_chains!r}")
        self.model: ProcessRewardModel = ProcessRewardModel(
            path if path is not None else PRM_DIR, encoder=encoder
        )
        self.aggregate: Aggregate = aggregate or self.model.config.aggregate
        self.max_chains = max_chains
        self._cache: OrderedDict[int, tuple[Chain, PRMState]] = OrderedDict()

    def reset(self) -> None:
        """Forget what was read of every chain."""
        self._cache.clear()

    def step_scores(self, chain: Chain) -> tuple[list[float], TokenUsage]:
        """The scores of ``chain``'s complete steps so far, and what reading them cost."""
        key = id(chain)
        hit = self._cache.get(key)
        state = hit[1] if hit is not None and hit[0] is chain else None
        scores, state, reused, computed = self.model.score(
            chain.question.text,
            chain.text,
            mode=chain.mode,
            finished=chain.finished,
            state=state,
        )
        if len(state):
            # Holding the chain keeps its id from being reused by another object.
            self._cache[key] = (chain, state)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_chains:
                self._cache.popitem(last=False)
        return scores, TokenUsage(prefill=computed, cached=reused)

    def judge(self, chains: Sequence[Chain]) -> list[JudgeResult]:
        from env.models.testbed.prm import aggregate_scores

        out = []
        for chain in chains:
            scores, usage = self.step_scores(chain)
            p = aggregate_scores(scores, self.aggregate)
            out.append(
                JudgeResult(
                    chain_id=chain.chain_id,
                    at_tokens=chain.num_tokens,
                    p_yes=min(1.0, max(0.0, p)),
                    usage=usage,
                )
            )
        return out
