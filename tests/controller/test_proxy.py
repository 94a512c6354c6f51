"""The OpenAI-compatible proxy over the fake generator: answers, usage, errors, caps, metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from controller.app import create_app
from controller.build import build_controller
from controller.controller import Controller
from controller.proxy import ProxyServer
from controller.serve_args import ServeArgs
from env.episode.config import Action, EnvConfig
from env.generators.fake import FakeGenerator
from features.errors import PolicyError
from policies.heuristics import BestOfN, SingleChain

CFG = EnvConfig(chunk_tokens=16, max_chain_tokens=96, max_chains=6, probe_tokens=8, token_cap=400)
OPENING = CFG.bound(Action.BRANCH)
Q = "Let a = 40. Let b = a + 2. What is b?"
KEY = "sk-test-123"


#: The fake generator's chain for Q (the assistant message is a chain's whole text).
FAKE_CHAIN = "b = a + 2 = 40 + 2 = 42\nc = b * 1 = 42 * 1 = 42\nThe answer is \\boxed{42}."


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "whatever",
        "messages": [{"role": "user", "content": Q}],
        **extra,
    }


def client_for(ctl: Controller, **kw: Any) -> TestClient:
    return TestClient(create_app(ctl, **kw), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    ctl = Controller(FakeGenerator(), BestOfN(3), config=CFG, latency_cap_s=30)
    with client_for(ctl, api_key=KEY, max_body_bytes=2000) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        yield c


def test_chat_completion(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "whatever"
    (choice,) = body["choices"]
    # the full chain that gave the answer: its reasoning, then the answer
    assert choice["message"] == {"role": "assistant", "content": FAKE_CHAIN}
    assert choice["finish_reason"] == "stop"
    p = body["ponder"]
    assert p["answer"] == "42" and p["reason"] == "stop" and p["chains"] == 3
    assert p["confidence"] == 1.0 and p["policy"] == "best-of-3" and p["trace_length"] > 3
    u = body["usage"]
    assert (
        u["completion_tokens"]
        == p["decoded"]
        == sum(p["tokens"][k] for k in ("generated", "probe", "judge", "injected")) + p["unused"]
    )
    assert p["unused"] == 0  # best-of-3 opened every chain it planned
    assert u["prompt_tokens"] > 0 and u["total_tokens"] == u["prompt_tokens"] + p["decoded"]
    assert "trace" not in p


def test_completions_and_content_parts(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "m", "prompt": [Q]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == FAKE_CHAIN
    parts = {
        "role": "user",
        "content": [
            {"type": "text", "text": "Let a = 40."},
            {"type": "text", "text": "What is a?"},
        ],
    }
    r = client.post("/v1/chat/completions", json={"messages": [parts]})
    assert r.status_code == 200 and r.json()["ponder"]["answer"] == "42"
    assert r.json()["model"] == "ponder/best-of-3"


def test_per_request_caps_are_clamped(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=chat_body(ponder={"token_cap": OPENING}))
    assert r.json()["usage"]["completion_tokens"] <= OPENING
    assert r.json()["ponder"]["chains"] == 1
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=OPENING))
    assert r.json()["usage"]["completion_tokens"] <= OPENING
    r = client.post(
        "/v1/chat/completions", json=chat_body(ponder={"token_cap": 10**9, "latency_cap_s": 1e6})
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= CFG.token_cap
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=5))
    assert r.status_code == 400
    assert "one chain" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json=chat_body(ponder={"trace": True}))
    trace = r.json()["ponder"]["trace"]
    assert trace[0]["action"] == "start" and trace[-1]["action"] == "stop"
    assert sum(s["delta"] for s in trace) == r.json()["usage"]["completion_tokens"]
    assert "vote_share" in trace[1]["features"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "'messages' must be a non-empty list"),
        (json.dumps({"messages": []}).encode(), "'messages' must be a non-empty list"),
        (
            json.dumps({"messages": [{"role": "system", "content": "x"}]}).encode(),
            "the last message must be the user's question",
        ),
        (json.dumps({"messages": [{"role": "user", "content": " "}]}).encode(), "has no text"),
        (json.dumps(chat_body(stream=1)).encode(), "stream must be true or false"),
        (json.dumps(chat_body(n=2)).encode(), "n must be 1"),
        (json.dumps(chat_body(ponder={"budget": 3})).encode(), "unknown 'ponder' fields"),
        (json.dumps(chat_body(ponder={"token_cap": -1})).encode(), "positive integer"),
        (json.dumps(chat_body(ponder={"latency_cap_s": "x"})).encode(), "latency_cap_s"),
        (json.dumps(chat_body(max_tokens=True)).encode(), "max_tokens must be"),
    ],
)
def test_malformed_requests_are_400(client: TestClient, raw: bytes, message: str) -> None:
    r = client.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"


def test_bad_completion_prompts_are_400(client: TestClient) -> None:
    for prompt in ([1, 2, 3], ["a", "b"], "", None):
        r = client.post("/v1/completions", json={"prompt": prompt})
        assert r.status_code == 400 and "'prompt' must be" in r.json()["error"]["message"]


def test_oversized_bodies_are_413(client: TestClient) -> None:
    big = chat_body(messages=[{"role": "user", "content": "x" * 5000}])
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413
    assert "over this server's limit of 2000 bytes" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}]}'

    r = client.post("/v1/chat/completions", content=chunks())
    assert r.status_code == 413


def test_api_key(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": ""})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = client.post(
        "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer nope"}
    )
    assert r.status_code == 401 and "incorrect API key" in r.json()["error"]["message"]
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    # Health and metrics stay open.
    assert client.get("/health", headers={"Authorization": ""}).json() == {"status": "ok"}
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 200
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "ponder/best-of-3"


def test_unknown_routes_and_methods_answer_in_openai_form(client: TestClient) -> None:
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = client.post("/v1/embeddings", json={})
    assert r.status_code == 404 and "error" in r.json()


def probing(policy: Any) -> Any:
    """``policy``, made to run chunk by chunk with a probe after every chunk (as the env's default
    is), one engine call each: tests that count calls were written for that."""
    policy.uses_probes = True
    policy.acts_between_chains = False  # (nothing read ahead)
    return policy


def test_generator_faults() -> None:
    # Before any answer: 502 with the reason. After one: 200 with the best answer so far.
    ctl = Controller(FakeGenerator(faults={1: "error"}), SingleChain(), config=CFG)
    with client_for(ctl) as c:
        r = c.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 502
    assert "injected failure on call 1" in r.json()["error"]["message"]
    # (chunk by chunk with probes, one chain at a time: call 5 is the second chain's first chunk)
    ctl = Controller(
        FakeGenerator(faults={5: "error"}), probing(BestOfN(3)), config=CFG, lookahead=False
    )
    with client_for(ctl) as c:
        r = c.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200
    body = r.json()
    assert body["ponder"]["reason"].startswith("generator fault")
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"].endswith("The answer is \\boxed{42}.")


def test_latency_cap_answers_in_time(slow: Any) -> None:
    gen = slow(FakeGenerator(), {4: slow.HANG})
    ctl = Controller(gen, probing(SingleChain()), config=CFG, latency_cap_s=20)
    with client_for(ctl) as c:
        r = c.post("/v1/chat/completions", json=chat_body(ponder={"latency_cap_s": 0.5}))
        assert gen.active == 1  # the per-request cap answered while the engine call hung
        gen.release()
    assert r.status_code == 200
    p = r.json()["ponder"]
    assert p["reason"] == "latency cap" and p["answer"] == "42"


def test_metrics_count_requests_tokens_and_latency(client: TestClient) -> None:
    client.post("/v1/chat/completions", json=chat_body())
    client.post("/v1/chat/completions", json=chat_body())
    client.post("/v1/chat/completions", content=b"{")
    client.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer x"})
    text = client.get("/metrics").text
    assert 'ponder_requests_total{endpoint="/v1/chat/completions",status="200"} 2' in text
    assert 'ponder_requests_total{endpoint="/v1/chat/completions",status="400"} 1' in text
    assert 'ponder_requests_total{endpoint="/v1/chat/completions",status="401"} 1' in text
    assert 'ponder_answers_total{reason="stop"} 2' in text
    assert 'ponder_tokens_total{kind="generated"}' in text
    assert "ponder_request_latency_seconds_count 4" in text
    assert 'ponder_request_latency_seconds_bucket{le="+Inf"} 4' in text
    assert "ponder_requests_in_flight 0" in text


def test_the_official_client_through_a_served_proxy() -> None:
    import openai

    ctl = Controller(FakeGenerator(), BestOfN(2), config=CFG)
    with ProxyServer(create_app(ctl, api_key=KEY)) as server:
        client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=30)
        resp = client.chat.completions.create(
            model="ponder", messages=[{"role": "user", "content": Q}]
        )
        assert resp.choices[0].message.content == FAKE_CHAIN
        assert resp.usage is not None and resp.usage.completion_tokens > 0
        assert resp.model_extra is not None and resp.model_extra["ponder"]["chains"] == 2
        bad = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            bad.chat.completions.create(model="p", messages=[{"role": "user", "content": Q}])


def test_startup_refuses_unknown_policies_before_the_upstream() -> None:
    args = ServeArgs(upstream="http://127.0.0.1:1/v1", policy="nosuch")
    with pytest.raises(PolicyError, match="unknown policy 'nosuch'"):
        build_controller(args)
    with pytest.raises(PolicyError, match="never loads pickle"):
        build_controller(ServeArgs(upstream="http://127.0.0.1:1/v1", policy="p.pkl"))
