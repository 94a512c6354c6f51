"""Lookahead: a policy's planned chains generated side by side, charged when taken, capped."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.controller import Controller
from env.episode.config import Action, EnvConfig, decode_tokens
from env.episode.single import ComputeAllocationEnv
from env.generators.base import GeneratorBase
from env.generators.fake import FakeGenerator
from env.generators.lookahead import Lookahead
from env.types import Chunk, Question, TokenUsage
from features.errors import ConfigError
from policies.base import BRANCH, CONTINUE, STOP, BasePolicy, ObsView
from policies.heuristics import BestOfN, EarlyStoppingSC, RandomPolicy, SingleChain

CFG = EnvConfig(chunk_tokens=16, max_chain_tokens=96, max_chains=8, probe_tokens=8)
Q = "Let a = 40. Let b = a + 2. What is b?"


def _solve(policy: object, lookahead: bool, **kw: object) -> tuple[object, FakeGenerator]:
    gen = FakeGenerator()
    r = Controller(gen, policy, config=CFG, lookahead=lookahead, **kw).solve(Q)  # type: ignore[arg-type]
    return r, gen


def test_best_of_n_takes_one_chains_engine_calls() -> None:
    single, g1 = _solve(SingleChain(), lookahead=True)
    plain, g2 = _solve(BestOfN(4), lookahead=False)
    ahead, g3 = _solve(BestOfN(4), lookahead=True)
    # Without lookahead the four chains run one after another: four times the calls of one.
    assert g2.fake.calls == 4 * g1.fake.calls
    # With it, every engine call carries all four chains (extend, then probe): one chain's calls.
    assert g3.fake.calls == g1.fake.calls
    # The same episode as seen by the policy: the same answer, chains, actions and tokens.
    assert (ahead.answer, ahead.n_chains, ahead.reason) == (plain.answer, plain.n_chains, "stop")
    assert [s.action for s in ahead.trace] == [s.action for s in plain.trace]
    decoded_kinds = ("generated", "probe", "judge", "injected")
    assert [ahead.tokens[k] for k in decoded_kinds] == [plain.tokens[k] for k in decoded_kinds]
    assert ahead.decoded == plain.decoded
    assert ahead.unused == 0  # the plan was followed: nothing generated in vain


def test_a_plan_the_policy_drops_is_charged_as_unused() -> None:
    policy = SingleChain()
    policy.planned_chains = 3  # says three, opens one
    r, _ = _solve(policy, lookahead=True)
    assert r.n_chains == 1 and r.reason == "stop"
    # The two planned chains were generated alongside the one taken (the fake writes the same
    # text on every chain): twice its chunks and probes, decoded and reported, never used.
    assert r.unused == 2 * (r.tokens["generated"] + r.tokens["probe"]) > 0
    assert (
        r.decoded
        == sum(r.tokens[k] for k in ("generated", "probe", "judge", "injected")) + r.unused
    )


class Counting:
    """Wraps a generator and adds up the decoded tokens of everything it returns."""

    def __init__(self, inner: FakeGenerator) -> None:
        self.inner = inner
        self.decoded = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _count(self, out: Any) -> Any:
        self.decoded += sum(decode_tokens(x.usage) for x in out)
        return out

    def extend(self, chains: Any, k: int, **kw: Any) -> Any:
        return self._count(self.inner.extend(chains, k, **kw))

    def probe(self, chains: Any, **kw: Any) -> Any:
        return self._count(self.inner.probe(chains, **kw))

    def judge(self, chains: Any) -> Any:
        return self._count(self.inner.judge(chains))


def test_the_cap_counts_tokens_generated_ahead() -> None:
    # Room for a few chains of best-of-6: what is generated ahead stays within the cap too.
    for cap in (60, 150, 250, 400, 1000):
        gen = Counting(FakeGenerator())
        r = Controller(gen, BestOfN(6), config=CFG, token_cap=cap).solve(Q)  # type: ignore[arg-type]
        assert r.decoded == gen.decoded <= cap, cap


def test_env_sees_ahead_in_its_mask_and_info() -> None:
    gen = FakeGenerator()
    la = Lookahead(gen, 3, token_cap=CFG.token_cap, probe_tokens=CFG.probe_tokens, max_chains=8)
    env = ComputeAllocationEnv(la, [Question("q/0", Q, gold="42")], CFG)
    obs, info = env.reset(seed=0)
    # Opening: the first chain's chunk and probe, and the two planned chains' alongside.
    assert info["ahead"] == la.ahead > 0
    ahead0 = info["ahead"]
    _, _, _, _, info = env.step(Action.BRANCH)
    # Branching took the second chain's first chunk and probe from what was generated ahead.
    assert info["ahead"] < ahead0 and la.batched_calls == 1
    assert env.episode is not None
    s0, s1 = env.episode.states
    assert len(s1.chain.chunks) == 1  # the env sees one chunk, not what lies ahead
    assert s1.chain.chunks[0].text == s0.chain.chunks[0].text
    assert s1.probes and s1.probes[-1] == s0.probes[0]


def test_served_probes_and_chunks_are_those_generated_for_the_chain() -> None:
    gen = FakeGenerator()
    la = Lookahead(gen, 2, token_cap=10_000, probe_tokens=8, max_chains=2)
    q = Question("q/0", Q)
    (a,) = la.start(q)
    for _ in range(3):
        la.extend([a], 16)
        la.probe([a], max_tokens=8)
    (b,) = la.start(q)
    assert b is not a and b.chain_id != a.chain_id and not b.chunks
    calls = gen.fake.calls
    for i in range(3):
        (chunk,) = la.extend([b], 16)
        (p,) = la.probe([b], max_tokens=8)
        assert p.chain_id == b.chain_id and p.at_tokens == b.num_tokens
        assert len(b.chunks) == i + 1
    assert gen.fake.calls == calls  # all served from what was generated ahead
    assert la.ahead == 0
    # Caught up: the next chunk is generated for the env's chain itself.
    la.extend([b], 16)
    assert gen.fake.calls == calls + 1 and len(b.chunks) == 4


def test_esc_plans_window_by_window() -> None:
    gen = FakeGenerator()
    la = Lookahead(gen, 4, token_cap=10_000, probe_tokens=None, max_chains=6)
    q = Question("q/0", Q)
    chains = [la.start(q)[0] for _ in range(6)]
    assert len({c.chain_id for c in chains}) == 6
    # Two groups: 4 (ESC's window), then the 2 the env's max_chains leaves.
    assert la._opened == 6


def test_esc_and_best_of_n_say_what_they_plan() -> None:
    assert BestOfN(5).planned_chains == 5
    assert EarlyStoppingSC().planned_chains == 4
    assert SingleChain().planned_chains == 1


def test_lookahead_refuses_bad_settings() -> None:
    from env.generators.replay import ReplayGenerator

    bank = ReplayGenerator(Path(__file__).parents[2] / "data" / "banks" / "testbed-arith")
    with pytest.raises(ConfigError, match="replayed bank"):
        Lookahead(bank, 2, token_cap=100)
    with pytest.raises(ConfigError, match="width"):
        Lookahead(FakeGenerator(), 0, token_cap=100)
    with pytest.raises(ConfigError, match="token_cap"):
        Lookahead(FakeGenerator(), 2, token_cap=0)


def test_generating_ahead_never_starves_the_current_chain() -> None:
    # A cap with room for one or two whole chains: planning six must not leave six half-chains
    # without an answer where running them one by one answers.
    for cap in (100, 120, 200, 260):
        plain = Controller(FakeGenerator(), BestOfN(6), config=CFG, token_cap=cap, lookahead=False)
        ahead = Controller(FakeGenerator(), BestOfN(6), config=CFG, token_cap=cap)
        a, b = plain.solve(Q), ahead.solve(Q)
        assert b.answer == a.answer == "42", cap
        assert b.decoded <= cap and b.n_chains >= 1


def test_policies_that_act_between_chains_get_whole_chains() -> None:
    from policies.heuristics import ProbeAgreement

    gen = FakeGenerator()
    r = Controller(gen, BestOfN(4), config=CFG).solve(Q)
    # No probes, each chain in one piece, all four side by side: one engine call.
    assert gen.fake.calls == 1 and r.n_chains == 4 and r.answer == "42"
    assert r.tokens["probe"] == 0 and r.unused == 0
    # A cap without room for four whole chains: chunk by chunk, within the cap, still answering.
    gen = FakeGenerator()
    cap = 4 * (96 + 16) - 1
    r = Controller(gen, BestOfN(4), config=CFG, token_cap=cap).solve(Q)
    assert gen.fake.calls > 1 and r.decoded <= cap and r.answer == "42"
    # A policy that reads probes is probed after every chunk.
    r = Controller(FakeGenerator(), ProbeAgreement(2), config=CFG).solve(Q)
    assert r.tokens["probe"] > 0 and r.answer == "42"


# -- read-ahead: a policy that runs its chains to their ends gets each chain in one call ----------


class Finisher(BasePolicy):
    """Runs each chain to its end, then opens another, up to ``chains``; then stops. It says it
    finishes its chains (as the chain-deciding learned policies do) and, unlike best-of-N, it
    reads probes, so it is served chunk by chunk (read ahead), not in whole-chain chunks."""

    name = "finisher"

    def __init__(self, chains: int = 3, probes: bool = True) -> None:
        self.chains = chains
        self.uses_probes = probes
        super().__init__()

    @property
    def finishes_chains(self) -> bool:
        return True

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        more = (v.n_chains < self.chains) & v.flag("can_branch")
        go_on = v.flag("can_continue") & ~v.flag("cur_ended")
        return np.where(go_on, CONTINUE, np.where(more, BRANCH, STOP))


class Cutter(Finisher):
    """Says it finishes its chains, but stops after two chunks of the first."""

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        return np.where(v.cur_tokens < 2 * self.config.chunk_tokens - 0.5, CONTINUE, STOP)


def _episode(r: Any) -> tuple[Any, ...]:
    kinds = ("generated", "probe", "judge", "injected")
    return (
        r.answer,
        r.n_chains,
        r.reason,
        [s.action for s in r.trace],
        r.chain_tokens,
        [r.tokens[k] for k in kinds],
        r.decoded,
    )


def test_split_chunk_pieces_are_the_chunk_cut_up() -> None:
    gen = FakeGenerator()
    (c,) = gen.start(Question("q/0", Q))
    (whole,) = gen.extend([c], 96)
    n = len(whole)
    assert n > 48 and whole.finish_reason == "stop"
    pieces = gen.split_chunk(whole, 16)
    assert [len(p) for p in pieces] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    for name in ("token_ids", "logprobs", "top_logprobs", "top_token_ids", "confidence"):
        joined = np.concatenate([getattr(p, name) for p in pieces])
        np.testing.assert_array_equal(joined, getattr(whole, name), err_msg=name)
    assert "".join(p.text for p in pieces) == whole.text
    # Each piece's text is its tokens' text (the fake writes one character per token).
    assert all(p.text == gen.fake.decode(p.token_ids.tolist()) for p in pieces)
    assert [p.finish_reason for p in pieces] == ["length"] * (len(pieces) - 1) + ["stop"]
    assert sum(p.usage.generated for p in pieces) == whole.usage.generated == n
    assert pieces[0].usage.prefill == whole.usage.prefill
    assert all(p.usage.prefill == p.usage.cached == 0 for p in pieces[1:])
    assert gen.split_chunk(whole, n) == [whole]
    with pytest.raises(ConfigError, match="only a sampled chunk"):
        gen.split_chunk(dataclasses.replace(whole, n_injected=2), 16)
    with pytest.raises(ConfigError, match="only a sampled chunk"):
        gen.split_chunk(dataclasses.replace(whole, finish_reason="forced"), 16)


def test_split_chunk_keeps_characters_whole_across_byte_tokens() -> None:
    # A byte-level BPE with a tiny vocabulary writes a CJK character or an emoji as several byte
    # tokens, so a piece boundary can fall inside a character: the character goes to one piece.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(["the answer is 42"], trainer)
    text = "价格是 42 元 😀, naïve café: x² = 4 🤔 \\boxed{42}"
    ids = tk.encode(text).ids
    assert tk.decode(ids) == text and len(ids) > len(text)
    gen = FakeGenerator()
    gen.fake.decode = lambda t: tk.decode(list(t))  # type: ignore[method-assign]
    n = len(ids)
    chunk = Chunk(
        token_ids=np.asarray(ids, np.int32),
        text=text,
        logprobs=np.zeros(n, np.float32),
        top_logprobs=np.zeros((n, 2), np.float32),
        top_token_ids=np.zeros((n, 2), np.int32),
        finish_reason="stop",
        usage=TokenUsage(generated=n),
    )
    for k in (1, 2, 3, 5, 16):
        pieces = gen.split_chunk(chunk, k)
        assert "".join(p.text for p in pieces) == text, k
        assert not any("\ufffd" in p.text for p in pieces), k
        assert sum(len(p) for p in pieces) == n and max(len(p) for p in pieces) <= k
        # Each cut is where the tokens before it end, short of a character they only begin.
        done = ""
        for j, piece in enumerate(pieces[:-1]):
            done += piece.text
            decoded = tk.decode(ids[: (j + 1) * k])
            assert decoded.startswith(done) and len(decoded) - len(done) <= 1, (k, j)


@pytest.mark.parametrize("probes", [True, False])
def test_read_ahead_serves_each_chain_in_one_call(probes: bool) -> None:
    plain, g1 = _solve(Finisher(probes=probes), lookahead=False)
    ahead, g2 = _solve(Finisher(probes=probes), lookahead=True)
    # The same episode: actions, chains, answer, tokens by kind. (The trace charges a chain's
    # tokens to the step that decoded them: read ahead, that is the chain's first.)
    assert _episode(ahead) == _episode(plain)
    assert [s.delta for s in ahead.trace][:3] == [sum(s.delta for s in plain.trace[:5]), 0, 0]
    assert plain.n_chains == 3 and plain.answer == "42" and ahead.unused == 0
    continues = sum(s.action == "continue" for s in plain.trace)
    # Chunk by chunk: a call per chunk, and one per probe (every chunk but a chain's last).
    assert g1.fake.calls == 3 + continues + (continues if probes else 0)
    # Read ahead: one call for each chain, and one for all of its probes.
    assert g2.fake.calls == 3 * (2 if probes else 1)
    assert max(r.max_tokens for r in g2.fake.requests) == CFG.max_chain_tokens
    # Fewer prompt tokens to compute: the chain's context is sent once, not once per chunk.
    assert ahead.tokens["prefill"] + ahead.tokens["cached"] < (
        plain.tokens["prefill"] + plain.tokens["cached"]
    )


def test_read_ahead_keeps_the_env_choices_under_any_cap() -> None:
    # Under a tight cap the env can afford fewer continues: read-ahead reads only as far as the
    # cap leaves every later continue affordable, so the episode is the one chunk by chunk.
    for cap in range(40, 420, 23):
        plain = Controller(Counting(FakeGenerator()), Finisher(4), config=CFG, token_cap=cap)
        gen = Counting(FakeGenerator())
        ahead = Controller(gen, Finisher(4), config=CFG, token_cap=cap)
        a, b = plain.solve(Q), ahead.solve(Q)  # type: ignore[arg-type]
        assert _episode(b) == _episode(a), cap
        assert b.decoded == gen.decoded <= cap and b.unused == 0, cap


def test_a_chain_cut_after_read_ahead_leaves_the_rest_unused() -> None:
    gen = Counting(FakeGenerator())
    r = Controller(gen, Cutter(), config=CFG).solve(Q)  # type: ignore[arg-type]
    assert [s.action for s in r.trace] == ["start", "continue", "stop"]
    assert r.chain_tokens == (32,)
    # The chain was generated to its end; what the policy never took is reported as unused.
    assert r.unused > 0 and r.decoded == gen.decoded
    assert r.decoded == sum(r.tokens[k] for k in ("generated", "probe", "judge", "injected")) + (
        r.unused
    )


def test_read_ahead_needs_a_generator_that_splits_chunks() -> None:
    class Opaque(GeneratorBase):
        """A generator that cannot split its chunks (the default traits)."""

    with pytest.raises(ConfigError, match="split chunks"):
        Lookahead(Opaque(), 1, token_cap=100, read_ahead=96)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="read_ahead"):
        Lookahead(FakeGenerator(), 1, token_cap=100, read_ahead=0)
    # Not asked for, nothing is read ahead: a policy that may cut its chains is served by chunks.
    _, g = _solve(RandomPolicy(0, p_stop=0.0), lookahead=True)
    assert max(r.max_tokens for r in g.fake.requests if r.temperature > 0) == CFG.chunk_tokens
