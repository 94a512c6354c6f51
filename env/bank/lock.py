"""An exclusive lock on a bank folder, so that two writers never record into one bank at once.

``BankLock(path, "ponder record")`` creates ``path/bank.lock`` atomically (``O_CREAT | O_EXCL``)
holding its owner (pid, host, the process's start, the command, when it was taken) and removes it
on exit, exceptions included. A second taker gets a :class:`~features.errors.BankError` naming the
owner. A lock left behind by a process that died without releasing it (``kill -9``, a crash, a
reboot) is stale when its host is this host and its pid is gone, or is now another process (pid
reuse, seen from the process start time): it is taken over with a warning. A lock of another host
cannot be checked and is never taken over; the message says how to remove it by hand.

Every writer of a bank takes it: ``ponder record`` for its whole run, ``ponder bank compact`` and
``ponder bank stamp``. Readers (:class:`~env.bank.store.TraceBank`) do not: every file is replaced
atomically, so a reader always sees whole files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from features.errors import BankError

__all__ = ["LOCK_NAME", "BankLock", "LockOwner"]

log = logging.getLogger(__name__)

LOCK_NAME = "bank.lock"


@dataclass(frozen=True)
class LockOwner:
    """Who holds a bank's lock (the lock file's content)."""

    pid: int
    host: str
    command: str
    started: str
    """when the lock was taken (ISO 8601, UTC)"""
    pid_start: str = ""
    """the owner process's start time in clock ticks since boot (``/proc/PID/stat``), telling a
    reused pid from the owner; empty where ``/proc`` is missing"""
    token: str = ""
    """random, tells this holder's lock file from a successor's"""

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} ({self.command}, since {self.started})"


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot, or "" if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 22; the command name (field 2) may hold spaces and parentheses, so split after it.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0] if fields else ""


def _alive(owner: LockOwner) -> bool:
    """Whether the lock's owner process still runs (only meaningful on the owner's host)."""
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user holds that pid: check below whether it is the owner
    if _proc_state(owner.pid) in ("Z", "X"):
        return False  # exited, not yet reaped by its parent
    now = _proc_start(owner.pid)
    return not (owner.pid_start and now and now != owner.pid_start)


class BankLock:
    """An exclusive lock on a bank folder, as a context manager (see the module docstring).

    Args:
        path: the bank folder; created if missing (and removed again on release if it is still
            empty, so a refused or failed run leaves nothing behind).
        command: what takes the lock, named to whoever is refused (``"ponder record"``).
    """

    def __init__(self, path: str | Path, command: str) -> None:
        self.path = Path(path)
        self.file = self.path / LOCK_NAME
        self.command = command
        self.owner: LockOwner | None = None
        self._made_folder = False

    def read_owner(self) -> LockOwner | None:
        """The current lock file's owner; None if there is none or it cannot be read."""
        try:
            raw = json.loads(self.file.read_text(encoding="utf-8"))
            names = {f.name for f in dataclasses.fields(LockOwner)}
            return LockOwner(**{k: v for k, v in raw.items() if k in names})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return None

    def acquire(self) -> LockOwner:
        """Take the lock, or raise :class:`BankError` naming its owner."""
        if self.owner is not None:
            raise BankError(f"{self.file} is already held by this BankLock")
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self._made_folder = True
        pid = os.getpid()
        me = LockOwner(
            pid=pid,
            host=socket.gethostname(),
            command=self.command,
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            pid_start=_proc_start(pid),
            token=uuid.uuid4().hex,
        )
        # Deciding that a lock is stale and replacing it happens under an flock of the folder,
        # so two takers of one stale lock cannot both win; creating a lock needs only O_EXCL.
        for _ in range(50):
            if self._create(me):
                self.owner = me
                return me
            with self._folder_flock():
                holder = self.read_owner()
                if holder is None:
                    if not self.file.exists():
                        continue  # released meanwhile
                    if not self._unreadable_is_stale():
                        time.sleep(0.1)  # being written right now by another taker: look again
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        self.file.unlink()
                    log.warning("took over %s: it was empty or unreadable", self.file)
                    continue
                if holder.host != me.host:
                    self._refuse(
                        holder,
                        "it may be running on that host; once it is gone, delete the lock file "
                        "by hand",
                    )
                if _alive(holder):
                    self._refuse(holder, "wait for it to finish, or stop it")
                self.file.unlink()
                log.warning(
                    "took over the stale lock %s of %s: that process is gone",
                    self.file,
                    holder.describe(),
                )
        raise BankError(f"could not take {self.file}: other processes keep taking it; try again")

    def _refuse(self, holder: LockOwner, what_to_do: str) -> None:
        self._cleanup_folder()
        raise BankError(
            f"{self.path} is locked by {holder.describe()}: another process is writing this bank "
            f"({self.file}). Nothing was changed; {what_to_do}"
        )

    def _unreadable_is_stale(self) -> bool:
        """An empty or damaged lock file older than a few seconds: its creator died while
        writing it (a live one writes it within microseconds of creating it)."""
        try:
            age = datetime.now(UTC).timestamp() - self.file.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > 5.0

    def _create(self, me: LockOwner) -> bool:
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(dataclasses.asdict(me), indent=2) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    @contextlib.contextmanager
    def _folder_flock(self) -> Any:
        import fcntl

        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def release(self) -> None:
        """Remove the lock file if it is still this holder's (idempotent)."""
        if self.owner is None:
            return
        holder = self.read_owner()
        if holder is not None and holder.token == self.owner.token:
            with contextlib.suppress(FileNotFoundError):
                self.file.unlink()
        else:
            log.warning("%s was no longer this process's lock; left it as it is", self.file)
        self.owner = None
        self._cleanup_folder()

    def _cleanup_folder(self) -> None:
        if self._made_folder:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if still empty
            self._made_folder = False

    def __enter__(self) -> BankLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
