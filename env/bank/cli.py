"""``ponder bank info PATH``: summarise a trace bank by difficulty; ``ponder bank compact PATH``:
re-encode its chunk files smaller; ``ponder bank stamp PATH``: give an older bank its identity."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import tyro

from env.bank.maintain import (
    compact,
    correct_mismatches,
    stamp,
    summarize,
    summarize_extension,
)
from env.bank.store import TraceBank

__all__ = [
    "BankCompactArgs",
    "BankInfoArgs",
    "BankStampArgs",
    "compact_main",
    "info",
    "main",
    "stamp_main",
]


@dataclass
class BankInfoArgs:
    """Summarise a trace bank: questions, chains, tokens, pass@1, maj@k, pass@k by difficulty."""

    path: Annotated[Path, tyro.conf.Positional]
    """bank folder"""
    json: bool = False
    """print JSON instead of a table"""


def info(args: BankInfoArgs) -> dict[str, Any]:
    """Print the summary table (or JSON) and return the statistics.

    Correctness is recomputed from the answers and the gold answers, as evaluation does; chunk
    files whose stored ``correct`` column disagrees are named in a warning on stderr."""
    from rich.table import Table

    from env.console import wide_console

    bank = TraceBank(args.path)
    stats: dict[str, Any] = dict(summarize(bank))
    bad = correct_mismatches(bank)
    if bad:
        shown = "\n".join(f"  {f}: {qid}, chains {chains}" for f, qid, chains in bad[:10])
        more = f"\n  and {len(bad) - 10} more" if len(bad) > 10 else ""
        print(
            f"warning: the stored `correct` column of {len(bad)} chunk file(s) disagrees with "
            f"the answers and the gold answers:\n{shown}{more}\n"
            "The table reports the recomputed correctness (as evaluation does). Those files were "
            "edited or recorded for other questions: move them away and re-run `ponder record`.",
            file=sys.stderr,
        )
    extension = summarize_extension(bank) if bank.manifest.extension_chunks > 0 else {}
    if args.json:
        from env.types import CODE_DATASETS

        if extension:
            stats["extension"] = extension

        if bank.manifest.dataset in CODE_DATASETS:
            from env.code.report import code_rows

            stats["code"] = _code_totals(code_rows(bank))
        print(json.dumps(stats, indent=2))
        return stats
    m = bank.manifest
    k = m.chains
    table = Table(
        title=f"{args.path}: {m.model.get('name')} on {m.dataset} "
        f"({len(bank)}/{len(m.questions)} questions, K={k}, chunk {m.chunk_tokens}, cap {m.max_tokens})"
    )
    cols = (
        "difficulty",
        "questions",
        "chains",
        "tokens",
        "tokens/chain",
        "pass@1",
        f"maj@{k}",
        f"pass@{k}",
    )
    for col in cols:
        table.add_column(col, justify="right")
    keys = _levels(stats)
    for key in [*keys, "all"]:
        s = stats[key]
        table.add_row(
            key,
            f"{s['questions']:.0f}",
            f"{s['chains']:.0f}",
            f"{s['tokens']:.0f}",
            f"{s['tokens_per_chain']:.0f}",
            f"{s['pass@1']:.1%}",
            f"{s['maj@k']:.1%}",
            f"{s['pass@k']:.1%}",
            end_section=bool(keys) and key == keys[-1],
        )
    console = wide_console()
    console.print(table)
    splits: dict[str, int] = {}
    for q in bank.recorded:
        parts = q.split("/")
        split = parts[1] if len(parts) > 2 else "-"
        splits[split] = splits.get(split, 0) + 1
    if len(splits) > 1:
        console.print("by split: " + ", ".join(f"{s}: {n}" for s, n in sorted(splits.items())))
    if extension:
        _extension_table(extension, m.extension_chunks, m.chunk_tokens, console)
    from env.bank.hidden import describe

    console.print(describe(bank))
    from env.types import CODE_DATASETS

    if m.dataset in CODE_DATASETS:
        stats["code"] = _code_table(bank, console)
    return stats


def _levels(stats: dict[str, Any]) -> list[str]:
    """The difficulty keys of a summary in level order (numbers first), without "all"."""
    levels = [k for k in stats if k != "all"]
    return sorted(levels, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def _extension_table(
    ext: dict[str, dict[str, float]], chunks: int, chunk_tokens: int, console: Any
) -> None:
    """The table of :func:`env.bank.maintain.summarize_extension`."""
    from rich.table import Table

    table = Table(
        title=f"thinking past a chain's own end ({chunks} extension chunks of {chunk_tokens} "
        "tokens after `Wait,`): of the extended chains, right at their own end, after the "
        "extension, and at some boundary of it"
    )
    for col in ("difficulty", "extended", "right at end", "after extension", "at some boundary"):
        table.add_column(col, justify="right")
    keys = _levels(ext)
    for key in [*keys, "all"]:
        e = ext[key]
        table.add_row(
            key,
            f"{e['extended']:.0%}",
            f"{e['at_end']:.1%}",
            f"{e['after']:.1%}",
            f"{e['any']:.1%}",
            end_section=bool(keys) and key == keys[-1],
        )
    console.print(table)


def _code_totals(rows: list[Any]) -> dict[str, float]:
    """Totals over a code bank's problems (:class:`env.code.report.ProblemRow`)."""
    n = max(1, len(rows))
    return {
        "problems": float(len(rows)),
        "pass@1": sum(r.pass1 for r in rows) / n,
        "pass@k": sum(r.passk for r in rows) / n,
        "verified": sum(r.verified for r in rows) / n,
        "maj@k": sum(r.majority for r in rows) / n,
    }


def _code_table(bank: TraceBank, console: Any) -> dict[str, float]:
    """A code bank's execution results by problem (:mod:`env.code.report`), and the totals."""
    from rich.table import Table

    from env.code.report import code_rows

    rows = code_rows(bank)
    k = bank.manifest.chains
    table = Table(
        title="execution results by problem (each program's own hidden-test verdict; "
        "verified: best-of-k by visible examples)"
    )
    table.add_column("problem", no_wrap=True, min_width=20)
    for col in ("visible", "classes", "pass@1", f"pass@{k}", "verified", f"maj@{k}"):
        table.add_column(col, justify="right")
    yes = {True: "yes", False: "-"}
    for r in rows:
        table.add_row(
            r.qid,
            str(r.visible),
            str(r.classes),
            f"{r.pass1:.0%}",
            yes[r.passk],
            yes[r.verified],
            yes[r.majority],
        )
    totals = _code_totals(rows)
    table.add_row(
        "all",
        "",
        "",
        f"{totals['pass@1']:.1%}",
        f"{totals['pass@k']:.1%}",
        f"{totals['verified']:.1%}",
        f"{totals['maj@k']:.1%}",
        style="bold",
    )
    console.print(table)
    return totals


def main(argv: list[str] | None = None) -> None:
    info(tyro.cli(BankInfoArgs, args=argv, prog="ponder bank info"))


@dataclass
class BankCompactArgs:
    """Re-encode a bank's chunk files as this ponder writes them (smaller; the same values, bit
    for bit). Each file is verified before it atomically replaces the old one; safe to
    interrupt. Takes the bank's lock: refused while `ponder record` runs on the bank."""

    path: Annotated[Path, tyro.conf.Positional]
    """bank folder"""


def compact_main(argv: list[str] | None = None) -> None:
    """``ponder bank compact``."""
    args = tyro.cli(BankCompactArgs, args=argv, prog="ponder bank compact")
    r = compact(args.path)
    saved = r.before - r.after
    pct = 100 * saved / r.before if r.before else 0.0
    print(
        f"{args.path}: {r.rewritten} of {r.files} chunk files rewritten; "
        f"{r.before / 1e6:.2f} MB -> {r.after / 1e6:.2f} MB ({pct:.0f}% smaller)"
    )


@dataclass
class BankStampArgs:
    """Give a bank recorded before ponder wrote bank identities its identity: a bank id and
    settings fingerprint in manifest.json and in every chunk file (the values bit for bit
    unchanged; each file verified before it atomically replaces the old one). Also vouches for
    files an older ponder added to a bank that has one. Takes the bank's lock."""

    path: Annotated[Path, tyro.conf.Positional]
    """bank folder"""


def stamp_main(argv: list[str] | None = None) -> None:
    """``ponder bank stamp``."""
    args = tyro.cli(BankStampArgs, args=argv, prog="ponder bank stamp")
    r = stamp(args.path)
    print(
        f"{args.path}: bank {r.bank_id} ({'new identity' if r.new_identity else 'identity kept'}, "
        f"settings {r.fingerprint[:12]}); {r.stamped} of {r.files} chunk files stamped"
    )


if __name__ == "__main__":
    main()
