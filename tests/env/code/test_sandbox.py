"""The sandbox: each hostile program ends with a clear verdict, and the host is untouched."""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from env.code.sandbox import Limits, SandboxResult, _nobody_can_run_python, run_python
from features.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

SMALL = Limits(wall_s=5, cpu_s=2, memory_mb=256, output_bytes=100_000)


def run(source: str, limits: Limits = SMALL) -> SandboxResult:
    return run_python(source, limits=limits)


def reported(result: SandboxResult) -> Any:
    """The report of a run that must have ended ``ok``."""
    assert result.verdict == "ok", result.stderr
    assert result.report is not None
    return result.report


def _processes_under(prefix: str) -> list[int]:
    """Host processes whose working folder starts with ``prefix``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd.startswith(prefix):
                found.append(int(entry))
    return found


def _namespaces_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = ["unshare", "--net", "--mount", "--pid", "--fork", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


# --- what a normal program gets ---------------------------------------------------------------


def test_normal_program_is_ok_with_its_output_and_report() -> None:
    result = run("import sys\nprint('hello')\nprint('note', file=sys.stderr)\nreport({'n': 3})")
    assert (result.verdict, result.detail, result.returncode) == ("ok", "", 0)
    assert result.stdout == "hello\n"
    assert result.stderr == "note\n"
    assert result.report == {"n": 3}
    assert result.wall_s > 0


def test_a_later_report_replaces_an_earlier_one() -> None:
    assert run("report(list(range(100)))\nreport('short')").report == "short"


def test_an_exception_is_an_error_with_the_exception_in_detail() -> None:
    result = run("def f():\n    raise ValueError('bad input')\nf()")
    assert result.verdict == "error"
    assert result.detail == "exit 1: ValueError: bad input"
    assert result.returncode == 1
    assert 'File "<code>", line 2, in f' in result.stderr


def test_a_syntax_error_is_an_error() -> None:
    result = run("def f(:\n")
    assert (result.verdict, result.detail) == ("error", "exit 1: SyntaxError: invalid syntax")


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)"])
def test_exiting_before_report_leaves_no_report(exit_call: str) -> None:
    result = run(f"{exit_call}\nreport('passed')")
    assert result.verdict == "ok"
    assert result.report is None


def test_a_report_without_the_nonce_is_ignored() -> None:
    forged = (
        'import os\nos.write(4, b\'{"nonce": "0" , "value": "passed"}\')\nprint(\'{"value": 1}\')'
    )
    result = run(forged)
    assert result.verdict == "ok"
    assert result.report is None


def test_a_report_must_be_json() -> None:
    result = run("report(object())")
    assert result.verdict == "error"
    assert "TypeError" in result.detail


# --- time ---------------------------------------------------------------------------------------


def test_an_infinite_loop_times_out() -> None:
    result = run("while True: pass", Limits(wall_s=2, cpu_s=1))
    assert result.verdict == "timeout"
    assert result.detail in ("cpu limit 1 s", "wall-clock limit 2 s")


@pytest.mark.timeout(60)  # a hang guard: the verdict says the wall clock ended the run
def test_sleeping_forever_times_out_by_the_wall_clock() -> None:
    result = run("import time\ntime.sleep(100)", Limits(wall_s=1, cpu_s=1))
    assert (result.verdict, result.detail) == ("timeout", "wall-clock limit 1 s")
    assert result.returncode is None


# --- processes ----------------------------------------------------------------------------------


def test_a_fork_bomb_is_blocked_and_leaves_no_process() -> None:
    result = run("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    os.fork()")
    assert (result.verdict, result.detail) == ("blocked", "blocked: os.fork")
    assert result.returncode == 121
    folder = result.stdout.strip()
    assert folder.startswith(os.path.realpath(tempfile.gettempdir()))
    assert _processes_under(folder) == []


def test_a_timed_out_run_leaves_no_process() -> None:
    prefix = os.path.join(os.path.realpath(tempfile.gettempdir()), "ponder-sandbox-")
    before = set(_processes_under(prefix))
    results: list[SandboxResult] = []
    worker = threading.Thread(
        target=lambda: results.append(run("import time\ntime.sleep(100)", Limits(wall_s=4)))
    )
    worker.start()
    running: set[int] = set()
    deadline = time.monotonic() + 3
    while not running and time.monotonic() < deadline:
        running = set(_processes_under(prefix)) - before
        time.sleep(0.05)
    worker.join()
    assert running, "the sandboxed process was never seen running"
    assert [r.verdict for r in results] == ["timeout"]
    assert not running & set(_processes_under(prefix))


def test_a_block_cannot_be_caught() -> None:
    result = run("import os\ntry:\n    os.fork()\nexcept BaseException:\n    report('caught')")
    assert result.verdict == "blocked"
    assert result.report is None


@pytest.mark.parametrize(
    "source",
    [
        "import subprocess\nsubprocess.run(['ls'])",
        "import os\nos.system('ls')",
        "import os\nos.execv('/bin/ls', ['ls'])",
        "import os\nos.posix_spawn('/bin/ls', ['ls'], {})",
        "import ctypes",
        "import multiprocessing",
    ],
)
def test_starting_a_program_is_blocked(source: str) -> None:
    result = run(source)
    assert result.verdict == "blocked"
    assert result.detail.startswith("blocked: ")


def test_signalling_the_host_process_is_blocked() -> None:
    result = run(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)")
    assert (result.verdict, result.detail) == ("blocked", f"blocked: os.kill {os.getpid()}")


def test_raising_a_limit_is_blocked() -> None:
    result = run("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))")
    assert (result.verdict, result.detail) == ("blocked", "blocked: resource.setrlimit")


# --- memory -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    ["x = bytearray(4 << 30)", "x = []\nwhile True:\n    x.append(bytearray(10**6))"],
    ids=["one-block", "growing-list"],
)
def test_a_memory_hog_hits_the_memory_limit(source: str) -> None:
    result = run(source, Limits(wall_s=20, cpu_s=10, memory_mb=256))
    assert (result.verdict, result.detail) == ("memory", "MemoryError")


# --- files --------------------------------------------------------------------------------------


@pytest.fixture
def escape_path() -> Iterator[Path]:
    path = Path("/tmp") / f"ponder-escape-{secrets.token_hex(8)}"
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    "template",
    [
        "open({path!r}, 'w').write('x')",
        "open({path!r}, 'a').write('x')",
        "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
        "import os, pathlib\nos.chdir(os.path.dirname({path!r}))\n"
        "pathlib.Path(os.path.basename({path!r})).write_text('x')",
        "import os\nos.symlink({path!r}, 'link')\nopen('link', 'w').write('x')",
        "import shutil\nopen('mine', 'w').write('x')\nshutil.copy('mine', {path!r})",
    ],
    ids=["open-w", "open-a", "os-open", "chdir", "symlink", "copy"],
)
@pytest.mark.parametrize("where", ["host-tmp-path", "tmp-escape"])
def test_writing_outside_the_folder_is_blocked(
    template: str, where: str, tmp_path: Path, escape_path: Path
) -> None:
    path = tmp_path / "escaped.txt" if where == "host-tmp-path" else escape_path
    result = run(template.format(path=str(path)))
    assert result.verdict == "blocked"
    assert result.detail.startswith("blocked: ")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "template",
    [
        "import os\nos.remove({path!r})",
        "import os\nos.rename({path!r}, 'taken')",
        "import os\nos.truncate({path!r}, 0)",
        "import os\nos.chmod({path!r}, 0)",
        "import shutil\nshutil.rmtree({folder!r})",
        "import os\nfd = os.open({folder!r}, os.O_RDONLY)\nos.unlink('keep.txt', dir_fd=fd)",
    ],
    ids=["remove", "rename", "truncate", "chmod", "rmtree", "dir-fd"],
)
def test_changing_a_host_file_is_blocked(template: str, tmp_path: Path) -> None:
    path = tmp_path / "keep.txt"
    path.write_text("keep")
    mode = path.stat().st_mode
    result = run(template.format(path=str(path), folder=str(tmp_path)))
    assert result.verdict == "blocked"
    assert path.read_text() == "keep"
    assert path.stat().st_mode == mode


def test_reading_the_report_file_is_blocked() -> None:
    result = run("report('secret')\nprint(open('/proc/self/fd/4').read())")
    assert result.verdict == "blocked"
    assert "secret" not in result.stdout


def test_files_inside_the_folder_are_allowed() -> None:
    source = (
        "import os, shutil, tempfile\n"
        "os.makedirs('a/b')\n"
        "open('a/b/c.txt', 'w').write('data')\n"
        "os.rename('a/b/c.txt', 'a/c.txt')\n"
        "fd, name = tempfile.mkstemp()\n"
        "os.close(fd)\n"
        "report([open('a/c.txt').read(), os.path.dirname(name) == os.getcwd()])\n"
        "shutil.rmtree('a')\n"
    )
    result = run(source)
    assert result.verdict == "ok", result.stderr
    assert result.report == ["data", True]


def test_the_working_folder_is_fresh_empty_and_gone_afterwards() -> None:
    result = run("import os\nreport([os.getcwd(), os.listdir('.')])\nopen('left', 'w')")
    assert result.verdict == "ok"
    folder, listing = reported(result)
    assert listing == []
    assert folder.startswith(os.path.realpath(tempfile.gettempdir()))
    assert not os.path.exists(folder)


# --- network ------------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    yield listener
    listener.close()


@pytest.mark.parametrize(
    "template",
    [
        "import socket\nsocket.socket()",
        "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
        "import socket\nsocket.getaddrinfo('example.com', 80)",
    ],
    ids=["socket", "connect", "urllib", "dns"],
)
def test_the_network_is_blocked(template: str, server: socket.socket) -> None:
    result = run(template.format(port=server.getsockname()[1]))
    assert result.verdict == "blocked"
    assert result.detail.startswith("blocked: socket.")
    with pytest.raises(BlockingIOError):
        server.accept()  # no connection ever reached the server


# --- output -------------------------------------------------------------------------------------


def test_printing_gigabytes_hits_the_output_limit() -> None:
    result = run("while True:\n    print('x' * 10**6)")
    assert (result.verdict, result.detail) == ("output", "output limit 100000 bytes")
    assert 0 < len(result.stdout.encode()) <= SMALL.output_bytes


def test_writing_a_huge_file_hits_the_output_limit() -> None:
    result = run("with open('big', 'wb') as f:\n    while True:\n        f.write(bytes(10**6))")
    assert result.verdict == "output"


# --- nothing inherited --------------------------------------------------------------------------


def test_the_environment_is_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PONDER_SECRET", "hunter2")
    result = run("import os\nreport(dict(os.environ))")
    assert result.verdict == "ok"
    assert set(reported(result)) == {"PATH", "LANG", "HOME", "TMPDIR"}
    assert "hunter2" not in str(result.report)


def test_no_file_descriptor_is_inherited(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "open.txt", os.O_RDWR | os.O_CREAT)
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 100)
    os.set_inheritable(high, True)
    try:
        source = (
            "import os\n"
            "fds = sorted(int(n) for n in os.listdir('/proc/self/fd'))\n"
            f"try:\n    os.fstat({high})\n    seen = True\nexcept OSError:\n    seen = False\n"
            "report([fds, seen])\n"
        )
        result = run(source)
    finally:
        os.close(high)
        os.close(fd)
    assert result.verdict == "ok"
    fds, seen = reported(result)
    assert fds == [0, 1, 2, 3, 4]  # stdio, the listing's own descriptor, the report's
    assert seen is False


def test_only_the_standard_library_is_importable() -> None:
    source = (
        "import sys\n"
        "try:\n    import pytest\n    found = True\nexcept ImportError:\n    found = False\n"
        "report([sys.path, found, sys.flags.isolated, sys.flags.no_site])"
    )
    result = run(source)
    assert result.verdict == "ok"
    path, found, isolated, no_site = reported(result)
    assert found is False
    assert (isolated, no_site) == (1, 1)
    assert not any("site-packages" in p or ".venv" in p for p in path)


# --- privileges and namespaces ------------------------------------------------------------------


@pytest.mark.skipif(not _nobody_can_run_python(), reason="nobody cannot run this interpreter")
def test_the_code_runs_as_nobody_when_root() -> None:
    result = run("import os\nreport([os.getuid(), os.getgid(), os.getgroups()])")
    assert result.verdict == "ok"
    assert result.report == [65534, 65534, []]


@pytest.mark.skipif(os.geteuid() != 0, reason="the capability drop applies to a root parent")
def test_the_code_holds_no_capability() -> None:
    source = (
        "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
        "report([int(status[k], 16) for k in ('CapEff', 'CapPrm', 'CapBnd')])"
    )
    result = run(source)
    assert result.verdict == "ok"
    effective, permitted, _bounding = reported(result)
    assert (effective, permitted) == (0, 0)


@pytest.mark.skipif(not _namespaces_available(), reason="namespaces are not available here")
def test_the_code_runs_in_its_own_namespaces() -> None:
    source = (
        "import os\n"
        "mounts = [line.split() for line in open('/proc/self/mountinfo')]\n"
        "root = [m[5] for m in mounts if m[4] == '/'][-1]\n"
        "here = [m for m in mounts if m[4] == os.getcwd()][-1]\n"
        "report([os.getpid(), os.readlink('/proc/self/ns/net'), root, here[-3], here[5]])"
    )
    result = run(source)
    assert result.verdict == "ok", result.stderr
    pid, net, root_options, cwd_fs, cwd_options = reported(result)
    assert pid == 1
    assert net != os.readlink("/proc/self/ns/net")
    assert "ro" in root_options.split(",")
    assert cwd_fs == "tmpfs"
    assert "rw" in cwd_options.split(",")


# --- limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["wall_s", "cpu_s", "memory_mb", "output_bytes", "open_files", "disk_mb"]
)
@pytest.mark.parametrize("value", [0, -1, True, "10"])
def test_limits_must_be_positive_numbers(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"Limits.{field} must be a positive number"):
        Limits(**{field: value})  # type: ignore[arg-type]


def test_runs_from_threads_at_once_stay_apart() -> None:
    results: dict[int, SandboxResult] = {}

    def one(i: int) -> None:
        results[i] = run(f"import os\nprint({i})\nreport([{i}, os.getcwd()])")

    workers = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(results) == list(range(6))
    for i, result in results.items():
        assert (result.stdout, reported(result)[0]) == (f"{i}\n", i)
    assert len({reported(result)[1] for result in results.values()}) == 6


def test_limits_defaults() -> None:
    limits = Limits()
    assert (limits.wall_s, limits.cpu_s, limits.memory_mb) == (10.0, 10, 1024)
    assert (limits.output_bytes, limits.open_files) == (1 << 20, 64)


def test_a_crash_is_killed_with_the_signal() -> None:
    result = run("import faulthandler\nfaulthandler._read_null()")
    assert (result.verdict, result.detail) == ("killed", "SIGSEGV")
    assert result.returncode == -signal.SIGSEGV


@pytest.mark.skipif(not _namespaces_available(), reason="namespaces are not available here")
def test_a_crash_in_a_large_host_is_not_taken_for_memory() -> None:
    # A process forked from a large one inherits its high-water mark of resident memory (the
    # full test session is such a host): only the code's own peak may decide "memory".
    ballast = b"x" * (SMALL.memory_mb << 20)  # the host now holds more than the code's limit
    result = run("import faulthandler\nfaulthandler._read_null()")
    assert len(ballast) > 0
    assert (result.verdict, result.detail) == ("killed", "SIGSEGV")
