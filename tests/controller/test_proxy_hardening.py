"""Hardening of ``ponder serve`` (each test reproduces a failure a careless user or an attacker
found): work stops when the client leaves, the API key cannot be turned off by mistake, every
flag is checked at start-up, client mistakes are 4xx naming the field, and a token cap that cuts
the policy short says so."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from controller import proxy
from controller.app import create_app
from controller.auth import resolve_api_key
from controller.cli import main as cli_main
from controller.controller import MIN_LATENCY_CAP_S, Controller
from controller.parse import MAX_JSON_DEPTH
from controller.proxy import ProxyServer
from controller.serve_args import ServeArgs, check_serve_args
from env.episode.config import Action, EnvConfig
from env.generators.fake import FakeGenerator
from features.errors import ConfigError
from policies.heuristics import BestOfN, SingleChain

CFG = EnvConfig(chunk_tokens=16, max_chain_tokens=96, max_chains=6, probe_tokens=8, token_cap=400)
OPENING = CFG.bound(Action.BRANCH)
Q = "Let a = 40. Let b = a + 2. What is b?"


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": Q}], **extra}


def probing(policy: Any) -> Any:
    """Chunk by chunk with a probe after every chunk: one engine call per step."""
    policy.uses_probes = True
    policy.acts_between_chains = False
    return policy


# -- item 4: the client leaves -----------------------------------------------------------------


def test_a_client_that_leaves_stops_the_upstream_work(
    slow: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The reproduction: a request whose client disconnected after 0.5 s still ran to the token
    cap. Now the engine calls stop within one call of the disconnect, and what the request cost
    is logged and counted in /metrics."""
    gen = slow(FakeGenerator(), 0.05)  # every engine call takes 50 ms
    config = EnvConfig(
        chunk_tokens=8, max_chain_tokens=96, max_chains=6, probe_tokens=8, token_cap=4000
    )
    # Run to its end, best-of-6 chunk by chunk would make ~150 calls (~7 s).
    ctl = Controller(gen, probing(BestOfN(6)), config=config, lookahead=False)
    caplog.set_level(logging.INFO, logger="controller.handler")
    with ProxyServer(create_app(ctl)) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.url}/chat/completions",
                json=chat_body(),
                timeout=httpx.Timeout(0.5, connect=5.0),
            )
        at_leave = gen.calls
        time.sleep(1.0)  # 20 calls' time
        gen.wait_idle()
        assert gen.calls <= at_leave + 1, (at_leave, gen.calls)
        assert gen.calls < 30
        metrics = httpx.get(f"http://{server.host}:{server.port}/metrics").text
    assert "ponder_cancelled_requests_total 1" in metrics
    assert 'ponder_requests_total{endpoint="/v1/chat/completions",status="499"} 1' in metrics
    spent = {
        kind: int(line.rsplit(" ", 1)[1])
        for kind in ("decoded", "in_flight_max")
        for line in metrics.splitlines()
        if line.startswith(f'ponder_cancelled_tokens_total{{kind="{kind}"}}')
    }
    # Every token the engine handed out is counted: exactly for the steps that finished, at
    # most the worst case of the step cut short.
    assert 0 < spent["decoded"] <= gen.decoded <= spent["decoded"] + spent["in_flight_max"]
    assert "the client left" in caplog.text and "cancelled" in caplog.text


@pytest.mark.timeout(60)  # a hang guard; what is checked is counted in engine calls, not timed
def test_cancel_event_returns_the_result_so_far(slow: Any) -> None:
    """Setting the cancel event ends the episode within one engine call: the result so far comes
    back, and no engine call starts after the one in flight (best-of-6 run to its end would make
    dozens)."""
    import asyncio

    gen = slow(FakeGenerator(), 0.05)
    ctl = Controller(gen, probing(BestOfN(6)), config=CFG, lookahead=False)
    at_cancel: list[int] = []

    async def go() -> Any:
        stop = asyncio.Event()

        async def cancel_after_three_calls() -> None:
            while gen.calls < 3:
                await asyncio.sleep(0.01)
            at_cancel.append(gen.calls)
            stop.set()

        watcher = asyncio.create_task(cancel_after_three_calls())
        try:
            return await ctl.asolve(Q, cancel=stop)
        finally:
            watcher.cancel()

    before = set(threading.enumerate())
    r = asyncio.run(go())
    assert r.reason == "cancelled" and 0 < r.decoded < CFG.token_cap
    # The abandoned episode's thread ends after the call in flight, starting none.
    for th in set(threading.enumerate()) - before:
        if th.name == "ponder-question":
            th.join(30)
            assert not th.is_alive(), "the cancelled episode is still running"
    (at,) = at_cancel
    assert gen.calls <= at + 1, (at, gen.calls)


@pytest.mark.parametrize(
    ("flag", "env", "message"),
    [
        ('""', None, "--api-key is empty"),
        ("   ", None, "--api-key is empty"),
        (None, "", "$PONDER_API_KEY is empty"),
        ("None", None, "--api-key None does not turn the key off"),
        ("a key", None, "white space"),
    ],
)
def test_an_empty_api_key_is_refused(
    flag: str | None, env: str | None, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reproduction: `--api-key ""` (an unset variable) silently turned authentication
    off. Now only leaving out both the flag and the variable serves without a key."""
    monkeypatch.delenv("PONDER_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("PONDER_API_KEY", env)
    argv = [] if flag is None else ["--api-key", "" if flag == '""' else flag]
    args = ServeArgs(api_key=None if flag in (None, "None") else argv[1])
    import os

    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_api_key(args.api_key, os.environ, argv)
    with pytest.raises(ConfigError):
        create_app(Controller(FakeGenerator(), SingleChain(), config=CFG), api_key="")


def test_no_key_is_a_choice_made_by_leaving_it_out(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_api_key(None, {}, []) is None
    assert resolve_api_key(None, {"PONDER_API_KEY": "sk-1"}, []) == "sk-1"
    assert resolve_api_key("sk-2", {"PONDER_API_KEY": "sk-1"}, ["--api-key", "sk-2"]) == "sk-2"


# -- item 5: configuration that fails late or lies ---------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "99999"], "--port must be in 1..65535"),
        (["--port", "0"], "--port must be in 1..65535"),
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--temperature", "-1"], "--temperature must be a finite number"),
        (["--latency-cap", "1e-300"], "--latency-cap must be 0"),
        (["--latency-cap", "inf"], "--latency-cap must be 0"),
        (["--token-cap", "0"], "--token-cap must be a positive integer"),
        (["--max-concurrency", "0"], "--max-concurrency must be a positive integer"),
        (["--max-body-bytes", "-5"], "--max-body-bytes must be a positive integer"),
        (["--chunk-tokens", "0"], "--chunk-tokens must be a positive integer"),
        (["--upstream", "localhost:8000"], "--upstream must be an http"),
        (["--upstream", "http://127.0.0.1:99999/v1"], "--upstream"),
        (["--log-level", "loud"], "--log-level must be one of"),
        (["--upstream-api-key", ""], "--upstream-api-key is empty"),
        (["--api-key", ""], "--api-key is empty"),
        (["--eos-token-id", "-1"], "--eos-token-id must be"),
        (["--model-name", " "], "--model-name is empty"),
    ],
)
def test_every_flag_is_checked_before_anything_starts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line, `error: ...`, exit code 1, and nothing contacted (the upstream here does not
    exist: a flag that got past the checks would fail with "no server" instead)."""
    code = cli_main(["serve", "--upstream", "http://127.0.0.1:1/v1", "--policy", "single", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err, err


def test_the_flags_the_checks_allow_run(monkeypatch: pytest.MonkeyPatch) -> None:
    check_serve_args(ServeArgs())
    check_serve_args(ServeArgs(port=1, latency_cap=0, temperature=0.0, log_level="WARNING"))


def test_serve_says_where_it_really_listens(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The reproduction: `--port 99999` said it listened on 99999 and listened on 34463. Now the
    port is checked, bound before the message, and the message reads the bound socket; a port
    in use is one clear error."""
    import uvicorn

    served: list[socket.socket] = []

    def build(args: ServeArgs) -> Any:
        return [Controller(FakeGenerator(), SingleChain(), config=CFG)], SimpleNamespace(
            close=lambda: None
        )

    monkeypatch.setattr(proxy, "build_controllers", build)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.extend(sockets))
    monkeypatch.delenv("PONDER_API_KEY", raising=False)
    from env.generators.server import free_port

    port = free_port()
    caplog.set_level(logging.INFO, logger="controller.proxy")
    proxy.main(["--port", str(port)])
    (sock,) = served
    try:
        assert sock.getsockname()[1] == port
        assert f"listening on http://127.0.0.1:{port}/v1" in caplog.text
        sock.listen()
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            proxy.main(["--port", str(port)])
    finally:
        sock.close()


# -- client mistakes are 4xx naming the field --------------------------------------------------


@pytest.fixture
def client() -> Any:
    ctl = Controller(FakeGenerator(), BestOfN(2), config=CFG, latency_cap_s=30)
    with TestClient(create_app(ctl), raise_server_exceptions=False) as c:
        yield c


def _post(client: TestClient, raw: bytes) -> Any:
    return client.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )


def test_deeply_nested_json_is_a_400(client: TestClient) -> None:
    """The reproduction: a body nested 100k deep gave a 500 and a RecursionError in the log."""
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = _post(client, deep)
    assert r.status_code == 400 and "nests" in r.json()["error"]["message"]
    within_parser = chat_body(
        metadata=json.loads("[" * (MAX_JSON_DEPTH + 5) + "]" * (MAX_JSON_DEPTH + 5))
    )
    r = client.post("/v1/chat/completions", json=within_parser)
    assert r.status_code == 400, r.text
    assert f"deeper than {MAX_JSON_DEPTH} levels" in r.json()["error"]["message"]
    assert r.json()["error"]["param"].startswith("metadata")


def test_a_lone_surrogate_is_a_400_naming_the_field(client: TestClient) -> None:
    """The reproduction: a lone surrogate in the content gave a 502 blaming the upstream."""
    raw = b'{"messages": [{"role": "user", "content": "What is 1+1? \\ud800"}]}'
    r = _post(client, raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[0].content" and "lone surrogate" in err["message"]
    r = _post(client, b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_an_absurd_latency_cap_is_a_400(client: TestClient) -> None:
    """The reproduction: `latency_cap_s: 1e-300` answered 503 "server busy"."""
    for lat in (1e-300, MIN_LATENCY_CAP_S / 2):
        r = client.post("/v1/chat/completions", json=chat_body(ponder={"latency_cap_s": lat}))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert f"at least {MIN_LATENCY_CAP_S:g} s" in err["message"]
        assert err["param"] == "ponder.latency_cap_s"
    r = client.post("/v1/chat/completions", json=chat_body(ponder={"latency_cap_s": 5}))
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}', None),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}', None),
        (json.dumps(chat_body(n=True)).encode(), "n"),
        (json.dumps(chat_body(stream="no")).encode(), "stream"),
        (json.dumps(chat_body(model=5)).encode(), "model"),
        (json.dumps(chat_body(max_tokens=1.5)).encode(), "max_tokens"),
        (json.dumps(chat_body(ponder={"trace": "yes"})).encode(), "ponder.trace"),
        (json.dumps(chat_body(ponder=[1])).encode(), "ponder"),
        (json.dumps({"messages": [{"role": 7, "content": "x"}]}).encode(), "messages[0].role"),
        (
            json.dumps({"messages": [{"role": "user", "content": 7}]}).encode(),
            "messages[0].content",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]}]}).encode(),
            "messages[0].content[0].text",
        ),
        (json.dumps({"messages": ["hi"]}).encode(), "messages[0]"),
    ],
)
def test_invalid_values_anywhere_are_400s_naming_the_field(
    client: TestClient, body: bytes, param: str | None
) -> None:
    r = _post(client, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


# -- a token cap that cuts the policy short ----------------------------------------------------


def test_a_token_cap_that_cuts_the_policy_short_is_visible(client: TestClient) -> None:
    """The reproduction: best-of-2 under a cap that fits one chunk answered finish_reason "stop",
    as if the policy had chosen to stop. Now the reason is the cap, and the action it refused
    is named."""
    r = client.post("/v1/chat/completions", json=chat_body(ponder={"token_cap": OPENING}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    p = body["ponder"]
    assert p["reason"] == "token cap" and p["cut_short"] in ("continue", "branch")
    assert p["chains"] == 1 and body["usage"]["completion_tokens"] <= OPENING
    # With room, the same policy stops of its own accord.
    body = client.post("/v1/chat/completions", json=chat_body()).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["ponder"]["reason"] == "stop" and body["ponder"]["cut_short"] is None


def test_the_controller_reports_the_refused_action() -> None:
    ctl = Controller(FakeGenerator(), SingleChain(), config=CFG)
    capped = ctl.solve(Q, token_cap=OPENING + 8)  # the chain cannot reach its end
    assert capped.reason == "token cap" and capped.cut_short == "continue"
    free = ctl.solve(Q)
    assert free.reason == "stop" and free.cut_short is None
