"""Verifiers: the protocol, the self-verifier, the testbed PRM (scores, caching, replay, errors)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from env.episode.config import Action
from env.episode.observation import FEATURE_NAMES
from env.episode.single import ComputeAllocationEnv
from env.generators.fake import FakeGenerator
from env.models.testbed.prm import PRM_DIR, aggregate_scores, step_spans
from env.types import Chain, Chunk, Question, TokenUsage
from env.verifiers import PRMVerifier, SelfVerifier, Verifier
from features.errors import ModelError

ROOT = Path(__file__).resolve().parents[2]
BANK = ROOT / "data" / "banks" / "testbed-arith"
LABELS = ROOT / "data" / "testbed" / "step_labels.parquet"
Q = Question(
    "arith/test/L2/0", "Let a = 40. Let b = a + 2. Let c = b * 1. What is c?", "42", "arith"
)


@pytest.fixture(scope="module")
def prm() -> PRMVerifier:
    import torch

    torch.set_num_threads(1)
    return PRMVerifier(PRM_DIR)


def text_chain(question: Question, text: str, *, finished: bool = True, cid: int = 0) -> Chain:
    """A chain whose text so far is ``text`` (as a branch's inherited prefix)."""
    return Chain(cid, question, "cot", [], prefix_text=text, finished=finished)


def grow(chain: Chain, text: str) -> None:
    """Append ``text`` to ``chain`` as one (token-free) chunk."""
    z = np.zeros(0, np.float32)
    chain.chunks.append(
        Chunk(np.zeros(0, np.int32), text, z, np.zeros((0, 1), np.float32),
              np.zeros((0, 1), np.int32), "length", TokenUsage())
    )  # fmt: skip


# -- the protocol -----------------------------------------------------------------------------


def test_both_verifiers_conform_to_the_protocol(prm: PRMVerifier) -> None:
    gen = FakeGenerator(seed=0)
    for v in (SelfVerifier(gen), prm):
        assert isinstance(v, Verifier)
        assert isinstance(v.name, str) and v.name


def test_self_verifier_delegates_to_the_generator() -> None:
    a, b = FakeGenerator(seed=3), FakeGenerator(seed=3)
    ca, cb = a.start(Q, 2), b.start(Q, 2)
    a.extend(ca, 30)
    b.extend(cb, 30)
    assert SelfVerifier(a).judge(ca) == b.judge(cb)
    assert SelfVerifier(a).can_judge
    (r,) = SelfVerifier(a).judge(ca[:1])
    assert r.usage.judge == 1  # it decodes its verdict


# -- the PRM ----------------------------------------------------------------------------------


def test_step_spans_marks_complete_step_lines() -> None:
    text = "b = a + 2 = 42\nWait, 40 + 2 = 42\nc = b * 1 = 42\nThe answer is"
    assert step_spans(text, finished=False) == [(0, 14), (33, 47)]
    assert step_spans("b = 1\nc = 2", finished=False) == [(0, 5)]
    assert step_spans("b = 1\nc = 2", finished=True) == [(0, 5), (6, 11)]
    assert aggregate_scores([], "min") == 0.5
    assert aggregate_scores([0.9, 0.5], "min") == 0.5
    assert aggregate_scores([0.9, 0.5], "product") == pytest.approx(0.45)


def test_prm_scores_are_probabilities_and_deterministic(prm: PRMVerifier) -> None:
    sols = [
        "b = a + 2 = 40 + 2 = 42\nc = b * 1 = 42 * 1 = 42\nThe answer is \\boxed{42}.",
        "b = a + 2 = 40 + 2 = 43\nc = b * 1 = 43 * 1 = 43\nThe answer is \\boxed{43}.",
        "b = a + 2 = 40 + 2 = 42\nc = b",
        "",
    ]
    chains = [text_chain(Q, s, finished=i < 2, cid=i) for i, s in enumerate(sols)]
    first = prm.judge(chains)
    again = PRMVerifier(PRM_DIR).judge(
        [text_chain(Q, s, finished=i < 2) for i, s in enumerate(sols)]
    )
    for r, r2 in zip(first, again, strict=True):
        assert 0.0 <= r.p_yes <= 1.0
        assert r.p_yes == r2.p_yes and r.usage == r2.usage
        assert r.usage.judge == 0  # a PRM reads, it decodes nothing
    assert first[0].p_yes > first[1].p_yes  # 40 + 2 = 43 is wrong
    assert first[3].p_yes == 0.5 and first[3].usage == TokenUsage()  # nothing to read yet


def _corrupt(solution: str, step_end: int, rng: random.Random) -> str:
    """Change the result of the step line that ends at ``step_end`` (digits only, same length)."""
    i = step_end - 1
    old = solution[i]
    new = rng.choice([d for d in "0123456789" if d != old])
    return solution[:i] + new + solution[i + 1 :]


def test_prm_prefers_correct_solutions_to_corrupted_ones(prm: PRMVerifier) -> None:
    df = pd.read_parquet(LABELS)
    ok = df[df["final_correct"] & (df["level"] >= 3)].drop_duplicates(["question", "solution"])
    rows = ok.sample(n=12, random_state=0)
    rng = random.Random(0)
    clean, bad = [], []
    for _, r in rows.iterrows():
        q = Question(str(r["qid"]), str(r["question"]), None, "arith")
        sol = str(r["solution"])
        steps = df[(df["qid"] == r["qid"]) & (df["solution"] == sol)]["end"].tolist()
        broken = _corrupt(sol, int(rng.choice(steps)), rng)
        a, b = prm.judge([text_chain(q, sol), text_chain(q, broken, cid=1)])
        clean.append(a.p_yes)
        bad.append(b.p_yes)
    clean_a, bad_a = np.array(clean), np.array(bad)
    # Correct hard solutions score modestly (their steps are often wrong elsewhere); a slipped
    # digit sends the score to nearly nothing.
    assert clean_a.mean() - bad_a.mean() > 0.15, (clean, bad)
    assert (clean_a > bad_a).mean() >= 10 / 12, (clean, bad)


def test_rejudging_a_longer_chain_pays_only_for_new_tokens(prm: PRMVerifier) -> None:
    prm.reset()
    gen = FakeGenerator(seed=0)
    (c,) = gen.start(Q, 1)
    usages, scores = [], []
    while not c.finished:
        gen.extend([c], 7)
        (r,) = prm.judge([c])
        usages.append(r.usage)
        scores.append(r.p_yes)
    (again,) = prm.judge([c])  # nothing new: everything from the cache
    assert again.usage.prefill == 0 and again.usage.cached > 0
    assert again.p_yes == scores[-1]
    fresh = PRMVerifier(PRM_DIR)
    (once,) = fresh.judge([c])
    paid = sum(u.prefill for u in usages)
    assert paid == once.usage.prefill == again.usage.cached  # every token read exactly once
    assert sum(u.cached for u in usages) > 0
    assert once.p_yes == pytest.approx(scores[-1], abs=1e-5)
    # A different chain object is read afresh (no stale cache across chains or episodes).
    (other,) = prm.judge([text_chain(Q, c.text)])
    assert other.usage.prefill == once.usage.prefill and other.usage.cached == 0
    prm.reset()
    (after,) = prm.judge([c])
    assert after.usage.prefill == once.usage.prefill


def test_prm_verifies_replayed_chains_in_the_env(prm: PRMVerifier) -> None:
    prm.reset()
    e = ComputeAllocationEnv.from_bank(BANK, verifier=prm)
    ix = FEATURE_NAMES.index("cur_verifier")
    seen: list[float] = []
    for seed in range(4):
        obs, info = e.reset(seed=seed)
        for a in (Action.CONTINUE, Action.VERIFY, Action.CONTINUE, Action.VERIFY, Action.BRANCH,
                  Action.VERIFY, Action.STOP):  # fmt: skip
            if not info["action_mask"][a]:
                continue
            before = info["tokens"]
            obs, _, term, trunc, info = e.step(a)
            if a == Action.VERIFY:
                seen.append(float(obs[ix]))
                assert info["tokens"]["judge"] == before["judge"]  # nothing decoded
                assert info["tokens"]["prefill"] >= before["prefill"]
            if term or trunc:
                break
        for s in e._ep.states if e._ep else []:
            if s.verifier is not None:
                assert 0.0 <= s.verifier <= 1.0
    assert seen and len({round(v, 4) for v in seen}) > 2, seen  # the feature moves
    assert any(v != 0.5 for v in seen)


def test_prm_and_self_verifier_both_drive_the_fake_env(prm: PRMVerifier) -> None:
    for v in (SelfVerifier(FakeGenerator(seed=1)), prm):
        gen = v.generator if isinstance(v, SelfVerifier) else FakeGenerator(seed=1)
        e = ComputeAllocationEnv(gen, [Q], chunk_tokens=16, verifier=v)
        _, info = e.reset(seed=0)
        e.step(Action.CONTINUE)
        _, _, _, _, info = e.step(Action.VERIFY)
        assert e._ep is not None and e._ep.states[0].verifier is not None
        assert (info["tokens"]["judge"] > 0) == (v.name == "self")


# -- loading ----------------------------------------------------------------------------------


def test_garbled_or_missing_prm_folder_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no PRM"):
        PRMVerifier(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(PRM_DIR, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["encoder"] = str((PRM_DIR / cfg["encoder"]).resolve())
    (bad / "config.json").write_text(json.dumps(cfg))
    PRMVerifier(bad)  # a faithful copy loads
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="weights"):
        PRMVerifier(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config"):
        PRMVerifier(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": "many"}))
    with pytest.raises(ModelError, match="malformed"):
        PRMVerifier(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "encoder_sha256": "0" * 64}))
    with pytest.raises(ModelError, match="retrain"):
        PRMVerifier(bad)


def test_train_cli_smoke(tmp_path: Path) -> None:
    out = tmp_path / "prm"
    cmd = [sys.executable, "-m", "env.models.testbed.prm", "--out", str(out), "--max-rows", "200",
           "--epochs", "1", "--no-compare-self-verifier"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "ponder-prm/1" and cfg["train_args"]["max_rows"] == 200
    assert len(cfg["data_sha256"]) == 64 and "val/step_auroc" in cfg["metrics"]
    v = PRMVerifier(out)
    (r,) = v.judge([text_chain(Q, "b = a + 2 = 40 + 2 = 42\n")])
    assert 0.0 <= r.p_yes <= 1.0 and r.usage.prefill > 0
