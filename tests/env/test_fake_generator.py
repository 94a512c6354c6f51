"""The scripted fake backend, and the live generator's logic driven through it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from env.generators.backend import Backend, CompletionRequest
from env.generators.fake import (
    DEFAULT_SOLUTION,
    WORD_TOKENS,
    FakeBackend,
    FakeGenerator,
    ScriptedSolution,
)
from env.models.testbed.task import EOS, PROBE_SUFFIX, judge_text, make_questions, prompt_text
from env.types import BudgetForcing, Question, SamplingConfig, TipConfig, TokenUsage
from features.errors import ConfigError, GeneratorError

Q = Question("t/0", "Let a = 40. Let b = a + 2. What is b?", gold="42", dataset="arith")
PROMPT = prompt_text(Q.text)


def req(backend: FakeBackend, text: str, max_tokens: int = 200, **kw: object) -> CompletionRequest:
    return CompletionRequest(
        prompt_ids=tuple(backend.encode(text)),
        max_tokens=max_tokens,
        temperature=0.7,
        **kw,  # type: ignore[arg-type]
    )


# -- the fake backend ------------------------------------------------------------------------


def test_fake_is_a_backend() -> None:
    assert isinstance(FakeBackend(), Backend)


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=60))
def test_encode_decode_round_trip(text: str) -> None:
    b = FakeBackend()
    assert b.decode(b.encode(text)) == text


def test_vocabulary() -> None:
    b = FakeBackend()
    assert b.encode("ab") == [ord("a") + 1, ord("b") + 1]
    assert b.encode(f"x{EOS}") == [ord("x") + 1, 0]
    assert b.decode([0]) == EOS
    # Switch words and verdicts are one token each, at word ends only.
    for w in WORD_TOKENS:
        assert len(b.encode(w)) == 1
    assert len(b.encode(" now")) == 4
    assert len(b.encode("\nWait,")) == 3
    with pytest.raises(ConfigError):
        b.decode([-5])


def test_default_script_writes_the_solution_then_eos() -> None:
    b = FakeBackend()
    (c,) = b.complete([req(b, PROMPT)])
    assert c.text == DEFAULT_SOLUTION
    assert c.finish_reason == "stop"
    assert int(c.token_ids[-1]) == b.eos_token_id
    assert len(c.token_ids) == len(DEFAULT_SOLUTION) + 1
    assert c.prompt_tokens == len(PROMPT)
    assert c.logprobs.shape == (len(c.token_ids),)
    assert c.top_logprobs.shape == c.top_token_ids.shape == (len(c.token_ids), 5)


def test_max_tokens_and_continuation() -> None:
    b = FakeBackend()
    (c,) = b.complete([req(b, PROMPT, max_tokens=7)])
    assert c.finish_reason == "length"
    assert len(c.token_ids) == 7
    assert c.text == DEFAULT_SOLUTION[:7]
    (c2,) = b.complete([req(b, PROMPT + c.text, max_tokens=500)])
    assert c.text + c2.text == DEFAULT_SOLUTION


def test_stop_strings_are_cut_like_vllm() -> None:
    b = FakeBackend()
    (c,) = b.complete([req(b, PROMPT, stop=("=",))])
    assert c.finish_reason == "stop"
    assert c.text == "b "
    # The tokens up to the one that completed the stop string were generated.
    assert b.decode(c.token_ids.tolist()) == "b ="
    assert c.stop_reason == "="  # which stop string ended it
    (whole,) = b.complete([req(b, PROMPT, max_tokens=500)])
    assert whole.finish_reason == "stop" and whole.stop_reason is None  # EOS ended it


def test_top_logprobs_are_ranked_and_hold_the_sampled_token() -> None:
    b = FakeBackend(top_logprobs=4)
    (c,) = b.complete([req(b, PROMPT, top_logprobs=8)])
    assert c.top_logprobs.shape[1] == 4  # the backend's own limit
    assert np.all(np.diff(c.top_logprobs, axis=1) <= 0)
    assert np.all(c.top_logprobs <= 0) and np.all(c.logprobs <= 0)
    for i, t in enumerate(c.token_ids.tolist()):
        row = c.top_token_ids[i].tolist()
        assert t in row
        assert c.top_logprobs[i, row.index(t)] == pytest.approx(c.logprobs[i])
        assert len(set(row)) == len(row)
        # The top entries are a sub-distribution.
        assert float(np.exp(c.top_logprobs[i]).sum()) <= 1.0 + 1e-5
    (c0,) = b.complete([req(b, PROMPT, top_logprobs=0)])
    assert c0.top_logprobs.shape == (len(c0.token_ids), 0)


def test_same_seed_same_outputs_other_seed_other_logprobs() -> None:
    def run(seed: int) -> list[np.ndarray]:
        b = FakeBackend(seed=seed)
        outs = b.complete([req(b, PROMPT, max_tokens=20)] * 3)
        outs += b.complete([req(b, PROMPT + outs[0].text, max_tokens=20)])
        return [a for o in outs for a in (o.token_ids, o.logprobs, o.top_token_ids)]

    a, a2, other = run(1), run(1), run(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, a2, strict=True))
    assert np.array_equal(a[0], other[0])  # the script decides the text
    assert not np.array_equal(a[1], other[1])
    # Identical requests in one batch are different samples (different logprobs).
    assert not np.array_equal(a[1], a[4])


def test_prefix_cache_counts_whole_blocks_of_earlier_sequences() -> None:
    b = FakeBackend(block_size=16)
    (c,) = b.complete([req(b, PROMPT, max_tokens=30)])
    assert c.cached_tokens == 0
    # A continuation: the earlier prompt and output (except the last token) are in the cache.
    ctx = b.encode(PROMPT + c.text)
    known = len(b.encode(PROMPT)) + 30 - 1
    (c2,) = b.complete([CompletionRequest(tuple(ctx), max_tokens=5, temperature=0.7)])
    assert c2.cached_tokens == known // 16 * 16
    assert c2.cached_tokens % 16 == 0 and c2.cached_tokens < len(ctx)
    # A different prompt shares only its common whole blocks.
    other = "Question: Let z = 1. What is z?\nSolution:\n"
    (c3,) = b.complete([req(b, other)])
    assert c3.cached_tokens == 0
    # The same prompt again: all whole blocks but never the last token.
    (c4,) = b.complete([req(b, PROMPT)])
    assert c4.cached_tokens == (len(PROMPT) - 1) // 16 * 16


def test_faults() -> None:
    b = FakeBackend(faults={2: "error", 3: "empty"})
    b.complete([req(b, PROMPT)])
    with pytest.raises(GeneratorError, match="call 2"):
        b.complete([req(b, PROMPT)])
    (c,) = b.complete([req(b, PROMPT)])
    assert len(c.token_ids) == 0 and c.text == "" and c.finish_reason == "stop"
    assert len(b.complete([req(b, PROMPT)])[0].token_ids) > 0
    assert b.calls == 4 and len(b.requests) == 4
    with pytest.raises(ConfigError):
        FakeBackend(faults={0: "error"})


def test_scripted_solution_finds_its_place() -> None:
    s = ScriptedSolution("x = 1 + 2 = 3\nThe answer is \\boxed{3}.")
    assert s("Question: q\nSolution:\n") == s.solution
    assert s("Question: q\nSolution:\nx = 1") == " + 2 = 3\nThe answer is \\boxed{3}."
    assert s("Question: q\nSolution:\nx = 1" + PROBE_SUFFIX) == "3}."
    assert s(judge_text("q", "x = 1 + 2 = 3")) == " yes"
    # After an injected "Wait," the model derives again.
    assert s("Solution:\n" + s.solution + "\nWait,") == " " + s.solution
    assert s("Solution:\n" + s.solution) == ""


def test_mapping_script_uses_the_question() -> None:
    qs = make_questions(1, seed=0, levels=[2, 3])
    from env.models.testbed.task import solution_text

    script = {q.text: solution_text(p) for q, p in qs}
    b = FakeBackend(script)
    for q, p in qs:
        (c,) = b.complete([req(b, prompt_text(q.text), max_tokens=500)])
        assert c.text == solution_text(p)
    (c,) = b.complete([req(b, PROMPT)])
    assert c.text == DEFAULT_SOLUTION  # no key matches: the default script
    b2 = FakeBackend(lambda ctx: "7")
    assert b2.complete([req(b2, PROMPT)])[0].text == "7"
    with pytest.raises(ConfigError):
        FakeBackend({"k": 3})  # type: ignore[dict-item]


def test_apply_chat() -> None:
    assert FakeBackend().apply_chat([{"role": "user", "content": "hi"}]) is None
    chat = FakeBackend(chat=True).apply_chat([{"role": "user", "content": "hi"}])
    assert chat is not None and chat.endswith("<|assistant|>\n")


# -- the live generator through the fake -------------------------------------------------------


def test_chunks_concatenate_to_the_solution_and_usage_adds_up() -> None:
    g = FakeGenerator(seed=0)
    chains = g.start(Q, 2)
    for _ in range(20):
        if all(c.finished for c in chains):
            break
        chunks = g.extend(chains, 8)
        for ch in chunks:
            assert 0 < len(ch) <= 8
            assert ch.usage.generated == len(ch)
            # Every prompt token of the request is either computed or cached.
            assert ch.usage.prefill + ch.usage.cached > 0
    for c in chains:
        assert c.finished and c.finish_reason == "stop"
        assert c.text == DEFAULT_SOLUTION
        assert c.usage.generated == c.num_tokens == len(DEFAULT_SOLUTION)
        assert all(ch.finish_reason == "length" for ch in c.chunks[:-1])
        # After the first chunk, contexts extend what the engine saw: the cache serves them.
        assert all(ch.usage.cached > 0 for ch in c.chunks[2:])
    # The prompt and every chunk's context add up to what the engine was asked.
    b = g.fake
    total_prompt = sum(len(r.prompt_ids) for r in b.requests)
    u = sum((c.usage for c in chains), TokenUsage())
    assert u.prefill + u.cached == total_prompt
    assert g.extend(chains, 8) == []  # finished chains get no chunk


def test_branch_shares_the_prefix_and_hits_the_cache() -> None:
    g = FakeGenerator(seed=0, block_size=16)
    (c,) = g.start(Q, 1)
    g.extend([c], 40)
    kids = g.branch(c, 2, at=33)
    for kid in kids:
        assert kid.parent == c.chain_id and kid.branch_point == 33
        assert kid.token_ids == c.token_ids[:33]
        assert kid.text == c.text[:33]
    chunks = g.extend(kids, 200)
    for kid, ch in zip(kids, chunks, strict=True):
        assert kid.text == DEFAULT_SOLUTION
        assert ch.usage.cached >= 32  # the parent's blocks
    (fresh,) = g.branch(c, 1, at=0)
    assert fresh.token_ids == [] and fresh.text == ""


def test_probe_leaves_the_chain_untouched() -> None:
    g = FakeGenerator(seed=0)
    (c,) = g.start(Q, 1)
    g.extend([c], 10)
    before = (list(c.token_ids), c.text, len(c.chunks), c.finished, c.usage)
    calls = g.fake.calls
    (p,) = g.probe([c])
    assert (list(c.token_ids), c.text, len(c.chunks), c.finished, c.usage) == before
    assert g.fake.calls == calls + 1
    assert p.answer == "42" and p.text == "42}"
    assert p.usage.probe == 3 and p.usage.generated == 0
    assert p.at_tokens == 10


def test_judge_reads_the_verdict() -> None:
    yes = FakeGenerator(ScriptedSolution(verdict=" yes"))
    no = FakeGenerator(ScriptedSolution(verdict=" no"))
    for g, want_yes in ((yes, True), (no, False)):
        (c,) = g.start(Q, 1)
        g.extend([c], 100)
        (j,) = g.judge([c])
        assert (j.p_yes > 0.5) == want_yes
        assert 0.0 <= j.p_yes <= 1.0 and j.usage.judge == 1


def test_budget_forcing_waits_then_forces_an_answer() -> None:
    g = FakeGenerator(seed=0)
    n = len(DEFAULT_SOLUTION)
    (c,) = g.start(Q, 1, budget=BudgetForcing(min_tokens=n + 10, max_tokens=n + 40))
    (ch,) = g.extend([c], 200)
    assert ch.finish_reason == "stop" and not c.finished  # ended too early: not finished
    (ch2,) = g.extend([c], 200)
    assert ch2.n_injected == len(g.fake.encode(g.template.wait_text))
    assert ch2.text.startswith(g.template.wait_text)
    assert np.isnan(ch2.logprobs[: ch2.n_injected]).all()
    assert not np.isnan(ch2.logprobs[ch2.n_injected :]).any()
    assert ch2.usage.injected == ch2.n_injected
    assert c.num_tokens <= n + 40
    for _ in range(5):
        if c.finished:
            break
        g.extend([c], 200)
    assert c.finished and c.finish_reason == "forced"
    assert c.text.endswith("\\boxed{42}")
    assert c.num_tokens <= n + 40 + len(PROBE_SUFFIX) + 16


def test_generators_are_deterministic_in_the_seed() -> None:
    def run(seed: int) -> list[np.ndarray]:
        g = FakeGenerator(seed=seed, sampling=SamplingConfig(top_logprobs=3))
        chains = g.start(Q, 3)
        while not all(c.finished for c in chains):
            g.extend(chains, 12)
        g.branch(chains[0], 1, at=5)
        return [a for c in chains for ch in c.chunks for a in (ch.logprobs, ch.top_token_ids)]

    a, b, other = run(3), run(3), run(4)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, other, strict=True))


def test_tip_reaches_the_backend() -> None:
    g = FakeGenerator(seed=0)
    (c,) = g.start(Q, 1)
    g.extend([c], 5, tip=TipConfig(penalty=2.0, window=50))
    tip = g.fake.requests[-1].tip
    assert tip is not None and tip.penalty == 2.0 and tip.window == 50
    want = {g.fake.encode(w)[0] for w in ("Alternatively", "Wait", "Hmm")}
    assert want <= set(tip.token_ids)
    assert tip.since_switch == 0


def test_faults_surface_as_generator_errors() -> None:
    g = FakeGenerator(faults={2: "error"})
    chains = g.start(Q, 2)
    g.extend(chains, 4)
    with pytest.raises(GeneratorError):
        g.extend(chains, 4)
    assert all(len(c.chunks) == 1 for c in chains)  # a failed call appends nothing


def test_empty_completions_do_not_break_accounting() -> None:
    g = FakeGenerator(faults={1: "empty"})
    (c,) = g.start(Q, 1)
    (ch,) = g.extend([c], 4)
    assert len(ch) == 0 and ch.usage.generated == 0
    assert math.isfinite(float(ch.logprobs.sum()))


def test_a_chain_whose_first_token_is_eos() -> None:
    # A real model can end a chain at once: the backend returns just EOS, which is trimmed.
    g = FakeGenerator(lambda ctx: "")
    (c,) = g.start(Q, 1)
    (ch,) = g.extend([c], 4)
    assert len(ch) == 0 and ch.finish_reason == "stop" and c.finished
    assert c.text == ""
