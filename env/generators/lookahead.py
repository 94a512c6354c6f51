"""Lookahead: the chains a policy has planned, generated side by side in one engine call per chunk.

The environment takes one action at a time, so a best-of-4 policy run live extends chain 1 to its
end, then chain 2, and so on: four chains' worth of round trips one after another, where the
engine could have sampled all four in the same batch. A policy that knows how many chains it will
open (``planned_chains``: best-of-N's N, ESC's window) lets :class:`Lookahead` open them together:
each time the env extends its current chain, the planned chains not opened yet get their next
chunk (and probe) in the same engine call. When the env later branches, the new chain is served
from what was generated ahead, chunk by chunk, without waiting for the engine. When the env opens
a chain past the current group, the next group of ``width`` chains is planned (ESC's next window).

What the env sees does not change: every chain is an independent sample, its chunks and probes
arrive one action at a time, and each is charged when the env takes it. What the engine decoded
ahead and the env has not taken yet is :attr:`Lookahead.ahead`; the env adds it to what its token
cap counts, so the cap holds on everything decoded, including chunks generated for chains the
policy then never opened (the cost of a wrong plan, reported as unused tokens). Lookahead only
generates ahead while the cap leaves room for it after the env's own next action.

Read-ahead (``read_ahead``) is the same idea along one chain, for a policy that runs every chain
to its end (``finishes_chains``: the chain-deciding learned policies). When the env extends its
current chain, the engine is asked for the rest of the chain in one call, and the env gets it cut
into its chunk size (:meth:`~env.generators.live.LiveGenerator.split_chunk`), one chunk per
action: the env reads the same features at every chunk, but a chain costs one round trip, not one
per chunk. It reads ahead only as far as the cap leaves room for every later continue, so the
env's available actions are what they would be chunk by chunk; the tokens read ahead count in
:attr:`Lookahead.ahead` until the env takes them. A policy that stops inside a chain anyway
leaves them unused.

Use one wrapper per episode (it holds the episode's planned chains); it is not thread-safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from env.generators.base import (
    Generator,
    GeneratorWrapper,
    validate_count,
    validate_k,
)
from env.types import (
    INJECT_ALLOWANCE,
    BudgetForcing,
    Chain,
    Chunk,
    FinishReason,
    JudgeResult,
    ProbeResult,
    PromptMode,
    Question,
    TipConfig,
    TokenUsage,
)
from features.errors import ConfigError, GeneratorError

__all__ = ["Lookahead"]


def _decoded(u: TokenUsage) -> int:
    return u.generated + u.probe + u.judge + u.injected


@dataclass(slots=True)
class _Planned:
    """A planned chain: the private chain the engine extends, and the env's view of it."""

    chain: Chain
    #: ``(finished, finish_reason)`` of the private chain after each of its chunks.
    states: list[tuple[bool, FinishReason | None]] = field(default_factory=list)
    #: The chain handed to the env (``None`` until the env branches into it).
    public: Chain | None = None


class Lookahead(GeneratorWrapper):
    """Wrap a live generator so that an episode's planned chains are generated side by side.

    Args:
        inner: a live generator (not a replayed bank: it serves recorded chains already).
        width: chains generated side by side: the current one plus up to ``width - 1`` planned
            chains the env has not opened yet (1: no lookahead, every call goes straight through).
        token_cap: the episode's cap on decoded tokens; chunks are generated ahead only while
            ``spent + ahead + the env's next action + the chunks ahead`` stays within it.
        probe_tokens: the env's probe length, if the env probes every chunk (the planned chains
            are then probed in the same call as the current one); ``None``: the env does not probe.
        max_chains: the env's chains per question; no plan goes past it.
        chain_tokens: the most decoded tokens one chain can take to its end (chunks and probes);
            a group plans only as many chains as the cap has room to run to their ends, so that
            generating ahead never leaves the current chain without room to finish.
        spent: decoded tokens the episode has been charged so far (default: those this wrapper
            handed out, which is all of them unless a separate verifier decodes tokens).
        read_ahead: the env's ``max_chain_tokens`` if its policy runs every chain to its end: the
            env's chain is then generated up to it in one call and handed out chunk by chunk
            (``None``: off). Needs a generator that can split chunks (a live one).

    Raises:
        ConfigError: a width below 1, a cap below 1, a replay generator, or read-ahead over a
            generator that cannot split chunks.
    """

    def __init__(
        self,
        inner: Generator,
        width: int,
        *,
        token_cap: int,
        probe_tokens: int | None = 16,
        max_chains: int = 16,
        chain_tokens: int = 1,
        spent: Callable[[], int] | None = None,
        read_ahead: int | None = None,
    ) -> None:
        if inner.traits.chunk_tokens is not None:
            raise ConfigError(
                "lookahead is for live generators; a replayed bank serves recorded chains already"
            )
        self.inner = inner
        # the inner generator's traits, but not thread-safe (it holds one episode's plan)
        self._traits = dataclasses.replace(inner.traits, thread_safe=False)
        self.width = validate_count(width, "lookahead width")
        self.token_cap = validate_count(token_cap, "token_cap")
        self.probe_tokens = (
            None if probe_tokens is None else validate_count(probe_tokens, "probe_tokens")
        )
        self.max_chains = validate_count(max_chains, "max_chains")
        self.chain_tokens = validate_count(chain_tokens, "chain_tokens")
        self.spent = spent
        self.read_ahead = None if read_ahead is None else validate_count(read_ahead, "read_ahead")
        if self.read_ahead is not None and not inner.traits.splits_chunks:
            raise ConfigError(
                f"read-ahead needs a generator that can split chunks (a live one), got "
                f"{type(inner).__name__}"
            )
        self._opened = 0
        self._key: tuple[Any, ...] | None = None
        self._spare: deque[_Planned] = deque()
        self._serving: dict[int, _Planned] = {}
        self._probes: dict[tuple[int, int, int], ProbeResult] = {}
        self._made = 0
        self._given = 0
        #: Engine calls that generated chunks for planned chains alongside the env's (for tests).
        self.batched_calls = 0

    def __repr__(self) -> str:
        return f"Lookahead({self.inner!r}, width={self.width}, ahead={self.ahead})"

    @property
    def ahead(self) -> int:
        """Decoded tokens generated ahead that the env has not taken (yet)."""
        return self._made - self._given

    # -- the Generator protocol ------------------------------------------------------------------

    def reset(self, seed: int) -> None:
        self.inner.reset(seed)
        self._key = None
        self._opened = 0
        self._spare.clear()
        self._serving.clear()
        self._probes.clear()
        self._made = self._given = 0

    def start(
        self,
        question: Question,
        n: int = 1,
        *,
        mode: PromptMode = "cot",
        budget: BudgetForcing | None = None,
    ) -> list[Chain]:
        if self.width == 1 or n != 1 or budget is not None:
            return self.inner.start(question, n, mode=mode, budget=budget)
        key = (question.qid, question.text, mode)
        if key != self._key:
            # Another question: what an earlier plan generated ahead and nobody took stays
            # counted in ``ahead``.
            self._key, self._opened = key, 0
            self._spare.clear()
            self._serving.clear()
        if not self._spare:
            # Open the next group of planned chains; the env takes the first now.
            n_plan = min(
                self.width, self.max_chains - self._opened, self._room() // self.chain_tokens
            )
            n_plan = max(1, n_plan)
            chains = self.inner.start(question, n_plan, mode=mode)
            self._opened += n_plan
            self._spare = deque(_Planned(c) for c in chains[1:])
            return [chains[0]]
        p = self._spare.popleft()
        if not p.chain.chunks:
            return [p.chain]  # nothing generated ahead: the env takes the chain itself
        c = p.chain
        p.public = Chain(
            chain_id=c.chain_id,
            question=c.question,
            mode=c.mode,
            prompt_ids=list(c.prompt_ids),
            handle=c.handle,
            prompt_hidden=c.prompt_hidden,
        )
        self._serving[c.chain_id] = p
        return [p.public]

    def extend(
        self, chains: Sequence[Chain], k: int, *, tip: TipConfig | None = None
    ) -> list[Chunk]:
        k = validate_k(k)
        served: dict[int, Chunk] = {}
        live: list[Chain] = []
        for i, c in enumerate(chains):
            p = self._serving.get(c.chain_id)
            if p is not None and p.public is c:
                if not c.finished:
                    served[i] = self._serve(p)
            elif not c.finished:
                if tip is None and self._read_chain_ahead(c, k):
                    served[i] = self._serve(self._serving[c.chain_id])
                else:
                    live.append(c)
        fresh: dict[int, Chunk] = {}
        if live:
            extra = self._extra(k) if tip is None else []
            batch = live + extra
            got = self.inner.extend(batch, k, tip=tip)
            for c, chunk in zip(batch, got, strict=True):
                self._made += _decoded(chunk.usage)
                fresh[id(c)] = chunk
            for p in self._spare:
                if id(p.chain) in fresh:
                    p.states.append((p.chain.finished, p.chain.finish_reason))
            if extra:
                self.batched_calls += 1
                # Probing ahead is speculative: its failure must not cost the env the chunk it
                # asked for (already decoded, and then counted as never used). The env's own
                # probe asks the engine again and meets any fault itself.
                if self.probe_tokens is not None:
                    with contextlib.suppress(GeneratorError):
                        self._probe_ahead([c for c in batch if not c.finished])
        out: list[Chunk] = []
        for i, c in enumerate(chains):
            if i in served:
                out.append(served[i])
            elif id(c) in fresh:  # (a finished chain gets no chunk)
                self._given += _decoded(fresh[id(c)].usage)
                out.append(fresh[id(c)])
        return out

    def branch(self, chain: Chain, n: int = 1, *, at: int | None = None) -> list[Chain]:
        return self.inner.branch(chain, n, at=at)

    def probe(self, chains: Sequence[Chain], *, max_tokens: int = 16) -> list[ProbeResult]:
        results: dict[int, ProbeResult] = {}
        missing: list[int] = []
        for i, c in enumerate(chains):
            r = self._probes.pop((c.chain_id, c.num_tokens, int(max_tokens)), None)
            if r is None:
                missing.append(i)
            else:
                results[i] = r
        if missing:
            got = self.inner.probe([chains[i] for i in missing], max_tokens=max_tokens)
            for i, r in zip(missing, got, strict=True):
                self._made += _decoded(r.usage)
                results[i] = r
        out = [results[i] for i in range(len(chains))]
        self._given += sum(_decoded(r.usage) for r in out)
        return out

    def judge(self, chains: Sequence[Chain]) -> list[JudgeResult]:
        out = self.inner.judge(chains)
        n = sum(_decoded(r.usage) for r in out)
        self._made += n
        self._given += n
        return out

    # -- lookahead -------------------------------------------------------------------------------

    def _extra(self, k: int) -> list[Chain]:
        """Planned chains to extend alongside the env's call, as many as the cap leaves room for."""
        if not self._spare:
            return []
        probe = self.probe_tokens or 0
        room = self._room() - (k + probe + INJECT_ALLOWANCE)
        n = max(0, room // (k + probe))
        return [p.chain for p in self._spare if not p.chain.finished][:n]

    def _serve(self, p: _Planned) -> Chunk:
        """The planned chain's next chunk generated ahead, handed to the env's chain."""
        pub = p.public
        assert pub is not None
        i = len(pub.chunks)
        chunk = p.chain.chunks[i]
        pub.chunks.append(chunk)
        pub.finished, pub.finish_reason = p.states[i]
        self._given += _decoded(chunk.usage)
        if len(pub.chunks) == len(p.chain.chunks):
            # Caught up: the env's chain equals the private one and is extended directly now.
            del self._serving[pub.chain_id]
        return chunk

    def _read_chain_ahead(self, c: Chain, k: int) -> bool:
        """Generate the env's chain ``c`` to its end (as far as the cap allows) in one call and
        plan its pieces for :meth:`_serve`; ``False`` where reading ahead would not pay."""
        if self.read_ahead is None or self._spare or c.budget is not None:
            return False  # (planned chains go side by side; budget forcing injects tokens)
        probe = self.probe_tokens or 0
        # Pieces the cap leaves room for, so that the env can still afford every later continue
        # (k + probe + INJECT_ALLOWANCE) with all of them and their probes decoded: the env's
        # choices are then those it would have had chunk by chunk.
        fits = (self._room() - INJECT_ALLOWANCE - k - probe) // (k + probe)
        tokens = min(self.read_ahead - c.num_tokens, fits * k)
        if tokens <= k:
            return False
        private = dataclasses.replace(c, chunks=list(c.chunks))
        (whole,) = self.inner.extend([private], tokens)
        self._made += _decoded(whole.usage)
        pieces = self.inner.split_chunk(whole, k)
        n0 = len(c.chunks)
        private.chunks[n0:] = pieces
        length: tuple[bool, FinishReason | None] = (False, "length")
        states = [length] * (len(pieces) - 1) + [(private.finished, private.finish_reason)]
        before = [(c.finished, c.finish_reason)] * n0
        self._serving[c.chain_id] = _Planned(private, before + states, public=c)
        if self.probe_tokens is not None:
            # The env probes the chain after every piece but one that ends it: all of those
            # probes in one call (speculative, as for planned chains: a failure costs the env
            # nothing, its own probe asks again).
            views = [
                dataclasses.replace(
                    private, chunks=private.chunks[: n0 + j + 1], finished=fin, finish_reason=why
                )
                for j, (fin, why) in enumerate(states)
                if not fin
            ]
            with contextlib.suppress(GeneratorError):
                self._probe_ahead(views)
        return True

    def _room(self) -> int:
        """Decoded tokens the cap has left, counting those generated ahead."""
        spent = self.spent() if self.spent is not None else self._given
        return self.token_cap - spent - self.ahead

    def _probe_ahead(self, chains: list[Chain]) -> None:
        if not chains or self.probe_tokens is None:
            return
        got = self.inner.probe(chains, max_tokens=self.probe_tokens)
        for c, r in zip(chains, got, strict=True):
            self._made += _decoded(r.usage)
            self._probes[(c.chain_id, c.num_tokens, self.probe_tokens)] = r
