"""The weights' precision in a bank's manifest: recorded, part of the fingerprint, and a resume in
another precision refused (banks from before it was recorded keep their fingerprint)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from env.bank.manifest import BankManifest
from env.bank.writer import BankWriter
from features.errors import BankError


def _manifest(**model: str) -> BankManifest:
    return BankManifest(
        model={"name": "m", "path": "models/m", "sha256": "ab" * 32, "engine": "vllm", **model},
        dataset="gsm8k",
        questions=[],
        template="chat",
        mode="cot",
        sampling={"temperature": 0.7, "top_p": 1.0, "top_logprobs": 5},
        chains=4,
        chunk_tokens=64,
        max_tokens=512,
        extension_chunks=0,
        probe_tokens=16,
        judge=True,
        seed=0,
    )


def test_the_precision_is_part_of_the_fingerprint_only_where_recorded() -> None:
    old = _manifest()
    fp32, bf16 = _manifest(dtype="float32"), _manifest(dtype="bfloat16")
    assert (
        len({old.settings_fingerprint(), fp32.settings_fingerprint(), bf16.settings_fingerprint()})
        == 3
    )
    # A bank from before: its stored fingerprint still matches what its settings hash to.
    assert old.identified().fingerprint == _manifest().settings_fingerprint()


def test_a_resume_in_another_precision_is_refused(tmp_path: Path) -> None:
    BankWriter(tmp_path, _manifest(dtype="bfloat16").identified(), [])
    with pytest.raises(
        BankError, match=r"model dtype: bfloat16 vs float32 \(pass the bank's --dtype"
    ):
        BankWriter(tmp_path, _manifest(dtype="float32"), [])
    BankWriter(tmp_path, _manifest(dtype="bfloat16"), [])  # the same precision resumes


def test_a_bank_without_a_recorded_precision_resumes() -> None:
    old, new = _manifest(), _manifest(dtype="float32")
    assert old.compatible(new) == [] and new.compatible(old) == []
    assert dataclasses.replace(new, seed=1).compatible(new) == ["seed: 1 vs 0"]
