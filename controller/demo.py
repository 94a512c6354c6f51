"""``ponder demo``: walk testbed questions through every generator operation on a real vLLM engine.

For a few questions of rising difficulty it shows, chunk by chunk, what the controller will see
and decide on: a chain extended in chunks with an answer-forcing probe and the self-verifier's
P(yes) at each boundary; more chains branched from the prompt and a majority vote; s1 budget
forcing; a thought-switching penalty (TIP); and a Chain-of-Draft prompt. It ends with a table of
tokens by kind.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DemoArgs", "demo", "main"]


@dataclass
class DemoArgs:
    """Run the testbed model through continue / branch / probe / verify / budget forcing / TIP / CoD."""

    model: Path | None = None
    """model folder (default: the shipped testbed model)"""
    levels: tuple[int, ...] = (2, 5, 8)
    """difficulty levels of the questions shown"""
    chunk: int = 32
    """tokens per chunk"""
    chains: int = 5
    """chains for the majority vote"""
    seed: int = 0
    """engine seed"""


def demo(args: DemoArgs) -> None:
    from rich.table import Table

    from env.console import wide_console
    from env.generators.vllm import VLLMGenerator, build_engine
    from env.models.testbed.model import testbed_model_path
    from env.models.testbed.task import make_questions
    from env.types import BudgetForcing, TipConfig, TokenUsage
    from features.answers import answers_equal, extract_answer

    console = wide_console()
    path = args.model or testbed_model_path()
    console.print(f"[bold]ponder demo[/bold]: testbed model {path} on vLLM (CPU)")
    gen = VLLMGenerator(build_engine(path, seed=args.seed), template="testbed")
    items = [
        q for q, _ in make_questions(1, seed=args.seed, levels=list(args.levels), split="demo")
    ]
    totals: dict[str, TokenUsage] = {}

    def add(name: str, u: TokenUsage) -> None:
        totals[name] = totals.get(name, TokenUsage()) + u

    for q in items:
        console.rule(f"level {q.difficulty}: {q.text}  (gold {q.gold})")
        chain = gen.start(q, 1)[0]
        while not chain.finished:
            chunk = gen.extend([chain], args.chunk)[0]
            probe = gen.probe([chain])[0]
            verdict = gen.judge([chain])[0]
            add("continue", chunk.usage)
            add("probe", probe.usage)
            add("verify", verdict.usage)
            conf = (
                float(np.nanmean(chunk.confidence))
                if chunk.confidence is not None and len(chunk)
                else float("nan")
            )
            console.print(
                f"[cyan]continue[/cyan] +{len(chunk)} tok (conf {conf:.2f})  "
                f"[magenta]probe[/magenta] -> {probe.answer!s:>8}  "
                f"[yellow]verify[/yellow] P(yes)={verdict.p_yes:.2f}  {chunk.text!r}"
            )
        answer = extract_answer(chain.text)
        ok = q.gold is not None and answers_equal(answer, q.gold)
        console.print(
            f"[green]stop[/green] single chain answers {answer} ({'right' if ok else 'wrong'})"
        )

        more = gen.branch(chain, args.chains - 1, at=0)
        while any(not c.finished for c in more):
            for ch in gen.extend([c for c in more if not c.finished], args.chunk):
                add("branch", ch.usage)
        answers = [extract_answer(c.text) for c in [chain, *more]]
        top = Counter(a for a in answers if a is not None).most_common(1)
        vote = top[0][0] if top else None
        ok = q.gold is not None and answers_equal(vote, q.gold)
        console.print(
            f"[blue]branch[/blue] x{args.chains - 1}: answers {answers} -> vote {vote} ({'right' if ok else 'wrong'})"
        )

        forced = gen.start(
            q,
            1,
            budget=BudgetForcing(
                min_tokens=chain.num_tokens + 40, max_tokens=chain.num_tokens + 80
            ),
        )[0]
        while not forced.finished:
            for ch in gen.extend([forced], args.chunk):
                add("budget forcing", ch.usage)
        console.print(f"[red]budget forcing[/red] (s1): {forced.text[-160:]!r}")

        tipped = gen.start(q, 1)[0]
        while not tipped.finished:
            for ch in gen.extend([tipped], args.chunk, tip=TipConfig(penalty=5.0)):
                add("TIP", ch.usage)
        draft = gen.start(q, 1, mode="draft")[0]
        while not draft.finished:
            for ch in gen.extend([draft], args.chunk):
                add("draft", ch.usage)
        console.print(
            f"TIP chain {tipped.num_tokens} tokens -> {extract_answer(tipped.text)};  "
            f"Chain-of-Draft {draft.num_tokens} tokens (vs {chain.num_tokens}) -> {extract_answer(draft.text)}"
        )

    table = Table(title="tokens by kind")
    for col in ("operation", "generated", "injected", "prefill", "cached", "probe", "judge"):
        table.add_column(col, justify="right")
    for name, u in totals.items():
        table.add_row(
            name,
            *(
                str(getattr(u, f))
                for f in ("generated", "injected", "prefill", "cached", "probe", "judge")
            ),
        )
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    import tyro

    logging.basicConfig(level=logging.WARNING)
    demo(tyro.cli(DemoArgs, args=argv, prog="ponder demo"))


if __name__ == "__main__":
    main()
