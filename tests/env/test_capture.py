"""Live hidden-state capture (:class:`env.generators.capture.Capturing`) on the real testbed model.

Over a replay of the shipped annotated bank it must give the states ``ponder bank annotate``
stored; over llama.cpp generating live, the states of one plain transformers forward over prompt
+ chain, while feeding each token once (incremental KV caches). Errors name what to fix.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from env.bank.annotate import prompt_ids
from env.bank.hidden import HiddenStates, main_boundaries, reduce_states
from env.bank.store import TraceBank
from env.generators.base import Generator
from env.generators.capture import Capturing, capture_from_manifest
from env.generators.replay import ReplayGenerator
from env.models.states import StateCapture, capture_states, load_tokenizer
from env.types import Chain, Question, SamplingConfig
from features.errors import ConfigError, GeneratorError, ModelError

ROOT = Path(__file__).resolve().parents[2]
BANK = ROOT / "data" / "banks" / "testbed-arith"
MODEL = ROOT / "models" / "testbed"
GGUF = MODEL / "testbed.gguf"
LAYERS = (2, 4)
Q = Question(
    qid="t/long",
    text="Let a = 93. Let b = a - 36. Let c = b + 72. Let d = c * 2. Let e = d - 41. What is e?",
    gold="345",
)
Q2 = Question(qid="t/other", text="Let a = 42. Let b = a + 73. Let c = b - 70. What is c?")


def _hidden() -> HiddenStates:
    hs = HiddenStates.open(BANK)
    assert hs is not None, f"{BANK} ships with hidden/"
    return hs


def _questions(n: int) -> list[Question]:
    """The ``n`` questions of the bank with the longest chains (many chunks each)."""
    bank = TraceBank(BANK)
    by_length = sorted(bank.recorded, key=lambda q: -max(c.n_main for c in bank[q].chains))
    return [bank.question(q) for q in by_length[:n]]


def _close(got: Any, want: Any) -> None:
    """Equal reduced states: float16 values (up to ~4 in size), one float16 step either way."""
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-3, rtol=2e-3)


def _run_to_end(gen: Any, chains: list[Chain], k: int) -> None:
    while any(not c.finished for c in chains):
        gen.extend([c for c in chains if not c.finished], k)


# -- (a) replay of the annotated bank ---------------------------------------------------------


def test_capture_over_replay_reproduces_the_banks_stored_states() -> None:
    hs = _hidden()
    cap = capture_from_manifest(ReplayGenerator(BANK), hs.manifest, MODEL, threads=1)
    # The annotation's settings, the inner generator's traits.
    assert isinstance(cap, Generator)
    assert cap.traits.hidden is cap.manifest
    assert cap.manifest.differences(hs.manifest) == [f"bank id: '' vs {hs.manifest.bank_id!r}"]
    assert cap.traits.chunk_tokens == 32 and cap.traits.can_judge and not cap.traits.thread_safe
    bank = TraceBank(BANK)
    diffs: list[np.ndarray] = []
    prompt_diffs: list[np.ndarray] = []
    for q in _questions(3):
        cap.reset(0)
        chains = cap.start(q, 16)
        assert cap.remaining_chains(q) == 0
        _run_to_end(cap, chains, 32)
        stored_prompt = hs.prompt(q.qid).astype(np.float32)
        for c in chains:
            assert c.prompt_hidden is not None
            prompt_diffs.append(np.abs(c.prompt_hidden - stored_prompt))
            assert c.handle is not None
            rows = bank[q.qid].chains[c.handle].rows
            # Without budget forcing a chain plays its main chunks: annotate stored them all.
            assert len(c.chunks) == sum(not e for e in rows["ext"])
            for chunk, k in zip(c.chunks, rows["chunk"], strict=False):
                assert chunk.hidden is not None and chunk.hidden.shape == (2, 128)
                stored = hs.at(q.qid, c.handle, int(k)).astype(np.float32)
                diffs.append(np.abs(chunk.hidden - stored))
    # The replayed bank's chunks (shared between episodes) were copied, never changed.
    inner = cap.inner
    inner.reset(0)
    (c,) = inner.start(q, 1)
    assert all(chunk.hidden is None for chunk in inner.extend([c], 32))
    d = np.concatenate([x.ravel() for x in diffs])
    assert len(diffs) > 150
    # bfloat16, fed chunk by chunk here and whole chains at a time by annotate: they round
    # differently, to bfloat16 precision (values have unit variance).
    assert d.max() < 0.05 and d.mean() < 0.005
    # The prompt is fed whole both ways, yet the bank was annotated on another CPU: its bfloat16
    # kernels (AMX on an Intel Xeon, AVX-512 BF16 on an AMD EPYC) sum in another order, so a
    # value may land a step or two of bfloat16 away (0.011 seen on the EPYC): the same bound.
    p = np.concatenate([x.ravel() for x in prompt_diffs])
    assert p.max() < 0.05 and p.mean() < 0.005


def test_capture_in_float32_equals_annotates_functions() -> None:
    cap = Capturing(ReplayGenerator(BANK), MODEL, dtype="float32", threads=1)
    assert cap.layers == LAYERS and cap.dims == 128 and cap.seed == 0
    ref = StateCapture(MODEL, LAYERS, "float32", threads=1)
    tok = load_tokenizer(MODEL)
    bank = TraceBank(BANK)
    (q,) = _questions(1)
    cap.reset(3)
    chains = cap.start(q, 4)
    _run_to_end(cap, chains, 32)
    qt = bank[q.qid]
    prompt = prompt_ids(bank, q.text, tok)
    for c in chains:
        assert c.handle is not None
        ids, ends = main_boundaries(qt.chains[c.handle].rows)
        raw_prompt, raw = capture_states(ref, prompt, [ids], [ends])
        want = reduce_states(raw, LAYERS, seed=0, dims=128).astype(np.float32)
        _close(c.prompt_hidden, reduce_states(raw_prompt, LAYERS, seed=0, dims=128))
        _close([chunk.hidden for chunk in c.chunks[: len(ends)]], want)


# -- (b) llama.cpp, live ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def live() -> Iterator[Capturing]:
    pytest.importorskip("xllamacpp", reason="the llama.cpp engine needs: pip install xllamacpp")
    from env.generators.llamacpp import LlamaCppBackend, LlamaCppGenerator

    gen = LlamaCppGenerator(
        GGUF,
        template="testbed",
        sampling=SamplingConfig(temperature=0.7, top_logprobs=5, max_chain_tokens=96),
        slots=4,
        context=1024,
        threads=1,
    )
    # The GGUF file stands for its folder (the testbed ships it inside).
    yield Capturing(gen, GGUF, dtype="float32", threads=1)
    assert isinstance(gen.backend, LlamaCppBackend)
    gen.backend.close()


def _full_forward(chain: Chain, positions: list[int]) -> np.ndarray:
    """Reduced states at ``positions`` (counted in prompt + chain tokens) from one plain
    transformers forward over the whole context: no cache, every layer, hooks on LAYERS."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    seen: dict[int, Any] = {}
    for layer in LAYERS:
        model.model.layers[layer - 1].register_forward_hook(
            lambda m, a, out, layer=layer: seen.__setitem__(layer, out)
        )
    with torch.no_grad():
        model.model(torch.tensor([[*chain.prompt_ids, *chain.token_ids]]), use_cache=False)
    raw = torch.stack([seen[la][0] for la in LAYERS], dim=1).numpy()
    return reduce_states(raw[positions], LAYERS, seed=0, dims=128).astype(np.float32)


def _boundaries(chain: Chain) -> list[int]:
    """The prompt's last position, then each chunk's last."""
    n = len(chain.prompt_ids) + len(chain.prefix_ids)
    out = [len(chain.prompt_ids) - 1]
    for c in chain.chunks:
        n += len(c)
        out.append(n - 1)
    return out


def test_live_chunks_carry_the_states_of_one_full_forward(live: Capturing) -> None:
    cap = live
    assert cap.traits.splits_chunks and cap.traits.chunk_tokens is None
    assert cap.manifest.model["name"] == "testbed" and cap.manifest.engine == "transformers"
    cap.reset(0)
    fed0 = cap.stats.tokens
    chains = cap.start(Q, 2)
    assert chains[0].prompt_ids, "llama.cpp fills prompt_ids"
    for _ in range(2):
        cap.extend(chains, 16)
        # Probing and judging change neither the chains nor their caches.
        before = [(list(c.token_ids), len(c.chunks), c.finished) for c in chains]
        fed = cap.stats.tokens
        cap.probe(chains)
        cap.judge(chains)
        assert [(list(c.token_ids), len(c.chunks), c.finished) for c in chains] == before
        assert cap.stats.tokens == fed
    assert all(not c.finished for c in chains), "a 5-step answer takes more than 32 tokens"
    at_prompt = cap.branch(chains[0], 1, at=0)
    at_5 = cap.branch(chains[0], 1, at=5)
    assert at_5[0].prefix_ids == chains[0].token_ids[:5]
    branches = at_prompt + at_5
    cap.extend(branches, 16)
    cap.extend(chains + branches, 16)
    everything = chains + branches
    for c in everything:
        got = [c.prompt_hidden, *(chunk.hidden for chunk in c.chunks)]
        _close(got, _full_forward(c, _boundaries(c)))
    # Incremental: the prompt ran once, then every chunk's tokens once (a branch at an offset
    # also feeds its inherited prefix).
    chunk_tokens = sum(len(chunk) for c in everything for chunk in c.chunks)
    assert cap.stats.tokens - fed0 == len(chains[0].prompt_ids) + chunk_tokens + 5

    # Finished chains give their caches back.
    assert set(cap.cached_chains) >= {c.chain_id for c in everything if not c.finished}
    _run_to_end(cap, everything, 32)
    assert all(c.finished for c in everything)
    assert not set(cap.cached_chains) & {c.chain_id for c in everything}


def test_a_long_chunk_split_gives_each_piece_its_state(live: Capturing) -> None:
    cap = live
    cap.reset(1)
    (chain,) = cap.start(Q2, 1)
    (chunk,) = cap.extend([chain], 48)
    pieces = cap.split_chunk(chunk, 16)
    assert len(pieces) == -(-len(chunk) // 16) >= 2
    assert all(p.hidden is not None for p in pieces)
    assert pieces[-1].hidden is not None and chunk.hidden is not None
    assert np.array_equal(pieces[-1].hidden, chunk.hidden)
    ends = np.cumsum([len(p) for p in pieces]) + len(chain.prompt_ids) - 1
    want = _full_forward(chain, ends.tolist())
    _close([p.hidden for p in pieces], want)
    cap.extend([chain], 16)
    with pytest.raises(GeneratorError, match="only the chunks of its last extend"):
        cap.split_chunk(chunk, 16)


# -- (c) errors -------------------------------------------------------------------------------


def test_a_folder_of_another_model_is_refused_naming_both(tmp_path: Path) -> None:
    hs = _hidden()
    other = tmp_path / "other"
    shutil.copytree(MODEL, other, ignore=shutil.ignore_patterns("*.gguf", "prm", ".ponder*"))
    cfg = other / "config.json"
    cfg.write_text(cfg.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    want = hs.manifest.model["sha256"]
    with pytest.raises(ModelError, match=rf"{other} holds another model .*{want[:12]}") as e:
        capture_from_manifest(ReplayGenerator(BANK), hs.manifest, other)
    assert "'testbed'" in str(e.value)


def test_bad_settings_are_refused_with_what_to_do(tmp_path: Path) -> None:
    replay = ReplayGenerator(BANK)
    with pytest.raises(ConfigError, match=r"layer\(s\) \[5\] are not in .*has 4 layers"):
        Capturing(replay, MODEL, layers=(2, 5))
    with pytest.raises(ConfigError, match=r"no model folder at .*ponder model prepare --name"):
        Capturing(replay, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        Capturing(replay, tmp_path / "empty")
    lone = tmp_path / "lone.gguf"
    lone.symlink_to(GGUF)
    with pytest.raises(ConfigError, match="`ponder model prepare --name lone` without --gguf-only"):
        Capturing(replay, lone)
    with pytest.raises(ConfigError, match="dims must be between 1 and the model's hidden size 256"):
        Capturing(replay, MODEL, dims=512)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        Capturing(replay, MODEL, dtype="float16")  # type: ignore[arg-type]
