"""A learned stopping / value policy: calibrated P(correct if stopped now) and fitted-Q gains.

:class:`ValuePolicy` answers "is one more action worth its tokens?". Two models, fitted with
scikit-learn on transitions replayed from a trace bank's training questions
(:class:`~env.episode.vector.BatchedReplayEnv`) under a mix of behaviour policies, and run in numpy:

* ``P_stop(s)``: the probability that stopping now gives a correct answer, an
  ``MLPClassifier`` on the observation (plus a derived ``chain_length``, :func:`expand`),
  calibrated by isotonic regression fitted on held-out training questions;
* ``G_a(s, λ) = Q(s, a) - P_stop(s)`` for continue, branch and verify: what one more action
  gains over stopping now, by fitted-Q iteration on ``Q(s, a) = -λ·Δcost + V(s')``,
  ``V(s') = max(P_stop(s'), max_a' Q(s', a'))`` over the actions available in ``s'``, and the
  realised correctness where the episode ended. One ``MLPRegressor`` serves the three actions
  (one-hot input) and reads ``P_stop``; it predicts the value of the next state and the
  action's expected cost separately, and λ is applied outside. λ is also an input (``log10
  λ``, trained over a grid), so one model serves a whole frontier sweep.

The policy takes the available action with the largest gain, and stops when no gain is
positive: when the best next action is worth less than its cost.

It decides at every chunk (``decide="chunk"``: it may cut a chain, or stop on a probe's
answer) or only between chains (``decide="chain"``, :func:`decision_mask`: a running chain is
always continued, so the decisions are "another chain, verify, or stop?" once a chain has
ended; the backups then value a running chain's state by continuing it).

Two departures from textbook FQI, both because a chain needs many decisions before its answer
counts: the backups carry the recorded episode's return along while it follows the greedy
policy (Watkins's Q(λ), :func:`_q_returns`), and fitting runs in rounds, each adding the states
the greedy policy itself reaches (data aggregation), so that its value estimates are corrected
where the behaviour policies rarely went.

:func:`train_value_policy` (and ``python -m policies.learned value``) trains one;
:func:`rollout_pinned` measures any policy on pinned replayed episodes. The replay helpers here
(:class:`ReplayDriver`) are what :mod:`policies.learned.ppo` trains on too.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from env.bank.store import TraceBank
from env.episode.config import EnvConfig
from env.episode.observation import FEATURE_NAMES, N_FEATURES
from env.episode.vector import BatchedReplayEnv
from features.errors import ConfigError, PolicyError
from policies.base import STOP, BasePolicy
from policies.evaluation.runner import run_pinned
from policies.heuristics import (
    AdaptiveConsistency,
    BestOfN,
    BoundedThinking,
    BudgetForcing,
    DeepConfOnline,
    EarlyStoppingSC,
    ProbeAgreement,
    RandomPolicy,
    SingleChain,
)
from policies.serialize import (
    NumpyMLP,
    PolicyFiles,
    bank_fingerprint,
    env_config_dict,
    lam_feature,
    write_policy_files,
)

__all__ = [
    "DECIDE",
    "DEFAULT_LAMS",
    "LearnedPolicy",
    "ReplayDriver",
    "Transitions",
    "ValueArgs",
    "ValuePolicy",
    "behaviour_policies",
    "collect_transitions",
    "decision_mask",
    "rollout_pinned",
    "train_value_policy",
]

log = logging.getLogger(__name__)

#: The λ grid learned policies train over by default (price of a token, in correct answers).
DEFAULT_LAMS: tuple[float, ...] = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
_CAN = [FEATURE_NAMES.index(n) for n in ("can_continue", "can_branch", "can_verify")]
_BUDGET, _N_CHAINS = FEATURE_NAMES.index("budget_used"), FEATURE_NAMES.index("n_chains")
_ENDED = FEATURE_NAMES.index("cur_ended")
#: Where a learned policy decides (:func:`decision_mask`).
DECIDE: tuple[str, ...] = ("chunk", "chain")
#: Features the value policy derives from the observation and appends to it.
EXTRA_FEATURES: tuple[str, ...] = ("chain_length",)


def expand(obs: np.ndarray, chain_scale: float) -> np.ndarray:
    """The observation with :data:`EXTRA_FEATURES` appended (``float64[B, F + 1]``).

    ``chain_length``: decoded tokens per chain over ``max_chain_tokens`` (``chain_scale`` is
    ``token_cap / (max_chains * max_chain_tokens)``), clipped to [0, 4]. The vote features do
    not say whether the chains behind a vote have finished or were cut after a chunk; this does.
    """
    x = np.asarray(obs, dtype=np.float64)
    n = x[:, _N_CHAINS]
    per = np.where(n > 0, x[:, _BUDGET] / np.maximum(n, 1e-9), 0.0) * chain_scale
    return np.concatenate([x, np.clip(per, 0.0, 4.0)[:, None]], axis=1)


def chain_scale_of(config: EnvConfig) -> float:
    """``chain_scale`` of :func:`expand` for an environment configuration."""
    return config.token_cap / (config.max_chains * config.max_chain_tokens)


def available(obs: np.ndarray) -> np.ndarray:
    """``bool[B, 4]``: which actions the observations say can run (stop always can)."""
    m = np.ones((obs.shape[0], 4), dtype=bool)
    m[:, :3] = obs[:, _CAN] > 0.5
    return m


def decision_mask(obs: np.ndarray, decide: str = "chunk") -> np.ndarray:
    """``bool[B, 4]``: the actions a learned policy may pick.

    ``decide="chunk"``: every available action (:func:`available`), at every chunk.
    ``"chain"``: the policy decides only where the current chain has ended (or cannot go on);
    while it runs, continue is the only choice, so a chain is always read to its end and the
    policy's decisions are the few between chains (for PPO the forced steps carry no gradient:
    their log-probability is 0 whatever the weights).
    """
    m = available(obs)
    if decide == "chain":
        running = (obs[:, _ENDED] < 0.5) & m[:, 0]
        m[running, 1:] = False
    elif decide != "chunk":
        raise ConfigError(f"decide must be one of {', '.join(DECIDE)}, got {decide!r}")
    return m


# -- the common base of learned policies ----------------------------------------------------


class LearnedPolicy(BasePolicy):
    """What every learned policy shares: the price λ it acts for, cheap clones, saving.

    λ is a network input. ``lam=None`` follows the environment's price (``config.lam`` of the
    last :meth:`reset`); :meth:`with_lam` pins one. λ outside the trained range is clipped to it.

    Subclasses set ``kind`` and ``version`` and write ``_params``, ``_arrays`` and
    ``_from_files``.
    """

    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __init__(
        self,
        *,
        lam: float | None,
        lam_range: tuple[float, float],
        aggregate: str = "majority",
        meta: dict[str, Any] | None = None,
    ) -> None:
        lo, hi = (float(v) for v in lam_range)
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ConfigError(f"lam_range must be 0 < low <= high, got {lam_range!r}")
        if lam is not None and not (math.isfinite(lam) and lam >= 0):
            raise ConfigError(f"lam must be a finite number >= 0, got {lam!r}")
        if aggregate not in ("majority", "confidence", "verifier"):
            raise ConfigError(f"unknown aggregate {aggregate!r}")
        self.lam = None if lam is None else float(lam)
        self.lam_range = (lo, hi)
        self.aggregate = aggregate
        self.meta: dict[str, Any] = dict(meta or {})
        self.name = self._make_name()
        super().__init__()

    def _make_name(self) -> str:
        return self.kind if self.lam is None else f"{self.kind}-lam{self.lam:g}"

    @property
    def uses_probes(self) -> bool:  # type: ignore[override]
        """Whether the policy was trained with probes (``probe`` of the replay it trained on, in
        ``meta["env"]``). One trained without them never saw a probe feature, so it is
        evaluated and served without probes too, and pays for none."""
        return bool(self.meta.get("env", {}).get("probe", True))

    @property
    def finishes_chains(self) -> bool:
        """Whether the policy decides only between chains (``decide="chain"``): it then runs
        every chain to its end, and the controller may read a chain ahead."""
        return getattr(self, "decide", "chunk") == "chain"

    @property
    def effective_lam(self) -> float:
        """The λ the policy acts for now."""
        return self.config.lam if self.lam is None else self.lam

    def _inputs(self, obs: np.ndarray) -> np.ndarray:
        z = lam_feature(self.effective_lam, self.lam_range)
        col = np.full((obs.shape[0], 1), z, dtype=np.float64)
        return np.concatenate([obs.astype(np.float64), col], axis=1)

    def with_lam(self, lam: float | None) -> Self:
        """A clone acting for price ``lam`` (``None``: the environment's); weights are shared."""
        if lam is not None and not (math.isfinite(lam) and lam >= 0):
            raise ConfigError(f"lam must be a finite number >= 0, got {lam!r}")
        c = self.clone()
        c.lam = None if lam is None else float(lam)
        c.name = c._make_name()
        return c

    def clone(self) -> Self:
        """A copy with fresh per-episode state; the weights are shared (they are never changed)."""
        c = copy.copy(self)
        c.meta = dict(self.meta)
        c._reset_clone()
        c.reset(1, config=self.config)
        return c

    def _reset_clone(self) -> None:
        """Give a clone its own mutable state (an RNG, ...)."""

    def value(self, obs: np.ndarray) -> np.ndarray:
        """``float[B]``: the expected gain of going on rather than stopping now, in correct
        answers, net of the tokens' price at the policy's λ (what the controller's fleet mode
        ranks pending questions by)."""
        raise NotImplementedError

    def _check_obs(self, obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            raise PolicyError(
                f"{self.name}: observations must have shape [{N_FEATURES}] or [B, {N_FEATURES}], "
                f"got {tuple(np.shape(obs))}"
            )
        if not np.isfinite(x).all():
            raise PolicyError(f"{self.name}: observations contain NaN or infinity")
        return x

    # -- saving ----------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        return {"lam": self.lam, "lam_range": list(self.lam_range), "aggregate": self.aggregate}

    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def _from_files(cls, files: PolicyFiles) -> Self:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write the policy to ``directory`` (``policy.json`` + ``weights.safetensors``)."""
        reserved = ("format", "kind", "version", "features", "params", "weights")
        meta = {k: v for k, v in self.meta.items() if k not in reserved}
        return write_policy_files(
            directory,
            kind=self.kind,
            version=self.version,
            params=self._params(),
            arrays=self._arrays(),
            meta=meta,
        )

    @staticmethod
    def _lam_params(p: dict[str, Any]) -> dict[str, Any]:
        try:
            lam = p.get("lam")
            lr = p["lam_range"]
            return {
                "lam": None if lam is None else float(lam),
                "lam_range": (float(lr[0]), float(lr[1])),
                "aggregate": str(p.get("aggregate", "majority")),
            }
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise PolicyError(f"policy params are damaged ({type(e).__name__}: {e})") from e


# -- the value policy -----------------------------------------------------------------------


class ValuePolicy(LearnedPolicy):
    """Stop when no available action gains more than its cost (see the module docstring).

    The gain network reads the expanded observation, the λ feature, the calibrated ``P_stop``
    and the action, and gives two numbers: ``H``, what the state after the action is worth over
    stopping now (the future's costs at λ included), and ``C``, the action's expected immediate
    cost in units of ``cost_scale`` tokens. The gain is ``G = H - λ · cost_scale · C``: the
    immediate price is applied outside the network, which need not learn a product of λ and a
    cost.

    Args:
        stop_net: the classifier's network (one logit, before calibration).
        iso_x, iso_y: the isotonic calibration (increasing knots of raw P -> calibrated P).
        gain_net: the gain network: expanded observation, λ feature, ``P_stop`` and the action
            (one-hot continue, branch, verify) -> ``(H, C)``. One network for the three actions
            shares its errors between them, so that their comparison is steadier.
        cost_scale: tokens per unit of ``C``.
        chain_scale: see :func:`expand` (the training environment's).
        decide: ``chunk`` (at every chunk) or ``chain`` (only between chains: a running chain
            is always continued; see :func:`decision_mask`), as it was trained.
        lam, lam_range, aggregate, meta: see :class:`LearnedPolicy`.
    """

    kind = "value"
    version = 1

    def __init__(
        self,
        stop_net: NumpyMLP,
        iso_x: np.ndarray,
        iso_y: np.ndarray,
        gain_net: NumpyMLP,
        *,
        cost_scale: float = 100.0,
        chain_scale: float = 1.0,
        decide: str = "chunk",
        lam: float | None = None,
        lam_range: tuple[float, float] = (DEFAULT_LAMS[0], DEFAULT_LAMS[-1]),
        aggregate: str = "majority",
        meta: dict[str, Any] | None = None,
    ) -> None:
        n_x = N_FEATURES + len(EXTRA_FEATURES)
        if stop_net.n_in != n_x or stop_net.n_out != 1:
            raise PolicyError(
                f"the stop network maps {stop_net.n_in} -> {stop_net.n_out}, expected {n_x} -> 1"
            )
        if gain_net.n_in != n_x + 5 or gain_net.n_out != 2:
            raise PolicyError(
                f"the gain network maps {gain_net.n_in} -> {gain_net.n_out}, expected "
                f"{n_x + 5} -> 2"
            )
        ix, iy = np.asarray(iso_x, np.float64), np.asarray(iso_y, np.float64)
        if ix.ndim != 1 or ix.shape != iy.shape or ix.size < 1 or (np.diff(ix) < 0).any():
            raise PolicyError("the isotonic calibration needs matching increasing knots")
        for name, v in (("cost_scale", cost_scale), ("chain_scale", chain_scale)):
            if not (math.isfinite(v) and v > 0):
                raise PolicyError(f"{name} must be > 0, got {v!r}")
        self.chain_scale = float(chain_scale)
        self.stop_net = stop_net
        self.iso_x, self.iso_y = ix, iy
        self.gain_net = gain_net
        self.cost_scale = float(cost_scale)
        decision_mask(np.zeros((0, N_FEATURES)), decide)  # checks the name
        self.decide = decide
        super().__init__(lam=lam, lam_range=lam_range, aggregate=aggregate, meta=meta)

    def _make_name(self) -> str:
        base = "value-chain" if self.decide == "chain" else self.kind
        return base if self.lam is None else f"{base}-lam{self.lam:g}"

    def p_stop(self, obs: np.ndarray) -> np.ndarray:
        """Calibrated P(correct if stopped now), ``float[B]``."""
        return self._p_stop(self._check_obs(obs))

    def _p_stop(self, x: np.ndarray) -> np.ndarray:
        return _calibrated(self.stop_net, self.iso_x, self.iso_y, expand(x, self.chain_scale))

    def gains(self, obs: np.ndarray) -> np.ndarray:
        """``float[B, 3]``: the gain over stopping of continue, branch, verify at the policy's λ,
        net of their cost (whether or not they are available)."""
        x = self._check_obs(obs)
        return self._gains(x, self._p_stop(x), self.effective_lam)

    def _gains(self, x: np.ndarray, p: np.ndarray, lam: float | np.ndarray) -> np.ndarray:
        lam_b = np.broadcast_to(np.asarray(lam, np.float64), (x.shape[0],))
        xe = expand(x, self.chain_scale)
        return _gains(self.gain_net, xe, p, lam_b, self.lam_range, self.cost_scale)

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """``float[B, 4]``: Q of continue, branch, verify and stop (-inf where unavailable)."""
        x = self._check_obs(obs)
        p = self._p_stop(x)
        q = np.concatenate([p[:, None] + self._gains(x, p, self.effective_lam), p[:, None]], 1)
        return np.where(decision_mask(x, self.decide), q, -np.inf)

    def value(self, obs: np.ndarray) -> np.ndarray:
        """``float[B]``: the best available action's gain over stopping now, net of its cost at
        the policy's λ (0 where only stop is left). Positive: going on pays."""
        x = self._check_obs(obs)
        g = np.where(decision_mask(x, self.decide)[:, :3], self.gains(x), -np.inf).max(axis=1)
        return np.where(np.isfinite(g), g, 0.0)

    def _act(self, obs: np.ndarray) -> np.ndarray:
        return greedy_actions(self.gains(obs), decision_mask(obs, self.decide))[0]

    def _params(self) -> dict[str, Any]:
        return {
            **super()._params(),
            "cost_scale": self.cost_scale,
            "chain_scale": self.chain_scale,
            "decide": self.decide,
            "extra_features": list(EXTRA_FEATURES),
            "stop_activation": self.stop_net.activation,
            "gain_activation": self.gain_net.activation,
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        out = self.stop_net.arrays("stop")
        out["iso.x"], out["iso.y"] = self.iso_x, self.iso_y
        out.update(self.gain_net.arrays("gain"))
        return out

    @classmethod
    def _from_files(cls, files: PolicyFiles) -> Self:
        p, a = files.params, files.arrays
        for k in ("iso.x", "iso.y"):
            if k not in a:
                raise PolicyError(f"{files.path}: the weights lack {k!r}")
        if p.get("extra_features") != list(EXTRA_FEATURES):
            raise PolicyError(
                f"{files.path}: derived features {p.get('extra_features')!r}, this ponder "
                f"computes {list(EXTRA_FEATURES)}; retrain the policy"
            )
        try:
            cost_scale = float(p["cost_scale"])
            chain_scale = float(p["chain_scale"])
        except (KeyError, TypeError, ValueError) as e:
            raise PolicyError(
                f"{files.path}: cost_scale / chain_scale missing or not numbers"
            ) from e
        return cls(
            NumpyMLP.from_arrays(a, "stop", str(p.get("stop_activation", "relu"))),
            a["iso.x"],
            a["iso.y"],
            NumpyMLP.from_arrays(a, "gain", str(p.get("gain_activation", "relu"))),
            cost_scale=cost_scale,
            chain_scale=chain_scale,
            decide=str(p.get("decide", "chunk")),
            meta={k: v for k, v in files.header.items() if k in _META_KEYS},
            **cls._lam_params(p),
        )


def greedy_actions(gains: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(actions, best gain)`` of a value policy: the allowed action (``mask``, ``bool[B, 4]``)
    with the largest gain (``gains``, ``float[B, 3]``), or stop where none is positive. Where
    stop is not allowed (a running chain under ``decide="chain"``) the best allowed action is
    taken whatever its gain."""
    g = np.where(mask[:, :3], gains, -np.inf)
    best = g.max(axis=1)
    go = (best > 0) | ~mask[:, STOP]
    return np.where(go, g.argmax(axis=1), STOP), best


def _calibrated(net: NumpyMLP, iso_x: np.ndarray, iso_y: np.ndarray, x: np.ndarray) -> np.ndarray:
    raw = 1.0 / (1.0 + np.exp(-np.clip(net(x.astype(np.float64))[:, 0], -50, 50)))
    return np.interp(raw, iso_x, iso_y)


def _gain_inputs(
    x: np.ndarray, p: np.ndarray, lam: np.ndarray, lam_range: tuple[float, float]
) -> np.ndarray:
    """What the gain network reads, before the action: the expanded observation, the λ
    feature, the calibrated P_stop."""
    return np.concatenate([x, lam_feature(lam, lam_range)[:, None], p[:, None]], axis=1)


def _with_action(inp: np.ndarray, a: int | np.ndarray) -> np.ndarray:
    onehot = np.zeros((inp.shape[0], 3))
    onehot[np.arange(inp.shape[0]), a] = 1.0
    return np.concatenate([inp, onehot], axis=1)


def _gains(
    net: NumpyMLP,
    x: np.ndarray,
    p: np.ndarray,
    lam: np.ndarray,
    lam_range: tuple[float, float],
    cost_scale: float,
) -> np.ndarray:
    """``float[B, 3]``: ``G = H - λ·cost_scale·C`` of continue, branch and verify."""
    inp = _gain_inputs(x, p, lam, lam_range)
    b = inp.shape[0]
    out = net(np.concatenate([_with_action(inp, a) for a in range(3)], axis=0))
    g = out[:, 0] - np.tile(lam, 3) * cost_scale * out[:, 1]
    return g.reshape(3, b).T


_META_KEYS = ("training", "bank", "lams", "env", "metrics", "created", "ponder_version")


# -- replay helpers -------------------------------------------------------------------------


def correct_now(env: BatchedReplayEnv, info: dict[str, Any]) -> np.ndarray:
    """``bool[B]``: whether stopping now would give a correct answer (``info["correct_now"]``)."""
    v = info.get("correct_now")
    if v is None or np.shape(v) != (env.num_envs,):
        raise PolicyError(
            "the environment reports no info['correct_now']: learned policies need a "
            "BatchedReplayEnv that does (update env.episode.vector)"
        )
    return np.asarray(v, dtype=bool)


@dataclass
class StepOutcome:
    """One step of :class:`ReplayDriver`."""

    next_obs: np.ndarray  # [B, F]: the state after the action (the last one where it ended)
    next_correct: np.ndarray  # [B]: correct if stopped in next_obs (the outcome where ended)
    cost: np.ndarray  # [B]: priced cost of the action
    done: np.ndarray  # [B]: the episode ended
    correct: np.ndarray  # [B]: it ended with a correct answer
    decoded: np.ndarray  # [B]: its decoded tokens (where it ended)
    total_cost: np.ndarray  # [B]: its priced cost (where it ended)


class ReplayDriver:
    """A :class:`BatchedReplayEnv` driven for learning.

    Ended episodes are restarted at once (a partial reset), so every step is a real decision
    (no ignored action on an autoreset step); each step reports the priced cost of the action
    (opening a new episode is not charged to the step before it) and whether stopping would be
    correct, before and after.

    Attributes:
        obs: the current observations (``float32[B, F]``).
        correct_now: whether stopping in ``obs`` would be correct.
        started: episodes that started on the last step (or at construction).
    """

    def __init__(self, env: BatchedReplayEnv, seed: int) -> None:
        self.env = env
        obs, info = env.reset(seed=seed)
        self.obs = obs
        self.correct_now = correct_now(env, info)
        self.started = np.ones(env.num_envs, dtype=bool)
        self._cost = env.cost

    def step(self, actions: np.ndarray) -> StepOutcome:
        env = self.env
        obs, _, term, trunc, info = env.step(np.asarray(actions, dtype=np.int64))
        cost = env.cost
        done = term | trunc
        out = StepOutcome(
            next_obs=obs,
            next_correct=correct_now(env, info),
            cost=cost - self._cost,
            done=done,
            correct=np.zeros(env.num_envs, bool),
            decoded=np.zeros(env.num_envs, np.int64),
            total_cost=np.zeros(env.num_envs),
        )
        if done.any():
            out.correct[done] = info["correct"][done]
            out.next_correct[done] = info["correct"][done]
            out.decoded[done] = info["decoded"][done]
            out.total_cost[done] = info["cost"][done]
            obs, info = env.reset(options={"reset_mask": done})
            self.correct_now = correct_now(env, info)
        else:
            self.correct_now = out.next_correct
        self.obs = obs
        self.started = done
        self._cost = env.cost
        return out


def behaviour_policies(seed: int = 0, max_chains: int = 16) -> list[BasePolicy]:
    """The behaviour policies transitions are collected with: random ones stopping at several
    rates, and every fixed heuristic at a few settings (for states a good policy visits)."""
    ps: list[BasePolicy] = [
        RandomPolicy(seed + i, p) for i, p in enumerate((0.02, 0.05, 0.1, 0.2, 0.4))
    ]
    ps += [
        SingleChain(),
        BestOfN(2),
        BestOfN(4),
        BestOfN(8),
        BestOfN(max_chains),
        BestOfN(4, "verifier"),
        AdaptiveConsistency(0.8, max_chains),
        AdaptiveConsistency(0.95, max_chains),
        DeepConfOnline(max_n=max_chains),
        ProbeAgreement(2),
        BudgetForcing(256),
        BoundedThinking(),
    ]
    if "window_agree" in FEATURE_NAMES:
        ps.append(EarlyStoppingSC(max_chains))
    return ps


class _Mixture:
    """Behaviour policies over groups of episodes, each action replaced by a random available
    one with a per-episode probability ``eps``."""

    def __init__(
        self,
        policies: Sequence[BasePolicy],
        n: int,
        config: EnvConfig,
        eps: Sequence[float],
        seed: int,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.group = np.arange(n) % len(policies)
        rng.shuffle(self.group)
        self.rows = [np.flatnonzero(self.group == g) for g in range(len(policies))]
        self.policies = list(policies)
        for p, r in zip(self.policies, self.rows, strict=True):
            if r.size:
                p.reset(int(r.size), config=config)
        self.eps = rng.choice(np.asarray(eps, np.float64), size=n)
        self.random = RandomPolicy(seed + 1000, p_stop=0.1)
        self.random.reset(n, config=config)
        self.rng = rng

    def act(self, obs: np.ndarray) -> np.ndarray:
        a = np.empty(obs.shape[0], np.int64)
        for p, r in zip(self.policies, self.rows, strict=True):
            if r.size:
                a[r] = p.act(obs[r])
        flip = self.rng.random(obs.shape[0]) < self.eps
        if flip.any():
            a = np.where(flip, self.random.act(obs), a)
        return a

    def end(self, done: np.ndarray) -> None:
        for p, r in zip(self.policies, self.rows, strict=True):
            if r.size:
                p.end(done[r])


@dataclass
class Transitions:
    """Replayed decisions: state, action, its cost, what followed."""

    obs: np.ndarray  # float32[N, F]
    action: np.ndarray  # int64[N]
    cost: np.ndarray  # float64[N]: priced cost of the action
    next_obs: np.ndarray  # float32[N, F]
    done: np.ndarray  # bool[N]: the action ended the episode
    correct: np.ndarray  # bool[N]: correct if stopped in obs
    next_correct: np.ndarray  # bool[N]: correct if stopped in next_obs (the outcome if done)
    question: np.ndarray  # int64[N]: question index (into the env's questions)
    row: np.ndarray  # int64[N]: the environment slot the episode ran in
    step: np.ndarray  # int64[N]: the collection step (a slot's next decision is at step + 1)

    def concat(self, other: Transitions) -> Transitions:
        """Both sets; ``other``'s steps are shifted so that no episode runs across them."""
        shift = int(self.step.max()) + 2 if len(self) else 0
        parts = {k: np.concatenate([getattr(self, k), getattr(other, k)]) for k in _TR_FIELDS}
        parts["step"] = np.concatenate([self.step, other.step + shift])
        return Transitions(**parts)

    def expanded(self, chain_scale: float) -> Transitions:
        """The same transitions with :func:`expand`'s features appended to the states."""
        return dataclasses.replace(
            self, obs=expand(self.obs, chain_scale), next_obs=expand(self.next_obs, chain_scale)
        )

    def successors(self) -> np.ndarray:
        """``int64[N]``: the index of the same episode's next transition (-1: it ended, or its
        next decision was not kept or not collected)."""
        n_steps = int(self.step.max()) + 2 if len(self) else 1
        n_rows = int(self.row.max()) + 1 if len(self) else 1
        pos = np.full((n_steps, n_rows), -1, np.int64)
        pos[self.step, self.row] = np.arange(len(self))
        nxt = pos[self.step + 1, self.row]
        return np.where(self.done, -1, nxt)

    def __len__(self) -> int:
        return int(self.action.shape[0])


_TR_FIELDS = tuple(f.name for f in dataclasses.fields(Transitions))


def collect_transitions(
    env: BatchedReplayEnv,
    n: int,
    *,
    seed: int = 0,
    eps: Sequence[float] = (0.0, 0.1, 0.3),
    policies: Sequence[BasePolicy] | None = None,
    progress: bool = False,
) -> Transitions:
    """At least ``n`` transitions from ``env`` under a mix of behaviour policies.

    Only decisions whose action could run are kept (a behaviour that picks an unavailable
    action ends its episode; the learned policies never do).
    """
    drv = ReplayDriver(env, seed)
    beh = (
        list(policies) if policies is not None else behaviour_policies(seed, env.config.max_chains)
    )
    mix = _Mixture(beh, env.num_envs, env.config, eps, seed)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _TR_FIELDS}
    got = 0
    bar = _bar(n, "collect", progress)
    slots = np.arange(env.num_envs)
    step = 0
    while got < n:
        obs, cn = drv.obs, drv.correct_now
        q = env.episode_questions
        a = mix.act(obs)
        ok = available(obs)[np.arange(obs.shape[0]), a]
        out = drv.step(a)
        mix.end(out.done)
        for k, v in (
            ("obs", obs),
            ("action", a),
            ("cost", out.cost),
            ("next_obs", out.next_obs),
            ("done", out.done),
            ("correct", cn),
            ("next_correct", out.next_correct),
            ("question", q),
            ("row", slots),
            ("step", np.full(env.num_envs, step)),
        ):
            parts[k].append(np.asarray(v)[ok])
        step += 1
        got += int(ok.sum())
        bar.update(int(ok.sum()))
    bar.close()
    return Transitions(**{k: np.concatenate(v) for k, v in parts.items()})


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, on: bool) -> Any:
    if not on:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", smoothing=0.1)


def rollout_pinned(
    policy: Any,
    env: BatchedReplayEnv,
    *,
    lam: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """One episode per environment slot, pinned: slot ``i`` answers question
    ``i % len(env.questions)`` with chain order ``i // len(env.questions)`` (a generator seed),
    so every policy sees the same episodes. Returns accuracy, mean decoded tokens, mean priced
    cost and mean reward ``correct - lam * cost`` (``lam``: the env's if not given)."""
    b = env.num_envs
    nq = len(env.questions)
    qs = np.arange(b) % nq
    gs = np.arange(b) // nq
    out = run_pinned(policy, env, qs, gs, ("correct", "decoded", "cost"), seed=seed)
    correct, dec, cost = out["correct"], out["decoded"].astype(float), out["cost"]
    price = env.config.lam if lam is None else lam
    return {
        "accuracy": float(correct.mean()),
        "tokens": float(dec.mean()),
        "cost": float(cost.mean()),
        "reward": float((correct - price * cost).mean()),
    }


# -- training -------------------------------------------------------------------------------


@dataclass
class ValueArgs:
    """Train a :class:`ValuePolicy` (calibrated stop classifier + fitted-Q gains) on a bank."""

    bank: str = "data/banks/testbed-arith"
    """trace bank folder to replay"""
    out: str = "models/policies/value"
    """folder to write the policy to (policy.json + weights.safetensors)"""
    split: str = "train"
    """question split to train on (``fit`` to tune on ``dev``: see :func:`env.questions.select_split`)"""
    lams: tuple[float, ...] = DEFAULT_LAMS
    """λ grid (price of a token in correct answers) the gains are trained over"""
    seed: int = 0
    """seed of the replay, the behaviour policies and the networks"""
    num_envs: int = 512
    """episodes replayed at once while collecting"""
    transitions: int = 200_000
    """decisions to collect"""
    eps: tuple[float, ...] = (0.0, 0.1, 0.3)
    """per-episode chances of a random action mixed into the behaviour policies"""
    calib_fraction: float = 0.25
    """share of training questions held out to calibrate the stop classifier"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden layer sizes of every network"""
    stop_epochs: int = 30
    """epochs of the stop classifier"""
    decide: str = "chunk"
    """where the policy decides: chunk (every chunk: it may cut a chain or stop mid-chain on a probe) or chain (only between chains; a chain always runs to its end)"""
    fqi_iters: int = 10
    """fitted-Q iterations"""
    epochs: int = 20
    """epochs of the gain regressors in the first iteration"""
    epochs_per_iter: int = 8
    """epochs of each later iteration (warm-started)"""
    lam_samples: int = 2
    """λ values drawn from the grid per transition"""
    rounds: int = 3
    """fitting rounds; each after the first adds transitions from the greedy policy (data aggregation)"""
    refresh: float = 0.5
    """transitions added per extra round, as a share of ``transitions``"""
    trace: float = 0.9
    """Watkins Q(λ) trace: how much of the recorded episode's return a backup carries (0: one-step FQI)"""
    max_rows: int = 400_000
    """cap on regression rows (transitions are subsampled above it)"""
    eval_seeds: int = 8
    """episodes per held-out question in the final evaluation (test; dev when training on fit; 0: none)"""
    threads: int = 1
    """BLAS threads"""
    progress: bool = True
    """show progress bars"""
    difficulty: str | None = None
    """difficulty predictor of the replay: None (the feature is 0.5) or auto (fitted on the bank's train questions)"""
    config: dict[str, Any] = field(default_factory=dict)
    """EnvConfig fields for the replay (chunking is the bank's)"""


def _mlp(kind: str, args: ValueArgs, epochs: int, seed: int) -> Any:
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    cls = MLPClassifier if kind == "clf" else MLPRegressor
    return cls(
        hidden_layer_sizes=tuple(args.hidden),
        activation="relu",
        alpha=1e-4,
        batch_size=512,
        learning_rate_init=1e-3,
        max_iter=max(1, epochs),
        shuffle=True,
        random_state=seed,
        warm_start=True,
        tol=0.0,
        n_iter_no_change=max(1, epochs) + 1,
    )


def _split_questions(nq: int, frac: float, seed: int) -> np.ndarray:
    """``bool[nq]``: the held-out (calibration) questions, at least one, never all."""
    if nq < 2:
        raise ConfigError("calibration needs at least 2 training questions")
    k = min(nq - 1, max(1, round(frac * nq)))
    held = np.zeros(nq, bool)
    held[np.random.default_rng(seed).permutation(nq)[:k]] = True
    return held


def _fit_stop(
    tr: Transitions, held_q: np.ndarray, args: ValueArgs, seed: int
) -> tuple[NumpyMLP, np.ndarray, np.ndarray, dict[str, float]]:
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import brier_score_loss, roc_auc_score

    held = held_q[tr.question]
    x = tr.obs.astype(np.float64)
    y = tr.correct.astype(np.int64)
    fit_x, fit_y = x[~held], y[~held]
    mean = fit_x.mean(axis=0)
    scale = fit_x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    clf = _mlp("clf", args, args.stop_epochs, seed)
    if len(np.unique(fit_y)) < 2:
        raise ConfigError(
            "the stop classifier needs both correct and wrong stops in the training questions"
        )
    clf.fit(((fit_x - mean) / scale).astype(np.float32), fit_y)
    net = NumpyMLP.from_sklearn(clf, mean, scale)
    raw = 1.0 / (1.0 + np.exp(-np.clip(net(x[held])[:, 0], -50, 50)))
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
    iso.fit(raw, y[held])
    ix = np.asarray(iso.X_thresholds_, np.float64)
    iy = np.asarray(iso.y_thresholds_, np.float64)
    cal = np.interp(raw, ix, iy)
    m = {
        "train/stop_brier_heldout_raw": float(brier_score_loss(y[held], raw)),
        "train/stop_brier_heldout": float(brier_score_loss(y[held], cal)),
    }
    if len(np.unique(y[held])) == 2:
        m["train/stop_auroc_heldout"] = float(roc_auc_score(y[held], raw))
    return net, ix, iy, m


def train_value_policy(
    bank: str | Path | TraceBank,
    *,
    split: str = "train",
    lams: Sequence[float] = DEFAULT_LAMS,
    seed: int = 0,
    difficulty: Any = None,
    **kwargs: Any,
) -> ValuePolicy:
    """Train a :class:`ValuePolicy` on the ``split`` questions of ``bank``.

    ``difficulty`` is the replay's difficulty predictor (``None``: the feature is 0.5,
    ``"auto"``, or a fitted predictor such as :class:`~env.episode.difficulty.DifficultyModel`); the
    policy must then run with the same one. ``kwargs`` are the other fields of
    :class:`ValueArgs` (``transitions``, ``fqi_iters``, ``rounds``, ...).
    """
    b = bank if isinstance(bank, TraceBank) else TraceBank(bank)
    kwargs.pop("out", None)
    predictor, difficulty = split_difficulty(difficulty)
    args = ValueArgs(
        bank=str(b.path),
        split=split,
        lams=tuple(lams),
        seed=seed,
        difficulty=difficulty,
        **kwargs,
    )
    return _train_value(args, b, predictor)


def split_difficulty(difficulty: Any) -> tuple[Any, Any]:
    """``(predictor object or None, the name recorded in the training args)`` of a trainer's
    ``difficulty`` argument (``None``, ``"auto"``, or a fitted predictor)."""
    if difficulty is not None and not isinstance(difficulty, str):
        return difficulty, type(difficulty).__name__
    return None, difficulty


def lam_grid(lams: Sequence[float]) -> np.ndarray:
    """The sorted λ grid a learned policy trains over (positive prices only)."""
    grid = np.asarray(sorted(lams), np.float64)
    if grid.size < 1 or (grid <= 0).any():
        raise ConfigError(f"lams must be positive prices, got {lams}")
    return grid


def _train_value(args: ValueArgs, bank: TraceBank, predictor: Any = None) -> ValuePolicy:
    from threadpoolctl import threadpool_limits

    lams = lam_grid(args.lams)
    decision_mask(np.zeros((0, N_FEATURES)), args.decide)  # checks the name
    if args.rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {args.rounds}")
    lam_range = (float(lams[0]), float(lams[-1]))
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    env = BatchedReplayEnv(
        bank,
        args.num_envs,
        split=args.split,
        seed=args.seed,
        difficulty=predictor if predictor is not None else args.difficulty,
        **args.config,
    )
    cost_scale = float(env.config.chunk_tokens + env.config.probe_tokens)
    chain_scale = chain_scale_of(env.config)
    tr = collect_transitions(
        env, args.transitions, seed=args.seed, eps=args.eps, progress=args.progress
    )
    t_collect = time.perf_counter() - t0
    log.info("collected %d transitions in %.1fs", len(tr), t_collect)
    held_q = _split_questions(len(env.questions), args.calib_fraction, args.seed)
    metrics: dict[str, float] = {}
    policy: ValuePolicy | None = None
    for rnd in range(args.rounds):
        if policy is not None:
            # Data aggregation: the states the greedy policy reaches (at λ from the grid),
            # which the behaviour policies may rarely visit, with their true outcomes.
            t1 = time.perf_counter()
            greedy = _RowLamPolicy(policy, lams, args.seed + rnd)
            more = collect_transitions(
                env,
                int(args.transitions * args.refresh),
                seed=args.seed + rnd,
                eps=args.eps,
                policies=[greedy],
                progress=args.progress,
            )
            tr = tr.concat(more)
            t_collect += time.perf_counter() - t1
        xt = tr.expanded(chain_scale)
        with threadpool_limits(args.threads), warnings.catch_warnings():
            from sklearn.exceptions import ConvergenceWarning

            warnings.simplefilter("ignore", ConvergenceWarning)
            stop_net, ix, iy, m = _fit_stop(xt, held_q, args, args.seed + rnd)
            metrics.update(m)

            def p_stop(
                x: np.ndarray,
                net: NumpyMLP = stop_net,
                ix: np.ndarray = ix,
                iy: np.ndarray = iy,
            ) -> np.ndarray:
                return _calibrated(net, ix, iy, x)

            gain_net, m = _fit_gains(xt, p_stop, lams, lam_range, cost_scale, args, rng)
            metrics.update(m)
        policy = ValuePolicy(
            stop_net,
            ix,
            iy,
            gain_net,
            cost_scale=cost_scale,
            chain_scale=chain_scale,
            decide=args.decide,
            lam=None,
            lam_range=lam_range,
            aggregate=env.config.aggregate,
        )
        log.info("round %d/%d: %d transitions, %s", rnd + 1, args.rounds, len(tr), m)
    assert policy is not None
    metrics["train/transitions"] = float(len(tr))
    metrics["train/collect_s"] = t_collect
    metrics["train/wall_s"] = time.perf_counter() - t0
    _finish_training(policy, "fitted-q-iteration", args, bank, env, lams, metrics, predictor)
    log.info("value policy trained in %.1fs: %s", metrics["train/wall_s"], policy.meta["metrics"])
    return policy


class _RowLamPolicy(BasePolicy):
    """A value policy acting greedily for a price per episode, drawn from the grid whenever an
    episode starts (to collect the states it reaches across the frontier)."""

    name = "value-greedy"

    def __init__(self, policy: ValuePolicy, lams: np.ndarray, seed: int) -> None:
        self.policy = policy
        self.lams = lams
        self.rng = np.random.default_rng(seed)
        super().__init__()

    def _reset_state(self, n: int) -> None:
        self.lam = self.rng.choice(self.lams, size=n)

    def _clear(self, done: np.ndarray) -> None:
        self.lam[done] = self.rng.choice(self.lams, size=int(done.sum()))

    def _act(self, obs: np.ndarray) -> np.ndarray:
        p = self.policy._p_stop(obs)
        g = self.policy._gains(obs, p, self.lam)
        return greedy_actions(g, decision_mask(obs, self.policy.decide))[0]


def _fit_gains(
    tr: Transitions,
    p_stop: Any,
    lams: np.ndarray,
    lam_range: tuple[float, float],
    cost_scale: float,
    args: ValueArgs,
    rng: np.random.Generator,
) -> tuple[NumpyMLP, dict[str, float]]:
    """Fitted-Q iteration for the gains of continue, branch and verify over stopping.

    The regression targets are ``H = Y - P(s)`` and ``C = Δcost / cost_scale``, where ``Y`` is
    the Q(λ) return of the transition at a price λ of the grid (:func:`_q_returns`).
    """
    k = max(1, args.lam_samples)
    p_s = p_stop(tr.obs)
    p_n = p_stop(tr.next_obs)
    nxt = tr.successors()
    idx = np.flatnonzero(tr.action != STOP)
    if idx.size == 0:
        raise ConfigError("no transition continued, branched or verified: nothing to learn from")
    if idx.size * k > args.max_rows:
        idx = rng.choice(idx, args.max_rows // k, replace=False)
    rows = np.repeat(idx, k)
    li = rng.integers(len(lams), size=rows.size)
    x = _with_action(_gain_inputs(tr.obs[rows], p_s[rows], lams[li], lam_range), tr.action[rows])
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd[sd < 1e-6] = 1.0
    xs = ((x - mu) / sd).astype(np.float32)
    model = _mlp("reg", args, args.epochs, args.seed + 10)
    net: NumpyMLP | None = None
    metrics: dict[str, float] = {}
    bar = _bar(args.fqi_iters, "fqi", args.progress)
    for it in range(args.fqi_iters):
        y_all = _q_returns(tr, nxt, p_n, net, lams, lam_range, cost_scale, args.trace, args.decide)
        y = np.stack([y_all[rows, li] - p_s[rows], tr.cost[rows] / cost_scale], axis=1)
        if it > 0:
            model.max_iter = max(1, args.epochs_per_iter)
            model.n_iter_no_change = model.max_iter + 1
        model.fit(xs, y.astype(np.float32))
        net = NumpyMLP.from_sklearn(model, mu, sd)
        resid = net(x)[:, 0] - y[:, 0]
        metrics["train/fqi_rmse"] = float(np.sqrt(np.mean(resid**2)))
        metrics["train/fqi_target_std"] = float(y[:, 0].std())
        bar.update(1)
        bar.set_postfix_str(f"rmse={metrics['train/fqi_rmse']:.4f}")
    bar.close()
    metrics["train/fqi_rows"] = float(rows.size)
    assert net is not None
    return net, metrics


def _q_returns(
    tr: Transitions,
    nxt: np.ndarray,
    p_n: np.ndarray,
    net: NumpyMLP | None,
    lams: np.ndarray,
    lam_range: tuple[float, float],
    cost_scale: float,
    trace: float,
    decide: str = "chunk",
) -> np.ndarray:
    """``float[N, L]``: each transition's return ``Y`` at each λ of the grid.

    ``Y_t = -λ·Δcost_t + V_{t+1}``. Where the episode ended, ``V`` is the realised correctness.
    Otherwise the one-step backup is ``B = min(1, P(s') + max(0, max_a' G_a'(s')))`` over the
    actions available in ``s'`` (``P(s')`` before any network is fitted), and Watkins's Q(λ)
    carries the rest of the recorded episode along while it acts greedily:
    ``V = (1 - trace)·B + trace·Y_{t+1}`` if the next recorded action is the greedy non-stop
    one (in the first iteration: any non-stop one), else ``V = B``. Chains run for many
    decisions: a one-step backup alone would need as many iterations to see a chain's end.
    Under ``decide="chain"`` a running chain must go on: there ``B = min(1, P(s') +
    G_continue(s'))`` even when that gain is negative, and the greedy action is continue.
    """
    n, n_l = len(tr), len(lams)
    live = np.flatnonzero(~tr.done)
    boot = np.repeat(np.where(tr.done, tr.next_correct, p_n).astype(np.float64)[:, None], n_l, 1)
    follow = np.zeros((n, n_l), bool)
    has_next = nxt >= 0
    if net is not None:
        mask = decision_mask(tr.next_obs[live], decide)
        forced = ~mask[:, STOP]
        for j, lam in enumerate(lams):
            g = _gains(
                net, tr.next_obs[live], p_n[live], np.full(live.size, lam), lam_range, cost_scale
            )
            greedy, best = greedy_actions(g, mask)
            gain = np.where(forced, best, np.maximum(best, 0.0))
            boot[live, j] = np.minimum(1.0, p_n[live] + gain)
            nl = nxt[live]
            ok = has_next[live]
            follow[live[ok], j] = (tr.action[nl[ok]] == greedy[ok]) & (greedy[ok] != STOP)
    else:
        follow[has_next] = (tr.action[nxt[has_next]] != STOP)[:, None]
    y = np.zeros((n, n_l))
    cost = tr.cost[:, None] * lams[None, :]
    order = np.argsort(-tr.step, kind="stable")  # later steps first: Y_{t+1} is ready
    bounds = np.flatnonzero(np.diff(tr.step[order])) + 1
    for idx in np.split(order, bounds):
        v = boot[idx]
        f = follow[idx]
        if trace > 0 and f.any():
            yn = y[np.maximum(nxt[idx], 0)]
            v = np.where(f, (1.0 - trace) * v + trace * yn, v)
        y[idx] = v - cost[idx]
    return y


def _finish_training(
    policy: LearnedPolicy,
    algo: str,
    args: Any,
    bank: TraceBank,
    env: BatchedReplayEnv,
    lams: np.ndarray,
    metrics: dict[str, float],
    predictor: Any,
) -> None:
    """Record how ``policy`` was trained in its ``meta`` (the arguments, the bank's questions,
    the λ grid, the env, the training metrics) and, with ``args.eval_seeds``, add its held-out
    metrics (:func:`_final_eval`). ``args`` is the trainer's arguments dataclass."""
    policy.meta = {
        "training": {"algo": algo, **asdict(args)},
        "bank": bank_fingerprint(bank, [q.qid for q in env.questions]),
        "lams": [float(v) for v in lams],
        "env": env_config_dict(env.config),
        "metrics": metrics,
    }
    if args.eval_seeds > 0:
        held_out = "dev" if args.split == "fit" else "test"
        difficulty = predictor if predictor is not None else args.difficulty
        metrics.update(
            _final_eval(policy, bank, held_out, args.eval_seeds, lams, args.config, difficulty)
        )


def _final_eval(
    policy: LearnedPolicy,
    bank: TraceBank,
    split: str,
    seeds: int,
    lams: np.ndarray,
    config: dict[str, Any],
    difficulty: Any = None,
) -> dict[str, float]:
    """Accuracy and tokens on the held-out ``split`` (``test``, or ``dev`` for a policy trained
    on ``fit``), if the bank has any, at the grid's ends and middle."""
    from env.questions import select_split

    nq = len(select_split(bank.questions, split))
    if not nq:
        return {}
    env = BatchedReplayEnv(bank, nq * seeds, split=split, seed=0, difficulty=difficulty, **config)
    out: dict[str, float] = {}
    for lam in _eval_lams(lams):
        r = rollout_pinned(policy.with_lam(lam), env, lam=lam)
        for k, v in r.items():
            out[f"eval/{k}@{lam:g}"] = v
    return out


def _eval_lams(lams: np.ndarray) -> list[float]:
    return sorted({float(lams[0]), float(lams[len(lams) // 2]), float(lams[-1])})
