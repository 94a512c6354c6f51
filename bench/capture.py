"""Live hidden-state capture: what :class:`~env.generators.capture.Capturing` adds to generation.

    python bench/capture.py [--model testbed] [--questions 8] [--chains 4] [--chunk 32]
    python bench/capture.py --model qwen2.5-coder-1.5b --questions 2 --chains 2 --max-tokens 128

Generates ``questions`` x ``chains`` chains chunk by chunk (``chunk`` tokens per extend, up to
``max-tokens`` each) with llama.cpp on the model's GGUF file, once plain and once wrapped in
Capturing (the default layers, 128 dims, the given dtype: a transformers forward over each chunk's
new tokens on the Hugging Face folder beside the GGUF). Each question runs both ways in turn, the
engine reset to the same seed, so both see the same load. The testbed model is
``models/testbed/testbed.gguf`` (testbed template, arith test questions); ``qwen2.5-coder-1.5b``
is ``models/qwen2.5-coder-1.5b.gguf`` with its folder from ``ponder model prepare`` (chat
template, GSM8K test questions). Prints a table: tokens generated, seconds, tokens/s both ways,
the capture's own seconds and tokens fed (model loading excluded), and its cost relative to
the generation time of the same run (steadier than comparing the two runs on a busy machine).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    """Measure the cost of live hidden-state capture on top of llama.cpp generation."""

    model: str = "testbed"
    """``testbed`` or ``qwen2.5-coder-1.5b`` (its GGUF and Hugging Face folder under models/)"""
    questions: int = 8
    """questions generated"""
    chains: int = 4
    """chains per question (generated side by side, one llama.cpp slot each)"""
    chunk: int = 32
    """tokens per extend (k)"""
    max_tokens: int = 128
    """tokens per chain"""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """precision of the capture's forward pass"""
    threads: int = 1
    """CPU threads for llama.cpp and for torch each (they run one after the other)"""
    seed: int = 0
    """sampling seed"""


def _setup(args: Args) -> tuple[Path, str, list[Any]]:
    """The GGUF file, the template and the questions of ``args.model``."""
    from env.questions import load_gsm8k, load_testbed

    if args.model == "testbed":
        from env.models.testbed.model import TESTBED_DIR

        qs = load_testbed("test", per_level=max(1, -(-args.questions // 8)), seed=args.seed)
        return TESTBED_DIR / "testbed.gguf", "testbed", qs[: args.questions]
    from env.models.prepare import get_model_spec

    spec = get_model_spec(args.model)
    return ROOT / "models" / spec.gguf_name, "chat", load_gsm8k("test", args.questions)


def _run(gen: Any, question: Any, seed: int, args: Args) -> tuple[int, float]:
    """Generate one question's chains chunk by chunk: ``(tokens generated, seconds)``."""
    tokens = 0
    t0 = time.perf_counter()
    gen.reset(seed)
    chains = gen.start(question, args.chains)
    while True:
        active = [c for c in chains if not c.finished]
        if not active:
            break
        tokens += sum(len(c) for c in gen.extend(active, args.chunk))
    return tokens, time.perf_counter() - t0


def main() -> int:
    import tyro
    from rich.table import Table

    from env.console import wide_console
    from env.generators.capture import Capturing
    from env.generators.llamacpp import LlamaCppBackend, LlamaCppGenerator
    from env.types import SamplingConfig

    args = tyro.cli(Args)
    gguf, template, questions = _setup(args)
    if not gguf.is_file():
        print(f"no {gguf}: run `ponder model prepare --name {args.model}` first")
        return 1
    gen = LlamaCppGenerator(
        gguf,
        template=template,
        sampling=SamplingConfig(temperature=0.7, top_logprobs=5, max_chain_tokens=args.max_tokens),
        slots=args.chains,
        context=2048,
        threads=args.threads,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    cap = Capturing(gen, gguf, dtype=args.dtype, threads=args.threads)
    load = time.perf_counter() - t0
    # Warm both paths (llama.cpp's first batch, torch's first kernels): one chunk of one chain.
    cap.reset(args.seed)
    cap.extend(cap.start(questions[0], 1), args.chunk)
    cap_tokens = cap_forward_tokens = 0
    cap_seconds = plain_seconds = capture_seconds = 0.0
    plain_tokens = 0
    for i, q in enumerate(questions):
        n, dt = _run(gen, q, args.seed + i, args)
        plain_tokens, plain_seconds = plain_tokens + n, plain_seconds + dt
        before = cap.stats
        n, dt = _run(cap, q, args.seed + i, args)
        cap_tokens, cap_seconds = cap_tokens + n, cap_seconds + dt
        capture_seconds += cap.stats.seconds - before.seconds
        cap_forward_tokens += cap.stats.tokens - before.tokens
    assert isinstance(gen.backend, LlamaCppBackend)
    gen.backend.close()

    plain_rate = plain_tokens / plain_seconds
    cap_rate = cap_tokens / cap_seconds
    print(
        f"live capture on {gguf.name}: {len(questions)} questions x {args.chains} chains, "
        f"k={args.chunk}, up to {args.max_tokens} tokens; layers {list(cap.layers)}, {cap.dims} "
        f"dims, {args.dtype}; {args.threads} thread(s); capture model loaded in {load:.1f} s"
    )
    table = Table(title="tokens/s with and without Capturing")
    for col in ("", "tokens", "seconds", "tokens/s", "capture s", "fed tokens", "capture share"):
        table.add_column(col, justify="right")
    table.add_row("llama.cpp", str(plain_tokens), f"{plain_seconds:.2f}", f"{plain_rate:.1f}")
    table.add_row(
        "capturing",
        str(cap_tokens),
        f"{cap_seconds:.2f}",
        f"{cap_rate:.1f}",
        f"{capture_seconds:.2f}",
        str(cap_forward_tokens),
        f"{capture_seconds / cap_seconds:.0%}",
    )
    wide_console().print(table)
    generation = cap_seconds - capture_seconds
    print(
        f"capture cost: {capture_seconds:.2f} s on top of {generation:.2f} s of generation in the "
        f"same run ({capture_seconds / generation:+.0%}; {1000 * capture_seconds / max(cap_tokens, 1):.2f} "
        f"ms per generated token, {1000 * capture_seconds / max(cap_forward_tokens, 1):.2f} ms per "
        f"fed token); tokens/s with capture: {cap_rate / plain_rate:.0%} of the plain run's (the "
        "two runs' load may differ on a shared machine)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
