"""The Policy protocol: observations in, actions out, one episode or many at once.

A policy sees the environment's observation (:mod:`env.episode.observation`: 35 documented features in
[0, 1]) and returns one of the four actions (:class:`env.episode.config.Action`). Policies are
batched: ``act`` takes ``[F]`` (one episode, returns an ``int``) or ``[B, F]`` (``B`` episodes,
returns ``int64[B]``); stateful policies keep per-episode state in arrays of length ``B`` that
:meth:`Policy.reset` allocates and :meth:`Policy.end` clears for the episodes that ended.

Public ``act`` validates and delegates to a private ``_act`` (the template method of
Stable-Baselines3): subclasses implement ``_act(obs: float32[B, F]) -> int64[B]`` only.

What callers read from a policy is declared here, never found with ``getattr``: the traits every
policy has are members of :class:`Policy` (with defaults in :class:`BasePolicy`); what only some
policies can do is a small capability protocol, checked with ``isinstance``:

| protocol | members | who has it |
|---|---|---|
| :class:`Policy` | ``name``, ``aggregate``, ``planned_chains``, ``uses_probes``, ``acts_between_chains``, ``finishes_chains``, ``reads_hidden``, ``hidden_probes``, ``reset``, ``act``, ``end``, ``clone`` | every policy |
| :class:`LamConditioned` | ``lam``, ``with_lam(lam)`` | learned policies (they act for a price λ) |
| :class:`Saveable` | ``save(folder)``, ``meta`` | learned policies (their own file format) |
| :class:`HasValue` | ``value(obs)`` | learned policies (the controller's fleet mode ranks by it) |
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

import numpy as np

from env.episode.config import PROBE_AGGREGATES, Action, EnvConfig
from env.episode.observation import FEATURE_NAMES, N_FEATURES
from features.errors import ConfigError, PolicyError

if TYPE_CHECKING:
    from env.episode.hidden import HiddenProbes

__all__ = [
    "CONTINUE",
    "BRANCH",
    "VERIFY",
    "STOP",
    "F",
    "BasePolicy",
    "HasValue",
    "LamConditioned",
    "ObsView",
    "Policy",
    "Saveable",
]

CONTINUE, BRANCH, VERIFY, STOP = (int(a) for a in Action)
#: Column of each feature in an observation.
F: dict[str, int] = {n: i for i, n in enumerate(FEATURE_NAMES)}


@runtime_checkable
class Policy(Protocol):
    """What the environment loop, the evaluator and the controller call and read.

    The traits are documented (with their defaults) on :class:`BasePolicy`, which provides them.
    """

    #: Short name used in tables and MLflow (a heuristic's name is its spec: :mod:`policies.registry`).
    name: str
    #: The answer aggregation the policy is meant for (the env's ``aggregate`` setting).
    aggregate: str

    @property
    def planned_chains(self) -> int:
        """Chains the policy opens as one group, whatever it sees (1: chain by chain)."""
        ...

    @property
    def uses_probes(self) -> bool:
        """Whether the policy reads probe answers (if not, it runs without probes)."""
        ...

    @property
    def acts_between_chains(self) -> bool:
        """Whether the policy decides only once the current chain has ended."""
        ...

    @property
    def reads_hidden(self) -> bool:
        """Whether the policy reads the model's hidden states (the hidden-state features or a
        probe aggregation): it then runs only where its probes' states are captured."""
        ...

    @property
    def hidden_probes(self) -> HiddenProbes | None:
        """The probes it was trained with (``None``: it reads none, or the evaluator's or
        server's own probes, as a rule that needs no training does)."""
        ...

    @property
    def finishes_chains(self) -> bool:
        """Whether the policy runs every chain it opens to its end."""
        ...

    def reset(self, n: int = 1, *, config: EnvConfig | None = None) -> None:
        """Start ``n`` episodes (state for each), under the env's ``config``."""
        ...

    def act(self, obs: np.ndarray) -> Any:
        """Actions for observations ``[F]`` (an ``int``) or ``[B, F]`` (``int64[B]``)."""
        ...

    def end(self, done: np.ndarray) -> None:
        """Episodes flagged in ``done`` (``bool[B]``) ended; their next observation starts anew."""
        ...

    def clone(self) -> Self:
        """A copy with its own per-episode state (one per concurrent request)."""
        ...


@runtime_checkable
class LamConditioned(Protocol):
    """A policy that acts for a price λ of compute (the learned ones): swept over λ."""

    @property
    def lam(self) -> float | None:
        """The λ it acts for (``None``: the environment's ``config.lam``)."""
        ...

    def with_lam(self, lam: float | None) -> Policy:
        """A copy acting for ``lam`` (``None``: the environment's)."""
        ...


@runtime_checkable
class Saveable(Protocol):
    """A policy with its own file format (the learned ones): :func:`policies.registry.load_policy`
    reads back what :meth:`save` writes."""

    #: How it was trained (arguments, bank, metrics): saved with it.
    meta: dict[str, Any]

    def save(self, directory: str | Path) -> Path:
        """Write the policy to the folder ``directory``; returns the folder."""
        ...


@runtime_checkable
class HasValue(Protocol):
    """A policy that estimates what going on is worth (the learned ones)."""

    def value(self, obs: np.ndarray) -> np.ndarray:
        """``float[B]``: the expected gain of going on rather than stopping now, net of the
        tokens' price (what the controller's fleet mode ranks pending questions by)."""
        ...


class ObsView:
    """Named, de-normalised views of a batch of observations (counts, tokens)."""

    def __init__(self, obs: np.ndarray, config: EnvConfig) -> None:
        self.obs = obs
        self.config = config

    def __getitem__(self, name: str) -> np.ndarray:
        return self.obs[:, F[name]]

    def flag(self, name: str) -> np.ndarray:
        return self.obs[:, F[name]] > 0.5

    @property
    def n_chains(self) -> np.ndarray:
        return np.rint(self.obs[:, F["n_chains"]] * self.config.max_chains).astype(np.int64)

    @property
    def cur_tokens(self) -> np.ndarray:
        return self.obs[:, F["cur_tokens"]] * self.config.max_chain_tokens

    @property
    def decoded(self) -> np.ndarray:
        return self.obs[:, F["budget_used"]] * self.config.token_cap


class BasePolicy:
    """Validation, batching and per-episode state for policies; subclasses write ``_act``.

    Attributes:
        name: short name.
        aggregate: the env aggregation the policy assumes (``majority`` unless it says).
        planned_chains: chains the policy opens as one group, whatever it sees (best-of-N: N;
            ESC: its window; 1: it decides chain by chain). The controller generates a group
            side by side (:class:`~env.generators.lookahead.Lookahead`).
        uses_probes: whether the policy reads probe answers (probe features, or the answer of a
            chain it stops before its end). One that does not (best-of-N, Adaptive-Consistency,
            ESC: they vote on finished chains) is evaluated and served with ``probe=False``, so
            it is not charged for probes it would never run. A learned policy reads it from the
            replay it trained on (one trained without probes never saw a probe feature).
        acts_between_chains: whether the policy decides only once the current chain has ended
            (it always continues an open chain, and reads nothing inside one). The controller
            then generates each chain in one piece rather than chunk by chunk, when the cap has
            room for its planned chains in full.
        reads_hidden: whether the policy reads the model's hidden states
            (:mod:`env.episode.hidden`: the hidden-state features, or the ``probe`` /
            ``probe-best`` aggregation). A policy that does not never sees them (a learned one
            trained without them has them set to their neutral values before it reads).
        hidden_probes: the probes a learned policy was trained with (saved with it): it is
            evaluated and served with exactly those. A rule that reads hidden states and has
            none of its own is given the evaluator's or server's (fitted on the training
            questions).
        finishes_chains: whether the policy runs every chain it opens to its end (it may read
            features inside a chain, but never cuts one). Every policy that acts between chains
            does; so do the learned policies that decide between chains. The controller then
            reads a chain ahead: the rest of it in one engine call, handed to the env chunk by
            chunk (:class:`~env.generators.lookahead.Lookahead`).

    :meth:`clone` gives the controller a policy per request (a deep copy by default).
    """

    name: str = "policy"
    aggregate: str = "majority"
    planned_chains: int = 1
    uses_probes: bool = True
    acts_between_chains: bool = False
    hidden_probes: HiddenProbes | None = None

    @property
    def reads_hidden(self) -> bool:
        """Whether the policy reads hidden states (see the class docstring)."""
        return self.hidden_probes is not None or self.aggregate in PROBE_AGGREGATES

    @property
    def finishes_chains(self) -> bool:
        """Whether the policy runs every chain to its end (see the class docstring)."""
        return bool(self.acts_between_chains)

    def __init__(self) -> None:
        self.config = EnvConfig()
        self.n = 0
        self.reset(1)

    def reset(self, n: int = 1, *, config: EnvConfig | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ConfigError(f"reset needs a positive number of episodes, got {n!r}")
        if config is not None:
            if not isinstance(config, EnvConfig):
                raise ConfigError(f"config must be an EnvConfig, got {type(config).__name__}")
            self.config = config
        self.n = int(n)
        self._reset_state(self.n)

    def _reset_state(self, n: int) -> None:
        """Allocate per-episode state for ``n`` episodes (stateless policies: nothing)."""

    def end(self, done: np.ndarray) -> None:
        d = np.asarray(done, dtype=bool).reshape(-1)
        if d.shape[0] != self.n:
            raise PolicyError(f"end() got {d.shape[0]} flags for {self.n} episodes")
        if d.any():
            self._clear(d)

    def _clear(self, done: np.ndarray) -> None:
        """Reset the state of the episodes flagged in ``done``."""

    def act(self, obs: np.ndarray) -> Any:
        x = np.asarray(obs, dtype=np.float32)
        single = x.ndim == 1
        if single:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            raise PolicyError(
                f"{self.name}: observations must have shape [{N_FEATURES}] or [B, {N_FEATURES}] "
                f"(the env's features), got {tuple(np.shape(obs))}"
            )
        if x.shape[0] != self.n:
            if single or self.n == 1:
                self.reset(x.shape[0], config=self.config)
            else:
                raise PolicyError(
                    f"{self.name}: {x.shape[0]} observations for {self.n} episodes; call reset(n)"
                )
        if not np.isfinite(x).all():
            raise PolicyError(f"{self.name}: observations contain NaN or infinity")
        a = np.asarray(self._act(x), dtype=np.int64).reshape(-1)
        if a.shape[0] != x.shape[0] or ((a < 0) | (a > STOP)).any():
            raise PolicyError(f"{self.name}: produced invalid actions {a[:8]}")
        return int(a[0]) if single else a

    def _act(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def clone(self) -> Self:
        """A deep copy (subclasses with large read-only parts share them instead)."""
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
