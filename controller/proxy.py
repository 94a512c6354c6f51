"""An OpenAI-compatible proxy: ``ponder serve`` in front of a vLLM server.

Clients talk to ponder as they would to any OpenAI endpoint; for every request the
:class:`~controller.controller.Controller` decides how much compute the question gets (chains,
chunks, probes, verification) on the upstream vLLM server, within the server's token and latency
caps, and answers with the final answer in a short form.

Endpoints:

==============================  =================================================================
``POST /v1/chat/completions``   the question is the last user message (text parts joined)
``POST /v1/completions``        the question is the prompt (one string)
``GET /v1/models``              the one model the proxy serves
``GET /health``                 ``{"status": "ok"}`` when the proxy is up (no upstream call)
``GET /metrics``                Prometheus text: requests by endpoint and status, tokens by kind,
                                answers by reason, requests in flight, a latency histogram,
                                requests whose client left and the tokens they cost
``GET /openapi.json``           the OpenAPI schema of these endpoints (open, like ``/health``)
==============================  =================================================================

The answer is ``The answer is \\boxed{ANSWER}.`` as the message content (chat) or text
(completions); an empty string when no chain produced an answer. ``finish_reason`` is ``stop``
when the policy stopped and ``length`` when a cap or a generator fault ended the episode: also
when the policy stopped only because the token cap left no room for what it would have done next
(``ponder.reason`` is then ``token cap`` and ``ponder.cut_short`` names that action).
``usage`` has ``prompt_tokens`` (the question's prompt as the model saw it), ``completion_tokens``
(the decoded tokens ponder spent: chains, probes, verifier, injected, and ``unused``: tokens
generated ahead for planned chains the policy never opened) and their total. The
``ponder`` key of the response holds the rest:

.. code-block:: json

    {"ponder": {"answer": "42", "confidence": 0.75, "reason": "stop", "chains": 4,
                "decoded": 512, "unused": 0, "chain_tokens": [98, 120, 87, 135],
                "tokens": {"generated": 440, "probe": 72, "judge": 0, "injected": 0,
                           "prefill": 310, "cached": 1900},
                "latency_s": 1.9, "trace_length": 9, "policy": "best-of-4",
                "cut_short": null, "in_flight": 0}}

Requests may carry a ``ponder`` object: ``token_cap`` (int), ``latency_cap_s`` (seconds, at
least :data:`~controller.controller.MIN_LATENCY_CAP_S`) and ``trace`` (bool: include the
decisions with their features). Caps, like ``max_tokens`` / ``max_completion_tokens``, only
tighten the server's own (they are clamped to them). Sampling fields (``temperature``, ...) are
ignored: the server's settings hold.

A client that disconnects before its answer stops its work: the episode is abandoned, no new
upstream call starts and those in flight are cancelled (vLLM aborts them). What it had cost is
logged and counted in ``/metrics`` (``ponder_cancelled_requests_total``,
``ponder_cancelled_tokens_total``); its status there is 499 (client closed request).

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, and every error a
client causes is a 4xx that names the field: 400 for malformed JSON (also ``NaN``, nesting deeper
than :data:`MAX_JSON_DEPTH`, text that is not valid Unicode such as a lone surrogate), missing
messages, streaming or bad fields; 401 for a missing or wrong API key (when the server has one;
``/health``, ``/metrics`` and ``/openapi.json`` are open); 413 for a body over
``--max-body-bytes``; 502 when the upstream failed before any chain had an answer (with an
answer, the response is 200 with ``finish_reason: length`` and ``ponder.reason`` saying
``generator fault: ...``); 503 when the request waited for a slot for its whole latency cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from controller.controller import MIN_LATENCY_CAP_S, Controller, Result
from controller.openapi import ROLES, openapi_schema
from env.episode.config import Action
from features.errors import ConfigError, ModelError, PonderError

__all__ = [
    "MAX_JSON_DEPTH",
    "Metrics",
    "ProxyServer",
    "ServeArgs",
    "build_controller",
    "check_serve_args",
    "create_app",
    "main",
    "resolve_api_key",
]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_PONDER_FIELDS = frozenset({"token_cap", "latency_cap_s", "trace"})
#: Deepest nesting of arrays and objects a request body may have (OpenAI's bodies need 5).
MAX_JSON_DEPTH = 32
#: The status recorded for a request whose client disconnected first (nginx's convention).
CLIENT_CLOSED = 499
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServeArgs:
    """Serve an OpenAI-compatible endpoint in front of a vLLM server; ponder decides the compute."""

    upstream: str = "http://127.0.0.1:8000/v1"
    """the vLLM server's OpenAI root"""
    policy: str = "adaptive-consistency"
    """a policy spec: a heuristic's name (single, best-of-4, s1-256, adaptive-consistency, probe-agree-3, ...; the grammar is in policies/registry.py) or a saved policy's folder"""
    host: str = "127.0.0.1"
    """address to bind (0.0.0.0 exposes the proxy: set an API key)"""
    port: int = 8100
    """port to bind"""
    api_key: str | None = None
    """required bearer token (default: $PONDER_API_KEY; neither given: open; an empty key is refused)"""
    upstream_api_key: str | None = None
    """bearer token for the upstream server"""
    eos_token_id: int | None = None
    """the model's EOS token id, when the upstream cannot say (no --enable-tokenizer-info-endpoint)"""
    max_body_bytes: int = 1_000_000
    """largest request body accepted (413 above)"""
    token_cap: int = 4096
    """decoded tokens per request (requests may ask for less)"""
    latency_cap: float = 60.0
    """seconds per request, 0 for none (requests may ask for less)"""
    template: Literal["auto", "testbed", "chat"] = "auto"
    """prompt template: chat for instruct models, testbed for the raw testbed model"""
    chunk_tokens: int = 64
    """tokens per continue"""
    max_chains: int = 16
    """chains per question"""
    max_chain_tokens: int = 512
    """tokens per chain"""
    temperature: float = 0.7
    """sampling temperature of the chains"""
    max_concurrency: int = 64
    """requests answered at once (others wait, within their latency cap)"""
    lookahead: bool = True
    """generate ahead: a policy's planned chains side by side, and each chain of a policy that finishes its chains in one upstream request (--no-lookahead: chunk by chunk, nothing decoded before the policy asks for it)"""
    hidden_model: str = ""
    """for a policy that reads the model's hidden states: the upstream model's Hugging Face folder (or its GGUF file, beside the folder `ponder model prepare` writes); ponder computes the states at every chunk boundary with transformers beside the upstream (env.generators.Capturing)"""
    hidden_probes: str = ""
    """for a rule that reads hidden states (probe-stop, best-of-N-probe-best) and has no probes of its own: a folder written by HiddenProbes.save (e.g. runs/<bank>/hidden-probes from `ponder run`)"""
    model_name: str | None = None
    """the model name the proxy reports (default: ponder/<policy>)"""
    log_level: str = "info"
    """log level: critical, error, warning, info, debug or trace"""


class Metrics:
    """Counters and a latency histogram, rendered in Prometheus' text format (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.tokens: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.buckets = [0] * len(_LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.in_flight = 0
        self.cancelled = 0
        self.cancelled_tokens: Counter[str] = Counter()

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, endpoint: str, status: int, latency_s: float, result: Result | None) -> None:
        with self._lock:
            if status == CLIENT_CLOSED:
                self.cancelled += 1
                if result is not None:
                    self.cancelled_tokens["decoded"] += int(result.decoded)
                    self.cancelled_tokens["in_flight_max"] += int(result.in_flight)
            self.in_flight -= 1
            self.requests[(endpoint, status)] += 1
            self.latency_sum += latency_s
            self.latency_count += 1
            for i, b in enumerate(_LATENCY_BUCKETS):
                if latency_s <= b:
                    self.buckets[i] += 1
            if result is not None:
                for kind, n in result.tokens.items():
                    self.tokens[kind] += int(n)
                self.tokens["unused"] += int(result.unused)
                self.reasons[result.reason.split(":", 1)[0]] += 1

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP ponder_requests_total Requests answered, by endpoint and HTTP status.",
                "# TYPE ponder_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(
                    f'ponder_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}'
                )
            lines += [
                "# HELP ponder_tokens_total Tokens spent on answered requests, by kind.",
                "# TYPE ponder_tokens_total counter",
            ]
            for kind, n in sorted(self.tokens.items()):
                lines.append(f'ponder_tokens_total{{kind="{kind}"}} {n}')
            lines += [
                "# HELP ponder_answers_total Answers by why the episode ended.",
                "# TYPE ponder_answers_total counter",
            ]
            for reason, n in sorted(self.reasons.items()):
                lines.append(f'ponder_answers_total{{reason="{_label(reason)}"}} {n}')
            lines += [
                "# HELP ponder_cancelled_requests_total Requests whose client disconnected before "
                "the answer (their upstream work was cancelled).",
                "# TYPE ponder_cancelled_requests_total counter",
                f"ponder_cancelled_requests_total {self.cancelled}",
                "# HELP ponder_cancelled_tokens_total Tokens those requests cost: decoded (steps "
                "finished before the disconnect) and in_flight_max (the worst case of the steps "
                "cancelled mid-way).",
                "# TYPE ponder_cancelled_tokens_total counter",
            ]
            for kind in ("decoded", "in_flight_max"):
                lines.append(
                    f'ponder_cancelled_tokens_total{{kind="{kind}"}} {self.cancelled_tokens[kind]}'
                )
            lines += [
                "# HELP ponder_requests_in_flight Requests being answered now.",
                "# TYPE ponder_requests_in_flight gauge",
                f"ponder_requests_in_flight {self.in_flight}",
                "# HELP ponder_request_latency_seconds Time to answer a request.",
                "# TYPE ponder_request_latency_seconds histogram",
            ]
            for b, n in zip(_LATENCY_BUCKETS, self.buckets, strict=True):
                lines.append(f'ponder_request_latency_seconds_bucket{{le="{b:g}"}} {n}')
            lines += [
                f'ponder_request_latency_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                f"ponder_request_latency_seconds_sum {self.latency_sum:.6f}",
                f"ponder_request_latency_seconds_count {self.latency_count}",
            ]
        return "\n".join(lines) + "\n"


class _HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param


class _ClientGone(Exception):
    """The client disconnected before its answer (nobody reads one now)."""


def _error(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _bad(message: str, code: str | None = None, param: str | None = None) -> _HTTPError:
    return _HTTPError(400, message, "invalid_request_error", code, param)


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


@dataclass(frozen=True, slots=True)
class _Ask:
    """What a request asks for."""

    question: str
    model: str | None
    token_cap: int | None
    latency_cap_s: float | None
    trace: bool


def create_app(
    controller: Controller,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 1_000_000,
    max_concurrency: int = 64,
    model: str | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> Starlette:
    """The ASGI app of the proxy over ``controller`` (see the module docstring).

    Args:
        controller: answers the questions (its caps are the server's limits).
        api_key: the bearer token clients must send (``None``: open).
        max_body_bytes: largest body accepted.
        max_concurrency: requests answered at once.
        model: the model name reported (default ``ponder/<policy>``).
        on_shutdown: called when the server stops (closes the generator).
    """
    if max_body_bytes < 1 or max_concurrency < 1:
        raise ConfigError("max_body_bytes and max_concurrency must be >= 1")
    if api_key is not None:
        _check_key_text(api_key, "api_key")
    name = model or f"ponder/{controller.policy.name}"
    metrics = Metrics()
    slots: dict[str, asyncio.Semaphore] = {}  # made on first use, inside the server's loop

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _HTTPError(
                401,
                "missing API key: send the header 'Authorization: Bearer <key>'",
                "invalid_request_error",
                "invalid_api_key",
            )
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise _HTTPError(
                401, "incorrect API key provided", "invalid_request_error", "invalid_api_key"
            )

    async def read_json(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise _bad(f"invalid Content-Length header {length!r}") from None
            if declared > max_body_bytes:
                raise _too_large(declared)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise _too_large(len(raw))
        try:
            body = json.loads(bytes(raw), parse_constant=_no_constant)
        except RecursionError:
            raise _bad(
                f"the body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        _check_json(body)
        return body

    def _too_large(n: int) -> _HTTPError:
        return _HTTPError(
            413,
            f"request body of {n} bytes is over this server's limit of {max_body_bytes} bytes",
            "invalid_request_error",
            "request_too_large",
        )

    async def answer(request: Request, kind: Literal["chat", "completions"]) -> Response:
        t0 = time.monotonic()
        endpoint = request.url.path
        metrics.started()
        status, result = 500, None
        try:
            check_key(request)
            ask = _parse(kind, await read_json(request))
            gone = asyncio.Event()
            watcher = asyncio.create_task(_watch_disconnect(request, gone))
            try:
                result = await _solve(ask, t0, gone)
            finally:
                watcher.cancel()
            if gone.is_set():
                raise _ClientGone
            status, body = _respond(kind, ask, result, name)
            return JSONResponse(body, status_code=status)
        except (_ClientGone, ClientDisconnect):
            # Nobody reads the answer: its work was cancelled (see Controller.asolve's cancel).
            status = CLIENT_CLOSED
            spent = f"{result.decoded} tokens" if result is not None else "nothing"
            cut = (
                f" (+ at most {result.in_flight} cut short)" if result and result.in_flight else ""
            )
            log.info(
                "%s: the client left after %.2f s; its upstream work was cancelled, having cost %s%s",
                endpoint,
                time.monotonic() - t0,
                spent,
                cut,
            )
            return Response(status_code=CLIENT_CLOSED)
        except _HTTPError as exc:
            status = exc.status
            return _error(exc.status, exc.message, exc.kind, exc.code, exc.param)
        except ConfigError as exc:  # the question does not fit (too long, caps too small)
            status = 400
            return _error(400, str(exc), "invalid_request_error")
        except PonderError as exc:
            status = 500
            log.exception("request failed")
            return _error(500, f"{type(exc).__name__}: {exc}", "server_error")
        except Exception:  # a bug: logged with its traceback, answered in OpenAI's form
            status = 500
            log.exception("request failed")
            return _error(500, "internal error in ponder (see the server log)", "server_error")
        finally:
            metrics.finished(endpoint, status, time.monotonic() - t0, result)

    async def _solve(ask: _Ask, t0: float, gone: asyncio.Event) -> Result:
        server_lat = controller.latency_cap_s
        lat = ask.latency_cap_s
        lat = min(lat, server_lat) if lat and server_lat else (lat or server_lat or None)
        sem = slots.setdefault("sem", asyncio.Semaphore(max_concurrency))
        try:
            taken = await _acquire(sem, gone, lat)
        except TimeoutError:
            raise _HTTPError(
                503,
                f"server busy: no free slot within the latency cap of {lat:g} s",
                "server_error",
                "overloaded",
            ) from None
        if not taken:
            raise _ClientGone
        try:
            left = None
            if lat:
                left = lat - (time.monotonic() - t0)
                if left <= 0:
                    raise _HTTPError(
                        503,
                        f"server busy: the latency cap of {lat:g} s ran out waiting for a slot",
                        "server_error",
                        "overloaded",
                    )
            return await controller.asolve(
                ask.question, token_cap=ask.token_cap, latency_cap_s=left, cancel=gone
            )
        finally:
            sem.release()

    async def chat(request: Request) -> Response:
        return await answer(request, "chat")

    async def completions(request: Request) -> Response:
        return await answer(request, "completions")

    async def models(request: Request) -> Response:
        try:
            check_key(request)
        except _HTTPError as exc:
            return _error(exc.status, exc.message, exc.kind, exc.code, exc.param)
        entry = {"id": name, "object": "model", "created": 0, "owned_by": "ponder"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    schema = openapi_schema(
        name, min_tokens=controller.config.bound(Action.BRANCH), max_body_bytes=max_body_bytes
    )

    async def openapi(request: Request) -> Response:
        return JSONResponse(schema)

    async def http_error(request: Request, exc: Exception) -> Response:
        status = int(getattr(exc, "status_code", 500))
        detail = getattr(exc, "detail", "") or "error"
        return _error(
            status, f"{request.method} {request.url.path}: {detail}", "invalid_request_error"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_text, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        exception_handlers={404: http_error, 405: http_error},
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.controller = controller
    return app


async def _watch_disconnect(request: Request, gone: asyncio.Event) -> None:
    """Set ``gone`` when the client disconnects (the body has been read: what the server
    receives next on this request is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


async def _acquire(sem: asyncio.Semaphore, gone: asyncio.Event, timeout: float | None) -> bool:
    """Take a slot: ``True`` once taken, ``False`` if the client left first.

    Raises:
        TimeoutError: no slot within ``timeout`` seconds.
    """
    take = asyncio.ensure_future(sem.acquire())
    leave = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({take, leave}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leave.cancel()
        if not take.done():
            take.cancel()
    if take.done() and not take.cancelled():
        if gone.is_set():
            sem.release()
            return False
        return True
    if gone.is_set():
        return False
    raise TimeoutError


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (JSON numbers are finite)")


def _check_json(body: Any) -> None:
    """Refuse a body nested deeper than :data:`MAX_JSON_DEPTH` or holding text that is not
    valid Unicode (a lone surrogate: it could not be sent upstream or answered)."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path or "the body")
        elif isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise _bad(
                    f"the body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels "
                    f"(at {path or 'the top'})",
                    param=path or None,
                )
            if isinstance(value, dict):
                for k, v in value.items():
                    _check_text(k, f"a key of {path or 'the body'}")
                    stack.append((v, f"{path}.{k}" if path else k, depth + 1))
            else:
                stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("utf-8", "backslashreplace").decode()
        raise _bad(
            f"{where} is not valid Unicode: it holds a lone surrogate ({bad}) at character "
            f"{exc.start}; encode the text as UTF-8",
            param=where,
        ) from None


def _parse(kind: str, body: dict[str, Any]) -> _Ask:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {stream!r}", param="stream")
    if stream:
        raise _bad(
            "stream is not supported: ponder decides the answer before it sends it",
            param="stream",
        )
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int | float) or n != 1):
        raise _bad(f"n must be 1 (ponder answers each question once), got {n!r}", param="n")
    if kind == "chat":
        question = _last_user_message(body.get("messages"))
    else:
        question = _prompt(body.get("prompt"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"model must be a string, got {model!r}", param="model")
    cap = None
    for field in ("max_completion_tokens", "max_tokens"):
        v = body.get(field)
        if v is not None:
            cap = _int_field(v, field) if cap is None else min(cap, _int_field(v, field))
    extra = body.get("ponder")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise _bad("'ponder' must be an object such as {\"token_cap\": 512}", param="ponder")
    unknown = sorted(set(extra) - _PONDER_FIELDS)
    if unknown:
        raise _bad(
            f"unknown 'ponder' fields {unknown}; use {sorted(_PONDER_FIELDS)}", param="ponder"
        )
    if extra.get("token_cap") is not None:
        v = _int_field(extra["token_cap"], "ponder.token_cap")
        cap = v if cap is None else min(cap, v)
    lat = extra.get("latency_cap_s")
    if lat is not None:
        if (
            isinstance(lat, bool)
            or not isinstance(lat, int | float)
            or not math.isfinite(lat)
            or lat <= 0
        ):
            raise _bad(
                f"ponder.latency_cap_s must be a number > 0, got {lat!r}",
                param="ponder.latency_cap_s",
            )
        if lat < MIN_LATENCY_CAP_S:
            raise _bad(
                f"ponder.latency_cap_s must be at least {MIN_LATENCY_CAP_S:g} s (no answer comes "
                f"back sooner), got {lat!r}",
                param="ponder.latency_cap_s",
            )
        lat = float(lat)
    trace = extra.get("trace")
    trace = False if trace is None else trace
    if not isinstance(trace, bool):
        raise _bad(f"ponder.trace must be true or false, got {trace!r}", param="ponder.trace")
    return _Ask(question, model, cap, lat, trace)


def _int_field(v: Any, field: str) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # (JSON does not tell 512 from 512.0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _bad(f"{field} must be a positive integer, got {v!r}", param=field)
    return v


def _last_user_message(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise _bad(
            "'messages' must be a non-empty list of {role, content} objects",
            "messages",
            param="messages",
        )
    last = None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad("every message must be an object with 'role' and 'content'", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise _bad(
                f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}",
                param=f"{where}.role",
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(
                f"{where}.content must be a string or a list of parts, got {content!r}",
                param=f"{where}.content",
            )
        for j, part in enumerate(content if isinstance(content, list) else ()):
            at = f"{where}.content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"{at} must be an object with a 'type'", param=at)
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise _bad(f"{at}.text must be a string", param=f"{at}.text")
        if role == "user":
            last = i
    if last is None:
        raise _bad(
            "'messages' has no user message: the question is the last user message",
            param="messages",
        )
    content = messages[last].get("content")
    if isinstance(content, list):
        content = "\n".join(p["text"] for p in content if p["type"] == "text")
    if not isinstance(content, str) or not content.strip():
        raise _bad("the last user message has no text", param=f"messages[{last}].content")
    return content


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise _bad(
            "'prompt' must be one string (token-id and batched prompts are not supported)",
            param="prompt",
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad("'prompt' must be a non-empty string: the question", param="prompt")
    return prompt


def _respond(kind: str, ask: _Ask, r: Result, model: str) -> tuple[int, dict[str, Any]]:
    if r.answer is None and r.fault:
        raise _HTTPError(
            502,
            f"the upstream model server failed before any answer: {r.reason}",
            "upstream_error",
            "upstream_failed",
        )
    text = f"The answer is \\boxed{{{r.answer}}}." if r.answer is not None else ""
    finish = "stop" if r.reason == "stop" else "length"
    extra: dict[str, Any] = {
        "answer": r.answer,
        "confidence": r.confidence,
        "reason": r.reason,
        "chains": r.n_chains,
        "decoded": r.decoded,
        "unused": r.unused,
        "chain_tokens": list(r.chain_tokens),
        "tokens": dict(r.tokens),
        "latency_s": round(r.latency_s, 6),
        "trace_length": len(r.trace),
        "policy": r.policy,
        "cut_short": r.cut_short,
        "in_flight": r.in_flight,
    }
    if ask.trace:
        extra["trace"] = [
            {
                "action": s.action,
                "decoded": s.decoded,
                "delta": s.delta,
                "elapsed_s": round(s.elapsed_s, 6),
                "features": s.features,
            }
            for s in r.trace
        ]
    created = int(time.time())
    rid = uuid.uuid4().hex
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
        head = {"id": f"chatcmpl-{rid}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        head = {"id": f"cmpl-{rid}", "object": "text_completion"}
    body = {
        **head,
        "created": created,
        "model": ask.model or model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.decoded,
            "total_tokens": r.prompt_tokens + r.decoded,
        },
        "ponder": extra,
    }
    return 200, body


# -- running it ------------------------------------------------------------------------------


class ProxyServer:
    """A proxy served by uvicorn in a background thread (tests, benchmarks, notebooks).

    Use as a context manager; :attr:`url` is the OpenAI root (``http://HOST:PORT/v1``).
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn

        from env.generators.server import free_port

        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="ponder-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> ProxyServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise PonderError(f"the proxy did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _check_key_text(key: str, source: str) -> None:
    if not key.strip():
        raise ConfigError(
            f"{source} is empty: give the key clients must send, or leave out both --api-key "
            "and $PONDER_API_KEY to serve without one"
        )
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in key):
        raise ConfigError(
            f"{source} holds white space, control or non-ASCII characters: an HTTP header "
            "cannot carry it as sent; use printable ASCII only"
        )


def resolve_api_key(
    flag: str | None, environ: Mapping[str, str], argv: Sequence[str] = ()
) -> str | None:
    """The key ``ponder serve`` requires: ``--api-key``, else ``$PONDER_API_KEY``.

    Serving without a key is a choice made by giving neither; a key that is given but empty
    (``--api-key ""``, an unset variable expanded into the flag, ``PONDER_API_KEY=``) is refused,
    so that a mistake never opens the server.

    Raises:
        ConfigError: an empty key, or one no HTTP header can carry.
    """
    if flag is None and any(a == "--api-key" or a.startswith("--api-key=") for a in argv):
        # (tyro reads the word None as no value: a flag that was given is never "no key")
        raise ConfigError(
            "--api-key None does not turn the key off: leave out --api-key (and "
            "$PONDER_API_KEY) to serve without one"
        )
    if flag is not None:
        _check_key_text(flag, "--api-key")
        return flag
    if "PONDER_API_KEY" in environ:
        key = environ["PONDER_API_KEY"]
        _check_key_text(key, "$PONDER_API_KEY")
        return key
    return None


def check_serve_args(args: ServeArgs) -> None:
    """Check every ``ponder serve`` setting before anything starts (one clear error each).

    Raises:
        ConfigError: the first bad setting, with what it must be.
    """
    parts = urlsplit(args.upstream)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--upstream must be an http:// or https:// URL such as http://127.0.0.1:8000/v1, "
            f"got {args.upstream!r}"
        )
    try:
        parts.port  # noqa: B018 (raises for a port out of range)
    except ValueError as exc:
        raise ConfigError(f"--upstream {args.upstream!r}: {exc}") from None
    if not args.host.strip():
        raise ConfigError("--host is empty: give an address to bind, such as 127.0.0.1")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    for flag, v in (
        ("--max-body-bytes", args.max_body_bytes),
        ("--token-cap", args.token_cap),
        ("--chunk-tokens", args.chunk_tokens),
        ("--max-chains", args.max_chains),
        ("--max-chain-tokens", args.max_chain_tokens),
        ("--max-concurrency", args.max_concurrency),
    ):
        if v < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {v}")
    lat = args.latency_cap
    if not math.isfinite(lat) or lat < 0 or 0 < lat < MIN_LATENCY_CAP_S:
        raise ConfigError(
            f"--latency-cap must be 0 (none) or a number of seconds >= {MIN_LATENCY_CAP_S:g}, "
            f"got {lat}"
        )
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(
            f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}"
        )
    if args.eos_token_id is not None and args.eos_token_id < 0:
        raise ConfigError(f"--eos-token-id must be a token id >= 0, got {args.eos_token_id}")
    if args.upstream_api_key is not None:
        _check_key_text(args.upstream_api_key, "--upstream-api-key")
    if args.model_name is not None and not args.model_name.strip():
        raise ConfigError("--model-name is empty: leave it out for ponder/<policy>")
    if args.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(
            f"--log-level must be one of {', '.join(_LOG_LEVELS)}, got {args.log_level!r}"
        )


def build_controller(args: ServeArgs) -> tuple[Controller, Any]:
    """The controller ``ponder serve`` runs, and its generator (to close at shutdown).

    The settings are checked and the policy parsed first, so that a bad flag or an unknown
    policy fails before the upstream is contacted.

    Raises:
        ConfigError: a bad setting (see :func:`check_serve_args`).
        PolicyError: an unknown policy or a policy file.
        GeneratorError: no server at ``args.upstream``.
    """
    from env.episode.config import EnvConfig
    from env.generators.openai import OpenAIGenerator
    from env.types import SamplingConfig
    from policies.registry import check_policy, load_policy

    check_serve_args(args)
    policy = check_policy(load_policy(args.policy))
    probes = _hidden_probes(args, policy)
    config = EnvConfig(
        chunk_tokens=args.chunk_tokens,
        max_chains=args.max_chains,
        max_chain_tokens=args.max_chain_tokens,
        token_cap=args.token_cap,
        aggregate=policy.aggregate,  # type: ignore[arg-type]
    )
    sampling = SamplingConfig(
        temperature=args.temperature,
        max_chain_tokens=config.max_chain_tokens + config.extension_chunks * config.chunk_tokens,
    )
    generator = OpenAIGenerator(
        args.upstream,
        template=None if args.template == "auto" else args.template,
        sampling=sampling,
        api_key=args.upstream_api_key,
        eos_token_id=args.eos_token_id,
        # A call cannot outlive the request it serves by much: the controller stops waiting at
        # the latency cap, and the request behind it ends soon after.
        read_timeout=args.latency_cap + 5.0 if args.latency_cap else 300.0,
        max_concurrency=max(16, args.max_concurrency),
    )
    try:
        gen: Any = generator
        if probes is not None:
            from env.generators.capture import capture_from_manifest

            gen = capture_from_manifest(generator, probes.manifest(), args.hidden_model)
        controller = Controller(
            gen,
            policy,
            config=config,
            latency_cap_s=args.latency_cap,
            lookahead=args.lookahead,
            probes=probes,
        )
    except BaseException:
        generator.close()
        raise
    return controller, generator


def _hidden_probes(args: ServeArgs, policy: Any) -> Any:
    """The hidden-state probes ``policy`` serves with (``None``: it reads no hidden state).

    Raises:
        ConfigError: a policy that reads hidden states without ``--hidden-model``, or a rule
            without probes of its own and no ``--hidden-probes``.
    """
    if not policy.reads_hidden:
        return None
    if not args.hidden_model:
        raise ConfigError(
            f"policy {policy.name!r} reads the model's hidden states: pass --hidden-model "
            "FOLDER, the upstream model's Hugging Face folder (`ponder model prepare --name "
            "...` writes it beside the GGUF file), so that ponder can compute them"
        )
    if policy.hidden_probes is not None:
        return policy.hidden_probes
    if not args.hidden_probes:
        raise ConfigError(
            f"policy {policy.name!r} reads the hidden-state probes and has none of its own: "
            "pass --hidden-probes FOLDER (probes fitted on an annotated bank, e.g. "
            "runs/<bank>/hidden-probes written by `ponder run`)"
        )
    from env.episode.hidden import HiddenProbes

    try:
        return HiddenProbes.load(args.hidden_probes)
    except ModelError as e:
        raise ConfigError(f"--hidden-probes: {e}") from e


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it), or a clear error."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r} is not an address to bind ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server there? "
            "pick another --port, or another --host)"
        ) from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def main(argv: list[str] | None = None) -> None:
    """``ponder serve``: check the arguments, bind the port, build the controller and serve
    until stopped."""
    import tyro
    import uvicorn

    args = tyro.cli(ServeArgs, args=argv, prog="ponder serve")
    check_serve_args(args)
    words = sys.argv[1:] if argv is None else argv
    api_key = resolve_api_key(args.api_key, os.environ, words)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    sock = _bind(args.host, args.port)
    try:
        controller, generator = build_controller(args)
    except BaseException:
        sock.close()
        raise
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serving on %s without an API key: anyone who can reach it can use it", args.host
        )
    app = create_app(
        controller,
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        max_concurrency=args.max_concurrency,
        model=args.model_name,
        on_shutdown=generator.close,
    )
    log.info(
        "ponder serve: %s in front of %s, listening on %s", controller, args.upstream, _url(sock)
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    uvicorn.Server(config).run(sockets=[sock])
