"""Running the OpenAI-compatible proxy: ``ponder serve`` (:func:`main`) in front of a vLLM
server, and :class:`ProxyServer` (a proxy in a background thread).

What the proxy answers, and how, is in :mod:`controller.app`; its settings are
:class:`~controller.serve_args.ServeArgs`; what it runs is built by :mod:`controller.build`.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Any

import tyro

from controller.app import create_app
from controller.auth import resolve_api_key
from controller.build import build_controllers, build_routing
from controller.serve_args import ServeArgs, check_serve_args, upstreams
from features.errors import ConfigError, PonderError

__all__ = ["ProxyServer", "main"]

log = logging.getLogger(__name__)


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
        **build_routing(args),
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
