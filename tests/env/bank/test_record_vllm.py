"""The recorder on the real vLLM engine: reproducible per question, replayed exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from env.bank.sampler import record_as
from env.bank.store import TraceBank
from env.bank.synthetic import synthetic_manifest
from env.bank.writer import BankWriter
from env.generators.replay import ReplayGenerator
from env.questions import load_testbed
from env.types import SamplingConfig

pytestmark = pytest.mark.vllm

K, T, CAP = 4, 32, 160


def _setup(llm: Any, qids: list[int]) -> tuple[Any, list[Any], Any]:
    """A generator on ``llm``, the testbed's test questions and a manifest over ``qids``."""
    from env.generators.vllm import VLLMGenerator

    gen = VLLMGenerator(llm, sampling=SamplingConfig(temperature=0.7, max_chain_tokens=CAP))
    qs = load_testbed("test", 1)
    manifest = synthetic_manifest(
        [qs[i].qid for i in qids],
        model={"name": "testbed", "path": "", "sha256": "t"},
        dataset="arith",
        chains=K,
        chunk_tokens=T,
        max_tokens=CAP,
        probe_tokens=12,
    )
    return gen, qs, manifest


def test_recording_a_question_is_reproducible_and_replays_exactly(
    testbed_llm: Any, tmp_path: Path
) -> None:
    gen, qs, manifest = _setup(testbed_llm, [3])
    a = record_as(gen, qs[3], manifest)
    record_as(gen, qs[6], manifest)  # other work in between changes the engine's state
    b = record_as(gen, qs[3], manifest)
    assert a["token_ids"] == b["token_ids"]
    assert a["text"] == b["text"] and a["probe_text"] == b["probe_text"]
    np.testing.assert_array_equal(np.array(a["judge_p_yes"]), np.array(b["judge_p_yes"]))

    BankWriter(tmp_path, manifest, [qs[3]]).write(0, a)
    replay = ReplayGenerator(TraceBank(tmp_path), seed=0)
    chains = replay.start(qs[3], K)
    while any(not c.finished for c in chains):
        replay.extend([c for c in chains if not c.finished], T)
    for c in chains:
        rows = [
            i
            for i, (ch, e) in enumerate(zip(a["chain"], a["ext"], strict=True))
            if ch == c.handle and not e
        ]
        assert c.token_ids == [t for i in rows for t in a["token_ids"][i]]
        assert c.text == "".join(a["text"][i] for i in rows)
        assert c.usage.generated + c.usage.injected == sum(a["n_tokens"][i] for i in rows)


def test_questions_recorded_side_by_side_are_reproducible_and_kept_apart(
    testbed_llm: Any,
) -> None:
    from env.bank.sampler import record_group_as
    from env.bank.schema import METADATA_ROWS, SAMPLING_KEY

    gen, qs, manifest = _setup(testbed_llm, [2, 5, 7])
    group = [qs[2], qs[5], qs[7]]
    a = record_group_as(gen, group, manifest)
    record_as(gen, qs[6], manifest)  # other work in between
    b = record_group_as(gen, group, manifest)
    assert len(a) == len(b) == 3
    for q, ca, cb in zip(group, a, b, strict=True):
        assert ca["token_ids"] == cb["token_ids"] and ca["probe_text"] == cb["probe_text"]
        assert set(ca["qid"]) == {q.qid}  # each question's rows hold its own chains only
        assert sorted(set(ca["chain"])) == list(range(K))
        assert ca["correct"] == [q.is_right(x) for x in ca["answer"]]
        assert ca[METADATA_ROWS][SAMPLING_KEY] == cb[METADATA_ROWS][SAMPLING_KEY]


def test_a_rolling_group_on_the_engine_is_reproducible_and_keeps_its_bound(
    testbed_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from env.bank.sampler import record_group_as
    from env.bank.schema import METADATA_ROWS, SAMPLING_KEY
    from env.generators.vllm import VLLMGenerator

    gen, qs, manifest = _setup(testbed_llm, [0, 1, 4, 7])
    group = [qs[0], qs[1], qs[4], qs[7]]
    sizes: list[int] = []
    extend = VLLMGenerator.extend

    def spy(self: VLLMGenerator, chains: Any, *args: Any, **kw: Any) -> Any:
        sizes.append(len(chains))
        return extend(self, chains, *args, **kw)

    monkeypatch.setattr(VLLMGenerator, "extend", spy)
    ended: list[int] = []
    a = record_group_as(gen, group, manifest, at_once=2, on_done=lambda i, _: ended.append(i))
    first = list(sizes)
    b = record_group_as(gen, group, manifest, at_once=2)
    assert max(first) <= 2 * K and sorted(ended) == [0, 1, 2, 3]
    assert sizes[len(first) :] == first  # the same batches again
    for q, ca, cb in zip(group, a, b, strict=True):
        assert ca["token_ids"] == cb["token_ids"] and ca["probe_text"] == cb["probe_text"]
        assert set(ca["qid"]) == {q.qid} and sorted(set(ca["chain"])) == list(range(K))
        assert ca["correct"] == [q.is_right(x) for x in ca["answer"]]
        note = json.loads(ca[METADATA_ROWS][SAMPLING_KEY])
        assert note["at_once"] == 2 and note["group"] == [x.qid for x in group]
