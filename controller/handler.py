"""Answering one ``POST /v1/chat/completions`` or ``POST /v1/completions`` request of the proxy.

:class:`CompletionsHandler` checks the key, reads and parses the body, picks the policy, waits for
a slot within the latency cap, runs the controller (abandoning the episode if the client leaves)
and answers in one JSON body or a stream of Server-Sent Events; every request is counted in the
metrics and written to the access log. What it answers is described in :mod:`controller.app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from controller.auth import check_bearer
from controller.controller import Controller
from controller.metrics import CLIENT_CLOSED, Metrics
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
from controller.result import Result, Step
from env.types import Question
from features.errors import ConfigError, PonderError

__all__ = ["REQUEST_ID_HEADER", "CompletionsHandler", "error_response", "request_id_of"]

log = logging.getLogger(__name__)
#: One JSON line per answered request (the proxy's access log).
access_log = logging.getLogger("ponder.access")

#: The header a request id comes in (the client's) and goes back in (always).
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class _ClientGone(Exception):
    """The client disconnected before its answer (nobody reads one now)."""


def error_response(
    status: int,
    message: str,
    kind: str,
    code: str | None = None,
    param: str | None = None,
    request_id: str | None = None,
) -> JSONResponse:
    """An error in OpenAI's body with ``status`` (a 401 asks for a bearer token; the request's
    id, when given, goes back in :data:`REQUEST_ID_HEADER`)."""
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


class CompletionsHandler:
    """Answers the completion endpoints of one app (:func:`~controller.app.create_app` checks
    its arguments and documents them).

    Args:
        controller: the default policy's controller.
        controllers: every served controller, by policy name.
        model_ids: model id -> the policy name it stands for.
        name: the model name reported in answers.
        limits: what a request may ask for (:mod:`controller.parse`).
        metrics: counts every request.
        api_key: the bearer token clients must send (``None``: open).
        max_body_bytes: largest body accepted.
        max_concurrency: requests answered at once.
        keep_alive_s: seconds between keep-alive comments of a stream while it waits.
        routes: query kind -> the name of the policy that answers it, for requests that name none.
        classify: the kind of a question's text.
    """

    def __init__(
        self,
        *,
        controller: Controller,
        controllers: dict[str, Controller],
        model_ids: dict[str, str],
        name: str,
        limits: ServerLimits,
        metrics: Metrics,
        api_key: str | None,
        max_body_bytes: int,
        max_concurrency: int,
        keep_alive_s: float,
        routes: dict[str, str],
        classify: Callable[[str], str] | None,
    ) -> None:
        self.controller = controller
        self.controllers = controllers
        self.model_ids = model_ids
        self.name = name
        self.limits = limits
        self.metrics = metrics
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.keep_alive_s = keep_alive_s
        self.routes = routes
        self.classify = classify
        # The slots of max_concurrency: made on first use, inside the server's loop.
        self._slots: dict[str, asyncio.Semaphore] = {}

    async def _read_json(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise bad_request(f"invalid Content-Length header {length!r}") from None
            if declared > self.max_body_bytes:
                raise self._too_large(declared)
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                raise self._too_large(len(raw))
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

    def _too_large(self, n: int) -> HTTPError:
        return HTTPError(
            413,
            f"request body of {n} bytes is over this server's limit of {self.max_body_bytes} bytes",
            "invalid_request_error",
            "request_too_large",
        )

    def _pick(self, ask: Ask) -> Controller:
        if ask.policy is not None:
            return self.controllers[ask.policy]
        chosen = self.model_ids.get(ask.model or "")
        if chosen is not None:
            return self.controllers[chosen]
        if self.routes and self.classify is not None:
            kind = self.classify(ask.question)
            log.debug("routed a %s question to %s", kind, self.routes.get(kind, "the default"))
            return self.controllers[self.routes[kind]] if kind in self.routes else self.controller
        return self.controller

    def _finished(
        self,
        rid: str,
        endpoint: str,
        status: int,
        t0: float,
        result: Result | None,
        ask: Ask | None,
        error: str | None = None,
    ) -> None:
        latency = time.monotonic() - t0
        self.metrics.finished(endpoint, status, latency, result)
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

    async def answer(self, request: Request, kind: Literal["chat", "completions"]) -> Response:
        """Answer a request to ``/v1/chat/completions`` (``chat``) or ``/v1/completions``."""
        t0 = time.monotonic()
        rid = request_id_of(request)
        endpoint = request.url.path
        self.metrics.started()
        status, result, ask, error = 500, None, None, None
        streaming = False
        try:
            check_bearer(request, self.api_key)
            ask = parse_request(kind, await self._read_json(request), self.limits)
            ctl = self._pick(ask)
            if ask.stream:
                streaming = True
                self.metrics.unstarted()  # (counted again when the stream starts)
                return StreamingResponse(
                    self._stream(kind, ask, ctl, rid, endpoint, t0),
                    media_type="text/event-stream",
                    headers={REQUEST_ID_HEADER: rid, "Cache-Control": "no-cache"},
                )
            gone = asyncio.Event()
            watcher = asyncio.create_task(_watch_disconnect(request, gone))
            try:
                result = await self._solve(ctl, ask, rid, t0, gone)
            finally:
                watcher.cancel()
            if gone.is_set():
                raise _ClientGone
            check_answer(result)
            status = 200
            return JSONResponse(
                answer_body(kind, ask, result, self.name, rid), headers={REQUEST_ID_HEADER: rid}
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
            return error_response(exc.status, exc.message, exc.kind, exc.code, exc.param, rid)
        except ConfigError as exc:  # the question does not fit (too long, caps too small)
            status, error = 400, str(exc)
            return error_response(400, str(exc), "invalid_request_error", request_id=rid)
        except PonderError as exc:
            status, error = 500, f"{type(exc).__name__}: {exc}"
            log.exception("request %s failed", rid)
            return error_response(500, error, "server_error", request_id=rid)
        except Exception:  # a bug: logged with its traceback, answered in OpenAI's form
            status, error = 500, "internal error"
            log.exception("request %s failed", rid)
            return error_response(
                500, "internal error in ponder (see the server log)", "server_error", request_id=rid
            )
        finally:
            if not streaming:
                self._finished(rid, endpoint, status, t0, result, ask, error)

    async def _stream(
        self,
        kind: Literal["chat", "completions"],
        ask: Ask,
        ctl: Controller,
        rid: str,
        endpoint: str,
        t0: float,
    ) -> AsyncIterator[str]:
        """The SSE events of a streamed answer (:mod:`controller.respond`)."""
        self.metrics.started()
        status, result, error = 200, None, None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[str] = asyncio.Queue()
        gone = asyncio.Event()

        def on_step(step: Step) -> None:  # (in the episode's thread)
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(events.put_nowait, progress_comment(step))

        task = asyncio.ensure_future(
            self._solve(ctl, ask, rid, t0, gone, on_step if ask.progress else None)
        )
        try:
            while not task.done():
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait(
                    {task, get}, timeout=self.keep_alive_s, return_when=asyncio.FIRST_COMPLETED
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
            for event in stream_events(kind, ask, result, self.name, rid):
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
            self._finished(rid, endpoint, status, t0, result, ask, error)

    async def _solve(
        self,
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
        sem = self._slots.setdefault("sem", asyncio.Semaphore(self.max_concurrency))
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
