"""A small HumanEval bank recorded from the fake generator, some tasks answered wrongly."""

from __future__ import annotations

from pathlib import Path

import pytest

from env.bank.synthetic import record_fake_code_bank
from env.code.humaneval import load_tasks


def wrong_for(index: int) -> bool:
    """Which tasks the scripted fake answers with a wrong program."""
    return index % 2 == 1


def code_script() -> dict[str, str]:
    """Each prompt answered with its reference solution, or (``wrong_for``) one returning None."""
    out = {}
    for t in load_tasks():
        body = "    return None\n" if wrong_for(t.index) else t.canonical_solution
        out[t.prompt] = f"Here is the function.\n```python\n{t.prompt}{body}```"
    return out


@pytest.fixture(name="wrong_for")
def wrong_for_fixture() -> object:
    """:func:`wrong_for`, for tests (a test module cannot import this conftest by name: other
    folders have their own)."""
    return wrong_for


@pytest.fixture(scope="session")
def code_bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("code") / "humaneval-fake"
    mp = pytest.MonkeyPatch()
    mp.setattr("env.code.reference.reference_script", code_script)
    try:
        record_fake_code_bank(path, n=3)
    finally:
        mp.undo()
    return path
