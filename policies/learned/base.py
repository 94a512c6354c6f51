"""What every learned policy shares: the :class:`LearnedPolicy` base (the price λ it acts for,
cheap clones, saving and loading) and the rules the algorithms read the observation by.

* :func:`available` and :func:`decision_mask`: which actions may run, and where a policy
  decides (``decide="chunk"``: every chunk; ``"chain"``: only between chains);
* :func:`expand`: the observation with derived features (:data:`EXTRA_FEATURES`);
* :func:`lam_grid`, :func:`split_difficulty`: how a trainer reads its λ grid and its
  difficulty predictor.

Each algorithm (:mod:`policies.learned.value`, :mod:`policies.learned.ppo`) is one file over
this module and :mod:`policies.learned.replay`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from env.episode.config import AGGREGATES, EnvConfig
from env.episode.hidden import NEUTRAL
from env.episode.observation import FEATURE_NAMES, HIDDEN_SLICE, N_FEATURES
from features.errors import ConfigError, ModelError, PolicyError
from policies.base import BasePolicy
from policies.serialize import PolicyFiles, lam_feature, write_policy_files

__all__ = [
    "DECIDE",
    "HIDDEN_PROBES_DIR",
    "DEFAULT_LAMS",
    "EXTRA_FEATURES",
    "META_KEYS",
    "LearnedPolicy",
    "TrainArgs",
    "available",
    "chain_scale_of",
    "check_decide",
    "decision_mask",
    "expand",
    "expand_params",
    "held_out_questions",
    "lam_grid",
    "sigmoid",
    "split_difficulty",
    "visible_features",
]

#: The λ grid learned policies train over by default (price of a token, in correct answers).
DEFAULT_LAMS: tuple[float, ...] = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
_CAN = [FEATURE_NAMES.index(n) for n in ("can_continue", "can_branch", "can_verify")]
_BUDGET, _N_CHAINS = FEATURE_NAMES.index("budget_used"), FEATURE_NAMES.index("n_chains")
_ENDED = FEATURE_NAMES.index("cur_ended")
#: The folder, inside a saved policy's, of the probes a ``hidden`` policy reads.
HIDDEN_PROBES_DIR = "hidden-probes"
#: Where a learned policy decides (:func:`decision_mask`).
DECIDE: tuple[str, ...] = ("chunk", "chain")
#: Features the value policy derives from the observation and appends to it.
EXTRA_FEATURES: tuple[str, ...] = ("chain_length",)
#: The ``policy.json`` header entries a loaded policy keeps in its ``meta``.
META_KEYS: tuple[str, ...] = (
    "training",
    "bank",
    "lams",
    "env",
    "metrics",
    "created",
    "ponder_version",
)


@dataclass
class TrainArgs:
    """What every learned policy's training run is told: the bank and split it replays, the λ
    grid, seeds, where the policy goes, and how the run evaluates, reports and reads the model's
    state. Each algorithm's arguments (:class:`~policies.learned.ppo.PPOArgs`,
    :class:`~policies.learned.value.ValueArgs`) add its own."""

    bank: str = "data/banks/testbed-arith"
    """trace bank folder to replay"""
    out: str = "models/policies/policy"
    """folder to write the policy to (policy.json + weights.safetensors)"""
    split: str = "train"
    """question split to train on (fit to tune on dev: see env.questions.select_split)"""
    lams: tuple[float, ...] = DEFAULT_LAMS
    """λ grid (price of a token in correct answers) the policy is trained over"""
    seed: int = 0
    """seed of the replay, the behaviour, the networks and the sampling"""
    num_envs: int = 512
    """episodes replayed at once"""
    decide: str = "chunk"
    """where the policy decides: chunk (every chunk: it may cut a chain or stop mid-chain on a probe) or chain (only between chains; a chain always runs to its end)"""
    eval_seeds: int = 8
    """episodes per held-out question in the final evaluation (test; dev when training on fit; 0: none)"""
    threads: int = 1
    """torch and BLAS threads"""
    progress: bool = True
    """show progress bars"""
    difficulty: str | None = None
    """difficulty predictor of the replay: None (the feature is 0.5) or auto (fitted on the bank's train questions)"""
    hidden_probes: str | None = None
    """folder of hidden-state probes (HiddenProbes.save(folder, training=True), fitted on the bank's training questions): the policy reads the model's hidden states through them; None: it reads none"""
    config: dict[str, Any] = field(default_factory=dict)
    """EnvConfig fields for the replay (chunking is the bank's)"""


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


def visible_features(obs: np.ndarray, *, hidden: bool) -> np.ndarray:
    """The observation as a policy with (``hidden``) or without hidden-state features reads it
    (``float64``; see :meth:`LearnedPolicy.visible`)."""
    x = np.array(obs, dtype=np.float64)
    if not hidden:
        x[:, HIDDEN_SLICE] = NEUTRAL
    return x


def expand_params(chain_scale: float) -> dict[str, Any]:
    """The ``policy.json`` params of a policy that reads :func:`expand`'s features
    (:meth:`LearnedPolicy._read_numbers` reads them back, ``chain_scale`` among its numbers)."""
    return {"chain_scale": chain_scale, "extra_features": list(EXTRA_FEATURES)}


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


def check_decide(decide: str) -> None:
    """Raise :class:`~features.errors.ConfigError` unless ``decide`` is one of :data:`DECIDE`
    (the same check, and message, as :func:`decision_mask`'s)."""
    decision_mask(np.zeros((0, N_FEATURES)), decide)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function of a logit, clipped to ±50 first (no overflow)."""
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def lam_grid(lams: Sequence[float]) -> np.ndarray:
    """The sorted λ grid a learned policy trains over (positive prices only)."""
    grid = np.asarray(sorted(lams), np.float64)
    if grid.size < 1 or (grid <= 0).any():
        raise ConfigError(f"lams must be positive prices, got {lams}")
    return grid


def held_out_questions(nq: int, frac: float, seed: int) -> np.ndarray:
    """``bool[nq]``: the held-out (calibration) questions, at least one, never all."""
    if nq < 2:
        raise ConfigError("calibration needs at least 2 training questions")
    k = min(nq - 1, max(1, round(frac * nq)))
    held = np.zeros(nq, bool)
    held[np.random.default_rng(seed).permutation(nq)[:k]] = True
    return held


def split_difficulty(difficulty: Any) -> tuple[Any, Any]:
    """``(predictor object or None, the name recorded in the training args)`` of a trainer's
    ``difficulty`` argument (``None``, ``"auto"``, or a fitted predictor)."""
    if difficulty is not None and not isinstance(difficulty, str):
        return difficulty, type(difficulty).__name__
    return None, difficulty


def _check_lam(lam: float | None) -> None:
    if lam is not None and not (math.isfinite(lam) and lam >= 0):
        raise ConfigError(f"lam must be a finite number >= 0, got {lam!r}")


class LearnedPolicy(BasePolicy):
    """What every learned policy shares: the price λ it acts for, where it decides, cheap
    clones, saving.

    λ is a network input. ``lam=None`` follows the environment's price (``config.lam`` of the
    last :meth:`reset`); :meth:`with_lam` pins one. λ outside the trained range is clipped to it.

    Subclasses set ``kind`` and ``version`` and write ``_params``, ``_arrays`` and
    ``_from_files``.

    Args:
        decide: ``chunk`` (at every chunk) or ``chain`` (only between chains: a running chain
            is always continued; see :func:`decision_mask`), as the policy was trained.
        lam: the price the policy acts for (``None``: the environment's).
        lam_range: the λ range it was trained over.
        aggregate: the env aggregation it was trained with.
        meta: how it was trained (see :data:`META_KEYS`).
    """

    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __init__(
        self,
        *,
        decide: str = "chunk",
        lam: float | None,
        lam_range: tuple[float, float],
        aggregate: str = "majority",
        meta: dict[str, Any] | None = None,
    ) -> None:
        check_decide(decide)
        lo, hi = (float(v) for v in lam_range)
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ConfigError(f"lam_range must be 0 < low <= high, got {lam_range!r}")
        _check_lam(lam)
        if aggregate not in AGGREGATES:
            raise ConfigError(f"unknown aggregate {aggregate!r}")
        self.decide = decide
        self.lam = None if lam is None else float(lam)
        self.lam_range = (lo, hi)
        self.aggregate = aggregate
        self.meta: dict[str, Any] = dict(meta or {})
        self.name = self._make_name()
        super().__init__()

    def _make_name(self) -> str:
        base = f"{self.kind}-chain" if self.decide == "chain" else self.kind
        return base if self.lam is None else f"{base}-lam{self.lam:g}"

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
        return self.decide == "chain"

    @property
    def effective_lam(self) -> float:
        """The λ the policy acts for now."""
        return self.config.lam if self.lam is None else self.lam

    @property
    def feature_set(self) -> str:
        """``hidden`` for a policy trained with hidden-state features (its
        :attr:`hidden_probes`), else ``base``: see :meth:`visible`."""
        return "base" if self.hidden_probes is None else "hidden"

    def visible(self, obs: np.ndarray) -> np.ndarray:
        """The observation as the policy reads it (float64): a ``base`` policy sees the
        hidden-state features at their neutral values whatever the environment gives, so it
        acts the same with or without probes (it was trained without them)."""
        return visible_features(obs, hidden=self.hidden_probes is not None)

    def _inputs(self, obs: np.ndarray) -> np.ndarray:
        z = lam_feature(self.effective_lam, self.lam_range)
        col = np.full((obs.shape[0], 1), z, dtype=np.float64)
        return np.concatenate([self.visible(obs), col], axis=1)

    def with_lam(self, lam: float | None) -> Self:
        """A clone acting for price ``lam`` (``None``: the environment's); weights are shared."""
        _check_lam(lam)
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
        if self.hidden_probes is not None:
            self.hidden_probes.save(Path(directory) / HIDDEN_PROBES_DIR)
        return write_policy_files(
            directory,
            kind=self.kind,
            version=self.version,
            params={**self._params(), "feature_set": self.feature_set},
            arrays=self._arrays(),
            meta=meta,
        )

    def attach_saved_probes(self, files: PolicyFiles) -> None:
        """Read back the probes a ``hidden`` policy was saved with (its folder's
        ``hidden-probes/``).

        Raises:
            PolicyError: an unknown feature set, or missing or damaged probes.
        """
        from env.episode.hidden import HiddenProbes

        fs = files.params.get("feature_set", "base")
        if fs == "base":
            self.hidden_probes = None
            return
        if fs != "hidden":
            raise PolicyError(f"unknown feature set {fs!r} (this ponder knows base and hidden)")
        try:
            self.hidden_probes = HiddenProbes.load(files.path / HIDDEN_PROBES_DIR)
        except ModelError as e:
            raise PolicyError(
                f"the policy reads hidden-state features and its probes cannot be read ({e})"
            ) from e

    @staticmethod
    def _read_numbers(files: PolicyFiles, names: Sequence[str]) -> dict[str, float]:
        """The saved params ``names`` as floats, for a policy that reads :func:`expand`'s
        features (saved with :func:`expand_params`).

        Raises:
            PolicyError: the policy was trained with other derived features than this ponder
                computes, or a param is missing or not a number.
        """
        p = files.params
        if p.get("extra_features") != list(EXTRA_FEATURES):
            raise PolicyError(
                f"{files.path}: derived features {p.get('extra_features')!r}, this ponder "
                f"computes {list(EXTRA_FEATURES)}; retrain the policy"
            )
        try:
            return {k: float(p[k]) for k in names}
        except (KeyError, TypeError, ValueError) as e:
            raise PolicyError(f"{files.path}: {' / '.join(names)} missing or not numbers") from e

    @staticmethod
    def _base_params(files: PolicyFiles) -> dict[str, Any]:
        """The constructor arguments every learned policy saves: ``decide``, ``meta`` (the
        header's :data:`META_KEYS`), ``lam``, ``lam_range``, ``aggregate``."""
        p = files.params
        out: dict[str, Any] = {
            "decide": str(p.get("decide", "chunk")),
            "meta": {k: v for k, v in files.header.items() if k in META_KEYS},
        }
        try:
            lam = p.get("lam")
            lr = p["lam_range"]
            out.update(
                lam=None if lam is None else float(lam),
                lam_range=(float(lr[0]), float(lr[1])),
                aggregate=str(p.get("aggregate", "majority")),
            )
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise PolicyError(f"policy params are damaged ({type(e).__name__}: {e})") from e
        return out
