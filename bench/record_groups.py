"""Recording questions side by side: seconds a question with 1, 4, ... questions at once.

    python bench/record_groups.py                       # the testbed model, arith questions
    python bench/record_groups.py --model models/qwen2.5-coder-1.5b-instruct --dtype bfloat16 \\
        --dataset gsm8k --questions 4 --sizes 1 4 --chains 16 --max-tokens 512 --kv-cache-gib 4
    python bench/record_groups.py --sizes 4 --rolling  # 4 at once: fixed groups, then rolling

The same ``--questions`` questions are recorded into a fresh bank once per group size
(``ponder record --questions-at-once N``), with one in-process vLLM engine built once, warmed
up first and shared by every size (the questions are recorded as ``ponder record`` records
them, probes and verifier included). The table: group size, seconds, seconds a question,
recorded tokens a second (chain and probe tokens) and the speed-up over one question at a time.
Compare within one run: the machine is shared, and different group sizes draw different
samples, so chain lengths (and the tokens to generate) differ a little between rows.
With ``--rolling`` each size N > 1 gets a second row, "N of all": the questions as one group
(``--group-size`` = ``--questions``), N of them in the batch at once, the next starting as soon
as there is room for its chains (the batch stays full instead of draining at each group's end).
The numbers go to ``results/bench/record_groups.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    """Measure recording throughput against the number of questions recorded at once."""

    model: str = ""
    """model folder for the in-process vLLM engine (default: the testbed model)"""
    dtype: str = ""
    """vLLM weight dtype (default: float32 on CPU)"""
    dataset: str = "arith"
    """question set"""
    split: str = "train"
    """split the questions come from"""
    questions: int = 8
    """questions per bank"""
    question_seed: int = 7
    """seed of the question subset"""
    sizes: tuple[int, ...] = (1, 4)
    """questions at once, one bank each"""
    chains: int = 16
    """chains per question"""
    chunk_tokens: int = 64
    """tokens per chunk"""
    max_tokens: int = 256
    """token cap per chain"""
    kv_cache_gib: float = 2.0
    """vLLM CPU KV cache size"""
    rolling: bool = False
    """also time each size > 1 with all the questions as one group, that many at once"""
    out: Path = ROOT / "results" / "bench" / "record_groups.json"
    """where the numbers go"""


def main(argv: list[str] | None = None) -> None:
    import tyro

    from env.bank.record import (
        RecordArgs,
        bank_manifest,
        describe_generator,
        groups_of,
        make_generator,
        questions_of,
    )
    from env.bank.sampler import record_group_as
    from env.bank.writer import BankWriter
    from policies.evaluation.results import machine

    a = tyro.cli(Args, args=argv)
    base = RecordArgs(
        out=Path("unused"),
        model=a.model,
        dtype=a.dtype,
        dataset=a.dataset,  # type: ignore[arg-type]
        splits=(a.split,),
        n=a.questions,
        question_seed=a.question_seed,
        chains=a.chains,
        chunk_tokens=a.chunk_tokens,
        max_tokens=a.max_tokens,
        kv_cache_gib=a.kv_cache_gib,
    )
    questions = questions_of(base)[: a.questions]
    gen, model = make_generator(base)  # one engine for every size
    # warm-up (untimed): the engine's first steps of each batch shape are slower
    short = replace(base, max_tokens=base.chunk_tokens, extension_chunks=0)
    warm = bank_manifest(short, questions, model, *describe_generator(gen, short))
    record_group_as(gen, questions[: max(a.sizes)], warm)
    runs = [(size, size) for size in a.sizes]
    if a.rolling:
        runs += [(size, len(questions)) for size in a.sizes if 1 < size < len(questions)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, group_size in runs:
            manifest = bank_manifest(base, questions, model, *describe_generator(gen, base))
            writer = BankWriter(Path(tmp) / f"n{size}g{group_size}", manifest, questions)
            tokens, t0 = 0, time.perf_counter()
            for group in groups_of(len(questions), group_size, writer.done):
                for i, cols in zip(
                    group,
                    record_group_as(gen, [questions[i] for i in group], manifest, at_once=size),
                    strict=True,
                ):
                    writer.write(i, cols)
                    tokens += int(sum(cols["n_tokens"])) + int(sum(cols["probe_tokens"]))
            s = time.perf_counter() - t0
            label = f"{size}" if group_size == size else f"{size} of {group_size}"
            rows.append(
                {
                    "size": size,
                    "group": group_size,
                    "s": s,
                    "s_per_q": s / len(questions),
                    "tok_s": tokens / s,
                }
            )
            print(f"  {label} at once: {s:.0f} s, {s / len(questions):.1f} s/question", flush=True)
    one = next((r["s_per_q"] for r in rows if r["size"] == 1), rows[0]["s_per_q"])
    print(f"\n{len(questions)} {a.dataset} questions, {a.chains} chains, cap {a.max_tokens} tokens")
    print(f"{'at once':>10} {'seconds':>8} {'s/question':>11} {'tokens/s':>9} {'speed-up':>9}")
    for r in rows:
        r["speedup"] = one / r["s_per_q"]
        label = f"{r['size']}" if r["group"] == r["size"] else f"{r['size']} of {r['group']}"
        print(
            f"{label:>10} {r['s']:>8.0f} {r['s_per_q']:>11.1f} {r['tok_s']:>9.1f}"
            f" {r['speedup']:>8.2f}x"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(a).items()},
                "machine": machine(),
                "model": model,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
