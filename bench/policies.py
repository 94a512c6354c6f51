"""Policy decision latency and learned-policy training time.

    python bench/policies.py [--bank data/banks/testbed-arith] [--batch 1024] [--no-train]

For each policy (one per heuristic family, and the learned ones when :mod:`policies.learned` is
there): the latency of one decision, ``act(obs)`` on a single observation (``[F]`` -> ``int``, as
the controller calls it per request), p50 and p99 over many calls; and the batched cost per
decision, ``act(obs[B, F])`` divided by ``B`` (as the evaluator and training call it), p50 and
p99 over repeated calls. Observations are real ones, from replayed episodes of the bank. Then the
wall time of training each learned policy with small budgets on the bank's train questions.
The load average is printed: on a loaded machine the times include waiting for a CPU.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "policies":
    # A script run from bench/ has bench/ first on sys.path, so `import policies` finds this
    # file: hand that import over to the real package.
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "policies",
        ROOT / "policies" / "__init__.py",
        submodule_search_locations=[str(ROOT / "policies")],
    )
    assert _spec is not None and _spec.loader is not None
    _pkg = importlib.util.module_from_spec(_spec)
    sys.modules["policies"] = _pkg
    _spec.loader.exec_module(_pkg)
else:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


@dataclass
class Args:
    """Measure policy decision latency (single and batched) and learned-policy training time."""

    bank: Path = ROOT / "data" / "banks" / "testbed-arith"
    """bank whose replayed episodes give the observations (and the learned policies' training)"""
    singles: int = 2000
    """single-observation act() calls per policy"""
    batch: int = 1024
    """observations per batched act() call"""
    repeats: int = 30
    """batched calls per policy"""
    train: bool = True
    """also time training the learned policies (small budgets)"""
    value_transitions: int = 20_000
    """decisions collected to train the value policy"""
    ppo_steps: int = 20_000
    """environment steps of PPO training"""
    stop_orders: int = 16
    """replayed episodes per training question for the stop policy"""
    blas_threads: int = 1
    """BLAS threads while measuring latency (0: the library's default; on a busy machine more
    threads than free CPUs make the learned policies' matrix products wait)"""


def _observations(bank: Path, n: int, seed: int = 0) -> tuple[np.ndarray, Any]:
    """``n`` real observations: replayed episodes under a mix of heuristics."""
    from env.episode.vector import BatchedReplayEnv
    from policies.registry import load_policy

    env = BatchedReplayEnv(bank, 256, split="test", seed=seed, difficulty="auto")
    out: list[np.ndarray] = []
    for name in ("best-of-8", "adaptive-consistency-0.9", "s1-256", "probe-agree-2"):
        p = load_policy(name, config=env.config)
        obs, _ = env.reset(seed=seed)
        p.reset(env.num_envs, config=env.config)
        for _ in range(40):
            out.append(obs.copy())
            obs, _, term, trunc, _ = env.step(p.act(obs))
            p.end(term | trunc)
    x = np.concatenate(out)
    rng = np.random.default_rng(seed)
    return x[rng.permutation(len(x))[:n]], env.config


def _policies(config: Any, learned_policies: dict[str, Any]) -> list[Any]:
    from policies.base import LamConditioned
    from policies.registry import load_policy

    names = (
        "single",
        "best-of-16",
        "best-of-16-verifier",
        "s1-256",
        "adaptive-consistency-0.95",
        f"esc-4-max{config.max_chains}",
        "deepconf-online-90",
        "probe-agree-3",
        "router-0.3-0.7",
        f"bounded-{config.chunk_tokens}-{config.max_chain_tokens}",
    )
    ps: list[Any] = [load_policy(n, config=config) for n in names]
    for p in learned_policies.values():
        ps.append(p.with_lam(3e-4) if isinstance(p, LamConditioned) else p)
    return ps


def _pct(x: list[float]) -> tuple[float, float]:
    a = np.asarray(x)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def measure(policy: Any, obs: np.ndarray, config: Any, args: Args) -> dict[str, float]:
    """p50 / p99 of single-observation decisions and of batched per-decision cost (µs)."""
    import warnings

    single: list[float] = []
    policy.reset(1, config=config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(min(args.singles, len(obs))):
            row = obs[i]
            t0 = time.perf_counter_ns()
            policy.act(row)
            single.append((time.perf_counter_ns() - t0) / 1e3)
        b = min(args.batch, len(obs))
        batch = obs[:b]
        per: list[float] = []
        policy.reset(b, config=config)
        policy.act(batch)  # warm-up
        for _ in range(args.repeats):
            policy.reset(b, config=config)
            t0 = time.perf_counter_ns()
            policy.act(batch)
            per.append((time.perf_counter_ns() - t0) / 1e3 / b)
    s50, s99 = _pct(single)
    b50, b99 = _pct(per)
    return {"single_p50": s50, "single_p99": s99, "batch_p50": b50, "batch_p99": b99}


def train_learned(args: Args) -> tuple[dict[str, Any], dict[str, float]]:
    """Train each learned policy with small budgets; their wall times (s)."""
    from policies.learned import train_ppo, train_stop_policy, train_value_policy

    jobs: list[tuple[str, Any, dict[str, Any]]] = [
        ("value", train_value_policy, {"transitions": args.value_transitions}),
        (
            "value-chain",
            train_value_policy,
            {"transitions": args.value_transitions, "decide": "chain"},
        ),
        ("ppo", train_ppo, {"total_steps": args.ppo_steps, "num_envs": 256}),
        (
            "ppo-chain",
            train_ppo,
            {"total_steps": args.ppo_steps, "num_envs": 256, "decide": "chain", "ent_coef": 0.1},
        ),
        ("stop-chain", train_stop_policy, {"orders": args.stop_orders, "num_envs": 256}),
    ]
    out, secs = {}, {}
    for name, fn, kw in jobs:
        t0 = time.perf_counter()
        out[name] = fn(args.bank, split="train", seed=0, eval_seeds=0, progress=False, **kw)
        secs[name] = time.perf_counter() - t0
    return out, secs


def main() -> None:
    import tyro
    from rich.table import Table

    from env.console import wide_console

    args = tyro.cli(Args)
    console = wide_console()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    obs, config = _observations(args.bank, max(args.singles, args.batch))
    learned, secs = train_learned(args) if args.train else ({}, {})
    table = Table(
        title=(
            f"decision latency, µs ({len(obs)} real observations of {args.bank.name}; "
            f"batched: per decision in act(obs[{min(args.batch, len(obs))}, F]); "
            f"BLAS threads {args.blas_threads or 'default'}; "
            f"load average {load:.1f} on {os.cpu_count()} CPUs)"
        ),
        title_justify="left",
    )
    for c in ("policy", "single p50", "single p99", "batched p50", "batched p99"):
        table.add_column(c, justify="left" if c == "policy" else "right")
    from threadpoolctl import threadpool_limits

    limit = threadpool_limits(args.blas_threads) if args.blas_threads else threadpool_limits(None)
    with limit:
        rows = [(p.name, measure(p, obs, config, args)) for p in _policies(config, learned)]
    for name, m in rows:
        table.add_row(
            name,
            f"{m['single_p50']:.1f}",
            f"{m['single_p99']:.1f}",
            f"{m['batch_p50']:.3f}",
            f"{m['batch_p99']:.3f}",
        )
    console.print(table)
    if secs:
        t = Table(title="training wall time (small budgets)", title_justify="left")
        t.add_column("policy")
        t.add_column("budget")
        t.add_column("seconds", justify="right")
        budget = {
            "value": f"{args.value_transitions} transitions",
            "value-chain": f"{args.value_transitions} transitions",
            "ppo": f"{args.ppo_steps} steps",
            "ppo-chain": f"{args.ppo_steps} steps",
            "stop-chain": f"{args.stop_orders} orders per question",
        }
        for name, s in secs.items():
            t.add_row(name, budget.get(name, ""), f"{s:.1f}")
        console.print(t)


if __name__ == "__main__":
    main()
