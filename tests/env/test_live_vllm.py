"""LiveGenerator over the in-process vLLM engine (the testbed model on CPU), and TIP.

The engine is built once per session (``testbed_llm`` in ``tests/conftest.py``). Nothing here
depends on the model being any good: the tests also pass on random weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from env.generators.backend import CompletionRequest, TipRequest
from env.generators.base import Generator
from env.generators.live import LiveGenerator
from env.generators.prompts import TESTBED
from env.generators.tokens import since_last_switch, switch_token_ids
from env.types import BudgetForcing, Chain, Question, SamplingConfig, TipConfig
from features.errors import ConfigError, ModelError, PonderError

Q = Question(qid="t/0", text="Let a = 37. Let b = a + 48. Let c = b * 3. What is c?", gold="255")

vllm_only = pytest.mark.vllm


def _as_generator(gen: LiveGenerator) -> Generator:
    """Static check (mypy): LiveGenerator satisfies the Generator protocol."""
    return gen


def _check_chunk(gen: Any, chunk: Any, k: int, m: int = 5) -> None:
    n = len(chunk)
    sampled = n - chunk.n_injected
    assert 0 <= sampled <= k
    assert chunk.token_ids.dtype == np.int32 and chunk.token_ids.shape == (n,)
    assert chunk.text == gen.backend.decode(chunk.token_ids.tolist())
    lp = chunk.logprobs[chunk.n_injected :]
    assert lp.shape == (sampled,) and np.all(np.isfinite(lp)) and np.all(lp <= 1e-6)
    top = chunk.top_logprobs[chunk.n_injected :]
    ids = chunk.top_token_ids[chunk.n_injected :]
    assert top.shape == (sampled, m) and ids.shape == (sampled, m)
    assert np.all(np.diff(top, axis=1) <= 1e-5), "top logprobs must be descending"
    assert np.all(top <= 1e-6) and np.all(ids >= 0)
    tok = chunk.token_ids[chunk.n_injected :]
    # The sampled token's logprob never beats the best one; when it is in the top-m, it matches.
    assert np.all(lp <= top[:, 0] + 1e-4)
    hit = ids == tok[:, None]
    rows, cols = np.nonzero(hit)
    np.testing.assert_allclose(lp[rows], top[rows, cols], atol=1e-4)
    assert chunk.confidence is not None and chunk.confidence.shape == (n,)


# -- pure helpers (no engine) ----------------------------------------------------------------


@given(st.lists(st.integers(0, 9), max_size=40), st.sets(st.integers(0, 9), max_size=3))
def test_since_last_switch_counts_tokens_after_last_switch(tokens: list[int], sw: set[int]) -> None:
    got = since_last_switch(np.asarray(tokens, dtype=np.int32), sorted(sw))
    expect = len(tokens)
    for i, t in enumerate(tokens):
        if t in sw:
            expect = len(tokens) - i - 1
    assert got == expect


def test_switch_token_ids_skip_blank_leading_tokens() -> None:
    vocab = {" ": 1, "Hmm": 2, "Wait": 3}

    def encode(w: str) -> list[int]:
        return [vocab[" "], vocab["Hmm"]] if w == " Hmm" else [vocab[w]]

    def decode(ids: Any) -> str:
        inv = {v: k for k, v in vocab.items()}
        return "".join(inv[i] for i in ids)

    assert switch_token_ids([" Hmm", "Wait"], encode, decode) == (2, 3)


def test_tip_processor_penalises_only_young_thoughts() -> None:
    pytest.importorskip("vllm")
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from env.generators.tip import TipLogitsProcessor, tip_extra_args

    proc = TipLogitsProcessor(cast(Any, SimpleNamespace()), torch.device("cpu"), False)
    tip = TipRequest(token_ids=(3, 5), penalty=2.0, window=2, since_switch=1)
    out_a: list[int] = []
    out_b: list[int] = []
    added = [
        (0, SamplingParams(extra_args=tip_extra_args(tip)), None, out_a),
        (1, SamplingParams(), None, out_b),  # a request without TIP in the same batch
    ]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))
    logits = proc.apply(torch.zeros(2, 8))
    assert logits[0, 3] == -2 and logits[0, 5] == -2 and logits[0].sum() == -4
    assert logits[1].abs().sum() == 0
    out_a.append(7)  # since_switch 1 -> 2 == window: no penalty
    proc.update_state(None)
    assert proc.apply(torch.zeros(2, 8)).abs().sum() == 0
    out_a.append(5)  # a switch token restarts the thought
    proc.update_state(None)
    assert proc.apply(torch.zeros(2, 8))[0, 3] == -2
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[]))
    assert not proc.states
    with pytest.raises(ValueError, match="ponder_tip"):
        TipLogitsProcessor.validate_params(SamplingParams(extra_args={"ponder_tip": 3}))


def test_missing_model_path_raises_model_error(tmp_path: Path) -> None:
    from env.generators.vllm import VLLMGenerator, build_engine

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="no-such-model"):
        build_engine(missing)
    with pytest.raises(ModelError, match="does not exist"):
        VLLMGenerator(str(missing))


def test_non_causal_lm_raises_model_error(tmp_path: Path) -> None:
    from env.generators.vllm import build_engine

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["BertModel"], "model_type": "bert"})
    )
    with pytest.raises(ModelError, match=r"not a causal language model.*BertModel"):
        build_engine(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not a causal language model"):
        build_engine(tmp_path)


# -- on the engine -----------------------------------------------------------------------------


@vllm_only
def test_extend_chunks_are_consistent_and_accounted(vllm_generator: Any) -> None:
    gen = vllm_generator
    assert isinstance(cast(object, gen), Generator)
    chains = gen.start(Q, n=3)
    assert [c.chain_id for c in chains] == sorted({c.chain_id for c in chains})
    assert all(c.prompt_ids == chains[0].prompt_ids for c in chains)
    assert gen.backend.decode(chains[0].prompt_ids) == TESTBED.cot.format(question=Q.text)
    for step in range(2):
        live = [c for c in chains if not c.finished]
        chunks = gen.extend(chains, 8)
        assert len(chunks) == len(live)
        assert all(c.chunks[-1] is ch for c, ch in zip(live, chunks, strict=True))
        for ch in chunks:
            _check_chunk(gen, ch, 8)
            assert ch.n_injected == 0 and ch.usage.injected == 0
            assert ch.usage.generated == len(ch)
            assert ch.finish_reason in ("length", "stop")
            assert ch.usage.prefill + ch.usage.cached >= len(chains[0].prompt_ids)
            if step == 1:  # the context so far is cached in full blocks
                assert ch.usage.cached > 0
    for c in chains:
        assert c.num_tokens == sum(len(ch) for ch in c.chunks) == len(c.token_ids)
        assert c.usage.generated == c.num_tokens
        assert c.text == "".join(ch.text for ch in c.chunks)
        assert not c.finished or c.finish_reason == "stop"


@vllm_only
def test_batched_extend_returns_one_chunk_per_unfinished_chain(vllm_generator: Any) -> None:
    gen = vllm_generator
    chains = gen.start(Q, n=6)
    chains[2].finished = True  # a finished chain is skipped
    chunks = gen.extend(chains, 4)
    assert len(chunks) == 5
    live = [c for i, c in enumerate(chains) if i != 2]
    assert all(c.chunks[-1] is ch for c, ch in zip(live, chunks, strict=True))
    assert not chains[2].chunks


@vllm_only
def test_chain_cap_finishes_chain(testbed_llm: Any) -> None:
    from env.generators.vllm import VLLMGenerator

    gen = VLLMGenerator(testbed_llm, sampling=SamplingConfig(max_chain_tokens=10))
    (chain,) = gen.start(Q, n=1)
    while not chain.finished:
        gen.extend([chain], 4)
    assert chain.num_tokens <= 10
    assert chain.finish_reason in ("cap", "stop")
    assert gen.extend([chain], 4) == []


@vllm_only
def test_branch_shares_prefix_and_hits_prefix_cache(vllm_generator: Any) -> None:
    gen = vllm_generator
    (parent,) = gen.start(Q, n=1)
    gen.extend([parent], 48)
    at = parent.num_tokens
    assert at > 8
    kids = gen.branch(parent, 2)
    assert [k.parent for k in kids] == [parent.chain_id] * 2
    assert all(k.branch_point == at and k.prefix_ids == parent.token_ids for k in kids)
    assert all(k.text == parent.text and k.num_tokens == at and not k.chunks for k in kids)
    assert len({parent.chain_id, *(k.chain_id for k in kids)}) == 3
    chunks = gen.extend(kids, 4)
    for k, ch in zip(kids, chunks, strict=True):
        assert ch.usage.cached > 0, "a branch's first extend must hit the prefix cache"
        assert k.num_tokens == at + len(ch)
        assert k.token_ids[:at] == parent.token_ids
    mid = gen.branch(parent, 1, at=5)[0]
    assert mid.prefix_ids == parent.token_ids[:5]
    assert mid.prefix_text == gen.backend.decode(parent.token_ids[:5])
    fresh = gen.branch(parent, 1, at=0)[0]
    assert fresh.prefix_ids == [] and fresh.text == ""
    for bad in (-1, at + 1):
        with pytest.raises(ConfigError, match="branch point"):
            gen.branch(parent, 1, at=bad)


@vllm_only
def test_probe_leaves_chain_untouched(vllm_generator: Any) -> None:
    gen = vllm_generator
    chains = gen.start(Q, n=2)
    gen.extend(chains, 12)
    before = [(list(c.token_ids), len(c.chunks), c.text, c.finished) for c in chains]
    results = gen.probe(chains, max_tokens=6)
    assert [(list(c.token_ids), len(c.chunks), c.text, c.finished) for c in chains] == before
    for c, r in zip(chains, results, strict=True):
        assert r.chain_id == c.chain_id and r.at_tokens == c.num_tokens
        assert isinstance(r.text, str) and (r.answer is None or isinstance(r.answer, str))
        assert 1 <= r.usage.probe <= 6 and r.usage.generated == 0
        assert r.logprobs.shape == (r.usage.probe,)
        assert r.usage.cached > 0  # the chain's context is in the prefix cache
        if "}" in r.text:
            assert r.text.endswith("}") or r.text.rstrip(".\n ").endswith("}")


@vllm_only
def test_budget_forcing_injects_wait_below_min_tokens(vllm_generator: Any) -> None:
    gen = vllm_generator
    budget = BudgetForcing(min_tokens=200, max_tokens=240)
    chains = gen.start(Q, n=4, budget=budget)
    gen.extend(chains, 32)
    stopped = [c for c in chains if c.chunks[-1].finish_reason == "stop"]
    assert all(not c.finished for c in stopped), "an ending below min_tokens is suppressed"
    if not stopped:
        # Random weights seldom emit EOS within 32 tokens: stand in for the model's ending.
        chains[0].chunks[-1].finish_reason = "stop"
        stopped = [chains[0]]
    chain = stopped[0]
    n0 = chain.num_tokens
    (chunk,) = gen.extend([chain], 8)
    wait = gen.backend.encode(TESTBED.wait_text)
    assert chunk.n_injected == len(wait) and chunk.usage.injected == len(wait)
    assert chunk.token_ids[: len(wait)].tolist() == wait
    assert np.all(np.isnan(chunk.logprobs[: len(wait)]))
    assert chunk.text.startswith(TESTBED.wait_text) and TESTBED.wait_text in chain.text
    assert chunk.usage.generated == len(chunk) - len(wait) >= 1
    assert chain.num_tokens == n0 + len(chunk)
    _check_chunk(gen, chunk, 8)


@vllm_only
def test_budget_forcing_forces_final_answer_at_max_tokens(vllm_generator: Any) -> None:
    gen = vllm_generator
    chains = gen.start(Q, n=2, budget=BudgetForcing(min_tokens=0, max_tokens=24, answer_tokens=6))
    reasons: list[str] = []
    for _ in range(6):
        if all(c.finished for c in chains):
            break
        reasons += [ch.finish_reason for ch in gen.extend(chains, 16)]
    forced = [c for c in chains if c.finish_reason == "forced"]
    assert all(c.finished for c in chains)
    assert forced or all(c.finish_reason == "stop" for c in chains)
    suffix = gen.backend.encode(TESTBED.probe_suffix)
    for c in forced:
        last = c.chunks[-1]
        assert last.finish_reason == "forced" and last.n_injected == len(suffix)
        assert "\\boxed{" in c.text and c.text.rstrip(".\n ").endswith("}")
        assert last.usage.injected >= len(suffix) and last.usage.generated <= 6
        assert sum(len(ch) - ch.usage.injected for ch in c.chunks[:-1]) <= 24
        try:
            from features.answers import extract_answer
        except ImportError:
            continue
        assert extract_answer(c.text) is not None
    assert gen.extend(chains, 16) == []


@vllm_only
def test_tip_suppresses_switch_tokens_and_spares_other_requests(vllm_generator: Any) -> None:
    gen = vllm_generator
    # Frequent tokens join the switch words so that the effect is measurable on any model.
    tip = TipConfig(penalty=50.0, window=10_000, words=(*TipConfig().words, " =", "="))
    ids = switch_token_ids(tip.words, gen.backend.encode, gen.backend.decode)
    assert ids and all(gen.backend.decode([t]).strip() for t in ids)
    (chain,) = gen.start(Q, n=1)
    prompt = tuple(chain.prompt_ids)
    req = TipRequest(token_ids=ids, penalty=50.0, window=10_000, since_switch=0)
    base = dict(prompt_ids=prompt, max_tokens=128, temperature=1.0, top_logprobs=0)
    # TIP and plain requests in ONE batch: the penalty must hit only its own rows.
    reqs = [CompletionRequest(**base, tip=req if i % 2 else None) for i in range(32)]  # type: ignore[arg-type]
    outs = gen.backend.complete(reqs)
    sw = np.asarray(ids)
    with_tip = sum(int(np.isin(o.token_ids, sw).sum()) for o in outs[1::2])
    without = sum(int(np.isin(o.token_ids, sw).sum()) for o in outs[0::2])
    assert without > 0, "the plain requests should sample some switch tokens"
    assert with_tip < without
    assert with_tip <= 1, "a -50 logit penalty leaves essentially no switch token"
    # Through the generator: extend passes the TipRequest on.
    chains = gen.start(Q, n=8)
    chunks = gen.extend(chains, 32, tip=tip)
    assert sum(int(np.isin(ch.token_ids, sw).sum()) for ch in chunks) <= 1
    # A short window only guards the start of each thought.
    short = TipConfig(penalty=50.0, window=1, words=tip.words)
    gen.extend(chains, 4, tip=short)


@vllm_only
def test_chain_of_draft_prompt(vllm_generator: Any) -> None:
    gen = vllm_generator
    (cot,) = gen.start(Q, n=1, mode="cot")
    (draft,) = gen.start(Q, n=1, mode="draft")
    assert draft.mode == "draft" and draft.prompt_ids != cot.prompt_ids
    assert gen.backend.decode(draft.prompt_ids) == TESTBED.draft.format(question=Q.text)
    with pytest.raises(ConfigError, match="mode"):
        gen.start(Q, n=1, mode="tree")


@vllm_only
def test_judge_returns_probability(vllm_generator: Any) -> None:
    gen = vllm_generator
    chains = gen.start(Q, n=2)
    gen.extend(chains, 8)
    results = gen.judge(chains)
    for c, r in zip(chains, results, strict=True):
        assert r.chain_id == c.chain_id and r.at_tokens == c.num_tokens
        assert 0.0 <= r.p_yes <= 1.0
        assert r.usage.judge == 1 and r.usage.prefill + r.usage.cached > 0


@vllm_only
def test_bad_input_raises_specific_errors(vllm_generator: Any, testbed_llm: Any) -> None:
    gen = vllm_generator
    chains = gen.start(Q, n=1)
    for k in (0, -3, 1.5, True):
        with pytest.raises(ConfigError, match="chunk size k"):
            gen.extend(chains, k)
    with pytest.raises(ConfigError, match="empty"):
        gen.start(Question(qid="blank", text="   "), n=1)
    with pytest.raises(ConfigError, match="positive integer"):
        gen.start(Q, n=0)
    with pytest.raises(ConfigError, match="max_tokens"):
        gen.probe(chains, max_tokens=0)
    from env.generators.vllm import VLLMBackend

    chat = LiveGenerator(VLLMBackend(testbed_llm), template="chat")
    with pytest.raises(ConfigError, match="chat template"):
        chat.start(Q, n=1)
    with pytest.raises(ConfigError, match="unknown prompt template"):
        LiveGenerator(VLLMBackend(testbed_llm), template="nope")
    assert issubclass(ConfigError, PonderError)
    assert isinstance(chains[0], Chain)


@pytest.mark.vllm
def test_a_stop_string_is_named_as_the_stop_reason(vllm_generator: Any) -> None:
    from env.questions import load_testbed

    b = vllm_generator.backend
    easy = next(q for q in load_testbed("test", 1) if q.difficulty == 1)
    ids = tuple(b.encode(TESTBED.cot.format(question=easy.text)))
    stop, whole = b.complete(
        [
            CompletionRequest(prompt_ids=ids, max_tokens=64, temperature=0.0, stop=("=",)),
            CompletionRequest(prompt_ids=ids, max_tokens=400, temperature=0.0),
        ]
    )
    assert stop.finish_reason == "stop" and stop.stop_reason == "=" and "=" not in stop.text
    assert whole.finish_reason == "stop" and whole.stop_reason is None  # EOS ended it
