"""Token-level bookkeeping on what a backend returns: completions into chunk arrays, stop strings
dropped, chunks split, probe answers and verdicts read, TIP's switch tokens found.

:class:`~env.generators.live.LiveGenerator` decides *what* to ask a backend (which chains, how
many tokens, what to inject, when a chain is finished); the functions here turn one
:class:`~env.generators.backend.Completion` into the arrays a :class:`~env.types.Chunk` holds,
whatever engine produced it. They take the tokenizer as a ``decode`` callable (the generator
passes its guarded one), so they never touch an engine themselves.

Conventions every chunk keeps: injected tokens (budget forcing's wait text, a forced answer's
suffix, a closing ``}``) have ``nan`` log-probabilities and top-log-probability rows of ``-inf``
with ids ``-1``; top-log-probability arrays have exactly ``m`` columns (padded the same way).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from env.generators.backend import Completion
from env.types import Chunk, FloatArray, IntArray, TokenUsage
from features.errors import ConfigError
from features.extract import read_probe

__all__ = [
    "Decode",
    "chunk_arrays",
    "chunk_usage",
    "drop_stop",
    "empty_chunk",
    "eos_trim",
    "forced_answer",
    "judge_p_yes",
    "probe_reading",
    "since_last_switch",
    "split_chunk",
    "switch_token_ids",
    "top_arrays",
]

#: A tokenizer's decode: token ids to text.
Decode = Callable[[Sequence[int]], str]


# -- TIP's switch tokens --------------------------------------------------------------------------


def switch_token_ids(
    words: Sequence[str], encode: Callable[[str], list[int]], decode: Decode
) -> tuple[int, ...]:
    """The token ids that open the switch ``words``: the first non-blank token of each word.

    A word like ``" Hmm"`` may encode as ``[" ", "Hmm"]``; penalising the bare space would hurt
    every sentence, so blank leading tokens are skipped.
    """
    out: set[int] = set()
    for w in words:
        for t in encode(w):
            if decode([t]).strip():
                out.add(int(t))
                break
    return tuple(sorted(out))


def since_last_switch(tokens: IntArray, switch_ids: Sequence[int]) -> int:
    """Tokens after the last switch token in ``tokens`` (all of them if there is none)."""
    n = int(tokens.shape[0])
    if n == 0 or not switch_ids:
        return n
    hits = np.flatnonzero(np.isin(tokens, np.asarray(switch_ids, dtype=tokens.dtype)))
    return n if hits.size == 0 else n - int(hits[-1]) - 1


# -- completions into chunk arrays ----------------------------------------------------------------


def eos_trim(comp: Completion, eos: int | None) -> Completion:
    """``comp`` without a trailing EOS token a backend may have left in (changed in place)."""
    n = int(comp.token_ids.shape[0])
    if comp.finish_reason == "stop" and n and eos is not None and int(comp.token_ids[-1]) == eos:
        _keep(comp, n - 1)
    return comp


def _keep(comp: Completion, n: int) -> None:
    comp.token_ids = comp.token_ids[:n]
    comp.logprobs = comp.logprobs[:n]
    comp.top_logprobs = comp.top_logprobs[:n]
    comp.top_token_ids = comp.top_token_ids[:n]


def top_arrays(comp: Completion, m: int) -> tuple[FloatArray, IntArray]:
    """``comp``'s top-log-probability arrays with exactly ``m`` columns (cut or padded)."""
    n = int(comp.token_ids.shape[0])
    if n == 0:
        return np.zeros((0, m), np.float32), np.zeros((0, m), np.int32)
    lp = np.asarray(comp.top_logprobs, dtype=np.float32).reshape(n, -1)
    ids = np.asarray(comp.top_token_ids, dtype=np.int32).reshape(n, -1)
    have = lp.shape[1]
    if have >= m:
        return lp[:, :m], ids[:, :m]
    pad_lp = np.full((n, m - have), -np.inf, dtype=np.float32)
    pad_id = np.full((n, m - have), -1, dtype=np.int32)
    return np.concatenate([lp, pad_lp], axis=1), np.concatenate([ids, pad_id], axis=1)


def chunk_arrays(
    lead: Sequence[int],
    comp_ids: IntArray,
    comp_lp: FloatArray,
    top: tuple[FloatArray, IntArray],
    m: int,
    trail: Sequence[int] = (),
) -> tuple[IntArray, FloatArray, FloatArray, IntArray]:
    """A chunk's ``(token ids, logprobs, top logprobs, top ids)``: the injected ``lead`` tokens,
    the sampled ones with their log-probabilities and ``m``-column ``top`` arrays, then the
    injected ``trail``."""
    a, b = len(lead), len(trail)
    ids = np.concatenate(
        [
            np.asarray(lead, dtype=np.int32),
            comp_ids.astype(np.int32),
            np.asarray(trail, dtype=np.int32),
        ]
    )
    lp = np.concatenate(
        [
            np.full(a, np.nan, np.float32),
            comp_lp.astype(np.float32),
            np.full(b, np.nan, np.float32),
        ]
    )
    top_lp = np.concatenate(
        [np.full((a, m), -np.inf, np.float32), top[0], np.full((b, m), -np.inf, np.float32)]
    )
    top_id = np.concatenate([np.full((a, m), -1, np.int32), top[1], np.full((b, m), -1, np.int32)])
    return ids, lp, top_lp, top_id


def chunk_usage(
    comp: Completion, generated: int, injected: int, prefilled_injected: int
) -> TokenUsage:
    """A chunk's token usage: ``generated`` sampled tokens, ``injected`` ones, and the prompt
    tokens ``comp`` read (the ``prefilled_injected`` of them that were injected count once, as
    injected)."""
    cached = int(comp.cached_tokens)
    return TokenUsage(
        generated=generated,
        prefill=max(0, int(comp.prompt_tokens) - cached - prefilled_injected),
        cached=cached,
        injected=injected,
    )


def empty_chunk(m: int) -> Chunk:
    """The ``cap`` chunk of a chain with no room left: no tokens, nothing spent."""
    return Chunk(
        token_ids=np.zeros(0, np.int32),
        text="",
        logprobs=np.zeros(0, np.float32),
        top_logprobs=np.zeros((0, m), np.float32),
        top_token_ids=np.zeros((0, m), np.int32),
        finish_reason="cap",
        usage=TokenUsage(),
    )


def drop_stop(comp: Completion, stop: Sequence[str], decode: Decode) -> Completion:
    """``comp`` without the tokens of the stop string that ended it, or of the start of one that
    it was cut in (changed in place).

    The engines drop a stop string from the text but keep the tokens that completed it, and a
    continuation must not see them (a suppressed end of thinking is not part of the chain). A
    marker of several tokens cut by the chunk's length would be completed by the next chunk,
    where no engine sees it whole: its start is dropped, and the next chunk writes it again
    (unless nothing else would be left).
    """
    if not stop:
        return comp
    ids = comp.token_ids.tolist()

    def text_of(j: int) -> str:
        return str(decode(ids[:j]))

    full = text_of(len(ids)) if ids else ""
    if comp.finish_reason == "stop":
        if comp.stop_reason is None:
            return comp  # EOS ended it
        stops = [comp.stop_reason] if comp.stop_reason else list(stop)
        starts = [i for st in stops if (i := full.find(st)) >= 0]
        if not starts:
            return comp
        cut = min(starts)
    else:
        partial = max(
            (n for st in stop for n in range(1, len(st)) if full.endswith(st[:n])), default=0
        )
        if not partial:
            return comp
        cut = len(full) - partial
    # Keep the tokens before the one where the stop string begins (a marker may take several
    # tokens: none of them is part of the chain).
    keep = next((j for j in range(len(ids) - 1, -1, -1) if len(text_of(j)) <= cut), 0)
    if comp.finish_reason != "stop" and keep == 0:
        return comp  # (a chunk of nothing but the marker's start would come back forever)
    _keep(comp, keep)
    comp.text = text_of(keep) if keep else ""
    return comp


def forced_answer(
    comp: Completion, decode: Decode, close_ids: Sequence[int]
) -> tuple[int, list[int], str]:
    """How much of a forced answer's completion a chunk keeps: ``(tokens kept, trailing
    injected ids, text)``. The answer runs up to the token that closes it (``}`` may be merged,
    as in ``}.``); one that never closed keeps every token and gets ``close_ids`` appended."""
    ans_ids = comp.token_ids
    n_ans = int(ans_ids.shape[0])
    full = decode(ans_ids.tolist()) if n_ans else ""
    if "}" not in full:
        return n_ans, list(close_ids), comp.text + "}"
    keep = next(j for j in range(1, n_ans + 1) if "}" in decode(ans_ids[:j].tolist()))
    return keep, [], decode(ans_ids[:keep].tolist())


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def split_chunk(chunk: Chunk, k: int, decode: Decode) -> list[Chunk]:
    """Cut a sampled ``chunk`` into pieces of at most ``k`` tokens (``k`` already validated).

    The pieces' tokens, log-probabilities and confidences are the chunk's, in order; their texts
    join to the chunk's text (cut where the decoded token prefixes end, so a character split
    across tokens stays in one piece). Every piece but the last ends for ``length``; the last
    keeps the chunk's finish reason. The prompt tokens (``prefill``, ``cached``) count with the
    first piece.

    Raises:
        ConfigError: a chunk with injected tokens or a forced answer (only a sampled chunk is
            one continuous sample).
    """
    n = len(chunk)
    if n <= k:
        return [chunk]
    if chunk.n_injected or chunk.finish_reason == "forced":
        raise ConfigError(
            "only a sampled chunk can be split (this one has injected tokens or a forced answer)"
        )
    text = chunk.text
    bounds = [*range(0, n, k), n]
    cuts = [0]
    for end in bounds[1:-1]:
        prefix = decode(chunk.token_ids[:end].tolist())
        cuts.append(max(cuts[-1], _common_prefix(prefix, text)))
    cuts.append(len(text))
    conf, ent = chunk.confidence, chunk.entropy
    assert conf is not None and ent is not None  # (filled in __post_init__)
    pieces: list[Chunk] = []
    for i in range(len(bounds) - 1):
        a, b = bounds[i], bounds[i + 1]
        first, last = i == 0, i == len(bounds) - 2
        pieces.append(
            Chunk(
                token_ids=chunk.token_ids[a:b],
                text=text[cuts[i] : cuts[i + 1]],
                logprobs=chunk.logprobs[a:b],
                top_logprobs=chunk.top_logprobs[a:b],
                top_token_ids=chunk.top_token_ids[a:b],
                finish_reason=chunk.finish_reason if last else "length",
                usage=TokenUsage(
                    generated=b - a,
                    prefill=chunk.usage.prefill if first else 0,
                    cached=chunk.usage.cached if first else 0,
                ),
                confidence=conf[a:b],
                entropy=ent[a:b],
            )
        )
    return pieces


# -- probes and verdicts --------------------------------------------------------------------------


def probe_reading(comp: Completion, decode: Decode) -> tuple[str, str | None]:
    """A probe completion's ``(text up to and including the closing "}", answer)``: the answer
    runs up to the brace that closes the box, or is the first line when none does
    (:func:`features.extract.read_probe`)."""
    n = int(comp.token_ids.shape[0])
    full = decode(comp.token_ids.tolist()) if n else ""
    i = full.find("}")
    text = full[: i + 1] if i >= 0 else comp.text
    answer = read_probe(text)
    return text, None if answer is None else str(answer)


def judge_p_yes(comp: Completion, piece: Callable[[int], str]) -> float:
    """P(yes) of a one-token verdict: the probability mass of the top tokens that read ``yes``
    over that of ``yes`` and ``no`` (0.5 when neither is among them)."""
    yes = no = 0.0
    if comp.top_logprobs.shape[0] and comp.top_logprobs.ndim == 2:
        for lp, tid in zip(
            comp.top_logprobs[0].tolist(), comp.top_token_ids[0].tolist(), strict=True
        ):
            if tid < 0 or not math.isfinite(lp):
                continue
            word = piece(int(tid)).strip().lower()
            if word == "yes":
                yes += math.exp(lp)
            elif word == "no":
                no += math.exp(lp)
    p_yes = yes / (yes + no) if yes + no > 0 else 0.5
    return float(min(1.0, max(0.0, p_yes)))
