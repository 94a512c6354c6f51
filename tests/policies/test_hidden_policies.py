"""Policies that read the model's hidden states: the probe rules (``probe-stop``,
``best-of-N-probe[-best]``), learned policies trained with hidden-state features (their declared
feature set, their probes saved with them), and the refusals when the states are missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from env.bank.store import TraceBank
from env.episode.hidden import HiddenProbes
from env.episode.observation import HIDDEN_SLICE
from env.episode.vector import BatchedReplayEnv
from features.errors import ConfigError, PolicyError
from policies.evaluation import Evaluator
from policies.learned import load_policy, train_ppo
from policies.learned.base import HIDDEN_PROBES_DIR
from policies.registry import load_policy as load_spec

ROOT = Path(__file__).resolve().parents[2]
BANK = ROOT / "data" / "banks" / "testbed-arith"

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def probes() -> HiddenProbes:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return HiddenProbes.fit(TraceBank(BANK), c_grid=(0.01, 0.1), alpha_grid=(10.0, 100.0))


@pytest.fixture(scope="module")
def trained(probes: HiddenProbes, tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch

    torch.set_num_threads(1)
    folder = probes.save(tmp_path_factory.mktemp("probes"), training=True)
    kw = {"total_steps": 4_096, "num_envs": 64, "eval_seeds": 0, "progress": False}
    return {
        "hidden": train_ppo(BANK, hidden_probes=str(folder), **kw),
        "base": train_ppo(BANK, **kw),
    }


def test_probe_rules_parse_and_declare_that_they_read_hidden_states() -> None:
    for spec, agg in [
        ("probe-stop-0.7", "probe-best"),
        ("best-of-4-probe", "probe"),
        ("best-of-4-probe-best", "probe-best"),
    ]:
        p = load_spec(spec)
        assert p.reads_hidden and p.aggregate == agg and p.hidden_probes is None
    assert not load_spec("best-of-4").reads_hidden
    with pytest.raises(PolicyError, match="threshold"):
        load_spec("probe-stop-1.5")


def test_the_evaluator_runs_probe_rules_with_its_own_probes() -> None:
    ev = Evaluator(BANK, split="test", seeds=3, n_boot=50)
    vote = ev(load_spec("best-of-16"))
    best = ev(load_spec("best-of-16-probe-best"))
    stop = ev(load_spec("probe-stop-0.6"))
    assert best.tokens.mean == pytest.approx(vote.tokens.mean)  # same chains, other answer
    assert [e.answer for e in best.episodes] != [e.answer for e in vote.episodes]
    assert stop.tokens.mean < vote.tokens.mean
    assert 0.0 <= stop.accuracy.mean <= 1.0


def test_the_evaluator_refuses_a_probe_rule_without_probes() -> None:
    ev = Evaluator(BANK, split="test", seeds=1, hidden=None, n_boot=10)
    with pytest.raises(ConfigError, match="hidden='auto'"):
        ev(load_spec("probe-stop"))
    ev(load_spec("best-of-2"))  # a rule that reads no hidden state runs as before


def test_a_hidden_policy_saves_its_probes_and_runs_with_them(trained: dict, tmp_path: Path) -> None:
    pol = trained["hidden"]
    assert pol.feature_set == "hidden" and pol.reads_hidden
    back = load_policy(pol.save(tmp_path / "p"))
    assert back.feature_set == "hidden" and back.hidden_probes is not None
    assert back.hidden_probes.held_out == {}  # the training-only probes are not saved
    ev = Evaluator(BANK, split="test", seeds=2, n_boot=10)
    assert ev.probes_for(back) is back.hidden_probes
    a = ev(pol.with_lam(1e-4))
    b = ev(back.with_lam(1e-4))
    assert [e.decoded for e in a.episodes] == [e.decoded for e in b.episodes]
    assert [e.correct for e in a.episodes] == [e.correct for e in b.episodes]
    # its probes are part of it: damaged or missing, the policy is refused by name
    shutil.rmtree(tmp_path / "p" / HIDDEN_PROBES_DIR / "chain")
    with pytest.raises(PolicyError, match="probes"):
        load_policy(tmp_path / "p")


def test_a_base_policy_never_reads_the_hidden_features(trained: dict, probes: HiddenProbes) -> None:
    pol = trained["base"]
    assert pol.feature_set == "base" and not pol.reads_hidden
    obs, _ = BatchedReplayEnv(BANK, 128, seed=5, probes=probes).reset(seed=5)
    scrambled = obs.copy()
    scrambled[:, HIDDEN_SLICE] = np.random.default_rng(0).random(
        (obs.shape[0], HIDDEN_SLICE.stop - HIDDEN_SLICE.start)
    )
    p = pol.with_lam(1e-4)
    p.reset(obs.shape[0])
    np.testing.assert_array_equal(p.act(obs), p.act(scrambled))
    h = trained["hidden"].with_lam(1e-4)
    h.reset(obs.shape[0])
    assert not np.array_equal(h.critic(h._inputs(obs)), h.critic(h._inputs(scrambled)))
