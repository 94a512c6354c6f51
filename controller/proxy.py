"""An OpenAI-compatible proxy: ``ponder serve`` in front of a vLLM server.

Clients talk to ponder as they would to any OpenAI endpoint; for every request a
:class:`~controller.controller.Controller` decides how much compute the question gets (chains,
chunks, probes, verification) on the upstream vLLM server, within the server's token and latency
caps, and answers with the reasoning and answer of a chain that gave the chosen answer.

Endpoints:

==============================  =================================================================
``POST /v1/chat/completions``   the question is the last message (a user's); the system prompt
                                and earlier turns go through the model's chat template before it
``POST /v1/completions``        the question is the prompt (one string)
``GET /v1/models``              the policies the proxy serves, one model id each (the first is
                                the default; a request picks another by ``model`` or
                                ``ponder.policy``)
``GET /health``                 ``{"status": "ok"}`` when the proxy is up (no upstream call)
``GET /metrics``                Prometheus text: requests by endpoint and status, tokens by kind,
                                answers by reason, requests in flight, histograms of latency and
                                of decoded tokens per request, requests whose client left and
                                the tokens they cost
``GET /openapi.json``           the OpenAPI schema of these endpoints (open, like ``/health``)
==============================  =================================================================

The answer (:mod:`controller.respond`) is the text of a chain that gave the chosen answer (a
finished one first, then the most confident); when only a probe read the answer from an
unfinished chain, its text so far is followed by ``The answer is \\boxed{ANSWER}.``; empty
when no chain produced an answer. A thinking section (``<think>...</think>``) comes in
``reasoning_content``. ``stream: true`` sends the same as Server-Sent Events once the
controller has decided (progress comments while it works, with ``ponder.progress``).
``finish_reason`` is ``stop`` when the policy stopped and ``length`` when a cap or a generator
fault ended the episode: also when the policy stopped only because the token cap left no room
for what it would have done next (``ponder.reason`` is then ``token cap`` and
``ponder.cut_short`` names that action). ``usage`` has ``prompt_tokens`` (the question's prompt
as the model saw it), ``completion_tokens`` (the decoded tokens ponder spent: chains, probes,
verifier, injected, and ``unused``: tokens generated ahead for planned chains the policy never
opened) and their total. The ``ponder`` key of the response holds the rest:

.. code-block:: json

    {"ponder": {"answer": "42", "confidence": 0.75, "reason": "stop", "chains": 4, "chain": 2,
                "decoded": 512, "unused": 0, "chain_tokens": [98, 120, 87, 135],
                "tokens": {"generated": 440, "probe": 72, "judge": 0, "injected": 0,
                           "prefill": 310, "cached": 1900},
                "latency_s": 1.9, "trace_length": 9, "policy": "best-of-4",
                "cut_short": null, "in_flight": 0, "request_id": "9f1c..."}}

Request fields (:mod:`controller.parse`): every OpenAI field is honoured or refused with a 400
naming it, none ignored. The ``ponder`` object: ``token_cap`` (int), ``latency_cap_s`` (seconds,
at least :data:`~controller.controller.MIN_LATENCY_CAP_S`), ``trace`` (bool: include the
decisions with their features), ``policy``, ``lam`` (a learned policy's price of compute) and
``progress``. Caps, like ``max_tokens`` / ``max_completion_tokens``, only tighten the server's
own (they are clamped to them).

Every response carries the request's id in ``x-request-id`` (the client's own, when it sent a
sane one); the ``ponder.access`` logger writes one JSON line per request (id, endpoint, status,
policy, latency, tokens by kind, why the episode ended, the error). On SIGTERM or Ctrl-C the
server stops accepting, lets the requests in flight finish for ``--shutdown-timeout`` seconds,
then cancels the rest (and their upstream work).

A client that disconnects before its answer stops its work: the episode is abandoned, no new
upstream call starts and those in flight are cancelled (vLLM aborts them). What it had cost is
logged and counted in ``/metrics`` (``ponder_cancelled_requests_total``,
``ponder_cancelled_tokens_total``); its status there is 499 (client closed request). A streamed
request's disconnect is seen at its next event (a keep-alive comment every few seconds).

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, and every error a
client causes is a 4xx that names the field: 400 for malformed JSON (also ``NaN``, nesting deeper
than :data:`~controller.parse.MAX_JSON_DEPTH`, text that is not valid Unicode such as a lone
surrogate), missing messages or bad or unsupported fields; 401 for a missing or wrong API key
(when the server has one; ``/health``, ``/metrics`` and ``/openapi.json`` are open); 413 for a
body over ``--max-body-bytes``; 502 when the upstream failed before any chain had an answer
(with an answer, the response is 200 with ``finish_reason: length`` and ``ponder.reason``
saying ``generator fault: ...``); 503 when the request waited for a slot for its whole latency
cap. In a stream those after the first event come as one ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import tyro
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from controller.controller import MIN_LATENCY_CAP_S, Controller, Result, Step
from controller.metrics import CLIENT_CLOSED, Metrics
from controller.openapi import openapi_schema
from controller.parse import (
    MAX_JSON_DEPTH,
    Ask,
    HTTPError,
    ServerLimits,
    bad_request,
    check_json,
    no_constant,
    parse_request,
)
from controller.respond import (
    answer_body,
    check_answer,
    error_body,
    progress_comment,
    stream_events,
)
from env.episode.config import Action
from env.types import Question
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
#: One JSON line per answered request (:func:`create_app`'s access log).
access_log = logging.getLogger("ponder.access")

#: The header a request id comes in (the client's) and goes back in (always).
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServeArgs:
    """Serve an OpenAI-compatible endpoint in front of a vLLM server; ponder decides the compute."""

    upstream: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """the vLLM server's OpenAI root (default: http://127.0.0.1:8000/v1); repeat the flag for a fleet of servers serving one model: requests are spread over them (prefix affinity, least outstanding requests) and a failing one is taken out until it answers again (env/generators/fleet.py)"""
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
    mode: Literal["cot", "draft"] = "cot"
    """how chains are prompted: cot (step by step) or draft (Chain-of-Draft); requests may choose with `ponder.mode`"""
    tip: bool = False
    """apply the thought-switching penalty (TIP) to every chain; requests may choose with `ponder.tip` (the vLLM server applies it exactly when it runs env.generators.tip:TipLogitsProcessor, otherwise through logit_bias)"""
    more_policies: tuple[str, ...] = ()
    """more policy specs served beside --policy (same grammar): a request chooses one with its `ponder.policy` or its model `ponder/<policy>` (GET /v1/models lists them)"""
    route: tuple[str, ...] = ()
    """route by query type, as KIND=POLICY (e.g. code=best-of-8-verifier multistep=adaptive-consistency-0.95): each request that names no policy is classified from its question's text (factual, multistep, hardmath, code: policies.routing.QueryClassifier, fitted on the shipped training questions at startup) and answered by that kind's policy, which must be --policy or one of --more-policies; other kinds get --policy"""
    shutdown_timeout: int = 30
    """seconds a shutdown (SIGTERM, Ctrl-C) lets the requests in flight finish; those left then are cancelled (their upstream work too)"""
    model_name: str | None = None
    """the model name the proxy reports (default: ponder/<policy>)"""
    log_level: str = "info"
    """log level: critical, error, warning, info, debug or trace"""


class _ClientGone(Exception):
    """The client disconnected before its answer (nobody reads one now)."""


def _error(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    param: str | None = None,
    request_id: str | None = None,
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return JSONResponse(
        error_body(message, kind, code, param), status_code=status, headers=headers or None
    )


def request_id_of(request: Request) -> str:
    """The request's id: the client's ``X-Request-Id`` when it is a sane token (at most 128
    letters, digits and ``._:-``), else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def create_app(
    controller: Controller,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 1_000_000,
    max_concurrency: int = 64,
    model: str | None = None,
    on_shutdown: Callable[[], None] | None = None,
    more: Sequence[Controller] = (),
    temperature: float = 0.7,
    top_p: float = 1.0,
    keep_alive_s: float = 5.0,
    routes: dict[str, str] | None = None,
    classify: Callable[[str], str] | None = None,
) -> Starlette:
    """The ASGI app of the proxy over ``controller`` (see the module docstring).

    Args:
        controller: answers the questions (its caps are the server's limits).
        api_key: the bearer token clients must send (``None``: open).
        max_body_bytes: largest body accepted.
        max_concurrency: requests answered at once.
        model: the model name reported for ``controller`` (default ``ponder/<policy>``).
        on_shutdown: called when the server stops (closes the generator).
        more: controllers of more policies (over the same generator) a request may choose
            with ``ponder.policy`` or by its ``model`` (``ponder/<policy>``).
        temperature: the chains' sampling temperature: a request's ``temperature`` must be
            this one (:mod:`controller.parse`).
        top_p: likewise for ``top_p``.
        keep_alive_s: seconds between keep-alive comments of a stream while it waits.
        routes: query kind -> the name of the policy that answers it, for requests that name
            none (``ponder serve --route``); needs ``classify``.
        classify: the kind of a question's text (:class:`policies.routing.QueryClassifier`).
    """
    if max_body_bytes < 1 or max_concurrency < 1:
        raise ConfigError("max_body_bytes and max_concurrency must be >= 1")
    if not keep_alive_s > 0:
        raise ConfigError(f"keep_alive_s must be > 0, got {keep_alive_s!r}")
    if api_key is not None:
        _check_key_text(api_key, "api_key")
    controllers: dict[str, Controller] = {}
    for c in (controller, *more):
        if c.policy.name in controllers:
            raise ConfigError(f"policy {c.policy.name!r} is served twice: name each one once")
        controllers[c.policy.name] = c
    routes = dict(routes or {})
    unknown = sorted(p for p in routes.values() if p not in controllers)
    if unknown:
        raise ConfigError(
            f"--route names {unknown}, which are not served: add them with --more-policies"
        )
    if routes and classify is None:
        raise ConfigError("routes need a classifier of query kinds")
    name = model or f"ponder/{controller.policy.name}"
    model_ids = {name: controller.policy.name}
    model_ids.update({f"ponder/{n}": n for n in controllers if n != controller.policy.name})
    limits = ServerLimits(temperature=temperature, top_p=top_p, policies=tuple(controllers))
    metrics = Metrics()
    slots: dict[str, asyncio.Semaphore] = {}  # made on first use, inside the server's loop

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPError(
                401,
                "missing API key: send the header 'Authorization: Bearer <key>'",
                "invalid_request_error",
                "invalid_api_key",
            )
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise HTTPError(
                401, "incorrect API key provided", "invalid_request_error", "invalid_api_key"
            )

    async def read_json(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise bad_request(f"invalid Content-Length header {length!r}") from None
            if declared > max_body_bytes:
                raise _too_large(declared)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise _too_large(len(raw))
        try:
            body = json.loads(bytes(raw), parse_constant=no_constant)
        except RecursionError:
            raise bad_request(
                f"the body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        check_json(body)
        return body

    def _too_large(n: int) -> HTTPError:
        return HTTPError(
            413,
            f"request body of {n} bytes is over this server's limit of {max_body_bytes} bytes",
            "invalid_request_error",
            "request_too_large",
        )

    def pick(ask: Ask) -> Controller:
        if ask.policy is not None:
            return controllers[ask.policy]
        chosen = model_ids.get(ask.model or "")
        if chosen is not None:
            return controllers[chosen]
        if routes and classify is not None:
            kind = classify(ask.question)
            log.debug("routed a %s question to %s", kind, routes.get(kind, "the default"))
            return controllers[routes[kind]] if kind in routes else controller
        return controller

    def finished(
        rid: str,
        endpoint: str,
        status: int,
        t0: float,
        result: Result | None,
        ask: Ask | None,
        error: str | None = None,
    ) -> None:
        latency = time.monotonic() - t0
        metrics.finished(endpoint, status, latency, result)
        record: dict[str, Any] = {
            "request_id": rid,
            "endpoint": endpoint,
            "status": status,
            "latency_s": round(latency, 4),
            "stream": bool(ask and ask.stream),
        }
        if ask is not None and ask.user:
            record["user"] = ask.user
        if result is not None:
            record.update(
                policy=result.policy,
                reason=result.reason,
                chains=result.n_chains,
                decoded=result.decoded,
                tokens={**result.tokens, "unused": result.unused},
            )
        if error:
            record["error"] = error
        access_log.info("%s", json.dumps(record, sort_keys=True))

    async def answer(request: Request, kind: Literal["chat", "completions"]) -> Response:
        t0 = time.monotonic()
        rid = request_id_of(request)
        endpoint = request.url.path
        metrics.started()
        status, result, ask, error = 500, None, None, None
        streaming = False
        try:
            check_key(request)
            ask = parse_request(kind, await read_json(request), limits)
            ctl = pick(ask)
            if ask.stream:
                streaming = True
                metrics.unstarted()  # (counted again when the stream starts)
                return StreamingResponse(
                    stream(kind, ask, ctl, rid, endpoint, t0),
                    media_type="text/event-stream",
                    headers={REQUEST_ID_HEADER: rid, "Cache-Control": "no-cache"},
                )
            gone = asyncio.Event()
            watcher = asyncio.create_task(_watch_disconnect(request, gone))
            try:
                result = await _solve(ctl, ask, rid, t0, gone)
            finally:
                watcher.cancel()
            if gone.is_set():
                raise _ClientGone
            check_answer(result)
            status = 200
            return JSONResponse(
                answer_body(kind, ask, result, name, rid), headers={REQUEST_ID_HEADER: rid}
            )
        except (_ClientGone, ClientDisconnect):
            # Nobody reads the answer: its work was cancelled (see Controller.asolve's cancel).
            status = CLIENT_CLOSED
            spent = f"{result.decoded} tokens" if result is not None else "nothing"
            cut = (
                f" (+ at most {result.in_flight} cut short)" if result and result.in_flight else ""
            )
            log.info(
                "%s %s: the client left after %.2f s; its upstream work was cancelled, having "
                "cost %s%s",
                endpoint,
                rid,
                time.monotonic() - t0,
                spent,
                cut,
            )
            return Response(status_code=CLIENT_CLOSED)
        except HTTPError as exc:
            status, error = exc.status, exc.message
            return _error(exc.status, exc.message, exc.kind, exc.code, exc.param, rid)
        except ConfigError as exc:  # the question does not fit (too long, caps too small)
            status, error = 400, str(exc)
            return _error(400, str(exc), "invalid_request_error", request_id=rid)
        except PonderError as exc:
            status, error = 500, f"{type(exc).__name__}: {exc}"
            log.exception("request %s failed", rid)
            return _error(500, error, "server_error", request_id=rid)
        except Exception:  # a bug: logged with its traceback, answered in OpenAI's form
            status, error = 500, "internal error"
            log.exception("request %s failed", rid)
            return _error(
                500, "internal error in ponder (see the server log)", "server_error", request_id=rid
            )
        finally:
            if not streaming:
                finished(rid, endpoint, status, t0, result, ask, error)

    async def stream(
        kind: Literal["chat", "completions"],
        ask: Ask,
        ctl: Controller,
        rid: str,
        endpoint: str,
        t0: float,
    ) -> AsyncIterator[str]:
        """The SSE events of a streamed answer (:mod:`controller.respond`)."""
        metrics.started()
        status, result, error = 200, None, None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[str] = asyncio.Queue()
        gone = asyncio.Event()

        def on_step(step: Step) -> None:  # (in the episode's thread)
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(events.put_nowait, progress_comment(step))

        task = asyncio.ensure_future(
            _solve(ctl, ask, rid, t0, gone, on_step if ask.progress else None)
        )
        try:
            while not task.done():
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait(
                    {task, get}, timeout=keep_alive_s, return_when=asyncio.FIRST_COMPLETED
                )
                if get in done:
                    yield get.result()
                    continue
                get.cancel()
                if not done:
                    yield ": keep-alive\n\n"
            while not events.empty():
                yield events.get_nowait()
            result = task.result()
            if result.answer is None and result.fault:
                status, error = 502, result.reason
            for event in stream_events(kind, ask, result, name, rid):
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            status = CLIENT_CLOSED
            gone.set()
            raise
        except HTTPError as exc:
            status, error = exc.status, exc.message
            yield _sse_error(exc.message, exc.kind, exc.code, exc.param)
        except ConfigError as exc:
            status, error = 400, str(exc)
            yield _sse_error(str(exc), "invalid_request_error")
        except Exception as exc:
            status, error = 500, f"{type(exc).__name__}: {exc}"
            log.exception("request %s failed", rid)
            yield _sse_error("internal error in ponder (see the server log)", "server_error")
        finally:
            if not task.done():
                gone.set()  # the controller abandons the episode and cancels its engine work
            finished(rid, endpoint, status, t0, result, ask, error)

    async def _solve(
        ctl: Controller,
        ask: Ask,
        rid: str,
        t0: float,
        gone: asyncio.Event,
        on_step: Callable[[Step], None] | None = None,
    ) -> Result:
        server_lat = ctl.latency_cap_s
        lat = ask.latency_cap_s
        lat = min(lat, server_lat) if lat and server_lat else (lat or server_lat or None)
        sem = slots.setdefault("sem", asyncio.Semaphore(max_concurrency))
        try:
            taken = await _acquire(sem, gone, lat)
        except TimeoutError:
            raise HTTPError(
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
                    raise HTTPError(
                        503,
                        f"server busy: the latency cap of {lat:g} s ran out waiting for a slot",
                        "server_error",
                        "overloaded",
                    )
            question = Question(qid=f"ponder/{rid}", text=ask.question, context=ask.context)
            return await ctl.asolve(
                question,
                token_cap=ask.token_cap,
                latency_cap_s=left,
                cancel=gone,
                lam=ask.lam,
                on_step=on_step,
                mode=ask.mode,
                tip=ask.tip,
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
        except HTTPError as exc:
            return _error(exc.status, exc.message, exc.kind, exc.code, exc.param)
        data = [
            {"id": mid, "object": "model", "created": 0, "owned_by": "ponder", "policy": pol}
            for mid, pol in model_ids.items()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    schema = openapi_schema(
        name,
        min_tokens=controller.config.bound(Action.BRANCH),
        max_body_bytes=max_body_bytes,
        policies=tuple(controllers),
        temperature=temperature,
        top_p=top_p,
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
    app.state.controllers = controllers
    return app


def _sse_error(message: str, kind: str, code: str | None = None, param: str | None = None) -> str:
    return f"data: {json.dumps(error_body(message, kind, code, param))}\n\ndata: [DONE]\n\n"


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


#: The upstream when ``--upstream`` is not given.
DEFAULT_UPSTREAM = "http://127.0.0.1:8000/v1"


def upstreams(args: ServeArgs) -> tuple[str, ...]:
    """The servers ``args`` names (``--upstream``, repeated; one URL given as a string is read
    as one server), or :data:`DEFAULT_UPSTREAM`."""
    u: Any = args.upstream
    urls = (u,) if isinstance(u, str) else tuple(u)
    return urls or (DEFAULT_UPSTREAM,)


def check_serve_args(args: ServeArgs) -> None:
    """Check every ``ponder serve`` setting before anything starts (one clear error each).

    Raises:
        ConfigError: the first bad setting, with what it must be.
    """
    urls = upstreams(args)
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"--upstream must be an http:// or https:// URL such as "
                f"http://127.0.0.1:8000/v1, got {url!r}"
            )
        try:
            parts.port  # noqa: B018 (raises for a port out of range)
        except ValueError as exc:
            raise ConfigError(f"--upstream {url!r}: {exc}") from None
    roots = [u.rstrip("/").removesuffix("/v1") for u in urls]
    for u, root in zip(urls, roots, strict=True):
        if roots.count(root) > 1:
            raise ConfigError(f"--upstream {u!r} is given twice: give each server once")
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
    if args.shutdown_timeout < 0:
        raise ConfigError(
            f"--shutdown-timeout must be a whole number of seconds >= 0, got "
            f"{args.shutdown_timeout}"
        )
    specs = [args.policy, *args.more_policies]
    for spec in specs:
        if specs.count(spec) > 1:
            raise ConfigError(f"policy {spec!r} is given twice (--policy, --more-policies)")
    for kind, spec in parse_routes(args.route).items():
        if spec not in specs:
            raise ConfigError(
                f"--route {kind}={spec}: {spec!r} is not served; give it with --more-policies"
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
    """The controller of ``--policy`` that ``ponder serve`` runs, and its generator (to close
    at shutdown); see :func:`build_controllers` (``--more-policies`` are left out)."""
    from dataclasses import replace

    (controller,), generator = build_controllers(replace(args, more_policies=()))
    return controller, generator


def build_controllers(args: ServeArgs) -> tuple[list[Controller], Any]:
    """The controllers ``ponder serve`` runs (``--policy`` first, then ``--more-policies``),
    all over one generator, and that generator (to close at shutdown).

    The settings are checked and the policies parsed first, so that a bad flag or an unknown
    policy fails before the upstream is contacted.

    Raises:
        ConfigError: a bad setting (see :func:`check_serve_args`); policies that read hidden
            states captured differently.
        PolicyError: an unknown policy or a policy file.
        GeneratorError: no server at an upstream URL.
    """
    from env.episode.config import EnvConfig
    from env.generators.openai import OpenAIGenerator
    from env.types import SamplingConfig, TipConfig
    from policies.registry import check_policy, load_policy

    check_serve_args(args)
    policies = [check_policy(load_policy(spec)) for spec in (args.policy, *args.more_policies)]
    probes = [_hidden_probes(args, p) for p in policies]
    manifests = {p.manifest().to_json() for p in probes if p is not None}
    if len(manifests) > 1:
        raise ConfigError(
            "the policies read hidden states captured differently (other layers or model): "
            "serve them from separate `ponder serve` processes"
        )
    configs = [
        EnvConfig(
            chunk_tokens=args.chunk_tokens,
            max_chains=args.max_chains,
            max_chain_tokens=args.max_chain_tokens,
            token_cap=args.token_cap,
            aggregate=p.aggregate,  # type: ignore[arg-type]
        )
        for p in policies
    ]
    c0 = configs[0]
    sampling = SamplingConfig(
        temperature=args.temperature,
        max_chain_tokens=c0.max_chain_tokens + c0.extension_chunks * c0.chunk_tokens,
    )
    urls = upstreams(args)
    generator = OpenAIGenerator(
        urls[0] if len(urls) == 1 else urls,
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
        captured: Any = None
        controllers = []
        for policy, config, pr in zip(policies, configs, probes, strict=True):
            gen: Any = generator
            if pr is not None:
                if captured is None:
                    from env.generators.capture import capture_from_manifest

                    captured = capture_from_manifest(generator, pr.manifest(), args.hidden_model)
                gen = captured
            controllers.append(
                Controller(
                    gen,
                    policy,
                    config=config,
                    latency_cap_s=args.latency_cap,
                    lookahead=args.lookahead,
                    probes=pr,
                    mode=args.mode,
                    tip=TipConfig() if args.tip else None,
                )
            )
    except BaseException:
        generator.close()
        raise
    return controllers, generator


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


def parse_routes(items: Sequence[str]) -> dict[str, str]:
    """``--route`` items (``KIND=POLICY``) as a dict.

    Raises:
        ConfigError: an item that is not ``KIND=POLICY``, an unknown kind, a kind given twice.
    """
    from policies.routing import QUERY_KINDS

    out: dict[str, str] = {}
    for item in items:
        kind, sep, policy = str(item).partition("=")
        if not sep or not policy.strip():
            raise ConfigError(
                f"--route takes KIND=POLICY (e.g. code=best-of-8-verifier), got {item!r}"
            )
        if kind not in QUERY_KINDS:
            raise ConfigError(
                f"--route kind {kind!r} is unknown; choose one of {', '.join(QUERY_KINDS)}"
            )
        if kind in out:
            raise ConfigError(f"--route gives kind {kind!r} twice")
        out[kind] = policy.strip()
    return out


def _routing(args: ServeArgs) -> dict[str, Any]:
    """``create_app``'s routing arguments from ``--route`` (the classifier fitted once here)."""
    routes = parse_routes(args.route)
    if not routes:
        return {}
    from policies.registry import load_policy
    from policies.routing import QueryClassifier, training_questions

    names = {load_policy(spec).name: spec for spec in (args.policy, *args.more_policies)}
    by_spec = {spec: name for name, spec in names.items()}
    routes = {kind: by_spec.get(spec, spec) for kind, spec in routes.items()}
    qs, kinds = training_questions()
    clf = QueryClassifier.fit([q.text for q in qs], kinds)
    log.info("routing by query type: %s", ", ".join(f"{k} -> {v}" for k, v in routes.items()))
    return {"routes": routes, "classify": lambda text: clf.predict([text])[0]}


def main(argv: list[str] | None = None) -> None:
    """``ponder serve``: check the arguments, bind the port, build the controller and serve
    until stopped."""
    import uvicorn

    args = tyro.cli(ServeArgs, args=argv, prog="ponder serve")
    check_serve_args(args)
    words = sys.argv[1:] if argv is None else argv
    api_key = resolve_api_key(args.api_key, os.environ, words)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    sock = _bind(args.host, args.port)
    try:
        (controller, *more), generator = build_controllers(args)
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
        more=more,
        temperature=args.temperature,
        **_routing(args),
    )
    log.info(
        "ponder serve: %s in front of %s, listening on %s",
        ", ".join(map(str, (controller, *more))),
        " + ".join(upstreams(args)),
        _url(sock),
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    uvicorn.Server(config).run(sockets=[sock])
