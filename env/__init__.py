"""The environment side of ponder: generators, trace banks, questions and the testbed model.

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

__all__ = [
    "BankWriter",
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
    "TraceBank": "env.bank",
    "BankWriter": "env.bank",
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
