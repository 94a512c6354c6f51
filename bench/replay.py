"""Replay throughput: chunks per second served by ReplayGenerator from a recorded bank.

    python bench/replay.py [--bank data/banks/testbed-arith] [--episodes 200]

Each episode picks a recorded question, starts all its recorded chains, and extends them chunk by
chunk to their end with a probe and a verifier score at every boundary (what a policy sees).
Prints a table: episodes, chunks, probes, seconds, chunks/s (one run; compare within a run).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    """Measure replay throughput."""

    bank: Path = ROOT / "data" / "banks" / "testbed-arith"
    """bank folder"""
    episodes: int = 200
    """episodes to replay"""
    seed: int = 0
    """replay seed"""


def main() -> None:
    import tyro
    from rich.table import Table

    from env.bank.store import TraceBank
    from env.console import wide_console
    from env.generators.replay import ReplayGenerator

    args = tyro.cli(Args)
    bank = TraceBank(args.bank)
    qs = bank.questions
    for q in qs:  # load every question file first: measure replay, not Parquet reads
        bank[q.qid]
    gen = ReplayGenerator(bank, seed=args.seed)
    t_chunks = t_probes = 0
    t0 = time.perf_counter()
    for e in range(args.episodes):
        gen.reset(args.seed + e)
        q = qs[e % len(qs)]
        chains = gen.start(q, bank.manifest.chains)
        while True:
            active = [c for c in chains if not c.finished]
            if not active:
                break
            got = gen.extend(active, bank.manifest.chunk_tokens)
            t_chunks += len(got)
            t_probes += len(gen.probe(active))
            if bank.manifest.judge:
                gen.judge(active)
    dt = time.perf_counter() - t0
    table = Table(
        title=f"replay throughput: {args.bank.name} ({len(qs)} questions, K={bank.manifest.chains})"
    )
    for col in ("episodes", "chunks", "probes", "seconds", "chunks/s", "episodes/s"):
        table.add_column(col, justify="right")
    table.add_row(
        str(args.episodes),
        str(t_chunks),
        str(t_probes),
        f"{dt:.2f}",
        f"{t_chunks / dt:,.0f}",
        f"{args.episodes / dt:,.1f}",
    )
    wide_console().print(table)


if __name__ == "__main__":
    main()
