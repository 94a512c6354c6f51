"""Cancellation of a question's engine work: a :class:`CancelScope` that generators honour.

The controller runs each question's episode in a worker thread inside a scope
(``with scope.active(): ...``); when the question is abandoned (its client left, its latency cap
ran out) it calls :meth:`CancelScope.cancel` from any thread. From then on:

* no new engine call starts: :class:`~env.generators.live.LiveGenerator` and
  :class:`~env.generators.openai.OpenAIBackend` call :func:`check_cancelled` before each one and
  raise :class:`~features.errors.Cancelled`;
* calls in flight are closed: a backend that can stop one registers a closer with
  :meth:`CancelScope.on_cancel` while it waits (the OpenAI backend cancels its HTTP requests,
  which closes their connections, and vLLM aborts a request whose client disconnected).

The scope travels with the thread's context (:mod:`contextvars`): a backend that hands work to
other threads copies the context to them. Code outside any scope is never cancelled.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import threading
from collections.abc import Callable, Iterator

from features.errors import Cancelled

__all__ = ["CancelScope", "check_cancelled", "current_scope"]

log = logging.getLogger(__name__)

_SCOPE: contextvars.ContextVar[CancelScope | None] = contextvars.ContextVar(
    "ponder_cancel_scope", default=None
)


class CancelScope:
    """A flag that stops a question's engine work, and the closers of its calls in flight.

    Thread-safe: :meth:`cancel` may be called from any thread (the event loop of the proxy, the
    thread that waited for a latency cap), the work it stops runs in others.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closers: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self.reason: str | None = None

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self.reason is not None

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the work: close every call in flight, refuse new ones (idempotent)."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            closers = list(self._closers.values())
            self._closers.clear()
        for close in closers:
            try:
                close()
            except Exception:  # a closer must not keep the others from running
                log.exception("closing an engine call failed")

    def check(self) -> None:
        """Raise :class:`~features.errors.Cancelled` if the scope was cancelled."""
        if self.reason is not None:
            raise Cancelled(f"the engine work was cancelled ({self.reason})")

    @contextlib.contextmanager
    def on_cancel(self, close: Callable[[], None]) -> Iterator[None]:
        """While the block runs, :meth:`cancel` calls ``close`` (at once if already cancelled)."""
        with self._lock:
            key = next(self._ids)
            cancelled = self.reason is not None
            if not cancelled:
                self._closers[key] = close
        if cancelled:
            close()
        try:
            yield
        finally:
            with self._lock:
                self._closers.pop(key, None)

    @contextlib.contextmanager
    def active(self) -> Iterator[CancelScope]:
        """Make this the current scope of the calling thread's context for the block."""
        token = _SCOPE.set(self)
        try:
            yield self
        finally:
            _SCOPE.reset(token)


def current_scope() -> CancelScope | None:
    """The scope of the calling context (``None``: outside any scope, never cancelled)."""
    return _SCOPE.get()


def check_cancelled() -> None:
    """Raise :class:`~features.errors.Cancelled` if the current scope was cancelled."""
    scope = _SCOPE.get()
    if scope is not None:
        scope.check()
