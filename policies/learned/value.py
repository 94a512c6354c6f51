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

:func:`train_value_policy` (and ``ponder train value``, ``python -m policies.learned value``)
trains one, CleanRL-style: :class:`ValueArgs` is the whole configuration, seeding comes first,
metrics are namespaced ``train/...`` and ``eval/...``. The base class and the observation rules
are :mod:`policies.learned.base`'s; the replay, the transitions and the behaviour policies are
:mod:`policies.learned.replay`'s.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

from env.bank.store import TraceBank
from env.episode.observation import N_FEATURES
from features.errors import ConfigError, PolicyError
from policies.base import STOP, BasePolicy
from policies.learned.base import (
    DEFAULT_LAMS,
    EXTRA_FEATURES,
    LearnedPolicy,
    TrainArgs,
    chain_scale_of,
    check_decide,
    decision_mask,
    expand,
    expand_params,
    held_out_questions,
    lam_grid,
    sigmoid,
)
from policies.learned.replay import (
    Transitions,
    collect_transitions,
    finish_training,
    progress_bar,
    replay_env,
    trainer_args,
)
from policies.serialize import NumpyMLP, PolicyFiles, lam_feature

__all__ = ["ValueArgs", "ValuePolicy", "greedy_actions", "train_value_policy"]

log = logging.getLogger(__name__)


@dataclass
class ValueArgs(TrainArgs):
    """Train a ValuePolicy (calibrated stop classifier + fitted-Q gains) on a bank."""

    out: str = "models/policies/value"
    """folder to write the policy to (policy.json + weights.safetensors)"""
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
        super().__init__(
            decide=decide, lam=lam, lam_range=lam_range, aggregate=aggregate, meta=meta
        )

    def p_stop(self, obs: np.ndarray) -> np.ndarray:
        """Calibrated P(correct if stopped now), ``float[B]``."""
        return self._p_stop(self._check_obs(obs))

    def _p_stop(self, x: np.ndarray) -> np.ndarray:
        return _calibrated(
            self.stop_net, self.iso_x, self.iso_y, expand(self.visible(x), self.chain_scale)
        )

    def gains(self, obs: np.ndarray) -> np.ndarray:
        """``float[B, 3]``: the gain over stopping of continue, branch, verify at the policy's λ,
        net of their cost (whether or not they are available)."""
        x = self._check_obs(obs)
        return self._gains(x, self._p_stop(x), self.effective_lam)

    def _gains(self, x: np.ndarray, p: np.ndarray, lam: float | np.ndarray) -> np.ndarray:
        lam_b = np.broadcast_to(np.asarray(lam, np.float64), (x.shape[0],))
        xe = expand(self.visible(x), self.chain_scale)
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
            **expand_params(self.chain_scale),
            "decide": self.decide,
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
        numbers = cls._read_numbers(files, ("cost_scale", "chain_scale"))
        return cls(
            NumpyMLP.from_arrays(a, "stop", str(p.get("stop_activation", "relu"))),
            a["iso.x"],
            a["iso.y"],
            NumpyMLP.from_arrays(a, "gain", str(p.get("gain_activation", "relu"))),
            cost_scale=numbers["cost_scale"],
            chain_scale=numbers["chain_scale"],
            **cls._base_params(files),
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
    raw = sigmoid(net(x.astype(np.float64))[:, 0])
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


def _gains_where(
    net: NumpyMLP,
    x: np.ndarray,
    p: np.ndarray,
    lam: np.ndarray,
    lam_range: tuple[float, float],
    cost_scale: float,
    need: np.ndarray,
) -> np.ndarray:
    """:func:`_gains` computed only where ``need`` (``bool[B, >=3]``) is true; 0 elsewhere.

    Fitted-Q backups read the gains of the actions available in the next state only: under
    ``decide="chain"`` most states are a running chain, where continue is the one action, so
    this runs the network on about a third of the rows :func:`_gains` would."""
    inp = _gain_inputs(x, p, lam, lam_range)
    rows, acts = np.nonzero(need[:, :3])
    out = net(_with_action(inp[rows], acts))
    g = np.zeros((inp.shape[0], 3))
    g[rows, acts] = out[:, 0] - lam[rows] * cost_scale * out[:, 1]
    return g


# -- training -------------------------------------------------------------------------------


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
    raw = sigmoid(net(x[held])[:, 0])
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
    args, b, predictor = trainer_args(
        ValueArgs, bank, difficulty, split=split, lams=tuple(lams), seed=seed, **kwargs
    )
    return _train_value(args, b, predictor)


def _train_value(args: ValueArgs, bank: TraceBank, predictor: Any = None) -> ValuePolicy:
    from threadpoolctl import threadpool_limits

    lams = lam_grid(args.lams)
    check_decide(args.decide)
    if args.rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {args.rounds}")
    lam_range = (float(lams[0]), float(lams[-1]))
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    env = replay_env(bank, args, predictor)
    cost_scale = float(env.config.chunk_tokens + env.config.probe_tokens)
    chain_scale = chain_scale_of(env.config)
    tr = collect_transitions(
        env, args.transitions, seed=args.seed, eps=args.eps, progress=args.progress
    )
    t_collect = time.perf_counter() - t0
    log.info("collected %d transitions in %.1fs", len(tr), t_collect)
    held_q = held_out_questions(len(env.questions), args.calib_fraction, args.seed)
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
        policy.hidden_probes = env.probes  # it reads what it was fitted on in the next round
        log.info("round %d/%d: %d transitions, %s", rnd + 1, args.rounds, len(tr), m)
    assert policy is not None
    metrics["train/transitions"] = float(len(tr))
    metrics["train/collect_s"] = t_collect
    metrics["train/wall_s"] = time.perf_counter() - t0
    finish_training(policy, "fitted-q-iteration", args, bank, env, lams, metrics, predictor)
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
    bar = progress_bar(args.fqi_iters, "fqi", args.progress)
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
        x_live, p_live = tr.next_obs[live], p_n[live]
        mask = decision_mask(x_live, decide)
        forced = ~mask[:, STOP]
        for j, lam in enumerate(lams):
            g = _gains_where(
                net,
                x_live,
                p_live,
                np.full(live.size, lam),
                lam_range,
                cost_scale,
                mask,
            )
            greedy, best = greedy_actions(g, mask)
            gain = np.where(forced, best, np.maximum(best, 0.0))
            boot[live, j] = np.minimum(1.0, p_live + gain)
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
