"""The OpenAI-compatible backend against a scripted upstream on 127.0.0.1 (no vLLM): cancelling
a completion in flight closes its connection, and the EOS token is never read from a folder
the upstream's model id happens to name relative to our working folder."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from env.generators.backend import CompletionRequest
from env.generators.cancel import CancelScope
from env.generators.openai import OpenAIBackend
from env.generators.server import free_port
from features.errors import Cancelled, GeneratorError

#: Hang guard for the polling loops below (a bound on a hang, not a speed target).
pytestmark = pytest.mark.timeout(120)


class Upstream:
    """A scripted vLLM-like server: ``/v1/models`` names ``model_id`` (root ``root``),
    ``/tokenizer_info`` is off (404), and ``/v1/completions`` decodes until its client leaves
    (it records when each request started and when its client disconnected)."""

    def __init__(self, model_id: str = "m", root: str | None = None) -> None:
        self.model_id = model_id
        self.root = root
        self.started: list[float] = []
        self.left: list[float] = []

    def app(self) -> Starlette:
        async def models(request: Request) -> Response:
            entry = {"id": self.model_id, "object": "model", "root": self.root or self.model_id}
            return JSONResponse({"object": "list", "data": [entry]})

        async def tokenizer_info(request: Request) -> Response:
            return JSONResponse({"detail": "Not Found"}, status_code=404)

        async def completions(request: Request) -> Response:
            await request.body()
            self.started.append(time.monotonic())
            while True:  # a long generation: it ends only when the client disconnects
                message = await asyncio.wait_for(request.receive(), 60)
                if message["type"] == "http.disconnect":
                    self.left.append(time.monotonic())
                    return Response(status_code=499)

        return Starlette(
            routes=[
                Route("/v1/models", models),
                Route("/tokenizer_info", tokenizer_info),
                Route("/v1/completions", completions, methods=["POST"]),
            ]
        )


@contextmanager
def serving(upstream: Upstream) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(upstream.app(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # (a server that never starts: the module's pytest timeout)
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


def _wait(cond: Any) -> None:
    """Poll ``cond`` until it holds; a hang is the module's pytest timeout's to end."""
    while not cond():
        time.sleep(0.01)


@pytest.mark.parametrize("n_requests", [1, 3])
def test_cancelling_closes_the_completions_in_flight(n_requests: int) -> None:
    """The reproduction: work went on after its question was abandoned. Now cancelling the
    scope ends ``complete`` at once with ``Cancelled`` and the upstream sees its client leave
    (vLLM then aborts the request), for one request or several in parallel.

    The read timeout is far beyond the waits below (hang guards, not speed targets): a
    connection the upstream sees close within them was closed by the cancel."""
    upstream = Upstream()
    with serving(upstream) as url:
        backend = OpenAIBackend(url, model="m", eos_token_id=0, read_timeout=600)
        scope = CancelScope()
        got: list[BaseException] = []

        def work() -> None:
            requests = [
                CompletionRequest((1, 2, 3 + i), max_tokens=2048, temperature=0.7)
                for i in range(n_requests)
            ]
            try:
                with scope.active():
                    backend.complete(requests)
            except BaseException as e:
                got.append(e)

        thread = threading.Thread(target=work)
        thread.start()
        _wait(lambda: len(upstream.started) == n_requests)
        scope.cancel("the client left")
        thread.join(30)
        assert not thread.is_alive(), "complete() did not return after the cancel"
        assert len(got) == 1 and isinstance(got[0], Cancelled), got
        assert "the client left" in str(got[0])
        _wait(lambda: len(upstream.left) == n_requests)
        # Nothing new starts in a cancelled scope.
        with pytest.raises(Cancelled), scope.active():
            backend.complete([CompletionRequest((1,), max_tokens=4, temperature=0.0)])
        assert len(upstream.started) == n_requests
        backend.close()


def test_outside_a_scope_nothing_is_cancelled() -> None:
    scope = CancelScope()
    scope.cancel()
    with pytest.raises(Cancelled):
        scope.check()
    closed: list[int] = []
    with scope.on_cancel(lambda: closed.append(1)):  # already cancelled: closed at once
        pass
    assert closed == [1]


def test_eos_is_not_read_from_a_folder_relative_to_our_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reproduction: `ponder serve` found the EOS token only when started where the
    upstream's relative model id happened to name a folder (and there read whatever config.json
    that folder held). Now a relative id is never read as a local path: a clear error says what
    to do instead; an absolute path on this machine is read."""
    folder = tmp_path / "models" / "testbed"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    monkeypatch.chdir(tmp_path)
    with serving(Upstream(model_id="models/testbed")) as url:
        with pytest.raises(GeneratorError, match="--eos-token-id") as err:
            OpenAIBackend(url)
        assert "--enable-tokenizer-info-endpoint" in str(err.value)
        backend = OpenAIBackend(url, eos_token_id=3)  # the documented way round
        assert backend.eos_token_id == 3
        backend.close()
    with serving(Upstream(model_id="testbed", root=str(folder))) as url:
        backend = OpenAIBackend(url)
        assert backend.eos_token_id == 7
        backend.close()
