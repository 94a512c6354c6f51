"""BatchedReplayEnv: the single environment's episodes, many at once.

The key test replays the same episodes (question, generator seed, actions) through
``ComputeAllocationEnv.from_bank`` and ``BatchedReplayEnv`` in lockstep and asserts equal
observations, rewards, flags, masks and outcomes, on the shipped testbed bank and on a
synthetic bank built to hold the edge cases (empty chunks, forced and capped chains, NaN
confidences and verifier scores, equal answers written differently, exact vote ties, fewer
chains for some questions).
"""

from __future__ import annotations

import collections
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils import seeding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import env  # noqa: F401  (registers ponder/ComputeAllocation-v0)
from env.bank.store import TraceBank
from env.bank.synthetic import SyntheticChunk, record_fake_thinking_bank, write_synthetic_bank
from env.episode.config import Prices
from env.episode.observation import FEATURE_NAMES, N_FEATURES
from env.episode.replay_state import replay_order
from env.episode.rules import REASONS
from env.episode.single import ComputeAllocationEnv
from env.episode.vector import REPLAY_ENDS, BatchedReplayEnv
from env.generators.replay import chain_order
from env.types import Question
from features.answers import answers_equal
from features.errors import ConfigError, PolicyError

ROOT = Path(__file__).resolve().parents[3]
TESTBED = ROOT / "data" / "banks" / "testbed-arith"
IX = {n: i for i, n in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module")
def testbed() -> TraceBank:
    bank = TraceBank(TESTBED)
    for q in bank.questions:
        bank[q.qid]
    return bank


# -- a bank of edge cases ------------------------------------------------------------------------

_POOL = ["1/2", "0.5", "\\frac{1}{2}", "2", "2.0", "3", "-1", "x+1", "1,000", "1000", None]
_WORDS = ["Let me see. ", "Wait, ", "Hmm, ", "Alternatively, ", "so x = 3. ", "then 12 - 5. "]


def _chunk(rng: np.random.Generator, ext: bool, fr: str, n: int) -> SyntheticChunk:
    inj = min(2, n) if ext else 0
    words = list(rng.choice(_WORDS, size=int(rng.integers(1, 4))))
    if rng.random() < 0.6:
        words.append(f"The answer is \\boxed{{{rng.choice([a for a in _POOL if a])}}}. ")
    conf = rng.uniform(0.0, 8.0, n)
    ent = rng.uniform(0.0, 3.0, n)
    if n and rng.random() < 0.2:
        conf[:] = np.nan
    elif n and rng.random() < 0.3:
        conf[rng.integers(n)] = np.nan
    if n and rng.random() < 0.2:
        ent[:] = np.nan
    probe = _POOL[int(rng.integers(len(_POOL)))]
    judge = float(rng.random()) if rng.random() > 0.15 else float("nan")
    lp = np.full(n, -0.5)
    lp[:inj] = np.nan
    return SyntheticChunk(
        "".join(words), n, fr, probe, judge_p_yes=judge, confidence=conf, entropy=ent,
        logprob=lp, top1_logprob=lp, token_ids=range(5, 5 + n),
        prefill=int(rng.integers(0, 40)), cached=int(rng.integers(0, 40)),
        probe_tokens=int(rng.integers(1, 5)), probe_prefill=int(rng.integers(0, 10)),
        probe_cached=int(rng.integers(0, 40)), judge_prefill=int(rng.integers(0, 60)),
        judge_cached=int(rng.integers(0, 40)),
    )  # fmt: skip


def _chain_shape(rng: np.random.Generator, t: int) -> list[tuple[bool, str, int]]:
    """(ext, finish_reason, n_tokens) of each chunk of a chain."""
    n_main = int(rng.integers(1, 6))
    end = str(rng.choice(["stop", "stop", "length", "cap"]))
    shape = [(False, "length", t) for _ in range(n_main - 1)]
    if end == "stop":
        shape.append((False, "stop", int(rng.integers(0, t + 1))))
        for _ in range(int(rng.integers(0, 3))):
            fr = str(rng.choice(["length", "stop", "forced"]))
            shape.append((True, fr, t if fr == "length" else int(rng.integers(0, t + 1))))
    else:
        shape.append((False, end, t))
    return shape


def _write_synthetic(path: Path, seed: int = 0, n_questions: int = 10, t: int = 8) -> TraceBank:
    rng = np.random.default_rng(seed)
    golds = ["1/2", "2", "1000", "7"]
    questions = []
    for qi in range(n_questions):
        q = Question(
            qid=f"synthetic/{'train' if qi % 2 == 0 else 'test'}/{qi}",
            text=f"question {qi}",
            gold=golds[qi % len(golds)],
            dataset="synthetic",
            difficulty=1,
        )
        k = 4 if qi % 3 == 0 else 6  # some questions hold fewer chains than the bank's K
        chains = [[_chunk(rng, *c) for c in _chain_shape(rng, t)] for _ in range(k)]
        if qi % 2 == 0:
            # Chain 1 a twin of chain 0 whose probes answer otherwise: exactly equal vote weights
            # behind different answers (ties must break as features.votes breaks them).
            chains[1] = [
                replace(c, probe_answer=_POOL[(j + 3) % len(_POOL)])
                for j, c in enumerate(chains[0])
            ]
        questions.append((q, chains))
    # Stored all wrong: the auto difficulty is constant on this bank (see the tests below).
    return write_synthetic_bank(
        path, questions, all_wrong=True, chunk_tokens=t, max_tokens=5 * t, probe_tokens=4, seed=seed
    )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> TraceBank:
    return _write_synthetic(tmp_path_factory.mktemp("vector") / "bank")


# -- lockstep replay -----------------------------------------------------------------------------


def _pick(rng: np.random.Generator, mask: np.ndarray, p_unmasked: float) -> int:
    if rng.random() < p_unmasked:
        return int(rng.integers(4))  # possibly unavailable: the episode is truncated
    w = np.array([3.0, 1.5, 0.7, 0.08]) * mask  # long episodes: budgets, extensions, ties
    return int(rng.choice(4, p=w / w.sum()))


def _lockstep(
    bank: TraceBank,
    *,
    n_envs: int = 8,
    rounds: int = 3,
    seed: int = 0,
    p_unmasked: float = 0.1,
    seen: collections.Counter[str] | None = None,
    **cfg: Any,
) -> tuple[collections.Counter[str], int]:
    """Replay ``rounds * n_envs`` episodes through both environments; return reasons, steps.

    ``seen`` (if given) counts observations by what they show: ``window_agree`` set, and each
    distinct ``difficulty`` value (``difficulty=<value>``); and episodes that decoded tokens of
    each part of the split (``tokens_base``, ``tokens_deep``, ``tokens_wide``).
    """
    venv = BatchedReplayEnv(bank, n_envs, seed=seed, **cfg)
    singles = [ComputeAllocationEnv.from_bank(bank, **cfg) for _ in range(n_envs)]
    lam = venv.config.lam
    correct_reward = venv.config.correct_reward
    rng = np.random.default_rng(seed)
    reasons: collections.Counter[str] = collections.Counter()
    seen = collections.Counter() if seen is None else seen
    steps = 0
    for _ in range(rounds):
        qs = rng.integers(len(venv.questions), size=n_envs)
        seeds = rng.integers(2**30, size=n_envs)
        # What ComputeAllocationEnv.reset(seed=s) draws for the generator when the question is
        # pinned: the first integers(2**31 - 1) of its freshly seeded RNG.
        gen_seeds = np.array([seeding.np_random(int(s))[0].integers(2**31 - 1) for s in seeds])
        obs, info = venv.reset(options={"questions": qs, "gen_seeds": gen_seeds})
        assert (venv.gen_seeds == gen_seeds).all()
        for i, e in enumerate(singles):
            o, inf0 = e.reset(seed=int(seeds[i]), options={"question": int(qs[i])})
            assert e.generator._seed == gen_seeds[i]  # type: ignore[attr-defined]
            np.testing.assert_allclose(obs[i], o, atol=1e-5, err_msg=f"reset, episode {i}")
            assert (info["action_mask"][i] == e.action_mask()).all()
            assert inf0["correct_now"] == inf0["correct"] == info["correct_now"][i]
            assert inf0["cost_delta"] == info["cost_delta"][i] == 0.0  # charged on step 1
        running = np.ones(n_envs, bool)
        spent = np.zeros(n_envs)
        while running.any():
            actions = np.array([_pick(rng, m, p_unmasked) for m in info["action_mask"]])
            obs, rew, term, trunc, info = venv.step(actions)
            for i in np.flatnonzero(running):
                o, r, te, tr, inf = singles[i].step(int(actions[i]))
                steps += 1
                where = f"episode {i}, step {inf['steps']}, action {actions[i]}, config {cfg}"
                bad = np.flatnonzero(np.abs(o - obs[i]) > 1e-5)
                assert not bad.size, (
                    f"{where}: {[(FEATURE_NAMES[k], o[k], obs[i][k]) for k in bad]}"
                )
                assert abs(r - rew[i]) <= 1e-6, f"{where}: reward {r} != {rew[i]}"
                assert (te, tr) == (term[i], trunc[i]), where
                assert (inf["action_mask"] == info["action_mask"][i]).all(), where
                # Per-step learner keys: what stopping now would score, and the step's cost.
                assert inf["correct_now"] == inf["correct"] == info["correct_now"][i], where
                delta = inf["cost_delta"]
                assert abs(delta - info["cost_delta"][i]) <= 1e-9 * max(1.0, delta), where
                end_bonus = correct_reward * float(inf["correct"]) if te or tr else 0.0
                assert r == -lam * delta + end_bonus, where
                spent[i] += delta
                seen["window_agree"] += int(o[IX["window_agree"]] > 0)
                seen[f"difficulty={o[IX['difficulty']]:.6f}"] += 1
                if te or tr:
                    assert abs(spent[i] - inf["cost"]) <= 1e-9 * max(1.0, inf["cost"]), where
                    reasons[inf["reason"]] += 1
                    assert info["_correct"][i]
                    assert inf["correct"] == info["correct"][i], where
                    assert inf["reason"] == info["reason"][i], where
                    assert inf["reason_code"] == info["reason_code"][i], where
                    assert inf["decoded"] == info["decoded"][i], where
                    # The decoded tokens' split: first chain, past a chain's end, other chains;
                    # what is left is the verifier's.
                    split = ("tokens_base", "tokens_deep", "tokens_wide")
                    for key in split:
                        assert inf[key] == info[key][i] >= 0, f"{where}: {key}"
                    parts = sum(inf[key] for key in split) + inf["tokens"]["judge"]
                    assert parts == inf["decoded"], f"{where}: split {parts}"
                    seen.update(key for key in split if inf[key] > 0)
                    assert inf["chains"] == info["chains"][i] and inf["steps"] == info["steps"][i]
                    assert abs(inf["cost"] - info["cost"][i]) <= 1e-9 * max(1.0, inf["cost"])
                    assert abs(inf["return"] - info["return"][i]) <= 1e-9, where
                    mine = info["answer"][i]
                    assert (mine is None and inf["answer"] is None) or answers_equal(
                        mine, inf["answer"]
                    ), f"{where}: answer {mine!r} != {inf['answer']!r}"
                    running[i] = False
    return reasons, steps


CONFIGS: list[dict[str, Any]] = [
    {},
    {"token_cap": 200},
    {"aggregate": "confidence"},
    {"aggregate": "verifier", "probe": False},
    {"max_chains": 20, "aggregate": "verifier"},
    {"extension_chunks": 1, "max_chain_tokens": 100, "aggregate": "confidence", "token_cap": 700},
    {"max_steps": 6, "probe": False},
    {"difficulty": "auto"},
    {"difficulty": "auto", "max_chains": 20, "aggregate": "confidence"},
    {
        "prices": Prices(generated=1.0, probe=0.5, judge=2.0, injected=0.25, prefill=0.01),
        "lam": 1e-3,
        "correct_reward": 2.0,
        "extension_chunks": 0,
    },
]


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_same_episodes_as_the_single_env_on_the_testbed_bank(testbed: TraceBank, cfg: dict) -> None:
    _lockstep(testbed, seed=len(str(cfg)), **cfg)


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_same_episodes_as_the_single_env_on_edge_cases(synthetic: TraceBank, cfg: dict) -> None:
    cfg = {k: v for k, v in cfg.items() if k not in ("token_cap", "max_chain_tokens")}
    _lockstep(synthetic, rounds=4, seed=len(str(cfg)), **cfg)


@pytest.fixture(scope="module")
def thinking(tmp_path_factory: pytest.TempPathFactory) -> TraceBank:
    """A reasoning model's bank, recorded s1-style: chains end inside their thinking section."""
    return record_fake_thinking_bank(tmp_path_factory.mktemp("thinking") / "bank", per_level=3)


@pytest.mark.parametrize(
    "cfg",
    [{}, {"extension_chunks": 3, "aggregate": "confidence"}, {"probe": False}],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default",
)
def test_same_episodes_as_the_single_env_on_a_thinking_bank(thinking: TraceBank, cfg: dict) -> None:
    seen: collections.Counter[str] = collections.Counter()
    reasons, steps = _lockstep(thinking, rounds=4, seed=3, seen=seen, **cfg)
    assert steps > 0 and sum(reasons.values()) > 0
    # every part of the token split is compared (budget forcing, other chains)
    assert seen["tokens_base"] and seen["tokens_deep"] and seen["tokens_wide"], seen


def _first_chunk_difficulty(question: Question, chunk: Any) -> float:
    """A predictor that reads much of the chunk: any difference in it shows."""
    x = len(chunk.text) + int(np.asarray(chunk.token_ids).sum()) + len(question.text)
    x += int(np.nan_to_num(np.asarray(chunk.confidence, np.float64)).sum() * 1000)
    return (x % 97) / 96


def test_difficulty_and_window_agree_are_exercised(
    synthetic: TraceBank, testbed: TraceBank
) -> None:
    """The lockstep comparisons see ``window_agree`` set (on the testbed bank: the synthetic
    one's random answers rarely agree 4 times) and the difficulty vary: a fitted predictor
    (constant on the synthetic bank, whose chains are all wrong), and a callable reading the
    chunk's text, tokens and confidences."""
    for bank in (testbed, synthetic):
        for difficulty in ("auto", _first_chunk_difficulty):
            seen: collections.Counter[str] = collections.Counter()
            _lockstep(bank, rounds=3, seen=seen, difficulty=difficulty, max_chains=12)
            values = [k for k in seen if k.startswith("difficulty=")]
            if bank is testbed:
                assert seen["window_agree"] > 0
            if bank is testbed or difficulty != "auto":
                assert len(values) > 4, values


def test_difficulty_argument(testbed: TraceBank) -> None:
    v = BatchedReplayEnv(testbed, 4, difficulty=lambda q, c: 2.0)  # clipped, as the single env
    obs, _ = v.reset(seed=0)
    assert (obs[:, IX["difficulty"]] == 1.0).all()
    obs, _ = BatchedReplayEnv(testbed, 4).reset(seed=0)
    assert (obs[:, IX["difficulty"]] == 0.5).all()
    for bad in ("fitted", 3):
        with pytest.raises(ConfigError, match="difficulty must be"):
            BatchedReplayEnv(testbed, 2, difficulty=bad)


def test_lockstep_reaches_every_episode_end(synthetic: TraceBank, testbed: TraceBank) -> None:
    """The comparisons above see every way an episode can end (so none goes untested)."""
    seen: collections.Counter[str] = collections.Counter()
    cases: list[tuple[TraceBank, dict[str, Any]]] = [
        (testbed, {"token_cap": 150}),
        (testbed, {"max_steps": 4}),
        (synthetic, {"max_chains": 8}),
        (synthetic, {"extension_chunks": 0}),
        (synthetic, {}),
    ]
    for bank, cfg in cases:
        reasons, _ = _lockstep(bank, n_envs=8, rounds=3, p_unmasked=0.4, **cfg)
        seen.update(reasons)
    wanted = {REASONS[r].format(max_chains=6) for r in REPLAY_ENDS} - {"max_chains (6) reached"}
    assert wanted <= set(seen), f"not reached: {wanted - set(seen)}"
    assert any(r.startswith("max_chains") for r in seen)


def test_autoreset_stream_matches_the_single_env(testbed: TraceBank, synthetic: TraceBank) -> None:
    """With replay_seeds and one episode, the env draws questions and chains as the single env
    does, across autoresets (NEXT_STEP: the step after the end starts the next episode)."""
    for bank, cfg in ((testbed, {"max_steps": 5}), (synthetic, {"aggregate": "verifier"})):
        venv = BatchedReplayEnv(bank, 1, replay_seeds=True, **cfg)
        single = ComputeAllocationEnv.from_bank(bank, **cfg)
        ov, iv = venv.reset(seed=7)
        os_, _ = single.reset(seed=7)
        np.testing.assert_allclose(ov[0], os_, atol=1e-5)
        rng = np.random.default_rng(0)
        episodes = 0
        while episodes < 60:
            a = _pick(rng, iv["action_mask"][0], 0.1)
            ov, rv, tv, trv, iv = venv.step(np.array([a]))
            o, r, te, tr, inf = single.step(a)
            np.testing.assert_allclose(ov[0], o, atol=1e-5)
            assert abs(rv[0] - r) <= 1e-6 and (tv[0], trv[0]) == (te, tr)
            if te or tr:
                episodes += 1
                assert venv.gen_seeds[0] == single.generator._seed  # type: ignore[attr-defined]
                os_, _ = single.reset()
                ov, rv, tv, trv, iv = venv.step(np.array([5]))  # ignored: the episode restarts
                assert rv[0] == 0 and not tv[0] and not trv[0]
                np.testing.assert_allclose(ov[0], os_, atol=1e-5)


def test_replay_order_is_the_replay_generators(testbed: TraceBank) -> None:
    from env.generators.replay import ReplayGenerator

    gen = ReplayGenerator(testbed)
    q = testbed.questions[3]
    for s in (0, 1, 12345):
        gen.reset(s)
        handed = [c.handle for c in gen.start(q, testbed[q.qid].k)]
        assert handed == replay_order(s, q.qid, testbed[q.qid].k).tolist()
        assert handed == chain_order(s, q.qid, testbed[q.qid].k)


# -- Gymnasium contract ------------------------------------------------------------------------


def test_make_vec() -> None:
    envs = gym.make_vec("ponder/ComputeAllocation-v0", num_envs=8)
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    obs, info = envs.reset(seed=0)
    assert obs.shape == (8, N_FEATURES) and obs.dtype == np.float32
    assert info["correct_now"].shape == info["cost_delta"].shape == (8,)
    assert envs.observation_space.contains(obs)
    assert envs.single_action_space == gym.spaces.Discrete(4)
    rng = np.random.default_rng(0)
    for _ in range(30):
        actions = np.array([rng.choice(np.flatnonzero(m)) for m in info["action_mask"]])
        obs, rew, term, trunc, info = envs.step(actions)
        assert envs.observation_space.contains(obs)
        assert rew.shape == term.shape == trunc.shape == (8,)
    envs.close()


def test_make_vec_passes_bank_split_difficulty_and_config(testbed: TraceBank) -> None:
    envs = gym.make_vec(
        "ponder/ComputeAllocation-v0",
        num_envs=4,
        bank=TESTBED,
        split="test",
        difficulty="auto",
        lam=1e-3,
        token_cap=400,
        seed=3,
    )
    v = envs.unwrapped
    assert isinstance(v, BatchedReplayEnv)
    assert v.config.lam == 1e-3 and v.config.token_cap == 400
    assert all("/test/" in q.qid for q in v.questions)
    assert v.difficulty_fn is not None  # fitted on the bank's train questions
    obs, _ = envs.reset(seed=0)
    single = ComputeAllocationEnv.from_bank(TESTBED, split="test", difficulty="auto", lam=1e-3)
    assert single.difficulty_fn.weights == v.difficulty_fn.weights  # type: ignore[union-attr]
    assert not (obs[:, IX["difficulty"]] == 0.5).all()
    with pytest.raises(ConfigError, match="replays a bank"):
        gym.make_vec("ponder/ComputeAllocation-v0", num_envs=2, generator=object(), questions=[])
    envs.close()


def test_same_seed_same_rollout(testbed: TraceBank) -> None:
    def rollout() -> list[np.ndarray]:
        v = BatchedReplayEnv(testbed, 64, seed=3)
        obs, info = v.reset(seed=11)
        rng = np.random.default_rng(5)
        out = [obs]
        for _ in range(20):
            obs, rew, term, trunc, info = v.step(rng.integers(4, size=64))
            out += [obs, rew, term, trunc]
        return out

    for a, b in zip(rollout(), rollout(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_split_and_pinned_questions(testbed: TraceBank) -> None:
    v = BatchedReplayEnv(testbed, 4, split="test")
    assert all("/test/" in q.qid for q in v.questions)
    v.reset(options={"questions": np.array([0, 1, 2, 3])})
    assert v.episode_questions.tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError):
        BatchedReplayEnv(testbed, 4, split="validation")


def test_partial_reset(testbed: TraceBank) -> None:
    v = BatchedReplayEnv(testbed, 4, seed=0)
    v.reset(options={"questions": np.array([0, 1, 2, 3])})
    v.step(np.array([1, 1, 1, 1]))
    steps_before = v.decoded
    obs, _ = v.reset(
        options={
            "reset_mask": np.array([True, False, False, True]),
            "questions": np.array([5, 5, 5, 5]),
        }
    )
    assert v.episode_questions.tolist() == [5, 1, 2, 5]
    assert v.decoded[1] == steps_before[1] and obs[1, IX["steps"]] > 0
    assert obs[0, IX["steps"]] == 0


def test_bad_actions_and_options(testbed: TraceBank) -> None:
    v = BatchedReplayEnv(testbed, 2)
    with pytest.raises(PolicyError):
        v.step(np.array([0, 0]))  # before reset
    v.reset(seed=0)
    for bad in (np.array([0, 4]), np.array([0]), np.array([0.5, 1.0]), np.array([-1, 0])):
        with pytest.raises(PolicyError):
            v.step(bad)
    with pytest.raises(ConfigError):
        v.reset(options={"questions": np.array([0, 999])})
    with pytest.raises(ConfigError):
        v.reset(options={"question": 1})
    with pytest.raises(ConfigError):
        BatchedReplayEnv(testbed, 2, time_cap_s=1.0)
    with pytest.raises(ConfigError):
        BatchedReplayEnv(testbed, 2, chunk_tokens=64)
    with pytest.raises(ConfigError):
        BatchedReplayEnv(testbed, 0)


def test_unavailable_raise_moves_nothing(testbed: TraceBank) -> None:
    v = BatchedReplayEnv(testbed, 3, unavailable="raise", max_chains=2)
    obs, info = v.reset(seed=0, options={"questions": np.array([0, 1, 2])})
    v.step(np.array([1, 1, 1]))  # now every episode has its 2 chains
    before = (v.decoded, v.cost)
    with pytest.raises(PolicyError, match="branch is unavailable in episode 1"):
        v.step(np.array([3, 1, 3]))
    assert (v.decoded == before[0]).all() and (v.cost == before[1]).all()


# -- properties --------------------------------------------------------------------------------

_CAPS = (48, 300, 1000)


@pytest.fixture(scope="module")
def capped_envs(testbed: TraceBank) -> dict[tuple[int, bool], BatchedReplayEnv]:
    return {
        (cap, probe): BatchedReplayEnv(testbed, 32, token_cap=cap, probe=probe)
        for cap in _CAPS
        for probe in (True, False)
    }


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cap=st.sampled_from(_CAPS),
    probe=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    p_unmasked=st.sampled_from([0.0, 0.2, 1.0]),
)
def test_budget_never_exceeded_and_rewards_add_up_to_the_return(
    capped_envs: dict, cap: int, probe: bool, seed: int, p_unmasked: float
) -> None:
    v = capped_envs[(cap, probe)]
    obs, info = v.reset(seed=seed)
    rng = np.random.default_rng(seed)
    total = np.zeros(v.num_envs)
    fresh = np.zeros(v.num_envs, bool)
    assert (v.decoded <= cap).all()  # the opening fits: cap >= chunk + probe tokens
    for _ in range(40):
        actions = np.array([_pick(rng, m, p_unmasked) for m in info["action_mask"]])
        obs, rew, term, trunc, info = v.step(actions)
        assert (v.decoded <= cap).all()
        assert ((obs >= 0) & (obs <= 1)).all() and not np.isnan(obs).any()
        total = np.where(fresh, 0.0, total) + rew
        done = term | trunc
        correct = info.get("correct", np.zeros(v.num_envs, bool))
        bonus = np.where(done, v.config.correct_reward * correct, 0.0)
        assert (rew == -v.config.lam * info["cost_delta"] + bonus).all()
        if done.any():
            np.testing.assert_allclose(total[done], info["return"][done], atol=1e-9)
            assert (info["decoded"][done] <= cap).all()
        fresh = done


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(q=st.integers(0, 47), s1=st.integers(0, 2**31 - 2), s2=st.integers(0, 2**31 - 2))
def test_vote_features_do_not_depend_on_chain_order(
    testbed: TraceBank, q: int, s1: int, s2: int
) -> None:
    """Two episodes holding the same chains in different orders agree on every vote feature."""
    v = _order_env(testbed)
    obs, _ = v.reset(options={"questions": np.array([q, q]), "gen_seeds": np.array([s1, s2])})
    k = testbed[v.questions[q].qid].k
    for _ in range(k - 1):
        obs, *_ = v.step(np.array([1, 1]))
    votes = ["vote_share", "vote_margin", "distinct", "answered", "ended", "beta_leader"]
    votes += ["conf_vote_share"]
    np.testing.assert_allclose(
        obs[0, [IX[f] for f in votes]], obs[1, [IX[f] for f in votes]], atol=1e-6
    )
    obs, *_ = v.step(np.array([2, 2]))
    votes += ["verified", "verifier_mean", "verifier_vote_share"]
    np.testing.assert_allclose(
        obs[0, [IX[f] for f in votes]], obs[1, [IX[f] for f in votes]], atol=1e-6
    )


_ORDER_ENV: dict[int, BatchedReplayEnv] = {}


def _order_env(bank: TraceBank) -> BatchedReplayEnv:
    if id(bank) not in _ORDER_ENV:
        _ORDER_ENV[id(bank)] = BatchedReplayEnv(bank, 2, token_cap=10**6)
    return _ORDER_ENV[id(bank)]
