"""vLLM's CPU environment: ponder sets only what is unset, and says when a variable set before
overrides the KV cache size asked for (vLLM reads the variable, not the option)."""

from __future__ import annotations

import logging

import pytest

from env.generators.vllm import _warn_kv_override, cpu_env


def test_cpu_env_sets_only_what_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in (
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_ENABLE_V1_MULTIPROCESSING",
        "VLLM_CPU_OMP_THREADS_BIND",
    ):
        monkeypatch.setenv(k, "x")  # (recorded first, so what cpu_env sets is undone after)
        monkeypatch.delenv(k)
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    set_now = cpu_env(3)
    assert set_now["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert set_now["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in set_now  # the user's value stays


def test_a_kv_cache_variable_set_before_is_named_when_it_overrides_the_option(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    with caplog.at_level(logging.WARNING, logger="env.generators.vllm"):
        _warn_kv_override(6)
    assert "VLLM_CPU_KVCACHE_SPACE=4" in caplog.text and "not the 6 asked for" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="env.generators.vllm"):
        _warn_kv_override(4)
    assert caplog.text == ""
