"""Replay of a recorded trace bank behind the :class:`~env.generators.base.Generator` protocol.

Replaying is exact and fast: every chunk, probe and verifier score comes back as recorded, with
the recorded token accounting. Which recorded chains a question's ``start`` hands out is a seeded
random choice, so the same seed gives the same episode.

The counterfactual limit: replay covers only what was recorded.

- ``extend`` must use the bank's chunk size; a chain continues only as far as it was recorded
  (its natural end, the token cap, or the recorded budget-forced extension after ``Wait,``).
- ``start`` and ``branch(at=0)`` hand out further recorded chains, at most ``K`` per question
  in an episode; a branch from the middle of a chain was never sampled and is refused.
- ``probe`` and ``judge`` return the values recorded at the chain's current chunk boundary;
  before the first chunk there is no recorded probe (the answer is ``None``, at no cost).
- A forced final answer (budget forcing at ``max_tokens``) is the recorded probe at that
  boundary (the probe suffix is the answer-forcing suffix).

Asking for more than the bank holds raises :class:`~features.errors.BudgetExhausted`, which the
environment treats as the budget edge.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np

from env.bank.hidden import HiddenStates, require_hidden
from env.bank.store import ChainTrace, QuestionTrace, TraceBank
from env.episode.rules import replay_chain_end, replay_has_chunk
from env.generators.base import (
    GeneratorBase,
    GeneratorTraits,
    validate_count,
    validate_k,
    validate_question,
)
from env.types import (
    BudgetForcing,
    Chain,
    Chunk,
    FinishReason,
    JudgeResult,
    ProbeResult,
    PromptMode,
    Question,
    SamplingConfig,
    TipConfig,
    TokenUsage,
)
from features.errors import BudgetExhausted, ConfigError

__all__ = ["ReplayGenerator", "chain_order"]


def chain_order(seed: int, qid: str, k: int) -> list[int]:
    """The order in which a :class:`ReplayGenerator` reset with ``seed`` hands out the ``k``
    recorded chains of question ``qid``: a permutation of ``0..k-1`` seeded by a hash of both
    (so it does not depend on which other questions were asked)."""
    h = hashlib.sha256(f"{int(seed)}:{qid}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
    return [int(i) for i in rng.permutation(k)]


class ReplayGenerator(GeneratorBase):
    """The Generator protocol over a :class:`~env.bank.store.TraceBank`.

    Its traits: it serves the bank's chunk size only, and judges only if the bank holds verifier
    scores; :meth:`remaining_chains` and :meth:`can_extend` say what the bank has left.

    Args:
        bank: a bank or its folder.
        seed: seeds which recorded chains each question hands out; :meth:`reset` reseeds.
        hidden: serve the bank's hidden states (``PATH/hidden/``, :mod:`env.bank.hidden`) with
            the chains (``Chain.prompt_hidden``) and chunks (``Chunk.hidden``); the traits then
            carry the annotation's manifest. An extension chunk (not annotated) carries its
            chain's last main boundary.

    Raises:
        BankError: ``hidden`` for a bank without hidden states, or one whose annotation does
            not cover every recorded question (the message says what to run).
    """

    def __init__(
        self, bank: TraceBank | str | Path, *, seed: int = 0, hidden: bool = False
    ) -> None:
        self.bank = bank if isinstance(bank, TraceBank) else TraceBank(bank)
        m = self.bank.manifest
        self.hidden: HiddenStates | None = None
        if hidden:
            self.hidden = require_hidden(self.bank)
        self._traits = GeneratorTraits(
            chunk_tokens=m.chunk_tokens,
            can_judge=bool(m.judge),
            hidden=None if self.hidden is None else self.hidden.manifest,
            thinking_end=m.thinking_end,
        )
        self.sampling = SamplingConfig(
            temperature=float(m.sampling.get("temperature", 0.7)),
            top_p=float(m.sampling.get("top_p", 1.0)),
            top_logprobs=1,
            max_chain_tokens=m.max_tokens,
        )
        self.template_name = m.template
        self._chunks: dict[tuple[str, int, int], Chunk] = {}
        self.reset(seed)

    @property
    def traits(self) -> GeneratorTraits:
        return self._traits

    @property
    def model_name(self) -> str:
        return str(self.bank.manifest.model.get("name", "replay"))

    def reset(self, seed: int) -> None:
        """Start a new episode: forget which chains were handed out; reseed the choice."""
        self._seed = int(seed)
        self._orders: dict[str, list[int]] = {}
        self._next_id = 0

    # -- helpers -------------------------------------------------------------------------
    def _trace(self, question: Question) -> QuestionTrace:
        if question.qid not in self.bank:
            raise BudgetExhausted(
                f"question {question.qid!r} is not recorded in the bank at {self.bank.path}"
            )
        return self.bank[question.qid]

    def _order(self, qid: str, k: int) -> list[int]:
        if qid not in self._orders:
            self._orders[qid] = chain_order(self._seed, qid, k)
        return self._orders[qid]

    def _new_chains(
        self, question: Question, n: int, mode: PromptMode, budget: BudgetForcing | None
    ) -> list[Chain]:
        n = validate_count(n, "number of chains")
        if mode != self.bank.manifest.mode:
            raise ConfigError(
                f"the bank was recorded in {self.bank.manifest.mode!r} mode, not {mode!r}"
            )
        trace = self._trace(question)
        order = self._order(question.qid, trace.k)
        if n > len(order):
            raise BudgetExhausted(
                f"the bank holds {trace.k} chains for {question.qid!r}; "
                f"{trace.k - len(order)} are in use and {n} more were asked for"
            )
        out = []
        for _ in range(n):
            idx = order.pop(0)
            out.append(
                Chain(
                    chain_id=self._next_id,
                    question=question,
                    mode=mode,
                    prompt_ids=[],
                    budget=budget,
                    handle=idx,
                    prompt_hidden=(
                        None
                        if self.hidden is None
                        else self.hidden.prompt(question.qid).astype(np.float32)
                    ),
                )
            )
            self._next_id += 1
        return out

    # -- what is left (the environment's action mask reads these) ----------------------------
    def remaining_chains(self, question: Question) -> int:
        """Recorded chains of ``question`` not yet handed out in this episode."""
        if question.qid not in self.bank:
            return 0
        return len(self._order(question.qid, self.bank[question.qid].k))

    def can_extend(self, chain: Chain) -> bool:
        """Whether the bank holds another chunk for ``chain`` (main or budget-forced)."""
        if chain.handle is None or chain.question.qid not in self.bank:
            return False
        return replay_has_chunk(self._rows_for(chain), len(chain.chunks))

    # -- the protocol ----------------------------------------------------------------------
    def start(
        self,
        question: Question,
        n: int = 1,
        *,
        mode: PromptMode = "cot",
        budget: BudgetForcing | None = None,
    ) -> list[Chain]:
        validate_question(question)
        if question.context:
            raise ConfigError(
                f"replay answers {question.qid!r} as the bank recorded it: a conversation "
                "before the question (Question.context) cannot be replayed; use a live generator"
            )
        return self._new_chains(question, n, mode, budget)

    def _rows_for(self, chain: Chain) -> ChainTrace:
        trace = self._trace(chain.question)
        assert chain.handle is not None
        return trace.chains[chain.handle]

    def extend(
        self, chains: Sequence[Chain], k: int, *, tip: TipConfig | None = None
    ) -> list[Chunk]:
        k = validate_k(k)
        if k != self._traits.chunk_tokens:
            raise ConfigError(
                f"the bank at {self.bank.path} was recorded in chunks of {self._traits.chunk_tokens} "
                f"tokens; extend with k={self._traits.chunk_tokens}, not {k}"
            )
        if tip is not None and tip.penalty > 0:
            raise ConfigError("replay cannot apply TIP: the bank was recorded without it")
        out = []
        for chain in chains:
            if chain.finished:
                continue
            ct = self._rows_for(chain)
            i = len(chain.chunks)
            if not replay_has_chunk(ct, i):
                raise BudgetExhausted(
                    f"chain {ct.chain} of {chain.question.qid!r} is recorded for {ct.n_chunks} chunks "
                    f"({ct.n_main} sampled, {ct.n_chunks - ct.n_main} budget-forced); asked for more"
                )
            if ct.rows["ext"][i] and not self._wants_more(chain):
                chain.finished = True
                continue
            key = (chain.question.qid, ct.chain, i)
            chunk = self._chunks.get(key)
            if chunk is None:  # chunks are shared between episodes: treat them as read-only
                chunk = self._chunks[key] = self._chunk(ct, i, chain.question.qid)
            chain.chunks.append(chunk)
            finished, reason = replay_chain_end(ct, i, self._wants_more(chain))
            chain.finished = finished
            chain.finish_reason = cast(FinishReason, reason)
            out.append(chunk)
        return out

    @staticmethod
    def _wants_more(chain: Chain) -> bool:
        return chain.budget is not None and chain.num_tokens < chain.budget.min_tokens

    def _chunk(self, ct: ChainTrace, i: int, qid: str) -> Chunk:
        r = ct.rows
        n = int(r["n_tokens"][i])
        inj = int(r["n_injected"][i])
        top1 = np.asarray(r["top1_logprob"][i], dtype=np.float32).reshape(n, 1)
        return Chunk(
            token_ids=np.asarray(r["token_ids"][i], dtype=np.int32),
            text=r["text"][i],
            logprobs=np.asarray(r["logprob"][i], dtype=np.float32),
            top_logprobs=top1,
            top_token_ids=np.full((n, 1), -1, dtype=np.int32),
            finish_reason=r["finish_reason"][i],
            usage=TokenUsage(
                generated=n - inj,
                injected=inj,
                prefill=int(r["prefill"][i]),
                cached=int(r["cached"][i]),
            ),
            n_injected=inj,
            confidence=np.asarray(r["confidence"][i], dtype=np.float32),
            entropy=np.asarray(r["entropy"][i], dtype=np.float32),
            hidden=(
                None
                if self.hidden is None
                else self.hidden.at(qid, ct.chain, int(r["chunk"][i])).astype(np.float32)
            ),
        )

    def branch(self, chain: Chain, n: int = 1, *, at: int | None = None) -> list[Chain]:
        if at not in (0, None) or (at is None and chain.num_tokens > 0):
            raise BudgetExhausted(
                "replay covers only recorded branches: new chains from the prompt (at=0) are "
                f"recorded, a branch at token {chain.num_tokens if at is None else at} of a chain is not"
            )
        return self._new_chains(chain.question, n, chain.mode, chain.budget)

    def probe(self, chains: Sequence[Chain], *, max_tokens: int = 16) -> list[ProbeResult]:
        out = []
        for chain in chains:
            i = len(chain.chunks) - 1
            if i < 0:
                out.append(
                    ProbeResult(chain.chain_id, 0, "", None, np.zeros(0, np.float32), TokenUsage())
                )
                continue
            r = self._rows_for(chain).rows
            out.append(
                ProbeResult(
                    chain_id=chain.chain_id,
                    at_tokens=chain.num_tokens,
                    text=r["probe_text"][i],
                    answer=r["probe_answer"][i],
                    logprobs=np.zeros(0, np.float32),
                    usage=TokenUsage(
                        probe=int(r["probe_tokens"][i]),
                        prefill=int(r["probe_prefill"][i]),
                        cached=int(r["probe_cached"][i]),
                    ),
                )
            )
        return out

    def judge(self, chains: Sequence[Chain]) -> list[JudgeResult]:
        if not self.bank.manifest.judge:
            raise BudgetExhausted(
                f"the bank at {self.bank.path} was recorded without verifier scores"
            )
        out = []
        for chain in chains:
            i = len(chain.chunks) - 1
            if i < 0:
                out.append(JudgeResult(chain.chain_id, 0, 0.5, TokenUsage()))
                continue
            r = self._rows_for(chain).rows
            out.append(
                JudgeResult(
                    chain_id=chain.chain_id,
                    at_tokens=chain.num_tokens,
                    p_yes=float(r["judge_p_yes"][i]),
                    usage=TokenUsage(
                        judge=1,
                        prefill=int(r["judge_prefill"][i]),
                        cached=int(r["judge_cached"][i]),
                    ),
                )
            )
        return out
