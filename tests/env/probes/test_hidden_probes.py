"""The hidden-state probes: they find a planted signal, fit on training questions only, save and
load exactly, read their extra inputs as the environments compute them, and refuse hidden states
or files that are not theirs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from env.bank.hidden import HiddenStates
from env.bank.store import TraceBank
from env.episode.rules import ChainFold, fold_answer, fold_chunk
from env.probes import (
    BOUNDARY_EXTRAS,
    LinearProbe,
    ProbeFit,
    ProbeSchema,
    auroc,
    boundary_extras,
    boundary_set,
    cross_fit,
    fit_chain_like,
    fit_chain_probe,
    fit_probes,
    prompt_set,
    spearman,
    within_auroc,
)
from env.probes.synthetic import planted_bank
from env.questions import select_split
from features.errors import ConfigError, ModelError

# A small grid keeps the fit well under a second.
GRID: dict[str, Any] = {
    "c_grid": (0.01, 1.0),
    "alpha_grid": (1.0, 100.0),
    "extra_choices": ((), ("budget_open", "ended", "mean_confidence")),
    "weight_grid": (1.0, 10.0),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[TraceBank, HiddenStates]:
    return planted_bank(tmp_path_factory.mktemp("probes") / "bank")


@pytest.fixture(scope="module")
def fitted(planted: tuple[TraceBank, HiddenStates]) -> ProbeFit:
    with threadpool_limits(1):
        return fit_probes(*planted, **GRID)


def test_planted_direction_is_found_on_test_questions(
    planted: tuple[TraceBank, HiddenStates], fitted: ProbeFit
) -> None:
    bank, hs = planted
    test = [bank.question(q) for q in fitted.splits["test"]]
    b = boundary_set(bank, hs, test)
    last = b.take(b.last)
    p = fitted.chain(last.states, last.layers, last.extras)
    assert auroc(last.correct, p) > 0.95
    assert within_auroc(last.correct, p, last.question) > 0.9
    assert 4 in fitted.chain.layers  # the signal is planted in the last layer only
    # and at every boundary, not only the last
    assert auroc(b.correct, fitted.chain(b.states, b.layers, b.extras)) > 0.95
    ps = prompt_set(bank, hs, test)
    assert spearman(fitted.difficulty(ps.states, ps.layers), ps.pass_rate) > 0.7
    # the layer that holds nothing ranks chains at chance
    _, noise = fitted.by_layers[(2,)]
    assert abs(auroc(last.correct, noise(last.states, last.layers, last.extras)) - 0.5) < 0.2


def test_no_test_question_is_read_while_fitting(
    planted: tuple[TraceBank, HiddenStates], monkeypatch: pytest.MonkeyPatch
) -> None:
    bank, hs = planted
    test_ids = {q.qid for q in select_split(bank.questions, "test")}
    train_ids = [q.qid for q in select_split(bank.questions, "train")]
    assert test_ids and train_ids
    read: set[str] = set()
    chunks, states = TraceBank.__getitem__, HiddenStates._load

    def spy_chunks(self: TraceBank, qid: str) -> Any:
        read.add(qid)
        return chunks(self, qid)

    def spy_states(self: HiddenStates, qid: str) -> Any:
        read.add(qid)
        return states(self, qid)

    monkeypatch.setattr(TraceBank, "__getitem__", spy_chunks)
    monkeypatch.setattr(HiddenStates, "_load", spy_states)
    fit = fit_probes(bank, hs, **GRID)
    assert read == set(train_ids)
    for probe in (fit.chain, fit.difficulty):
        assert probe.meta["questions"] == train_ids
        assert not set(probe.meta["questions"]) & test_ids
        assert set(probe.meta["dev_questions"]) < set(train_ids)
    assert set(fit.splits["dev"]) | set(fit.splits["fit"]) == set(train_ids)


def test_save_and_load_round_trip_exactly(
    planted: tuple[TraceBank, HiddenStates], fitted: ProbeFit, tmp_path: Path
) -> None:
    bank, hs = planted
    b = boundary_set(bank, hs, bank.questions[:3])
    for probe, kind in ((fitted.chain, "chain-correctness"), (fitted.difficulty, "difficulty")):
        back = LinearProbe.load(probe.save(tmp_path / kind), kind=kind, hidden=hs.manifest)
        for name in ("mean", "scale", "coef"):
            np.testing.assert_array_equal(getattr(back, name), getattr(probe, name))
        assert back.intercept == probe.intercept
        assert back.schema == probe.schema
        assert back.params == json.loads(json.dumps(probe.params))
        assert back.meta == probe.meta
        np.testing.assert_array_equal(
            back(b.states, b.layers, b.extras), probe(b.states, b.layers, b.extras)
        )
        h = json.loads((tmp_path / kind / "probe.json").read_text())
        assert h["schema"]["features"] == list(probe.schema.features)
        assert h["schema"]["annotation"]["model"]["sha256"] == "synthetic"
        assert h["schema"]["annotation"]["projection"]["seed"] == 0
        assert h["schema"]["layers"] == list(probe.layers)


def test_a_probe_refuses_other_hidden_states(
    planted: tuple[TraceBank, HiddenStates], fitted: ProbeFit, tmp_path: Path
) -> None:
    _, hs = planted
    path = fitted.chain.save(tmp_path / "chain")
    m = hs.manifest
    other_model = dataclasses.replace(m, model={**m.model, "sha256": "another"}).fingerprinted()
    with pytest.raises(ModelError, match=r"model sha256.*`ponder probes my/bank`"):
        LinearProbe.load(path, hidden=other_model, bank="my/bank")
    other_dims = dataclasses.replace(m, dims=8).fingerprinted()
    with pytest.raises(ModelError, match="projected dimensions"):
        LinearProbe.load(path, hidden=other_dims)
    other_seed = dataclasses.replace(m, projection={**m.projection, "seed": 1}).fingerprinted()
    with pytest.raises(ModelError, match="seed 1"):
        LinearProbe.load(path, hidden=other_seed)
    without = dataclasses.replace(m, layers=[la for la in m.layers if la != 4]).fingerprinted()
    if 4 in fitted.chain.layers:
        with pytest.raises(ModelError, match=r"lack \[4\]"):
            LinearProbe.load(path, hidden=without)
    # the same states from an annotation with more layers are fine
    more = dataclasses.replace(m, layers=[1, *m.layers]).fingerprinted()
    assert fitted.chain.schema.mismatches(more) == []
    with pytest.raises(ModelError, match="not a difficulty probe"):
        LinearProbe.load(path, kind="difficulty")


def test_a_damaged_probe_file_is_refused_by_name(fitted: ProbeFit, tmp_path: Path) -> None:
    path = fitted.chain.save(tmp_path / "chain")
    weights = path / "weights.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelError, match=r"weights\.safetensors is truncated"):
        LinearProbe.load(path)
    weights.write_bytes(blob)
    LinearProbe.load(path)
    header = path / "probe.json"
    text = header.read_text()
    header.write_text(text[: len(text) // 2])
    with pytest.raises(ModelError, match=r"probe\.json is not valid JSON"):
        LinearProbe.load(path)
    header.write_text(text.replace('"L4/0"', '"L4/zero"'))
    with pytest.raises(ModelError, match="do not follow from its schema"):
        LinearProbe.load(path)
    with pytest.raises(ModelError, match="no probe at"):
        LinearProbe.load(tmp_path / "nothing")


def test_schema_and_inputs(planted: tuple[TraceBank, HiddenStates]) -> None:
    _, hs = planted
    schema = ProbeSchema.of(hs.manifest, [4], ["budget_fraction"])
    assert schema.features[0] == "L4/0" and schema.features[-1] == "budget_fraction"
    assert len(schema.features) == hs.dims + 1
    states = np.arange(2 * 2 * hs.dims, dtype=np.float32).reshape(2, 2, hs.dims)
    x = schema.inputs(states, hs.layers, {"budget_fraction": np.array([0.25, 0.5])})
    np.testing.assert_array_equal(x[:, : hs.dims], states[:, 1, :])
    np.testing.assert_array_equal(x[:, -1], [0.25, 0.5])
    with pytest.raises(ConfigError, match="also reads"):
        schema.inputs(states, hs.layers)
    with pytest.raises(ConfigError):
        ProbeSchema.of(hs.manifest, [3])
    with pytest.raises(ConfigError):
        ProbeSchema.of(hs.manifest, [4], ["chain_length"])


def test_boundary_rows_follow_the_bank(planted: tuple[TraceBank, HiddenStates]) -> None:
    bank, hs = planted
    q = bank.questions[0]
    b = boundary_set(bank, hs, [q])
    trace = bank[q.qid]
    assert len(b) == sum(c.n_main for c in trace.chains)
    assert int(b.last.sum()) == len(trace.chains)
    for c in trace.chains:
        rows = b.chain == c.chain
        assert list(b.chunk[rows]) == list(range(c.n_main))
        assert set(b.correct[rows]) == {c.correct}
    # after chunk k every chain appears once: where it is, or where it ended
    for k in range(int(b.chunk.max()) + 1):
        at = b.at_boundary(k)
        assert sorted(at.chain) == sorted(c.chain for c in trace.chains)


def test_cross_fit_predicts_each_question_from_a_fit_without_it(
    planted: tuple[TraceBank, HiddenStates], fitted: ProbeFit
) -> None:
    bank, hs = planted
    train = boundary_set(bank, hs, [bank.question(q) for q in fitted.splits["train"]])
    oof = cross_fit(train, fitted.chain, hs.manifest, folds=4)
    assert oof.shape == (len(train),) and ((oof > 0) & (oof < 1)).all()
    assert auroc(train.correct, oof) > 0.9
    # a question's rows move when its own label flips only if it was in the fit: it is not
    flipped = dataclasses.replace(train, correct=train.correct ^ (train.question == 0))
    again = cross_fit(flipped, fitted.chain, hs.manifest, folds=4)
    np.testing.assert_array_equal(again[train.question == 0], oof[train.question == 0])


def test_the_shipped_testbed_bank_is_annotated_and_probes_fit_on_it(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3] / "data" / "banks" / "testbed-arith"
    bank = TraceBank(root)
    hs = HiddenStates.open(root, bank)
    assert hs is not None and hs.complete and hs.layers == (2, 4)
    fit = fit_probes(bank, hs, layers=[(4,)], **GRID)
    assert len(fit.splits["train"]) == 24 and len(fit.splits["test"]) == 24
    back = LinearProbe.load(fit.chain.save(tmp_path / "c"), hidden=hs.manifest)
    b = boundary_set(bank, hs, [bank.question(q) for q in fit.splits["test"]])
    assert auroc(b.correct, back(b.states, b.layers, b.extras)) > 0.6


def test_boundary_extras_are_what_the_chain_had_at_the_boundary(
    planted: tuple[TraceBank, HiddenStates],
) -> None:
    bank, hs = planted
    b = boundary_set(bank, hs, bank.questions[:4])
    assert set(b.extras) == set(BOUNDARY_EXTRAS)
    ended = b.extras["ended"] == 1.0
    assert ended[b.last].all()  # the planted chains all stop
    np.testing.assert_array_equal(b.extras["budget_open"][ended], 0.0)
    np.testing.assert_array_equal(
        b.extras["budget_open"][~ended], b.extras["budget_fraction"][~ended]
    )
    np.testing.assert_array_equal(b.extras["mean_confidence"], b.confidence)
    # a chain's first boundary: one chunk, so no spread; its answer is the first it gave
    first = b.chunk == 0
    np.testing.assert_array_equal(b.extras["conf_std"][first], 0.0)
    probed = first & ~ended
    np.testing.assert_array_equal(b.extras["answer_same"][probed], 0.0)
    assert np.isin(b.extras["answer_agree"][probed], [0.0, 1.0]).all()
    # the one definition, on a chain's fold
    fold = ChainFold()
    e = boundary_extras(fold, tokens=0, stopped=False, max_tokens=10)
    assert all(math.isnan(e[k]) for k in ("mean_confidence", "chunk_confidence", "chunk_entropy"))
    assert all(math.isnan(e[k]) for k in ("conf_min", "conf_std", "answer_same", "answer_agree"))
    fold_chunk(fold, "a", [0.5, 0.7], [1.0, 2.0])
    fold_answer(fold, final_text=None, probe=lambda: "12")
    fold_chunk(fold, "b", [0.9, float("nan")], [0.25, 0.75])
    fold_answer(fold, final_text=None, probe=lambda: "7")
    assert boundary_extras(fold, tokens=5, stopped=False, max_tokens=10) == {
        "budget_fraction": 0.5,
        "ended": 0.0,
        "budget_open": 0.5,
        "mean_confidence": pytest.approx(0.7),
        "chunk_confidence": 0.9,
        "chunk_entropy": 0.5,
        # chunk confidences 0.6, 0.9: lowest, spread, rise per chunk
        "conf_min": pytest.approx(0.6),
        "conf_std": pytest.approx(0.15),
        "conf_slope": pytest.approx(0.3),
        # answers 12, 7: changed, two different, half agree with the one now
        "answer_same": 0.0,
        "answer_distinct": 2.0,
        "answer_agree": 0.5,
    }
    fold_chunk(fold, "c. The answer is \\boxed{7}", [0.3], [1.0])
    fold_answer(fold, final_text="The answer is \\boxed{7}", probe=lambda: "unused")
    e = boundary_extras(fold, tokens=30, stopped=True, max_tokens=10)
    assert (e["budget_fraction"], e["ended"], e["budget_open"]) == (1.0, 1.0, 0.0)
    assert fold.history == ["12", "7", "7"] and fold.probes == ["12", "7"]
    assert (e["answer_same"], e["answer_distinct"], e["answer_agree"]) == (1.0, 2.0, 2 / 3)
    # 0.6, 0.9, 0.3 at chunks 0, 1, 2: least-squares slope (0.3 - 0.6) / 2
    assert (e["conf_min"], e["conf_slope"]) == (pytest.approx(0.3), pytest.approx(-0.15))
    # a chain never probed (an env that does not probe) has no stability to read
    quiet = ChainFold()
    fold_chunk(quiet, "x", [0.5], [1.0])
    fold_answer(quiet, final_text=None, probe=None)
    e = boundary_extras(quiet, tokens=1, stopped=False, max_tokens=10)
    assert math.isnan(e["answer_same"]) and (e["conf_std"], e["conf_slope"]) == (0.0, 0.0)


def test_ended_states_and_missing_extra_values(planted: tuple[TraceBank, HiddenStates]) -> None:
    _, hs = planted
    d = hs.dims
    schema = ProbeSchema.of(hs.manifest, [4], ["mean_confidence"], ended_states=True)
    assert schema.features[d] == "ended*L4/0" and schema.features[-1] == "mean_confidence"
    assert len(schema.features) == 2 * d + 1
    states = np.random.default_rng(0).standard_normal((2, 2, d)).astype(np.float32)
    extras = {"ended": np.array([0.0, 1.0]), "mean_confidence": np.array([0.3, 0.6])}
    x = schema.inputs(states, hs.layers, extras)
    np.testing.assert_array_equal(x[0, d : 2 * d], 0.0)
    np.testing.assert_array_equal(x[1, d : 2 * d], states[1, 1])
    with pytest.raises(ConfigError, match="ended"):
        schema.inputs(states, hs.layers, {"mean_confidence": extras["mean_confidence"]})
    n = len(schema.features)
    probe = LinearProbe(
        "chain-correctness",
        schema,
        np.full(n, 0.5),
        np.ones(n),
        np.random.default_rng(1).standard_normal(n),
        0.1,
    )
    # a chain with no token confidence yet reads the training mean: it moves nothing
    missing = {**extras, "mean_confidence": np.array([np.nan, 0.6])}
    at_mean = {**extras, "mean_confidence": np.array([0.5, 0.6])}
    np.testing.assert_array_equal(
        probe(states, hs.layers, missing), probe(states, hs.layers, at_mean)
    )


def test_fitting_reads_missing_values_as_the_mean_and_weights_the_extras(
    planted: tuple[TraceBank, HiddenStates],
) -> None:
    from sklearn.linear_model import LogisticRegression

    bank, hs = planted
    b = boundary_set(bank, hs, select_split(bank.questions, "train"))
    conf = b.extras["mean_confidence"].copy()
    conf[::3] = np.nan
    holed = dataclasses.replace(b, extras={**b.extras, "mean_confidence": conf})
    p = fit_chain_probe(holed, hs.manifest, layers=[4], extras=["mean_confidence"], c=0.1)
    assert np.isfinite(p(holed.states, holed.layers, holed.extras)).all()
    assert p.mean[-1] == pytest.approx(np.nanmean(conf))
    # a large extras weight lifts their penalty: with the state all but silenced, the extras'
    # coefficients are an unpenalised logistic regression's on them alone
    names = ["budget_open", "mean_confidence"]
    p = fit_chain_probe(
        b, hs.manifest, layers=[4], extras=names, c=1e-6, extras_weight=1e4, ended_states=False
    )
    assert p.params["extras_weight"] == 1e4
    x = np.stack([b.extras[k] for k in names], axis=1)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    free = LogisticRegression(C=1e8, max_iter=2000, tol=1e-8).fit(z, b.correct.astype(int))
    np.testing.assert_allclose(p.coef[-2:], free.coef_[0], atol=2e-3)
    assert np.abs(p.coef[:-2]).max() < 1e-3
    with pytest.raises(ConfigError, match="extras_weight"):
        fit_chain_probe(b, hs.manifest, layers=[4], extras=names, c=0.1, extras_weight=0.0)


def test_a_refit_has_the_probes_configuration(
    planted: tuple[TraceBank, HiddenStates], fitted: ProbeFit
) -> None:
    bank, hs = planted
    train = boundary_set(bank, hs, [bank.question(q) for q in fitted.splits["train"]])
    again = fit_chain_like(train, fitted.chain, hs.manifest)
    assert again.schema == fitted.chain.schema and again.schema.ended_states
    assert again.params["C"] == fitted.chain.params["C"]
    assert again.params["extras_weight"] == fitted.chain.params["extras_weight"]
    np.testing.assert_allclose(again.coef, fitted.chain.coef, rtol=1e-9, atol=1e-12)


def test_a_version_1_probe_file_still_loads(
    planted: tuple[TraceBank, HiddenStates], tmp_path: Path
) -> None:
    bank, hs = planted
    b = boundary_set(bank, hs, select_split(bank.questions, "train"))
    old = fit_chain_probe(
        b, hs.manifest, layers=[4], extras=["budget_fraction", "ended"], c=0.1, ended_states=False
    )
    path = old.save(tmp_path / "old")
    header = path / "probe.json"
    h = json.loads(header.read_text())
    assert h["version"] == 2
    h["version"] = 1
    del h["schema"]["ended_states"]
    header.write_text(json.dumps(h))
    back = LinearProbe.load(path, hidden=hs.manifest)
    assert back.schema == old.schema
    np.testing.assert_array_equal(
        back(b.states, b.layers, b.extras), old(b.states, b.layers, b.extras)
    )
    h["version"] = 3
    header.write_text(json.dumps(h))
    with pytest.raises(ModelError, match="reads versions 1, 2"):
        LinearProbe.load(path)
