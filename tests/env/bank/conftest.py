"""Small banks recorded from the fake generator into tmp_path, for the bank tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from env.bank.record import question_seed, record_question
from env.bank.store import BankManifest, BankWriter, TraceBank
from env.generators.fake import FakeGenerator
from env.questions import load_questions
from env.types import SamplingConfig

K, T, CAP = 4, 16, 128

MakeBank = Callable[..., TraceBank]


def manifest_for(qids: list[str], *, seed: int = 0) -> BankManifest:
    return BankManifest(
        model={"name": "fake", "path": "", "sha256": "fake"},
        dataset="arith",
        questions=qids,
        template="testbed",
        mode="cot",
        sampling={"temperature": 0.7, "top_p": 1.0, "top_logprobs": 5},
        chains=K,
        chunk_tokens=T,
        max_tokens=CAP,
        extension_chunks=2,
        probe_tokens=16,
        judge=True,
        seed=seed,
    )


@pytest.fixture
def make_bank(tmp_path: Path) -> MakeBank:
    """``make_bank(name, question_seed=0, seed=0)``: three arith test questions (ids
    ``arith/test/L1/0`` ... whatever the question seed) recorded into ``tmp_path / name``."""

    def make(name: str, *, question_seed_: int = 0, seed: int = 0, n: int = 3) -> TraceBank:
        questions = load_questions("arith", "test", 8, seed=question_seed_)[:n]
        gen = FakeGenerator(sampling=SamplingConfig(max_chain_tokens=CAP))
        writer = BankWriter(
            tmp_path / name, manifest_for([q.qid for q in questions], seed=seed), questions
        )
        for i, q in enumerate(questions):
            cols = record_question(
                gen,
                q,
                chains=K,
                chunk_tokens=T,
                max_tokens=CAP,
                extension_chunks=2,
                probe_tokens=16,
                judge=True,
                seed=question_seed(seed, q.qid),
            )
            writer.write(i, cols)
        return TraceBank(tmp_path / name)

    return make
