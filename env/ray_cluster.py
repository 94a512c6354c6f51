"""The Ray cluster ponder's distributed commands use (``ponder record --ray``, ``ponder run
--ray``): checking an address before any work, and joining or starting the cluster.

``local`` starts a Ray instance on this machine for the command (stopped after it); ``auto``
joins the cluster running here; ``ray://HOST:PORT`` (Ray client) or ``HOST:PORT`` (the head's
GCS) joins a remote one, whose nodes need ponder installed (``pip install -e '.[ray]'``).
"""

from __future__ import annotations

import math
import socket

from features.errors import ConfigError

__all__ = ["check_ray", "connect"]


def check_ray(address: str) -> None:
    """Refuse ``--ray`` without Ray installed, or with an address Ray cannot take."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--ray needs Ray: pip install -e '.[ray]' (or leave --ray out to run in this process)"
        ) from None
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"--ray {address!r}: give local (a Ray instance on this machine), auto (the cluster "
            "running here) or a cluster address such as ray://HOST:10001 or HOST:6379"
        )
    # Ray itself waits minutes for an address that does not answer: try it first
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address!r} ({e.strerror or e}): start it "
            "(`ray start --head`), check the address, or use --ray local"
        ) from None


def connect(address: str, workers: int, gpus: float = 0.0) -> bool:
    """Join or start the cluster; ``True`` when this run started it (and stops it)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(
                num_cpus=max(workers, 1),
                num_gpus=None if gpus == 0 else math.ceil(gpus * workers),
                include_dashboard=False,
                log_to_driver=False,
            )
            return True
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}): start it (`ray start --head`), or "
            "use --ray local"
        ) from None
    return False
