"""The stop policy: what it learns from (settled labels), how it acts, its files, its errors.

Trainings on the testbed bank take seconds (a logistic regression on replayed episodes).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from env.episode.observation import FEATURE_NAMES
from env.episode.vector import BatchedReplayEnv
from features.errors import ConfigError, PolicyError
from policies.base import BRANCH, CONTINUE, STOP
from policies.heuristics import BestOfN
from policies.learned import StopPolicy, load_policy, rollout_pinned, train_stop_policy
from policies.learned.base import available
from policies.learned.stop import settled_rows

ROOT = Path(__file__).resolve().parents[3]
BANK = ROOT / "data" / "banks" / "testbed-arith"
SEEDS = 8

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stop_policy() -> StopPolicy:
    return train_stop_policy(BANK, orders=16, num_envs=128, eval_seeds=0, progress=False)


@pytest.fixture(scope="module")
def test_env() -> BatchedReplayEnv:
    return BatchedReplayEnv(BANK, 24 * SEEDS, split="test", seed=0)


def test_settled_labels_follow_the_vote() -> None:
    # Two chains, majority vote (ties go to the first answer): after the first chain the vote
    # can only change if that chain gave no answer and the second gives one.
    env = BatchedReplayEnv(BANK, 64, split="train", seed=0, max_chains=2, aggregate="majority")
    rows = settled_rows(env, 200, seed=1)
    assert rows.episodes == 200 and len(rows.settled) == len(rows.obs) > 0
    n = rows.obs[:, FEATURE_NAMES.index("n_chains")] * env.config.max_chains
    np.testing.assert_allclose(n, 1.0)  # every row is a state after the first chain
    answered = rows.obs[:, FEATURE_NAMES.index("answered")] > 0.5
    assert rows.settled[answered].all()
    # the rows are the states where another chain could be drawn, after a chain ended
    assert (rows.obs[:, FEATURE_NAMES.index("cur_ended")] > 0.5).all()
    assert available(rows.obs)[:, BRANCH].all()
    assert 0 < rows.chain_tokens < env.config.max_chain_tokens + 1


def test_sixteen_chain_labels_are_mixed_and_more_settled_with_more_chains() -> None:
    env = BatchedReplayEnv(BANK, 128, split="train", seed=0)
    rows = settled_rows(env, 300, seed=0)
    assert 0.3 < rows.settled.mean() < 1.0
    n = np.round(rows.obs[:, FEATURE_NAMES.index("n_chains")] * env.config.max_chains)
    early, late = rows.settled[n <= 3].mean(), rows.settled[n >= 12].mean()
    assert late > early, (early, late)


def test_it_reads_every_chain_to_its_end_and_picks_only_available_actions(
    stop_policy: StopPolicy, test_env: BatchedReplayEnv
) -> None:
    for lam in (1e-5, 1e-3):
        p = stop_policy.with_lam(lam)
        obs, _ = test_env.reset(seed=0)
        p.reset(test_env.num_envs, config=test_env.config)
        for _ in range(60):
            a = p.act(obs)
            ok = available(obs)[np.arange(len(a)), a]
            assert ok.all()
            running = (obs[:, FEATURE_NAMES.index("cur_ended")] < 0.5) & available(obs)[:, 0]
            assert (a[running] == CONTINUE).all()
            assert set(np.unique(a[~running])) <= {BRANCH, STOP}
            obs, *_ = test_env.step(a)


def test_a_higher_price_spends_fewer_tokens(
    stop_policy: StopPolicy, test_env: BatchedReplayEnv
) -> None:
    runs = [rollout_pinned(stop_policy.with_lam(lam), test_env) for lam in (1e-6, 1e-4, 3e-3)]
    tokens = [r["tokens"] for r in runs]
    assert all(b <= a for a, b in itertools.pairwise(tokens)), tokens
    bo16 = rollout_pinned(BestOfN(16), test_env)
    # at a tiny price it keeps nearly all of the vote, at a high one it stops early
    assert runs[0]["accuracy"] >= bo16["accuracy"] - 0.05, (runs[0], bo16)
    assert tokens[-1] < 0.5 * bo16["tokens"], (tokens, bo16)


def test_its_value_is_the_chance_of_a_change_less_the_price(stop_policy: StopPolicy) -> None:
    env = BatchedReplayEnv(BANK, 64, split="train", seed=0)
    rows = settled_rows(env, 64, seed=2)
    p = stop_policy.with_lam(1e-4)
    want = (1 - p.p_settled(rows.obs)) - 1e-4 * p.chain_tokens
    np.testing.assert_allclose(p.value(rows.obs), want)
    p.reset(len(rows.obs), config=env.config)
    np.testing.assert_array_equal(p.act(rows.obs), np.where(want > 0, BRANCH, STOP))


def test_save_load_round_trip(
    stop_policy: StopPolicy, test_env: BatchedReplayEnv, tmp_path: Path
) -> None:
    stop_policy.save(tmp_path / "p")
    q = load_policy(tmp_path / "p")
    assert isinstance(q, StopPolicy) and q.name == "stop-chain"
    header = json.loads((tmp_path / "p" / "policy.json").read_text())
    assert header["kind"] == "stop" and header["training"]["algo"] == "settled-logistic"
    assert 0.5 < header["metrics"]["train/settled_auroc_heldout"] <= 1.0
    for lam in (1e-5, 1e-3):
        assert rollout_pinned(q.with_lam(lam), test_env) == rollout_pinned(
            stop_policy.with_lam(lam), test_env
        )


def test_bad_input_is_refused(stop_policy: StopPolicy, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only between chains"):
        train_stop_policy(BANK, decide="chunk", progress=False)
    with pytest.raises(ConfigError, match="c must be > 0"):
        train_stop_policy(BANK, c=0.0, progress=False)
    with pytest.raises(ConfigError, match="orders and max_episodes must be >= 1"):
        train_stop_policy(BANK, orders=0, progress=False)
    with pytest.raises(PolicyError, match="weights"):
        StopPolicy(np.zeros(3), np.ones(3), np.zeros(3), 0.0, chain_tokens=10.0)
    # a saved file whose weights were cut short is named and refused
    stop_policy.save(tmp_path / "p")
    from safetensors.numpy import load_file, save_file

    w = load_file(tmp_path / "p" / "weights.safetensors")
    w["stop.coef"] = w["stop.coef"][:5]
    save_file(w, tmp_path / "p" / "weights.safetensors")
    with pytest.raises(PolicyError, match="weights"):
        load_policy(tmp_path / "p")


def test_a_large_bank_gets_fewer_orders_per_question() -> None:
    p = train_stop_policy(BANK, orders=16, max_episodes=100, eval_seeds=0, progress=False)
    assert p.meta["metrics"]["train/episodes"] == 100  # not 16 x 24 questions


def test_cli_trains_and_saves(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "stop"
    cmd = [sys.executable, "-m", "policies.learned", "stop", "--bank", str(BANK), "--out"]
    cmd += [str(out), "--no-progress", "--seed", "1", "--orders", "4", "--eval-seeds", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    header = json.loads((out / "policy.json").read_text())
    assert header["kind"] == "stop" and header["training"]["seed"] == 1
    assert any(k.startswith("eval/accuracy@") for k in header["metrics"])


def test_the_controller_serves_it_reading_each_chain_ahead(stop_policy: StopPolicy) -> None:
    """It runs every chain to its end, so the controller asks for each chain's rest at once."""
    from controller.controller import Controller
    from env.episode.config import EnvConfig
    from env.generators.fake import FakeGenerator

    assert stop_policy.finishes_chains and stop_policy.with_lam(1e-3).finishes_chains
    cfg = EnvConfig(chunk_tokens=16, max_chain_tokens=96, max_chains=4, probe=False)
    # a price of 1 per token outweighs any chance of a change: it stops after the first chain
    for lam, most in ((1.0, 1), (1e-7, 4)):
        gen = FakeGenerator()
        r = Controller(gen, stop_policy.with_lam(lam), config=cfg).solve("Let a = 3. What is a?")
        sampled = [q.max_tokens for q in gen.fake.requests if q.temperature > 0]
        assert sampled and max(sampled) == cfg.max_chain_tokens
        assert 1 <= r.n_chains <= most
