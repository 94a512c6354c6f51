"""The console ponder's commands and benches print their tables to.

In a terminal it is the terminal's width. Written to a file or a pipe (``ponder bank info PATH >
info.txt``, a bench's log), rich would cut every table to 80 columns and clip its headers; there
it is :data:`PIPE_WIDTH` columns wide instead, so a saved table reads like the one on screen;
``COLUMNS`` set in the environment still wins, as it does for rich everywhere.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

__all__ = ["PIPE_WIDTH", "wide_console"]

PIPE_WIDTH = 180


def wide_console() -> Console:
    """A console wide enough for the tables, also when writing to a file or a pipe."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPE_WIDTH)
