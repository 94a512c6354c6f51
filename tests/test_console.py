"""The console the commands print their tables to (env/console.py)."""

from __future__ import annotations

import io

import pytest

from env.console import PIPE_WIDTH, wide_console


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_output_is_wide_unless_columns_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert wide_console().width == PIPE_WIDTH
    monkeypatch.setenv("COLUMNS", "97")
    assert wide_console().width == 97


def test_a_terminal_keeps_its_own_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "63")
    monkeypatch.setattr("sys.stdout", _Tty())
    assert wide_console().width == 63
