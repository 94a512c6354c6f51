"""Heuristic decision rules, pinned on hand-made observations, and run on the real env."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from env.episode.config import EnvConfig
from env.episode.observation import CONF_SCALE, FEATURE_NAMES, N_FEATURES, STREAK_SCALE
from env.episode.single import ComputeAllocationEnv
from features.errors import ConfigError, PolicyError
from features.votes import beta_leader_probability
from policies import (
    BRANCH,
    CONTINUE,
    STOP,
    VERIFY,
    AdaptiveConsistency,
    BestOfN,
    BoundedThinking,
    BudgetForcing,
    DeepConfOnline,
    DifficultyRouter,
    ProbeAgreement,
    RandomPolicy,
    SingleChain,
)
from policies.base import BasePolicy

BANK = Path(__file__).resolve().parents[2] / "data" / "banks" / "testbed-arith"
CFG = EnvConfig(max_chains=16, max_chain_tokens=512, token_cap=16384)


def obs(**f: float) -> np.ndarray:
    """An observation with every feature 0 except the ones given (can_* default to 1)."""
    x = np.zeros(N_FEATURES, dtype=np.float32)
    defaults = {"can_continue": 1.0, "can_branch": 1.0, "can_verify": 1.0, "n_chains": 1 / 16}
    for k, v in {**defaults, **f}.items():
        x[FEATURE_NAMES.index(k)] = v
    return x


def act(p: BasePolicy, **f: float) -> int:
    p.reset(1, config=CFG)
    return int(p.act(obs(**f)))


def chains(n: int) -> float:
    return n / 16


# -- pinned rules ------------------------------------------------------------------------------


def test_single_chain() -> None:
    p = SingleChain()
    assert act(p) == CONTINUE
    assert act(p, cur_ended=1) == STOP
    assert act(p, can_continue=0) == STOP


def test_best_of_n() -> None:
    p = BestOfN(3)
    assert act(p) == CONTINUE  # finish the current chain first
    assert act(p, cur_ended=1, n_chains=chains(2)) == BRANCH
    assert act(p, cur_ended=1, n_chains=chains(3)) == STOP
    assert act(p, cur_ended=1, n_chains=chains(2), can_branch=0) == STOP
    v = BestOfN(3, "verifier")
    assert v.aggregate == "verifier"
    assert act(v, cur_ended=1, n_chains=chains(3)) == VERIFY
    assert act(v, cur_ended=1, n_chains=chains(3), can_verify=0) == STOP
    with pytest.raises(ConfigError):
        BestOfN(0)


def test_budget_forcing_goes_past_the_end_until_the_budget() -> None:
    p = BudgetForcing(256)
    assert act(p, cur_tokens=128 / 512, cur_ended=1) == CONTINUE  # "Wait," extension
    assert act(p, cur_tokens=256 / 512) == STOP
    assert act(p, cur_tokens=100 / 512, can_continue=0) == STOP


@pytest.mark.parametrize(
    ("v1", "v2", "expected"),
    [
        (4, 0, STOP),  # P = 1 - 0.5**5 = 0.969 >= 0.95
        (3, 0, BRANCH),  # P = 1 - 0.5**4 = 0.9375 < 0.95
        (5, 1, BRANCH),  # P = 0.9375 (Beta(6, 2) mass above 1/2)
        (7, 1, STOP),  # P = 0.980
    ],
)
def test_adaptive_consistency_beta_rule(v1: int, v2: int, expected: int) -> None:
    p = AdaptiveConsistency(threshold=0.95)
    beta = beta_leader_probability(v1, v2)
    assert act(p, cur_ended=1, n_chains=chains(v1 + v2), beta_leader=beta) == expected


def test_adaptive_consistency_stop_points_on_a_vote_sequence() -> None:
    """The stop point for a given vote sequence: A A B A A A A -> stops after the 7th chain."""
    p = AdaptiveConsistency(threshold=0.95)
    votes = ["A", "A", "B", "A", "A", "A", "A", "A"]
    stop_at = None
    for n in range(1, len(votes) + 1):
        seen = votes[:n]
        v1, v2 = seen.count("A"), seen.count("B")
        a = act(p, cur_ended=1, n_chains=chains(n), beta_leader=beta_leader_probability(v1, v2))
        if a == STOP:
            stop_at = n
            break
        assert a == BRANCH
    assert stop_at == 7  # Beta(7, 2): P(p > 1/2) = 0.9648; after 6 it is Beta(6, 2): 0.9375


def test_probe_agreement() -> None:
    p = ProbeAgreement(k=3)
    assert act(p, cur_has_answer=1, cur_probe_streak=2 / STREAK_SCALE) == CONTINUE
    assert act(p, cur_has_answer=1, cur_probe_streak=3 / STREAK_SCALE) == STOP
    assert act(p, cur_has_answer=0, cur_probe_streak=3 / STREAK_SCALE) == CONTINUE
    assert act(p, cur_ended=1) == STOP


def test_deepconf_online_threshold_and_cut() -> None:
    p = DeepConfOnline(n_init=2, keep_percent=50, consensus=0.9)
    p.reset(1, config=CFG)
    c = CONF_SCALE
    # warm-up chain 1 ends with lowest group confidence 8, chain 2 with 12
    assert p.act(obs(n_chains=chains(1), cur_ended=1, cur_conf_min=8 / c)) == BRANCH
    assert (
        p.act(obs(n_chains=chains(2), cur_ended=1, cur_conf_min=12 / c, conf_vote_share=0.5))
        == BRANCH
    )
    assert p.threshold[0] == pytest.approx(10.0)  # the 50th percentile of {8, 12}
    # chain 3 runs while above 10, is cut below it
    assert p.act(obs(n_chains=chains(3), cur_conf_min=11 / c, conf_vote_share=0.6)) == CONTINUE
    assert p.act(obs(n_chains=chains(3), cur_conf_min=9 / c, conf_vote_share=0.6)) == BRANCH
    # consensus reached on a cut or ended chain -> stop
    assert p.act(obs(n_chains=chains(4), cur_ended=1, conf_vote_share=0.95)) == STOP
    p.end(np.array([True]))
    assert np.isnan(p.threshold[0]) and p.seen[0] == 0


def test_difficulty_router_routes_once() -> None:
    p = DifficultyRouter(easy=0.3, hard=0.7, n_medium=2)
    p.reset(3, config=CFG)
    batch = np.stack(
        [
            obs(difficulty=0.1, cur_ended=1),
            obs(difficulty=0.5, cur_ended=1),
            obs(difficulty=0.9, cur_ended=1),
        ]
    )
    assert p.act(batch).tolist() == [STOP, BRANCH, CONTINUE]
    assert p.mode.tolist() == [0, 1, 2]
    # the mode is fixed for the episode even if the feature moves
    batch2 = np.stack(
        [
            obs(difficulty=0.9),
            obs(difficulty=0.1, n_chains=chains(2), cur_ended=1),
            obs(difficulty=0.1, can_continue=0),
        ]
    )
    assert p.act(batch2).tolist() == [CONTINUE, VERIFY, STOP]
    p.end(np.array([True, False, False]))
    assert p.mode.tolist() == [-1, 1, 2]


def test_bounded_thinking_doubles_until_settled() -> None:
    p = BoundedThinking(start=64, max_budget=256, confidence=10.0)
    p.reset(1, config=CFG)
    t = 512
    assert p.act(obs(cur_tokens=32 / t)) == CONTINUE
    # at 64 tokens, not settled -> budget 128, keep going
    assert p.act(obs(cur_tokens=64 / t, cur_probe_stability=0.5)) == CONTINUE
    assert p.budget[0] == 128
    # at 128, settled -> stop
    assert (
        p.act(obs(cur_tokens=128 / t, cur_probe_stability=1.0, cur_conf_last=12 / CONF_SCALE))
        == STOP
    )
    p.end(np.array([True]))
    assert p.budget[0] == 64


def test_random_policy_only_picks_available_actions() -> None:
    p = RandomPolicy(seed=0, p_stop=0.0)
    p.reset(500, config=CFG)
    x = np.tile(obs(can_continue=0, can_verify=0), (500, 1))
    assert set(p.act(x).tolist()) == {BRANCH}
    x = np.tile(obs(can_continue=0, can_branch=0, can_verify=0), (500, 1))
    assert set(p.act(x).tolist()) == {STOP}


def test_bad_observations_are_refused() -> None:
    p = SingleChain()
    with pytest.raises(PolicyError, match="shape"):
        p.act(np.zeros(5))
    bad = obs()
    bad[0] = np.nan
    with pytest.raises(PolicyError, match="NaN"):
        p.act(bad)
    p.reset(4, config=CFG)
    with pytest.raises(PolicyError, match="reset"):
        p.act(np.zeros((3, N_FEATURES), np.float32))


# -- on the real env ---------------------------------------------------------------------------


def run(e: ComputeAllocationEnv, p: Any, seed: int) -> dict[str, Any]:
    p.reset(1, config=e.config)
    o, info = e.reset(seed=seed)
    while True:
        o, r, term, trunc, info = e.step(p.act(o))
        if term or trunc:
            assert term, info.get("reason")  # a heuristic never takes an unavailable action
            return info


@pytest.mark.parametrize(
    "policy",
    [
        SingleChain(),
        BestOfN(4),
        BestOfN(4, "verifier"),
        BudgetForcing(128),
        AdaptiveConsistency(),
        ProbeAgreement(2),
        DeepConfOnline(n_init=2),
        DifficultyRouter(),
        BoundedThinking(start=32, max_budget=128),
    ],
    ids=lambda p: p.name,
)
def test_heuristics_run_episodes_on_the_bank(policy: BasePolicy) -> None:
    e = ComputeAllocationEnv.from_bank(BANK, aggregate=policy.aggregate, difficulty="auto")  # type: ignore[arg-type]
    for seed in range(6):
        info = run(e, policy, seed)
        assert info["decoded"] > 0


def test_best_of_n_uses_n_chains_on_the_bank() -> None:
    e = ComputeAllocationEnv.from_bank(BANK)
    info = run(e, BestOfN(5), 0)
    assert info["chains"] == 5
    info = run(e, SingleChain(), 0)
    assert info["chains"] == 1
