"""Environment throughput: decisions per second of the single and the batched replay environment.

    python bench/env.py [--banks data/banks/testbed-arith ...] [--batch-sizes 1 256 4096 16384]
    python bench/env.py --live            # also (c): the live env over vLLM (needs a free CPU)

(a) :class:`~env.episode.single.ComputeAllocationEnv` replaying a bank, one decision at a time;
(b) :class:`~env.episode.vector.BatchedReplayEnv` at each batch size. Both are driven by a uniformly
random policy over the available actions (``info["action_mask"]``); for (b) the actions are
sampled for the whole batch at once, and the policy's time counts. A decision is an action an
episode takes: the autoreset steps (Gymnasium's NEXT_STEP mode, where an ended episode's action
is ignored) are not decisions. Wall-clock and CPU-time rates are both printed, with the load
average: on a loaded machine the wall-clock rate is what is left to this process.

(c) ``--live`` only: the live environment over :class:`~env.generators.vllm.VLLMGenerator` on the
testbed model, with the same random policy: tokens per second it generates (chain tokens, and
all decoded tokens: chains, probes, verifier) against plain ``LLM.generate`` producing the same
chain tokens from the same prompts, one call per chain (as the environment extends one chain at
a time) and all chains in one call.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "env":
    # A script run from bench/ has bench/ first on sys.path, so its `import env` finds this
    # file: hand that import over to the real package (the import system returns whatever
    # sys.modules["env"] holds once this module has run).
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "env", ROOT / "env" / "__init__.py", submodule_search_locations=[str(ROOT / "env")]
    )
    assert _spec is not None and _spec.loader is not None
    _pkg = importlib.util.module_from_spec(_spec)
    sys.modules["env"] = _pkg
    _spec.loader.exec_module(_pkg)
else:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


@dataclass
class Args:
    """Measure environment throughput (decisions per second)."""

    banks: list[Path] = field(default_factory=lambda: [ROOT / "data" / "banks" / "testbed-arith"])
    """bank folders"""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 256, 4096, 16384])
    """BatchedReplayEnv batch sizes"""
    seconds: float = 3.0
    """time spent on each measurement (after a short warm-up)"""
    seed: int = 0
    """seed of the environments and the random policy"""
    live: bool = False
    """also measure the live environment over vLLM on the testbed model (slow; needs the CPU)"""
    live_episodes: int = 8
    """live episodes to run"""
    live_chains: int = 4
    """max chains per live episode"""
    live_chunk: int = 32
    """tokens per chunk in the live environment"""
    live_max_tokens: int = 256
    """token cap of one live chain"""
    model: str | None = None
    """model folder for --live (default: the testbed model)"""


@dataclass
class Row:
    bank: str
    env: str
    batch: int
    decisions: int
    episodes: int
    wall_s: float
    cpu_s: float


def _masked_random(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A uniformly random available action per row of ``mask`` ([B, 4] bool), vectorised."""
    m = mask[:, :3].astype(np.int64)
    m0, m01 = m[:, 0], m[:, 0] + m[:, 1]
    m012 = m01 + m[:, 2]
    r = np.floor(rng.random(mask.shape[0]) * (m012 + 1)).astype(np.int64)  # stop is always on
    return np.where(r < m0, 0, np.where(r < m01, 1, np.where(r < m012, 2, 3)))


def bench_single(bank: Any, args: Args) -> Row:
    from env.episode.single import ComputeAllocationEnv

    env = ComputeAllocationEnv.from_bank(bank, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    _, info = env.reset(seed=args.seed)
    decisions = episodes = 0
    w0, c0 = time.perf_counter(), time.process_time()
    while True:
        a = int(rng.choice(np.flatnonzero(info["action_mask"])))
        _, _, terminated, truncated, info = env.step(a)
        decisions += 1
        if terminated or truncated:
            episodes += 1
            _, info = env.reset()
            if time.perf_counter() - w0 >= args.seconds:
                break
    return Row(
        bank.path.name,
        "ComputeAllocationEnv",
        1,
        decisions,
        episodes,
        time.perf_counter() - w0,
        time.process_time() - c0,
    )


def bench_batched(bank: Any, batch: int, args: Args) -> Row:
    from env.episode.vector import BatchedReplayEnv

    env = BatchedReplayEnv(bank, batch, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    _, info = env.reset(seed=args.seed)
    for _ in range(5):  # warm-up: let episodes reach their steady mix of lengths
        _, _, term, trunc, info = env.step(_masked_random(rng, info["action_mask"]))
    decisions = episodes = 0
    fresh = term | trunc  # episodes that autoreset on the next step (no decision there)
    w0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < args.seconds:
        for _ in range(10):
            actions = _masked_random(rng, info["action_mask"])
            _, _, term, trunc, info = env.step(actions)
            decisions += batch - int(fresh.sum())
            fresh = term | trunc
            episodes += int(fresh.sum())
    return Row(
        bank.path.name,
        "BatchedReplayEnv",
        batch,
        decisions,
        episodes,
        time.perf_counter() - w0,
        time.process_time() - c0,
    )


def bench_live(args: Args) -> list[list[str]]:
    from env.episode.single import ComputeAllocationEnv
    from env.generators.vllm import VLLMGenerator, build_engine
    from env.models.testbed.model import testbed_model_path
    from env.models.testbed.task import make_questions
    from env.types import SamplingConfig

    model = args.model or str(testbed_model_path())
    llm = build_engine(model, seed=args.seed, kv_cache_gib=1, enforce_eager=True)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sampling = SamplingConfig(
        temperature=0.7, top_logprobs=5, max_chain_tokens=args.live_max_tokens
    )
    gen = VLLMGenerator(llm, sampling=sampling)
    qs = [q for q, _ in make_questions(args.live_episodes, seed=args.seed, levels=[5, 6, 7, 8])]
    env = ComputeAllocationEnv(
        gen,
        qs,
        chunk_tokens=args.live_chunk,
        max_chains=args.live_chains,
        max_chain_tokens=args.live_max_tokens,
    )
    rng = np.random.default_rng(args.seed)

    def episode(i: int) -> tuple[float, int, int, list[Any]]:
        t = time.perf_counter()  # the reset generates the opening chunk: it is timed too
        _, info = env.reset(seed=args.seed + i, options={"question": i % len(qs)})
        done = False
        while not done:
            a = int(rng.choice(np.flatnonzero(info["action_mask"])))
            _, _, terminated, truncated, info = env.step(a)
            done = terminated or truncated
        dt = time.perf_counter() - t
        ep = env.episode
        assert ep is not None
        chains = [s.chain for s in ep.states]
        return dt, sum(c.num_tokens for c in chains), int(info["decoded"]), chains

    episode(len(qs) - 1)  # warm-up (kernels, allocator); each reset clears the prefix cache
    env_s = 0.0
    chain_tokens = decoded = 0
    chains: list[Any] = []
    for i in range(args.live_episodes):
        dt, n, d, cs = episode(i)
        env_s += dt
        chain_tokens += n
        decoded += d
        chains += cs
    prompts = [TokensPrompt(prompt_token_ids=list(c.prompt_ids)) for c in chains]
    params = [
        SamplingParams(
            max_tokens=max(1, c.num_tokens),
            min_tokens=max(1, c.num_tokens),
            ignore_eos=True,
            temperature=0.7,
            logprobs=5,
        )
        for c in chains
    ]
    t = time.perf_counter()
    for p, sp in zip(prompts, params, strict=True):
        llm.generate([p], [sp], use_tqdm=False)
    seq_s = time.perf_counter() - t
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    batch_s = time.perf_counter() - t
    return [
        [
            "live env (chain tokens)",
            f"{chain_tokens}",
            f"{env_s:.2f}",
            f"{chain_tokens / env_s:,.0f}",
        ],
        ["live env (all decoded)", f"{decoded}", f"{env_s:.2f}", f"{decoded / env_s:,.0f}"],
        [
            "LLM.generate, one chain per call",
            f"{chain_tokens}",
            f"{seq_s:.2f}",
            f"{chain_tokens / seq_s:,.0f}",
        ],
        [
            "LLM.generate, all chains in one call",
            f"{chain_tokens}",
            f"{batch_s:.2f}",
            f"{chain_tokens / batch_s:,.0f}",
        ],
        ["live env / one chain per call", "", "", f"{seq_s / env_s:.0%}"],
    ]


def main() -> None:
    import tyro
    from rich.table import Table

    from env.bank.store import TraceBank
    from env.console import wide_console

    args = tyro.cli(Args)
    console = wide_console()
    load0 = os.getloadavg()
    rows: list[Row] = []
    for path in args.banks:
        bank = TraceBank(path)
        for q in bank.questions:  # read every question first: measure stepping, not Parquet
            bank[q.qid]
        rows.append(bench_single(bank, args))
        for batch in args.batch_sizes:
            rows.append(bench_batched(bank, batch, args))
    load1 = os.getloadavg()
    table = Table(
        title=(
            f"environment throughput ({os.cpu_count()} CPUs; load average "
            f"{load0[0]:.2f} before, {load1[0]:.2f} after)"
        )
    )
    for col in (
        "bank",
        "environment",
        "batch",
        "decisions",
        "episodes",
        "wall s",
        "decisions/s",
        "decisions/CPU-s",
        "episodes/s",
    ):
        table.add_column(col, justify="left" if col in ("bank", "environment") else "right")
    for r in rows:
        table.add_row(
            r.bank,
            r.env,
            str(r.batch),
            f"{r.decisions:,}",
            f"{r.episodes:,}",
            f"{r.wall_s:.2f}",
            f"{r.decisions / r.wall_s:,.0f}",
            f"{r.decisions / max(r.cpu_s, 1e-9):,.0f}",
            f"{r.episodes / r.wall_s:,.0f}",
        )
    console.print(table)
    if args.live:
        live = Table(title="live environment over VLLMGenerator (testbed model) vs LLM.generate")
        for col in ("what", "tokens", "seconds", "tokens/s"):
            live.add_column(col, justify="left" if col == "what" else "right")
        for row in bench_live(args):
            live.add_row(*row)
        console.print(live)


if __name__ == "__main__":
    main()
