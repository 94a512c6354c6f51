"""Learned policies: the value / fitted-Q policy and PPO, their training, file format and loading.

Short trainings on the testbed bank (seconds each, one CPU thread); what they reach is measured on
the test split with pinned episodes (every policy sees the same questions and chain orders).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from env.episode.observation import FEATURE_NAMES, N_FEATURES
from env.episode.vector import BatchedReplayEnv
from features.errors import PolicyError
from policies.heuristics import BestOfN, RandomPolicy, SingleChain
from policies.learned import (
    LearnedPolicy,
    PPOPolicy,
    ValuePolicy,
    load_policy,
    rollout_pinned,
    train_ppo,
    train_value_policy,
)
from policies.learned.base import EXTRA_FEATURES, available, decision_mask
from policies.serialize import NumpyMLP

BANK = Path(__file__).resolve().parents[3] / "data" / "banks" / "testbed-arith"
ROOT = Path(__file__).resolve().parents[3]
#: Episodes per test question (generator seeds 0..SEEDS-1).
SEEDS = 8
MID_LAM = 1e-4

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def value_policy() -> ValuePolicy:
    return train_value_policy(
        BANK,
        transitions=20_000,
        fqi_iters=3,
        rounds=2,
        epochs=15,
        epochs_per_iter=6,
        stop_epochs=15,
        num_envs=256,
        eval_seeds=0,
        progress=False,
    )


@pytest.fixture(scope="module")
def ppo_policy() -> PPOPolicy:
    return train_ppo(
        BANK, total_steps=250_000, num_envs=256, num_steps=32, eval_seeds=0, progress=False
    )


@pytest.fixture(scope="module")
def test_env() -> BatchedReplayEnv:
    return BatchedReplayEnv(BANK, 24 * SEEDS, split="test", seed=0)


@pytest.fixture(scope="module")
def train_env() -> BatchedReplayEnv:
    return BatchedReplayEnv(BANK, 24 * SEEDS, split="train", seed=0)


@pytest.fixture(scope="module")
def observations(train_env: BatchedReplayEnv) -> np.ndarray:
    """Real observations (a random policy's episodes) and random points of the feature cube."""
    rng = np.random.default_rng(0)
    p = RandomPolicy(1, p_stop=0.05)
    obs, _ = train_env.reset(seed=3)
    p.reset(train_env.num_envs, config=train_env.config)
    seen = [obs]
    for _ in range(20):
        obs, *_ = train_env.step(p.act(obs))
        seen.append(obs)
    cube = rng.random((256, N_FEATURES)).astype(np.float32)
    flags = [FEATURE_NAMES.index(n) for n in ("can_continue", "can_branch", "can_verify")]
    cube[:, flags] = np.round(cube[:, flags])
    return np.concatenate([*seen, cube])


def _tiny_value_policy(seed: int = 0) -> ValuePolicy:
    """An untrained value policy with random weights (for format tests)."""
    rng = np.random.default_rng(seed)
    n_x = N_FEATURES + len(EXTRA_FEATURES)

    def mlp(n_in: int, n_out: int) -> NumpyMLP:
        return NumpyMLP(
            [rng.normal(size=(n_in, 8)), rng.normal(size=(8, n_out))],
            [rng.normal(size=8), rng.normal(size=n_out)],
            "relu",
            rng.normal(size=n_in),
            rng.random(n_in) + 0.5,
        )

    return ValuePolicy(
        mlp(n_x, 1), np.array([0.0, 0.5, 1.0]), np.array([0.1, 0.4, 0.9]), mlp(n_x + 5, 2)
    )


def _metrics(policy: Any, env: BatchedReplayEnv, lam: float) -> dict[str, float]:
    if isinstance(policy, LearnedPolicy):
        policy = policy.with_lam(lam)
    return rollout_pinned(policy, env, lam=lam)


# -- format -----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["value", "ppo"])
def test_save_load_round_trip_gives_identical_actions(
    which: str,
    value_policy: ValuePolicy,
    ppo_policy: PPOPolicy,
    observations: np.ndarray,
    tmp_path: Path,
) -> None:
    policy: LearnedPolicy = value_policy if which == "value" else ppo_policy
    for lam in (None, 3e-5, 1e-3):
        p = policy.with_lam(lam)
        p.save(tmp_path / str(lam))
        q = load_policy(tmp_path / str(lam))
        assert type(q) is type(p)
        assert q.lam == p.lam and q.lam_range == p.lam_range and q.name == p.name
        p.reset(len(observations))
        q.reset(len(observations))
        np.testing.assert_array_equal(q.act(observations), p.act(observations))
        np.testing.assert_array_equal(q.value(observations), p.value(observations))
    header = json.loads((tmp_path / "None" / "policy.json").read_text())
    assert header["features"] == list(FEATURE_NAMES)
    assert header["kind"] == which and header["version"] == 1
    assert header["bank"]["model_sha256"] and header["bank"]["path"].endswith("testbed-arith")
    assert header["lams"] == sorted(header["lams"]) and len(header["lams"]) >= 3
    assert header["training"]["split"] == "train"
    assert "train/wall_s" in header["metrics"]


def test_saved_files_are_json_and_safetensors(tmp_path: Path) -> None:
    p = _tiny_value_policy()
    p.save(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["policy.json", "weights.safetensors"]
    from safetensors.numpy import load_file

    arrays = load_file(str(tmp_path / "weights.safetensors"))
    assert {"stop.w0", "gain.w0", "iso.x"} <= set(arrays)


def _edit(folder: Path, change: Any) -> None:
    path = folder / "policy.json"
    header = json.loads(path.read_text())
    change(header)
    path.write_text(json.dumps(header))


def test_a_file_of_another_feature_schema_is_refused(tmp_path: Path) -> None:
    _tiny_value_policy().save(tmp_path)
    _edit(tmp_path, lambda h: h.update(features=h["features"][:-1]))
    with pytest.raises(PolicyError, match="trained on another observation") as e:
        load_policy(tmp_path)
    assert FEATURE_NAMES[-1] in str(e.value) and "retrain" in str(e.value)
    _edit(tmp_path, lambda h: h.update(features=[*FEATURE_NAMES[1:], FEATURE_NAMES[0]]))
    with pytest.raises(PolicyError, match="another order"):
        load_policy(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h.update(kind="dqn"), "unknown policy kind 'dqn'"),
        (lambda h: h.update(version=99), "version 99 is not supported"),
        (lambda h: h.pop("format"), "not a ponder policy file"),
        (lambda h: h["weights"].update(file="../elsewhere.safetensors"), "not a plain"),
        (lambda h: h["weights"].update(sha256="0" * 64), "does not match the sha256"),
        (lambda h: h["params"].update(lam_range="x"), "damaged"),
    ],
)
def test_files_that_are_not_ponders_format_are_refused(
    tmp_path: Path, change: Any, message: str
) -> None:
    _tiny_value_policy().save(tmp_path)
    _edit(tmp_path, change)
    with pytest.raises(PolicyError, match=message):
        load_policy(tmp_path)


def test_garbled_json_pickles_and_missing_files_are_refused(tmp_path: Path) -> None:
    _tiny_value_policy().save(tmp_path / "p")
    (tmp_path / "p" / "policy.json").write_text('{"format": "ponder-policy", "kind": ')
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_policy(tmp_path / "p")
    pkl = tmp_path / "pickled"
    pkl.mkdir()
    (pkl / "model.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(PolicyError, match="pickle-based files are never loaded"):
        load_policy(pkl)
    with pytest.raises(PolicyError, match="never loads pickle"):
        load_policy(pkl / "model.pkl")
    with pytest.raises(PolicyError, match="no policy folder"):
        load_policy(tmp_path / "missing")
    _tiny_value_policy().save(tmp_path / "q")
    (tmp_path / "q" / "weights.safetensors").unlink()
    with pytest.raises(PolicyError, match="is missing"):
        load_policy(tmp_path / "q")


def test_weights_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    p = _tiny_value_policy()
    p.save(tmp_path)
    from safetensors.numpy import load_file, save_file

    from env.models.prepare import sha256_file

    w = tmp_path / "weights.safetensors"
    arrays = load_file(str(w))
    arrays["gain.w1"] = arrays["gain.w1"][:, :1].copy()
    arrays["gain.b1"] = arrays["gain.b1"][:1].copy()
    save_file(arrays, str(w))
    _edit(tmp_path, lambda h: h["weights"].update(sha256=sha256_file(w)))
    with pytest.raises(PolicyError, match="gain network maps"):
        load_policy(tmp_path)


def test_controller_loads_a_policy_folder(tmp_path: Path) -> None:
    from policies.registry import load_policy as spec_load

    p = _tiny_value_policy()
    p.with_lam(1e-3).save(tmp_path / "value")
    for spec in (str(tmp_path / "value"), str(tmp_path / "value" / "policy.json")):
        q = spec_load(spec)
        assert isinstance(q, ValuePolicy) and q.lam == 1e-3
    with pytest.raises(PolicyError, match="never loads pickle"):
        spec_load(str(tmp_path / "value" / "policy.pkl"))
    (tmp_path / "value" / "policy.json").write_text("{}")
    with pytest.raises(PolicyError, match="not a ponder policy file"):
        spec_load(str(tmp_path / "value"))


# -- behaviour ------------------------------------------------------------------------------


def test_with_lam_clones_share_weights_and_follow_the_env_price(value_policy: ValuePolicy) -> None:
    hi = value_policy.with_lam(1e-2)
    assert hi.stop_net is value_policy.stop_net and hi.gain_net is value_policy.gain_net
    assert value_policy.lam is None and hi.lam == 1e-2 and hi.name == "value-lam0.01"
    obs = np.zeros((3, N_FEATURES), np.float32)
    obs[:, FEATURE_NAMES.index("can_continue")] = 1
    from env.episode.config import EnvConfig

    follow = value_policy.clone()
    follow.reset(3, config=EnvConfig(lam=1e-2))
    np.testing.assert_array_equal(follow.gains(obs), hi.gains(obs))
    assert follow.value(obs).shape == (3,) and np.isfinite(follow.value(obs)).all()


@pytest.mark.parametrize("which", ["value", "ppo"])
def test_higher_lam_spends_fewer_tokens(
    which: str,
    value_policy: ValuePolicy,
    ppo_policy: PPOPolicy,
    train_env: BatchedReplayEnv,
) -> None:
    policy: LearnedPolicy = value_policy if which == "value" else ppo_policy
    tokens = [_metrics(policy, train_env, lam)["tokens"] for lam in (1e-5, 1e-4, 1e-3, 1e-2)]
    assert all(b <= a * 1.05 for a, b in itertools.pairwise(tokens)), tokens
    assert tokens[-1] < tokens[0] / 2, tokens


@pytest.mark.parametrize("which", ["value", "ppo"])
def test_short_training_beats_random(
    which: str,
    value_policy: ValuePolicy,
    ppo_policy: PPOPolicy,
    test_env: BatchedReplayEnv,
) -> None:
    policy: LearnedPolicy = value_policy if which == "value" else ppo_policy
    for lam in (MID_LAM, 1e-3):
        learned = _metrics(policy, test_env, lam)
        random = _metrics(RandomPolicy(0), test_env, lam)
        assert learned["reward"] > random["reward"], (lam, learned, random)


def test_value_policy_spends_less_than_best_of_16(
    value_policy: ValuePolicy, test_env: BatchedReplayEnv
) -> None:
    # What a short training reaches at a middle price: above random accuracy, well under the
    # tokens of best-of-16 (and, at a higher price, about SingleChain's tokens).
    mid = _metrics(value_policy, test_env, MID_LAM)
    bo16 = _metrics(BestOfN(16), test_env, MID_LAM)
    random = _metrics(RandomPolicy(0), test_env, MID_LAM)
    assert mid["tokens"] < 0.75 * bo16["tokens"], (mid, bo16)
    assert mid["accuracy"] > random["accuracy"], (mid, random)


@pytest.mark.slow
def test_value_policy_at_a_middle_lam_matches_single_chain_with_fewer_tokens_than_best_of_16() -> (
    None
):
    # On the larger testbed bank (160 train / 160 test questions): trained on the small one's 24
    # questions, the policy's test accuracy moves by more than the gap this test is about.
    xl = BANK.parent / "testbed-arith-xl"
    test_env = BatchedReplayEnv(xl, 160 * 4, split="test", seed=0)
    policy = train_value_policy(xl, transitions=100_000, fqi_iters=6, progress=False)
    mid = _metrics(policy, test_env, MID_LAM)
    single = _metrics(SingleChain(), test_env, MID_LAM)
    bo16 = _metrics(BestOfN(16), test_env, MID_LAM)
    assert mid["accuracy"] >= single["accuracy"], (mid, single)
    assert mid["tokens"] < bo16["tokens"], (mid, bo16)


def test_policies_only_pick_available_actions(
    value_policy: ValuePolicy, ppo_policy: PPOPolicy, observations: np.ndarray
) -> None:
    ok = available(observations)
    for p in (value_policy, ppo_policy, ppo_policy.with_lam(1e-4)):
        p.reset(len(observations))
        a = p.act(observations)
        assert ok[np.arange(len(a)), a].all()
    sampler = PPOPolicy(
        ppo_policy.actor, ppo_policy.critic, deterministic=False, lam_range=ppo_policy.lam_range
    )
    sampler.reset(len(observations))
    a = sampler.act(observations)
    assert ok[np.arange(len(a)), a].all()
    assert ppo_policy.probs(observations)[~ok].max() < 1e-6


def test_chain_deciding_ppo_reads_every_chain_to_its_end(
    ppo_policy: PPOPolicy, observations: np.ndarray, tmp_path: Path
) -> None:
    """``decide="chain"``: while the current chain runs and can go on, continue is the only
    choice, in training and in acting; elsewhere the policy picks among the available actions.
    The setting survives save / load; an unknown one is refused."""
    from features.errors import ConfigError

    ok = available(observations)
    running = (observations[:, FEATURE_NAMES.index("cur_ended")] < 0.5) & ok[:, 0]
    assert running.any() and (~running).any()
    m = decision_mask(observations, "chain")
    assert (m[running] == [True, False, False, False]).all()
    np.testing.assert_array_equal(m[~running], ok[~running])
    np.testing.assert_array_equal(decision_mask(observations, "chunk"), ok)
    with pytest.raises(ConfigError, match="decide must be one of chunk, chain"):
        decision_mask(observations, "step")

    trained = train_ppo(
        BANK, total_steps=4_096, num_envs=64, eval_seeds=0, progress=False, decide="chain"
    )
    assert trained.decide == "chain" and trained.meta["training"]["decide"] == "chain"
    assert (trained.name, trained.with_lam(1e-3).name) == ("ppo-chain", "ppo-chain-lam0.001")
    for p in (trained, trained.with_lam(1e-3)):
        p.reset(len(observations))
        a = p.act(observations)
        assert (a[running] == 0).all() and ok[np.arange(len(a)), a].all()
    trained.save(tmp_path / "chain")
    loaded = load_policy(tmp_path / "chain")
    assert isinstance(loaded, PPOPolicy) and loaded.decide == "chain"
    loaded.reset(len(observations))
    trained.reset(len(observations))
    np.testing.assert_array_equal(loaded.act(observations), trained.act(observations))
    # the chunk-deciding policy of the fixture does cut some running chains
    ppo_policy.reset(len(observations))
    assert (ppo_policy.act(observations)[running] != 0).any()
    with pytest.raises(ConfigError, match="decide must be one of"):
        PPOPolicy(ppo_policy.actor, ppo_policy.critic, decide="step")


def test_greedy_value_actions_pin_the_stopping_rule() -> None:
    """The value policy's rule on hand-made gains: the allowed action with the largest
    positive gain, else stop; where stop is not allowed (a running chain under
    ``decide="chain"``) continue is taken even at a loss."""
    from policies.learned.value import greedy_actions

    gains = np.array(
        [
            [0.02, 0.05, -0.01],  # branch gains most
            [-0.01, -0.02, -0.03],  # nothing pays: stop
            [0.04, 0.05, 0.0],  # branch would pay but is not allowed: continue
            [-0.2, 0.3, 0.0],  # forced: continue at a loss
            [0.0, 0.0, 0.0],  # a gain of exactly 0 does not pay
        ]
    )
    mask = np.array(
        [
            [True, True, True, True],
            [True, True, True, True],
            [True, False, True, True],
            [True, False, False, False],
            [True, True, False, True],
        ]
    )
    actions, best = greedy_actions(gains, mask)
    np.testing.assert_array_equal(actions, [1, 3, 0, 0, 3])
    np.testing.assert_allclose(best, [0.05, -0.01, 0.04, -0.2, 0.0])


def test_chain_deciding_value_policy_reads_every_chain_to_its_end(
    observations: np.ndarray, test_env: BatchedReplayEnv, tmp_path: Path
) -> None:
    """``decide="chain"`` for the value policy: a running chain is always continued (in acting
    and in the backups it is trained on), the setting is saved and loaded, and an unknown one is
    refused. Every episode it plays ends with its last chain finished or out of room, so it
    never answers from a probe of a chain it cut."""
    from features.errors import ConfigError

    ok = available(observations)
    running = (observations[:, FEATURE_NAMES.index("cur_ended")] < 0.5) & ok[:, 0]
    trained = train_value_policy(
        BANK,
        transitions=8_000,
        fqi_iters=2,
        rounds=2,
        num_envs=128,
        eval_seeds=0,
        progress=False,
        decide="chain",
    )
    assert trained.decide == "chain" and trained.meta["training"]["decide"] == "chain"
    assert (trained.name, trained.with_lam(1e-3).name) == ("value-chain", "value-chain-lam0.001")
    for lam in (1e-6, 1e-3, 1e-2):
        p = trained.with_lam(lam)
        p.reset(len(observations))
        a = p.act(observations)
        assert (a[running] == 0).all() and ok[np.arange(len(a)), a].all()
        q = p.q_values(observations)
        assert np.isneginf(q[running, 1:]).all()
    trained.save(tmp_path / "chain")
    loaded = load_policy(tmp_path / "chain")
    assert isinstance(loaded, ValuePolicy) and loaded.decide == "chain"
    loaded.reset(len(observations))
    trained.reset(len(observations))
    np.testing.assert_array_equal(loaded.act(observations), trained.act(observations))
    # played out on the test questions: no chain is ever cut while it could go on
    p = trained.with_lam(MID_LAM)
    obs, _ = test_env.reset(seed=0)
    p.reset(test_env.num_envs, config=test_env.config)
    done = np.zeros(test_env.num_envs, bool)
    ended = FEATURE_NAMES.index("cur_ended")
    for _ in range(test_env.config.steps_limit):
        a = p.act(obs)
        cut = ~done & (obs[:, ended] < 0.5) & (obs[:, FEATURE_NAMES.index("can_continue")] > 0.5)
        assert (a[cut] == 0).all()
        obs, _, term, trunc, _ = test_env.step(a)
        done |= term | trunc
        if done.all():
            break
    assert done.all()
    with pytest.raises(ConfigError, match="decide must be one of"):
        ValuePolicy(trained.stop_net, trained.iso_x, trained.iso_y, trained.gain_net, decide="step")
    with pytest.raises(ConfigError, match="decide must be one of"):
        train_value_policy(BANK, transitions=1_000, eval_seeds=0, progress=False, decide="x")


# -- command line ---------------------------------------------------------------------------


def test_cli_trains_tiny_runs(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = {
        "value": [
            "--transitions", "3000", "--fqi-iters", "1", "--rounds", "2", "--epochs", "2",
            "--stop-epochs", "2", "--num-envs", "64", "--eval-seeds", "1",
        ],
        "ppo": ["--total-steps", "4096", "--num-envs", "64", "--num-steps", "16", "--eval-seeds", "1"],
    }  # fmt: skip
    for kind, extra in runs.items():
        out = tmp_path / kind
        cmd = [sys.executable, "-m", "policies.learned", kind, "--bank", str(BANK)]
        cmd += ["--out", str(out), "--no-progress", "--seed", "1", *extra]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        header = json.loads((out / "policy.json").read_text())
        assert header["kind"] == kind and header["training"]["seed"] == 1
        assert any(k.startswith("eval/accuracy@") for k in header["metrics"])
        from policies.registry import load_policy as spec_load

        assert isinstance(spec_load(str(out)), LearnedPolicy)


def test_ponder_train_value_trains_and_saves(tmp_path: Path) -> None:
    """``ponder train value`` is the same entry as ``python -m policies.learned value``: its help
    shows the arguments' docstrings, and a tiny run trains, evaluates and saves a policy."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    ponder = [sys.executable, "-m", "controller.cli", "train"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*ponder, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )

    top = run("--help")
    assert top.returncode == 0, top.stderr
    assert "usage: ponder train" in top.stdout
    assert "Train a ValuePolicy" in top.stdout and "Train a PPOPolicy" in top.stdout
    for kind, doc in (("value", "fitted-Q iterations"), ("ppo", "GAE λ")):
        h = run(kind, "--help")
        assert h.returncode == 0, h.stderr
        assert f"usage: ponder train {kind}" in h.stdout
        assert doc in h.stdout and "trace bank folder to replay" in h.stdout
    out = tmp_path / "value"
    r = run(
        "value", "--bank", str(BANK), "--out", str(out), "--no-progress", "--seed", "2",
        "--transitions", "2000", "--fqi-iters", "1", "--rounds", "1", "--epochs", "2",
        "--stop-epochs", "2", "--num-envs", "64", "--eval-seeds", "1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    header = json.loads((out / "policy.json").read_text())
    assert header["kind"] == "value" and header["training"]["seed"] == 2
    assert header["training"]["algo"] == "fitted-q-iteration"
    assert any(k.startswith("eval/accuracy@") for k in header["metrics"])
    assert all(k.split("/")[0] in ("train", "eval") for k in header["metrics"])
    assert isinstance(load_policy(out), ValuePolicy)


def test_ppo_lam_sampling_draws_from_the_grid_or_its_log_range() -> None:
    """``lam_sampling``: grid draws are grid values; log-uniform ones cover the grid's range
    evenly in log λ (so the network also trains between grid values); a typo is refused."""
    from features.errors import ConfigError
    from policies.learned.ppo import lam_sampler

    lams = np.array([1e-6, 1e-4, 1e-2])
    grid = lam_sampler("grid", lams, np.random.default_rng(0))(5_000)
    assert set(np.unique(grid)) == set(lams)
    z = np.log10(lam_sampler("log-uniform", lams, np.random.default_rng(0))(20_000))
    assert z.min() >= -6 and z.max() <= -2
    counts, _ = np.histogram(z, bins=4, range=(-6, -2))
    assert counts.min() > 0.9 * 5_000 and counts.max() < 1.1 * 5_000
    assert not np.isin(10.0**z, lams).any()
    with pytest.raises(ConfigError, match="lam_sampling must be grid or log-uniform"):
        lam_sampler("uniform", lams, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="lam_sampling must be grid or log-uniform"):
        train_ppo(BANK, total_steps=64, num_envs=8, eval_seeds=0, progress=False, lam_sampling="x")
    trained = train_ppo(
        BANK, total_steps=1_024, num_envs=32, eval_seeds=0, progress=False,
        lam_sampling="log-uniform",
    )  # fmt: skip
    assert trained.meta["training"]["lam_sampling"] == "log-uniform"


def test_a_policy_trained_without_probes_runs_without_them(tmp_path: Path) -> None:
    """``uses_probes`` of a learned policy is the ``probe`` setting of the replay it trained on:
    one trained without probes keeps that through ``with_lam`` and save/load, and the evaluator
    then runs (and charges) no probes for it; one trained with probes gets them."""
    from policies.evaluation.runner import Evaluator

    kw: dict[str, Any] = {"total_steps": 1_024, "num_envs": 32, "eval_seeds": 0, "progress": False}
    bare = train_ppo(BANK, decide="chain", config={"probe": False}, **kw)
    probed = train_ppo(BANK, decide="chain", **kw)
    assert bare.meta["env"]["probe"] is False and probed.meta["env"]["probe"] is True
    assert bare.uses_probes is False and bare.with_lam(1e-3).uses_probes is False
    assert probed.uses_probes is True and probed.with_lam(1e-3).uses_probes is True
    bare.save(tmp_path / "bare")
    assert load_policy(tmp_path / "bare").uses_probes is False
    ev = Evaluator(BANK, split="test", seeds=1, difficulty=None)
    assert ev(bare.with_lam(1e-3)).config.probe is False
    assert ev(probed.with_lam(1e-3)).config.probe is True


def test_chain_deciding_policies_finish_chains_and_are_served_read_ahead(tmp_path: Path) -> None:
    """A learned policy deciding between chains runs every chain to its end (``finishes_chains``,
    kept through ``with_lam`` and save/load); the controller then asks the engine for each chain's
    rest in one request. One deciding at every chunk may cut a chain, so it is served by chunks."""
    from controller.controller import Controller
    from env.episode.config import EnvConfig
    from env.generators.fake import FakeGenerator

    kw: dict[str, Any] = {"total_steps": 1_024, "num_envs": 32, "eval_seeds": 0, "progress": False}
    chain = train_ppo(BANK, decide="chain", config={"probe": False}, **kw)
    chunk = train_ppo(BANK, **kw)
    chain.save(tmp_path / "chain")
    assert chain.finishes_chains and chain.with_lam(1e-3).finishes_chains
    assert load_policy(tmp_path / "chain").finishes_chains
    assert not chunk.finishes_chains and not chunk.with_lam(1e-3).finishes_chains
    cfg = EnvConfig(chunk_tokens=16, max_chain_tokens=96, max_chains=4, probe_tokens=8)
    for policy, whole in ((chain, True), (chunk, False)):
        gen = FakeGenerator()
        r = Controller(gen, policy.with_lam(1e-4), config=cfg).solve("Let a = 3. What is a?")
        sampled = [q.max_tokens for q in gen.fake.requests if q.temperature > 0]
        assert r.n_chains >= 1 and sampled
        assert (max(sampled) == cfg.max_chain_tokens) is whole, policy.name
