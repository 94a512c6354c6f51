"""Reasoning formats: budget forcing on the end of a thinking section, probes from inside it,
thinking and answer tokens counted apart (the fake backend; issue "Serial versus parallel")."""

from __future__ import annotations

import numpy as np
import pytest

from env.generators.fake import FakeGenerator
from env.generators.prompts import CHAT, REASONING, find_thinking_format
from env.types import BudgetForcing, Question, SamplingConfig

Q = Question("q/0", "What is 40 + 2?", gold="42")
THINKING = "<think>\nI add 40 and 2: that makes 42.\n</think>\n\n"
SOLUTION = THINKING + "The answer is \\boxed{42}."


def gen() -> FakeGenerator:
    return FakeGenerator(
        {Q.text: SOLUTION},
        template=REASONING,
        chat=True,
        sampling=SamplingConfig(max_chain_tokens=400),
    )


def test_the_markers_are_read_from_a_chat_template() -> None:
    template = "{% for m in messages %}...{% endfor %}<|assistant|><think>\n...</think>"
    fmt = find_thinking_format(template)
    assert fmt is not None and (fmt.start, fmt.end) == ("<think>", "</think>")
    assert find_thinking_format("{{ messages }}") is None and find_thinking_format(None) is None


def test_without_a_budget_the_model_thinks_and_answers() -> None:
    g = gen()
    (c,) = g.start(Q, 1)
    while not c.finished:
        g.extend([c], 64)
    assert c.text == SOLUTION
    think, answer = g.thinking_split(c)
    assert think == len(g.fake.encode(THINKING.rstrip("\n"))) and think + answer == c.num_tokens
    assert answer == c.num_tokens - think > 0


def test_below_the_minimum_the_end_of_thinking_is_suppressed() -> None:
    g = gen()
    n_think = len(g.fake.encode(THINKING))
    (c,) = g.start(Q, 1, budget=BudgetForcing(min_tokens=n_think + 30, max_tokens=2000))
    (ch,) = g.extend([c], 400)
    # stopped where the model closed its thinking; the marker is not in the chain
    assert ch.finish_reason == "stop" and not c.finished and "</think>" not in c.text
    # no piece of the marker either (it takes several tokens): the thinking line is whole
    assert c.text.endswith("that makes 42.\n")
    assert g.thinking_open(c)
    # nor in its tokens (the engine generated them; a continuation must not see them)
    assert "</think>" not in g.fake.decode(c.token_ids)
    (ch2,) = g.extend([c], 400)
    assert ch2.text.startswith(REASONING.wait_text) and ch2.n_injected > 0  # "Wait," instead
    assert np.isnan(ch2.logprobs[: ch2.n_injected]).all()
    for _ in range(20):
        if c.finished:
            break
        g.extend([c], 400)
    # past the minimum the model closes its thinking itself and answers
    assert c.finished and c.finish_reason == "stop" and "</think>" in c.text
    think, answer = g.thinking_split(c)
    assert think >= n_think + 30 - len(g.fake.encode("</think>")) and answer > 0
    assert c.text.endswith("\\boxed{42}.")


def test_at_the_maximum_the_end_of_thinking_is_forced_and_the_answer_follows() -> None:
    g = gen()
    (c,) = g.start(Q, 1, budget=BudgetForcing(min_tokens=1, max_tokens=12))
    chunks = []
    while not c.finished:
        chunks.extend(g.extend([c], 8))
    last = chunks[-1]
    assert c.finish_reason == "forced" and last.finish_reason == "forced"
    assert last.text.startswith("\n</think>\n\nThe final answer is \\boxed{")
    assert c.text.endswith("}") and "</think>" in c.text
    think, _ = g.thinking_split(c)
    assert 12 <= think <= 12 + len(g.fake.encode("\n</think>"))


def test_a_probe_from_inside_thinking_closes_it_and_leaves_the_chain_unchanged() -> None:
    g = gen()
    (c,) = g.start(Q, 1)
    g.extend([c], 12)
    assert g.thinking_open(c)
    before = (c.text, c.num_tokens, c.finished)
    (p,) = g.probe([c], max_tokens=8)
    assert (c.text, c.num_tokens, c.finished) == before
    asked = g.fake.decode(list(g.fake.requests[-1].prompt_ids))
    assert asked.endswith("</think>\n\nThe final answer is \\boxed{")
    assert p.usage.probe > 0


def test_templates_without_thinking_are_unchanged() -> None:
    g = FakeGenerator(template=CHAT, chat=True)
    (c,) = g.start(Q, 1)
    assert not g.thinking_open(c) and g.thinking_split(c) == (0, 0)
    assert CHAT.probe_text(True) == CHAT.probe_suffix


def test_the_verifier_reads_the_thinking_too() -> None:
    # chat templates of reasoning models drop earlier turns' thinking: the reasoning template
    # asks with a standalone prompt that quotes the whole chain instead of a follow-up turn
    g = gen()
    (c,) = g.start(Q, 1)
    g.extend([c], 30)
    (j,) = g.judge([c])
    asked = g.fake.decode(list(g.fake.requests[-1].prompt_ids))
    assert "I add 40 and 2" in asked and "Is the solution correct so far?" in asked
    assert 0.0 <= j.p_yes <= 1.0


def test_a_marker_cut_by_the_chunk_length_is_still_suppressed() -> None:
    # The fake's tokens are characters, so "</think>" takes 8: end the first chunk inside it.
    g = gen()
    k = SOLUTION.index("</think>") + 3
    (c,) = g.start(Q, 1, budget=BudgetForcing(min_tokens=200, max_tokens=400))
    (ch,) = g.extend([c], k)
    assert ch.finish_reason == "length" and c.text.endswith("that makes 42.\n")  # "</t" dropped
    (ch2,) = g.extend([c], k)
    assert ch2.finish_reason == "stop" and ch2.text == "" and not c.finished
    (ch3,) = g.extend([c], k)
    assert ch3.text.startswith(REASONING.wait_text) and "</" not in c.text


def test_markers_the_tokenizer_does_not_know_are_refused() -> None:
    from env.generators.fake import FakeBackend
    from env.generators.live import LiveGenerator
    from features.errors import ConfigError

    class NoAngles(FakeBackend):  # a tokenizer without "<" and ">"
        def encode(self, text: str) -> list[int]:
            return super().encode(text.replace("<", "").replace(">", ""))

    with pytest.raises(ConfigError, match=r"thinking start marker '<think>' is not known"):
        LiveGenerator(NoAngles(), template=REASONING)
    LiveGenerator(NoAngles(), template="chat")  # (no thinking section: nothing to check)


def test_a_minimum_above_the_maximum_is_named() -> None:
    from features.errors import ConfigError

    with pytest.raises(ConfigError, match="min_tokens=300, max_tokens=200"):
        BudgetForcing(min_tokens=300, max_tokens=200)
