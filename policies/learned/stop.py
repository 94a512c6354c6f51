"""A learned stopping rule between chains: P(the answer is settled), and a price for the rest.

:class:`StopPolicy` reads the state after each chain ends and asks one question: would the
answer still change if every remaining chain were drawn? A logistic regression on the
observation gives ``P_settled(s)``, the probability that the answer the vote picks now is the
one it picks after all ``max_chains`` chains. The policy branches while the chance of a change
is worth more than another chain's tokens at the price λ, and stops otherwise::

    stop  iff  1 - P_settled(s) <= λ · chain_tokens

``chain_tokens`` is the mean tokens of a chain on the training replay: a change of answer is
counted as worth at most one correct answer, so the rule stops when the most that one more
chain could still buy costs more than its tokens. A running chain is always read to its end
(``decide="chain"``): this is Adaptive-Consistency's question (is the leader safe?) answered by
a model fitted on the training questions, from everything the observation holds: the votes,
the chains' confidence and, for a ``hidden`` policy, what the model's own state says of each
chain (the probe-weighted vote share, the best chain's P(right), the question's predicted pass
rate: :mod:`env.episode.hidden`). With the ``verifier`` aggregate (code banks, where the
verifier runs the visible tests) each chain is verified as it ends, so the votes and the
features hold every chain's score when it decides.

Why this target rather than "correct if stopped now". Whether the current answer is right
depends mostly on the question, which a fitted value must learn from few training questions;
whether it will still change is a property of the vote's state, alike across questions, and it
is exactly what a stopping rule that should keep the full vote's accuracy needs. Measured on the
GSM8K bank's training questions (hidden-state features, the probes' held-out predictions):
the settled target reached the full vote's accuracy with fewer tokens than a model of
correctness did at every threshold.

Training (:func:`train_stop_policy`, ``ponder train stop``): episodes of the training questions
are replayed to the end (every chain drawn, in random orders); each state after a chain ends,
where another chain could be drawn, is a row, labelled by whether the vote's answer there
(``info["answer_now"]`` of :class:`~env.episode.vector.BatchedReplayEnv`) is the episode's
final one. Held-out training questions give the fit's AUROC and Brier score (``meta``). The
model is small (one weight per feature), so a few hundred questions fit it without a network.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from env.bank.store import TraceBank
from env.episode.observation import FEATURE_NAMES
from features.errors import ConfigError, PolicyError
from policies.base import BRANCH, CONTINUE, STOP, VERIFY
from policies.learned.base import (
    DEFAULT_LAMS,
    EXTRA_FEATURES,
    LearnedPolicy,
    TrainArgs,
    chain_scale_of,
    decision_mask,
    expand,
    expand_params,
    held_out_questions,
    lam_grid,
    sigmoid,
    visible_features,
)
from policies.learned.replay import finish_training, progress_bar, replay_env, trainer_args
from policies.serialize import PolicyFiles

__all__ = ["StopArgs", "StopPolicy", "settled_rows", "train_stop_policy"]

log = logging.getLogger(__name__)

_N_IN = len(FEATURE_NAMES) + len(EXTRA_FEATURES)


@dataclass
class StopArgs(TrainArgs):
    """Train a StopPolicy (a logistic model of whether the vote's answer is settled) on a bank."""

    out: str = "models/policies/stop"
    """folder to write the policy to (policy.json + weights.safetensors)"""
    decide: str = "chain"
    """where the policy decides: only chain (between chains; a chain always runs to its end)"""
    orders: int = 48
    """replayed episodes per training question (each a random order of its chains)"""
    max_episodes: int = 8192
    """at most this many episodes in all (a large bank gets fewer orders per question: the model has one weight per feature, and 8,192 episodes give it some 100,000 states)"""
    c: float = 1.0
    """inverse strength of the logistic regression's L2 penalty (on standardised features)"""
    calib_fraction: float = 0.25
    """share of training questions held out to measure the fit (AUROC, Brier in the metrics)"""


class StopPolicy(LearnedPolicy):
    """Branch while the vote's answer may still change by more than another chain's price; stop
    otherwise (see the module docstring).

    Args:
        mean, scale: the standardisation of the expanded observation (``float[F + 1]``).
        coef, intercept: the logistic regression's weights on the standardised features.
        chain_tokens: a chain's mean tokens on the training replay (the price's unit).
        chain_scale: see :func:`~policies.learned.base.expand` (the training environment's).
        lam, lam_range, aggregate, meta: see :class:`~policies.learned.base.LearnedPolicy`.
    """

    kind = "stop"
    version = 1

    def __init__(
        self,
        mean: np.ndarray,
        scale: np.ndarray,
        coef: np.ndarray,
        intercept: float,
        *,
        chain_tokens: float,
        chain_scale: float = 1.0,
        decide: str = "chain",
        lam: float | None = None,
        lam_range: tuple[float, float] = (DEFAULT_LAMS[0], DEFAULT_LAMS[-1]),
        aggregate: str = "majority",
        meta: dict[str, Any] | None = None,
    ) -> None:
        if decide != "chain":
            raise ConfigError(
                f"the stop policy decides only between chains (decide='chain'), got {decide!r}"
            )
        arrays = [np.asarray(a, np.float64).ravel() for a in (mean, scale, coef)]
        if any(a.shape != (_N_IN,) for a in arrays):
            raise PolicyError(
                f"the stop model needs {_N_IN} weights (the observation and "
                f"{', '.join(EXTRA_FEATURES)}), got {[a.size for a in arrays]}: retrain it"
            )
        if not all(np.isfinite(a).all() for a in arrays) or (arrays[1] <= 0).any():
            raise PolicyError("the stop model's weights must be finite and its scales positive")
        for name, v in (
            ("chain_tokens", chain_tokens),
            ("chain_scale", chain_scale),
        ):
            if not (math.isfinite(v) and v > 0):
                raise PolicyError(f"{name} must be > 0, got {v!r}")
        if not math.isfinite(intercept):
            raise PolicyError(f"the stop model's intercept must be finite, got {intercept!r}")
        self.mean, self.scale, self.coef = arrays
        self.intercept = float(intercept)
        self.chain_tokens = float(chain_tokens)
        self.chain_scale = float(chain_scale)
        super().__init__(
            decide=decide, lam=lam, lam_range=lam_range, aggregate=aggregate, meta=meta
        )

    def p_settled(self, obs: np.ndarray) -> np.ndarray:
        """``float[B]``: P(the vote's answer now is the one all ``max_chains`` chains give)."""
        return self._p(self._check_obs(obs))

    def _p(self, x: np.ndarray) -> np.ndarray:
        z = (expand(self.visible(x), self.chain_scale) - self.mean) / self.scale
        return sigmoid(z @ self.coef + self.intercept)

    def _gain(self, x: np.ndarray) -> np.ndarray:
        return (1.0 - self._p(x)) - self.effective_lam * self.chain_tokens

    def value(self, obs: np.ndarray) -> np.ndarray:
        """``float[B]``: the chance that the answer still changes, less another chain's price
        at the policy's λ, where another chain can be drawn (0 elsewhere)."""
        x = self._check_obs(obs)
        m = decision_mask(x, self.decide)
        return np.where(m[:, BRANCH], self._gain(x), 0.0)

    def _act(self, obs: np.ndarray) -> np.ndarray:
        m = decision_mask(obs, self.decide)
        running = ~m[:, STOP]  # a running chain: continue is its one choice
        check = ~running & verify_first(m, self.aggregate)
        go = m[:, BRANCH] & (self._gain(obs) > 0)
        return np.where(
            running, CONTINUE, np.where(check, VERIFY, np.where(go, BRANCH, STOP))
        ).astype(np.int64)

    # -- saving ----------------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        return {
            **super()._params(),
            "decide": self.decide,
            "intercept": self.intercept,
            "chain_tokens": self.chain_tokens,
            **expand_params(self.chain_scale),
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"stop.mean": self.mean, "stop.scale": self.scale, "stop.coef": self.coef}

    @classmethod
    def _from_files(cls, files: PolicyFiles) -> Self:
        a = files.arrays
        missing = [k for k in ("stop.mean", "stop.scale", "stop.coef") if k not in a]
        if missing:
            raise PolicyError(f"{files.path}: the weights lack {missing}")
        numbers = cls._read_numbers(files, ("intercept", "chain_tokens", "chain_scale"))
        return cls(
            a["stop.mean"],
            a["stop.scale"],
            a["stop.coef"],
            numbers["intercept"],
            chain_tokens=numbers["chain_tokens"],
            chain_scale=numbers["chain_scale"],
            **cls._base_params(files),
        )


def verify_first(mask: np.ndarray, aggregate: str) -> np.ndarray:
    """``bool[B]``: where a chain that ended is verified before the stop decision: with the
    ``verifier`` aggregate (a code bank's: its verifier runs the visible tests, at the price of
    one token), every chain is scored as it ends, so the vote and the policy's features hold each
    chain's score when it decides. Elsewhere nowhere: the vote does not read the verifier."""
    if aggregate != "verifier":
        return np.zeros(len(mask), bool)
    return mask[:, VERIFY].copy()


# -- training -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettledRows:
    """The states a stop policy learns from (:func:`settled_rows`).

    Attributes:
        obs: ``float32[N, F]``: a state after a chain ended, where another chain could be drawn.
        settled: ``bool[N]``: the vote's answer there is the episode's final one.
        question: ``int64[N]``: its question (an index into the replay's questions).
        chain_tokens: the replayed chains' mean tokens.
        episodes: episodes replayed.
    """

    obs: np.ndarray
    settled: np.ndarray
    question: np.ndarray
    chain_tokens: float
    episodes: int


def settled_rows(env: Any, episodes: int, *, seed: int, progress: bool = False) -> SettledRows:
    """Replay ``episodes`` episodes of ``env`` (a
    :class:`~env.episode.vector.BatchedReplayEnv`) to the end, drawing every chain it allows,
    and label each decision state by whether its answer is the final one. With the
    ``verifier`` aggregate each chain is verified as it ends (:func:`verify_first`), before its
    state is read."""
    if episodes < 1:
        raise ConfigError(f"episodes must be >= 1, got {episodes}")
    b = env.num_envs
    obs, info = env.reset(seed=seed)
    ep = np.arange(b)
    next_ep = b
    parts: dict[str, list[np.ndarray]] = {"obs": [], "answer": [], "ep": [], "q": []}
    final = np.full(episodes, -2, np.int64)
    decoded = chains = 0
    finished = 0
    bar = progress_bar(episodes, "replay", progress)
    while finished < episodes:
        m = decision_mask(obs, "chain")
        running = ~m[:, STOP]  # a running chain: continue is its one choice
        check = ~running & verify_first(m, env.config.aggregate)
        deciding = ~running & ~check & m[:, BRANCH]
        keep = deciding & (ep < episodes)
        if keep.any():
            parts["obs"].append(obs[keep])
            parts["answer"].append(np.asarray(info["answer_now"])[keep])
            parts["ep"].append(ep[keep])
            parts["q"].append(np.asarray(env.episode_questions)[keep])
        a = np.where(running, CONTINUE, np.where(check, VERIFY, np.where(deciding, BRANCH, STOP)))
        obs, _, term, trunc, info = env.step(a)
        done = np.flatnonzero(term | trunc)
        if done.size:
            ended = done[ep[done] < episodes]
            final[ep[ended]] = np.asarray(info["answer_now"])[ended]
            decoded += int(np.asarray(info["decoded"])[ended].sum())
            chains += int(np.asarray(info["chains"])[ended].sum())
            finished += ended.size
            bar.update(int(ended.size))
            mask = np.zeros(b, bool)
            mask[done] = True
            obs, info = env.reset(options={"reset_mask": mask})
            ep[done] = next_ep + np.arange(done.size)
            next_ep += done.size
    bar.close()
    if not parts["obs"]:
        raise ConfigError(
            "no state where another chain could be drawn: the replay allows one chain "
            "(max_chains = 1 or a token cap below two chains), so there is no stop to learn"
        )
    e = np.concatenate(parts["ep"])
    answer = np.concatenate(parts["answer"])
    return SettledRows(
        obs=np.concatenate(parts["obs"]),
        settled=answer == final[e],
        question=np.concatenate(parts["q"]).astype(np.int64),
        chain_tokens=decoded / max(chains, 1),
        episodes=finished,
    )


def _fit(
    x: np.ndarray, y: np.ndarray, c: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    if len(np.unique(y)) < 2:
        const = 10.0 if bool(y[0]) else -10.0  # always (never) settled: no slope to learn
        return mean, scale, np.zeros(x.shape[1]), const
    clf = LogisticRegression(C=c, max_iter=5000, random_state=seed)
    clf.fit((x - mean) / scale, y)
    return mean, scale, clf.coef_[0].astype(np.float64), float(clf.intercept_[0])


def _held_out_metrics(
    x: np.ndarray, rows: SettledRows, nq: int, args: StopArgs
) -> dict[str, float]:
    """AUROC and Brier score of a fit without a share of the training questions, on them."""
    from sklearn.metrics import brier_score_loss, roc_auc_score

    if nq < 2:
        return {}
    held = held_out_questions(nq, args.calib_fraction, args.seed)[rows.question]
    y = rows.settled
    if held.all() or not held.any():
        return {}
    mean, scale, coef, b = _fit(x[~held], y[~held], args.c, args.seed)
    p = sigmoid(((x[held] - mean) / scale) @ coef + b)
    out = {"train/settled_brier_heldout": float(brier_score_loss(y[held], p))}
    if len(np.unique(y[held])) == 2:
        out["train/settled_auroc_heldout"] = float(roc_auc_score(y[held], p))
    return out


def train_stop_policy(
    bank: str | Path | TraceBank,
    *,
    split: str = "train",
    lams: Sequence[float] = DEFAULT_LAMS,
    seed: int = 0,
    difficulty: Any = None,
    **kwargs: Any,
) -> StopPolicy:
    """Train a :class:`StopPolicy` on the ``split`` questions of ``bank``.

    ``difficulty`` is the replay's difficulty predictor, as for
    :func:`~policies.learned.value.train_value_policy`. ``kwargs`` are the other fields of
    :class:`StopArgs` (``orders``, ``c``, ``hidden_probes``, ``config``, ...).
    """
    args, b, predictor = trainer_args(
        StopArgs, bank, difficulty, split=split, lams=tuple(lams), seed=seed, **kwargs
    )
    if args.decide != "chain":
        raise ConfigError(
            f"the stop policy decides only between chains: --decide chain, got {args.decide!r}"
        )
    if not (math.isfinite(args.c) and args.c > 0):
        raise ConfigError(f"c must be > 0, got {args.c}")
    if args.orders < 1 or args.max_episodes < 1:
        raise ConfigError(
            f"orders and max_episodes must be >= 1, got {args.orders} and {args.max_episodes}"
        )
    grid = lam_grid(args.lams)
    t0 = time.perf_counter()
    env = replay_env(b, args, predictor)
    nq = len(env.questions)
    episodes = min(args.orders * nq, args.max_episodes)
    rows = settled_rows(env, episodes, seed=args.seed, progress=args.progress)
    t_collect = time.perf_counter() - t0
    chain_scale = chain_scale_of(env.config)
    x = expand(visible_features(rows.obs, hidden=env.probes is not None), chain_scale)
    metrics = _held_out_metrics(x, rows, nq, args)
    mean, scale, coef, intercept = _fit(x, rows.settled, args.c, args.seed)
    policy = StopPolicy(
        mean,
        scale,
        coef,
        intercept,
        chain_tokens=max(rows.chain_tokens, 1.0),
        chain_scale=chain_scale,
        lam_range=(float(grid[0]), float(grid[-1])),
        aggregate=env.config.aggregate,
    )
    policy.hidden_probes = env.probes
    metrics.update(
        {
            "train/rows": float(len(rows.settled)),
            "train/settled_rate": float(rows.settled.mean()),
            "train/episodes": float(rows.episodes),
            "train/chain_tokens": float(rows.chain_tokens),
            "train/collect_s": t_collect,
            "train/wall_s": time.perf_counter() - t0,
        }
    )
    finish_training(policy, "settled-logistic", args, b, env, grid, metrics, predictor)
    log.info("stop policy trained in %.1fs: %s", metrics["train/wall_s"], policy.meta["metrics"])
    return policy
