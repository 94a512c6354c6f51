"""Measure the testbed model with vLLM: accuracy by difficulty, majority voting, step labels.

Run as ``ponder testbed evaluate``. For each difficulty level it samples ``samples`` solutions per
question at the given temperature and prints a table of pass@1 (mean single-sample accuracy),
maj@k (majority vote over the k samples) and pass@k, for step-by-step and Chain-of-Draft prompts,
with mean tokens per solution. Every sampled step-by-step solution is labelled step by step
(:func:`env.models.testbed.task.label_steps`) and written to ``step_labels.parquet`` for training a
process reward model.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from env.models.testbed.model import testbed_model_path
from env.models.testbed.task import LEVELS, make_questions, prompt_text
from env.types import PromptMode
from features.answers import extract_answer

__all__ = ["EvalArgs", "evaluate"]

log = logging.getLogger(__name__)
_DATA = Path(__file__).resolve().parents[3] / "data" / "testbed"


@dataclass
class EvalArgs:
    """Evaluate the testbed model by difficulty level and write step labels."""

    model: Path | None = None
    """model folder (default: the shipped testbed model)"""
    per_level: int = 40
    """questions per difficulty level"""
    samples: int = 8
    """samples per question (majority vote over them)"""
    temperature: float = 0.7
    """sampling temperature"""
    max_tokens: int = 400
    """cap on tokens per solution"""
    seed: int = 0
    """engine seed and question seed"""
    labels_out: Path = _DATA / "step_labels.parquet"
    """where to write step-level labels"""
    summary_out: Path | None = None
    """where to write the JSON summary (default: <model>/eval.json)"""
    draft: bool = True
    """also measure Chain-of-Draft prompts"""


def evaluate(args: EvalArgs) -> dict[str, object]:
    """Sample, score and label; return the summary table as a dict."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from rich.table import Table

    from env.console import wide_console
    from env.generators.vllm import build_engine

    path = args.model or testbed_model_path()
    llm = build_engine(path, seed=args.seed)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tok = llm.get_tokenizer()
    items = make_questions(args.per_level, seed=args.seed, split="eval")
    sp = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens)
    modes: list[PromptMode] = ["cot", "draft"] if args.draft else ["cot"]
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    label_rows: dict[str, list[object]] = {
        k: []
        for k in (
            "qid",
            "level",
            "sample",
            "question",
            "solution",
            "step",
            "end",
            "local_ok",
            "prefix_ok",
            "final_correct",
        )
    }
    t0 = time.time()
    n_tokens = 0
    for mode in modes:
        prompts = [
            TokensPrompt(prompt_token_ids=tok(prompt_text(q.text, mode))["input_ids"])
            for q, _ in items
        ]
        outs = llm.generate(prompts, sp, use_tqdm=True)
        for (q, prob), out in zip(items, outs, strict=True):
            answers = [extract_answer(o.text) for o in out.outputs]
            correct = [a is not None and a == q.gold for a in answers]
            votes = Counter(a for a in answers if a is not None)
            maj = votes.most_common(1)[0][0] if votes else None
            toks = [len(o.token_ids) for o in out.outputs]
            n_tokens += sum(toks)
            rows[mode].append(
                {
                    "level": float(prob.level),
                    "pass1": sum(correct) / len(correct),
                    "maj": float(maj == q.gold),
                    "passk": float(any(correct)),
                    "tokens": sum(toks) / len(toks),
                }
            )
            if mode != "cot":
                continue
            from env.models.testbed.task import label_steps

            for j, (o, ok) in enumerate(zip(out.outputs, correct, strict=True)):
                for lab in label_steps(prob, o.text):
                    for key, val in (
                        ("qid", q.qid),
                        ("level", prob.level),
                        ("sample", j),
                        ("question", q.text),
                        ("solution", o.text),
                        ("step", lab.index),
                        ("end", lab.end),
                        ("local_ok", lab.local_ok),
                        ("prefix_ok", lab.prefix_ok),
                        ("final_correct", ok),
                    ):
                        label_rows[key].append(val)
    elapsed = time.time() - t0

    summary: dict[str, object] = {
        "model": str(path),
        "temperature": args.temperature,
        "samples": args.samples,
        "per_level": args.per_level,
        "tokens_per_s": n_tokens / elapsed,
        "levels": {},
    }
    table = Table(
        title=f"testbed model: accuracy by difficulty (T={args.temperature}, k={args.samples})"
    )
    table.add_column("level")
    table.add_column("steps x digits")
    for mode in modes:
        for col in ("pass@1", f"maj@{args.samples}", f"pass@{args.samples}", "tokens"):
            table.add_column(f"{mode} {col}", justify="right")
    levels: dict[str, object] = {}
    for level in sorted(LEVELS):
        cells = [str(level), f"{LEVELS[level].steps} x {LEVELS[level].digits}"]
        entry: dict[str, object] = {}
        for mode in modes:
            rs = [r for r in rows[mode] if r["level"] == level]
            agg = {k: sum(r[k] for r in rs) / len(rs) for k in ("pass1", "maj", "passk", "tokens")}
            entry[mode] = agg
            cells += [
                f"{agg['pass1']:.1%}",
                f"{agg['maj']:.1%}",
                f"{agg['passk']:.1%}",
                f"{agg['tokens']:.0f}",
            ]
        levels[str(level)] = entry
        table.add_row(*cells)
    summary["levels"] = levels
    console = wide_console()
    console.print(table)
    console.print(
        f"{n_tokens} tokens sampled in {elapsed:.0f} s ({n_tokens / elapsed:.0f} tokens/s)"
    )

    args.labels_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.labels_out.with_suffix(".tmp")
    pq.write_table(pa.table(label_rows), tmp, compression="zstd")
    tmp.replace(args.labels_out)
    summary_path = args.summary_out or Path(path) / "eval.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    log.info(
        "step labels: %s (%d rows); summary: %s",
        args.labels_out,
        len(label_rows["qid"]),
        summary_path,
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    import tyro

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    evaluate(tyro.cli(EvalArgs, args=argv, prog="ponder testbed evaluate"))


if __name__ == "__main__":
    main()
