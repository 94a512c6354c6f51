"""The probes' choices kept beside a bank's states (``hidden/probe-choices.json``): a refit of
the chosen point gives the probes the whole grid gave; the file is used only on the annotation
and training questions it was made on, and a damaged one is refused by name."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from env.bank.hidden import HiddenStates
from env.bank.store import TraceBank
from env.probes import LinearProbe, ProbeFit, fit_probes
from env.probes.choices import CHOICES_FILE, ProbeChoices
from env.probes.synthetic import planted_bank
from env.questions import select_split
from features.errors import ConfigError
from policies.hidden_run import probe_grid

GRID: dict[str, Any] = {
    "c_grid": (0.01, 0.1, 1.0),
    "alpha_grid": (1.0, 100.0),
    "extra_choices": ((), ("budget_open", "ended", "mean_confidence")),
    "weight_grid": (1.0, 10.0),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[TraceBank, HiddenStates]:
    return planted_bank(tmp_path_factory.mktemp("choices") / "bank", n_train=24, n_test=8)


@pytest.fixture(scope="module")
def full(planted: tuple[TraceBank, HiddenStates]) -> ProbeFit:
    with threadpool_limits(1):
        return fit_probes(*planted, **GRID)


def _same(a: LinearProbe, b: LinearProbe) -> None:
    assert a.layers == b.layers and a.schema == b.schema
    np.testing.assert_array_equal(a.coef, b.coef)
    assert a.intercept == b.intercept


def test_the_chosen_point_refits_to_the_probes_of_the_whole_grid(
    planted: tuple[TraceBank, HiddenStates], full: ProbeFit, tmp_path: Path
) -> None:
    bank, hs = planted
    choices = ProbeChoices.of(full, hs.manifest)
    assert len(full.dev) > 20  # the whole grid was searched
    path = choices.save(tmp_path)
    assert path.name == CHOICES_FILE and ProbeChoices.load(path) == choices
    again = fit_probes(bank, hs, **choices.grid(), chosen="from the file")
    assert len(again.dev) <= 4  # one point per probe and layer choice
    _same(again.chain, full.chain)
    _same(again.difficulty, full.difficulty)
    assert again.chain.params["chosen"].endswith("(from the file)")


def test_choices_made_on_other_questions_or_another_annotation_are_not_used(
    planted: tuple[TraceBank, HiddenStates], full: ProbeFit
) -> None:
    _, hs = planted
    choices = ProbeChoices.of(full, hs.manifest)
    train = full.splits["train"]
    assert choices.mismatch(hs.manifest, train) is None
    assert "other training questions" in str(choices.mismatch(hs.manifest, train[:-1]))
    other = dataclasses.replace(hs.manifest, fingerprint="0" * 64)
    assert "another annotation" in str(choices.mismatch(other, train))
    stranger = dataclasses.replace(hs.manifest, bank_id="elsewhere")
    assert "another bank" in str(choices.mismatch(stranger, train))


def test_the_main_jobs_grid_follows_the_file(
    planted: tuple[TraceBank, HiddenStates],
    full: ProbeFit,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bank, hs = planted
    path = hs.path / CHOICES_FILE
    path.unlink(missing_ok=True)
    assert probe_grid(hs, bank.questions, "auto") == {
        "chosen": f"no {CHOICES_FILE}: the whole grid searched"
    }
    ProbeChoices.of(full, hs.manifest).save(hs.path)
    try:
        grid = probe_grid(hs, bank.questions, "auto")
        assert grid["c_grid"] == (full.chain.params["C"],) and "ponder probes" in grid["chosen"]
        assert probe_grid(hs, bank.questions, "dev") == {}  # asked to search again
        # a dev run fits on the training questions' fit part: other questions
        fit_part = select_split(bank.questions, "fit")
        assert "other training questions" in probe_grid(hs, fit_part, "auto")["chosen"]
        with pytest.raises(ConfigError, match="auto or dev"):
            probe_grid(hs, bank.questions, "shipped")
        path.write_text("{not json")
        with caplog.at_level(logging.WARNING):
            grid = probe_grid(hs, bank.questions, "auto")
        assert grid == {"chosen": f"{CHOICES_FILE} unreadable: the whole grid searched"}
        assert str(path) in caplog.text and "ponder probes" in caplog.text
        assert path.read_text() == "{not json"  # left as it was, for the user to look at
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "not a probe choices file"),
        ({"version": 2}, "version 2, this ponder reads 1"),
        ({"c": -1.0}, "is not a positive number"),
        ({"alpha": True}, "is not a positive number"),
        ({"chain_layers": ["14"]}, "is not a int"),
        ({"chain_layers": []}, "names no layers"),
        ({"ended_states": 1}, "is not a bool"),
    ],
)
def test_a_damaged_choices_file_is_refused_by_name(
    planted: tuple[TraceBank, HiddenStates],
    full: ProbeFit,
    tmp_path: Path,
    change: dict[str, Any],
    message: str,
) -> None:
    path = ProbeChoices.of(full, planted[1].manifest).save(tmp_path)
    body = json.loads(path.read_text())
    body.update(change)
    path.write_text(json.dumps(body))
    with pytest.raises(ConfigError, match=message) as e:
        ProbeChoices.load(path)
    assert str(path) in str(e.value) and "ponder probes" in str(e.value)
    del body["fingerprint"]
    path.write_text(json.dumps({**body, **{"format": "ponder-probe-choices", "version": 1}}))
    with pytest.raises(ConfigError, match="damaged"):
        ProbeChoices.load(path)


def test_the_main_job_refuses_an_unknown_way_of_choosing_before_it_trains(
    planted: tuple[TraceBank, HiddenStates],
) -> None:
    from rich.console import Console

    from policies.hidden_run import probes_wanted
    from policies.main import RunArgs

    with pytest.raises(ConfigError, match="--probe-choices must be auto or dev, got 'shipped'"):
        probes_wanted(planted[0], RunArgs(probe_choices="shipped"), Console())
