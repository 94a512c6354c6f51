"""Sweep points evaluated in several processes give what one process gives, in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.evaluation.parallel import ProcessEvaluators
from policies.evaluation.runner import EvalResult, Evaluator
from policies.evaluation.sweeps import Point
from policies.learned import train_stop_policy
from policies.registry import load_policy

BANK = Path(__file__).resolve().parents[3] / "data" / "banks" / "testbed-arith"

pytestmark = pytest.mark.timeout(600)


def _key(r: EvalResult) -> tuple[object, ...]:
    return (r.label, r.train_seed, tuple((e.qid, e.seed, e.correct, e.decoded) for e in r.episodes))


def test_two_processes_give_the_results_of_one() -> None:
    ev = Evaluator(BANK, split="test", seeds=2, difficulty="auto")
    stop = train_stop_policy(BANK, orders=4, num_envs=64, eval_seeds=0, progress=False)
    points: list[Point] = [
        (load_policy(spec, config=ev.config), "rules", spec, None)
        for spec in ("best-of-4", "adaptive-consistency-0.9", "esc-4", "single")
    ]
    points += [(stop.with_lam(lam), "stop-chain", f"lam={lam:g}", 0) for lam in (1e-5, 1e-3)]
    one = [ev(p, family=f, param=a, train_seed=s) for p, f, a, s in points]
    seen: list[str] = []
    with ProcessEvaluators(ev, workers=2) as pool:
        two = pool(points, lambda r: seen.append(r.label))
    assert [_key(r) for r in two] == [_key(r) for r in one]
    assert sorted(seen) == sorted(r.label for r in one)


def test_a_worker_keeps_one_copy_of_a_policys_probes(tmp_path: Path) -> None:
    """Every point reaches a worker with its own copy of the policy's probes; the worker
    replays all of them with one, so it builds one replay for them, not one per point."""
    import pickle

    from threadpoolctl import threadpool_limits

    from env.bank.store import TraceBank
    from env.episode.hidden import HiddenProbes
    from policies.evaluation.parallel import EvalWorker, probes_key

    with threadpool_limits(1):
        probes = HiddenProbes.fit(TraceBank(BANK), c_grid=(0.01,), alpha_grid=(10.0,))
    folder = probes.save(tmp_path / "probes", training=True)
    stop = train_stop_policy(
        BANK, orders=4, num_envs=64, eval_seeds=0, progress=False, hidden_probes=str(folder)
    )
    ev = Evaluator(BANK, split="test", seeds=2, difficulty=None)
    worker = EvalWorker(str(BANK), "test", [0, 1], None, None, ev.config, 1)
    key = probes_key(stop)
    assert key is not None
    got = []
    for lam in (1e-5, 1e-4, 1e-3):
        # what a process pool does to each point: a copy, probes included (in memory)
        copy = pickle.loads(pickle.dumps(stop.with_lam(lam)))
        assert copy.hidden_probes is not stop.hidden_probes
        got.append(worker.evaluate(copy, "stop-chain-hidden", f"lam={lam:g}", 0, key))
    assert len(worker.evaluator._envs) == 1
    want = [ev(stop.with_lam(lam), family="stop-chain-hidden") for lam in (1e-5, 1e-4, 1e-3)]
    assert [_key(r)[2] for r in got] == [_key(r)[2] for r in want]
