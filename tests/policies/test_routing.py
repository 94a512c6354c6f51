"""Routing by query type: the classifier, and the router against one strategy for all."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from env.bank.synthetic import record_fake_code_bank
from env.questions import load_questions
from features.errors import ConfigError
from policies.evaluation.routing import evaluate_routing
from policies.routing import (
    QueryClassifier,
    classifier_report,
    training_questions,
)

GSM8K = Path(__file__).resolve().parents[2] / "data" / "banks" / "gsm8k-qwen2.5-coder-1.5b"


@pytest.fixture(scope="module")
def classifier() -> QueryClassifier:
    qs, kinds = training_questions()
    return QueryClassifier.fit([q.text for q in qs], kinds)


def test_the_classifier_tells_kinds_apart_on_test_questions(classifier: QueryClassifier) -> None:
    test = (
        load_questions("gsm8k", "test", 300, seed=1)
        + load_questions("math500", "test")
        + load_questions("humaneval", "test")
        + load_questions("factual", "test", 300, seed=1)
    )
    acc = classifier_report(classifier, test)
    # measured: code 100%, factual 100%, hard math 89%, multi-step 98% (only training questions
    # were read)
    assert acc["code"] >= 0.95 and acc["multistep"] >= 0.9 and acc["hardmath"] >= 0.8
    assert acc["factual"] >= 0.95
    assert classifier.predict([]) == []
    p = classifier.proba(['def f(x):\n    """Return x."""\n'])
    assert p.shape == (1, len(classifier.kinds)) and abs(float(p.sum()) - 1) < 1e-5


def test_the_splits_of_math500_are_disjoint_halves() -> None:
    from env.questions import question_split

    train, test = load_questions("math500", "train"), load_questions("math500", "test")
    assert 200 < len(train) < 300 and len(train) + len(test) == 500
    assert {question_split(q) for q in train} == {"train"}
    assert {question_split(q) for q in test} == {"test"}
    assert not {q.text for q in train} & {q.text for q in test}


def test_fitting_needs_two_kinds_and_matching_labels() -> None:
    with pytest.raises(ConfigError, match="two kinds"):
        QueryClassifier.fit(["a", "b"], ["code", "code"])
    with pytest.raises(ConfigError, match="as many kinds"):
        QueryClassifier.fit(["a"], ["code", "multistep"])


@pytest.mark.timeout(600)
def test_the_router_gives_each_kind_its_own_strategy(
    classifier: QueryClassifier, tmp_path: Path
) -> None:
    # a code bank where one chain is always right (the fake writes the reference solution):
    # the router should spend nothing extra there, and what it saves goes to GSM8K
    code = tmp_path / "code"
    record_fake_code_bank(code, n=6)
    res = evaluate_routing(
        [GSM8K, code],
        ["best-of-1", "best-of-4", "adaptive-consistency-0.95"],
        seeds=2,
        classifier=classifier,
    )
    assert res.questions["code"] == 6 and res.questions["multistep"] > 100
    assert res.classifier["code"] == 1.0
    assert len(res.router) >= len(res.single) >= 2
    for pts in (res.router, res.single):  # Pareto-optimal on the training questions
        train = [(p.train_tokens, p.train_accuracy) for p in pts]
        accs = [a for _, a in train]  # more tokens buy strictly more accuracy there
        assert train == sorted(train) and all(b > a for a, b in itertools.pairwise(accs))
    # where the single policy pays for votes everywhere, the router keeps one chain on code
    voting = [p for p in res.router if p.choice.get("multistep") != "best-of-1"]
    assert voting and all(p.choice["code"] == "best-of-1" for p in voting)
    assert res.met, res.shortfalls  # at or above the single policy's frontier
    for r in res.router:
        assert 0 <= r.accuracy <= 1 and r.tokens > 0 and {"code", "multistep"} <= set(r.choice)
    assert all(s.choice["all"] in res.candidates for s in res.single)


def test_the_pareto_assignments_are_every_undominated_one() -> None:
    from policies.evaluation.routing import _frontier, _pareto_assignments

    rng = np.random.default_rng(3)
    names = [f"c{i}" for i in range(5)]
    totals = {
        kind: {n: (float(rng.integers(0, 40)), float(rng.integers(100, 4000))) for n in names}
        for kind in ("code", "factual", "hardmath", "multistep")
    }
    brute = []
    for combo in itertools.product(names, repeat=len(totals)):
        pick = dict(zip(totals, combo, strict=True))
        brute.append(
            (sum(totals[k][n][1] for k, n in pick.items()),
             sum(totals[k][n][0] for k, n in pick.items()), pick)
        )  # fmt: skip
    want = [(t, a) for t, a, _ in _frontier(brute)]
    got = _pareto_assignments(totals, names)
    assert [(t, a) for t, a, _ in got] == want and len(got) > 5
    for tok, acc, pick in got:  # each point is what its assignment adds up to
        assert tok == sum(totals[k][n][1] for k, n in pick.items())
        assert acc == sum(totals[k][n][0] for k, n in pick.items())


@pytest.fixture(scope="module")
def stop_on_fit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from policies.learned.stop import train_stop_policy

    out = tmp_path_factory.mktemp("stop") / "stop-fit"
    train_stop_policy(GSM8K, split="fit", orders=4, num_envs=64, eval_seeds=0, progress=False).save(
        out
    )
    return out


def test_a_trained_policy_is_a_candidate_at_several_prices(stop_on_fit: Path) -> None:
    from policies.evaluation.routing import LEARNED_LAMS, _candidates, _in_sample

    cands = _candidates(["best-of-1", str(stop_on_fit), f"{stop_on_fit}@0.0002"])
    names = [c.name for c in cands]
    assert names[0] == "best-of-1" and names[-1] == "stop-fit@0.0002"
    assert names[1:-1] == [f"stop-fit@{lam:g}" for lam in LEARNED_LAMS]
    assert cands[-1].trained == ("gsm8k", "fit")
    # chosen on dev, a policy trained on fit is out of sample; chosen on train it is not
    assert _in_sample(cands, {"gsm8k", "humaneval"}, "dev") == []
    warned = _in_sample(cands, {"gsm8k"}, "train")
    assert len(warned) == len(LEARNED_LAMS) + 1 and "--choose-on dev" in warned[0]
    assert _in_sample(cands, {"humaneval"}, "train") == []
    with pytest.raises(ConfigError, match="not a price"):
        _candidates([f"{stop_on_fit}@cheap"])
    with pytest.raises(ConfigError, match="does not act for a price"):
        _candidates(["best-of-4@0.001"])


@pytest.mark.timeout(600)
def test_route_cli_writes_json_and_plot(stop_on_fit: Path, tmp_path: Path) -> None:
    import json

    from policies.evaluation.routing import main

    code = record_fake_code_bank(tmp_path / "code", n=3)
    out, png = tmp_path / "route.json", tmp_path / "route.png"
    main(
        ["--bank", str(GSM8K), str(code), "--candidates", "best-of-1", "best-of-4",
         f"{stop_on_fit}@0.0001", "--seeds", "1", "--choose-on", "dev",
         "--json", str(out), "--plot", str(png)]
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert doc["choose_on"] == "dev" and doc["warnings"] == []
    assert doc["banks"] == {"gsm8k-qwen2.5-coder-1.5b": "gsm8k", "code": "humaneval"}
    assert doc["questions"]["code"] == 3 and doc["questions"]["multistep"] == 200
    assert set(doc["candidates"]) == {"best-of-1", "best-of-4", "stop-fit@0.0001"}
    for p in doc["router"] + doc["single"]:  # each true kind's share, weighted back to the whole
        kinds = p["by_kind"]
        assert set(kinds) == {"code", "multistep"}
        whole = sum(doc["questions"][k] * v["accuracy"] for k, v in kinds.items()) / 203
        assert whole == pytest.approx(p["accuracy"], abs=1e-6)
    assert len(doc["router"]) >= len(doc["single"]) >= 2 and isinstance(doc["met"], bool)
    for p in doc["router"]:
        assert 0 <= p["accuracy"] <= 1 and p["tokens"] > 0
        assert set(p["choice"].values()) <= set(doc["candidates"])
    # at this price the trained policy votes: more chains than one, and more often right
    one, stop = doc["candidates"]["best-of-1"], doc["candidates"]["stop-fit@0.0001"]
    assert stop["tokens"] > 2 * one["tokens"] and stop["accuracy"] > one["accuracy"] + 0.05, doc
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_route_refuses_a_bad_choice_split() -> None:
    with pytest.raises(ConfigError, match="choose_on"):
        evaluate_routing([GSM8K], ["best-of-1"], choose_on="test")


def test_a_shortfall_carries_its_paired_interval() -> None:
    from policies.evaluation.metrics import bootstrap_mean
    from policies.evaluation.routing import _RESAMPLES, Shortfall

    def paired_interval(diff: np.ndarray) -> tuple[float, float]:  # as evaluate_routing's
        ci = bootstrap_mean(diff, n_boot=_RESAMPLES)
        return ci.low, ci.high

    # the router one question in ten worse, paired on 200 questions: an interval around -10 pt
    diff = np.zeros(200)
    diff[::10] = -1.0
    lo, hi = paired_interval(diff)
    assert lo < -0.1 < hi < 0 and paired_interval(diff) == (lo, hi)  # seeded
    assert paired_interval(np.zeros(50)) == (0.0, 0.0)
    text = Shortfall("best-of-4", 1200.0, 0.62, 0.52, (lo, hi)).describe()
    assert "best-of-4: 62.0% with 1,200 tokens" in text and "52.0% (-10.0 pt" in text
    assert f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" in text
    none = Shortfall("best-of-1", 300.0, 0.5, float("nan"), (float("nan"), float("nan")))
    assert none.describe().endswith("the router at no more tokens: none")
