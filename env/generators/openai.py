"""A :class:`~env.generators.backend.Backend` over a vLLM OpenAI-compatible server.

:class:`OpenAIBackend` talks to ``vllm serve`` (or ``python -m vllm.entrypoints.openai.api_server``)
over HTTP with a synchronous ``httpx`` client:

* :meth:`~OpenAIBackend.complete` sends one ``POST /v1/completions`` per request, concurrently
  (an ``httpx.AsyncClient`` on the backend's own event-loop thread, so that a request in flight
  can be cancelled), with the prompt as token ids and vLLM's extra fields
  ``return_token_ids`` (generated ids in ``choices[0].token_ids``) and
  ``return_tokens_as_token_ids`` (top-logprob keys ``token_id:N``). Prompt-cache hits are read from
  ``usage.prompt_tokens_details.cached_tokens``, which the server reports only when started with
  ``--enable-prompt-tokens-details`` (otherwise ``cached_tokens`` is 0).
* TIP goes through ``vllm_xargs = {"ponder_tip": "<json>"}`` when the server runs
  :class:`env.generators.tip.TipLogitsProcessor` (``tip_processor=True``); otherwise it is
  approximated with ``logit_bias``, and then the window is per chunk: the whole chunk is penalised
  when it starts inside the window, and a switch inside the chunk does not restart the count.
* :meth:`~OpenAIBackend.encode` / :meth:`~OpenAIBackend.decode` use ``/tokenize`` and
  ``/detokenize`` (cached); :meth:`~OpenAIBackend.apply_chat` uses ``/tokenize`` with messages.

A per-request ``seed`` is never sent (it crashes vLLM's CPU engine): seed the server instead.
Inside a cancelled :class:`~env.generators.cancel.CancelScope` no request starts, and the
completions in flight are cancelled: their connections close, and vLLM aborts a request whose
client disconnected, so an abandoned question stops costing engine time at once.

The EOS token comes from ``/tokenizer_info`` (server flag ``--enable-tokenizer-info-endpoint``),
else from the model folder's config when the server is on this machine and names its model by an
absolute path (``root`` in ``GET /v1/models``); a relative model id is never read as a local
path (it is relative to the server's working folder, not ours). Otherwise pass ``eos_token_id``.

Every failure ends as a :class:`~features.errors.GeneratorError` that names the URL, after at most
``retries`` retries (with exponential backoff) of connection errors and 5xx answers; read timeouts
are not retried, so nothing hangs for longer than ``read_timeout``.

Note that vLLM reports *raw* log-probabilities (before temperature, ``logit_bias`` and logits
processors), as the in-process engine does by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np

from env.generators.backend import Completion, CompletionRequest, TipRequest
from env.generators.base import GeneratorTraits
from env.generators.cancel import check_cancelled, current_scope
from env.generators.fleet import FleetBackend
from env.generators.live import LiveGenerator
from env.generators.prompts import CHAT, TESTBED, PromptTemplate
from env.types import SamplingConfig
from features.errors import ConfigError, GeneratorError, UpstreamDown

__all__ = ["OpenAIBackend", "OpenAIGenerator"]

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

#: The ``vllm_xargs`` key :class:`env.generators.tip.TipLogitsProcessor` reads.
TIP_XARGS_KEY = "ponder_tip"


class _LRU(OrderedDict[K, V]):
    """A small thread-safe LRU cache."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize
        self.lock = threading.Lock()

    def get_or(self, key: K, make: Callable[[], V]) -> V:
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
        value = make()
        with self.lock:
            self[key] = value
            while len(self) > self.maxsize:
                self.popitem(last=False)
        return value


class _Retryable(Exception):
    """A failure worth another try (connection trouble, 5xx)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class OpenAIBackend:
    """A :class:`~env.generators.backend.Backend` over a vLLM OpenAI-compatible server.

    Args:
        base_url: the server's OpenAI root, such as ``http://127.0.0.1:8000/v1`` (``/v1`` is
            added when missing).
        model: the served model name; asked from ``GET /v1/models`` when ``None``.
        api_key: sent as a bearer token when given.
        eos_token_id: the EOS id; found from ``/tokenizer_info`` (server flag
            ``--enable-tokenizer-info-endpoint``) or, for a server on this machine that names
            its model by an absolute path, the model folder's config when ``None``.
        connect_timeout: seconds to open a connection.
        read_timeout: seconds to wait for an answer (a long completion must fit in it).
        retries: how many times a connection error or a 5xx answer is retried.
        backoff: seconds before the first retry; doubles each time.
        max_concurrency: at most this many requests in flight.
        tip_processor: whether the server runs :class:`env.generators.tip.TipLogitsProcessor`
            (``--logits-processors env.generators.tip:TipLogitsProcessor``); if not, TIP is
            approximated with ``logit_bias``.
        cache_size: how many ``encode``/``decode`` results to keep.
        extra_body: more fields for every ``/v1/completions`` body (``ignore_eos``,
            ``min_p``, ...; never ``seed``).

    Raises:
        GeneratorError: when the server cannot be reached or does not answer as vLLM does.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        eos_token_id: int | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        retries: int = 2,
        backoff: float = 0.5,
        max_concurrency: int = 16,
        tip_processor: bool = False,
        cache_size: int = 4096,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ConfigError(
                f"timeouts must be > 0, got connect={connect_timeout}, read={read_timeout}"
            )
        if retries < 0 or backoff < 0:
            raise ConfigError(f"retries and backoff must be >= 0, got {retries}, {backoff}")
        if max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {max_concurrency}")
        url = base_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else url + "/v1"
        self._root = self.base_url[: -len("/v1")]
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.read_timeout = float(read_timeout)
        self.max_concurrency = int(max_concurrency)
        self.tip_processor = bool(tip_processor)
        if extra_body and "seed" in extra_body:
            raise ConfigError(
                "a per-request seed crashes vLLM's CPU engine: seed the server (--seed) instead"
            )
        self.extra_body = dict(extra_body or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client_kw: dict[str, Any] = {
            "timeout": httpx.Timeout(read_timeout, connect=connect_timeout),
            "headers": headers,
            "limits": httpx.Limits(
                max_connections=max_concurrency, max_keepalive_connections=max_concurrency
            ),
        }
        self._client = httpx.Client(**self._client_kw)
        # Completions go through an async client on a private loop (started on first use): an
        # asyncio task can be cancelled mid-request, which closes its connection.
        self._aclient = httpx.AsyncClient(**self._client_kw)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._closed = False
        self._encode_cache: _LRU[str, tuple[int, ...]] = _LRU(cache_size)
        self._decode_cache: _LRU[tuple[int, ...], str] = _LRU(cache_size)
        self._chat_cache: _LRU[str, str | None] = _LRU(256)
        self._model_root: str | None = None
        #: The server's context size (from ``GET /v1/models``; ``None`` when not asked).
        self.max_model_len: int | None = None
        try:
            self.model_name: str = model if model is not None else self._detect_model()
            self.eos_token_id: int = (
                int(eos_token_id) if eos_token_id is not None else self._detect_eos()
            )
        except BaseException:
            self._client.close()
            raise
        #: Whether the last completion's usage had ``prompt_tokens_details``.
        self.reports_cached_tokens: bool | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP clients (completions still in flight are cancelled)."""
        with self._loop_lock:
            loop, thread = self._loop, self._loop_thread
            self._loop = self._loop_thread = None
            self._closed = True
        if loop is not None:  # (an async client never used holds no connection)
            with contextlib.suppress(Exception):
                fut = asyncio.run_coroutine_threadsafe(_shutdown(self._aclient), loop)
                fut.result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=10)
            if not loop.is_running():
                loop.close()
        self._client.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.base_url!r}, model={self.model_name!r})"

    # -- HTTP ---------------------------------------------------------------------------------

    def _request(self, method: str, url: str, payload: dict[str, Any] | None = None) -> Any:
        """One call with retries; returns the decoded JSON body."""
        attempt = 0
        while True:
            check_cancelled()
            try:
                try:
                    resp = self._client.request(method, url, json=payload)
                except httpx.HTTPError as exc:
                    raise self._transport_error(method, url, exc) from None
                return self._answer(method, url, resp)
            except _Retryable as exc:
                delay = self._retry_delay(method, url, exc, attempt)
                time.sleep(delay)
                attempt += 1

    async def _arequest(self, method: str, url: str, payload: dict[str, Any] | None) -> Any:
        """:meth:`_request` on the async client (runs on the backend's loop)."""
        attempt = 0
        while True:
            try:
                try:
                    resp = await self._aclient.request(method, url, json=payload)
                except httpx.HTTPError as exc:
                    raise self._transport_error(method, url, exc) from None
                return self._answer(method, url, resp)
            except _Retryable as exc:
                delay = self._retry_delay(method, url, exc, attempt)
                await asyncio.sleep(delay)
                attempt += 1

    def _retry_delay(self, method: str, url: str, exc: _Retryable, attempt: int) -> float:
        """Seconds before the next try, or the final error when the retries are spent."""
        if attempt >= self.retries:
            if exc.refused:
                raise UpstreamDown(
                    f"no server at {self.base_url}: is `vllm serve` running? "
                    f"({method} {url}: {exc}; tried {attempt + 1} times)"
                ) from None
            raise UpstreamDown(
                f"server at {self.base_url} failed: {method} {url}: {exc} "
                f"(tried {attempt + 1} times)"
            ) from None
        delay = self.backoff * (2**attempt)
        log.warning("%s %s failed (%s); retrying in %.1f s", method, url, exc, delay)
        return delay

    def _transport_error(self, method: str, url: str, exc: httpx.HTTPError) -> Exception:
        """What a failed HTTP exchange becomes: a retryable failure or a :class:`GeneratorError`."""
        if isinstance(exc, httpx.ConnectError):
            return _Retryable(f"cannot connect ({exc})", refused=True)
        if isinstance(exc, httpx.ConnectTimeout):
            return _Retryable(f"connection timed out ({exc})", refused=True)
        if isinstance(exc, httpx.ReadTimeout):
            return GeneratorError(
                f"server at {self.base_url} did not answer {method} {url} within "
                f"{self.read_timeout:g} s (raise read_timeout for long completions)"
            )
        if isinstance(exc, httpx.TimeoutException):
            return GeneratorError(f"server at {self.base_url}: {method} {url} timed out: {exc}")
        if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
            return _Retryable(f"connection lost ({type(exc).__name__}: {exc})")
        return GeneratorError(
            f"server at {self.base_url}: {method} {url} failed: {type(exc).__name__}: {exc}"
        )

    def _answer(self, method: str, url: str, resp: httpx.Response) -> Any:
        """The JSON body of an answer (5xx: retryable; 4xx: :class:`_HTTPStatus`)."""
        if resp.status_code >= 500:
            raise _Retryable(f"HTTP {resp.status_code}: {_error_message(resp)}")
        if resp.status_code >= 400:
            raise _HTTPStatus(resp.status_code, _error_message(resp))
        try:
            return resp.json()
        except ValueError:
            raise GeneratorError(
                f"server at {self.base_url}: {method} {url} answered non-JSON: {resp.text[:200]!r}"
            ) from None

    def _rejected(self, method: str, url: str, exc: _HTTPStatus) -> GeneratorError:
        return GeneratorError(
            f"server at {self.base_url} rejected {method} {url}: HTTP {exc.status}: {exc.message}"
        )

    def _call(self, method: str, url: str, payload: dict[str, Any] | None = None) -> Any:
        try:
            return self._request(method, url, payload)
        except _HTTPStatus as exc:
            raise self._rejected(method, url, exc) from None

    async def _acall(self, method: str, url: str, payload: dict[str, Any] | None = None) -> Any:
        try:
            return await self._arequest(method, url, payload)
        except _HTTPStatus as exc:
            raise self._rejected(method, url, exc) from None

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Run ``coro`` on the backend's event loop (started on first use)."""
        with self._loop_lock:
            if self._closed:
                coro.close()
                raise GeneratorError(f"{self!r} is closed: make a new backend")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="ponder-openai", daemon=True
                )
                thread.start()
                self._loop, self._loop_thread = loop, thread
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coro, loop)

    # -- discovery ----------------------------------------------------------------------------

    def _detect_model(self) -> str:
        body = self._call("GET", f"{self.base_url}/models")
        try:
            first = body["data"][0]
            self._model_root = first.get("root")
            if first.get("max_model_len"):
                self.max_model_len = int(first["max_model_len"])
            return str(first["id"])
        except (KeyError, IndexError, TypeError):
            raise GeneratorError(
                f"server at {self.base_url} lists no model in GET /v1/models: {str(body)[:200]}"
            ) from None

    def _detect_eos(self) -> int:
        try:
            info = self._request("GET", f"{self._root}/tokenizer_info")
            eos = info.get("eos_token") if isinstance(info, dict) else None
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                ids = self.encode(eos)
                if len(ids) == 1:
                    return ids[0]
        except _HTTPStatus:
            pass  # the endpoint is off (no --enable-tokenizer-info-endpoint)
        # The model's own folder, where it really is: only a server on this machine that names
        # its model by an absolute path says where that is (a relative id is relative to the
        # server's working folder, which we do not know).
        if _is_local(self.base_url):
            for folder in dict.fromkeys((self._model_root, self.model_name)):
                if folder and Path(folder).is_absolute():
                    eos_id = _eos_from_folder(folder)
                    if eos_id is not None:
                        return eos_id
        raise GeneratorError(
            f"cannot tell the EOS token of the model at {self.base_url} (model "
            f"{self.model_name!r}): start the server with --enable-tokenizer-info-endpoint, or "
            "give the EOS id (eos_token_id; `ponder serve --eos-token-id N`)"
        )

    # -- Backend ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added), from ``POST /tokenize``."""

        def make() -> tuple[int, ...]:
            body = self._call(
                "POST",
                f"{self._root}/tokenize",
                {"model": self.model_name, "prompt": text, "add_special_tokens": False},
            )
            return tuple(int(t) for t in body["tokens"])

        return list(self._encode_cache.get_or(text, make))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` (special tokens kept), from ``POST /detokenize``."""
        key = tuple(int(t) for t in token_ids)
        if not key:
            return ""

        def make() -> str:
            body = self._call(
                "POST", f"{self._root}/detokenize", {"model": self.model_name, "tokens": list(key)}
            )
            return str(body["prompt"])

        return self._decode_cache.get_or(key, make)

    def apply_chat(self, messages: list[dict[str, str]]) -> str | None:
        """The chat-template rendering of ``messages`` with the generation prompt, or ``None``."""
        key = json.dumps(messages, sort_keys=True)

        def make() -> str | None:
            try:
                body = self._request(
                    "POST",
                    f"{self._root}/tokenize",
                    {"model": self.model_name, "messages": messages, "add_generation_prompt": True},
                )
            except _HTTPStatus as exc:
                if "chat template" in exc.message.lower():
                    return None
                raise GeneratorError(
                    f"server at {self.base_url} rejected POST {self._root}/tokenize: "
                    f"HTTP {exc.status}: {exc.message}"
                ) from None
            return self.decode([int(t) for t in body["tokens"]])

        return self._chat_cache.get_or(key, make)

    def reset(self, seed: int) -> None:
        """Nothing to do: a server can be neither reseeded nor have its prefix cache cleared
        from here (vLLM's CPU engine rejects per-request seeds)."""

    def complete(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Run ``requests`` concurrently, one ``POST /v1/completions`` per distinct request, in
        order.

        Identical sampled requests (several chains opened on the same prompt) go as one request
        with ``n`` samples: the server prefills the prompt once and the HTTP round trips shrink.
        The first sample carries the request's prefill; the others read the prompt from the
        cache.

        Raises:
            GeneratorError: on the first request that fails (the others are cancelled).
            Cancelled: the current :class:`~env.generators.cancel.CancelScope` was cancelled
                (the requests in flight are cancelled, their connections closed).
        """
        if not requests:
            return []
        check_cancelled()
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(requests):
            # Greedy requests are never merged: vLLM may refuse n > 1 without sampling.
            key = r if r.temperature > 0 else ("single", i)
            groups.setdefault(key, []).append(i)
        jobs = [(requests[ix[0]], ix) for ix in groups.values()]
        payloads = [self.payload(r) for r, _ in jobs]  # (a bad request fails before any is sent)
        out: list[Completion | None] = [None] * len(requests)
        futures = [
            self._submit(self._complete_n(r, len(ix), body))
            for (r, ix), body in zip(jobs, payloads, strict=True)
        ]

        def cancel_all() -> None:
            for f in futures:
                f.cancel()  # cancels the task on the loop: its connection is closed

        scope = current_scope()
        try:
            with scope.on_cancel(cancel_all) if scope is not None else contextlib.nullcontext():
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            check_cancelled()
            for f in futures:
                if f in done and not f.cancelled() and f.exception() is not None:
                    exc = f.exception()
                    assert exc is not None
                    raise exc
            results = [f.result() for f in futures]
        except BaseException:
            cancel_all()
            raise
        for (_, ix), comps in zip(jobs, results, strict=True):
            for i, c in zip(ix, comps, strict=True):
                out[i] = c
        return [c for c in out if c is not None]

    def payload(self, r: CompletionRequest) -> dict[str, Any]:
        """The JSON body of ``POST /v1/completions`` for one request."""
        if not r.prompt_ids:
            raise ConfigError("a completion request needs a non-empty prompt")
        if r.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {r.max_tokens}")
        body: dict[str, Any] = {
            "model": self.model_name,
            "prompt": [int(t) for t in r.prompt_ids],
            "max_tokens": int(r.max_tokens),
            "temperature": float(r.temperature),
            "top_p": float(r.top_p),
            "logprobs": int(max(r.top_logprobs, 0)),
            "stop": list(r.stop),
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": True,
            **self.extra_body,
        }
        if r.tip is not None and r.tip.penalty > 0 and r.tip.token_ids:
            if self.tip_processor:
                body["vllm_xargs"] = {TIP_XARGS_KEY: _tip_json(r.tip)}
            elif r.tip.since_switch < r.tip.window:
                body["logit_bias"] = {str(int(t)): -float(r.tip.penalty) for t in r.tip.token_ids}
        return body

    async def _complete_n(
        self, r: CompletionRequest, n: int, payload: dict[str, Any]
    ) -> list[Completion]:
        if n > 1:
            payload["n"] = n
        body = await self._acall("POST", f"{self.base_url}/completions", payload)
        try:
            choices = sorted(body["choices"], key=lambda c: int(c.get("index", 0)))
            if len(choices) != n:
                raise ValueError(f"{len(choices)} choices for n={n}")
            comps = [self._parse(body, r, c) for c in choices]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise GeneratorError(
                f"server at {self.base_url} answered POST /v1/completions in an unexpected "
                f"shape ({type(exc).__name__}: {exc}): {str(body)[:300]}"
            ) from None
        for c in comps[1:]:
            c.cached_tokens = c.prompt_tokens  # one prefill for all samples
        return comps

    def _parse(
        self, body: dict[str, Any], r: CompletionRequest, choice: dict[str, Any]
    ) -> Completion:
        ids = choice.get("token_ids")
        if ids is None:
            raise GeneratorError(
                f"server at {self.base_url} returned no token ids: it must be vLLM >= 0.10 "
                "(the request sets return_token_ids)"
            )
        token_ids = np.asarray(ids, np.int32)
        n = int(token_ids.shape[0])
        m = int(max(r.top_logprobs, 0))
        lp = np.full(n, np.nan, np.float32)
        top_lp = np.full((n, m), -np.inf, np.float32)
        top_ids = np.full((n, m), -1, np.int32)
        lps = choice.get("logprobs") or {}
        token_lps = lps.get("token_logprobs") or []
        tops = lps.get("top_logprobs") or []
        for i in range(min(n, len(token_lps))):
            v = token_lps[i]
            lp[i] = np.nan if v is None else float(v)
        for i in range(min(n, len(tops))):
            entries = tops[i]
            if not entries or not m:
                continue
            ranked = sorted(
                ((float(v), _token_id(k)) for k, v in entries.items()), key=lambda e: -e[0]
            )[:m]
            for j, (v, t) in enumerate(ranked):
                top_lp[i, j] = v
                top_ids[i, j] = t
        reason = choice.get("finish_reason")
        if reason not in ("length", "stop"):
            raise GeneratorError(
                f"server at {self.base_url} ended a completion with finish_reason={reason!r} "
                "(aborted or out of memory?)"
            )
        finish: Literal["length", "stop"] = "length" if reason == "length" else "stop"
        usage = body.get("usage") or {}
        details = usage.get("prompt_tokens_details")
        self.reports_cached_tokens = details is not None
        cached = int((details or {}).get("cached_tokens") or 0)
        prompt_tokens = int(usage.get("prompt_tokens") or len(r.prompt_ids))
        return Completion(
            token_ids=token_ids,
            text=str(choice.get("text") or ""),
            logprobs=lp,
            top_logprobs=top_lp,
            top_token_ids=top_ids,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
            # vLLM's server names the stop string that matched (an int for a stop token id)
            stop_reason=stop if isinstance(stop := choice.get("stop_reason"), str) else None,
        )


class _HTTPStatus(Exception):
    """A 4xx answer (not retried)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:500]
        if "detail" in body:
            return str(body["detail"])[:500]
    return str(body)[:300]


def _token_id(key: str) -> int:
    if key.startswith("token_id:"):
        return int(key[len("token_id:") :])
    raise ValueError(f"top-logprob key {key!r} is not 'token_id:N' (return_tokens_as_token_ids)")


def _tip_json(tip: TipRequest) -> str:
    # vllm_xargs values must be flat (str, number or list), so the TIP dict travels as JSON.
    return json.dumps(
        {
            "token_ids": [int(t) for t in tip.token_ids],
            "penalty": float(tip.penalty),
            "window": int(tip.window),
            "since_switch": int(tip.since_switch),
        }
    )


async def _shutdown(client: httpx.AsyncClient) -> None:
    """Cancel the loop's other tasks (completions in flight), then close ``client``."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()


def _is_local(url: str) -> bool:
    """Whether ``url``'s host is this machine (a loopback address or ``localhost``)."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _eos_from_folder(folder: str | None) -> int | None:
    if not folder:
        return None
    path = Path(folder)
    for name in ("generation_config.json", "config.json"):
        try:
            cfg = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list) and eos:
            eos = eos[0]
        if isinstance(eos, int) and not math.isnan(eos):
            return eos
    return None


_OPENAI_TRAITS = GeneratorTraits(splits_chunks=True, thread_safe=True)


class OpenAIGenerator(LiveGenerator):
    """A :class:`~env.generators.live.LiveGenerator` over an :class:`OpenAIBackend`, or over a
    :class:`~env.generators.fleet.FleetBackend` of several servers.

    Args:
        base_url: the server's OpenAI root (``http://127.0.0.1:8000/v1``), or several servers'
            (a fleet serving one model: see :mod:`env.generators.fleet`).
        template: prompt template or its name; default ``chat`` when the model has a chat
            template, else ``testbed``.
        sampling: sampling configuration (default ``SamplingConfig()``).
        **backend_kw: more :class:`OpenAIBackend` arguments (``model``, ``api_key``,
            ``read_timeout``, ``tip_processor``, ...).

    Raises:
        GeneratorError: when the server cannot be reached.

    It is thread-safe (its HTTP client is): concurrent questions may share it.
    """

    @property
    def traits(self) -> GeneratorTraits:
        return self._with_thinking(_OPENAI_TRAITS)

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        template: PromptTemplate | str | None = None,
        sampling: SamplingConfig | None = None,
        **backend_kw: Any,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if len(urls) == 1:
            self.server: OpenAIBackend | FleetBackend = OpenAIBackend(urls[0], **backend_kw)
        else:
            servers: list[OpenAIBackend] = []
            try:
                for u in urls:
                    servers.append(OpenAIBackend(u, **backend_kw))
                self.server = FleetBackend(servers)
            except BaseException:
                for srv in servers:
                    srv.close()
                raise
        if template is None:
            has_chat = self.server.apply_chat([{"role": "user", "content": "hi"}]) is not None
            template = CHAT if has_chat else TESTBED
        super().__init__(self.server, template=template, sampling=sampling)

    def close(self) -> None:
        """Close the HTTP client."""
        self.server.close()
