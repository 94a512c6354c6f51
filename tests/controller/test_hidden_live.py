"""Serving a policy that reads the model's hidden states, end to end with a real engine: the
testbed model on llama.cpp, its states computed beside it by :class:`~env.generators.Capturing`
(transformers), the probes fitted on the shipped annotated testbed bank. The controller's
observations carry the same features the policy was trained on; every missing piece is refused
with what to pass."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.build import build_controller
from controller.controller import Controller
from controller.serve_args import ServeArgs
from env.bank.store import TraceBank
from env.episode.config import EnvConfig
from env.episode.hidden import HIDDEN_NAMES, NEUTRAL, HiddenProbes
from env.models.testbed.model import TESTBED_DIR
from env.types import Question, SamplingConfig
from features.errors import ConfigError
from policies.registry import load_policy

pytest.importorskip("xllamacpp", reason="the llama.cpp engine needs: pip install xllamacpp")

ROOT = Path(__file__).resolve().parents[2]
BANK = ROOT / "data" / "banks" / "testbed-arith"
GGUF = TESTBED_DIR / "testbed.gguf"
Q = Question(qid="live/0", text="Let a = 37. Let b = a + 48. Let c = b * 3. What is c?", gold="255")

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def probes() -> HiddenProbes:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return HiddenProbes.fit(TraceBank(BANK), c_grid=(0.01, 0.1), alpha_grid=(10.0, 100.0))


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    from env.generators.llamacpp import LlamaCppGenerator

    bank = TraceBank(BANK)
    g = LlamaCppGenerator(
        GGUF,
        template=bank.manifest.template,
        sampling=SamplingConfig(temperature=0.7, top_logprobs=5, max_chain_tokens=256),
        slots=4,
        context=2048,
        threads=1,
    )
    yield g
    g.backend.close()


def test_a_probe_rule_reads_live_states(engine: Any, probes: HiddenProbes) -> None:
    from env.generators.capture import capture_from_manifest

    gen = capture_from_manifest(engine, probes.manifest(), TESTBED_DIR, threads=1)
    cfg = EnvConfig(chunk_tokens=32, max_chains=4, max_chain_tokens=128, aggregate="probe-best")
    ctl = Controller(gen, load_policy("probe-stop-0.6"), config=cfg, probes=probes)
    res = ctl.solve(Q)
    assert res.answer is not None
    feats = [s.features for s in res.trace if s.features]  # (the opening record has none)
    assert feats
    rights = [f["cur_right"] for f in feats]
    assert all(0.0 <= r <= 1.0 for r in rights)
    hidden = np.array([[f[n] for n in HIDDEN_NAMES] for f in feats])
    assert not (hidden == np.asarray(NEUTRAL, np.float32)).all(axis=1).any()
    assert 0.0 < feats[0]["pass_rate"] < 1.0


def test_without_captured_states_the_controller_refuses(engine: Any, probes: HiddenProbes) -> None:
    with pytest.raises(ConfigError, match="Capturing"):
        Controller(engine, load_policy("probe-stop-0.6"), probes=probes)
    with pytest.raises(ConfigError, match="probes=HiddenProbes"):
        Controller(engine, load_policy("best-of-4-probe-best"))
    Controller(engine, load_policy("best-of-4"))  # a rule without hidden states needs none


def test_serve_says_what_to_pass(tmp_path: Path, probes: HiddenProbes) -> None:
    with pytest.raises(ConfigError, match="--hidden-model"):
        build_controller(ServeArgs(policy="probe-stop-0.7"))
    with pytest.raises(ConfigError, match="--hidden-probes"):
        build_controller(ServeArgs(policy="probe-stop-0.7", hidden_model=str(TESTBED_DIR)))
    with pytest.raises(ConfigError, match=r"--hidden-probes: .*no hidden-state probes"):
        build_controller(
            ServeArgs(
                policy="probe-stop-0.7",
                hidden_model=str(TESTBED_DIR),
                hidden_probes=str(tmp_path),
            )
        )
