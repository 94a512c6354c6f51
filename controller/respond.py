"""The proxy's answers in OpenAI's shapes: one JSON body, or a stream of Server-Sent Events.

The assistant message is :attr:`~controller.result.Result.text`, the reasoning and answer
of a chain that gave the chosen answer. A chain that thinks in a ``<think>...</think>`` section
(reasoning models) has its thinking in ``reasoning_content``, as vLLM's reasoning parsers return
it, and the rest in ``content``. ponder's accounting is under the ``ponder`` key.

A stream (``stream: true``) starts once the controller has decided: a chunk with the role, the
chosen chain's text in deltas (``reasoning_content`` first, then ``content``), a chunk with the
``finish_reason`` and the ``ponder`` object, then (unless ``stream_options.include_usage`` is
false) a chunk with ``usage`` and no choices, and ``data: [DONE]``. While the controller works
the stream sends SSE comment lines, which clients skip: ``: ponder-progress {json}`` per
decision when the request asked for ``ponder.progress``, otherwise ``: keep-alive`` every few
seconds. An error after the stream began (the upstream failed before any answer) comes as one
``data: {"error": {...}}`` event, which the openai client raises, then ``[DONE]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, Literal

from controller.parse import Ask, HTTPError
from controller.result import Result, Step

__all__ = [
    "THINK_CLOSE",
    "THINK_OPEN",
    "answer_body",
    "check_answer",
    "error_body",
    "progress_comment",
    "split_reasoning",
    "stream_events",
]

#: The markers of a thinking section (DeepSeek-R1, Qwen3 and their distills).
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
#: Characters per streamed delta (at most; deltas end at white space where they can).
_DELTA_CHARS = 96


def error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning, content)`` of a chain's text: the thinking section and what follows it;
    ``(None, text)`` when the text has no end-of-thinking marker."""
    head, sep, tail = text.partition(THINK_CLOSE)
    if not sep:
        return None, text
    head = head.strip()
    if head.startswith(THINK_OPEN):
        head = head[len(THINK_OPEN) :].strip()
    return head, tail.strip()


def check_answer(r: Result) -> None:
    """Raise the 502 of an upstream that failed before any chain had an answer."""
    if r.answer is None and r.fault:
        raise HTTPError(
            502,
            f"the upstream model server failed before any answer: {r.reason}",
            "upstream_error",
            "upstream_failed",
        )


def _finish(r: Result) -> str:
    return "stop" if r.reason == "stop" else "length"


def _ponder(ask: Ask, r: Result, request_id: str) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "answer": r.answer,
        "confidence": r.confidence,
        "reason": r.reason,
        "chains": r.n_chains,
        "chain": r.chain_id,
        "decoded": r.decoded,
        "unused": r.unused,
        "chain_tokens": list(r.chain_tokens),
        "tokens": dict(r.tokens),
        "latency_s": round(r.latency_s, 6),
        "trace_length": len(r.trace),
        "policy": r.policy,
        "cut_short": r.cut_short,
        "in_flight": r.in_flight,
        "request_id": request_id,
    }
    if ask.trace:
        extra["trace"] = [
            {
                "action": s.action,
                "decoded": s.decoded,
                "delta": s.delta,
                "elapsed_s": round(s.elapsed_s, 6),
                "features": s.features,
            }
            for s in r.trace
        ]
    return extra


def _usage(r: Result) -> dict[str, int]:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.decoded,
        "total_tokens": r.prompt_tokens + r.decoded,
    }


def _head(kind: str, request_id: str, stream: bool) -> dict[str, str]:
    if kind == "chat":
        obj = "chat.completion.chunk" if stream else "chat.completion"
        return {"id": f"chatcmpl-{request_id}", "object": obj}
    return {"id": f"cmpl-{request_id}", "object": "text_completion"}


def answer_body(
    kind: Literal["chat", "completions"], ask: Ask, r: Result, model: str, request_id: str
) -> dict[str, Any]:
    """The JSON answer (``check_answer`` first)."""
    if kind == "chat":
        reasoning, content = split_reasoning(r.text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "finish_reason": _finish(r),
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": r.text, "finish_reason": _finish(r), "logprobs": None}
    return {
        **_head(kind, request_id, False),
        "created": int(time.time()),
        "model": ask.model or model,
        "choices": [choice],
        "usage": _usage(r),
        "ponder": _ponder(ask, r, request_id),
    }


def _pieces(text: str) -> Iterator[str]:
    """``text`` in deltas of at most :data:`_DELTA_CHARS` characters, cut after white space
    where there is some (joined, they are ``text``)."""
    pos = 0
    while pos < len(text):
        end = min(len(text), pos + _DELTA_CHARS)
        if end < len(text):
            cut = max(text.rfind(" ", pos, end), text.rfind("\n", pos, end))
            if cut > pos:
                end = cut + 1
        yield text[pos:end]
        pos = end


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_events(
    kind: Literal["chat", "completions"], ask: Ask, r: Result, model: str, request_id: str
) -> Iterator[str]:
    """The SSE events of a decided answer, ``[DONE]`` last (see the module docstring); an
    upstream failure before any answer is one error event."""
    try:
        check_answer(r)
    except HTTPError as exc:
        yield _event(error_body(exc.message, exc.kind, exc.code, exc.param))
        yield "data: [DONE]\n\n"
        return
    base = {
        **_head(kind, request_id, True),
        "created": int(time.time()),
        "model": ask.model or model,
    }

    def chunk(choice: dict[str, Any], **more: Any) -> str:
        return _event({**base, "choices": [{"index": 0, **choice}], **more})

    if kind == "chat":
        reasoning, content = split_reasoning(r.text)
        yield chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        for piece in _pieces(reasoning or ""):
            yield chunk({"delta": {"reasoning_content": piece}, "finish_reason": None})
        for piece in _pieces(content):
            yield chunk({"delta": {"content": piece}, "finish_reason": None})
        yield chunk(
            {"delta": {}, "finish_reason": _finish(r), "logprobs": None},
            ponder=_ponder(ask, r, request_id),
        )
    else:
        for piece in _pieces(r.text):
            yield chunk({"text": piece, "finish_reason": None, "logprobs": None})
        yield chunk(
            {"text": "", "finish_reason": _finish(r), "logprobs": None},
            ponder=_ponder(ask, r, request_id),
        )
    if ask.include_usage:
        yield _event({**base, "choices": [], "usage": _usage(r)})
    yield "data: [DONE]\n\n"


def progress_comment(step: Step) -> str:
    """The SSE comment of one decision (``ponder.progress``)."""
    data = {
        "action": step.action,
        "decoded": step.decoded,
        "delta": step.delta,
        "elapsed_s": round(step.elapsed_s, 3),
    }
    return f": ponder-progress {json.dumps(data)}\n\n"
