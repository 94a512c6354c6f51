"""What the policies' commands (``ponder run``, ``ponder evaluate``, its ``--risk`` calibration)
share: the shipped banks they default to and finding a bank folder (the console they print to is
:func:`env.console.wide_console`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_BANK", "FALLBACK_BANK", "bank_path"]

DEFAULT_BANK = "data/banks/gsm8k-qwen2.5-coder-1.5b"
FALLBACK_BANK = "data/banks/testbed-arith-xl"


def bank_path(spec: str) -> Path:
    """A bank folder: as given, else relative to the repository (the default banks ship there)."""
    p = Path(spec)
    if p.is_dir() or p.is_absolute():
        return p
    repo = Path(__file__).resolve().parents[1] / p
    return repo if repo.is_dir() else p
