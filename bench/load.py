"""Load benchmark: ``ponder serve`` under a steady stream of concurrent clients.

    python bench/load.py                                  # starts a vLLM server on the testbed model
    python bench/load.py --upstream http://127.0.0.1:8000/v1
    python bench/load.py --seconds 20 --clients 4        # a smoke run
    python bench/load.py --stream                        # half the clients stream, if the proxy can

``ponder serve`` runs as a subprocess (its own interpreter, as deployed) in front of the vLLM
server. ``clients`` clients (one ``openai.AsyncOpenAI`` on loopback) each ask testbed questions
one after another without pause: for ``warmup`` seconds first (not measured), then for
``seconds`` seconds; then the requests in flight finish. With ``--stream`` a share of the
clients ask with ``stream=True``; one streaming request at the start tells whether the proxy
streams, and if it answers 400 about ``stream`` those clients ask without streaming (a note
says so).

The table shows the requests completed in the measured window, throughput (requests/s and
decoded tokens/s, from ``usage.completion_tokens``), latency p50 / p90 / p99, errors by kind
over the whole run (target: none), and the proxy process's resident memory (``VmRSS``) before
the load, after the warm-up and at the end: memory that keeps growing under a steady load after
the warm-up is a leak. The numbers also go to ``--out`` as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    """Drive ``ponder serve`` with concurrent clients for a bounded time."""

    upstream: str | None = None
    """a running vLLM server's OpenAI root (default: start one on the testbed model)"""
    seconds: float = 60.0
    """measured seconds of load"""
    warmup: float = 10.0
    """seconds of load before the measurement (not counted; the second memory reading)"""
    clients: int = 16
    """concurrent clients, each asking one question after another"""
    stream: bool = False
    """let a share of the clients ask with stream=True (when the proxy streams)"""
    stream_share: float = 0.5
    """the share of the clients that stream with --stream"""
    policy: str = "best-of-2"
    """the proxy's policy spec"""
    template: str = "testbed"
    """prompt template: testbed (raw testbed model) or chat (instruct models)"""
    chunk_tokens: int = 32
    """the proxy's tokens per continue"""
    max_chain_tokens: int = 256
    """the proxy's tokens per chain"""
    token_cap: int = 1024
    """the proxy's decoded tokens per request"""
    timeout: float = 300.0
    """seconds a client waits for one answer (a hang guard)"""
    out: Path = Path("results/bench/load.json")
    """where the numbers go (JSON; the proxy's log goes beside it)"""
    seed: int = 0
    """question seed"""


@dataclass
class Sample:
    """One request: when it ran (seconds since the load started) and what came back."""

    started: float
    ended: float
    kind: str
    """ok, or the kind of error"""
    stream: bool
    tokens: int = 0
    reason: str = ""
    ttft: float | None = None


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] if s else float("nan")


def _question(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
    return f"Let a = {a}. Let b = a + {b}. Let c = b * {c}. What is c?"


def _rss_kib(pid: int) -> int | None:
    """The process's resident memory in KiB (``VmRSS``), ``None`` once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _stop_orphaned_servers() -> None:
    """Stop a vLLM server this process started but holds no handle to (an interrupt while
    ``start_vllm_server`` waited for it): its process group, found among our children."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid != os.getpid() or b"vllm.entrypoints" not in cmd:
            continue
        pid = int(entry.name)  # started with start_new_session: its pid is its group id
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while not (reaped := _reap(pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # what is left of its group (engine workers)
        if not reaped:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _reap(pid: int) -> bool:
    """Whether our child ``pid`` has exited (reaping it)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True


def _log_tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _wait_ready(proxy: subprocess.Popen[bytes], base: str, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while True:
        if proxy.poll() is not None:
            raise SystemExit(
                f"ponder serve exited with code {proxy.returncode} (log {log_path}):\n"
                + _log_tail(log_path)
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"ponder serve did not answer /health in 120 s (log {log_path})")
        time.sleep(0.2)


async def _probe_stream(client: Any) -> str | None:
    """``None`` when the proxy streams; otherwise why not (its 400 about ``stream``)."""
    import openai

    try:
        chunks = await client.chat.completions.create(
            model="ponder",
            messages=[{"role": "user", "content": _question(random.Random(-1))}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for _ in chunks:
            pass
    except openai.BadRequestError as exc:
        if "stream" not in str(exc).lower():
            raise
        return exc.message
    return None


async def _ask(client: Any, rng: random.Random, stream: bool, t0: float) -> Sample:
    import openai

    messages = [{"role": "user", "content": _question(rng)}]
    started = time.monotonic()
    s = Sample(started - t0, 0.0, "ok", stream)
    try:
        if stream:
            chunks = await client.chat.completions.create(
                model="ponder",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = None
            async for chunk in chunks:
                if s.ttft is None and chunk.choices:
                    s.ttft = time.monotonic() - started
                if chunk.usage is not None:
                    usage = chunk.usage
                extra = (chunk.model_extra or {}).get("ponder")
                if isinstance(extra, dict) and extra.get("reason"):
                    s.reason = str(extra["reason"])
            if usage is None:
                s.kind = "stream without usage"
            else:
                s.tokens = int(usage.completion_tokens)
        else:
            r = await client.chat.completions.create(model="ponder", messages=messages)
            extra = (r.model_extra or {}).get("ponder") or {}
            s.reason = str(extra.get("reason") or "")
            if not r.choices:
                s.kind = "200 without choices"
            elif r.usage is None:
                s.kind = "200 without usage"
            else:
                s.tokens = int(r.usage.completion_tokens)
        if s.reason.startswith("generator fault"):
            s.kind = "200 generator fault"
    except openai.APIStatusError as exc:
        s.kind = f"HTTP {exc.status_code}" + (f" {exc.code}" if exc.code else "")
    except openai.APITimeoutError:
        s.kind = "timeout"
    except openai.APIConnectionError as exc:
        s.kind = f"connection error ({type(exc.__cause__).__name__})"
    s.ended = time.monotonic() - t0
    return s


async def _drive(args: Args, base: str, pid: int, console: Any) -> dict[str, Any]:
    """Run the load; the samples and the memory readings."""
    import httpx
    import openai

    rss: dict[str, int | None] = {"before": _rss_kib(pid)}
    async with openai.AsyncOpenAI(
        base_url=base + "/v1", api_key="none", max_retries=0, timeout=args.timeout
    ) as client:
        n_stream = max(1, round(args.clients * args.stream_share)) if args.stream else 0
        refused = None
        if n_stream:
            refused = await _probe_stream(client)
            if refused is not None:
                console.print(
                    f"note: the proxy does not stream ({refused}); the {n_stream} streaming "
                    "clients ask without streaming"
                )
        streaming = n_stream if refused is None else 0
        samples: list[Sample] = []
        t0 = time.monotonic()
        end = t0 + args.warmup + args.seconds

        async def client_loop(i: int) -> None:
            rng = random.Random(args.seed * 100_003 + i)
            while time.monotonic() < end:
                samples.append(await _ask(client, rng, i < streaming, t0))

        tasks = [asyncio.create_task(client_loop(i)) for i in range(args.clients)]
        try:
            await asyncio.sleep(args.warmup)
            rss["after_warmup"] = _rss_kib(pid)
            await asyncio.gather(*tasks)  # each request is bounded by the client timeout
        finally:
            for t in tasks:
                t.cancel()
    rss["end"] = _rss_kib(pid)
    in_flight = None
    async with httpx.AsyncClient(timeout=10) as http:
        with contextlib.suppress(httpx.HTTPError):
            for line in (await http.get(base + "/metrics")).text.splitlines():
                if line.startswith("ponder_requests_in_flight "):
                    in_flight = int(line.split()[1])
    return {
        "samples": samples,
        "rss": rss,
        "in_flight": in_flight,
        "streaming_clients": streaming,
        "stream_refused": refused,
    }


def _summary(args: Args, run: dict[str, Any]) -> dict[str, Any]:
    samples: list[Sample] = run["samples"]
    lo, hi = args.warmup, args.warmup + args.seconds
    done = [s for s in samples if s.kind == "ok" and lo <= s.ended <= hi]
    lat = [s.ended - s.started for s in done]
    ttft = [s.ttft for s in done if s.stream and s.ttft is not None]
    rss = run["rss"]

    def growth(a: str, b: str) -> int | None:
        return rss[b] - rss[a] if rss.get(a) is not None and rss.get(b) is not None else None

    def pcts(xs: list[float]) -> dict[str, float] | None:
        return {f"p{q}": _percentile(xs, q / 100) for q in (50, 90, 99)} if xs else None

    return {
        "window_s": args.seconds,
        "clients": args.clients,
        "streaming_clients": run["streaming_clients"],
        "stream_refused": run["stream_refused"],
        "requests": len(done),
        "requests_per_s": len(done) / args.seconds,
        "decoded_tokens_per_s": sum(s.tokens for s in done) / args.seconds,
        "mean_decoded_tokens": sum(s.tokens for s in done) / len(done) if done else None,
        "latency_s": pcts(lat),
        "ttft_s": pcts(ttft),
        "answers_by_reason": dict(Counter(s.reason.split(":", 1)[0] or "?" for s in done)),
        "requests_whole_run": len(samples),
        "errors": dict(Counter(s.kind for s in samples if s.kind != "ok")),
        "rss_kib": {
            **rss,
            "growth_since_warmup": growth("after_warmup", "end"),
            "growth_since_before": growth("before", "end"),
        },
        "in_flight_after": run["in_flight"],
    }


def _mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.1f} MiB"


def _table(args: Args, res: dict[str, Any], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("clients (streaming)", f"{res['clients']} ({res['streaming_clients']})")
    table.add_row("measured window (after warm-up)", f"{args.seconds:g} s (+{args.warmup:g} s)")
    table.add_row("requests completed", str(res["requests"]))
    table.add_row("throughput (req/s)", f"{res['requests_per_s']:.2f}")
    table.add_row("throughput (decoded tok/s)", f"{res['decoded_tokens_per_s']:.0f}")
    if res["mean_decoded_tokens"] is not None:
        table.add_row("decoded tokens per request (mean)", f"{res['mean_decoded_tokens']:.0f}")
    for name, key in (("latency", "latency_s"), ("time to first chunk", "ttft_s")):
        if res[key] is not None:
            p = res[key]
            table.add_row(
                f"{name} p50 / p90 / p99 (s)", f"{p['p50']:.2f} / {p['p90']:.2f} / {p['p99']:.2f}"
            )
    reasons = ", ".join(f"{k} {n}" for k, n in sorted(res["answers_by_reason"].items()))
    table.add_row("answers by reason", reasons or "-")
    errors = res["errors"]
    table.add_row(
        f"errors, whole run of {res['requests_whole_run']} (target 0)",
        str(sum(errors.values())),
    )
    for kind, n in sorted(errors.items()):
        table.add_row(f"  {kind}", str(n))
    rss = res["rss_kib"]
    table.add_row("proxy RSS before the load", _mib(rss["before"]))
    table.add_row("proxy RSS after the warm-up", _mib(rss.get("after_warmup")))
    table.add_row("proxy RSS at the end", _mib(rss.get("end")))
    for label, key in (
        ("since the warm-up", "growth_since_warmup"),
        ("in all", "growth_since_before"),
    ):
        g = rss[key]
        table.add_row(f"  growth {label}", "?" if g is None else f"{g / 1024:+.1f} MiB")
    flight = res["in_flight_after"]
    table.add_row("proxy requests in flight after", "?" if flight is None else str(flight))
    return table


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: clean up as on Ctrl-C


def main(args: Args) -> None:
    import httpx

    from env.console import wide_console
    from env.generators.server import free_port, start_vllm_server

    if args.seconds <= 0 or args.warmup < 0 or args.clients < 1 or args.timeout <= 0:
        raise SystemExit("--seconds and --timeout must be > 0, --warmup >= 0, --clients >= 1")
    if not 0 < args.stream_share <= 1:
        raise SystemExit(f"--stream-share must be in (0, 1], got {args.stream_share}")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    console = wide_console()
    server = None
    proxy: subprocess.Popen[bytes] | None = None
    log_file = None
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".proxy.log")
    try:
        if args.upstream is None:
            from env.models.testbed.model import testbed_model_path

            console.print("starting vLLM on the testbed model ...")
            try:
                server = start_vllm_server(testbed_model_path(), startup_timeout=300)
            except BaseException:
                _stop_orphaned_servers()
                raise
            upstream = server.url
        else:
            upstream = args.upstream
        model = httpx.get(upstream.rstrip("/") + "/models", timeout=10).json()["data"][0]["id"]
        port = free_port()
        log_file = log_path.open("wb")
        proxy = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "serve", "--upstream", upstream,
             "--policy", args.policy, "--template", args.template, "--port", str(port),
             "--chunk-tokens", str(args.chunk_tokens), "--max-chain-tokens", str(args.max_chain_tokens),
             "--token-cap", str(args.token_cap), "--log-level", "warning",
             "--max-concurrency", str(max(64, args.clients))],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        _wait_ready(proxy, base, log_path)
        console.print(
            f"{args.clients} clients on ponder serve ({args.policy}) for "
            f"{args.warmup:g} + {args.seconds:g} s ..."
        )
        run = asyncio.run(_drive(args, base, proxy.pid, console))
        res = _summary(args, run)
        if proxy.poll() is not None:
            console.print(f"[red]ponder serve exited with code {proxy.returncode} during the load")
        console.print(_table(args, res, f"ponder serve ({args.policy}) under load, vLLM ({model})"))
        load = os.getloadavg()
        console.print(
            f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs; "
            f"proxy log {log_path}"
        )
        report = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
            "upstream": upstream,
            "model": model,
            **res,
            "load_average": list(load),
            "cpus": os.cpu_count(),
        }
        out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {out}")
    finally:
        if proxy is not None:
            proxy.terminate()
            try:
                proxy.wait(15)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()
        if log_file is not None:
            log_file.close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main(tyro.cli(Args))
