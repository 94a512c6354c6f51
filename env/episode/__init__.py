"""The decision problem: an episode's configuration and rules, its observation, the single and
vectorised Gymnasium environments, and their registration."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Action",
    "Prices",
    "decode_tokens",
    "EnvConfig",
    "ComputeAllocationEnv",
    "ChainState",
    "REASONS",
    "BatchedReplayEnv",
    "replay_chain_end",
    "replay_order",
    "CONF_SCALE",
    "ENTROPY_SCALE",
    "ESC_WINDOW",
    "FEATURES",
    "FEATURE_NAMES",
    "N_FEATURES",
    "Feature",
    "EpisodeView",
    "observe",
    "feature_table",
    "DIFFICULTY_FEATURES",
    "DifficultyModel",
    "difficulty_features",
    "fit_difficulty",
    "bank_difficulty",
    "DEFAULT_BANK",
    "make_env",
    "make_vector_env",
]

# Names load on first use, so importing the package stays cheap.
_LAZY = {
    "Action": "env.episode.config",
    "Prices": "env.episode.config",
    "decode_tokens": "env.episode.config",
    "EnvConfig": "env.episode.config",
    "ComputeAllocationEnv": "env.episode.single",
    "ChainState": "env.episode.single",
    "REASONS": "env.episode.vector",
    "BatchedReplayEnv": "env.episode.vector",
    "replay_chain_end": "env.episode.vector",
    "replay_order": "env.episode.vector",
    "CONF_SCALE": "env.episode.observation",
    "ENTROPY_SCALE": "env.episode.observation",
    "ESC_WINDOW": "env.episode.observation",
    "FEATURES": "env.episode.observation",
    "FEATURE_NAMES": "env.episode.observation",
    "N_FEATURES": "env.episode.observation",
    "Feature": "env.episode.observation",
    "EpisodeView": "env.episode.observation",
    "observe": "env.episode.observation",
    "feature_table": "env.episode.observation",
    "DIFFICULTY_FEATURES": "env.episode.difficulty",
    "DifficultyModel": "env.episode.difficulty",
    "difficulty_features": "env.episode.difficulty",
    "fit_difficulty": "env.episode.difficulty",
    "bank_difficulty": "env.episode.difficulty",
    "DEFAULT_BANK": "env.episode.registration",
    "make_env": "env.episode.registration",
    "make_vector_env": "env.episode.registration",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'env.episode' has no attribute {name!r}")
