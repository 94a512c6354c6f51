"""Generators: one protocol, several engines (in-process vLLM, a vLLM server, replay, a fake).

Engine-backed classes import lazily, so ``import env.generators`` does not import vLLM.
"""

from __future__ import annotations

from typing import Any

from env.generators.backend import Backend, Completion, CompletionRequest, TipRequest
from env.generators.base import Generator, GeneratorBase, GeneratorTraits
from env.generators.prompts import CHAT, TESTBED, PromptTemplate, get_template
from env.types import (
    BudgetForcing,
    Chain,
    Chunk,
    JudgeResult,
    ProbeResult,
    PromptMode,
    Question,
    SamplingConfig,
    TipConfig,
    TokenUsage,
)

__all__ = [
    "CHAT",
    "TESTBED",
    "Backend",
    "BudgetForcing",
    "Capturing",
    "Chain",
    "Chunk",
    "Completion",
    "CompletionRequest",
    "FakeBackend",
    "FakeGenerator",
    "Generator",
    "GeneratorBase",
    "GeneratorTraits",
    "JudgeResult",
    "LiveGenerator",
    "Lookahead",
    "OpenAIBackend",
    "OpenAIGenerator",
    "ProbeResult",
    "PromptMode",
    "PromptTemplate",
    "Question",
    "ReplayGenerator",
    "SamplingConfig",
    "TipConfig",
    "TipRequest",
    "TokenUsage",
    "VLLMBackend",
    "VLLMGenerator",
    "build_engine",
    "get_template",
]

_LAZY = {
    "Capturing": "env.generators.capture",
    "LiveGenerator": "env.generators.live",
    "Lookahead": "env.generators.lookahead",
    "VLLMBackend": "env.generators.vllm",
    "VLLMGenerator": "env.generators.vllm",
    "build_engine": "env.generators.vllm",
    "OpenAIBackend": "env.generators.openai",
    "OpenAIGenerator": "env.generators.openai",
    "FakeBackend": "env.generators.fake",
    "FakeGenerator": "env.generators.fake",
    "ReplayGenerator": "env.generators.replay",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'env.generators' has no attribute {name!r}")
