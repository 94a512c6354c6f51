"""A PPO policy over all four actions, trained on replayed episodes, run in numpy.

:func:`train_ppo` (and ``ponder train ppo``, ``python -m policies.learned ppo``) is CleanRL's
single-file PPO (GAE, clipped surrogate, value loss, entropy bonus,
minibatches, annealed learning rate, gradient clipping) on a
:class:`~env.episode.vector.BatchedReplayEnv` over a bank's training questions, with two additions:

* invalid-action masking: the logits of actions the observation says cannot run
  (``can_continue`` / ``can_branch`` / ``can_verify``) are set to a large negative number
  (stop is always available);
* λ conditioning: each episode draws its price λ from a grid, ``log10 λ`` (scaled) is appended
  to the observation, and the reward is ``-λ · Δcost`` per step plus 1 for a correct answer at
  the end, so one network serves the whole frontier (:meth:`PPOPolicy.with_lam`).

The critic has a second head, trained on the side to predict whether stopping now would be
correct: :meth:`PPOPolicy.value` is the critic's value minus that probability (the expected gain
from going on rather than stopping, what the controller's fleet mode ranks by).

The trained networks are exported as arrays: :class:`PPOPolicy` acts in numpy (no torch to
load), deterministically (argmax of the masked logits) unless told to sample.

As in CleanRL, :class:`PPOArgs` is the whole configuration, seeding comes first and metrics are
namespaced ``train/...`` and ``eval/...``. The base class and the observation rules are
:mod:`policies.learned.base`'s; the replay is :mod:`policies.learned.replay`'s.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from env.bank.store import TraceBank
from env.episode.observation import N_FEATURES
from features.errors import ConfigError, PolicyError
from policies.learned.base import (
    DEFAULT_LAMS,
    LearnedPolicy,
    TrainArgs,
    check_decide,
    decision_mask,
    lam_grid,
    sigmoid,
)
from policies.learned.replay import (
    ReplayDriver,
    finish_training,
    progress_bar,
    replay_env,
    trainer_args,
)
from policies.serialize import NumpyMLP, PolicyFiles, lam_feature

__all__ = ["PPOArgs", "PPOPolicy", "lam_sampler", "train_ppo"]

log = logging.getLogger(__name__)

_MASKED = -1e9


@dataclass
class PPOArgs(TrainArgs):
    """Train a PPOPolicy (a masked actor-critic) with PPO on a bank's replayed episodes."""

    out: str = "models/policies/ppo"
    """folder to write the policy to (policy.json + weights.safetensors)"""
    lam_sampling: str = "grid"
    """how an episode draws its λ: grid (one of lams) or log-uniform (anywhere between the smallest and the largest, uniform in log λ; on the dev questions, 3 seeds, it lowered chunk-level PPO's frontier area on testbed-arith-xl from 49.1 to 46.0 and left GSM8K's as it was, 68.5 against 68.6)"""
    total_steps: int = 2_000_000
    """decisions to train on"""
    num_steps: int = 32
    """steps per environment per rollout"""
    learning_rate: float = 3e-4
    """Adam learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0"""
    gamma: float = 1.0
    """discount (episodes are short and end for sure)"""
    gae_lambda: float = 0.95
    """GAE λ"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 4
    """epochs per rollout"""
    clip_coef: float = 0.2
    """PPO clipping coefficient"""
    ent_coef: float = 0.02
    """entropy bonus"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    aux_coef: float = 0.5
    """coefficient of the stop-correctness head's loss"""
    max_grad_norm: float = 0.5
    """gradient clipping norm"""
    target_kl: float | None = None
    """stop an update's epochs once the approximate KL passes this"""
    hidden: int = 64
    """width of the two hidden layers of the actor and of the critic"""
    action_prior: tuple[float, float, float, float] = (0.6, 0.15, 0.1, 0.15)
    """initial action probabilities (continue, branch, verify, stop); uniform ones rarely continue a chain to its end"""


class PPOPolicy(LearnedPolicy):
    """An actor-critic trained by PPO (see the module docstring).

    Args:
        actor: observation + λ feature -> 4 logits (continue, branch, verify, stop).
        critic: observation + λ feature -> (value, logit of "stopping now is correct").
        deterministic: act by the argmax of the masked logits (else sample them).
        seed: seeds the sampling.
        decide: ``chunk`` (at every chunk) or ``chain`` (only between chains; see
            :func:`decision_mask`): as it was trained.
        lam, lam_range, aggregate, meta: see :class:`~policies.learned.base.LearnedPolicy`.
    """

    kind = "ppo"
    version = 1

    def __init__(
        self,
        actor: NumpyMLP,
        critic: NumpyMLP,
        *,
        deterministic: bool = True,
        seed: int = 0,
        decide: str = "chunk",
        lam: float | None = None,
        lam_range: tuple[float, float] = (DEFAULT_LAMS[0], DEFAULT_LAMS[-1]),
        aggregate: str = "majority",
        meta: dict[str, Any] | None = None,
    ) -> None:
        if actor.n_in != N_FEATURES + 1 or actor.n_out != 4:
            raise PolicyError(
                f"the actor maps {actor.n_in} -> {actor.n_out}, expected {N_FEATURES + 1} -> 4"
            )
        if critic.n_in != N_FEATURES + 1 or critic.n_out != 2:
            raise PolicyError(
                f"the critic maps {critic.n_in} -> {critic.n_out}, expected {N_FEATURES + 1} -> 2"
            )
        self.actor = actor
        self.critic = critic
        self.deterministic = bool(deterministic)
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        super().__init__(
            decide=decide, lam=lam, lam_range=lam_range, aggregate=aggregate, meta=meta
        )

    def _reset_clone(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def logits(self, obs: np.ndarray) -> np.ndarray:
        """``float[B, 4]``: the masked logits (unavailable actions at -1e9)."""
        x = self._check_obs(obs)
        return np.where(decision_mask(x, self.decide), self.actor(self._inputs(x)), _MASKED)

    def probs(self, obs: np.ndarray) -> np.ndarray:
        """``float[B, 4]``: the action probabilities (0 for unavailable actions)."""
        z = self.logits(obs)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def value(self, obs: np.ndarray) -> np.ndarray:
        """``float[B]``: the critic's expected return from here (correct answer minus λ·future
        cost) minus the probability that stopping now is correct: what going on gains."""
        x = self._check_obs(obs)
        out = self.critic(self._inputs(x))
        return out[:, 0] - sigmoid(out[:, 1])

    def _act(self, obs: np.ndarray) -> np.ndarray:
        if self.deterministic:
            return self.logits(obs).argmax(axis=1)
        p = self.probs(obs)
        u = self.rng.random((p.shape[0], 1))
        return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), 3)

    def _params(self) -> dict[str, Any]:
        return {
            **super()._params(),
            "deterministic": self.deterministic,
            "seed": self.seed,
            "decide": self.decide,
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return {**self.actor.arrays("actor"), **self.critic.arrays("critic")}

    @classmethod
    def _from_files(cls, files: PolicyFiles) -> Self:
        p, a = files.params, files.arrays
        return cls(
            NumpyMLP.from_arrays(a, "actor", "tanh"),
            NumpyMLP.from_arrays(a, "critic", "tanh"),
            deterministic=bool(p.get("deterministic", True)),
            seed=int(p.get("seed", 0)),
            **cls._base_params(files),
        )


def _agent(n_in: int, hidden: int, prior: Sequence[float]) -> Any:
    import torch
    from torch import nn

    def layer(i: int, o: int, std: float = math.sqrt(2)) -> nn.Linear:
        lin = nn.Linear(i, o)
        nn.init.orthogonal_(lin.weight, std)
        nn.init.constant_(lin.bias, 0.0)
        return lin

    class Agent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.actor = nn.Sequential(
                layer(n_in, hidden), nn.Tanh(), layer(hidden, hidden), nn.Tanh(),
                layer(hidden, 4, 0.01),
            )  # fmt: skip
            self.critic = nn.Sequential(
                layer(n_in, hidden), nn.Tanh(), layer(hidden, hidden), nn.Tanh(),
                layer(hidden, 2, 1.0),
            )  # fmt: skip

        def dist(self, x: torch.Tensor, mask: torch.Tensor) -> Any:
            logits = torch.where(mask, self.actor(x), torch.full_like(mask, _MASKED, dtype=x.dtype))
            return torch.distributions.Categorical(logits=logits)

    agent = Agent()
    head: Any = agent.actor[-1]
    with torch.no_grad():
        p = torch.tensor(prior, dtype=torch.float32)
        head.bias.copy_(torch.log(p / p.sum()))
    return agent


def _export(seq: Any) -> NumpyMLP:
    lins = [m for m in seq if hasattr(m, "weight")]
    return NumpyMLP(
        [m.weight.detach().cpu().numpy().T.astype(np.float64) for m in lins],
        [m.bias.detach().cpu().numpy().astype(np.float64) for m in lins],
        "tanh",
    )


def train_ppo(
    bank: str | Path | TraceBank,
    *,
    split: str = "train",
    total_steps: int = 2_000_000,
    lams: Sequence[float] = DEFAULT_LAMS,
    seed: int = 0,
    difficulty: Any = None,
    **kwargs: Any,
) -> PPOPolicy:
    """Train a :class:`PPOPolicy` on the ``split`` questions of ``bank``.

    ``difficulty`` is the replay's difficulty predictor (``None``: the feature is 0.5,
    ``"auto"``, or a fitted predictor); the policy must then run with the same one. ``kwargs``
    are the other fields of :class:`PPOArgs` (``num_envs``, ``num_steps``, ...).
    """
    args, b, predictor = trainer_args(
        PPOArgs,
        bank,
        difficulty,
        split=split,
        total_steps=total_steps,
        lams=tuple(lams),
        seed=seed,
        **kwargs,
    )
    return _train_ppo(args, b, predictor)


def lam_sampler(
    how: str, lams: np.ndarray, rng: np.random.Generator
) -> Callable[[int], np.ndarray]:
    """Draws episodes' λ: from the grid, or log-uniformly over its range (so the λ-conditioned
    network is trained between the grid's values too, where a sweep may evaluate it)."""
    if how == "grid":
        return lambda k: rng.choice(lams, size=k)
    if how == "log-uniform":
        lo, hi = np.log10(lams[0]), np.log10(lams[-1])
        return lambda k: 10.0 ** rng.uniform(lo, hi, size=k)
    raise ConfigError(f"lam_sampling must be grid or log-uniform, got {how!r}")


def _train_ppo(args: PPOArgs, bank: TraceBank, predictor: Any = None) -> PPOPolicy:
    import random

    import torch

    lams = lam_grid(args.lams)
    check_decide(args.decide)
    if args.num_envs * args.num_steps < args.num_minibatches:
        raise ConfigError("num_envs * num_steps must be at least num_minibatches")
    lam_range = (float(lams[0]), float(lams[-1]))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.threads))
    rng = np.random.default_rng(args.seed)
    draw_lams = lam_sampler(args.lam_sampling, lams, rng)

    t0 = time.perf_counter()
    env = replay_env(bank, args, predictor)
    drv = ReplayDriver(env, args.seed)
    n, steps = args.num_envs, args.num_steps
    batch = n * steps
    mb = batch // args.num_minibatches
    n_updates = max(1, args.total_steps // batch)
    n_in = N_FEATURES + 1
    if len(args.action_prior) != 4 or min(args.action_prior) <= 0:
        raise ConfigError(f"action_prior needs 4 positive weights, got {args.action_prior}")
    agent = _agent(n_in, args.hidden, args.action_prior)
    opt = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)

    lam_env = draw_lams(n)

    def inputs(obs: np.ndarray) -> np.ndarray:
        z = lam_feature(lam_env, lam_range).astype(np.float32)
        return np.concatenate([obs.astype(np.float32), z[:, None]], axis=1)

    buf_x = np.zeros((steps, n, n_in), np.float32)
    buf_m = np.zeros((steps, n, 4), bool)
    buf_a = np.zeros((steps, n), np.int64)
    buf_lp = np.zeros((steps, n), np.float32)
    buf_r = np.zeros((steps, n), np.float32)
    buf_d = np.zeros((steps, n), np.float32)
    buf_v = np.zeros((steps, n), np.float32)
    buf_c = np.zeros((steps, n), np.float32)
    buf_f = np.zeros((steps, n), bool)  # forced: the mask left one action
    chain_level = args.decide == "chain"
    recent: deque[tuple[float, float, float]] = deque(maxlen=2000)
    metrics: dict[str, float] = {}
    bar = progress_bar(n_updates * batch, "ppo", args.progress)
    t_start = time.perf_counter()
    x = inputs(drv.obs)
    for update in range(n_updates):
        if args.anneal_lr:
            opt.param_groups[0]["lr"] = args.learning_rate * (1.0 - update / n_updates)
        for t in range(steps):
            mask = decision_mask(drv.obs, args.decide)
            buf_x[t], buf_m[t], buf_c[t] = x, mask, drv.correct_now
            buf_f[t] = chain_level & (mask.sum(axis=1) == 1)
            with torch.no_grad():
                xt = torch.from_numpy(x)
                d = agent.dist(xt, torch.from_numpy(mask))
                a = d.sample()
                buf_lp[t] = d.log_prob(a).numpy()
                buf_v[t] = agent.critic(xt)[:, 0].numpy()
            buf_a[t] = a.numpy()
            out = drv.step(buf_a[t])
            buf_r[t] = -lam_env * out.cost + out.done * out.correct
            buf_d[t] = out.done
            if out.done.any():
                i = np.flatnonzero(out.done)
                ret = out.correct[i] - lam_env[i] * out.total_cost[i]
                recent.extend(zip(ret, out.correct[i], out.decoded[i], strict=True))
                lam_env[i] = draw_lams(i.size)
            x = inputs(drv.obs)
        # GAE over the rollout; an episode that ended at t does not bootstrap from t + 1. When
        # deciding between chains, a forced step (no choice) is seen through (GAE λ = 1 into
        # it): the decision before it is credited with everything up to the next real one,
        # however many chunks apart.
        with torch.no_grad():
            next_v = agent.critic(torch.from_numpy(x))[:, 0].numpy()
        next_f = chain_level & (decision_mask(drv.obs, args.decide).sum(axis=1) == 1)
        adv = np.zeros((steps, n), np.float32)
        last = np.zeros(n, np.float32)
        for t in reversed(range(steps)):
            nv = next_v if t == steps - 1 else buf_v[t + 1]
            nf = next_f if t == steps - 1 else buf_f[t + 1]
            live = 1.0 - buf_d[t]
            delta = buf_r[t] + args.gamma * nv * live - buf_v[t]
            lam_t = np.where(nf, 1.0, args.gae_lambda).astype(np.float32)
            last = delta + args.gamma * lam_t * live * last
            adv[t] = last
        ret_t = torch.from_numpy((adv + buf_v).reshape(-1))
        adv_t = torch.from_numpy(adv.reshape(-1))
        bx = torch.from_numpy(buf_x.reshape(-1, n_in))
        bm = torch.from_numpy(buf_m.reshape(-1, 4))
        ba = torch.from_numpy(buf_a.reshape(-1))
        blp = torch.from_numpy(buf_lp.reshape(-1))
        bc = torch.from_numpy(buf_c.reshape(-1))
        # Deciding between chains, the policy's loss and entropy are means over its decisions
        # only (a forced step has log-probability 0 and entropy 0: averaging over it would
        # shrink both the policy gradient and the entropy bonus by the share of forced steps).
        bw = torch.from_numpy((~buf_f).reshape(-1).astype(np.float32))
        idx = np.arange(batch)
        clipfracs: list[float] = []
        for _ in range(args.update_epochs):
            rng.shuffle(idx)
            for s in range(0, batch - mb + 1, mb):
                j = torch.from_numpy(idx[s : s + mb])
                d = agent.dist(bx[j], bm[j])
                newlp = d.log_prob(ba[j])
                ratio = (newlp - blp[j]).exp()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - (newlp - blp[j])).mean()
                    clipfracs.append(float(((ratio - 1.0).abs() > args.clip_coef).float().mean()))
                a_mb = adv_t[j]
                w = bw[j]
                nw = w.sum().clamp(min=2.0)
                if chain_level:
                    m_w = (a_mb * w).sum() / nw
                    sd_w = (((a_mb - m_w) ** 2 * w).sum() / (nw - 1)).sqrt()
                    a_mb = (a_mb - m_w) / (sd_w + 1e-8)
                else:
                    a_mb = (a_mb - a_mb.mean()) / (a_mb.std() + 1e-8)
                pg_i = torch.max(
                    -a_mb * ratio,
                    -a_mb * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef),
                )
                pg = (pg_i * w).sum() / nw if chain_level else pg_i.mean()
                head = agent.critic(bx[j])
                v_loss = 0.5 * ((head[:, 0] - ret_t[j]) ** 2).mean()
                aux = torch.nn.functional.binary_cross_entropy_with_logits(head[:, 1], bc[j])
                ent_i = d.entropy()
                ent = (ent_i * w).sum() / nw if chain_level else ent_i.mean()
                loss = pg - args.ent_coef * ent + args.vf_coef * v_loss + args.aux_coef * aux
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                opt.step()
            if args.target_kl is not None and float(approx_kl) > args.target_kl:
                break
        done_steps = (update + 1) * batch
        sps = done_steps / max(time.perf_counter() - t_start, 1e-9)
        metrics = {
            "train/policy_loss": float(pg.detach()),
            "train/value_loss": float(v_loss.detach()),
            "train/aux_loss": float(aux.detach()),
            "train/entropy": float(ent.detach()),
            "train/approx_kl": float(approx_kl),
            "train/clipfrac": float(np.mean(clipfracs)) if clipfracs else 0.0,
            "train/sps": sps,
        }
        if recent:
            r = np.asarray(recent, np.float64)
            metrics.update(
                {
                    "train/episodic_return": float(r[:, 0].mean()),
                    "train/accuracy": float(r[:, 1].mean()),
                    "train/tokens": float(r[:, 2].mean()),
                }
            )
        bar.update(batch)
        bar.set_postfix_str(
            f"SPS={sps:,.0f} ret={metrics.get('train/episodic_return', float('nan')):.3f} "
            f"acc={metrics.get('train/accuracy', float('nan')):.3f} "
            f"tok={metrics.get('train/tokens', float('nan')):.0f}"
        )
        if update % 10 == 0 or update == n_updates - 1:
            log.info("update %d/%d %s", update + 1, n_updates, metrics)
    bar.close()
    metrics["train/steps"] = float(n_updates * batch)
    metrics["train/wall_s"] = time.perf_counter() - t0
    policy = PPOPolicy(
        _export(agent.actor),
        _export(agent.critic),
        lam=None,
        lam_range=lam_range,
        aggregate=env.config.aggregate,
        seed=args.seed,
        decide=args.decide,
    )
    finish_training(policy, "ppo", args, bank, env, lams, metrics, predictor)
    log.info("ppo trained in %.1fs: %s", metrics["train/wall_s"], policy.meta["metrics"])
    return policy
