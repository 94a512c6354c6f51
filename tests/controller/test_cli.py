"""Tests of the ``ponder`` command line (controller/cli.py).

The subprocess tests run the real entry point (``python -m controller.cli``), the same code the
``ponder`` console script calls; the in-process tests use a registry of fake commands.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller import cli
from controller.cli import COMMANDS, GROUPS, Command, main

ROOT = Path(__file__).resolve().parents[2]

#: Options each command's ``--help`` must mention (commands not listed: only the usage line).
EXPECTED_OPTIONS: dict[str, list[str]] = {
    "testbed train": ["--out", "--steps", "--seed"],
    "model prepare": ["--name"],
    "serve": [
        "--upstream",
        "--policy",
        "--api-key",
        "--max-body-bytes",
        "--token-cap",
        "--latency-cap",
    ],
}


def run_ponder(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``ponder ARGS`` through the real entry point in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PONDER_DEBUG", None)
    env["COLUMNS"] = "200"  # one option per line in tyro's help
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- the real entry point -----------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_top_level_help_lists_every_command(args: list[str]) -> None:
    proc = run_ponder(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ponder")
    for cmd in COMMANDS:
        assert cmd.path in proc.stdout
        assert cmd.help in proc.stdout


def test_help_does_not_import_heavy_packages() -> None:
    code = textwrap.dedent(
        """
        import sys
        from controller.cli import main
        assert main(["--help"]) == 0
        heavy = sorted(m for m in ("vllm", "torch", "transformers", "tyro") if m in sys.modules)
        print("HEAVY=" + ",".join(heavy))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_help_lists_its_subcommands(group: str) -> None:
    proc = run_ponder(group, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: ponder {group} <subcommand>")
    members = [c for c in COMMANDS if c.words[0] == group]
    assert members
    for cmd in members:
        assert cmd.words[1] in proc.stdout


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.path for c in COMMANDS])
def test_every_command_has_help(cmd: Command) -> None:
    proc = run_ponder(*cmd.words, "--help")
    if not cli._module_exists(cmd.module):
        # Registered before it is written: listed in help, and a clear error when run.
        assert proc.returncode == 1
        assert "not available yet" in proc.stderr
        assert "Traceback" not in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert f"usage: ponder {cmd.path}" in proc.stdout
    assert "--help" in proc.stdout
    for option in EXPECTED_OPTIONS.get(cmd.path, []):
        assert option in proc.stdout, f"{cmd.path} --help does not mention {option}"


@pytest.mark.parametrize(
    ("args", "word"),
    [(["nosuch"], "nosuch"), (["testbed", "nosuch"], "nosuch"), (["--nosuch"], "--nosuch")],
)
def test_unknown_command_exits_2(args: list[str], word: str) -> None:
    proc = run_ponder(*args)
    assert proc.returncode == 2
    assert f"unknown command '{word}'; " in proc.stderr
    assert "try: " in proc.stderr
    assert proc.stdout == ""


def test_misspelt_command_gets_a_suggestion() -> None:
    proc = run_ponder("tesbed", "train")
    assert proc.returncode == 2
    assert "did you mean 'testbed'?" in proc.stderr


def test_group_without_subcommand_exits_2() -> None:
    proc = run_ponder("testbed")
    assert proc.returncode == 2
    assert "missing subcommand" in proc.stderr


# --- the registry ---------------------------------------------------------------------------


def test_registry_is_well_formed() -> None:
    paths = [c.path for c in COMMANDS]
    assert len(paths) == len(set(paths)), "duplicate command"
    leaves = {c.words for c in COMMANDS}
    for cmd in COMMANDS:
        assert cmd.module and cmd.function, cmd.target
        assert cmd.target.count(":") == 1, cmd.target
        assert cmd.module.split(".")[0] in {"controller", "env", "features", "policies"}
        assert 1 <= len(cmd.words) <= 2, cmd.path
        assert cmd.help and "\n" not in cmd.help
        if len(cmd.words) == 2:
            assert cmd.words[0] in GROUPS, f"group {cmd.words[0]!r} has no description"
            assert (cmd.words[0],) not in leaves, f"{cmd.words[0]!r} is both a command and a group"
    assert set(GROUPS) == {c.words[0] for c in COMMANDS if len(c.words) == 2}


@given(extra=st.lists(st.text(min_size=0, max_size=8), max_size=4))
def test_resolve_hands_the_rest_to_the_command(extra: list[str]) -> None:
    for cmd in COMMANDS:
        found, rest, help_text = cli._resolve([*cmd.words, *extra], COMMANDS)
        assert found == cmd
        assert rest == extra
        assert help_text is None


# --- dispatch, errors and exit codes (fake commands, in process) --------------------------


FAKE_MODULE = """
import sys
from features.errors import ModelError

seen = []

def ok(argv):
    seen.append(list(argv))
    assert sys.argv[0] == "ponder fake ok"

def code(argv):
    return 3

def ponder_error(argv):
    raise ModelError("no model at /nowhere: train it first")

def bug(argv):
    raise RuntimeError("a bug")

def needs_dep(argv):
    import ponder_dependency_that_is_not_installed  # noqa: F401

def needs_own(argv):
    import policies.no_such_module_yet  # noqa: F401

not_callable = 1
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Command, ...]:
    name = "_ponder_cli_fake_commands"
    (tmp_path / f"{name}.py").write_text(FAKE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PONDER_DEBUG", raising=False)
    sys.modules.pop(name, None)
    funcs = ["ok", "code", "ponder_error", "bug", "needs_dep", "needs_own", "not_callable"]
    cmds = [Command(f"fake {f}", f"{name}:{f}", f"the {f} command") for f in funcs]
    cmds.append(Command("absent", "controller.no_such_module_yet:main", "written later"))
    return tuple(cmds)


def test_leaf_gets_remaining_argv(fake: tuple[Command, ...]) -> None:
    argv_before = list(sys.argv)
    assert main(["fake", "ok", "--steps", "3", "fake"], commands=fake) == 0
    import _ponder_cli_fake_commands as mod  # type: ignore[import-not-found]

    assert mod.seen == [["--steps", "3", "fake"]]
    assert sys.argv == argv_before


def test_integer_result_is_the_exit_code(fake: tuple[Command, ...]) -> None:
    assert main(["fake", "code"], commands=fake) == 3


def test_ponder_error_prints_one_line(
    fake: tuple[Command, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fake", "ponder_error"], commands=fake) == 1
    err = capsys.readouterr().err
    assert err == "error: no model at /nowhere: train it first\n"


def test_ponder_debug_shows_the_traceback(
    fake: tuple[Command, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    from features.errors import ModelError

    monkeypatch.setenv("PONDER_DEBUG", "1")
    with pytest.raises(ModelError):
        main(["fake", "ponder_error"], commands=fake)


def test_other_exceptions_propagate(fake: tuple[Command, ...]) -> None:
    with pytest.raises(RuntimeError, match="a bug"):
        main(["fake", "bug"], commands=fake)


def test_missing_dependency_is_named(
    fake: tuple[Command, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fake", "needs_dep"], commands=fake) == 1
    err = capsys.readouterr().err
    assert "ponder_dependency_that_is_not_installed" in err
    assert err.startswith("error: ")


def test_missing_own_module_is_not_blamed_on_the_install(
    fake: tuple[Command, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fake", "needs_own"], commands=fake) == 1
    err = capsys.readouterr().err
    assert "module policies.no_such_module_yet does not exist yet" in err
    assert "make setup" not in err


def test_unwritten_command_is_listed_and_fails_clearly(
    fake: tuple[Command, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--help"], commands=fake) == 0
    out = capsys.readouterr().out
    assert "absent" in out and "(not available yet)" in out
    assert main(["absent", "--help"], commands=fake) == 1
    assert "not available yet" in capsys.readouterr().err


def test_non_callable_target_fails_clearly(
    fake: tuple[Command, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fake", "not_callable"], commands=fake) == 1
    assert "has no function 'not_callable'" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ponder ")
