"""Lookahead: a policy's planned chains generated side by side, charged when taken, capped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.controller import Controller
from env.compute_env import Action, ComputeAllocationEnv, EnvConfig, decode_tokens
from env.generators.base import Question
from env.generators.fake import FakeGenerator
from env.generators.lookahead import Lookahead
from features.errors import ConfigError
from policies.heuristics import BestOfN, EarlyStoppingSC, SingleChain

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
