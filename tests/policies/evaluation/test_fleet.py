"""One token budget shared by the test questions: budgets held, uniform is maj@n as the
evaluator runs it, the realized oracle bounds every plan, a planted signal pays."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from env.bank.store import TraceBank
from env.episode.config import EnvConfig
from env.probes.synthetic import planted_bank
from env.questions import select_split
from features.errors import ConfigError
from policies.evaluation.fleet import (
    BASELINES,
    CURRENT,
    MEAN_CURVE,
    ORACLE_REALIZED,
    PROBE,
    UNIFORM,
    Curves,
    FleetSetup,
    Outcomes,
    greedy_plan,
    kernel_curves,
    oracle_allocation,
    outcomes,
    question_chains,
    run_plan,
    uniform_plan,
)
from policies.evaluation.fleet_report import FleetReport, fleet_table
from policies.evaluation.runner import Evaluator
from policies.heuristics import BestOfN

ROOT = Path(__file__).resolve().parents[3]
ARITH = ROOT / "data" / "banks" / "testbed-arith"


@pytest.fixture(scope="module")
def arith() -> TraceBank:
    return TraceBank(ARITH)


@pytest.fixture(scope="module")
def arith_outcomes(arith: TraceBank) -> dict[int, Outcomes]:
    config = EnvConfig.from_manifest(arith.manifest)
    chains = [question_chains(arith, q, config) for q in select_split(arith.questions, "test")]
    return {s: outcomes(chains, s) for s in (0, 1, 2)}


@pytest.fixture(scope="module")
def arith_report() -> FleetReport:
    return fleet_table(ARITH, seeds=3, n_boot=200)


def test_uniform_at_its_own_budget_is_maj_at_n_as_the_evaluator_runs_it(
    arith: TraceBank, arith_outcomes: dict[int, Outcomes]
) -> None:
    seeds = sorted(arith_outcomes)
    ev = Evaluator(arith, split="test", seeds=seeds, difficulty=None, n_boot=10)
    for n in (1, 2, 3, 5):
        res = ev(BestOfN(n))
        for si, s in enumerate(seeds):
            out = arith_outcomes[s]
            budget = int(out.tokens[:, n].sum())
            alloc = run_plan(uniform_plan(out.k, s), out, budget)
            eps = res.episodes[si :: len(seeds)]  # question-major
            assert [e.seed for e in eps] == [s] * len(eps)
            assert (alloc.chains == n).all()
            assert alloc.spent == budget
            assert alloc.tokens.tolist() == [e.decoded for e in eps]
            assert alloc.correct.tolist() == [e.correct for e in eps]


def test_no_allocator_spends_more_than_the_budget(arith_report: FleetReport) -> None:
    r = arith_report
    assert list(r.budgets) == [2, 4, 8]
    assert r.allocators[:3] == [UNIFORM, MEAN_CURVE, PROBE]
    assert CURRENT in r.allocators and ORACLE_REALIZED in r.allocators
    assert len(r.rows) == 3 * len(r.allocators)
    for row in r.rows:
        per_seed = row.spent.sum(axis=0)
        assert row.spent.shape == (24, 3)
        assert (per_seed <= row.budget).all()
        assert row.max_tokens <= row.budget
        assert (row.voted <= 16).all()
        assert set(row.diffs) == set(BASELINES) - {row.allocator}
    # the cut chain spends what is left: a plan that still has chains spends all of it
    uniform = [r.row(UNIFORM, n) for n in r.budgets]
    assert all((u.spent.sum(axis=0) == u.budget).all() for u in uniform)


def test_the_realized_oracle_bounds_every_allocator(arith_report: FleetReport) -> None:
    r = arith_report
    for n in r.budgets:
        top = r.row(ORACLE_REALIZED, n).correct.sum(axis=0)
        for a in r.allocators:
            assert (r.row(a, n).correct.sum(axis=0) <= top).all(), (a, n)
    assert r.row(ORACLE_REALIZED, 2).accuracy.mean > r.row(UNIFORM, 2).accuracy.mean


def test_the_table_is_deterministic_and_serialises(arith_report: FleetReport) -> None:
    again = fleet_table(ARITH, seeds=3, n_boot=200)
    doc = arith_report.to_json()
    assert again.to_json() == doc
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text)["rows"][0]["allocator"] == UNIFORM
    md = arith_report.markdown()
    assert "| uniform |" in md and "allocator − uniform" in md
    assert md == again.markdown()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.sampled_from([0, 1, 2]),
    plan_seed=st.integers(0, 2**16),
    share=st.floats(0.0, 1.2),
)
def test_any_plan_keeps_the_budget_and_stays_under_the_oracle(
    arith_outcomes: dict[int, Outcomes], seed: int, plan_seed: int, share: float
) -> None:
    out = arith_outcomes[seed]
    budget = int(share * out.tokens[:, -1].sum())
    rng = np.random.default_rng(plan_seed)
    plan = [int(q) for q in rng.integers(0, out.k.size, size=int(rng.integers(0, 400)))]
    alloc = run_plan(plan, out, budget)
    assert alloc.spent <= budget
    assert (alloc.chains <= out.k).all()
    # the chains that voted are a prefix of each question's order
    voted = out.tokens[np.arange(out.k.size), alloc.chains]
    assert (alloc.tokens >= voted).all()
    assert alloc.correct.sum() <= oracle_allocation(out, budget).correct.sum()
    top = oracle_allocation(out, budget)
    assert top.spent <= budget


def test_a_planted_difficulty_signal_lets_the_probe_beat_uniform(tmp_path: Path) -> None:
    bank, _ = planted_bank(tmp_path / "bank", n_train=48, n_test=48, chains=16)
    r = fleet_table(bank, seeds=3, n_boot=200)
    assert r.questions["test"] == 48 and r.questions["annotated"] == 96
    probe, base = r.row(PROBE, 4), r.row(UNIFORM, 4)
    assert probe.diffs[UNIFORM].mean >= 0.03
    assert probe.accuracy.mean - base.accuracy.mean == pytest.approx(probe.diffs[UNIFORM].mean)
    assert probe.diffs[MEAN_CURVE].mean > 0
    assert probe.max_tokens <= probe.budget


def test_greedy_plan_jumps_to_where_a_vote_gains_and_stops_where_none_does() -> None:
    flat = [0.0, 0.9, 0.9, 0.9, 0.9]  # one chain is all it needs
    odd = [0.0, 0.4, 0.4, 0.7, 0.7]  # a second chain only ties: gains at three
    c = Curves(np.array([flat, odd]), np.array([10.0, 10.0]), np.array([4, 4]))
    assert greedy_plan(c) == [0, 1, 1, 1]
    short = Curves(np.array([odd, odd]), np.array([10.0, 10.0]), np.array([4, 2]))
    assert greedy_plan(short) == [0, 1, 0, 0]
    # equal gains: the order drawn with the seed decides, and every question still gets its jump
    same = Curves(np.array([odd] * 5), np.full(5, 10.0), np.full(5, 4))
    for s in (0, 1):
        plan = greedy_plan(same, s)
        assert sorted(plan) == sorted(list(range(5)) * 3)
        assert plan == greedy_plan(same, s)


def test_uniform_plan_gives_every_question_a_round_before_the_next() -> None:
    plan = uniform_plan(np.array([3, 1, 3]), seed=4)
    assert plan[:3] == [0, 1, 2]
    assert sorted(plan[3:5]) == [0, 2] and plan[3:5] == plan[5:7]
    assert len(plan) == 7


def test_kernel_curves_read_off_the_nearest_training_questions() -> None:
    train = Curves(
        np.array([[0.0, 0.1, 0.1], [0.0, 0.9, 0.95]]), np.array([100.0, 20.0]), np.array([2, 2])
    )
    c = kernel_curves(np.array([0.0, 1.0]), train, np.array([-5.0, 6.0, 0.5]), np.array([2, 2, 3]))
    np.testing.assert_allclose(c.accuracy[0], [0.0, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(c.accuracy[1], [0.0, 0.9, 0.95, 0.95])
    np.testing.assert_allclose(c.accuracy[2], [0.0, 0.5, 0.525, 0.525])
    np.testing.assert_allclose(c.cost, [100.0, 20.0, 60.0])
    flat = kernel_curves(np.zeros(2), train, np.zeros(1), np.array([2]))
    np.testing.assert_allclose(flat.accuracy[0], train.accuracy.mean(axis=0))


def test_without_hidden_states_the_probe_is_left_out_and_extras_plug_in() -> None:
    def mean(setup: FleetSetup, seed: int) -> Curves:
        nt, nq = len(setup.train), len(setup.test)
        return kernel_curves(np.zeros(nt), setup.train_curves, np.zeros(nq), setup.k_test)

    r = fleet_table(ARITH, seeds=2, budgets=(3,), hidden=False, n_boot=50, extra={"mine": mean})
    assert PROBE not in r.allocators and r.questions["annotated"] is None
    assert any("no hidden states" in n for n in r.notes)
    assert r.allocators.index("mine") < r.allocators.index(ORACLE_REALIZED)
    assert (r.row("mine", 3).correct == r.row(MEAN_CURVE, 3).correct).all()
    with pytest.raises(ConfigError, match="may not be named"):
        fleet_table(ARITH, seeds=1, hidden=False, n_boot=50, extra={UNIFORM: mean})
    with pytest.raises(ConfigError, match="at most 16 chains"):
        fleet_table(ARITH, seeds=1, budgets=(17,), hidden=False, n_boot=50)


class _ByChains:
    """A policy whose value of going on is its opening chain's token count (a stand-in for a
    learned value: what matters here is which question each value belongs to)."""

    lam = None
    hidden_probes = None

    def with_lam(self, lam: float | None) -> _ByChains:
        return self

    def value(self, obs: np.ndarray) -> np.ndarray:
        from env.episode.observation import FEATURE_NAMES

        return np.asarray(obs[:, FEATURE_NAMES.index("budget_used")], np.float64)


def test_the_learned_value_allocator_scores_each_question_from_one_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import env.episode.vector as vector
    from policies.evaluation.fleet import FleetSetup
    from policies.evaluation.fleet_report import _fleet_setup
    from policies.hidden_run import value_curves

    setup, *_ = _fleet_setup(TraceBank(ARITH), False, None, 4, None)
    assert isinstance(setup, FleetSetup)
    built: list[int] = []
    real = vector.BatchedReplayEnv

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a: object, **kw: object) -> None:
            built.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr("policies.hidden_run.BatchedReplayEnv", Counting)
    fn = value_curves(_ByChains(), 1e-4)  # type: ignore[arg-type]
    curves = [fn(setup, s) for s in (0, 1, 2)]
    assert len(built) == 1  # flattening the bank is the cost: once for every seed

    def alone(questions: list, seed: int) -> np.ndarray:
        env = real(ARITH, len(questions), seed=0)
        index = {q.qid: i for i, q in enumerate(env.questions)}
        qs = np.array([index[q.qid] for q in questions], np.int64)
        obs, _ = env.reset(options={"questions": qs, "gen_seeds": np.full(len(qs), seed)})
        return _ByChains().value(obs)

    for seed, got in zip((0, 1, 2), curves, strict=True):
        want = kernel_curves(
            alone(setup.train, seed), setup.train_curves, alone(setup.test, seed), setup.k_test
        )
        np.testing.assert_array_equal(got.accuracy, want.accuracy)
        np.testing.assert_array_equal(got.cost, want.cost)
    assert not np.array_equal(curves[0].accuracy, curves[1].accuracy)  # the seed matters


def test_the_command_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    cmd = [sys.executable, "-m", "policies.evaluation.fleet", str(ARITH)]
    cmd += ["--seeds", "2", "--budgets", "2", "4", "--boot", "50", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "One budget shared by the test questions: testbed-arith" in proc.stdout
    assert "| difficulty probe |" in proc.stdout
    doc = json.loads(out.read_text())
    assert [b["chains_per_question"] for b in doc["budgets"]] == [2, 4]
    assert all(r["max_tokens"] <= r["budget"] for r in doc["rows"])
