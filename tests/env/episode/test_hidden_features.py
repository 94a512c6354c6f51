"""The hidden-state features and the probe aggregations (env.episode.hidden), on the annotated
testbed bank: the single and batched environments agree episode by episode (with a probe that
reads every extra input the environments compute, on extension chunks too), probes round-trip
through their files, and every way of running without the states they need is refused with a
message that says what to do."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils import seeding

from env.bank.hidden import HiddenStates
from env.bank.store import TraceBank
from env.episode.config import Action
from env.episode.hidden import (
    HIDDEN_NAMES,
    NEUTRAL,
    HiddenProbes,
    hidden_features,
    probe_answer,
)
from env.episode.observation import FEATURE_NAMES, HIDDEN_SLICE
from env.episode.single import ComputeAllocationEnv
from env.episode.vector import BatchedReplayEnv
from env.generators.replay import ReplayGenerator
from env.probes import BOUNDARY_EXTRAS
from env.questions import select_split
from features.errors import BankError, ConfigError, ModelError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vector import _lockstep

ROOT = Path(__file__).resolve().parents[3]
TESTBED = ROOT / "data" / "banks" / "testbed-arith"
IX = {n: i for i, n in enumerate(FEATURE_NAMES)}


@pytest.fixture(scope="module")
def bank() -> TraceBank:
    return TraceBank(TESTBED)


@pytest.fixture(scope="module")
def probes(bank: TraceBank) -> HiddenProbes:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return HiddenProbes.fit(bank, c_grid=(0.01, 0.1), alpha_grid=(10.0, 100.0))


@pytest.fixture(scope="module")
def reads_all(bank: TraceBank) -> HiddenProbes:
    """Probes whose chain probe reads every extra input and the state at ended boundaries."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return HiddenProbes.fit(
            bank,
            c_grid=(0.1,),
            alpha_grid=(10.0,),
            extra_choices=(BOUNDARY_EXTRAS,),
            weight_grid=(3.0,),
        )


def test_the_hidden_features_close_the_observation() -> None:
    assert FEATURE_NAMES[HIDDEN_SLICE] == HIDDEN_NAMES
    assert HIDDEN_SLICE.stop == len(FEATURE_NAMES)
    assert len(NEUTRAL) == len(HIDDEN_NAMES)


def test_fit_gives_held_out_probes_for_training_questions_only(
    bank: TraceBank, probes: HiddenProbes
) -> None:
    train = {q.qid for q in select_split(bank.questions, "train")}
    assert set(probes.held_out) == train
    assert all(probes.held_out[q][0] is not probes.chain for q in train)
    hs = HiddenStates.open(bank.path, bank)
    assert hs is not None
    # a training question reads the difficulty probe that did not see it; a question of no
    # fold (None, a test one) the full probe
    differ = 0
    for q in sorted(train):
        s = hs.prompt(q)
        x = np.asarray(s, np.float32)[None]
        own = probes.pass_rate(q, s, hs.layers)
        assert own == float(probes.held_out[q][1](x, hs.layers)[0])
        full = probes.pass_rate(None, s, hs.layers)
        assert full == float(probes.difficulty(x, hs.layers)[0])
        differ += own != pytest.approx(full)
    assert differ > 0  # (pass rates are clipped to [0, 1]: some agree at a bound)


@pytest.mark.parametrize(
    "cfg",
    [{}, {"aggregate": "probe"}, {"aggregate": "probe-best", "token_cap": 300}, {"probe": False}],
    ids=["majority", "probe", "probe-best-capped", "no-answer-probes"],
)
def test_single_and_batched_envs_agree_with_probes(
    bank: TraceBank, probes: HiddenProbes, cfg: dict
) -> None:
    reasons, steps = _lockstep(bank, seed=len(str(cfg)), rounds=2, probes=probes, **cfg)
    assert steps > 0 and sum(reasons.values()) == 16


@pytest.mark.parametrize(
    "cfg", [{}, {"aggregate": "probe-best", "token_cap": 300}], ids=["majority", "probe-best"]
)
def test_single_and_batched_envs_agree_with_every_extra_input(
    bank: TraceBank, reads_all: HiddenProbes, cfg: dict
) -> None:
    chain = reads_all.chain
    assert chain.schema.extras == BOUNDARY_EXTRAS and chain.schema.ended_states
    assert all(c.schema == chain.schema for c, _ in reads_all.held_out.values())
    reasons, steps = _lockstep(bank, seed=7 + len(cfg), rounds=2, probes=reads_all, **cfg)
    assert steps > 0 and sum(reasons.values()) == 16


def test_extension_chunks_read_the_same_extras_in_both_envs(
    bank: TraceBank, reads_all: HiddenProbes
) -> None:
    """Continue every chain past its end (budget forcing): the state stays the last main
    boundary's, the confidences and tokens go on, in both environments alike."""
    n = 6
    venv = BatchedReplayEnv(bank, n, seed=0, probes=reads_all)
    singles = [ComputeAllocationEnv.from_bank(bank, probes=reads_all) for _ in range(n)]
    qs = np.arange(n) * 3
    seeds = np.arange(n) + 11
    # what ComputeAllocationEnv.reset(seed=s) draws for its generator (as test_vector does)
    gen_seeds = np.array([seeding.np_random(int(s))[0].integers(2**31 - 1) for s in seeds])
    obs, info = venv.reset(options={"questions": qs, "gen_seeds": gen_seeds})
    for i, e in enumerate(singles):
        o, _ = e.reset(seed=int(seeds[i]), options={"question": int(qs[i])})
        np.testing.assert_allclose(o, obs[i], atol=1e-5, err_msg=f"reset, episode {i}")
    running = np.ones(n, bool)
    extended = 0
    for _ in range(40):
        if not running.any():
            break
        acts = np.where(info["action_mask"][:, Action.CONTINUE], Action.CONTINUE, Action.STOP)
        obs, _, term, trunc, info = venv.step(acts)
        for i in np.flatnonzero(running):
            o, _, te, tr, _ = singles[i].step(int(acts[i]))
            np.testing.assert_allclose(o, obs[i], atol=1e-5, err_msg=f"episode {i}")
            extended += int(o[IX["cur_extensions"]] > 0)
            running[i] = not (te or tr)
    assert extended > 0
    assert not running.any()


def test_hidden_features_are_read_and_neutral_without_probes(
    bank: TraceBank, probes: HiddenProbes
) -> None:
    with_p = BatchedReplayEnv(bank, 64, seed=1, probes=probes)
    without = BatchedReplayEnv(bank, 64, seed=1)
    a, _ = with_p.reset(seed=1)
    b, _ = without.reset(seed=1)
    np.testing.assert_array_equal(a[:, : HIDDEN_SLICE.start], b[:, : HIDDEN_SLICE.start])
    assert (b[:, HIDDEN_SLICE] == np.asarray(NEUTRAL, np.float32)).all()
    assert len(np.unique(a[:, IX["cur_right"]])) > 5  # the probe's P(right) varies
    assert len(np.unique(a[:, IX["pass_rate"]])) > 3


def test_pure_feature_functions() -> None:
    answers = ["1", "2", "2", None]
    rights = [0.9, 0.2, 0.3, 0.99]
    cur, share, best, agrees, rate = hidden_features(answers, rights, 1, "2", 0.4)
    assert (cur, rate) == (0.2, 0.4)
    assert share == pytest.approx(0.9 / 1.4)
    assert best == 0.9 and agrees == 0.0  # the unanswered chain's 0.99 does not count
    assert probe_answer(answers, rights, "probe") == ("1", pytest.approx(0.9 / 1.4))
    assert probe_answer(answers, rights, "probe-best")[0] == "1"
    assert probe_answer([None], [0.5], "probe-best") == (None, 0.0)
    with pytest.raises(ConfigError, match="probe"):
        probe_answer(answers, rights, "best")


def test_probes_round_trip_through_their_files(
    bank: TraceBank, probes: HiddenProbes, tmp_path: Path
) -> None:
    served = HiddenProbes.load(probes.save(tmp_path / "p"))
    assert served.held_out == {}
    np.testing.assert_array_equal(served.chain.coef, probes.chain.coef)
    training = HiddenProbes.load(probes.save(tmp_path / "t", training=True), training=True)
    assert set(training.held_out) == set(probes.held_out)
    q = next(iter(probes.held_out))
    np.testing.assert_array_equal(training.held_out[q][0].coef, probes.held_out[q][0].coef)
    a = BatchedReplayEnv(bank, 32, seed=3, probes=probes).reset(seed=3)[0]
    b = BatchedReplayEnv(bank, 32, seed=3, probes=training).reset(seed=3)[0]
    np.testing.assert_array_equal(a, b)
    (tmp_path / "t" / "hidden_probes.json").write_text("{not json")
    with pytest.raises(ModelError, match="damaged"):
        HiddenProbes.load(tmp_path / "t")
    with pytest.raises(ModelError, match="no hidden-state probes"):
        HiddenProbes.load(tmp_path / "nothing")


def test_refusals_say_what_to_run(bank: TraceBank, probes: HiddenProbes, tmp_path: Path) -> None:
    gen = ReplayGenerator(bank)  # no hidden=True: the generator captures nothing
    with pytest.raises(ConfigError, match="ponder bank annotate"):
        ComputeAllocationEnv(
            gen, bank.questions, probes=probes, chunk_tokens=gen.traits.chunk_tokens
        )
    with pytest.raises(ConfigError, match="probes=HiddenProbes"):
        BatchedReplayEnv(bank, 4, aggregate="probe")
    with pytest.raises(ConfigError, match="probes=HiddenProbes"):
        ComputeAllocationEnv.from_bank(bank.path, aggregate="probe-best")
    # probes fitted on another model's states
    other = dataclasses.replace(
        probes.chain,
        schema=dataclasses.replace(
            probes.chain.schema,
            annotation={
                **probes.chain.schema.annotation,
                "model": {**probes.chain.schema.annotation["model"], "sha256": "0" * 64},
            },
        ),
    )
    with pytest.raises(ModelError, match="model sha256"):
        BatchedReplayEnv(bank, 4, probes=dataclasses.replace(probes, chain=other))
    # a bank without hidden states
    bare = tmp_path / "bare"
    import shutil

    shutil.copytree(TESTBED, bare, ignore=shutil.ignore_patterns("hidden"))
    with pytest.raises(BankError, match="ponder bank annotate"):
        BatchedReplayEnv(bare, 4, probes=probes)
    with pytest.raises(BankError, match="ponder bank annotate"):
        ReplayGenerator(bare, hidden=True)
