"""The live generator: the whole :class:`~env.generators.base.Generator` protocol on any Backend.

:class:`LiveGenerator` turns the operations a compute controller needs (chains, chunked
extension, branching, answer-forcing probes, s1 budget forcing, TIP, self-verification) into
batches of raw token-level completions for a :class:`~env.generators.backend.Backend`: the
in-process vLLM engine (:class:`env.generators.vllm.VLLMBackend`), a vLLM OpenAI-compatible
server, or a scripted fake. Every operation makes ONE backend call for all the chains it is given.

Contexts are always token ids (``prompt_ids + chain.token_ids``), so a chain continues exactly
where it stopped and every shared prefix (the prompt, a branch's parent) hits the prefix cache.

Budget forcing (s1) acts on the *next* :meth:`LiveGenerator.extend`, never in the same call:

* a chain with a budget that ends before ``budget.min_tokens`` is not finished; its chunk has
  ``finish_reason == "stop"`` and the next extend injects the wait text (``n_injected`` leading
  tokens with ``nan`` logprobs) and samples on;
* a chain with a budget that reaches ``budget.max_tokens`` (or the chain cap) is not finished
  either; the next extend injects the template's answer-forcing suffix and greedily reads up to
  ``budget.answer_tokens`` tokens, closed by ``}``: that chunk has ``finish_reason == "forced"``
  and finishes the chain.

So every chunk holds at most ``k`` *sampled* tokens, injected ones lead, and ``extend`` returns
exactly one chunk per unfinished chain it was given, in order.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from env.generators.backend import Backend, Completion, CompletionRequest, TipRequest
from env.generators.base import (
    GeneratorBase,
    GeneratorTraits,
    validate_count,
    validate_k,
    validate_question,
)
from env.generators.cancel import check_cancelled
from env.generators.prompts import TESTBED, PromptTemplate, get_template
from env.generators.tokens import (
    chunk_arrays,
    chunk_usage,
    drop_stop,
    empty_chunk,
    eos_trim,
    forced_answer,
    judge_p_yes,
    probe_reading,
    since_last_switch,
    split_chunk,
    switch_token_ids,
    top_arrays,
)
from env.types import (
    BudgetForcing,
    Chain,
    Chunk,
    FinishReason,
    IntArray,
    JudgeResult,
    ProbeResult,
    PromptMode,
    Question,
    SamplingConfig,
    TipConfig,
    TokenUsage,
)
from features.errors import ConfigError, GeneratorError, PonderError

__all__ = ["LiveGenerator"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_DEFAULT_WAIT = BudgetForcing().wait_text
_JUDGE_TOP = 20
_UNSET = object()


_LIVE_TRAITS = GeneratorTraits(splits_chunks=True)


@dataclass(slots=True)
class _Plan:
    """One chain's request in an extend batch."""

    chain: Chain
    kind: Literal["sample", "force", "cap"]
    injected: list[int]
    injected_text: str
    room: int
    request: CompletionRequest | None
    budgeted: bool = False  # the chain's budget applies to this chunk (see _budgeted)


class LiveGenerator(GeneratorBase):
    """A :class:`~env.generators.base.Generator` over a :class:`~env.generators.backend.Backend`.

    Args:
        backend: the engine.
        template: prompt template, or its name (``testbed`` / ``chat``).
        sampling: how chains are sampled (temperature, top-p, top-k logprobs, chain cap).

    Chain ids are unique per generator instance and increase. ``extend`` returns one chunk per
    unfinished chain given (see the module docstring for budget forcing). It serves any chunk
    size and splits chunks (:meth:`split_chunk`); it is not thread-safe.
    """

    sampling: SamplingConfig

    @property
    def traits(self) -> GeneratorTraits:
        return self._with_thinking(_LIVE_TRAITS)

    def _with_thinking(self, traits: GeneratorTraits) -> GeneratorTraits:
        """``traits`` with the template's thinking marker."""
        fmt = self.template.thinking
        return traits if fmt is None else dataclasses.replace(traits, thinking_end=fmt.end)

    def __init__(
        self,
        backend: Backend,
        *,
        template: PromptTemplate | str = TESTBED,
        sampling: SamplingConfig | None = None,
    ) -> None:
        self.backend = backend
        self.template = get_template(template) if isinstance(template, str) else template
        if not isinstance(self.template, PromptTemplate):
            raise ConfigError(f"template must be a PromptTemplate or a name, got {template!r}")
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self._ids = itertools.count()
        self._tip_ids: dict[tuple[str, ...], tuple[int, ...]] = {}
        self._encoded: dict[str, list[int]] = {}
        self._pieces: dict[int, str] = {}
        self._judge_suffix_text: object = _UNSET
        self._check_thinking()

    def _check_thinking(self) -> None:
        """A template's thinking markers must be text the model's tokenizer knows: encoded and
        decoded they come back unchanged (else no stop string, probe or split would find
        them)."""
        fmt = self.template.thinking
        if fmt is None:
            return
        for name, marker in (("start", fmt.start), ("end", fmt.end)):
            ids = self._guard("encode", self.backend.encode, marker)
            back = self._guard("decode", self.backend.decode, list(ids)) if ids else ""
            if back != marker:
                raise ConfigError(
                    f"template {self.template.name!r}: its thinking {name} marker {marker!r} is "
                    f"not known to the model's tokenizer (it encodes to {list(ids)[:8]} and "
                    f"decodes to {back!r}); give the template the model's own markers "
                    "(find_thinking_format reads them from its chat template)"
                )

    def reset(self, seed: int) -> None:
        """Make what follows reproducible: restart chain ids and reset the backend with ``seed``.

        Backends that can (in-process vLLM, the fake) clear their prefix cache and reseed their
        sampler, so the same calls after the same ``reset(seed)`` give the same tokens whatever ran
        before. The recorder resets before every question. A server backend cannot be reseeded
        (vLLM's CPU engine rejects per-request seeds): its ``reset`` only restarts chain ids.
        """
        self._ids = itertools.count()
        self.backend.reset(int(seed))

    # -- helpers -----------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return str(self.backend.model_name)

    def _guard(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a backend call; wrap unexpected failures in :class:`GeneratorError`.

        Inside a cancelled :class:`~env.generators.cancel.CancelScope` no call starts: it raises
        :class:`~features.errors.Cancelled`.
        """
        check_cancelled()
        try:
            return fn(*args)
        except PonderError:
            raise
        except Exception as e:
            raise GeneratorError(
                f"{op} failed on model {self.model_name!r}: {type(e).__name__}: {e}"
            ) from e

    def _encode(self, text: str) -> list[int]:
        ids = self._encoded.get(text)
        if ids is None:
            ids = [int(t) for t in self._guard("encode", self.backend.encode, text)]
            self._encoded[text] = ids
        return ids

    def _piece(self, token_id: int) -> str:
        p = self._pieces.get(token_id)
        if p is None:
            p = self._guard("decode", self.backend.decode, [token_id])
            self._pieces[token_id] = p
        return p

    def _decode(self, token_ids: Sequence[int]) -> str:
        return str(self._guard("decode", self.backend.decode, list(token_ids)))

    def _apply_chat(self, messages: list[dict[str, str]]) -> str:
        out = self._guard("apply_chat", self.backend.apply_chat, messages)
        if out is None:
            raise ConfigError(
                f"template {self.template.name!r} needs a chat template, but model "
                f"{self.model_name!r} has none: use the 'testbed' template for raw models"
            )
        return out

    def _judge_suffix(self) -> str | None:
        if self._judge_suffix_text is _UNSET:
            self._judge_suffix_text = self.template.judge_suffix(self._chat())
        return self._judge_suffix_text  # type: ignore[return-value]

    def _chat(self) -> Callable[[list[dict[str, str]]], str] | None:
        return self._apply_chat if self.template.chat else None

    def _complete(self, op: str, requests: list[CompletionRequest]) -> list[Completion]:
        if not requests:
            return []
        outs = self._guard(op, self.backend.complete, requests)
        if len(outs) != len(requests):
            raise GeneratorError(
                f"{op}: the backend returned {len(outs)} completions for {len(requests)} requests"
            )
        return outs

    @staticmethod
    def _tokens(chain: Chain) -> IntArray:
        parts = [np.asarray(chain.prefix_ids, dtype=np.int32)]
        parts += [c.token_ids.astype(np.int32, copy=False) for c in chain.chunks]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _max_len(self) -> int | None:
        v = self.backend.max_model_len
        return int(v) if v else None

    def thinking_open(self, chain: Chain) -> bool:
        """Whether ``chain`` is inside its thinking section: the template has thinking markers
        and the chain has not written the closing one yet."""
        fmt = self.template.thinking
        return fmt is not None and fmt.end not in chain.text

    def thinking_split(self, chain: Chain) -> tuple[int, int]:
        """``(thinking tokens, answer tokens)`` of ``chain``: the tokens up to and including
        the one that completes the closing thinking marker, and the rest (``(0, n)`` for a
        template without thinking; ``(n, 0)`` while the chain is still thinking)."""
        tokens = self._tokens(chain).tolist()
        n = len(tokens)
        fmt = self.template.thinking
        if fmt is None:
            return 0, n
        if self.thinking_open(chain):
            return n, 0

        def closed(j: int) -> bool:
            return fmt.end in self._guard("decode", self.backend.decode, tokens[:j])

        lo, hi = 1, n  # the smallest j whose prefix holds the marker (monotone in j)
        while lo < hi:
            mid = (lo + hi) // 2
            if closed(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo, n - lo

    def _budgeted(self, chain: Chain) -> bool:
        """Whether the chain's budget applies now. Budget forcing acts on the end of the
        chain, or with a thinking template on the end of its thinking section: once the model
        has closed that section, its answer runs free (up to the chain cap)."""
        if chain.budget is None:
            return False
        return self.template.thinking is None or self.thinking_open(chain)

    def _cap(self, chain: Chain) -> int:
        cap = self.sampling.max_chain_tokens
        if chain.budget is not None and self._budgeted(chain):
            cap = min(cap, chain.budget.max_tokens)
        return cap

    def _wait_text(self, budget: BudgetForcing) -> str:
        # The template's wording unless the budget names its own.
        return budget.wait_text if budget.wait_text != _DEFAULT_WAIT else self.template.wait_text

    def _tip_request(self, tip: TipConfig | None, tokens: IntArray) -> TipRequest | None:
        if tip is None or tip.penalty == 0 or tip.window == 0:
            return None
        ids = self._tip_ids.get(tip.words)
        if ids is None:
            ids = self._guard(
                "TIP switch tokens", switch_token_ids, tip.words, self._encode, self.backend.decode
            )
            self._tip_ids[tip.words] = ids
        if not ids:
            return None
        return TipRequest(
            token_ids=ids,
            penalty=float(tip.penalty),
            window=int(tip.window),
            since_switch=since_last_switch(tokens, ids),
        )

    # -- Generator protocol -----------------------------------------------------------------

    def start(
        self,
        question: Question,
        n: int = 1,
        *,
        mode: PromptMode = "cot",
        budget: BudgetForcing | None = None,
    ) -> list[Chain]:
        """Create ``n`` new chains for ``question`` (the prompt is rendered and encoded once)."""
        validate_question(question)
        validate_count(n, "number of chains n")
        if budget is not None and not isinstance(budget, BudgetForcing):
            raise ConfigError(f"budget must be a BudgetForcing, got {type(budget).__name__}")
        text = self.template.question_prompt(question.text, mode, self._chat(), question.context)
        prompt_ids = list(self._guard("encode prompt", self.backend.encode, text))
        max_len = self._max_len()
        if max_len is not None and len(prompt_ids) >= max_len:
            raise ConfigError(
                f"question {question.qid!r} takes {len(prompt_ids)} prompt tokens, the model's "
                f"context holds {max_len}: shorten it or raise max_model_len"
            )
        return [
            Chain(
                chain_id=next(self._ids),
                question=question,
                mode=mode,
                prompt_ids=list(prompt_ids),
                budget=budget,
            )
            for _ in range(int(n))
        ]

    def _plan(self, chain: Chain, k: int, tip: TipConfig | None) -> _Plan:
        tokens = self._tokens(chain)
        n = int(tokens.shape[0])
        ctx_len = len(chain.prompt_ids) + n
        max_len = self._max_len()
        window = (max_len - ctx_len) if max_len is not None else None
        cap = self._cap(chain)
        budgeted = self._budgeted(chain)
        budget = chain.budget if budgeted else None
        m = self.sampling.top_logprobs

        def force() -> _Plan:
            # At the budget's maximum: the final answer is forced (a thinking section is
            # closed first), greedy and short, read up to "}".
            assert budget is not None
            forced_text = self.template.probe_text(self.thinking_open(chain))
            suffix = self._encode(forced_text)
            room = budget.answer_tokens
            if window is not None:
                room = min(room, window - len(suffix))
            if room < 1:
                return _Plan(chain, "cap", [], "", 0, None)
            req = CompletionRequest(
                prompt_ids=tuple(chain.prompt_ids) + tuple(tokens.tolist()) + tuple(suffix),
                max_tokens=room,
                temperature=0.0,
                top_p=1.0,
                top_logprobs=m,
                stop=("}",),
            )
            return _Plan(chain, "force", suffix, forced_text, room, req, budgeted)

        if budget is not None and n >= cap:
            return force()
        injected: list[int] = []
        injected_text = ""
        last = chain.chunks[-1] if chain.chunks else None
        if budget is not None and last is not None and last.finish_reason == "stop":
            injected_text = self._wait_text(budget)
            injected = self._encode(injected_text)
        room = min(k, cap - n - len(injected))
        if window is not None:
            room = min(room, window - len(injected))
        if room < 1:
            return force() if budget is not None else _Plan(chain, "cap", [], "", 0, None)
        stop: tuple[str, ...] = ()
        fmt = self.template.thinking
        if budget is not None and fmt is not None and n + len(injected) < budget.min_tokens:
            # Below the minimum, the end of thinking is an ending to suppress: stop there (the
            # engine drops the marker) and say "Wait," next. The chunk stops at the minimum,
            # so a marker it meets is always one to suppress.
            stop = (fmt.end,)
            room = min(room, budget.min_tokens - n - len(injected))
        ctx = np.concatenate([tokens, np.asarray(injected, dtype=np.int32)]) if injected else tokens
        req = CompletionRequest(
            prompt_ids=tuple(chain.prompt_ids) + tuple(ctx.tolist()),
            max_tokens=room,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            top_logprobs=m,
            stop=stop,
            tip=self._tip_request(tip, ctx),
        )
        return _Plan(chain, "sample", injected, injected_text, room, req, budgeted)

    def extend(
        self, chains: Sequence[Chain], k: int, *, tip: TipConfig | None = None
    ) -> list[Chunk]:
        """Continue every unfinished chain by at most ``k`` sampled tokens, in one backend call.

        Returns one chunk per unfinished chain given, in order (a chain with no room left gets
        an empty ``cap`` chunk). Injected tokens (budget forcing) come first in a chunk and are
        not counted against ``k``.
        """
        k = validate_k(k)
        if tip is not None and not isinstance(tip, TipConfig):
            raise ConfigError(f"tip must be a TipConfig, got {type(tip).__name__}")
        plans = [self._plan(c, k, tip) for c in chains if not c.finished]
        reqs = [p.request for p in plans if p.request is not None]
        outs = iter(self._complete("extend", reqs))
        chunks: list[Chunk] = []
        for p in plans:
            if p.request is None:
                chunk = empty_chunk(self.sampling.top_logprobs)
            else:
                comp = eos_trim(next(outs), self.backend.eos_token_id)
                if p.kind == "force":
                    chunk = self._forced_chunk(p, comp)
                else:
                    chunk = self._sampled_chunk(p, drop_stop(comp, p.request.stop, self._decode))
            self._append(p.chain, chunk)
            chunks.append(chunk)
        return chunks

    def split_chunk(self, chunk: Chunk, k: int) -> list[Chunk]:
        """Cut a sampled ``chunk`` into pieces of at most ``k`` tokens, as :meth:`extend` with ``k``
        would have returned them one call at a time (what read-ahead serving hands out).

        The pieces' tokens, log-probabilities and confidences are the chunk's, in order; their
        texts join to the chunk's text (cut where the decoded token prefixes end, so a character
        split across tokens stays in one piece). Every piece but the last ends for ``length``;
        the last keeps the chunk's finish reason. The prompt tokens (``prefill``, ``cached``)
        count with the first piece.

        Raises:
            ConfigError: a chunk with injected tokens or a forced answer (only a sampled chunk
                is one continuous sample), or a bad ``k``.
        """
        return split_chunk(chunk, validate_k(k), self._decode)

    def _sampled_chunk(self, p: _Plan, comp: Completion) -> Chunk:
        chain = p.chain
        n_new = int(comp.token_ids.shape[0])
        m = self.sampling.top_logprobs
        ids, lp, top_lp, top_id = chunk_arrays(
            p.injected, comp.token_ids, comp.logprobs, top_arrays(comp, m), m
        )
        total = chain.num_tokens + len(ids)
        budget = chain.budget if p.budgeted else None
        reason: FinishReason = "length"
        if comp.finish_reason == "stop":
            reason = "stop"
            # Below the budget's minimum, an ending (or the end of a thinking section) is
            # suppressed: the next extend says "Wait,".
            chain.finished = not (budget is not None and total < budget.min_tokens)
        elif budget is None:
            max_len = self._max_len()
            full_ctx = max_len is not None and len(chain.prompt_ids) + total >= max_len
            if total >= self._cap(chain) or full_ctx:
                reason, chain.finished = "cap", True
        return Chunk(
            token_ids=ids,
            text=p.injected_text + comp.text,
            logprobs=lp,
            top_logprobs=top_lp,
            top_token_ids=top_id,
            finish_reason=reason,
            usage=chunk_usage(comp, n_new, len(p.injected), len(p.injected)),
            n_injected=len(p.injected),
        )

    def _forced_chunk(self, p: _Plan, comp: Completion) -> Chunk:
        keep, trail, text = forced_answer(comp, self._decode, self._encode("}"))
        m = self.sampling.top_logprobs
        top_lp, top_id = top_arrays(comp, m)
        ids, lp, top_lp, top_id = chunk_arrays(
            p.injected,
            comp.token_ids[:keep],
            comp.logprobs[:keep],
            (top_lp[:keep], top_id[:keep]),
            m,
            trail,
        )
        p.chain.finished = True
        return Chunk(
            token_ids=ids,
            text=p.injected_text + text,
            logprobs=lp,
            top_logprobs=top_lp,
            top_token_ids=top_id,
            finish_reason="forced",
            usage=chunk_usage(comp, keep, len(p.injected) + len(trail), len(p.injected)),
            n_injected=len(p.injected),
        )

    @staticmethod
    def _append(chain: Chain, chunk: Chunk) -> None:
        chain.chunks.append(chunk)
        chain.finish_reason = chunk.finish_reason
        if chunk.finish_reason == "cap":
            chain.finished = True

    def branch(self, chain: Chain, n: int = 1, *, at: int | None = None) -> list[Chain]:
        """``n`` new chains sharing ``chain``'s first ``at`` generated tokens (default: all).

        ``at == 0`` starts fresh from the prompt. Nothing is generated; the first extend of a
        branch is served from the prefix cache up to its branch point.
        """
        if not isinstance(chain, Chain):
            raise ConfigError(f"branch needs a Chain, got {type(chain).__name__}")
        validate_count(n, "number of branches n")
        length = chain.num_tokens
        if at is None:
            at = length
        if isinstance(at, bool) or not isinstance(at, int | np.integer) or not 0 <= at <= length:
            raise ConfigError(
                f"branch point at={at!r} is outside chain {chain.chain_id} (0..{length} tokens)"
            )
        at = int(at)
        tokens = self._tokens(chain)[:at].tolist()
        if at == length:
            text = chain.text
        elif at == 0:
            text = ""
        else:
            text = self._guard("decode", self.backend.decode, tokens)
        return [
            Chain(
                chain_id=next(self._ids),
                question=chain.question,
                mode=chain.mode,
                prompt_ids=list(chain.prompt_ids),
                parent=chain.chain_id,
                branch_point=at,
                budget=chain.budget,
                prefix_ids=list(tokens),
                prefix_text=text,
            )
            for _ in range(int(n))
        ]

    def probe(self, chains: Sequence[Chain], *, max_tokens: int = 16) -> list[ProbeResult]:
        """Answer-forcing probe: chain + probe suffix, greedy up to ``max_tokens``, stop ``}``.

        One backend call for all chains; the chains are left untouched.
        """
        validate_count(max_tokens, "probe max_tokens")
        suffixes = {
            open_: tuple(self._encode(self.template.probe_text(open_))) for open_ in (False, True)
        }
        max_len = self._max_len()
        reqs = []
        for c in chains:
            suffix = suffixes[self.thinking_open(c)]  # inside thinking: close it, then ask
            ctx = tuple(c.prompt_ids) + tuple(self._tokens(c).tolist()) + suffix
            room = max_tokens if max_len is None else min(max_tokens, max_len - len(ctx))
            if room < 1:
                raise GeneratorError(
                    f"probe: chain {c.chain_id} fills the model's context ({len(ctx)} of "
                    f"{max_len} tokens with the probe suffix); probe it earlier"
                )
            reqs.append(
                CompletionRequest(
                    prompt_ids=ctx, max_tokens=room, temperature=0.0, top_logprobs=0, stop=("}",)
                )
            )
        outs = self._complete("probe", reqs)
        results = []
        for c, comp in zip(chains, outs, strict=True):
            comp = eos_trim(comp, self.backend.eos_token_id)
            n = int(comp.token_ids.shape[0])
            text, answer = probe_reading(comp, self._decode)
            cached = int(comp.cached_tokens)
            results.append(
                ProbeResult(
                    chain_id=c.chain_id,
                    at_tokens=c.num_tokens,
                    text=text,
                    answer=answer,
                    logprobs=np.asarray(comp.logprobs, dtype=np.float32),
                    usage=TokenUsage(
                        probe=n, prefill=max(0, int(comp.prompt_tokens) - cached), cached=cached
                    ),
                )
            )
        return results

    def judge(self, chains: Sequence[Chain]) -> list[JudgeResult]:
        """Self-verification: P(yes) of the model's one-token verdict on each chain so far.

        With a chat template that has a ``judge_followup``, the question is a follow-up turn
        after the chain itself, so the chain's tokens come from the prefix cache; otherwise a
        standalone prompt quotes the solution.
        """
        suffix_text = self._judge_suffix()
        suffix = tuple(self._encode(suffix_text)) if suffix_text is not None else None
        max_len = self._max_len()
        reqs = []
        for c in chains:
            if suffix is not None:
                ids = tuple(c.prompt_ids) + tuple(self._tokens(c).tolist()) + suffix
            else:
                prompt = self.template.judge_prompt(c.question.text, c.text, self._chat())
                ids = tuple(self._guard("encode judge prompt", self.backend.encode, prompt))
            if max_len is not None and len(ids) >= max_len:
                raise GeneratorError(
                    f"judge: the verification prompt of chain {c.chain_id} takes {len(ids)} "
                    f"tokens, the model's context holds {max_len}; judge it earlier"
                )
            reqs.append(
                CompletionRequest(
                    prompt_ids=ids, max_tokens=1, temperature=0.0, top_logprobs=_JUDGE_TOP
                )
            )
        outs = self._complete("judge", reqs)
        results = []
        for c, comp in zip(chains, outs, strict=True):
            cached = int(comp.cached_tokens)
            results.append(
                JudgeResult(
                    chain_id=c.chain_id,
                    at_tokens=c.num_tokens,
                    p_yes=judge_p_yes(comp, self._piece),
                    usage=TokenUsage(
                        judge=1, prefill=max(0, int(comp.prompt_tokens) - cached), cached=cached
                    ),
                )
            )
        return results
