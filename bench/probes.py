"""The hidden-state probe tables: `ponder probes` on every shipped bank that has hidden states.

    python bench/probes.py [--banks data/banks/testbed-arith-xl ...] [--boot 1000]

For each bank: fit the difficulty and chain-correctness probes on its annotated training
questions (choices on dev), and print, on its annotated test questions, Spearman for difficulty
and AUROC (all chains, within a question), Brier and ECE at a chain's last boundary, against mean
token confidence, the self-verifier and the current difficulty predictor, by layer, and after
each chunk, with bootstrap intervals over questions (`policies/evaluation/probes.py`). Banks
without `hidden/` are skipped with the command that adds it. The probes go to runs/probes/.

The issue's targets (GSM8K test chains, last boundary): AUROC >= 0.82 over all chains and
>= 0.85 within a question (mean token confidence: 0.74 / 0.78; self-verifier 0.55 / 0.41).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    """Print the probe tables of the shipped banks."""

    banks: list[Path] = field(
        default_factory=lambda: [
            ROOT / "data" / "banks" / "testbed-arith-xl",
            ROOT / "data" / "banks" / "gsm8k-qwen2.5-coder-1.5b",
        ]
    )
    """bank folders"""
    boot: int = 1000
    """bootstrap resamples over test questions"""
    threads: int = 1
    """BLAS threads"""


def main() -> int:
    import tyro

    from controller.cli import main as ponder

    args = tyro.cli(Args)
    worst = 0
    for bank in args.banks:
        if not (bank / "hidden" / "manifest.json").is_file():
            print(f"## {bank}: no hidden states; run `ponder bank annotate {bank}` first\n")
            continue
        out = ROOT / "runs" / "probes" / bank.name
        rc = ponder(
            [
                "probes",
                str(bank),
                "--out",
                str(out),
                "--boot",
                str(args.boot),
                "--threads",
                str(args.threads),
                "--json",
                str(out / "report.json"),
            ]
        )
        worst = max(worst, rc)
    return worst


if __name__ == "__main__":
    sys.exit(main())
