"""Growing a recorded bank split by split (``ponder record --split-n SPLIT=N``): the questions
already recorded keep their place and their files, the new ones are appended, and bad counts are
refused with the form to use. (GSM8K's subsets are prefix-stable: the first n of a larger draw
are the n of a smaller one.)"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from env.bank.record import RecordArgs, questions_of, split_counts
from features.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
RecordCmd = Callable[..., list[str]]


def test_split_counts_override_n_per_split() -> None:
    assert split_counts(("train", "test"), 200, ("train=400",)) == {"train": 400, "test": 200}
    assert split_counts(("test",), 16, ()) == {"test": 16}
    for bad in ("train", "train=0", "train=-3", "train=x"):
        with pytest.raises(ConfigError, match="SPLIT=N"):
            split_counts(("train", "test"), 8, (bad,))
    with pytest.raises(ConfigError, match="does not draw"):
        split_counts(("test",), 8, ("train=16",))


def _args(**kw: object) -> RecordArgs:
    return RecordArgs(out=Path("unused"), dataset="gsm8k", splits=("train", "test"), **kw)  # type: ignore[arg-type]


def test_raising_one_split_appends_its_questions() -> None:
    small = questions_of(_args(n=8))
    grown = questions_of(_args(n=8, split_n=("train=16",)))
    assert [q.qid for q in grown[: len(small)]] == [q.qid for q in small]
    assert len(grown) == 24 and all("/train/" in q.qid for q in grown[len(small) :])


def test_a_recorded_bank_grows_by_resuming(tmp_path: Path, record_cmd: RecordCmd) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "bank"
    base = record_cmd(out, "--dataset", "gsm8k", "--splits", "train", "test", n=8)
    subprocess.run(base, check=True, env=env, cwd=ROOT, capture_output=True)
    before = {p.name: p.read_bytes() for p in (out / "chunks").glob("*.parquet")}
    first = json.loads((out / "manifest.json").read_text())["questions"]
    assert len(before) == len(first) == 16
    subprocess.run(
        [*base, "--split-n", "train=16"], check=True, env=env, cwd=ROOT, capture_output=True
    )
    after = json.loads((out / "manifest.json").read_text())["questions"]
    assert after[:16] == first and len(after) == 24
    files = {p.name: p.read_bytes() for p in (out / "chunks").glob("*.parquet")}
    assert len(files) == 24
    assert all(files[name] == data for name, data in before.items())  # nothing rewritten
