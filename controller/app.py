"""The proxy's ASGI app: an OpenAI-compatible endpoint in front of a vLLM server.

``ponder serve`` (:mod:`controller.proxy`) serves it with uvicorn.

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

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from controller.auth import check_bearer, check_key_text
from controller.controller import Controller
from controller.handler import CompletionsHandler, error_response
from controller.metrics import Metrics
from controller.openapi import openapi_schema
from controller.parse import HTTPError, ServerLimits
from env.episode.config import Action
from features.errors import ConfigError

__all__ = ["create_app"]


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
        check_key_text(api_key, "api_key")
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
    handler = CompletionsHandler(
        controller=controller,
        controllers=controllers,
        model_ids=model_ids,
        name=name,
        limits=limits,
        metrics=metrics,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        max_concurrency=max_concurrency,
        keep_alive_s=keep_alive_s,
        routes=routes,
        classify=classify,
    )

    async def chat(request: Request) -> Response:
        return await handler.answer(request, "chat")

    async def completions(request: Request) -> Response:
        return await handler.answer(request, "completions")

    async def models(request: Request) -> Response:
        try:
            check_bearer(request, api_key)
        except HTTPError as exc:
            return error_response(exc.status, exc.message, exc.kind, exc.code, exc.param)
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
        return error_response(
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
