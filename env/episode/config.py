"""An episode's configuration: the actions, token prices, and the limits and costs of an episode."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from env.types import INJECT_ALLOWANCE, TokenUsage
from features.errors import ConfigError

if TYPE_CHECKING:
    from env.bank.manifest import BankManifest

__all__ = [
    "AGGREGATES",
    "PROBE_AGGREGATES",
    "Action",
    "Prices",
    "decode_tokens",
    "EnvConfig",
]


class Action(enum.IntEnum):
    """The four decisions."""

    CONTINUE = 0
    BRANCH = 1
    VERIFY = 2
    STOP = 3


#: The answer aggregations (``EnvConfig.aggregate``); the last two read the hidden-state probe.
AGGREGATES: tuple[str, ...] = ("majority", "confidence", "verifier", "probe", "probe-best")
#: Those that need an environment with probes.
PROBE_AGGREGATES: tuple[str, ...] = ("probe", "probe-best")


@dataclass(frozen=True, slots=True)
class Prices:
    """What each kind of token costs, in units of one generated token.

    Prefill is free by default: on an accelerator a prompt token costs a small fraction of a
    generated one, and most of it comes from the prefix cache. Cached tokens are always free.
    """

    generated: float = 1.0
    probe: float = 1.0
    judge: float = 1.0
    injected: float = 0.0
    prefill: float = 0.0

    def cost(self, usage: TokenUsage) -> float:
        """The priced cost of ``usage``."""
        return (
            self.generated * usage.generated
            + self.probe * usage.probe
            + self.judge * usage.judge
            + self.injected * usage.injected
            + self.prefill * usage.prefill
        )

    def __post_init__(self) -> None:
        for name in ("generated", "probe", "judge", "injected", "prefill"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"price {name} must be a finite number >= 0, got {v!r}")


def decode_tokens(usage: TokenUsage) -> int:
    """Tokens the engine decoded (generated, probe, verifier and injected): what the token cap counts."""
    return usage.generated + usage.probe + usage.judge + usage.injected


@dataclass(frozen=True, slots=True)
class EnvConfig:
    """How an episode runs and what it costs.

    Attributes:
        chunk_tokens: tokens per continue (a replayed bank fixes it to its own).
        max_chains: at most this many chains per question.
        max_chain_tokens: token cap of one chain (a chain reaching it stops by itself).
        extension_chunks: how many times a chain that ended may be continued past its end
            (s1 budget forcing: ``Wait,`` is appended and sampling goes on).
        token_cap: decoded tokens per episode (generated + probes + verifier + injected); an
            action that could exceed it is not run: the episode is truncated with the answer so
            far. The cap is never exceeded. With a
            :class:`~env.generators.lookahead.Lookahead` generator it also counts the tokens
            decoded ahead for chains the agent has not opened yet.
        time_cap_s: wall-clock seconds per episode (0: none); checked after every step.
        lam: λ, the price of one token in units of a correct answer.
        prices: token prices by kind (see :class:`Prices`).
        aggregate: how the answer is chosen at stop: ``majority``, ``confidence`` (votes weighted
            by chain confidence, DeepConf), ``verifier`` (weighted by the verifier's P(yes)),
            ``probe`` (weighted by each chain's latest P(right) from the hidden-state probe) or
            ``probe-best`` (the answer of the chain with the highest P(right)); the last two
            need an environment with probes (:mod:`env.episode.hidden`).
        probe: probe every unfinished chain after each of its chunks (answer-forcing, at cost).
        probe_tokens: tokens a probe may read.
        unavailable: an action that cannot run (a chain with nothing left, no chain left to
            branch, nothing new to verify): ``truncate`` ends the episode with the answer so far
            (``info["reason"]`` says why), ``raise`` raises :class:`~features.errors.PolicyError`.
        max_steps: decisions per episode before truncation (0: derived from the other limits).
        correct_reward: reward of a correct answer (a wrong or missing one gets 0).
    """

    chunk_tokens: int = 64
    max_chains: int = 16
    max_chain_tokens: int = 512
    extension_chunks: int = 2
    token_cap: int = 16384
    time_cap_s: float = 0.0
    lam: float = 2e-4
    prices: Prices = field(default_factory=Prices)
    aggregate: Literal["majority", "confidence", "verifier", "probe", "probe-best"] = "majority"
    probe: bool = True
    probe_tokens: int = 16
    unavailable: Literal["truncate", "raise"] = "truncate"
    max_steps: int = 0
    correct_reward: float = 1.0

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "max_chains", "max_chain_tokens", "token_cap", "probe_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.extension_chunks < 0 or self.max_steps < 0:
            raise ConfigError("extension_chunks and max_steps must be >= 0")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if not (math.isfinite(self.time_cap_s) and self.time_cap_s >= 0):
            raise ConfigError(f"time_cap_s must be >= 0, got {self.time_cap_s!r}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(
                f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}"
            )
        if self.unavailable not in ("truncate", "raise"):
            raise ConfigError(f"unavailable must be truncate or raise, got {self.unavailable!r}")
        opening = self.bound(Action.BRANCH)
        if self.token_cap < opening:
            raise ConfigError(
                f"token_cap {self.token_cap} is below the cost of opening one chain "
                f"({opening} = chunk_tokens + probe_tokens): raise it or shrink the chunk"
            )

    @classmethod
    def from_manifest(cls, manifest: BankManifest, **fields: Any) -> EnvConfig:
        """Settings for replaying a bank: ``fields``, and the bank's own settings for the rest
        (its chunk size, chains per question, chain cap, extensions and probe size).

        What every replay of a bank starts from: ``ComputeAllocationEnv.from_bank``,
        ``BatchedReplayEnv``, the evaluator and the oracle.
        """
        fields.setdefault("chunk_tokens", manifest.chunk_tokens)
        fields.setdefault("max_chains", manifest.chains)
        fields.setdefault("max_chain_tokens", manifest.max_tokens)
        fields.setdefault("extension_chunks", manifest.extension_chunks)
        fields.setdefault("probe_tokens", manifest.probe_tokens)
        return cls(**fields)

    @property
    def chain_chunks(self) -> int:
        """Chunks one chain takes to its natural end (the token cap), before any extension."""
        return -(-self.max_chain_tokens // self.chunk_tokens)

    @property
    def chain_tokens(self) -> int:
        """The most decoded tokens one chain can take to its natural end (chunks and probes)."""
        probes = self.chain_chunks * self.probe_tokens if self.probe else 0
        return self.max_chain_tokens + probes

    @property
    def steps_limit(self) -> int:
        if self.max_steps:
            return self.max_steps
        per_chain = self.chain_chunks + self.extension_chunks
        return self.max_chains * (per_chain + 2) + 8

    def bound(self, action: Action, n_verify: int = 0) -> int:
        """The most decoded tokens ``action`` can cost (what the token cap is checked against)."""
        probe = self.probe_tokens if self.probe else 0
        if action == Action.CONTINUE:
            return self.chunk_tokens + probe + INJECT_ALLOWANCE
        if action == Action.BRANCH:
            return self.chunk_tokens + probe
        if action == Action.VERIFY:
            return n_verify
        return 0
