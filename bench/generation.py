"""Generation benchmark: chunked generation through VLLMGenerator against plain ``LLM.generate``.

(a) Throughput. ``chains`` chains (``questions`` questions x ``chains // questions`` samples) are
generated in chunks of ``chunk`` tokens up to ``max_tokens`` tokens each through
:class:`env.generators.vllm.VLLMGenerator` (one ``LLM.generate`` call per chunk, contexts re-sent
as token ids and served from the prefix cache). Then plain ``LLM.generate`` produces the SAME
number of tokens for each of the same prompts in one call (``min_tokens == max_tokens``, EOS
ignored, the same top-k logprobs). The ratio of tokens/s is the overhead of chunking (target:
>= 90%).

(b) Prefix-cache hit rate (cached / prompt tokens) of chunk continuations, of branches from the
middle of each chain, and of answer-forcing probes.

Run: ``python bench/generation.py`` (the testbed model; ``--model /tmp/tbtest`` for any folder).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

try:
    import env  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Args:
    model: str | None = None
    """model folder (default: the testbed model, $PONDER_TESTBED_MODEL or models/testbed)"""
    chains: int = 32
    """chains generated at once"""
    questions: int = 8
    """distinct questions (chains are split evenly across them)"""
    chunk: int = 64
    """tokens per chunk (k)"""
    max_tokens: int = 256
    """tokens per chain"""
    temperature: float = 0.8
    """sampling temperature"""
    top_logprobs: int = 5
    """top-k logprobs per token (both paths)"""
    repeats: int = 5
    """timed repetitions of each path, interleaved (medians are reported)"""
    tip_penalty: float = 50.0
    """TIP penalty for the switch-token count (the default words of TipConfig)"""
    seed: int = 0
    """engine seed"""


def main(args: Args) -> None:
    from rich.table import Table

    from env.console import wide_console
    from env.generators.vllm import VLLMGenerator, build_engine
    from env.models.testbed.model import testbed_model_path
    from env.models.testbed.task import make_questions
    from env.types import SamplingConfig, TokenUsage

    console = wide_console()
    model = args.model or str(testbed_model_path())
    t0 = time.perf_counter()
    llm = build_engine(model, seed=args.seed)
    build_s = time.perf_counter() - t0
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sampling = SamplingConfig(
        temperature=args.temperature,
        top_logprobs=args.top_logprobs,
        max_chain_tokens=args.max_tokens,
    )
    gen = VLLMGenerator(llm, sampling=sampling)
    per_q = max(1, args.chains // args.questions)
    levels = [5, 6, 7, 8]
    qs = [q for q, _ in make_questions(args.questions, seed=args.seed, levels=levels)]
    qs = qs[: args.questions]

    def chunked() -> tuple[float, list, TokenUsage]:
        chains = [c for q in qs for c in gen.start(q, per_q)]
        usage = TokenUsage()
        t = time.perf_counter()
        first = True
        while any(not c.finished for c in chains):
            chunks = gen.extend(chains, args.chunk)
            if not first:  # continuations only: the first chunk's prompts are new
                for ch in chunks:
                    usage = usage + ch.usage
            first = False
        return time.perf_counter() - t, chains, usage

    def plain(chains: list, fast: bool) -> float:
        prompts = [TokensPrompt(prompt_token_ids=list(c.prompt_ids)) for c in chains]
        params = [
            SamplingParams(
                max_tokens=max(1, c.num_tokens),
                min_tokens=max(1, c.num_tokens),
                ignore_eos=True,
                temperature=args.temperature,
                logprobs=args.top_logprobs,
                flat_logprobs=fast,
                detokenize=not fast,
            )
            for c in chains
        ]
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    # Warm-up (kernels, allocator, the prompts' prefix cache for both paths alike).
    _, warm, _ = chunked()
    plain(warm, True)

    chunk_s, plain_s, plain_default_s, tokens, ratios = [], [], [], [], []
    cont_usage = TokenUsage()
    chains: list = []
    for _ in range(args.repeats):
        # Interleaved and paired: the machine's load drifts, the ratio of neighbours less so.
        s, chains, cont_usage = chunked()
        n = sum(c.num_tokens for c in chains)
        chunk_s.append(n / s)
        tokens.append(n)
        plain_s.append(n / plain(chains, True))
        plain_default_s.append(n / plain(chains, False))
        ratios.append(chunk_s[-1] / plain_s[-1])
    # (b) prefix-cache hit rates.
    branches = [b for c in chains for b in gen.branch(c, 1, at=c.num_tokens // 2)]
    br_usage = TokenUsage()
    for ch in gen.extend(branches, 16):
        br_usage = br_usage + ch.usage
    pr_usage = TokenUsage()
    for r in gen.probe(chains, max_tokens=8):
        pr_usage = pr_usage + r.usage

    def rate(u: TokenUsage) -> str:
        prompt = u.cached + u.prefill + u.injected
        return f"{u.cached / prompt:.1%} ({u.cached}/{prompt})" if prompt else "n/a"

    # (c) TIP: switch tokens sampled with and without the penalty, in one batch of chains.
    from env.generators.tokens import switch_token_ids
    from env.types import TipConfig

    tip = TipConfig(penalty=args.tip_penalty, window=10_000)
    sw = np.asarray(switch_token_ids(tip.words, gen.backend.encode, gen.backend.decode))
    counts = {}
    for name, t in (("off", None), ("on", tip)):
        tchains = [c for q in qs for c in gen.start(q, per_q)]
        got = gen.extend(tchains, args.chunk * 2, tip=t)
        n_tok = sum(len(ch) for ch in got)
        n_sw = sum(int(np.isin(ch.token_ids, sw).sum()) for ch in got)
        counts[name] = (n_sw, n_tok)

    med = statistics.median
    table = Table(title=f"generation benchmark on {os.path.basename(model.rstrip('/'))}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("engine build (s)", f"{build_s:.1f}")
    table.add_row(
        "chains x tokens (mean)",
        f"{len(chains)} x {med(tokens) / max(1, len(chains)):.0f}, chunk {args.chunk}",
    )
    table.add_row("chunked VLLMGenerator (tok/s)", f"{med(chunk_s):.0f}")
    table.add_row("plain LLM.generate, same settings (tok/s)", f"{med(plain_s):.0f}")
    table.add_row("plain LLM.generate, vLLM defaults (tok/s)", f"{med(plain_default_s):.0f}")
    table.add_row(
        "ratio chunked / plain same settings (median of paired runs)",
        f"{med(ratios):.1%} (runs: {', '.join(f'{r:.0%}' for r in ratios)})",
    )
    table.add_row(
        "ratio chunked / plain vLLM defaults", f"{med(chunk_s) / med(plain_default_s):.1%}"
    )
    table.add_row("prefix-cache hit, chunk continuations", rate(cont_usage))
    table.add_row("prefix-cache hit, branches (first extend)", rate(br_usage))
    table.add_row("prefix-cache hit, probes", rate(pr_usage))
    for name, (n_sw, n_tok) in counts.items():
        table.add_row(
            f"TIP {name} (penalty {args.tip_penalty:g}): switch tokens sampled",
            f"{n_sw} of {n_tok} ({1000 * n_sw / max(1, n_tok):.1f} per 1k)",
        )
    console.print(table)


if __name__ == "__main__":
    main(tyro.cli(Args))
