"""A policy as an MLflow model, logged as code (never pickled).

MLflow's "models from code": :func:`policies.tracking.log_policy_model` logs *this file* as the
model (``python_model=<path of this file>``) with the policy's folder as an artifact. When MLflow
loads the model it runs this file, which hands :class:`PolicyModel` to ``mlflow.models.set_model``;
:meth:`PolicyModel.load_context` then rebuilds the policy from the folder:

* ``heuristic.json``: a fixed heuristic of :mod:`policies.heuristics`, its class and constructor
  parameters (:func:`heuristic_spec`);
* anything else: a learned policy, read by ``policies.learned.load_policy`` (ponder's own
  formats: JSON and weights, no pickle).

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
import inspect
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
from policies import heuristics
from policies.base import Policy

__all__ = [
    "ENV_CONFIG_FILE",
    "HEURISTIC_FILE",
    "PolicyModel",
    "config_from_json",
    "config_to_json",
    "heuristic_from_spec",
    "heuristic_spec",
    "load_policy_folder",
    "save_policy_folder",
]

HEURISTIC_FILE = "heuristic.json"
ENV_CONFIG_FILE = "env_config.json"
#: Constructor arguments a heuristic keeps under another attribute name.
_ALIASES = {("BestOfN", "n"): "n_chains"}


def heuristic_spec(policy: Policy) -> dict[str, Any]:
    """A fixed heuristic as JSON data: its class and the constructor arguments it keeps."""
    cls = type(policy).__name__
    if cls not in heuristics.__all__ or getattr(heuristics, cls) is not type(policy):
        raise PolicyError(f"{policy!r} is not one of ponder's fixed heuristics")
    params: dict[str, Any] = {}
    for name in list(inspect.signature(type(policy).__init__).parameters)[1:]:
        attr = _ALIASES.get((cls, name), name)
        value = getattr(policy, attr, None)
        if isinstance(value, bool | int | float | str):
            params[name] = value
    return {
        "kind": "ponder.heuristic",
        "version": 1,
        "class": cls,
        "params": params,
        "name": policy.name,
    }


def heuristic_from_spec(spec: dict[str, Any]) -> Policy:
    """The heuristic a :func:`heuristic_spec` describes."""
    if spec.get("kind") != "ponder.heuristic" or spec.get("version") != 1:
        raise PolicyError("not a ponder heuristic spec (kind ponder.heuristic, version 1)")
    cls = spec.get("class")
    if cls not in heuristics.__all__:
        raise PolicyError(f"unknown heuristic class {cls!r}: use one of {heuristics.__all__}")
    try:
        policy: Policy = getattr(heuristics, cls)(**spec.get("params", {}))
    except TypeError as e:
        raise PolicyError(f"heuristic {cls}: bad parameters {spec.get('params')}: {e}") from e
    if spec.get("name"):
        policy.name = str(spec["name"])
    return policy


def config_to_json(config: EnvConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_json(data: dict[str, Any]) -> EnvConfig:
    d = dict(data)
    if isinstance(d.get("prices"), dict):
        d["prices"] = Prices(**d["prices"])
    return EnvConfig(**d)


def save_policy_folder(policy: Policy, folder: str | Path, config: EnvConfig) -> Path:
    """Write ``policy`` (a heuristic's spec, or a learned policy's own ``save``) and the env
    settings into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save = getattr(policy, "save", None)
    if callable(save):
        save(out)
    else:
        (out / HEURISTIC_FILE).write_text(json.dumps(heuristic_spec(policy), indent=2) + "\n")
    (out / ENV_CONFIG_FILE).write_text(json.dumps(config_to_json(config), indent=2) + "\n")
    return out


def load_policy_folder(folder: str | Path) -> tuple[Policy, EnvConfig]:
    """The policy and env settings :func:`save_policy_folder` wrote."""
    p = Path(folder)
    if not p.is_dir():
        raise PolicyError(f"no policy folder at {p}")
    cfg_path = p / ENV_CONFIG_FILE
    config = config_from_json(json.loads(cfg_path.read_text())) if cfg_path.exists() else None
    if (p / HEURISTIC_FILE).exists():
        policy = heuristic_from_spec(json.loads((p / HEURISTIC_FILE).read_text()))
    else:
        from policies.learned import load_policy  # (imports torch: only for learned ones)

        policy = load_policy(p)
    return policy, config if config is not None else EnvConfig()


class PolicyModel(PythonModel):  # type: ignore[misc]
    """Observations (a DataFrame with the env's feature columns) -> actions."""

    policy: Policy
    config: EnvConfig

    def load_context(self, context: Any) -> None:
        self.policy, self.config = load_policy_folder(context.artifacts["policy"])

    # (MLflow reads predict's type hints: a DataFrame hint takes the logged signature's schema.)
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        x = _observations(model_input)
        p = params or {}
        policy = self.policy
        lam = float(p.get("lam", -1.0))
        if lam >= 0:
            with_lam = getattr(policy, "with_lam", None)
            if not callable(with_lam):
                raise PolicyError(f"{policy.name} takes no λ (only learned policies do)")
            policy = with_lam(lam)
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
