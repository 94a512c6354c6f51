"""Small banks recorded from the fake generator into tmp_path, and the `record` command line that
records one, for the bank tests."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from env.bank.store import TraceBank
from env.bank.synthetic import record_fake_bank
from env.questions import load_questions

MakeBank = Callable[..., TraceBank]
RecordCmd = Callable[..., list[str]]


@pytest.fixture
def make_bank(tmp_path: Path) -> MakeBank:
    """``make_bank(name, question_seed=0, seed=0)``: three arith test questions (ids
    ``arith/test/L1/0`` ... whatever the question seed) recorded into ``tmp_path / name``."""

    def make(name: str, *, question_seed_: int = 0, seed: int = 0, n: int = 3) -> TraceBank:
        questions = load_questions("arith", "test", 8, seed=question_seed_)[:n]
        return record_fake_bank(tmp_path / name, questions, seed=seed)

    return make


@pytest.fixture
def record_cmd() -> RecordCmd:
    """``record_cmd(out, *extra, n=...)``: the ``python -m env.bank.record`` command that records
    ``n`` arith questions from the fake generator into ``out`` (4 chains, 8-token chunks, 96
    tokens a chain), ``extra`` flags added."""

    def cmd(out: Path, *extra: str, n: int) -> list[str]:
        return [
            sys.executable, "-m", "env.bank.record", "--out", str(out), "--model", "fake",
            "--dataset", "arith", "--n", str(n), "--chains", "4", "--chunk-tokens", "8",
            "--max-tokens", "96", *extra,
        ]  # fmt: skip

    return cmd
