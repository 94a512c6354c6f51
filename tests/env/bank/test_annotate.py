"""``ponder bank annotate``: hidden states added to a recorded bank, on the testbed bank and model.

The states are checked against an independent transformers forward (no cache reuse), and the
annotation is checked to resume exactly (also after ``kill -9``), to refuse a second annotator,
changed settings, damaged files and layers the model lacks, and to leave banks without it alone.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from env.bank.annotate import AnnotateArgs, annotate, prompt_ids, resolve_model
from env.bank.hidden import (
    HiddenStates,
    describe,
    hidden_file,
    main_boundaries,
    projection_sha256,
    reduce_states,
)
from env.bank.lock import BankLock
from env.bank.store import TraceBank
from env.generators.backend import HFTokenizer
from env.models.states import StateCapture, capture_states, default_layers
from features.errors import BankError, ConfigError

ROOT = Path(__file__).resolve().parents[3]
BANK = ROOT / "data" / "banks" / "testbed-arith"
MODEL = ROOT / "models" / "testbed"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _args(path: Path, **kw: object) -> AnnotateArgs:
    base = AnnotateArgs(
        path=path, model=MODEL, dtype="float32", threads=1, progress=False, limit=None
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def _copy(tmp: Path, name: str = "bank") -> Path:
    dst = tmp / name
    # The shipped bank carries its own annotation: start from the recording alone.
    shutil.copytree(BANK, dst, ignore=shutil.ignore_patterns("hidden"))
    return dst


def _files(bank: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((bank / "hidden").glob("*.safetensors"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The testbed bank with its first 4 questions annotated in one run (float32, 1 thread)."""
    bank = _copy(tmp_path_factory.mktemp("ref"))
    r = annotate(_args(bank, limit=4))
    assert (r.annotated, r.already, r.recorded) == (4, 0, 48)
    return bank


def _independent_states(qids: list[str]) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """Per question: the prompt's last state and each chain's boundary states, from one plain
    forward of the full model over prompt + chain (no cache, no truncation), hooks on layers
    2 and 4 (the last one un-normed: transformers' hidden_states[-1] is normed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tok = HFTokenizer()
    tok.tokenizer = AutoTokenizer.from_pretrained(MODEL)
    bank = TraceBank(BANK)
    seen: dict[int, torch.Tensor] = {}
    for layer in (2, 4):
        model.model.layers[layer - 1].register_forward_hook(
            lambda m, a, out, layer=layer: seen.__setitem__(layer, out)
        )
    result = {}
    for qid in qids:
        qt = bank[qid]
        prompt = prompt_ids(bank, qt.question.text, tok)
        n = len(prompt)
        per_chain = []
        first = None
        for c in qt.chains:
            ids, ends = main_boundaries(c.rows)
            with torch.no_grad():
                model.model(torch.tensor([prompt + ids]), use_cache=False)
            h = torch.stack([seen[2][0], seen[4][0]], dim=1).numpy()  # [T, 2, 256]
            first = h[n - 1] if first is None else first
            per_chain.append(h[[n + e - 1 for e in ends]])
        assert first is not None
        result[qid] = (first, per_chain)
    return result


def test_states_equal_an_independent_forward_and_are_stored_reduced(reference: Path) -> None:
    bank = TraceBank(reference)
    qids = bank.recorded[:2]
    expected = _independent_states(qids)
    capture = StateCapture(MODEL, [2, 4], "float32", threads=1)
    tok = HFTokenizer()
    from transformers import AutoTokenizer

    tok.tokenizer = AutoTokenizer.from_pretrained(MODEL)
    hs = HiddenStates.open(reference)
    assert hs is not None
    assert hs.layers == (2, 4) and hs.dims == 128 and not hs.complete
    assert hs.annotated == bank.recorded[:4]
    for qid in qids:
        qt = bank[qid]
        chains = [main_boundaries(c.rows) for c in qt.chains]
        prompt = prompt_ids(bank, qt.question.text, tok)
        raw_prompt, raw_boundary = capture_states(
            capture, prompt, [c[0] for c in chains], [c[1] for c in chains]
        )
        first, per_chain = expected[qid]
        np.testing.assert_allclose(raw_prompt, first, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(raw_boundary, np.concatenate(per_chain), atol=1e-5, rtol=1e-5)

        # The file holds exactly the reduction of those raw states, one row per main chunk.
        index, states = hs.boundaries(qid)
        main_rows = [
            (c.chain, k)
            for c in qt.chains
            for k, e in zip(c.rows["chunk"], c.rows["ext"], strict=True)
            if not e
        ]
        assert index.tolist() == [list(r) for r in main_rows]
        assert states.shape == (len(main_rows), 2, 128) and states.dtype == np.float16
        assert np.array_equal(hs.prompt(qid), reduce_states(raw_prompt, [2, 4], seed=0, dims=128))
        assert np.array_equal(states, reduce_states(raw_boundary, [2, 4], seed=0, dims=128))
        # An extension chunk falls back to its chain's last main boundary.
        c = next(c for c in qt.chains if any(c.rows["ext"]))
        last_main = max(k for k, e in zip(c.rows["chunk"], c.rows["ext"], strict=True) if not e)
        ext_chunk = max(c.rows["chunk"])
        assert np.array_equal(hs.at(qid, c.chain, ext_chunk), hs.at(qid, c.chain, last_main))
    # The annotated bank still loads as a bank; `ponder bank info` says how far it is annotated.
    assert len(TraceBank(reference)) == 48
    assert describe(bank).startswith("hidden states: 4/48 questions annotated (layers 2, 4")


def test_rerun_skips_and_resumed_run_equals_uninterrupted(tmp_path: Path, reference: Path) -> None:
    bank = _copy(tmp_path)
    assert annotate(_args(bank, limit=1)).annotated == 1
    r = annotate(_args(bank, limit=3))
    assert (r.annotated, r.already) == (3, 1)
    assert _files(bank) == _files(reference)
    assert annotate(_args(bank, limit=0)).annotated == 0


def test_kill_9_then_resume_equals_uninterrupted(tmp_path: Path, reference: Path) -> None:
    bank = _copy(tmp_path)

    def cmd(limit: int) -> list[str]:
        return [
            sys.executable, "-m", "controller.cli", "bank", "annotate", str(bank), "--model",
            str(MODEL), "--dtype", "float32", "--threads", "1", "--limit", str(limit),
            "--no-progress",
        ]  # fmt: skip

    proc = subprocess.Popen(
        cmd(4), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list((bank / "hidden").glob("*.safetensors"))) >= 2:
            break
        time.sleep(0.002)
    time.sleep(float(np.random.default_rng().uniform(0.0, 0.05)))  # sometimes inside a write
    assert proc.poll() is None, "the annotator finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((bank / "hidden").glob("*.safetensors")))
    assert 2 <= done < 4
    assert (bank / "hidden" / "bank.lock").exists()  # left behind by the killed process
    out = subprocess.run(
        cmd(4 - done),
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert _files(bank) == _files(reference)
    assert not list((bank / "hidden").glob("*.tmp"))
    assert not (bank / "hidden" / "bank.lock").exists()


def test_second_annotator_is_refused(tmp_path: Path) -> None:
    bank = _copy(tmp_path)
    with (
        BankLock(bank / "hidden", "ponder bank annotate"),
        pytest.raises(BankError, match="locked by pid"),
    ):
        annotate(_args(bank, limit=1))
    assert not (bank / "hidden").exists()  # nothing written


def test_resume_with_other_settings_is_refused(tmp_path: Path, reference: Path) -> None:
    bank = _copy(tmp_path)
    shutil.copytree(reference / "hidden", bank / "hidden")
    before = _files(bank)
    with pytest.raises(BankError, match=r"layers: \[2, 4\] vs \[1, 4\].*--layers 2 4.*delete"):
        annotate(_args(bank, layers=(1, 4), limit=1))
    with pytest.raises(BankError, match="dims: 128 vs 64"):
        annotate(_args(bank, dims=64, limit=1))
    with pytest.raises(BankError, match="projection seed: 0 vs 1"):
        annotate(_args(bank, seed=1, limit=1))
    assert _files(bank) == before


def test_truncated_file_is_refused_by_name(tmp_path: Path, reference: Path) -> None:
    bank = _copy(tmp_path)
    shutil.copytree(reference / "hidden", bank / "hidden")
    f = hidden_file(bank, 1)
    damaged = f.read_bytes()[:-100]
    f.write_bytes(damaged)
    hs = HiddenStates.open(bank)
    assert hs is not None
    hs.prompt(TraceBank(bank).recorded[0])  # the others still read
    with pytest.raises(BankError, match=f"{f}.*corrupt or truncated"):
        hs.prompt(TraceBank(bank).recorded[1])
    with pytest.raises(BankError, match=f"{f}.*corrupt or truncated.*delete it"):
        annotate(_args(bank, limit=1))
    assert f.read_bytes() == damaged  # never overwritten


def test_layer_the_model_lacks_is_refused(tmp_path: Path) -> None:
    bank = _copy(tmp_path)
    with pytest.raises(ConfigError, match="has 4 layers"):
        annotate(_args(bank, layers=(2, 5)))
    assert not (bank / "hidden").exists()


def test_prompt_that_does_not_match_the_bank_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import env.bank.annotate as annotate_module

    bank = _copy(tmp_path)
    real = annotate_module.prompt_ids
    monkeypatch.setattr(annotate_module, "prompt_ids", lambda *a: [*real(*a), 1])
    with pytest.raises(
        BankError, match=r"prompt rebuilt from template 'testbed'.*tokens, but chain 0"
    ):
        annotate(_args(bank, limit=1))
    assert not list((bank / "hidden").glob("*.safetensors"))


def test_bank_without_annotation_loads_and_has_none(tmp_path: Path) -> None:
    path = _copy(tmp_path)  # the recording without its shipped annotation
    assert HiddenStates.open(path) is None
    bank = TraceBank(path)
    assert describe(bank).startswith("hidden states: none")
    assert len(bank) == 48 and bank[bank.recorded[0]].k == 16


def test_default_model_and_layers_and_a_pinned_projection() -> None:
    # A GGUF bank is annotated with the Hugging Face folder beside its GGUF file.
    xl = TraceBank(ROOT / "data" / "banks" / "testbed-arith-xl")
    assert resolve_model(xl).resolve() == MODEL.resolve()
    assert default_layers(28) == (14, 28) and default_layers(4) == (2, 4)
    # The projection is the same on every machine (numpy's PCG64 and its normal sampler).
    assert projection_sha256(0, [2, 4], 256, 128) == (
        "4169555dbd5d9f2121835c0b445983cd97fb77966a55dc9bcf61216e4202eeac"
    )


def test_ray_annotates_the_same_files(tmp_path: Path, reference: Path) -> None:
    """`--ray local`: two actors of a real local Ray cluster compute the states, this process
    writes them; the files equal one process's, and a rerun on Ray resumes."""
    pytest.importorskip("ray", reason="pip install -e '.[ray]'")
    bank = _copy(tmp_path)
    assert annotate(_args(bank, limit=1)).annotated == 1  # one without Ray first
    r = annotate(_args(bank, limit=3, ray="local", ray_workers=2))
    assert (r.annotated, r.already) == (3, 1)
    assert _files(bank) == _files(reference)
    with pytest.raises(ConfigError, match="cannot reach the Ray cluster"):
        annotate(_args(bank, limit=1, ray="127.0.0.1:1"))
