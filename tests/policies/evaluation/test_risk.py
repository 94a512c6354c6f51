"""Risk control (policies/evaluation/risk.py): the p-values, fixed-sequence testing, the
guarantee on synthetic exchangeable data, calibration on the shipped testbed banks, and
``ponder evaluate --risk`` / ``ponder serve --risk``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import cli
from env.episode.config import EnvConfig
from features.errors import ConfigError, PolicyError
from policies.evaluation.ltt import (
    binomial_p_value,
    certifiable_alpha,
    fixed_sequence,
    hoeffding_bentkus_p_value,
    learn_then_test,
)
from policies.evaluation.risk import RiskFamily, calibrate, question_losses, risk_family
from policies.evaluation.risk_cli import alpha_from_points, summary_lines
from policies.evaluation.runner import Evaluator
from policies.heuristics import BestOfN
from policies.registry import load_policy

ROOT = Path(__file__).resolve().parents[3]
SMALL = ROOT / "data" / "banks" / "testbed-arith"  # 24 train, 24 test questions
XL = ROOT / "data" / "banks" / "testbed-arith-xl"  # 160 train, 160 test questions
# The testbed banks' settings, which `ponder serve` must be given to serve what was calibrated.
TESTBED_SERVE = ["--chunk-tokens", "32", "--max-chain-tokens", "256"]


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binom(n, p) <= k), summed exactly (independent of scipy)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def _kl(a: float, b: float) -> float:
    return sum(x * math.log(x / y) for x, y in ((a, b), (1 - a, 1 - b)) if x > 0)


# -- the p-values ------------------------------------------------------------------------------


def test_hoeffding_bentkus_at_zero_loss_is_the_hoeffding_term() -> None:
    # no loss among 100: exp(-100 KL(0 || 0.05)) = 0.95^100 < e 0.95^100 (Bentkus)
    p = hoeffding_bentkus_p_value(0.0, 100, 0.05)
    assert p == pytest.approx(0.95**100, rel=1e-12)
    assert p == pytest.approx(0.0059205292, rel=1e-8)


def test_hoeffding_bentkus_takes_the_bentkus_term_when_smaller() -> None:
    # mean 0.1 over 100 against alpha 0.2: Hoeffding exp(-100 KL(0.1 || 0.2)) = 0.02550,
    # Bentkus e P(Binom(100, 0.2) <= 10) = 0.01548
    hoeffding = math.exp(-100 * _kl(0.1, 0.2))
    bentkus = math.e * _binom_cdf(10, 100, 0.2)
    assert hoeffding == pytest.approx(0.025502, abs=1e-6)
    assert bentkus == pytest.approx(0.015484, abs=1e-6)
    assert hoeffding_bentkus_p_value(0.1, 100, 0.2) == pytest.approx(bentkus, rel=1e-9)


@pytest.mark.parametrize(
    ("risk", "n", "alpha"),
    [(0.0, 127, 0.02), (0.05, 1000, 0.1), (1 / 3, 30, 0.5), (2 / 381, 127, 0.05), (0.3, 40, 0.2)],
)
def test_hoeffding_bentkus_is_the_smaller_of_its_two_bounds(
    risk: float, n: int, alpha: float
) -> None:
    hoeffding = math.exp(-n * _kl(min(risk, alpha), alpha))
    bentkus = math.e * _binom_cdf(math.ceil(round(n * risk, 9)), n, alpha)
    want = min(1.0, hoeffding, bentkus)
    assert hoeffding_bentkus_p_value(risk, n, alpha) == pytest.approx(want, rel=1e-9)


def test_a_mean_at_or_above_alpha_gives_p_one() -> None:
    assert hoeffding_bentkus_p_value(0.05, 200, 0.05) == 1.0
    assert hoeffding_bentkus_p_value(0.3, 200, 0.05) == 1.0


def test_float_noise_in_the_mean_does_not_add_a_failure() -> None:
    # 7 losses of 1/3 among 127 questions: ceil(n r) is 3 (7/3 rounds up), not 4
    n = 127
    r = (7 / 3) / n
    want = min(math.exp(-n * _kl(r, 0.05)), math.e * _binom_cdf(3, n, 0.05))
    assert hoeffding_bentkus_p_value(r, n, 0.05) == pytest.approx(want, rel=1e-9)


def test_binomial_p_value_is_the_exact_lower_tail() -> None:
    assert binomial_p_value(0, 127, 0.02) == pytest.approx(0.98**127, rel=1e-12)
    assert binomial_p_value(2, 20, 0.1) == pytest.approx(_binom_cdf(2, 20, 0.1), rel=1e-12)
    assert binomial_p_value(2, 20, 0.1) == pytest.approx(0.676927, abs=1e-6)


def test_certifiable_alpha_is_where_a_lossless_candidate_reaches_delta() -> None:
    a = certifiable_alpha(127, 0.1)
    assert a == pytest.approx(0.017967, abs=1e-6)
    assert hoeffding_bentkus_p_value(0.0, 127, a) == pytest.approx(0.1, rel=1e-9)
    assert hoeffding_bentkus_p_value(0.0, 127, 0.01) > 0.1  # 1 point: not with 127 questions


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 400),
    r1=st.floats(0, 1),
    r2=st.floats(0, 1),
    alpha=st.floats(0.001, 0.999),
)
def test_p_value_is_in_range_and_monotone_in_the_mean(
    n: int, r1: float, r2: float, alpha: float
) -> None:
    lo, hi = sorted((r1, r2))
    p_lo, p_hi = (hoeffding_bentkus_p_value(r, n, alpha) for r in (lo, hi))
    assert 0 <= p_lo <= p_hi + 1e-12 <= 1 + 1e-12


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: hoeffding_bentkus_p_value(0.1, 0, 0.1), "at least one loss"),
        (lambda: hoeffding_bentkus_p_value(1.5, 10, 0.1), r"in \[0, 1\]"),
        (lambda: hoeffding_bentkus_p_value(0.1, 10, 1.0), "alpha must be a fraction"),
        (lambda: binomial_p_value(11, 10, 0.1), "failures must be in 0..10"),
        (lambda: certifiable_alpha(10, 0.0), "delta must be a fraction"),
    ],
)
def test_bad_arguments_are_refused(call: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


# -- fixed-sequence testing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ps", "certified"),
    [
        ([0.01, 0.05, 0.2, 0.01], 2),  # the first p > delta ends it, later small ones never count
        ([0.2, 0.01], 0),
        ([0.1, 0.1], 2),  # p <= delta is certified
        ([0.01, float("nan"), 0.01], 1),
        ([], 0),
    ],
)
def test_fixed_sequence_stops_at_the_first_failure(ps: list[float], certified: int) -> None:
    assert fixed_sequence(ps, 0.1) == certified


def test_learn_then_test_on_synthetic_losses() -> None:
    rng = np.random.default_rng(0)
    n = 400
    u = rng.random(n)
    true = np.array([0.0, 0.01, 0.02, 0.2, 0.0])  # the last is never reached
    losses = (u[None, :] < true[:, None]).astype(float)
    out = learn_then_test(losses, alpha=0.05, delta=0.1)
    assert out.certified == 3
    assert out.p_values[3] == 1.0 and out.p_values[4] < 0.1
    assert out.risks == tuple(losses.mean(1))
    exact = learn_then_test(losses, alpha=0.05, delta=0.1, method="binomial")
    assert exact.certified == 3
    # the exact tail is never looser than Hoeffding-Bentkus on 0/1 losses
    assert all(b <= h + 1e-12 for b, h in zip(exact.p_values, out.p_values, strict=True))


def test_learn_then_test_refuses_what_its_p_values_do_not_cover() -> None:
    with pytest.raises(ConfigError, match="clip them first"):
        learn_then_test(np.array([[0.0, -0.5]]), 0.1, 0.1)
    with pytest.raises(ConfigError, match="needs losses of 0 or 1"):
        learn_then_test(np.array([[0.0, 1 / 3]]), 0.1, 0.1, method="binomial")
    with pytest.raises(ConfigError, match="matrix"):
        learn_then_test(np.zeros((2, 0)), 0.1, 0.1)


# -- the guarantee, on synthetic exchangeable data ---------------------------------------------


def _chosen_true_risk(losses: np.ndarray, true: np.ndarray, alpha: float, delta: float) -> float:
    """The true risk of the candidate Learn-then-Test picks (the most aggressive certified:
    costs fall along the grid), or 0 (the full vote) if none."""
    k = learn_then_test(losses, alpha, delta).certified
    return float(true[k - 1]) if k else 0.0


@pytest.mark.parametrize("seeds", [1, 3])
def test_the_guarantee_holds_over_random_calibration_sets(seeds: int) -> None:
    """Over many draws of the calibration questions, the chosen policy's risk on new questions
    exceeds alpha at most a delta share of the time (plus the Monte Carlo slack).

    The population: question ``q`` has a latent ``u[q, s]`` per seed, and candidate ``j`` loses
    on that episode if ``u < true[j]`` (a more aggressive candidate errs on a superset, as an
    earlier stop does); a question's loss is its mean over seeds, so the risk of candidate ``j``
    on new questions is exactly ``true[j]``. The test risk is that population risk: the
    realised loss of a finite test set scatters around it, which the guarantee does not bound.
    """
    alpha, delta, n, trials = 0.05, 0.1, 500, 1000
    true = np.linspace(0.0, 0.2, 41)
    rng = np.random.default_rng(seeds)
    bad = naive_bad = 0
    picked = []
    for _ in range(trials):
        u = rng.random((n, seeds))
        losses = (u[None, :, :] < true[:, None, None]).mean(axis=2)
        r = _chosen_true_risk(losses, true, alpha, delta)
        picked.append(r)
        bad += r > alpha
        # the naive rule: the cheapest candidate whose calibration mean is within alpha
        ok = np.flatnonzero(losses.mean(axis=1) <= alpha)
        naive_bad += true[ok.max()] > alpha
    slack = 3 * math.sqrt(delta * (1 - delta) / trials)  # 3 standard errors: 0.028
    assert bad / trials <= delta + slack
    # not vacuous: it certifies aggressive candidates (risk near alpha), and the naive rule,
    # which the same check would catch, breaks the level
    assert np.mean(picked) > 0.02
    assert naive_bad / trials > 2 * delta


# -- families ----------------------------------------------------------------------------------


def test_heuristic_families_are_ordered_most_conservative_first() -> None:
    c = EnvConfig(max_chains=16)
    ac = risk_family("adaptive-consistency", config=c)
    assert ac.param == "threshold"
    assert list(ac.values) == sorted(ac.values, reverse=True)
    assert ac.make(ac.values[0]).name == "adaptive-consistency-0.999"
    assert risk_family("esc", config=c).values == (16.0, 12.0, 8.0, 4.0)
    assert risk_family("ESC-4", config=c).name == "esc"
    assert risk_family("best-of", config=c).values[0] == 16.0
    assert risk_family("best-of-verifier", config=c).make(4).name == "best-of-4-verifier"
    assert risk_family("probe-agree", config=c).values[-1] == 1.0
    assert risk_family("s1", config=EnvConfig(chunk_tokens=32, max_chain_tokens=256)).values == (
        320.0, 256.0, 128.0, 64.0, 32.0,
    )  # fmt: skip
    esc = risk_family("esc", config=c)
    assert esc.make(8).max_n == 8  # type: ignore[attr-defined]


def test_a_grid_is_sorted_deduplicated_and_checked() -> None:
    fam = risk_family("adaptive-consistency", grid=[0.9, 0.99, 0.9, 0.95])
    assert fam.values == (0.99, 0.95, 0.9)
    with pytest.raises(ConfigError, match="threshold must be in"):
        risk_family("adaptive-consistency", grid=[0.9, 1.5])
    with pytest.raises(ConfigError, match="whole numbers"):
        risk_family("best-of", grid=[2.5])
    with pytest.raises(ConfigError, match="empty"):
        risk_family("esc", grid=[])


@pytest.mark.parametrize("spec", ["single", "random", "router", "bounded-64-512"])
def test_a_policy_without_a_parameter_is_refused(spec: str) -> None:
    with pytest.raises(PolicyError, match="has no stopping parameter to calibrate") as e:
        risk_family(spec)
    assert "adaptive-consistency (threshold)" in str(e.value)


@pytest.mark.parametrize(
    ("spec", "family"),
    [
        ("adaptive-consistency-0.9", "adaptive-consistency"),
        ("esc-4-max8", "esc"),
        ("best-of-4", "best-of"),
        ("best-of-4-confidence", "best-of-confidence"),
        ("probe-agree-3", "probe-agree"),
        ("s1-256", "s1"),
        ("deepconf-online-90", "deepconf-online"),
    ],
)
def test_a_member_with_its_parameter_fixed_is_refused(spec: str, family: str) -> None:
    with pytest.raises(PolicyError, match=f"give the family's name, '{family}'"):
        risk_family(spec)


def test_an_unknown_spec_gets_the_registry_message() -> None:
    with pytest.raises(PolicyError, match="unknown policy"):
        risk_family("adaptive-consistancy")


class LamBestOf(BestOfN):
    """A stand-in learned policy: best-of-N with N falling as the price λ rises."""

    def __init__(self, lam: float | None = None) -> None:
        self.lam = lam
        super().__init__(max(1, round(16 / (1 + 1e4 * (lam or 0.0)))))
        self.name = f"lam-best-of-lam{lam or 0:g}"

    def with_lam(self, lam: float | None) -> LamBestOf:
        return LamBestOf(lam)


def test_a_learned_policy_is_calibrated_over_lam_ascending() -> None:
    fam = risk_family(LamBestOf(), grid=[1e-3, 0.0, 1e-4])
    assert fam.param == "lam"
    assert fam.values == (0.0, 1e-4, 1e-3)
    assert [fam.make(v).n_chains for v in fam.values] == [16, 8, 1]  # type: ignore[attr-defined]


# -- calibration on the shipped testbed banks --------------------------------------------------


def test_question_losses_are_the_accuracy_given_up_per_question() -> None:
    ev = Evaluator(SMALL, split="train", seeds=2, difficulty=None)
    full = ev(load_policy("best-of-16", config=ev.config))
    one = ev(load_policy("single", config=ev.config))
    qids, loss = question_losses(one, full)
    assert len(qids) == len(ev.questions) == loss.size
    assert np.all((loss >= -1) & (loss <= 1))
    assert loss.mean() == pytest.approx(full.accuracy.mean - one.accuracy.mean)
    _, zero = question_losses(full, full)
    assert not zero.any()
    other = Evaluator(SMALL, split="test", seeds=2, difficulty=None)(load_policy("best-of-16"))
    with pytest.raises(ConfigError, match="same episodes"):
        question_losses(one, other)


@pytest.fixture(scope="module")
def xl_result() -> Any:
    return calibrate("adaptive-consistency", XL, alpha=0.05, delta=0.1, seeds=3, n_boot=500)


def test_calibration_on_the_testbed_bank(xl_result: Any) -> None:
    r = xl_result
    assert (r.questions, r.seeds, r.full_vote) == (160, (0, 1, 2), "best-of-16")
    assert [row.value for row in r.rows] == sorted((row.value for row in r.rows), reverse=True)
    statuses = [row.status for row in r.rows]
    k = statuses.count("certified")
    assert statuses[:k] == ["certified"] * k
    assert all(row.p_value <= r.delta for row in r.rows[:k])
    if k < len(r.rows):
        assert statuses[k] == "stops the sequence" and r.rows[k].p_value > r.delta
        assert set(statuses[k + 1 :]) <= {"not tested"}
    assert k >= 1 and r.chosen is not None  # alpha = 5 points is certifiable on 160 questions
    assert r.chosen.tokens == min(row.tokens for row in r.rows[:k])
    assert r.chosen.tokens < r.full_tokens
    assert r.policy is not None and r.policy.name == r.chosen.policy == r.policy_name
    for row in r.rows:
        assert 0 <= row.risk <= 1 and row.risk >= row.loss - 1e-12
    t = r.test
    assert t is not None and t.questions == 160 and t.split == "test"
    assert t.loss.low <= t.loss.mean <= t.loss.high
    assert t.loss.mean == pytest.approx(t.full_accuracy.mean - t.accuracy.mean)
    assert t.clipped_loss.mean >= t.loss.mean - 1e-12
    assert 0 < t.saved.mean < 1
    assert t.saved.mean == pytest.approx(1 - t.tokens.mean / t.full_tokens.mean)
    assert t.within_alpha == (t.loss.mean <= r.alpha)
    lines = summary_lines(r)
    assert lines[1].startswith(f"chose {r.chosen.policy}")
    assert "saved" in lines[2]
    data = r.to_dict()
    json.dumps(data)
    assert data["chosen"]["policy"] == r.chosen.policy and "policy" not in data


def test_calibration_is_deterministic() -> None:
    a = calibrate("esc", SMALL, alpha=0.2, seeds=2, n_boot=200)
    b = calibrate("esc", SMALL, alpha=0.2, seeds=2, n_boot=200)
    assert a.to_dict() == b.to_dict()


def test_too_few_questions_leave_the_full_vote() -> None:
    # 24 calibration questions cannot certify 5 points at delta 0.1 (it takes 45)
    r = calibrate("adaptive-consistency", SMALL, alpha=0.05, seeds=2, n_boot=200)
    assert r.chosen is None
    assert r.policy_name == "best-of-16" and r.policy is not None
    assert r.min_alpha == pytest.approx(1 - 0.1 ** (1 / 24))
    assert r.test is not None and r.test.loss.mean == 0 and r.test.saved.mean == 0
    text = "\n".join(summary_lines(r))
    assert "no threshold certified" in text
    assert "nothing can be certified below alpha = 9.15 points" in text
    assert "n >= 45 questions" in text


def test_a_learned_family_calibrates_its_lam() -> None:
    fam = risk_family(LamBestOf(), grid=[0.0, 1e-4, 3e-4, 1e-3])
    r = calibrate(fam, SMALL, alpha=0.3, seeds=2, test_split=None)
    assert r.param == "lam" and r.test is None
    assert r.rows[0].policy == "lam-best-of-lam0"
    assert r.rows[0].loss == 0 and r.rows[0].status == "certified"


def test_a_learned_policy_is_not_calibrated_on_its_own_training_questions(tmp_path: Path) -> None:
    from policies.learned import train_stop_policy

    kw = {"orders": 4, "num_envs": 64, "eval_seeds": 0, "progress": False}
    train_stop_policy(SMALL, split="train", **kw).save(tmp_path / "train")
    with pytest.raises(ConfigError, match=r"trained on the 'train' questions.*18 of the 18"):
        calibrate(str(tmp_path / "train"), SMALL, alpha=0.3, split="fit", test_split=None)
    # a record of other questions (the bank grew since): it cannot tell, and says so
    grown = load_policy(str(tmp_path / "train"))
    grown.meta["bank"] = {**grown.meta["bank"], "questions_sha256": "0" * 64}
    with pytest.warns(UserWarning, match="cannot tell whether it saw"):
        calibrate(
            risk_family(grown, grid=[1e-3]), SMALL, alpha=0.3, split="fit", seeds=1, test_split=None
        )
    # trained on fit, calibrated on dev: the questions it never saw
    train_stop_policy(SMALL, split="fit", **kw).save(tmp_path / "fit")
    r = calibrate(str(tmp_path / "fit"), SMALL, alpha=0.3, split="dev", seeds=2, test_split=None)
    assert r.param == "lam" and r.rows


def test_calibration_and_test_questions_must_be_apart() -> None:
    with pytest.raises(ConfigError, match="share 24 questions"):
        calibrate("esc", SMALL, alpha=0.1, split="train", test_split="train")
    with pytest.raises(ConfigError, match="share 6 questions"):
        calibrate("esc", SMALL, alpha=0.1, split="dev", test_split="train")
    with pytest.raises(ConfigError, match="a grid goes with a family's spec"):
        calibrate(risk_family("esc"), SMALL, alpha=0.1, grid=[4])
    with pytest.raises(ConfigError, match="alpha must be a fraction"):
        calibrate("esc", SMALL, alpha=2)


def test_a_risk_family_can_be_made_by_hand() -> None:
    fam = RiskFamily("best-of", "N", (16.0, 2.0), lambda n: load_policy(f"best-of-{n:g}"))
    r = calibrate(fam, SMALL, alpha=0.5, seeds=1, test_split=None, method="binomial")
    assert [row.policy for row in r.rows] == ["best-of-16", "best-of-2"]
    assert r.method == "binomial"


# -- the command line --------------------------------------------------------------------------


def test_alpha_is_given_in_points() -> None:
    assert alpha_from_points(2) == 0.02
    assert alpha_from_points(0.5) == 0.005
    for bad in (0, -1, 100, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="in points"):
            alpha_from_points(bad)


def run_ponder(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PONDER_DEBUG", None)
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_evaluate_risk_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "risk.json"
    proc = run_ponder(
        "evaluate", "--risk", "20", "--policy", "adaptive-consistency", "--bank", str(SMALL),
        "--seeds", "2", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "best-of-16 (full vote)" in proc.stdout
    assert "adaptive-consistency-0.999" in proc.stdout and "certified" in proc.stdout
    assert "alpha = 20 points, delta = 0.1, 24 train questions x 2 seeds" in proc.stdout
    assert "test (24 test questions)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["alpha"] == 0.2 and data["delta"] == 0.1 and data["method"] == "hb"
    assert len(data["rows"]) == 12 and data["test"]["questions"] == 24
    assert data["chosen"] is None or data["chosen"]["status"] == "certified"


def test_evaluate_help_mentions_risk_and_risk_help_lists_its_options() -> None:
    proc = run_ponder("evaluate", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--lam" in proc.stdout and "With --risk ALPHA" in proc.stdout
    proc = run_ponder("evaluate", "--risk", "2", "--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--risk", "--delta", "--grid", "--calibration-split", "--method", "--json"):
        assert option in proc.stdout
    proc = run_ponder("serve", "--help")
    assert proc.returncode == 0 and "--calibration-bank BANK" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--risk", "2", "--policy", "single"], "'single' has no stopping parameter"),
        (["--risk", "2", "--policy", "adaptive-consistency-0.9"], "give the family's name"),
        (["--risk=150", "--policy", "esc"], "strictly between 0 and 100, got 150.0"),
        (["--risk", "2", "--policy", "esc", "--delta", "0"], "--delta must be a fraction"),
        (["--risk", "2", "--policy", "esc", "--split", "train"], "share 24 questions"),
        (["--risk", "2", "--policy", "esc", "--seeds", "0"], "--seeds must be >= 1"),
        (["--risk", "2", "--policy", "best-of", "--grid", "1.5"], "whole numbers"),
    ],
)
def test_evaluate_risk_refusals_are_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["evaluate", *args, "--bank", str(SMALL)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err


def test_serve_risk_calibrates_then_serves_the_chosen_policy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from controller import proxy

    served: list[dict[str, Any]] = []

    def fake_main(argv: list[str]) -> None:
        folder = Path(argv[argv.index("--policy") + 1])
        served.append(
            {"argv": argv, "heuristic": json.loads((folder / "heuristic.json").read_text())}
        )

    monkeypatch.setattr(proxy, "main", fake_main)
    argv = ["serve", "--risk", "5", "--calibration-bank", str(XL), "--seeds", "2", "--port", "8123"]
    assert cli.main([*argv, *TESTBED_SERVE]) == 0
    assert len(served) == 1
    rest = served[0]["argv"]
    assert rest[:2] == ["--port", "8123"] and set(TESTBED_SERVE) <= set(rest)
    assert "--risk" not in rest and "--calibration-bank" not in rest
    err = capsys.readouterr().err
    assert "ponder serve --risk: adaptive-consistency: alpha = 5 points" in err
    name = served[0]["heuristic"]["name"]
    assert f"ponder serve --risk: chose {name} (threshold = " in err
    assert f"ponder serve --risk: serving {name}" in err
    assert served[0]["heuristic"]["params"]["max_n"] == 16


def test_serve_risk_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    # the bank's settings must be the served ones
    assert cli.main(["serve", "--risk", "5", "--calibration-bank", str(SMALL)]) == 1
    err = capsys.readouterr().err
    assert "pass --chunk-tokens 32 --max-chain-tokens 256" in err
    argv = ["serve", "--risk", "5", "--calibration-bank", str(SMALL), *TESTBED_SERVE]
    assert cli.main([*argv, "--policy", "single"]) == 1
    assert "'single' has no stopping parameter" in capsys.readouterr().err
    assert cli.main(["serve", "--risk", "0.0", "--calibration-bank", str(SMALL)]) == 1
    assert "strictly between 0 and 100" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # no bank to calibrate on: a usage error
        cli.main(["serve", "--risk", "5"])
    assert e.value.code == 2
    assert "--calibration-bank" in capsys.readouterr().err
