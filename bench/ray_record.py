"""Recording on Ray: questions per second with 1, 2 and 4 actors, and where it stops scaling.

    python bench/ray_record.py                          # fake engine and the testbed GGUF
    python bench/ray_record.py --engines fake --workers 1 2 4 8 --questions 48

Two engines:

* ``fake``: the scripted fake generator with ``--token-ms`` milliseconds per generated token (a
  batch decodes side by side), standing in for a GPU engine: each actor waits on its "GPU", so
  the actors scale until the driver (handing out questions, receiving rows over Ray, writing
  files) or this machine's cores limit them.
* ``testbed``: the testbed model in llama.cpp (``models/testbed/testbed.gguf``), one thread per
  actor: a real CPU engine, which stops scaling at this machine's cores.

Each configuration records a fresh bank of ``--questions`` arith questions (``--chains`` chains)
on a Ray instance started for it (``--ray local``), and a run without Ray gives the baseline.
The table: actors, seconds (setup: cluster and engines; recording), questions/s, decoded
tokens/s, speed-up over one actor, and the driver's share of the recording time spent writing
files (its other work is waiting on the actors). Compare within one run: the machine is shared.
The numbers go to ``results/bench/ray_record.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    """Measure recording throughput on a local Ray cluster."""

    engines: tuple[str, ...] = ("fake", "testbed")
    """engines to measure: fake (a stand-in GPU engine) and testbed (llama.cpp on this CPU)"""
    workers: tuple[int, ...] = (1, 2, 4)
    """Ray actors per configuration"""
    questions: int = 24
    """questions per bank"""
    chains: int = 8
    """chains per question"""
    token_ms: float = 2.0
    """the fake engine's milliseconds per generated token"""
    out: Path = ROOT / "results" / "bench" / "ray_record.json"
    """where the numbers go"""


def _run(engine: str, workers: int | None, a: Args, tmp: Path) -> dict[str, float]:
    """One recording (``workers=None``: without Ray); its timings."""
    from env.bank.record import RecordArgs, record
    from env.bank.store import TraceBank

    out = tmp / f"{engine}-{workers or 0}"
    model = "fake" if engine == "fake" else str(ROOT / "models" / "testbed" / "testbed.gguf")
    args = RecordArgs(
        out=out,
        model=model,
        dataset="arith",
        n=a.questions,
        chains=a.chains,
        chunk_tokens=32,
        max_tokens=128,
        template="testbed",
        fake_token_ms=a.token_ms if engine == "fake" else 0.0,
        threads=1,
        ray="local" if workers else "",
        ray_workers=workers or 1,
    )
    stats: dict[str, float] = {}
    t0 = time.perf_counter()
    record(args, stats)
    wall = time.perf_counter() - t0
    import pyarrow.parquet as pq

    bank = TraceBank(out)
    tokens = 0  # decoded: chunks and probes
    for f in (out / "chunks").glob("*.parquet"):
        t = pq.read_table(f, columns=["n_tokens", "probe_tokens"])
        tokens += sum(t.column("n_tokens").to_pylist()) + sum(t.column("probe_tokens").to_pylist())
    record_s = stats.get("record_s", wall)
    return {
        "wall_s": wall,
        "setup_s": stats.get("setup_s", 0.0),
        "record_s": record_s,
        "write_s": stats.get("write_s", 0.0),
        "questions": len(bank.recorded),
        "tokens": tokens,
        "q_per_s": len(bank.recorded) / record_s,
        "tok_per_s": tokens / record_s,
    }


def main() -> None:
    import tyro
    from rich.table import Table

    from env.console import wide_console

    a = tyro.cli(Args)
    console = wide_console()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="ponder-ray-bench-") as d:
        for engine in a.engines:
            base = _run(engine, None, a, Path(d))
            rows.append({"engine": engine, "actors": "no Ray", **base})
            one = None
            for w in a.workers:
                console.print(f"{engine}: {w} actor(s) ...")
                r = _run(engine, w, a, Path(d))
                one = one or r["q_per_s"]
                rows.append({"engine": engine, "actors": w, **r, "speedup": r["q_per_s"] / one})
    table = Table(title=f"recording {a.questions} questions x {a.chains} chains on local Ray")
    for col in ("engine", "actors", "setup s", "recording s", "q/s", "tokens/s", "speed-up",
                "writing share"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["engine"]),
            str(r["actors"]),
            f"{r['setup_s']:.1f}",
            f"{r['record_s']:.1f}",
            f"{r['q_per_s']:.2f}",
            f"{r['tok_per_s']:,.0f}",
            f"{r['speedup']:.2f}x" if "speedup" in r else "",
            f"{r['write_s'] / r['record_s']:.1%}" if r["actors"] != "no Ray" else "",
        )
    console.print(table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows},
                                indent=2) + "\n")  # fmt: skip
    console.print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
