"""Proxy benchmark: what ``ponder serve`` costs over calling vLLM directly, and its throughput.

    python bench/controller.py                       # starts a vLLM server on the testbed model
    python bench/controller.py --upstream http://127.0.0.1:8000/v1 --template chat
    python bench/controller.py --questions 2 --requests 2 --concurrency 1 2   # a smoke run

``ponder serve`` runs as a subprocess (its own interpreter, as deployed) in front of the vLLM
server.

(a) Overhead. One client asks each question through the proxy (HTTP, the controller, chunked
generation with probes); right after, the same question goes straight to vLLM for the SAME
decoded tokens in the same shape: one sequence per chain of the proxy's answer, as long as that
chain (``min_tokens = max_tokens``, EOS ignored; chains of equal length share a request with
``n``; probe and verifier tokens lengthen the longest, since they ran after its chunks), then
through the in-process
:class:`~controller.controller.Controller` (no HTTP). Paired and interleaved, so drift in the
machine's load hits all three alike. Overheads are ratios of seconds per decoded token, minus
one: proxy vs direct (target <= 10%) is everything ponder adds (chunked generation with probes
between chunks, the policy's decisions, tokenisation round trips; a policy's planned chains are
generated side by side, see :mod:`env.generators.lookahead`, as the direct request samples ``n``
at once); proxy vs in-process is the HTTP layer alone. The in-process controller runs once more
with nothing generated ahead (``lookahead=False``: every chain chunk by chunk), which shows what
side-by-side chains and read-ahead (a chain-deciding learned policy's chains, each in one call)
are worth.

(b) Throughput. ``requests`` questions through the proxy with 1, 8 and 32 concurrent clients,
and the same decoded tokens straight to vLLM at the same concurrency: questions/s, decoded
tokens/s, latency p50 / p95.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    """Measure the proxy's overhead over direct vLLM calls and its throughput."""

    upstream: str | None = None
    """a running vLLM server's OpenAI root (default: start one on --model)"""
    model: str | None = None
    """model folder of the server started here (default: the testbed model)"""
    template: str = "testbed"
    """prompt template: testbed (raw testbed model) or chat (instruct models)"""
    policy: str = "best-of-4"
    """the proxy's policy spec"""
    questions: int = 12
    """questions of the overhead measurement (a)"""
    levels: tuple[int, ...] = (2, 4, 6)
    """testbed difficulty levels the questions are drawn from"""
    chunk_tokens: int = 64
    """the proxy's tokens per continue"""
    max_chain_tokens: int = 256
    """the proxy's tokens per chain"""
    token_cap: int = 2048
    """the proxy's decoded tokens per request"""
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    """concurrent clients of the throughput measurement (b)"""
    requests: int = 32
    """requests per concurrency level in (b)"""
    seed: int = 0
    """question seed"""


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else float("nan")


def main(args: Args) -> None:
    import httpx
    from rich.table import Table

    from controller.controller import Controller
    from env.console import wide_console
    from env.episode.config import EnvConfig
    from env.generators.openai import OpenAIGenerator
    from env.generators.prompts import CHAT, get_template
    from env.generators.server import free_port, start_vllm_server
    from env.models.testbed.task import make_questions
    from env.types import SamplingConfig
    from policies.registry import check_policy, load_policy

    console = wide_console()
    server = None
    if args.upstream is None:
        from env.models.testbed.model import testbed_model_path

        model = args.model or str(testbed_model_path())
        console.print(f"starting vLLM on {model} ...")
        server = start_vllm_server(model, startup_timeout=600)
        upstream = server.url
    else:
        upstream = args.upstream
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "serve", "--upstream", upstream,
         "--policy", args.policy, "--template", args.template, "--port", str(port),
         "--chunk-tokens", str(args.chunk_tokens), "--max-chain-tokens", str(args.max_chain_tokens),
         "--token-cap", str(args.token_cap), "--latency-cap", "0", "--log-level", "warning",
         "--max-concurrency", str(max(args.concurrency))],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    proxy_url = f"http://127.0.0.1:{port}"
    http = httpx.Client(
        timeout=httpx.Timeout(600.0, connect=5.0), limits=httpx.Limits(max_connections=256)
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proxy.poll() is not None:
                raise SystemExit(f"ponder serve exited with code {proxy.returncode}")
            try:
                if http.get(proxy_url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("ponder serve did not come up in 120 s")
            time.sleep(0.2)
        model_name = http.get(upstream.rstrip("/") + "/models").json()["data"][0]["id"]
        template = get_template(args.template)
        n_q = max(args.questions, args.requests)
        pool = make_questions(-(-n_q // len(args.levels)), seed=args.seed, levels=list(args.levels))
        by_level = [[q.text for q, _ in pool if q.difficulty == lv] for lv in args.levels]
        qs = [t for group in zip(*by_level, strict=True) for t in group][:n_q]  # levels mixed

        def via_proxy(q: str) -> tuple[float, int, list[int]]:
            t = time.perf_counter()
            r = http.post(proxy_url + "/v1/completions", json={"model": "ponder", "prompt": q})
            took = time.perf_counter() - t
            r.raise_for_status()
            p = r.json()["ponder"]
            return took, int(p["decoded"]), [int(n) for n in p["chain_tokens"]]

        def direct(q: str, decoded: int, chain_tokens: list[int]) -> float:
            # The same decoded tokens in the same shape: one sequence per chain, as long as the
            # proxy's chain (what else ponder decoded, probes and verifier, extends the longest:
            # it ran after those chunks).
            lens = sorted((n for n in chain_tokens if n > 0), reverse=True) or [decoded]
            lens[0] += max(0, decoded - sum(lens))
            lens = [max(1, min(n, 1024 - 96)) for n in lens]
            bodies = []
            for per, n in sorted(Counter(lens).items()):
                body: dict[str, Any] = {
                    "model": model_name, "n": n, "max_tokens": per, "min_tokens": per,
                    "ignore_eos": True, "temperature": 0.7, "logprobs": 5,
                }  # fmt: skip
                if template.chat:
                    body["messages"] = [
                        {"role": "system", "content": CHAT.system or ""},
                        {"role": "user", "content": CHAT.cot.format(question=q)},
                    ]
                    body.pop("logprobs")
                    body["logprobs"], body["top_logprobs"] = True, 5
                else:
                    body["prompt"] = template.cot.format(question=q)
                bodies.append(body)
            path = "/chat/completions" if template.chat else "/completions"

            def post(body: dict[str, Any]) -> None:
                http.post(upstream.rstrip("/") + path, json=body).raise_for_status()

            t = time.perf_counter()
            if len(bodies) == 1:
                post(bodies[0])
            else:
                with ThreadPoolExecutor(len(bodies)) as pool:
                    list(pool.map(post, bodies))
            return time.perf_counter() - t

        # Warm-up: kernels, the prompts' prefix cache for both paths alike.
        w = via_proxy(qs[0])
        direct(qs[0], w[1], w[2])

        # (a) paired overhead, one client: proxy, direct and in-process, question by question.
        gen = OpenAIGenerator(
            upstream,
            template=args.template,
            sampling=SamplingConfig(max_chain_tokens=args.max_chain_tokens + 2 * args.chunk_tokens),
        )
        policy = check_policy(load_policy(args.policy))
        config = EnvConfig(
            chunk_tokens=args.chunk_tokens,
            max_chain_tokens=args.max_chain_tokens,
            token_cap=args.token_cap,
            aggregate=policy.aggregate,  # type: ignore[arg-type]
        )
        ctl = Controller(gen, policy, config=config)
        # The same controller with nothing generated ahead: every chain chunk by chunk, one
        # engine call per chunk (no side-by-side planned chains, no read-ahead).
        by_chunk = Controller(gen, policy, config=config, lookahead=False)
        p_s, d_s, tokens = [], [], []
        in_s, in_tok, ch_s, ch_tok = 0.0, 0, 0.0, 0
        for q in qs[: args.questions]:
            took, decoded, chain_tokens = via_proxy(q)
            p_s.append(took)
            tokens.append(decoded)
            d_s.append(direct(q, decoded, chain_tokens))
            t = time.perf_counter()
            r = ctl.solve(q)
            in_s += time.perf_counter() - t
            in_tok += r.decoded
            t = time.perf_counter()
            r = by_chunk.solve(q)
            ch_s += time.perf_counter() - t
            ch_tok += r.decoded
        gen.close()

        # (b) throughput at each concurrency.
        rows = []
        for c in args.concurrency:
            batch = qs[: args.requests]
            t = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                got = list(pool.map(via_proxy, batch))
            wall = time.perf_counter() - t
            t = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                list(
                    pool.map(lambda x: direct(x[0], x[1][1], x[1][2]), zip(batch, got, strict=True))
                )
            direct_wall = time.perf_counter() - t
            lat = [g[0] for g in got]
            toks = sum(g[1] for g in got)
            rows.append((c, len(batch), wall, toks, lat, direct_wall))

        proxy_rate = sum(tokens) / sum(p_s)
        direct_rate = sum(tokens) / sum(d_s)
        in_rate = in_tok / in_s if in_s else float("nan")
        ch_rate = ch_tok / ch_s if ch_s else float("nan")
        table = Table(title=f"ponder serve ({args.policy}) in front of vLLM ({model_name})")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row(
            "questions x mean decoded tokens", f"{len(tokens)} x {statistics.mean(tokens):.0f}"
        )
        table.add_row("via the proxy (decoded tok/s, 1 client)", f"{proxy_rate:.0f}")
        table.add_row("in-process controller, no HTTP (tok/s)", f"{in_rate:.0f}")
        table.add_row("direct vLLM, same tokens (tok/s)", f"{direct_rate:.0f}")
        table.add_row(
            "overhead: proxy vs direct (target <= 10%)", f"{direct_rate / proxy_rate - 1:+.1%}"
        )
        table.add_row(
            "  of which HTTP layer: proxy vs in-process", f"{in_rate / proxy_rate - 1:+.1%}"
        )
        table.add_row("in-process, chunk by chunk, nothing ahead (tok/s)", f"{ch_rate:.0f}")
        table.add_row(
            "  generating ahead: in-process vs chunk by chunk", f"{in_rate / ch_rate:.2f}x"
        )
        console.print(table)
        t2 = Table(title="throughput through the proxy")
        for col in (
            "clients",
            "requests",
            "req/s",
            "decoded tok/s",
            "p50 s",
            "p95 s",
            "direct tok/s",
            "proxy / direct",
        ):
            t2.add_column(col, justify="right")
        for c, n, wall, toks, lat, dwall in rows:
            t2.add_row(
                str(c), str(n), f"{n / wall:.2f}", f"{toks / wall:.0f}",
                f"{_percentile(lat, 0.5):.2f}", f"{_percentile(lat, 0.95):.2f}",
                f"{toks / dwall:.0f}", f"{dwall / wall:.1%}",
            )  # fmt: skip
        console.print(t2)
        load = os.getloadavg()
        console.print(
            f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs"
        )
    finally:
        http.close()
        proxy.terminate()
        try:
            proxy.wait(15)
        except subprocess.TimeoutExpired:
            proxy.kill()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main(tyro.cli(Args))
