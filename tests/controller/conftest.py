"""Fixtures of the controller tests: a generator wrapper that sleeps and counts what was decoded."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from env.episode.config import decode_tokens
from env.types import TokenUsage


class Slow:
    """Wraps a generator: sleeps before chosen calls and counts every token it hands out.

    Args:
        inner: the generator.
        delays: seconds to sleep before each call to extend/probe/judge (a number), or
            ``{call_number: seconds}`` (1-based over those calls); :data:`HANG` instead of seconds
            blocks that call until :meth:`release` (a hung engine, with no clock involved).
    """

    #: A delay that blocks the call until :meth:`release`.
    HANG = float("inf")

    def __init__(self, inner: Any, delays: float | Mapping[int, float] = 0.0) -> None:
        self.inner = inner
        self.delays = delays
        self.calls = 0
        self.active = 0
        self.usage = TokenUsage()
        self.lock = threading.Lock()
        self.released = threading.Event()

    def release(self) -> None:
        """Let every hung call go on."""
        self.released.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def decoded(self) -> int:
        """Decoded tokens of everything the generator returned."""
        return decode_tokens(self.usage)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no call is running (calls abandoned at a latency cap end by themselves)."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.active, "a generator call is still running"

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        with self.lock:
            self.calls += 1
            n = self.calls
            self.active += 1
        try:
            d = self.delays.get(n, 0.0) if isinstance(self.delays, Mapping) else self.delays
            if d == self.HANG:
                self.released.wait()
            elif d:
                time.sleep(d)
            out = fn(*args, **kw)
            with self.lock:
                for item in out:
                    self.usage = self.usage + item.usage
            return out
        finally:
            with self.lock:
                self.active -= 1

    def start(self, *args: Any, **kw: Any) -> Any:
        return self.inner.start(*args, **kw)

    def extend(self, chains: Sequence[Any], k: int, **kw: Any) -> Any:
        return self._call(self.inner.extend, chains, k, **kw)

    def probe(self, chains: Sequence[Any], **kw: Any) -> Any:
        return self._call(self.inner.probe, chains, **kw)

    def judge(self, chains: Sequence[Any]) -> Any:
        return self._call(self.inner.judge, chains)


@pytest.fixture
def slow() -> type[Slow]:
    return Slow
