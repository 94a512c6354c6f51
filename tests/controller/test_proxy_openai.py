"""The proxy speaks OpenAI's API in full (issue 23), over the fake generator: the assistant
message is a chain's text, streaming, conversations through the chat template, every field
honoured or refused by name, per-request policies, request ids, access logs and metrics.

The same against a real vLLM server is in test_proxy_vllm.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from controller.app import create_app
from controller.controller import Controller
from controller.parse import PONDER_FIELDS
from controller.proxy import ProxyServer
from controller.respond import split_reasoning
from env.episode.config import Action, EnvConfig
from env.generators.fake import FakeGenerator
from features.errors import ConfigError
from policies.heuristics import BestOfN, SingleChain

CFG = EnvConfig(chunk_tokens=16, max_chain_tokens=96, max_chains=6, probe_tokens=8, token_cap=400)
Q = "Let a = 40. Let b = a + 2. What is b?"
KEY = "sk-test-123"
#: The fake generator's chain for Q.
FAKE_CHAIN = "b = a + 2 = 40 + 2 = 42\nc = b * 1 = 42 * 1 = 42\nThe answer is \\boxed{42}."


def user(text: str = Q) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def client() -> Iterator[TestClient]:
    ctl = Controller(FakeGenerator(), BestOfN(3), config=CFG)
    with TestClient(create_app(ctl), raise_server_exceptions=False) as c:
        yield c


def sse(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The data events (``[DONE]`` last, as a string) and comment lines of an SSE body."""
    events: list[Any] = []
    comments: list[str] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
            elif line.startswith(":"):
                comments.append(line)
    return events, comments


# -- the assistant message ---------------------------------------------------------------------


def test_the_answer_is_the_chain_that_gave_it(client: TestClient) -> None:
    body = client.post("/v1/chat/completions", json=user()).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": FAKE_CHAIN}
    assert body["ponder"]["answer"] == "42" and body["ponder"]["chain"] is not None


def test_a_probed_answer_is_stated_after_the_unfinished_chain() -> None:
    # a token cap with room for one chunk and its probe: the answer is the probe's
    policy = SingleChain()
    policy.uses_probes = True  # (a probe after every chunk, as the env's default is)
    ctl = Controller(FakeGenerator(), policy, config=CFG, lookahead=False)
    r = ctl.solve(Q, token_cap=CFG.bound(Action.BRANCH))
    assert r.answer is not None and r.reason == "token cap"
    assert r.text.endswith(f"The answer is \\boxed{{{r.answer}}}.")
    assert r.text.startswith("b = a + 2")  # the chain so far, then the probe's answer


def test_thinking_goes_to_reasoning_content() -> None:
    script = {Q: "<think>\na = 40, so b = 42.\nWait, check: 40 + 2 = 42.\n</think>\n\\boxed{42}"}
    assert split_reasoning(script[Q]) == (
        "a = 40, so b = 42.\nWait, check: 40 + 2 = 42.",
        "\\boxed{42}",
    )
    assert split_reasoning("no thinking here") == (None, "no thinking here")
    ctl = Controller(FakeGenerator(script), SingleChain(), config=CFG)
    with TestClient(create_app(ctl)) as c:
        msg = c.post("/v1/chat/completions", json=user()).json()["choices"][0]["message"]
        assert msg["reasoning_content"].startswith("a = 40, so b = 42.")
        assert msg["content"] == "\\boxed{42}"
        events, _ = sse(c.post("/v1/chat/completions", json={**user(), "stream": True}).text)
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    thinking = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert thinking == msg["reasoning_content"] and content == "\\boxed{42}"


# -- streaming ---------------------------------------------------------------------------------


def test_stream_is_openai_chunks_with_usage_and_done(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**user(), "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events, _ = sse(r.text)
    assert events[-1] == "[DONE]"
    first, *middle, final, usage, _done = events
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert len({e["id"] for e in events[:-1]}) == 1
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in [first, *middle])
    assert text == FAKE_CHAIN
    assert final["choices"][0]["finish_reason"] == "stop" and final["ponder"]["answer"] == "42"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    # the same answer, not streamed
    plain = client.post("/v1/chat/completions", json=user()).json()
    assert plain["usage"]["completion_tokens"] == usage["usage"]["completion_tokens"]


def test_stream_options_and_completions_stream(client: TestClient) -> None:
    body = {**user(), "stream": True, "stream_options": {"include_usage": False}}
    events, _ = sse(client.post("/v1/chat/completions", json=body).text)
    assert all("usage" not in e for e in events[:-1])
    r = client.post("/v1/completions", json={"prompt": Q, "stream": True})
    events, _ = sse(r.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == FAKE_CHAIN
    r = client.post("/v1/chat/completions", json={**user(), "stream_options": {}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_progress_comments_name_each_decision(client: TestClient) -> None:
    body = {**user(), "stream": True, "ponder": {"progress": True}}
    events, comments = sse(client.post("/v1/chat/completions", json=body).text)
    steps = [json.loads(c.split(" ", 2)[2]) for c in comments if "ponder-progress" in c]
    assert steps[0]["action"] == "start" and steps[-1]["action"] == "stop"
    assert steps[-1]["decoded"] == events[-2]["usage"]["completion_tokens"]
    r = client.post("/v1/chat/completions", json={**user(), "ponder": {"progress": True}})
    assert r.status_code == 400 and "needs stream" in r.json()["error"]["message"]


def test_an_upstream_failure_mid_stream_is_an_error_event() -> None:
    ctl = Controller(FakeGenerator(faults={1: "error"}), SingleChain(), config=CFG)
    with TestClient(create_app(ctl)) as c:
        r = c.post("/v1/chat/completions", json={**user(), "stream": True})
        events, _ = sse(r.text)
        assert events[0]["error"]["code"] == "upstream_failed" and events[-1] == "[DONE]"
        metrics = c.get("/metrics").text
    assert 'ponder_requests_total{endpoint="/v1/chat/completions",status="502"} 1' in metrics


def test_the_official_client_streams_sync_and_async() -> None:
    import openai

    ctl = Controller(FakeGenerator(), BestOfN(2), config=CFG)
    with ProxyServer(create_app(ctl, api_key=KEY)) as server:
        client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=30)
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": Q}], stream=True
        )
        parts = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
        assert "".join(parts) == FAKE_CHAIN

        async def main() -> tuple[str, str]:
            aclient = openai.AsyncOpenAI(
                base_url=server.url, api_key=KEY, max_retries=0, timeout=30
            )
            plain = await aclient.chat.completions.create(
                model="m", messages=[{"role": "user", "content": Q}]
            )
            stream = await aclient.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": Q}],
                stream=True,
                stream_options={"include_usage": True},
            )
            text = ""
            async for ch in stream:
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                else:
                    assert ch.usage is not None and ch.usage.completion_tokens > 0
            await aclient.close()
            return plain.choices[0].message.content or "", text

        plain, streamed = asyncio.run(main())
        assert plain == streamed == FAKE_CHAIN


# -- conversations -------------------------------------------------------------------------------


def test_the_conversation_goes_through_the_chat_template() -> None:
    gen = FakeGenerator(chat=True, template="chat")
    ctl = Controller(gen, SingleChain(), config=CFG)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Let x = 3."},
        {"role": "assistant", "content": "Noted: x = 3."},
        {"role": "user", "content": Q},
    ]
    with TestClient(create_app(ctl)) as c:
        r = c.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 200, r.text
    prompt = gen.fake.decode(gen.fake.requests[0].prompt_ids)
    assert prompt.startswith(
        "<|system|>\nYou are terse.\n<|user|>\nLet x = 3.\n<|assistant|>\nNoted: x = 3.\n<|user|>\n"
        + Q
    )
    assert "You are a helpful assistant" not in prompt  # the client's system prompt replaces it
    # without a system prompt, the template's own
    with TestClient(create_app(ctl)) as c:
        c.post("/v1/chat/completions", json=user())
    assert gen.fake.decode(gen.fake.requests[-1].prompt_ids).startswith(
        "<|system|>\nYou are a helpful assistant"
    )


@pytest.mark.parametrize(
    ("messages", "param", "says"),
    [
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
            "messages[1].role",
            "system messages must come before",
        ),
        (
            [{"role": "user", "content": Q}, {"role": "assistant", "content": "x"}],
            "messages[1].role",
            "the last message must be the user's question",
        ),
        ([{"role": "tool", "content": "x"}], "messages[0].role", "ponder calls no tools"),
        (
            [{"role": "user", "content": Q, "name": "ann"}],
            "messages[0].name",
            "is not supported",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0].type",
            "text parts only",
        ),
    ],
)
def test_conversations_ponder_cannot_render_are_refused(
    client: TestClient, messages: list[Any], param: str, says: str
) -> None:
    r = client.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"]


def test_a_system_prompt_on_a_raw_template_is_refused(client: TestClient) -> None:
    body = {"messages": [{"role": "system", "content": "be brief"}, user()["messages"][0]]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "needs a chat model" in r.json()["error"]["message"]


# -- every field honoured or refused by name ----------------------------------------------------

REFUSED: list[tuple[str, Any]] = [
    ("stop", ["\n"]),
    ("seed", 7),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("frequency_penalty", 0.5),
    ("presence_penalty", -1),
    ("logit_bias", {"50256": -100}),
    ("store", True),
    ("metadata", {"k": "v"}),
    ("temperature", 1.3),
    ("top_p", 0.9),
    ("n", 2),
    ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
    ("parallel_tool_calls", True),
    ("audio", {"voice": "x"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "high"),
    ("service_tier", "auto"),
    ("web_search_options", {}),
    ("max_completion_tokens", 0),
    ("echo", True),
    ("best_of", 3),
    ("suffix", "x"),
    ("top_k", 5),
]


@pytest.mark.parametrize(("field", "value"), REFUSED, ids=[f for f, _ in REFUSED])
def test_every_unsupported_field_is_a_400_naming_it(
    client: TestClient, field: str, value: Any
) -> None:
    r = client.post("/v1/chat/completions", json={**user(), field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"], err


ACCEPTED: list[tuple[str, Any]] = [
    ("stop", None),
    ("stop", []),
    ("seed", None),
    ("logprobs", False),
    ("frequency_penalty", 0),
    ("presence_penalty", 0.0),
    ("logit_bias", {}),
    ("temperature", 0.7),  # the server's
    ("top_p", 1),
    ("n", 1),
    ("response_format", {"type": "text"}),
    ("user", "ann"),
    ("max_tokens", 300),
    ("max_completion_tokens", 300),
    ("store", False),
]


@pytest.mark.parametrize(("field", "value"), ACCEPTED, ids=[f"{f}={v}" for f, v in ACCEPTED])
def test_fields_at_what_ponder_does_anyway_are_accepted(
    client: TestClient, field: str, value: Any
) -> None:
    r = client.post("/v1/chat/completions", json={**user(), field: value})
    assert r.status_code == 200, r.text


def test_completions_fields(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": Q, "messages": []})
    assert r.status_code == 400 and "belongs to the chat API" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": Q, "logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = client.post("/v1/completions", json={"prompt": Q, "echo": False, "best_of": 1})
    assert r.status_code == 200


def test_the_server_temperature_is_what_a_request_must_match() -> None:
    ctl = Controller(FakeGenerator(), SingleChain(), config=CFG)
    with TestClient(create_app(ctl, temperature=1.0)) as c:
        assert c.post("/v1/chat/completions", json={**user(), "temperature": 1}).status_code == 200
        r = c.post("/v1/chat/completions", json={**user(), "temperature": 0.7})
    assert r.status_code == 400 and "temperature=1" in r.json()["error"]["message"]


# -- per-request policy, λ, caps ----------------------------------------------------------------


def test_a_request_chooses_among_the_loaded_policies() -> None:
    gen = FakeGenerator()
    main = Controller(gen, BestOfN(3), config=CFG)
    alt = Controller(gen, SingleChain(), config=CFG)
    with TestClient(create_app(main, more=[alt])) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == ["ponder/best-of-3", "ponder/single"]
        default = c.post("/v1/chat/completions", json=user()).json()["ponder"]
        by_field = c.post(
            "/v1/chat/completions", json={**user(), "ponder": {"policy": "single"}}
        ).json()["ponder"]
        by_model = c.post("/v1/chat/completions", json={**user(), "model": "ponder/single"}).json()[
            "ponder"
        ]
        bad = c.post("/v1/chat/completions", json={**user(), "ponder": {"policy": "nope"}})
        lam = c.post("/v1/chat/completions", json={**user(), "ponder": {"lam": 1e-3}})
    assert default["policy"] == "best-of-3" and default["chains"] == 3
    assert by_field["policy"] == by_model["policy"] == "single" and by_field["chains"] == 1
    assert bad.status_code == 400 and "best-of-3, single" in bad.json()["error"]["message"]
    assert lam.status_code == 400 and "takes no price" in lam.json()["error"]["message"]
    with pytest.raises(ConfigError, match="served twice"):
        create_app(main, more=[Controller(gen, BestOfN(3), config=CFG)])


def test_requests_are_routed_by_the_kind_of_their_question() -> None:
    from controller.serve_args import parse_routes

    gen = FakeGenerator()
    main = Controller(gen, BestOfN(3), config=CFG)
    alt = Controller(gen, SingleChain(), config=CFG)
    stub = 'def add(a, b):\n    """Return a + b.\n    >>> add(1, 2)\n    3\n    """\n'

    def classify(text: str) -> str:  # a stand-in for the fitted QueryClassifier
        return "code" if "def " in text else "multistep"

    app = create_app(main, more=[alt], routes={"code": "single"}, classify=classify)
    with TestClient(app) as c:
        code = c.post("/v1/chat/completions", json=user(stub)).json()["ponder"]
        word = c.post("/v1/chat/completions", json=user()).json()["ponder"]
        named = c.post(
            "/v1/chat/completions", json={**user(stub), "ponder": {"policy": "best-of-3"}}
        ).json()["ponder"]
    assert code["policy"] == "single" and word["policy"] == "best-of-3"
    assert named["policy"] == "best-of-3"  # a request that names its policy is not routed
    with pytest.raises(ConfigError, match="not served"):
        create_app(main, routes={"code": "single"}, classify=classify)
    assert parse_routes(["code=best-of-8-verifier"]) == {"code": "best-of-8-verifier"}
    for bad, why in (("code", "KIND=POLICY"), ("poetry=single", "unknown"), ("code=", "KIND")):
        with pytest.raises(ConfigError, match=why):
            parse_routes([bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_routes(["code=a", "code=b"])


def test_serve_route_fits_the_classifier_and_names_the_policies() -> None:
    from controller.build import build_routing
    from controller.serve_args import ServeArgs

    args = ServeArgs(policy="best-of-3", more_policies=("single",), route=("code=single",))
    got = build_routing(args)
    stub = 'def add(a, b):\n    """Return a + b.\n    >>> add(1, 2)\n    3\n    """\n'
    assert got["routes"] == {"code": "single"}
    assert got["classify"](stub) == "code"
    assert got["classify"]("Tom has 3 apples and buys 5 more. How many does he have?") == (
        "multistep"
    )
    assert build_routing(ServeArgs(policy="best-of-3")) == {}


def test_ponder_fields_are_documented_in_the_openapi_schema(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    text = json.dumps(schema)
    missing = [f for f in PONDER_FIELDS if f not in text]
    assert not missing, missing


# -- operations --------------------------------------------------------------------------------


def test_request_ids_are_echoed_and_logged(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ponder.access")
    r = client.post("/v1/chat/completions", json=user(), headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["ponder"]["request_id"] == "abc-123"
    r2 = client.post("/v1/chat/completions", json={**user(), "seed": 1})
    made = r2.headers["x-request-id"]
    assert len(made) == 32 and made != "abc-123"  # an error carries one too
    odd = client.post("/v1/chat/completions", json=user(), headers={"X-Request-Id": "a b\x7f"})
    assert odd.headers["x-request-id"] != "a b\x7f"  # not a sane token: a new one
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ponder.access"]
    first = next(x for x in records if x["request_id"] == "abc-123")
    assert first["status"] == 200 and first["policy"] == "best-of-3"
    assert first["decoded"] > 0 and first["tokens"]["generated"] > 0 and first["reason"] == "stop"
    refused = next(x for x in records if x["request_id"] == made)
    assert refused["status"] == 400 and "seed" in refused["error"]


def test_metrics_have_a_histogram_of_tokens_per_request(client: TestClient) -> None:
    decoded = [
        client.post("/v1/chat/completions", json=user()).json()["usage"]["completion_tokens"]
        for _ in range(2)
    ]
    text = client.get("/metrics").text
    assert "ponder_request_decoded_tokens_count 2" in text
    assert f"ponder_request_decoded_tokens_sum {sum(decoded)}" in text
    assert 'ponder_request_decoded_tokens_bucket{le="+Inf"} 2' in text


def test_a_request_chooses_chain_of_draft_and_tip() -> None:
    gen = FakeGenerator()
    ctl = Controller(gen, SingleChain(), config=CFG)
    with TestClient(create_app(ctl)) as c:
        c.post("/v1/chat/completions", json=user())
        plain = list(gen.fake.requests)
        body = {**user(), "ponder": {"mode": "draft", "tip": {"penalty": 2.5, "window": 100}}}
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        chosen = gen.fake.requests[len(plain) :]
        bad = c.post("/v1/chat/completions", json={**user(), "ponder": {"mode": "terse"}})
        bad_tip = c.post("/v1/chat/completions", json={**user(), "ponder": {"tip": {"window": -1}}})
    assert gen.fake.decode(plain[0].prompt_ids).endswith("Solution:\n")
    assert gen.fake.decode(chosen[0].prompt_ids).endswith("Draft:\n")
    assert all(r.tip is None for r in plain)
    assert chosen[0].tip is not None and chosen[0].tip.penalty == 2.5
    assert chosen[0].tip.window == 100
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "ponder.mode"
    assert bad_tip.status_code == 400 and bad_tip.json()["error"]["param"] == "ponder.tip.window"
