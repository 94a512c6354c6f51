"""A policy as an MLflow model, logged as code (never pickled).

MLflow's "models from code": :func:`policies.tracking.log_policy_model` logs *this file* as the
model (``python_model=<path of this file>``) with the policy's folder as an artifact. When MLflow
loads the model it runs this file, which hands :class:`PolicyModel` to ``mlflow.models.set_model``;
:meth:`PolicyModel.load_context` then rebuilds the policy from the folder with
:func:`policies.registry.load_policy` (a saved heuristic's ``heuristic.json``, or a learned
policy's own files: JSON and weights, no pickle).

Beside it, ``env_config.json`` holds the env settings the policy acts under (heuristics read
counts and token budgets de-normalised by them).

``predict`` takes a DataFrame of observations (one column per feature of
:data:`env.episode.observation.FEATURE_NAMES`) and returns the actions (``int64``: 0 continue, 1 branch,
2 verify, 3 stop). Each row is, by default, the first decision of its own episode; with
``params={"episode": True}`` the rows are the successive observations of one episode, so that
stateful heuristics (DeepConf online, the router, bounded thinking) carry their state. A learned
policy acts for its own λ (or the env settings' ``lam`` if it has none); ``params={"lam": x}``
picks another one (``-1``: its own).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import mlflow.models
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from env.episode.config import EnvConfig, Prices
from env.episode.observation import FEATURE_NAMES
from features.errors import PolicyError
from policies.base import LamConditioned, Policy
from policies.registry import load_policy, save_policy

__all__ = [
    "ENV_CONFIG_FILE",
    "PolicyModel",
    "config_from_json",
    "config_to_json",
    "save_policy_folder",
]

ENV_CONFIG_FILE = "env_config.json"


def config_to_json(config: EnvConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_json(data: dict[str, Any]) -> EnvConfig:
    d = dict(data)
    if isinstance(d.get("prices"), dict):
        d["prices"] = Prices(**d["prices"])
    return EnvConfig(**d)


def save_policy_folder(policy: Policy, folder: str | Path, config: EnvConfig) -> Path:
    """Write ``policy`` (:func:`policies.registry.save_policy`) and the env settings into
    ``folder``."""
    out = save_policy(policy, folder)
    (out / ENV_CONFIG_FILE).write_text(json.dumps(config_to_json(config), indent=2) + "\n")
    return out


class PolicyModel(PythonModel):  # type: ignore[misc]
    """Observations (a DataFrame with the env's feature columns) -> actions."""

    policy: Policy
    config: EnvConfig

    def load_context(self, context: Any) -> None:
        folder = Path(context.artifacts["policy"])
        if not folder.is_dir():
            raise PolicyError(f"no policy folder at {folder}")
        self.policy = load_policy(folder)
        cfg = folder / ENV_CONFIG_FILE
        self.config = config_from_json(json.loads(cfg.read_text())) if cfg.exists() else EnvConfig()

    # (MLflow reads predict's type hints: a DataFrame hint takes the logged signature's schema.)
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        x = _observations(model_input)
        p = params or {}
        policy = self.policy
        lam = float(p.get("lam", -1.0))
        if lam >= 0:
            if not isinstance(policy, LamConditioned):
                raise PolicyError(f"{policy.name} takes no λ (only learned policies do)")
            policy = policy.with_lam(lam)
        if bool(p.get("episode", False)):
            policy.reset(1, config=self.config)
            return np.array([policy.act(row) for row in x], dtype=np.int64)
        if len(x) == 0:
            return np.zeros(0, dtype=np.int64)
        policy.reset(len(x), config=self.config)
        return np.asarray(policy.act(x), dtype=np.int64).reshape(-1)


def _observations(model_input: Any) -> np.ndarray:
    cols = getattr(model_input, "columns", None)
    if cols is not None:
        missing = [n for n in FEATURE_NAMES if n not in cols]
        if missing:
            raise PolicyError(f"observations lack the feature columns {missing[:5]}")
        return np.asarray(model_input[list(FEATURE_NAMES)].to_numpy(), dtype=np.float32)
    x = np.asarray(model_input, dtype=np.float32)
    return x[None, :] if x.ndim == 1 else x


if __name__.startswith("code_model_"):  # MLflow loading this file as a model from code
    mlflow.models.set_model(PolicyModel())
