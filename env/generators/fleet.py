"""One :class:`~env.generators.backend.Backend` over several vLLM servers serving one model.

:class:`FleetBackend` spreads a generator's completions over the servers of a fleet (``ponder
serve --upstream A --upstream B``):

* **Prefix affinity.** The chains of one question share their prompt, and a server that has
  prefilled it serves the next chunk from its prefix cache; so a request goes to the server its
  prompt's opening tokens (:data:`AFFINITY_TOKENS` of them) went to before, while that server is
  up.
* **Least outstanding requests.** A prompt seen for the first time goes to the server with the
  fewest requests in flight (the first one on ties).
* **Failover.** A server whose call fails (after its own retries: connection refused, 5xx) is
  taken out at once; the requests it had are sent again to the others (a request holds its whole
  context, so any server can continue a chain, without the cache). A server taken out is probed
  (``GET /health``) every ``retry_after_s`` seconds in the background and comes back when it
  answers. When no server is up, the call fails with a :class:`~features.errors.GeneratorError`
  naming them all.

Tokenisation (``encode``, ``decode``, ``apply_chat``) goes to the first server that is up. The
servers must serve the same model (same name and end-of-sequence token): checked at start.
Cancellation (:mod:`env.generators.cancel`) reaches every server's calls: the fleet's worker
threads run in the caller's context.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx

from env.generators.backend import Completion, CompletionRequest
from env.generators.cancel import check_cancelled
from features.errors import ConfigError, GeneratorError, UpstreamDown

__all__ = ["AFFINITY_TOKENS", "FleetBackend"]

log = logging.getLogger(__name__)

#: Opening prompt tokens that decide a request's server (the chains of a question share them).
AFFINITY_TOKENS = 128
_MAX_AFFINITY = 8192
T = TypeVar("T")


class FleetBackend:
    """A backend over ``servers`` (:class:`~env.generators.openai.OpenAIBackend` or any backend
    with ``base_url``): see the module docstring.

    Args:
        servers: the servers' backends, at least one, each a different URL.
        retry_after_s: seconds between health probes of a server taken out.
        health_timeout_s: how long a health probe waits.

    Raises:
        ConfigError: no server, a URL twice, or servers that serve different models.

    Only a server's own failure (:class:`~features.errors.UpstreamDown`: unreachable, or failing
    after its retries) takes it out; a request it rejects (4xx) fails the call as it would on
    one server.
    """

    def __init__(
        self,
        servers: Sequence[Any],
        *,
        retry_after_s: float = 2.0,
        health_timeout_s: float = 2.0,
    ) -> None:
        if not servers:
            raise ConfigError("a fleet needs at least one server")
        urls = [str(s.base_url) for s in servers]
        for u in urls:
            if urls.count(u) > 1:
                raise ConfigError(f"upstream {u} is given twice: give each server once")
        first = servers[0]
        for s in servers[1:]:
            if (s.model_name, s.eos_token_id) != (first.model_name, first.eos_token_id):
                raise ConfigError(
                    f"the servers serve different models: {first.base_url} serves "
                    f"{first.model_name!r} (EOS {first.eos_token_id}), {s.base_url} serves "
                    f"{s.model_name!r} (EOS {s.eos_token_id}); a fleet serves one model"
                )
        self.servers = list(servers)
        self.urls = urls
        self.model_name: str = first.model_name
        self.eos_token_id: int = first.eos_token_id
        self.retry_after_s = float(retry_after_s)
        self.health_timeout_s = float(health_timeout_s)
        self._lock = threading.Lock()
        self.outstanding = [0] * len(servers)
        #: Whether each server is up (taken out after a failure until a probe answers).
        self.up = [True] * len(servers)
        #: Requests each server has answered (for tests and the bench).
        self.served = [0] * len(servers)
        self._affinity: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self._probing: set[int] = set()
        self._pool = ThreadPoolExecutor(max(4, 4 * len(servers)), thread_name_prefix="ponder-fleet")
        self._closed = threading.Event()

    # -- the Backend protocol -----------------------------------------------------------------

    @property
    def max_model_len(self) -> int | None:
        lens = [s.max_model_len for s in self.servers if s.max_model_len is not None]
        return min(lens) if lens else None

    def reset(self, seed: int) -> None:
        """Nothing to do (servers can be neither reseeded nor have their caches cleared)."""

    def encode(self, text: str) -> list[int]:
        return list(self._any("encode", lambda s: s.encode(text)))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._any("decode", lambda s: s.decode(token_ids)))

    def apply_chat(self, messages: list[dict[str, str]]) -> str | None:
        return self._any("apply_chat", lambda s: s.apply_chat(messages))  # type: ignore[no-any-return]

    def complete(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Run ``requests`` on the fleet: each on its prompt's server (see the module
        docstring), the servers' shares side by side; a failed server's share goes again to
        the others.

        Raises:
            GeneratorError: every server failed.
            Cancelled: the current cancel scope was cancelled.
        """
        if not requests:
            return []
        check_cancelled()
        out: list[Completion | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        failed: set[int] = set()
        errors: list[str] = []
        while pending:
            shares: dict[int, list[int]] = {}
            try:
                for i in pending:
                    shares.setdefault(self._route(requests[i].prompt_ids, failed), []).append(i)
            except GeneratorError:
                with self._lock:  # (those routed before count as outstanding: not any more)
                    for server, ix in shares.items():
                        self.outstanding[server] -= len(ix)
                raise
            futures = {
                server: self._pool.submit(
                    contextvars.copy_context().run, self._run, server, [requests[i] for i in ix]
                )
                for server, ix in shares.items()
            }
            pending = []
            for server, fut in futures.items():
                ix = shares[server]
                try:
                    got = fut.result()
                except UpstreamDown as exc:
                    failed.add(server)
                    errors.append(f"{self.urls[server]}: {exc}")
                    self._take_out(server, exc)
                    pending.extend(ix)
                    continue
                for i, c in zip(ix, got, strict=True):
                    out[i] = c
            check_cancelled()
        return [c for c in out if c is not None]

    def close(self) -> None:
        """Close every server's client and the fleet's threads."""
        self._closed.set()
        for s in self.servers:
            s.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- routing ------------------------------------------------------------------------------

    def _route(self, prompt_ids: Sequence[int], failed: set[int]) -> int:
        key = tuple(int(t) for t in prompt_ids[:AFFINITY_TOKENS])
        with self._lock:
            ok = [i for i, up in enumerate(self.up) if up and i not in failed]
            if not ok:
                raise GeneratorError(
                    f"no upstream server is up ({', '.join(self.urls)}): every one failed; "
                    "they are probed again every "
                    f"{self.retry_after_s:g} s"
                )
            server = self._affinity.get(key)
            if server is None or server not in ok:
                server = min(ok, key=lambda i: (self.outstanding[i], i))
                self._affinity[key] = server
            self._affinity.move_to_end(key)
            while len(self._affinity) > _MAX_AFFINITY:
                self._affinity.popitem(last=False)
            # counted from now: calls routed at the same moment see each other's requests
            self.outstanding[server] += 1
            return server

    def _run(self, server: int, requests: list[CompletionRequest]) -> list[Completion]:
        """``requests`` on ``server`` (they were counted as outstanding when routed)."""
        try:
            got = list(self.servers[server].complete(requests))
        finally:
            with self._lock:
                self.outstanding[server] -= len(requests)
        with self._lock:
            self.served[server] += len(requests)
        return got

    def _any(self, op: str, fn: Callable[[Any], T]) -> T:
        errors = []
        for i, s in enumerate(self.servers):
            if not self.up[i]:
                continue
            try:
                return fn(s)
            except UpstreamDown as exc:
                errors.append(f"{self.urls[i]}: {exc}")
                self._take_out(i, exc)
        raise GeneratorError(
            f"{op}: no upstream server answered ({'; '.join(errors) or 'none is up'})"
        )

    # -- health -------------------------------------------------------------------------------

    def _take_out(self, server: int, exc: BaseException) -> None:
        with self._lock:
            was_up = self.up[server]
            self.up[server] = False
            start = server not in self._probing
            self._probing.add(server)
        if was_up:
            log.warning(
                "upstream %s taken out of the fleet (%s); probing it every %g s",
                self.urls[server],
                exc,
                self.retry_after_s,
            )
        if start:
            threading.Thread(
                target=self._probe, args=(server,), name="ponder-fleet-probe", daemon=True
            ).start()

    def _probe(self, server: int) -> None:
        root = self.urls[server].removesuffix("/v1")
        while not self._closed.wait(self.retry_after_s):
            try:
                ok = httpx.get(root + "/health", timeout=self.health_timeout_s).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                with self._lock:
                    self.up[server] = True
                    self._probing.discard(server)
                log.warning("upstream %s answers again: back in the fleet", self.urls[server])
                return
