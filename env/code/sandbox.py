"""Run model-written Python in a separate, limited process and say how it ended.

:func:`run_python` runs a source text in a fresh interpreter and returns a
:class:`SandboxResult`: a :data:`~env.code.types.Verdict`, a one-line detail, the captured
output and the value the code handed back with ``report(value)``. Nothing is trusted from the
code: the verdict comes from how the process ended, and a report counts only when it carries a
nonce the code was never shown.

The guards are layered; each names the assumption it rests on, so that where one layer is not
available (another OS, a container without namespaces) it is clear what still holds.

1. **A fresh interpreter, nothing inherited.** ``python -I -S -B`` (isolated: no ``PYTHON*``
   variables, no user site, no site-packages, no script folder on ``sys.path``: only the
   standard library imports), an environment of four variables, stdin from ``/dev/null``, no
   inherited file descriptors, its own session and process group, and a fresh empty working
   folder that is removed afterwards. Its stdout and stderr go to files in a second private
   folder the code never sees. *Assumes* the code needs only the standard library.
2. **Resource limits** (``setrlimit``, set by the child itself before it runs anything:
   ponder may call this from threads, so there is no ``preexec_fn``): CPU seconds, address
   space, size of any file written (stdout and stderr included), open files, no core dumps,
   and a small process count. *Assumes* CPython allocates through the address space (it
   does); ``RLIMIT_NPROC`` counts per user and the kernel enforces it only for a non-root uid.
3. **Linux namespaces**, tried in turn and skipped silently where refused (they need root or
   unprivileged user namespaces): a new network namespace (no interface but a loopback that is
   down, so no network even if the audit hook is bypassed); a new mount namespace where every
   mount is read-only and the working folder is a private ``tmpfs`` of ``Limits.disk_mb``
   (host files cannot change, nothing fills the host disk, what the code wrote vanishes with
   it); a new PID namespace where the code is PID 1, so it cannot see or signal host
   processes and the kernel kills whatever it started when it ends.
4. **No privileges.** Started by root, the child becomes ``nobody`` (65534) when ``nobody``
   can run the interpreter (the interpreter and its standard library readable by others);
   otherwise it stays uid 0 but execs the code's interpreter with an empty capability
   bounding set and ``no_new_privs``, so it holds no capability (it can raise no limit and undo
   no mount). Started by another user, it keeps that user.
5. **An audit hook** (PEP 578) in the code's interpreter, installed before the code runs. The
   first forbidden event ends the process at once (``os._exit(121)`` after writing
   ``blocked: <event>`` to stderr), so the code cannot catch and swallow the block: new
   processes (``os.fork``, ``os.exec``, ``os.system``, ``os.posix_spawn``,
   ``subprocess.Popen``, ...), any ``socket.*`` event, importing ``ctypes``, ``_ctypes``,
   ``multiprocessing``, ``_posixsubprocess`` or a sub-interpreter module, opening for writing or
   changing (remove, rename, mkdir, chmod, link, symlink, truncate, ...) a path outside the
   working folder (``/dev/null`` excepted), reading the private output folder, signalling
   another process, changing resource limits. The setup that needs ``ctypes`` runs in an
   earlier interpreter, which then replaces itself (``execv``) with the code's interpreter, so
   no ``ctypes`` object is left in memory for the code to find. *Assumes* the code stays
   within Python: audit hooks are not a boundary against code that corrupts the interpreter's
   memory; layers 2 to 4 are what hold then. Where no namespace is available this hook is
   the only guard of the network and of host files (with ``nobody``'s permissions, if root).
6. **The wall clock**, kept by the parent: past ``Limits.wall_s`` the whole process group is
   killed (``SIGKILL``), and so is anything left in the group after every run.

A sandbox that cannot be set up at all (the interpreter cannot be exec'd) ends with ``error``,
detail ``exit 122: sandbox setup failed: ...``, and is logged as an error.

The report channel: ``report(value)`` (in the code's globals) writes
``{"nonce": ..., "value": value}`` to a write-only descriptor whose file lies in the private
folder; a later call replaces the earlier value. The parent accepts it only with the right
nonce, so exiting early (``sys.exit(0)``, ``os._exit(0)``) or printing never forges one. Code
that deliberately digs through interpreter frames can still reach ``report`` (nothing inside
one interpreter is hidden from code running in it); callers that keep ``report`` out of the
code's namespace (:mod:`env.code.execute`) make that the only way.

Verdicts, in the order they are decided:

=========  ==================================================================================
timeout    the wall clock ran out, or the CPU limit ended it (``SIGXCPU``, or ``SIGKILL`` with
           the CPU time used)
blocked    the audit hook ended it (exit 121 with a ``blocked:`` line); detail is that line
output     ``SIGXFSZ``, ``File too large``, or stdout/stderr reached ``Limits.output_bytes``
memory     ``MemoryError`` ended it, or a fatal signal with its peak memory near the limit
killed     another signal ended it
error      a non-zero exit (an uncaught exception: the traceback goes to stderr, exit 1); detail
           is ``exit N: <last stderr line>``
ok         exit 0
=========  ==================================================================================
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, fields
from typing import Any

from env.code.types import Verdict
from features.errors import ConfigError, PonderError

__all__ = ["Limits", "SandboxResult", "run_python"]

logger = logging.getLogger(__name__)

#: Exit status of a run the audit hook ended.
BLOCKED_EXIT = 121
#: Exit status of a run whose sandbox could not be set up (nothing of the code ran).
SETUP_EXIT = 122
_NOBODY = 65534
#: ``RLIMIT_NPROC`` of the code: processes (and threads) of its user, counted system-wide.
_NPROC = 32
_SETUP_MARK = "sandbox setup failed: "


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of one sandboxed run.

    Attributes:
        wall_s: wall-clock limit of the whole run, interpreter start included.
        cpu_s: CPU seconds (``RLIMIT_CPU``).
        memory_mb: address space in MiB (``RLIMIT_AS``).
        output_bytes: most bytes of stdout, of stderr, of the report and of any file the code
            writes (``RLIMIT_FSIZE``).
        open_files: open file descriptors (``RLIMIT_NOFILE``).
        disk_mb: size of the working folder's private ``tmpfs`` in MiB (where mount
            namespaces are available; otherwise only ``output_bytes`` per file holds).
    """

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    output_bytes: int = 1 << 20
    open_files: int = 64
    disk_mb: int = 64

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(
                    f"Limits.{f.name} must be a positive number, got {value!r}; "
                    f"pass one such as Limits({f.name}={f.default!r})"
                )


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """How a sandboxed run ended.

    Attributes:
        verdict: how it ended (see the module docstring's table).
        detail: a one-line reason: ``"MemoryError"``, ``"wall-clock limit 10 s"``,
            ``"blocked: socket.__new__"``, ``"exit 1: ValueError: ..."``; empty when ``ok``.
        returncode: the exit status (negative: the signal that ended it); None when the wall
            clock ended it.
        stdout: what it printed, decoded (``errors="replace"``), at most
            ``Limits.output_bytes`` bytes of it.
        stderr: the same for stderr.
        wall_s: seconds from start to end.
        report: the JSON value last passed to ``report(...)``, or None.
    """

    verdict: Verdict
    detail: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    report: Any | None


# The first interpreter: limits, namespaces, privileges, then exec of the code's interpreter.
# It runs as the parent's user with ctypes loaded; it never runs the code.
_STAGE1 = r'''
import ctypes, fcntl, json, os, resource, signal, sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
        "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4


def limit(kind, soft, hard):
    old = resource.getrlimit(kind)[1]
    if old != resource.RLIM_INFINITY:
        hard = min(hard, old)
    resource.setrlimit(kind, (min(soft, hard), hard))


def unescape(field):
    out, i = bytearray(), 0
    while i < len(field):
        if field[i:i + 1] == b"\\" and field[i + 1:i + 4].isdigit():
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out += field[i:i + 1]
            i += 1
    return bytes(out)


def write(path, text):
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError:
        pass


def isolate(libc, cfg):
    """Enter new namespaces where allowed; make the filesystem read-only but the work folder."""
    tries = [CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID, CLONE_NEWNET]
    if not cfg["drop"]:  # a new user namespace would leave nobody unmapped
        tries[1:1] = [CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID]
        tries.append(CLONE_NEWUSER | CLONE_NEWNET)
    flags = next((f for f in tries if libc.unshare(f) == 0), 0)
    if flags & CLONE_NEWUSER:
        uid, gid = os.getuid(), os.getgid()
        write("/proc/self/setgroups", "deny")
        write("/proc/self/uid_map", f"{uid} {uid} 1")
        write("/proc/self/gid_map", f"{gid} {gid} 1")
    if flags & CLONE_NEWNS and libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0:
        work = os.fsencode(cfg["work"])
        owner = f",uid={cfg['uid']},gid={cfg['uid']}" if cfg["drop"] else ""
        data = f"size={cfg['disk_mb']}m,mode=0700{owner}".encode()
        own = MS_NOSUID | MS_NODEV | MS_NOEXEC
        if (libc.mount(b"tmpfs", work, b"tmpfs", own, data) == 0
                or libc.mount(work, work, None, MS_BIND, None) == 0):
            with open("/proc/self/mountinfo", "rb") as f:
                entries = [line.split(b" ") for line in f.read().splitlines()]
            for entry in entries:
                point = unescape(entry[4])
                if point == work:
                    continue
                keep = sum(KEEP.get(o, 0) for o in entry[5].decode().split(","))
                libc.mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None)
    os.chdir(cfg["work"])  # into the new mount, if one was made
    return flags


def enter(libc, cfg):
    """Drop privileges and exec the code's interpreter."""
    os.close(5)  # the peak-memory channel is the relay's, not the code's
    if cfg["drop"]:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    if os.getuid() == 0:  # staying root: exec with no capability at all
        for cap in range(64):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:
                break
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    limit(resource.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"])
    exe = cfg["exe"]
    os.execv(exe, [exe, "-I", "-S", "-B", "-c", cfg["stage2"]])


def relay(child):
    """Wait for the code (PID 1 of its namespace) and end the same way."""
    os.close(3)
    os.close(4)
    _, status, usage = os.wait4(child, 0)
    # The code's own peak: this process was forked from a small interpreter, whereas the
    # sandbox's first process inherits the (possibly large) host's high-water mark.
    os.write(5, str(usage.ru_maxrss).encode())
    os.close(5)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def main():
    cfg = json.loads(sys.argv[1])
    fds = ("job_fd", "result_fd", "peak_fd")
    high = [fcntl.fcntl(cfg[k], fcntl.F_DUPFD, 10) for k in fds]
    for k in fds:
        os.close(cfg[k])
    for fd, target in zip(high, (3, 4, 5)):
        os.dup2(fd, target)
        os.close(fd)
    limit(resource.RLIMIT_CORE, 0, 0)
    limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"])
    limit(resource.RLIMIT_AS, cfg["memory"], cfg["memory"])
    limit(resource.RLIMIT_FSIZE, cfg["output_bytes"], cfg["output_bytes"])
    limit(resource.RLIMIT_NOFILE, cfg["open_files"], cfg["open_files"])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    flags = isolate(libc, cfg)
    if flags & CLONE_NEWPID:
        child = os.fork()
        if child:
            relay(child)
    enter(libc, cfg)


try:
    main()
except BaseException as exc:
    os.write(2, f"\n@SETUP_MARK@{exc!r}\n".encode("utf-8", "replace"))
    os._exit(@SETUP_EXIT@)
'''.replace("@SETUP_MARK@", _SETUP_MARK).replace("@SETUP_EXIT@", str(SETUP_EXIT))


# The code's interpreter: read the job, install the audit hook, run the code.
_STAGE2 = r'''
import json, linecache, os, sys, traceback

BLOCKED_EXIT = @BLOCKED_EXIT@
ALWAYS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
    "os.startfile", "subprocess.Popen", "resource.setrlimit", "resource.prlimit",
    "webbrowser.open", "ctypes.dlopen",
})
MODULES = frozenset({
    "ctypes", "_ctypes", "multiprocessing", "_multiprocessing", "_posixsubprocess",
    "_posixshmem", "_xxsubinterpreters", "_xxinterpchannels", "_testcapi",
    "_testinternalcapi", "_testmultiphase", "_testsinglephase",
})
# event -> (argument index of a path, of its dir_fd (None: none), whether symlinks are followed)
PATHS = {
    "os.chmod": ((0, 2, True),),
    "os.chown": ((0, 3, True),),
    "os.chflags": ((0, None, True),),
    "os.link": ((0, 2, True), (1, 3, False)),
    "os.mkdir": ((0, 2, False),),
    "os.remove": ((0, 1, False),),
    "os.rename": ((0, 2, False), (1, 3, False)),
    "os.rmdir": ((0, 1, False),),
    "os.symlink": ((1, 2, False),),
    "os.truncate": ((0, None, True),),
    "os.utime": ((0, 3, True),),
    "os.setxattr": ((0, None, True),),
    "os.removexattr": ((0, None, True),),
    "shutil.rmtree": ((0, 1, False),),
}
WATCHED = ALWAYS | PATHS.keys() | {"import", "open", "os.kill", "os.killpg"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def guard(root, private):
    """Install the audit hook: the first forbidden event ends the process."""
    path_mod = os.path
    realpath, isabs, join, split = path_mod.realpath, path_mod.isabs, path_mod.join, path_mod.split
    dirname, basename, fsdecode = path_mod.dirname, path_mod.basename, os.fsdecode
    readlink, getpid, write, exit_now = os.readlink, os.getpid, os.write, os._exit
    out, err = sys.stdout, sys.stderr

    def under(path, top):
        return path == top or path.startswith(top + "/")

    def fd_path(fd):
        target = readlink(f"/proc/self/fd/{fd}")
        return realpath(target) if isabs(target) else f"<fd {fd}: {target}>"

    def where(path, dir_fd=None, follow=True):
        if isinstance(path, int):
            return fd_path(path)
        path = fsdecode(path)
        if not isabs(path) and isinstance(dir_fd, int) and dir_fd >= 0:
            path = join(fd_path(dir_fd), path)
        head, tail = split(path)
        if follow or tail in ("", ".", ".."):
            return realpath(path)
        return join(realpath(head or "."), tail)

    def check(event, args):
        if event in ALWAYS or event.startswith("socket."):
            return event
        if event == "import":
            name, filename = args[0], args[1]
            stem = basename(filename).split(".")[0] if isinstance(filename, str) else ""
            if stem in MODULES or any(p in MODULES for p in str(name).split(".")):
                return f"import {name}"
            return None
        if event == "open":
            path, mode, flags = args[0], args[1], args[2] or 0
            if path is None or isinstance(path, int):
                return None
            real = where(path)
            if under(real, private):
                return f"open {fsdecode(path)}"
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                flags & WRITE_FLAGS)
            if not writing or real == "/dev/null":
                return None
            if mode is None and not isabs(fsdecode(path)):  # os.open: its dir_fd is not audited
                return f"open {fsdecode(path)} for writing (relative os.open)"
            return None if under(real, root) else f"open {fsdecode(path)} for writing"
        if event in ("os.kill", "os.killpg"):
            return None if event == "os.kill" and args[0] == getpid() else f"{event} {args[0]}"
        for i, d, follow in PATHS.get(event, ()):
            real = where(args[i], args[d] if d is not None else None, follow)
            if not under(real, root):
                return f"{event} {real}"
        if event == "os.symlink":
            target = fsdecode(args[0])
            if not isabs(target):
                target = join(dirname(where(args[1], args[2], False)), target)
            if not under(realpath(target), root):
                return f"{event} to {target}"
        return None

    def block(what):
        for stream in (out, err):
            try:
                stream.flush()
            except BaseException:
                pass
        line = "blocked: " + " ".join(what.split())
        write(2, ("\n" + line[:300] + "\n").encode("utf-8", "replace"))
        exit_now(BLOCKED_EXIT)

    def hook(event, args):
        if event not in WATCHED and not event.startswith("socket."):
            return
        try:
            what = check(event, args)
        except (MemoryError, RecursionError):
            raise  # the audited operation fails with it: nothing happens
        except Exception as exc:  # fail closed
            what = f"{event} (unreadable: {type(exc).__name__})"
        if what:
            block(what)

    sys.addaudithook(hook)


def reporter(nonce):
    dumps, pwrite = json.dumps, os.pwrite

    def report(value):
        """Hand ``value`` (JSON-serializable) back to the host; a later call replaces it."""
        # Over the old value, not truncated: the host reads the first JSON value only.
        pwrite(4, dumps({"nonce": nonce, "value": value}).encode(), 0)

    return report


def fail(exc, namespace):
    if isinstance(exc, MemoryError):
        namespace.clear()
        exc.__traceback__ = None
        text = "MemoryError\n"
    else:
        try:
            tb = exc.__traceback__
            text = "".join(traceback.format_exception(type(exc), exc, tb and tb.tb_next))
        except BaseException:
            text = type(exc).__name__ + "\n"
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    data = text.encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass
    os._exit(1)


def main():
    with os.fdopen(3, "rb") as f:
        job = json.loads(f.read())
    source = job["source"]
    linecache.cache["<code>"] = (len(source), None, source.splitlines(True), "<code>")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__,
                 "report": reporter(job["nonce"])}
    guard(job["root"], job["private"])
    del job
    try:
        exec(compile(source, "<code>", "exec"), namespace)
        sys.stdout.flush()
    except SystemExit:
        raise
    except BaseException as exc:
        fail(exc, namespace)


main()
'''.replace("@BLOCKED_EXIT@", str(BLOCKED_EXIT))


def run_python(source: str, *, limits: Limits | None = None) -> SandboxResult:
    """Run ``source`` in a sandbox (see the module docstring) and say how it ended.

    The code runs as ``__main__`` with ``report(value)`` in its globals; ``value`` must be
    JSON-serializable and comes back as :attr:`SandboxResult.report`.

    Args:
        source: Python source text.
        limits: the limits of the run (default :class:`Limits`).

    Returns:
        The verdict, detail, output and report of the run.

    Raises:
        PonderError: the interpreter could not be started at all.
    """
    limits = limits or Limits()
    nonce = secrets.token_hex(16)
    drop = _nobody_can_run_python()
    private = os.path.realpath(tempfile.mkdtemp(prefix="ponder-sandbox-io-"))
    work = ""
    try:
        work = os.path.realpath(tempfile.mkdtemp(prefix="ponder-sandbox-"))
        if drop:
            os.chown(work, _NOBODY, _NOBODY)
        job = {"nonce": nonce, "source": source, "root": work, "private": private}
        paths = {
            name: os.path.join(private, name) for name in ("job", "out", "err", "result", "peak")
        }
        with open(paths["job"], "w", encoding="utf-8") as f:
            json.dump(job, f)
        with (
            open(paths["job"], "rb") as job_file,
            open(paths["out"], "wb") as out,
            open(paths["err"], "wb") as err,
            open(paths["result"], "wb", buffering=0) as result,
            open(paths["peak"], "wb", buffering=0) as peak,
        ):
            os.unlink(paths["job"])
            cfg = {
                "exe": sys.executable,
                "work": work,
                "drop": drop,
                "uid": _NOBODY,
                "nproc": _NPROC,
                "job_fd": job_file.fileno(),
                "result_fd": result.fileno(),
                "peak_fd": peak.fileno(),
                "cpu_s": math.ceil(limits.cpu_s),
                "memory": math.ceil(limits.memory_mb * (1 << 20)),
                "output_bytes": math.ceil(limits.output_bytes),
                "open_files": math.ceil(limits.open_files),
                "disk_mb": math.ceil(limits.disk_mb),
                "stage2": _STAGE2,
            }
            argv = [sys.executable, "-I", "-S", "-B", "-c", _STAGE1, json.dumps(cfg)]
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    close_fds=True,
                    pass_fds=(job_file.fileno(), result.fileno(), peak.fileno()),
                    start_new_session=True,
                )
            except OSError as e:
                raise PonderError(
                    f"could not start the sandbox interpreter {sys.executable!r}: {e}; "
                    "run ponder with a Python that can start itself (sys.executable)"
                ) from e
        try:
            timed_out, returncode, cpu_s, peak_mb = _wait(proc, limits.wall_s)
        except BaseException:  # interrupted: leave nothing running
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        wall_s = time.monotonic() - start
        stdout, stdout_full = _read(paths["out"], limits.output_bytes)
        stderr, stderr_full = _read(paths["err"], limits.output_bytes)
        report = _parse_report(paths["result"], limits.output_bytes, nonce)
        peak_mb = _inner_peak_mb(paths["peak"], peak_mb)
    finally:
        for folder in (work, private):
            if folder:
                _remove(folder)
    verdict, detail = _verdict(
        limits,
        timed_out=timed_out,
        returncode=returncode,
        stderr=stderr,
        output_full=stdout_full or stderr_full,
        cpu_s=cpu_s,
        peak_mb=peak_mb,
    )
    if verdict == "error" and detail.startswith(f"exit {SETUP_EXIT}: {_SETUP_MARK}"):
        logger.error("the sandbox could not be set up: %s", detail)
    logger.debug("sandbox run: %s (%s) in %.2f s", verdict, detail, wall_s)
    return SandboxResult(
        verdict=verdict,
        detail=detail,
        returncode=None if timed_out else returncode,
        stdout=stdout,
        stderr=stderr,
        wall_s=wall_s,
        report=report,
    )


def _wait(proc: subprocess.Popen[bytes], wall_s: float) -> tuple[bool, int, float, float]:
    """Wait for the child up to ``wall_s``; kill its group; reap it.

    Returns:
        (whether the wall clock ran out, the exit code, CPU seconds used, peak memory in MiB).
    """
    deadline = time.monotonic() + wall_s
    delay = 0.001
    timed_out = False
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)
    # Not reaped yet, so the group id cannot have been reused: kill whatever is left in it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = returncode = os.waitstatus_to_exitcode(status)
    return timed_out, returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _inner_peak_mb(path: str, outer_mb: float) -> float:
    """The code's peak memory as the sandbox's relay measured it (MiB), else ``outer_mb``: the
    first process's, which counts the host's own high-water mark when it was forked from a
    large process (a whole test session), so it only serves without a PID namespace."""
    try:
        with open(path, "rb") as f:
            return int(f.read(32) or b"x") / 1024
    except (OSError, ValueError):
        return outer_mb


def _verdict(
    limits: Limits,
    *,
    timed_out: bool,
    returncode: int,
    stderr: str,
    output_full: bool,
    cpu_s: float,
    peak_mb: float,
) -> tuple[Verdict, str]:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    sig = -returncode if returncode < 0 else None
    blocked = next((line for line in reversed(lines) if line.startswith("blocked: ")), None)
    if timed_out:
        return "timeout", f"wall-clock limit {limits.wall_s:g} s"
    if returncode == BLOCKED_EXIT and blocked:
        return "blocked", blocked
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= limits.cpu_s - 0.05):
        return "timeout", f"cpu limit {limits.cpu_s} s"
    if sig == signal.SIGXFSZ or "File too large" in last or output_full:
        return "output", f"output limit {limits.output_bytes} bytes"
    fatal = (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)
    if last.startswith("MemoryError") or (sig in fatal and peak_mb >= limits.memory_mb / 2):
        return "memory", last if last.startswith(
            "MemoryError"
        ) else f"memory limit {limits.memory_mb} MiB"
    if sig is not None:
        return "killed", _signal_name(sig)
    if returncode != 0:
        return "error", f"exit {returncode}: {last}" if last else f"exit {returncode}"
    return "ok", ""


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _read(path: str, limit: int) -> tuple[str, bool]:
    """Up to ``limit`` bytes of a file, decoded; and whether it reached the limit."""
    with open(path, "rb") as f:
        data = f.read(limit)
    return data.decode("utf-8", errors="replace"), len(data) >= limit


def _parse_report(path: str, limit: int, nonce: str) -> Any | None:
    with open(path, "rb") as f:
        data = f.read(limit)
    try:
        # The first JSON value only: a shorter report leaves the tail of a longer, earlier one.
        value, _ = json.JSONDecoder().raw_decode(data.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("nonce"), str):
        return None
    if not secrets.compare_digest(value["nonce"], nonce):
        return None
    return value.get("value")


def _remove(folder: str) -> None:
    def retry(func: Any, path: str, _exc: Any) -> None:  # a folder the code made unwritable
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    shutil.rmtree(folder, onerror=retry)
    if os.path.exists(folder):
        logger.warning("could not remove the sandbox folder %s", folder)


@functools.cache
def _nobody_can_run_python() -> bool:
    """Whether a root parent should drop the child to ``nobody``: only if it could still run.

    ``nobody`` needs to execute the interpreter, read the standard library and reach the
    temporary folder: each must be readable and searchable by others, and so must every
    folder above them.
    """
    if os.geteuid() != 0:
        return False
    platstdlib = sysconfig.get_path("platstdlib")
    needed = [
        sys.executable,
        sysconfig.get_path("stdlib"),
        platstdlib,
        os.path.join(platstdlib, "lib-dynload"),
        tempfile.gettempdir(),
    ]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        needed.append(str(sysconfig.get_config_var("LIBDIR")))
    for target in needed:
        path = os.path.realpath(target)
        try:
            mode = os.stat(path).st_mode
            if not mode & stat.S_IXOTH or (stat.S_ISDIR(mode) and not mode & stat.S_IROTH):
                return False
            while (parent := os.path.dirname(path)) != path:
                path = parent
                if not os.stat(path).st_mode & stat.S_IXOTH:
                    return False
        except OSError:
            return False
    return True
