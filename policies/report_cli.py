"""``ponder report``: the README's report tables (and figures) from the results files that
``ponder run`` writes (``results/<bank>.json``), without rerunning anything.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from features.errors import ConfigError

__all__ = ["ReportArgs", "report_main"]


@dataclass
class ReportArgs:
    """Render the README's report from the results files that `ponder run` writes: print it as Markdown, or write it into the README."""

    results_dir: str = "results"
    """folder of the results files (<bank>.json)"""
    bank: tuple[str, ...] = ()
    """only these banks (by name; default: every results file in --results-dir)"""
    readme: str = "README.md"
    """the README that --write-readme rewrites"""
    write_readme: bool = False
    """rewrite each bank's block of the README (between <!-- report:<bank>:start --> and <!-- report:<bank>:end -->) instead of printing"""
    figures: str = ""
    """draw each bank's frontier and per-level figures from its results file into <figures>/<bank>/ ("" for none)"""


def report_main(argv: list[str] | None = None) -> int:
    """``ponder report``: the README's tables (and figures) from the results files alone."""
    from policies.evaluation.markdown import end_marker, render, replace_blocks, start_marker
    from policies.evaluation.report import plot_results
    from policies.evaluation.results import read_results

    args = tyro.cli(ReportArgs, args=argv, prog="ponder report")
    folder = Path(args.results_dir)
    files = sorted(folder.glob("*.json"))
    if args.bank:
        missing = sorted(set(args.bank) - {f.stem for f in files})
        if missing:
            raise ConfigError(
                f"no results file for {', '.join(missing)} in {folder}: run `ponder run` on it"
            )
        files = [f for f in files if f.stem in args.bank]
    if not files:
        raise ConfigError(f"no results files in {folder}: run `ponder run` first")
    bodies: dict[str, str] = {}
    for f in files:
        doc = read_results(f)
        name = str(doc["bank"]["name"])
        bodies[name] = render(doc)
        if args.figures:
            for p in plot_results(doc, Path(args.figures) / name):
                sys.stderr.write(f"wrote {p}\n")
    if args.write_readme:
        readme = Path(args.readme)
        text = readme.read_text()
        new = replace_blocks(text, bodies)
        if new != text:
            readme.write_text(new)
        sys.stderr.write(
            f"{readme}: {'rewrote' if new != text else 'already up to date:'} {', '.join(bodies)}\n"
        )
        return 0
    for name, body in bodies.items():
        sys.stdout.write(f"{start_marker(name)}\n{body}{end_marker(name)}\n\n")
    return 0
