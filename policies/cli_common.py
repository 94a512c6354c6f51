"""What the policies' commands (``ponder run``, ``ponder evaluate``, its ``--risk`` calibration)
share: the shipped banks they default to, finding a bank folder, and the console they print to.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

__all__ = ["DEFAULT_BANK", "FALLBACK_BANK", "bank_path", "wide_console"]

DEFAULT_BANK = "data/banks/gsm8k-qwen2.5-coder-1.5b"
FALLBACK_BANK = "data/banks/testbed-arith-xl"


def bank_path(spec: str) -> Path:
    """A bank folder: as given, else relative to the repository (the default banks ship there)."""
    p = Path(spec)
    if p.is_dir() or p.is_absolute():
        return p
    repo = Path(__file__).resolve().parents[1] / p
    return repo if repo.is_dir() else p


def wide_console() -> Console:
    """A console wide enough for the tables, also when writing to a file or a pipe."""
    return Console() if sys.stdout.isatty() else Console(width=180)
