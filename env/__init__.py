"""The environment side of ponder: the Gymnasium environment, generators, trace banks, questions.

Importing ``env`` registers ``ponder/ComputeAllocation-v0`` with Gymnasium::

    import gymnasium as gym
    import env  # noqa: F401  (registers the ids; or gym.make("env:ponder/ComputeAllocation-v0"))

    e = gym.make("ponder/ComputeAllocation-v0", bank="data/banks/testbed-arith", split="train")
    vec = gym.make_vec("ponder/ComputeAllocation-v0", num_envs=1024, bank="data/banks/testbed-arith")

``env`` imports ``features`` only; never ``policies`` or ``controller``.
"""

from __future__ import annotations

from typing import Any

from env.generators import (
    BudgetForcing,
    Chain,
    Chunk,
    Generator,
    JudgeResult,
    ProbeResult,
    Question,
    SamplingConfig,
    TipConfig,
    TokenUsage,
)
from features.errors import PonderError

ENV_ID = "ponder/ComputeAllocation-v0"

__all__ = [
    "ENV_ID",
    "Action",
    "BankWriter",
    "BatchedReplayEnv",
    "ComputeAllocationEnv",
    "EnvConfig",
    "Prices",
    "BudgetForcing",
    "Chain",
    "Chunk",
    "FakeGenerator",
    "Generator",
    "JudgeResult",
    "LiveGenerator",
    "OpenAIGenerator",
    "ProbeResult",
    "PonderError",
    "ExecutionVerifier",
    "PRMVerifier",
    "SelfVerifier",
    "Verifier",
    "Question",
    "ReplayGenerator",
    "SamplingConfig",
    "TipConfig",
    "TokenUsage",
    "TraceBank",
    "VLLMGenerator",
    "load_questions",
]

# Generator classes come lazily through env.generators (which knows their modules).
_LAZY = {
    "Action": "env.episode.config",
    "BatchedReplayEnv": "env.episode.vector",
    "ComputeAllocationEnv": "env.episode.single",
    "EnvConfig": "env.episode.config",
    "Prices": "env.episode.config",
    "Verifier": "env.verifiers",
    "SelfVerifier": "env.verifiers",
    "ExecutionVerifier": "env.verifiers",
    "PRMVerifier": "env.verifiers",
    "TraceBank": "env.bank.store",
    "BankWriter": "env.bank.writer",
    "load_questions": "env.questions",
    "LiveGenerator": "env.generators",
    "VLLMGenerator": "env.generators",
    "OpenAIGenerator": "env.generators",
    "FakeGenerator": "env.generators",
    "ReplayGenerator": "env.generators",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'env' has no attribute {name!r}")


def _register() -> None:
    import gymnasium as gym

    if ENV_ID not in gym.registry:
        gym.register(
            id=ENV_ID,
            entry_point="env.episode.registration:make_env",
            vector_entry_point="env.episode.registration:make_vector_env",
        )


_register()
