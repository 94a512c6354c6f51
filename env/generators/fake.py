"""A scripted, seeded fake backend for unit tests of generator logic (like httpx's ``MockTransport``).

:class:`FakeBackend` implements :class:`~env.generators.backend.Backend` without a model:

* a character-level vocabulary: every character is one token (id ``ord(c) + 1``), id ``0`` is
  EOS (written ``<|endoftext|>``, as vLLM's ``/detokenize`` writes it; completion texts leave it
  out), plus a few whole-word tokens (:data:`WORD_TOKENS`: the thought-switch words that TIP
  penalises and the judge's `` yes`` / `` no``, so that a verdict is one token as in a real
  tokenizer);
* a *script* decides what the "model" writes after a context (see :class:`ScriptedSolution`: by
  default a fixed solution ending in ``The answer is \\boxed{42}.``, then EOS);
* log-probabilities are made up, deterministically from the seed, the context and how often that
  context was asked for before (so ``n`` chains at the same point differ, and the same seed and the
  same calls give the same numbers);
* ``max_tokens`` and stop strings are honoured like vLLM does (the stop string is not returned);
* a prefix cache is simulated: prompt tokens that extend, in whole blocks, a sequence the fake
  computed before count as cached;
* faults can be injected: a :class:`~features.errors.GeneratorError` or empty completions on chosen
  calls.

:class:`FakeGenerator` is a :class:`~env.generators.live.LiveGenerator` over it.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from env.generators.backend import Completion, CompletionRequest
from env.generators.live import LiveGenerator
from env.generators.prompts import TESTBED, PromptTemplate
from env.models.testbed.task import EOS
from env.types import SamplingConfig
from features.errors import ConfigError, GeneratorError

__all__ = [
    "DEFAULT_SOLUTION",
    "WORD_TOKENS",
    "FakeBackend",
    "FakeGenerator",
    "Fault",
    "Script",
    "ScriptedSolution",
]

#: What the fake writes by default after a question prompt.
DEFAULT_SOLUTION = "b = a + 2 = 40 + 2 = 42\nc = b * 1 = 42 * 1 = 42\nThe answer is \\boxed{42}."

#: A fault to inject on a call: ``error`` raises, ``empty`` returns completions with no tokens.
Fault = Literal["error", "empty"]

#: A script maps the full context text to what the model writes next (EOS is added by the fake),
#: or maps a substring of the prompt (a question text, say) to a solution text or a callable.
Script = Callable[[str], str] | Mapping[str, "str | Callable[[str], str]"]

#: Whole-word tokens of the fake vocabulary (ids ``WORD_BASE + i``), matched at word ends only.
WORD_TOKENS: tuple[str, ...] = ("Alternatively", "Wait", "Hmm", " yes", " no")
WORD_BASE = 0x110001  # just past every ord(c) + 1
_WORD_ID = {w: WORD_BASE + i for i, w in enumerate(WORD_TOKENS)}
_WORDS_LONGEST_FIRST = sorted(WORD_TOKENS, key=len, reverse=True)
_VERDICT_PAIRS = {_WORD_ID[" yes"]: _WORD_ID[" no"], _WORD_ID[" no"]: _WORD_ID[" yes"]}

# Alternatives offered in the top logprobs (a small alphabet, so they look like real tokens).
_ALPHABET = "0123456789 =+-*\nabcdefghijklmnopqrstuvwxyz.,{}\\ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True, slots=True)
class ScriptedSolution:
    """The default script: write ``solution`` after a prompt, and continue it where it left off.

    After a context, in order:

    1. a judge prompt (the context ends with ``judge_marker``): write ``verdict``;
    2. otherwise find where the context leaves off in ``solution``: the longest suffix of the
       context that is a prefix of ``solution`` (a chain continued), or, if longer, the longest
       suffix of at least ``min_overlap`` characters that occurs inside ``solution`` (an
       answer-forcing suffix such as ``\\nThe answer is \\boxed{``), and write the rest;
    3. nothing matches (a fresh prompt, or ``Wait,`` appended after a finished chain): write the
       whole ``solution`` (after a space if the context does not end in white space).

    Attributes:
        solution: the text the model writes.
        verdict: what the model answers to a judge prompt.
        judge_marker: how a judge prompt ends.
        min_overlap: shortest inner overlap that counts.
    """

    solution: str = DEFAULT_SOLUTION
    verdict: str = " yes"
    judge_marker: str = "Correct?"
    min_overlap: int = 8

    def __call__(self, context: str) -> str:
        if context.endswith(self.judge_marker):
            return self.verdict
        sol = self.solution
        best_len, best_end = 0, 0
        for n in range(min(len(context), len(sol)), 0, -1):
            if sol.startswith(context[-n:]):
                best_len, best_end = n, n
                break
        for n in range(min(len(context), len(sol)), max(self.min_overlap, best_len + 1) - 1, -1):
            pos = sol.find(context[-n:])
            if pos >= 0:
                best_len, best_end = n, pos + n
                break
        if best_len:
            return sol[best_end:]
        if context and not context[-1].isspace() and sol and not sol[0].isspace():
            return " " + sol
        return sol


def _resolve_script(script: Script | None) -> Callable[[str], str]:
    if script is None:
        return ScriptedSolution()
    if callable(script):
        return script
    if isinstance(script, Mapping):
        table: list[tuple[str, Callable[[str], str]]] = []
        for key, value in script.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"script keys must be non-empty strings, got {key!r}")
            if isinstance(value, str):
                table.append((key, ScriptedSolution(value)))
            elif callable(value):
                table.append((key, value))
            else:
                raise ConfigError(
                    f"script value for {key!r} must be a solution text or a callable, "
                    f"got {type(value).__name__}"
                )
        # Longest key first, so that a question that contains another one wins.
        table.sort(key=lambda kv: -len(kv[0]))
        default = ScriptedSolution()

        def lookup(context: str) -> str:
            for key, fn in table:
                if key in context:
                    return fn(context)
            return default(context)

        return lookup
    raise ConfigError(f"script must be a callable or a mapping, got {type(script).__name__}")


class FakeBackend:
    """A scripted, seeded :class:`~env.generators.backend.Backend` with a char-level vocabulary.

    Args:
        script: what the model writes (see :data:`Script`); default :class:`ScriptedSolution`.
        seed: seeds the made-up log-probabilities.
        top_logprobs: the most alternatives it can return per position (requests may ask fewer).
        block_size: prefix-cache block size in tokens.
        faults: ``{call_number: fault}`` (1-based numbers of :meth:`complete` calls).
        chat: whether it has a (toy) chat template; without one :meth:`apply_chat` returns ``None``.
        model_name: the name it reports.
        max_model_len: the context size it reports (``None``: unbounded).
        token_delay_s: seconds each call sleeps per token of its longest completion (a batch
            decodes side by side): an engine's speed, for benchmarks and tests of timing.

    Attributes:
        calls: how many times :meth:`complete` was called.
        requests: every request received, in order (for assertions).
    """

    eos_token_id: int = 0

    def __init__(
        self,
        script: Script | None = None,
        *,
        seed: int = 0,
        top_logprobs: int = 5,
        block_size: int = 16,
        faults: Mapping[int, Fault] | None = None,
        chat: bool = False,
        model_name: str = "fake",
        max_model_len: int | None = None,
        token_delay_s: float = 0.0,
    ) -> None:
        if token_delay_s < 0:
            raise ConfigError(f"token_delay_s must be >= 0, got {token_delay_s}")
        self.token_delay_s = float(token_delay_s)
        if top_logprobs < 0:
            raise ConfigError(f"top_logprobs must be >= 0, got {top_logprobs}")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        for call, fault in (faults or {}).items():
            if call < 1 or fault not in ("error", "empty"):
                raise ConfigError(
                    f"faults map call numbers >= 1 to 'error' or 'empty', got {call!r}: {fault!r}"
                )
        self.model_name = model_name
        self.seed = int(seed)
        self.max_top_logprobs = int(top_logprobs)
        self.block_size = int(block_size)
        self.faults: dict[int, Fault] = dict(faults or {})
        self.chat = chat
        self.max_model_len = max_model_len
        self.calls = 0
        self.requests: list[CompletionRequest] = []
        self._script = _resolve_script(script)
        self._blocks: set[bytes] = set()
        self._seen: dict[bytes, int] = {}

    def reset(self, seed: int) -> None:
        """Forget the simulated prefix cache and visit history; reseed the made-up logprobs."""
        self.seed = int(seed)
        self._blocks.clear()
        self._seen.clear()

    # -- vocabulary ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """One token per character (``ord(c) + 1``) or whole word; the EOS string is token 0."""
        out: list[int] = []
        for i, part in enumerate(text.split(EOS)):
            if i:
                out.append(self.eos_token_id)
            out.extend(_encode_part(part))
        return out

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids`` (EOS written as ``<|endoftext|>``, like ``/detokenize``)."""
        return _decode(token_ids, skip_eos=False)

    def apply_chat(self, messages: list[dict[str, str]]) -> str | None:
        """A toy chat rendering when ``chat=True``, else ``None`` (no chat template)."""
        if not self.chat:
            return None
        parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
        return "".join(parts) + "<|assistant|>\n"

    # -- completions --------------------------------------------------------------------------

    def complete(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Run a batch of completions; see the module docstring for what the fake does."""
        self.calls += 1
        self.requests.extend(requests)
        fault = self.faults.get(self.calls)
        if fault == "error":
            raise GeneratorError(f"fake backend: injected failure on call {self.calls}")
        if fault == "empty":
            return [self._empty(r) for r in requests]
        # Cached counts are those at submission: the batch's requests do not see each other.
        cached = [self._cached(r.prompt_ids) for r in requests]
        outs = [self._one(r, c) for r, c in zip(requests, cached, strict=True)]
        if self.token_delay_s:  # an engine's speed: the batch's longest completion, token by token
            time.sleep(self.token_delay_s * max(len(o.token_ids) for o in outs))
        for r, o in zip(requests, outs, strict=True):
            # The last sampled token is never fed back, so its KV is not in the cache.
            self._remember(list(r.prompt_ids) + [int(t) for t in o.token_ids[:-1]])
        return outs

    def _empty(self, r: CompletionRequest) -> Completion:
        m = min(r.top_logprobs, self.max_top_logprobs)
        return Completion(
            token_ids=np.zeros(0, np.int32),
            text="",
            logprobs=np.zeros(0, np.float32),
            top_logprobs=np.zeros((0, m), np.float32),
            top_token_ids=np.zeros((0, m), np.int32),
            finish_reason="stop",
            prompt_tokens=len(r.prompt_ids),
            cached_tokens=0,
        )

    def _one(self, r: CompletionRequest, cached: int) -> Completion:
        if not r.prompt_ids:
            raise GeneratorError("fake backend: empty prompt")
        if r.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {r.max_tokens}")
        context = _decode(r.prompt_ids, skip_eos=True)
        text = self._script(context)
        if not isinstance(text, str):
            raise ConfigError(f"script returned {type(text).__name__}, expected str")
        ids = [*self.encode(text), self.eos_token_id]
        finish: Literal["length", "stop"] = "stop"
        stop_reason: str | None = None
        if len(ids) > r.max_tokens:
            ids, finish = ids[: r.max_tokens], "length"
        # Stop strings: vLLM cuts the text before the earliest match and drops the rest.
        out_text = _decode(ids, skip_eos=True)
        cut = min((i for s in r.stop if s and (i := out_text.find(s)) >= 0), default=-1)
        if cut >= 0:
            stop_at = next(s for s in r.stop if s and out_text.find(s) == cut)
            # The tokens up to the one that completes the stop string are generated.
            end = cut + len(stop_at)
            n_tok = next(j for j in range(1, len(ids) + 1) if len(_decode(ids[:j], True)) >= end)
            ids, out_text, finish = ids[:n_tok], out_text[:cut], "stop"
            stop_reason = stop_at
        elif ids and ids[-1] == self.eos_token_id:
            finish = "stop"
        digest = hashlib.blake2b(
            np.asarray(r.prompt_ids, np.int64).tobytes(), digest_size=16
        ).digest()
        visit = self._seen.get(digest, 0)
        self._seen[digest] = visit + 1
        m = min(r.top_logprobs, self.max_top_logprobs)
        lp, top_lp, top_ids = self._logprobs(ids, m, digest, visit)
        return Completion(
            token_ids=np.asarray(ids, np.int32),
            text=out_text,
            logprobs=lp,
            top_logprobs=top_lp,
            top_token_ids=top_ids,
            finish_reason=finish,
            prompt_tokens=len(r.prompt_ids),
            cached_tokens=cached,
            stop_reason=stop_reason,
        )

    def _logprobs(
        self, ids: list[int], m: int, digest: bytes, visit: int
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        rng = np.random.default_rng([self.seed, visit, *np.frombuffer(digest, np.uint32).tolist()])
        n = len(ids)
        lp = np.zeros(n, np.float32)
        top_lp = np.zeros((n, m), np.float32)
        top_ids = np.zeros((n, m), np.int32)
        alphabet = np.asarray([ord(c) + 1 for c in _ALPHABET] + [self.eos_token_id], np.int32)
        for i, tok in enumerate(ids):
            # The sampled token gets most of the mass; m - 1 alternatives share part of the rest.
            p = float(rng.uniform(0.35, 0.995))
            rest = rng.dirichlet(np.ones(max(m, 1))) * (1.0 - p) * 0.9
            probs = np.concatenate([[p], rest[: max(m - 1, 0)]])
            lp[i] = math.log(p)
            if m:
                alts = rng.permutation(alphabet[alphabet != tok])[: m - 1]
                if tok in _VERDICT_PAIRS and m > 1:
                    alts[0] = _VERDICT_PAIRS[tok]  # a verdict's runner-up is the other verdict
                order = np.argsort(-probs, kind="stable")
                top_lp[i] = np.log(probs[order]).astype(np.float32)
                top_ids[i] = np.concatenate([[tok], alts])[order]
        return lp, top_lp, top_ids

    # -- prefix cache -------------------------------------------------------------------------

    def _block_keys(self, ids: Sequence[int]) -> Iterable[bytes]:
        h = hashlib.blake2b(digest_size=16)
        for j in range(len(ids) // self.block_size):
            block = ids[j * self.block_size : (j + 1) * self.block_size]
            h.update(np.asarray(block, np.int64).tobytes())
            yield h.copy().digest()

    def _remember(self, ids: Sequence[int]) -> None:
        self._blocks.update(self._block_keys(ids))

    def _cached(self, prompt_ids: Sequence[int]) -> int:
        # The last prompt token is always computed (its logits are needed), as in vLLM.
        usable = list(prompt_ids[: max(len(prompt_ids) - 1, 0)])
        n = 0
        for key in self._block_keys(usable):
            if key not in self._blocks:
                break
            n += self.block_size
        return n


def _encode_part(text: str) -> list[int]:
    out: list[int] = []
    i, n = 0, len(text)
    while i < n:
        for w in _WORDS_LONGEST_FIRST:
            end = i + len(w)
            if text.startswith(w, i) and (end == n or not text[end].isalnum()):
                out.append(_WORD_ID[w])
                i = end
                break
        else:
            out.append(ord(text[i]) + 1)
            i += 1
    return out


def _decode(token_ids: Sequence[int], skip_eos: bool) -> str:
    parts: list[str] = []
    for t in token_ids:
        t = int(t)
        if t == 0:
            if not skip_eos:
                parts.append(EOS)
        elif 1 <= t < WORD_BASE:
            parts.append(chr(t - 1))
        elif WORD_BASE <= t < WORD_BASE + len(WORD_TOKENS):
            parts.append(WORD_TOKENS[t - WORD_BASE])
        else:
            raise ConfigError(f"{t} is not a token id of the fake vocabulary")
    return "".join(parts)


class FakeGenerator(LiveGenerator):
    """A :class:`~env.generators.live.LiveGenerator` over a :class:`FakeBackend`.

    Args:
        script: what the model writes (see :data:`Script`).
        seed: seeds the made-up log-probabilities.
        top_logprobs: the most alternatives the backend returns per position.
        faults: faults to inject (see :class:`FakeBackend`).
        template: prompt template or its name (default: the testbed template).
        sampling: sampling configuration (default: ``SamplingConfig()``).
        **backend_kw: more :class:`FakeBackend` arguments.
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        seed: int = 0,
        top_logprobs: int = 5,
        faults: Mapping[int, Fault] | None = None,
        template: PromptTemplate | str = TESTBED,
        sampling: SamplingConfig | None = None,
        **backend_kw: Any,
    ) -> None:
        self.fake = FakeBackend(
            script, seed=seed, top_logprobs=top_logprobs, faults=faults, **backend_kw
        )
        super().__init__(self.fake, template=template, sampling=sampling)
