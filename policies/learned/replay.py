"""Replaying a trace bank for learning: what every learned algorithm trains and is measured on.

* :class:`ReplayDriver`: a :class:`~env.episode.vector.BatchedReplayEnv` driven for learning
  (ended episodes restart at once; each step reports its priced cost and whether stopping would
  be correct, before and after);
* :func:`collect_transitions`: replayed decisions (:class:`Transitions`) under a mix of
  behaviour policies (:func:`behaviour_policies`);
* :func:`rollout_pinned`: any policy on pinned replayed episodes (every policy sees the same);
* :func:`trainer_args`, :func:`replay_env` and :func:`finish_training`: a trainer's arguments
  when called from Python, the replay it builds from them, and what it records in the trained
  policy's ``meta`` (with its held-out metrics);
* :func:`progress_bar`: a tqdm bar, or none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from env.bank.store import TraceBank
from env.episode.config import EnvConfig
from env.episode.hidden import HiddenProbes
from env.episode.observation import FEATURE_NAMES
from env.episode.vector import BatchedReplayEnv
from features.errors import PolicyError
from policies.base import BasePolicy
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
from policies.learned.base import LearnedPolicy, available, expand, split_difficulty
from policies.serialize import bank_fingerprint, env_config_dict

__all__ = [
    "ReplayDriver",
    "StepOutcome",
    "TrainerArgs",
    "Transitions",
    "behaviour_policies",
    "collect_transitions",
    "correct_now",
    "finish_training",
    "progress_bar",
    "replay_env",
    "rollout_pinned",
    "trainer_args",
]

A = TypeVar("A", bound="TrainerArgs")


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
    bar = progress_bar(n, "collect", progress)
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


def progress_bar(total: int, desc: str, on: bool) -> Any:
    """A tqdm progress bar of ``total`` steps, or (``on=False``) one that shows nothing."""
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


# -- what every trainer does with its replay ------------------------------------------------


class TrainerArgs(Protocol):
    """The fields of a trainer's arguments dataclass that the replay reads."""

    __dataclass_fields__: ClassVar[dict[str, Any]]
    split: str
    seed: int
    num_envs: int
    eval_seeds: int
    difficulty: str | None
    hidden_probes: str | None
    config: dict[str, Any]


def trainer_args(
    cls: Callable[..., A], bank: str | Path | TraceBank, difficulty: Any, **fields: Any
) -> tuple[A, TraceBank, Any]:
    """``(args, bank, predictor)`` of a trainer called from Python: its arguments dataclass
    ``cls`` built from ``fields`` (``out`` is dropped: the caller saves), with the bank's path
    and the name of the difficulty predictor (:func:`~policies.learned.base.split_difficulty`),
    the bank opened, and the fitted predictor object or ``None``."""
    b = bank if isinstance(bank, TraceBank) else TraceBank(bank)
    fields.pop("out", None)
    predictor, name = split_difficulty(difficulty)
    return cls(bank=str(b.path), difficulty=name, **fields), b, predictor


def _difficulty(args: TrainerArgs, predictor: Any) -> Any:
    return predictor if predictor is not None else args.difficulty


def training_probes(args: TrainerArgs) -> HiddenProbes | None:
    """The hidden-state probes a trainer's replay reads (``args.hidden_probes``: a folder
    written by ``HiddenProbes.save(folder, training=True)``, with the held-out probes of the
    training questions), or ``None``: the policy reads no hidden state."""
    if not args.hidden_probes:
        return None
    from env.episode.hidden import HiddenProbes

    return HiddenProbes.load(args.hidden_probes, training=True)


def replay_env(bank: TraceBank, args: TrainerArgs, predictor: Any = None) -> BatchedReplayEnv:
    """The replay a trainer learns on: ``args.num_envs`` episodes of ``bank``'s ``args.split``
    questions, seeded by ``args.seed``, with the difficulty predictor ``predictor`` (a fitted
    one) or else ``args.difficulty``, the hidden-state probes of ``args.hidden_probes`` (if
    any), and ``args.config``'s EnvConfig fields."""
    return BatchedReplayEnv(
        bank,
        args.num_envs,
        split=args.split,
        seed=args.seed,
        difficulty=_difficulty(args, predictor),
        probes=training_probes(args),
        **args.config,
    )


def finish_training(
    policy: LearnedPolicy,
    algo: str,
    args: TrainerArgs,
    bank: TraceBank,
    env: BatchedReplayEnv,
    lams: np.ndarray,
    metrics: dict[str, float],
    predictor: Any,
) -> None:
    """Record how ``policy`` was trained in its ``meta`` (the arguments, the bank's questions,
    the λ grid, the env, the training metrics) and, with ``args.eval_seeds``, add its held-out
    metrics (:func:`_final_eval`). ``args`` is the trainer's arguments dataclass."""
    policy.hidden_probes = env.probes
    policy.meta = {
        "training": {"algo": algo, **asdict(args)},
        "bank": bank_fingerprint(bank, [q.qid for q in env.questions]),
        "lams": [float(v) for v in lams],
        "env": env_config_dict(env.config),
        "metrics": metrics,
    }
    if args.eval_seeds > 0:
        held_out = "dev" if args.split == "fit" else "test"
        difficulty = _difficulty(args, predictor)
        metrics.update(
            _final_eval(
                policy, bank, held_out, args.eval_seeds, lams, args.config, difficulty, env.probes
            )
        )


def _final_eval(
    policy: LearnedPolicy,
    bank: TraceBank,
    split: str,
    seeds: int,
    lams: np.ndarray,
    config: dict[str, Any],
    difficulty: Any = None,
    probes: HiddenProbes | None = None,
) -> dict[str, float]:
    """Accuracy and tokens on the held-out ``split`` (``test``, or ``dev`` for a policy trained
    on ``fit``), if the bank has any, at the grid's ends and middle."""
    from env.questions import select_split

    nq = len(select_split(bank.questions, split))
    if not nq:
        return {}
    env = BatchedReplayEnv(
        bank, nq * seeds, split=split, seed=0, difficulty=difficulty, probes=probes, **config
    )
    out: dict[str, float] = {}
    for lam in _eval_lams(lams):
        r = rollout_pinned(policy.with_lam(lam), env, lam=lam)
        for k, v in r.items():
            out[f"eval/{k}@{lam:g}"] = v
    return out


def _eval_lams(lams: np.ndarray) -> list[float]:
    return sorted({float(lams[0]), float(lams[len(lams) // 2]), float(lams[-1])})
