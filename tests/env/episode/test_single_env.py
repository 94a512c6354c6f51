"""ComputeAllocationEnv: the Gymnasium contract, determinism, caps, rewards and errors."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import env  # noqa: F401  (registers the ids)
from env.episode.config import Action, EnvConfig, Prices, decode_tokens
from env.episode.observation import FEATURE_NAMES, N_FEATURES
from env.episode.single import ComputeAllocationEnv
from env.generators.fake import FakeGenerator
from env.types import Question, SamplingConfig
from features.answers import answers_equal
from features.errors import ConfigError, PolicyError

ROOT = Path(__file__).resolve().parents[3]
BANK = ROOT / "data" / "banks" / "testbed-arith"


@pytest.fixture(scope="module")
def replay_env() -> ComputeAllocationEnv:
    return ComputeAllocationEnv.from_bank(BANK, split="train")


def rollout(e: gym.Env, seed: int, actions: list[int]) -> list[tuple[Any, ...]]:
    obs, info = e.reset(seed=seed)
    out: list[tuple[Any, ...]] = [(obs.copy(), 0.0, False, False, info["qid"])]
    for a in actions:
        obs, r, term, trunc, info = e.step(a)
        out.append((obs.copy(), r, term, trunc, info["qid"]))
        if term or trunc:
            break
    return out


def random_episode(
    e: ComputeAllocationEnv, seed: int, rng: np.random.Generator, masked: float = 0.9
) -> tuple[float, dict[str, Any], int]:
    obs, info = e.reset(seed=seed)
    total, steps = 0.0, 0
    while True:
        mask = info["action_mask"]
        a = int(rng.choice(np.flatnonzero(mask))) if rng.random() < masked else int(rng.integers(4))
        obs, r, term, trunc, info = e.step(a)
        total += r
        steps += 1
        assert obs.shape == (N_FEATURES,) and obs.dtype == np.float32
        assert np.isfinite(obs).all() and (obs >= 0).all() and (obs <= 1).all()
        assert info["decoded"] <= e.config.token_cap
        if term or trunc:
            return total, info, steps


# -- Gymnasium contract ----------------------------------------------------------------------


def test_check_env_replay(replay_env: ComputeAllocationEnv) -> None:
    check_env(replay_env, skip_render_check=True)


def test_spaces_and_feature_table(replay_env: ComputeAllocationEnv) -> None:
    assert replay_env.action_space == gym.spaces.Discrete(4)
    assert replay_env.observation_space.shape == (N_FEATURES,)
    doc = ComputeAllocationEnv.__doc__ or ""
    for name in FEATURE_NAMES:  # every feature is documented in the class docstring
        assert f"| {name} |" in doc
    for section in ("## Action Space", "## Observation Space", "## Rewards", "## Episode End"):
        assert section in doc


def test_same_seed_same_episode(replay_env: ComputeAllocationEnv) -> None:
    actions = [0, 1, 0, 2, 1, 0, 0, 2, 3]
    a = rollout(replay_env, 123, actions)
    b = rollout(replay_env, 123, actions)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x[0], y[0])
        assert x[1:] == y[1:]
    c = rollout(replay_env, 124, actions)
    assert (
        any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c, strict=False))
        or a[0][4] != c[0][4]
    )


def test_make_from_a_fresh_interpreter() -> None:
    code = (
        "import gymnasium as gym, env\n"
        "e = gym.make('ponder/ComputeAllocation-v0', split='test')\n"
        "obs, info = e.reset(seed=0)\n"
        "obs, r, term, trunc, info = e.step(3)\n"
        "assert term and 'answer' in info, info\n"
        "e2 = gym.make('env:ponder/ComputeAllocation-v0')\n"
        "print('ok', obs.shape)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"ok ({N_FEATURES},)" in out.stdout


# -- rewards, caps, info -----------------------------------------------------------------------


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10_000),
    cap=st.integers(48, 3000),
    lam=st.sampled_from([0.0, 1e-4, 1e-2]),
    aggregate=st.sampled_from(["majority", "confidence", "verifier"]),
    masked=st.sampled_from([1.0, 0.8]),
)
def test_cap_never_exceeded_and_rewards_match_info(
    seed: int, cap: int, lam: float, aggregate: str, masked: float
) -> None:
    e = ComputeAllocationEnv.from_bank(
        BANK, token_cap=cap, lam=lam, aggregate=aggregate, prices=Prices(prefill=0.1)
    )
    rng = np.random.default_rng(seed)
    total, info, _ = random_episode(e, seed, rng, masked)
    assert info["decoded"] <= cap
    assert info["decoded"] == decode_tokens_from(info)
    expected = float(info["correct"]) - lam * info["cost"]
    assert total == pytest.approx(expected, abs=1e-9)
    assert info["return"] == pytest.approx(expected, abs=1e-9)
    assert info["correct"] == answers_equal(info["answer"], info["gold"])
    t = info["tokens"]
    assert info["cost"] == pytest.approx(
        t["generated"] + t["probe"] + t["judge"] + 0.1 * t["prefill"]
    )


def decode_tokens_from(info: dict[str, Any]) -> int:
    t = info["tokens"]
    return int(t["generated"] + t["probe"] + t["judge"] + t["injected"])


def test_cap_with_room_for_one_chunk_truncates_at_once() -> None:
    e = ComputeAllocationEnv.from_bank(BANK, token_cap=60)
    _obs, info = e.reset(seed=0)
    assert not info["action_mask"][0] and not info["action_mask"][1]
    _, _, term, trunc, info = e.step(Action.CONTINUE)
    assert trunc and not term and info["reason"]
    assert info["decoded"] <= 60
    with pytest.raises(ConfigError, match="opening one chain"):
        ComputeAllocationEnv.from_bank(BANK, token_cap=40)


def test_unscored_questions_run_without_gold() -> None:
    q = Question(qid="x/test/0", text="what is 40 + 2?", gold=None)
    e = ComputeAllocationEnv(FakeGenerator(), [q], chunk_tokens=16, require_gold=False)
    _obs, info = e.reset(seed=0)
    assert info["correct"] is None
    _, r, term, _, info = e.step(Action.STOP)
    assert term and info["correct"] is None and r <= 0 and info["answer"] is not None


def test_stop_scores_the_aggregated_answer(replay_env: ComputeAllocationEnv) -> None:
    obs, info = replay_env.reset(seed=5, options={"question": 0})
    for _ in range(4):
        obs, r, term, trunc, info = replay_env.step(Action.BRANCH)
    ep = replay_env.episode
    assert ep is not None and len(ep.states) == 5
    _obs, _r, term, trunc, info = replay_env.step(Action.STOP)
    assert term and not trunc and info["reason"] == "stop"
    answers = [s.answer for s in ep.states]
    from features.aggregate import majority_vote

    assert info["answer"] == majority_vote(answers)[0]
    with pytest.raises(PolicyError, match="reset"):
        replay_env.step(Action.STOP)


def test_verify_scores_each_chain_once(replay_env: ComputeAllocationEnv) -> None:
    obs, info = replay_env.reset(seed=1, options={"question": 2})
    replay_env.step(Action.BRANCH)
    before = info["tokens"]["judge"]
    obs, r, term, trunc, info = replay_env.step(Action.VERIFY)
    assert info["tokens"]["judge"] - before == 2
    assert not info["action_mask"][Action.VERIFY]  # nothing new to score
    assert obs[FEATURE_NAMES.index("verified")] == 1.0
    obs, _r, term, trunc, info = replay_env.step(Action.CONTINUE)
    assert info["action_mask"][Action.VERIFY] or term or trunc


# -- errors and edges --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [4, -1, 1.5, "stop", np.array([1, 2]), None])
def test_invalid_actions_raise(replay_env: ComputeAllocationEnv, bad: Any) -> None:
    replay_env.reset(seed=0)
    with pytest.raises(PolicyError, match="invalid action"):
        replay_env.step(bad)


def test_numpy_actions_accepted(replay_env: ComputeAllocationEnv) -> None:
    replay_env.reset(seed=0)
    replay_env.step(np.int64(1))
    replay_env.step(np.array(0))


def test_unavailable_action_truncates_or_raises() -> None:
    e = ComputeAllocationEnv.from_bank(BANK, max_chains=1)
    e.reset(seed=0)
    _, _, term, trunc, info = e.step(Action.BRANCH)
    assert trunc and not term and "max_chains" in info["reason"]
    strict = ComputeAllocationEnv.from_bank(BANK, max_chains=1, unavailable="raise")
    strict.reset(seed=0)
    with pytest.raises(PolicyError, match="unavailable"):
        strict.step(Action.BRANCH)
    strict.step(Action.STOP)  # the episode goes on after the refused action


def test_bank_smaller_than_budget_masks_branch() -> None:
    e = ComputeAllocationEnv.from_bank(BANK, max_chains=40, token_cap=10**6)
    obs, info = e.reset(seed=3)
    n = 1
    while info["action_mask"][Action.BRANCH]:
        obs, _r, term, trunc, info = e.step(Action.BRANCH)
        n += 1
        assert not (term or trunc)
    assert n == 16  # the bank holds 16 chains per question
    assert obs[FEATURE_NAMES.index("can_branch")] == 0.0


def test_ended_counts_the_chains_that_have_ended(replay_env: ComputeAllocationEnv) -> None:
    """``ended`` is the share of chains whose latest state was ``cur_ended``: a chain ends when
    it is continued to its end and reopens when budget forcing extends it."""
    ix = {n: FEATURE_NAMES.index(n) for n in ("ended", "cur_ended", "n_chains")}
    rng = np.random.default_rng(0)
    seen = {"ended": 0, "reopened": 0}
    for seed in range(12):
        obs, info = replay_env.reset(seed=seed)
        status = [obs[ix["cur_ended"]]]
        while True:
            mask = info["action_mask"][: Action.VERIFY]
            if not mask.any():
                break
            a = int(rng.choice(np.flatnonzero(mask)))
            obs, _r, term, trunc, info = replay_env.step(a)
            if term or trunc:
                break
            if a == Action.BRANCH:
                status.append(obs[ix["cur_ended"]])
            else:
                seen["reopened"] += int(status[-1] == 1 and obs[ix["cur_ended"]] == 0)
                status[-1] = obs[ix["cur_ended"]]
            seen["ended"] += int(obs[ix["cur_ended"]] == 1)
            assert obs[ix["ended"]] == pytest.approx(sum(status) / len(status), abs=1e-6)
    assert seen["ended"] and seen["reopened"]  # both transitions were exercised


def test_question_without_gold_is_refused() -> None:
    q = Question(qid="x/test/0", text="what is 1 + 1?", gold=None)
    e = ComputeAllocationEnv(FakeGenerator(), [q], chunk_tokens=16)
    with pytest.raises(ConfigError, match="no gold answer"):
        e.reset(seed=0)


def test_bad_config_is_refused() -> None:
    with pytest.raises(ConfigError):
        EnvConfig(token_cap=0)
    with pytest.raises(ConfigError):
        EnvConfig(lam=float("nan"))
    with pytest.raises(ConfigError):
        EnvConfig(aggregate="mode")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="chunk"):
        ComputeAllocationEnv.from_bank(BANK, chunk_tokens=64)


class NanLogprobs:
    """Wraps a generator so that every chunk comes back with NaN log-probabilities."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def extend(self, chains: Any, k: int, **kw: Any) -> Any:
        chunks = self.inner.extend(chains, k, **kw)
        for c in chunks:
            c.logprobs[:] = np.nan
            c.top_logprobs[:] = np.nan
            c.confidence = np.full(len(c), np.nan, np.float32)
            c.entropy = np.full(len(c), np.nan, np.float32)
        return chunks


def test_nan_logprobs_give_finite_observations() -> None:
    """NaN log-probabilities (confidence unknown): features fall back to 0, never NaN."""
    q = Question(qid="x/test/0", text="what is 40 + 2?", gold="42")
    e = ComputeAllocationEnv(NanLogprobs(FakeGenerator()), [q], chunk_tokens=16)
    rng = np.random.default_rng(0)
    for seed in range(5):
        random_episode(e, seed, rng, masked=1.0)


def test_empty_completions_give_finite_observations() -> None:
    """A backend that returns no tokens (a fault): empty chunks, no NaN, no crash."""
    q = Question(qid="x/test/0", text="what is 40 + 2?", gold="42")
    gen = FakeGenerator(faults={i: "empty" for i in range(1, 40)})
    e = ComputeAllocationEnv(gen, [q], chunk_tokens=16)
    rng = np.random.default_rng(0)
    _total, info, _steps = random_episode(e, 0, rng, masked=1.0)
    assert info["tokens"]["generated"] == 0


def test_live_env_over_fake_generator_reaches_the_answer() -> None:
    q = Question(qid="x/test/0", text="what is 40 + 2?", gold="42")
    e = ComputeAllocationEnv(FakeGenerator(), [q], chunk_tokens=32, max_chain_tokens=256)
    obs, info = e.reset(seed=0)
    while info["action_mask"][Action.CONTINUE] and not e.episode.states[0].chain.finished:  # type: ignore[union-attr]
        obs, r, term, trunc, info = e.step(Action.CONTINUE)
    # the chain ended: one budget-forced extension ("Wait,") is allowed, then no more
    assert info["action_mask"][Action.CONTINUE]
    obs, r, term, trunc, info = e.step(Action.CONTINUE)
    assert info["tokens"]["injected"] > 0
    _obs, _r, _term, _trunc, info = e.step(Action.STOP)
    assert info["answer"] == "42" and info["correct"]
    assert decode_tokens(e.episode.usage) == info["decoded"]  # type: ignore[union-attr]


# -- a real outside client ---------------------------------------------------------------------


def test_stable_baselines3_ppo_trains_unchanged(tmp_path: Path) -> None:
    from stable_baselines3 import PPO

    e = ComputeAllocationEnv.from_bank(BANK, split="train")
    model = PPO("MlpPolicy", e, n_steps=512, batch_size=128, n_epochs=2, seed=0, device="cpu")
    model.learn(total_timesteps=2048)
    model.save(tmp_path / "ppo")
    loaded = PPO.load(tmp_path / "ppo", device="cpu")
    obs, _info = e.reset(seed=0)
    a1, _ = model.predict(obs, deterministic=True)
    a2, _ = loaded.predict(obs, deterministic=True)
    assert int(a1) == int(a2) and int(a1) in range(4)


# -- live, on the real vLLM engine -------------------------------------------------------------


@pytest.fixture
def live_env(testbed_llm: Any) -> ComputeAllocationEnv:
    from env.generators.vllm import VLLMGenerator
    from env.questions import load_testbed

    gen = VLLMGenerator(
        testbed_llm, sampling=SamplingConfig(temperature=0.8, top_logprobs=5, max_chain_tokens=128)
    )
    qs = load_testbed("test", per_level=1)[:4]
    return ComputeAllocationEnv(gen, qs, chunk_tokens=32, max_chains=4, max_chain_tokens=128)


@pytest.mark.vllm
def test_check_env_live_vllm(live_env: ComputeAllocationEnv) -> None:
    check_env(live_env, skip_render_check=True)


@pytest.mark.vllm
def test_live_same_seed_same_episode(live_env: ComputeAllocationEnv) -> None:
    actions = [0, 1, 2, 0, 1, 0, 3]
    a = rollout(live_env, 7, actions)
    b = rollout(live_env, 7, actions)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x[0], y[0])
        assert x[1:] == y[1:]
    rng = np.random.default_rng(0)
    _total, info, _steps = random_episode(live_env, 11, rng, masked=1.0)
    assert info["decoded"] <= live_env.config.token_cap and info["tokens"]["generated"] > 0


def test_dev_and_fit_cut_the_training_questions() -> None:
    """``dev`` (a quarter) and ``fit`` (the rest) partition ``train``, whatever the order the
    questions come in, and the envs and the difficulty fit take them like any split."""
    from env.bank.store import TraceBank
    from env.episode.difficulty import bank_difficulty
    from env.episode.vector import BatchedReplayEnv
    from env.questions import select_split, training_split

    qs = TraceBank(BANK).questions
    ids = {s: [q.qid for q in select_split(qs, s)] for s in ("train", "test", "fit", "dev")}
    assert (len(ids["train"]), len(ids["dev"]), len(ids["fit"])) == (24, 6, 18)
    assert sorted(ids["fit"] + ids["dev"]) == sorted(ids["train"])
    assert not set(ids["dev"]) & set(ids["fit"]) and not set(ids["dev"]) & set(ids["test"])
    assert {q.qid for q in select_split(qs[::-1], "dev")} == set(ids["dev"])
    assert [q.qid for q in select_split(qs, "")] == [q.qid for q in qs]
    # the cut needs two training questions: one stays to fit on
    train = select_split(qs, "train")
    assert [len(select_split(train[:n], "dev")) for n in (0, 1, 2, 3, 10)] == [0, 0, 1, 1, 2]
    with pytest.raises(ConfigError, match="unknown split 'val'; choose one of train, test"):
        select_split(qs, "val")
    assert (training_split("dev"), training_split("fit"), training_split("test")) == (
        "fit",
        "fit",
        "train",
    )
    single = ComputeAllocationEnv.from_bank(BANK, split="dev", difficulty="auto")
    assert sorted(q.qid for q in single.questions) == sorted(ids["dev"])
    venv = BatchedReplayEnv(BANK, 4, split="fit")
    assert sorted(q.qid for q in venv.questions) == sorted(ids["fit"])
    assert bank_difficulty(TraceBank(BANK), "fit").train_questions == 18
    assert bank_difficulty(TraceBank(BANK)).train_questions == 24
    # stratified by difficulty: each level of the 160 training questions of the xl bank (20 per
    # level) gives dev its quarter
    xl = TraceBank(BANK.parent / "testbed-arith-xl").questions
    dev_levels = Counter(q.difficulty for q in select_split(xl, "dev"))
    assert dev_levels == {level: 5 for level in range(1, 9)}
