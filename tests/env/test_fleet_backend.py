"""FleetBackend's routing over fake servers: prefix affinity, least outstanding requests,
failover on a server's own failure (not on a rejected request), and a server probed back in.

Two real vLLM servers, one killed under load, are in tests/controller/test_proxy_fleet.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from env.generators.backend import Completion, CompletionRequest
from env.generators.fake import FakeBackend
from env.generators.fleet import AFFINITY_TOKENS, FleetBackend
from features.errors import ConfigError, GeneratorError, UpstreamDown


class Health:
    """A real HTTP server answering ``GET /health`` with 200 while ``ok`` (else 503)."""

    def __init__(self) -> None:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if health.ok else 503)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.ok = True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()


class Server:
    """A fake model server: answers like :class:`FakeBackend`, or fails as told."""

    def __init__(self, health: Health, model: str = "fake") -> None:
        self.base_url = health.url
        self.health = health
        self.inner = FakeBackend(model_name=model)
        self.model_name = model
        self.eos_token_id = self.inner.eos_token_id
        self.max_model_len: int | None = 4096
        self.down = False  # the server is unreachable
        self.reject = False  # the server refuses the request (4xx)
        self.got: list[CompletionRequest] = []
        self.closed = False

    def complete(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        if self.down:
            raise UpstreamDown(f"no server at {self.base_url}")
        if self.reject:
            raise GeneratorError(f"server at {self.base_url} rejected: HTTP 400: too long")
        self.got.extend(requests)
        return self.inner.complete(requests)

    def encode(self, text: str) -> list[int]:
        if self.down:
            raise UpstreamDown(f"no server at {self.base_url}")
        return self.inner.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode(ids)

    def apply_chat(self, messages: list[dict[str, str]]) -> str | None:
        return self.inner.apply_chat(messages)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    healths = [Health(), Health()]
    yield [Server(h) for h in healths]
    for h in healths:
        h.close()


def request(prompt: Sequence[int], more: Sequence[int] = ()) -> CompletionRequest:
    return CompletionRequest(prompt_ids=(*prompt, *more), max_tokens=8, temperature=0.7)


def test_the_chains_of_a_prompt_stay_on_its_server(servers: list[Server]) -> None:
    fleet = FleetBackend(servers)
    a, b = list(range(1, 200)), list(range(2, 201))
    fleet.complete([request(a)])
    fleet.complete([request(b)])  # a new prompt: the server with fewer in flight (a tie: first)
    assert len(servers[0].got) == 2 and not servers[1].got
    # while server 0 is busy, a new prompt goes to server 1; a's next chunks stay on server 0
    fleet.outstanding[0] = 5
    fleet.complete([request(list(range(3, 202)))])
    fleet.complete([request(a, [7, 7]), request(a, [8])])
    assert len(servers[1].got) == 1 and len(servers[0].got) == 4
    assert servers[0].got[-1].prompt_ids[:AFFINITY_TOKENS] == tuple(a[:AFFINITY_TOKENS])
    fleet.close()
    assert all(s.closed for s in servers)


def test_a_server_that_fails_is_taken_out_and_its_requests_go_to_the_other(
    servers: list[Server],
) -> None:
    fleet = FleetBackend(servers, retry_after_s=0.05)
    a = list(range(1, 100))
    assert fleet.complete([request(a)])  # on server 0
    servers[0].down = True
    servers[0].health.ok = False
    out = fleet.complete([request(a, [5]), request(a, [6])])
    assert len(out) == 2 and len(servers[1].got) == 2
    assert fleet.up == [False, True]
    assert fleet.encode("x") == servers[1].inner.encode("x")  # tokenisation fails over too
    # it comes back once its health check answers, and takes new prompts again
    servers[0].down = False
    servers[0].health.ok = True
    for _ in range(200):
        if fleet.up[0]:
            break
        threading.Event().wait(0.02)
    assert fleet.up == [True, True]
    fleet.outstanding[1] = 3
    fleet.complete([request(list(range(9, 99)))])
    assert len(servers[0].got) == 2
    fleet.close()


def test_a_rejected_request_does_not_take_a_server_out(servers: list[Server]) -> None:
    fleet = FleetBackend(servers)
    servers[0].reject = True
    with pytest.raises(GeneratorError, match="rejected"):
        fleet.complete([request([1, 2, 3])])
    assert fleet.up == [True, True] and not servers[1].got
    fleet.close()


def test_no_server_up_is_a_clear_error(servers: list[Server]) -> None:
    fleet = FleetBackend(servers, retry_after_s=60)
    for s in servers:
        s.down = True
    with pytest.raises(GeneratorError, match="no upstream server is up"):
        fleet.complete([request([1, 2, 3])])
    fleet.close()


def test_a_fleet_serves_one_model(servers: list[Server]) -> None:
    other = Server(servers[1].health, model="another")
    with pytest.raises(ConfigError, match="serve different models"):
        FleetBackend([servers[0], other])
    with pytest.raises(ConfigError, match="given twice"):
        FleetBackend([servers[0], servers[0]])
    with pytest.raises(ConfigError, match="at least one"):
        FleetBackend([])
