"""What an OpenAI request asks the proxy for: its body read field by field into an :class:`Ask`.

Every field OpenAI's chat and completions APIs define is either honoured or refused with a 400
that names it; none is ignored silently. A field at the value that means "nothing special"
(``temperature`` equal to the server's, ``stop: null``, ``logprobs: false``, ``n: 1``,
``frequency_penalty: 0``, ...) is accepted, since it asks for what ponder does anyway.

==========================  ========================================================================
honoured                    ``messages`` (the whole conversation: system and earlier turns go
                            through the model's chat template), ``prompt``, ``model`` (echoed),
                            ``max_tokens`` / ``max_completion_tokens`` (tighten the token cap),
                            ``stream`` and ``stream_options.include_usage``, ``user`` (logged),
                            ``ponder`` (below)
at the server's value only  ``temperature``, ``top_p`` (ponder samples every chain of a question
                            alike, at the settings of ``ponder serve``), ``n`` (1),
                            ``response_format`` (``text``)
refused unless "nothing"    ``stop``, ``seed``, ``logprobs``, ``top_logprobs``,
                            ``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``echo``,
                            ``suffix``, ``best_of``, ``store``, ``metadata``
refused                     every other field (``tools``, ``functions``, ``audio``, ...)
==========================  ========================================================================

The ``ponder`` object: ``token_cap``, ``latency_cap_s`` (tighten the server's caps), ``trace``
(the decisions and their features in the answer), ``policy`` (one of the policies the server
loaded: ``GET /v1/models`` lists them), ``lam`` (the price of compute a learned policy acts for),
``progress`` (with ``stream``: a comment line per decision while the controller works),
``mode`` (``cot``, or ``draft`` for Chain-of-Draft's terse steps) and ``tip`` (the
thought-switching penalty: ``true`` for the default, ``false`` for none, or
``{"penalty": 3.0, "window": 600}``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from controller.controller import MIN_LATENCY_CAP_S
from env.types import PromptMode, TipConfig

__all__ = [
    "MAX_JSON_DEPTH",
    "PONDER_FIELDS",
    "Ask",
    "HTTPError",
    "ServerLimits",
    "bad_request",
    "check_json",
    "no_constant",
    "parse_request",
]

#: Deepest nesting of arrays and objects a request body may have (OpenAI's bodies need 5).
MAX_JSON_DEPTH = 32
#: Fields of the per-request ``ponder`` object.
PONDER_FIELDS = frozenset(
    {"token_cap", "latency_cap_s", "trace", "policy", "lam", "progress", "mode", "tip"}
)

#: Fields that are accepted only at the value meaning "nothing": field -> that value's test.
_NOTHING: dict[str, Any] = {
    "stop": lambda v: v is None or v == [] or v == "",
    "seed": lambda v: v is None,
    "logprobs": lambda v: v is None or v is False or (type(v) is int and v == 0),
    "top_logprobs": lambda v: v is None or (type(v) is int and v == 0),
    "frequency_penalty": lambda v: v is None or (_number(v) and v == 0),
    "presence_penalty": lambda v: v is None or (_number(v) and v == 0),
    "logit_bias": lambda v: v is None or v == {},
    "echo": lambda v: v is None or v is False,
    "suffix": lambda v: v is None or v == "",
    "best_of": lambda v: v is None or (type(v) is int and v == 1),
    "store": lambda v: v is None or v is False,
    "metadata": lambda v: v is None or v == {},
}
#: Why each of them is refused otherwise.
_WHY: dict[str, str] = {
    "stop": "ponder decides from whole chains, which end at the model's end of sequence",
    "seed": "the chains are sampled by the upstream server, which takes no per-request seed here",
    "logprobs": "the answer is chosen among many chains; their log-probabilities are not returned",
    "top_logprobs": "log-probabilities are not returned",
    "frequency_penalty": "the chains are sampled at the server's settings",
    "presence_penalty": "the chains are sampled at the server's settings",
    "logit_bias": "the chains are sampled at the server's settings",
    "echo": "the prompt is not echoed",
    "suffix": "completions with a suffix are not supported",
    "best_of": "ponder chooses how many chains to sample itself (see the 'ponder' object)",
    "store": "ponder stores nothing",
    "metadata": "ponder stores nothing",
}
_COMMON = frozenset(
    {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "user"}
    | {"ponder"}
    | set(_NOTHING)
)
_FIELDS = {
    "chat": _COMMON | {"messages", "max_completion_tokens", "response_format"},
    "completions": _COMMON | {"prompt"},
}
_MESSAGE_KEYS = frozenset({"role", "content"})


class HTTPError(Exception):
    """An error the proxy answers in OpenAI's form: ``status``, ``message``, the error ``kind``
    (``type``), ``code`` and the ``param`` (field) it is about."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param


def bad_request(message: str, code: str | None = None, param: str | None = None) -> HTTPError:
    """A 400 (``invalid_request_error``) about ``param``."""
    return HTTPError(400, message, "invalid_request_error", code, param)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What a request is checked against: the server's sampling settings and its policies.

    Attributes:
        temperature: the chains' sampling temperature (``ponder serve --temperature``).
        top_p: their nucleus.
        policies: the names of the policies a request may choose (the first is the default).
    """

    temperature: float = 0.7
    top_p: float = 1.0
    policies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Ask:
    """What a request asks for.

    Attributes:
        question: the question: the last user message, or the prompt.
        context: the conversation before it, ``(role, content)`` pairs (system first).
        model: the model name the client sent (echoed back).
        token_cap: decoded tokens it allows (``None``: the server's cap).
        latency_cap_s: seconds it allows (``None``: the server's cap).
        trace: include the decisions in the answer.
        stream: answer with Server-Sent Events.
        include_usage: send the usage chunk at the end of a stream.
        progress: send a progress comment per decision while streaming.
        policy: the policy it chose (``None``: the server's default).
        lam: the price of compute for a learned policy (``None``: the policy's own).
        user: the client's end-user id (logged).
        mode: how its chains are prompted (``None``: the server's).
        tip: its thought-switching penalty: a config, ``False`` for none, ``None`` for the
            server's.
    """

    question: str
    context: tuple[tuple[str, str], ...] = ()
    model: str | None = None
    token_cap: int | None = None
    latency_cap_s: float | None = None
    trace: bool = False
    stream: bool = False
    include_usage: bool = True
    progress: bool = False
    policy: str | None = None
    lam: float | None = None
    user: str | None = None
    mode: PromptMode | None = None
    tip: TipConfig | bool | None = None


def no_constant(name: str) -> Any:
    """``json.loads``'s ``parse_constant``: ``NaN`` and the infinities are refused."""
    raise ValueError(f"{name} is not a JSON value (JSON numbers are finite)")


def check_json(body: Any) -> None:
    """Refuse a body nested deeper than :data:`MAX_JSON_DEPTH` or holding text that is not
    valid Unicode (a lone surrogate: it could not be sent upstream or answered)."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, path or "the body")
        elif isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise bad_request(
                    f"the body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels "
                    f"(at {path or 'the top'})",
                    param=path or None,
                )
            if isinstance(value, dict):
                for k, v in value.items():
                    _check_text(k, f"a key of {path or 'the body'}")
                    stack.append((v, f"{path}.{k}" if path else k, depth + 1))
            else:
                stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("utf-8", "backslashreplace").decode()
        raise bad_request(
            f"{where} is not valid Unicode: it holds a lone surrogate ({bad}) at character "
            f"{exc.start}; encode the text as UTF-8",
            param=where,
        ) from None


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)


def parse_request(
    kind: Literal["chat", "completions"], body: dict[str, Any], limits: ServerLimits
) -> Ask:
    """Read a chat (``kind="chat"``) or completions request body into an :class:`Ask`.

    Raises:
        HTTPError: a 400 naming the field that is malformed, unknown or not supported.
    """
    for field in sorted(set(body) - _FIELDS[kind]):
        other = "completions" if kind == "chat" else "chat"
        where = f" (it belongs to the {other} API)" if field in _FIELDS[other] else ""
        raise bad_request(
            f"field {field!r} is not supported by ponder{where}: remove it", param=field
        )
    for field, nothing in _NOTHING.items():
        if field in body and not nothing(body[field]):
            raise bad_request(
                f"{field}={body[field]!r} is not supported: {_WHY[field]}; leave {field} out",
                param=field,
            )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}", param="stream")
    include_usage = _stream_options(body.get("stream_options"), bool(stream))
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int | float) or n != 1):
        raise bad_request(f"n must be 1 (ponder answers each question once), got {n!r}", param="n")
    _same_as_server(body, "temperature", limits.temperature, "--temperature")
    _same_as_server(body, "top_p", limits.top_p, "its top-p")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad_request(
            f"response_format={fmt!r} is not supported: ponder answers in text (a chain's "
            'reasoning and its answer); leave it out or send {"type": "text"}',
            param="response_format",
        )
    if kind == "chat":
        question, context = _conversation(body.get("messages"))
    else:
        question, context = _prompt(body.get("prompt")), ()
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"model must be a string, got {model!r}", param="model")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request(f"user must be a string, got {user!r}", param="user")
    cap = None
    for field in ("max_completion_tokens", "max_tokens"):
        v = body.get(field)
        if v is not None:
            cap = _int_field(v, field) if cap is None else min(cap, _int_field(v, field))
    extra = body.get("ponder")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise bad_request("'ponder' must be an object such as {\"token_cap\": 512}", param="ponder")
    unknown = sorted(set(extra) - PONDER_FIELDS)
    if unknown:
        raise bad_request(
            f"unknown 'ponder' fields {unknown}; use {sorted(PONDER_FIELDS)}", param="ponder"
        )
    if extra.get("token_cap") is not None:
        v = _int_field(extra["token_cap"], "ponder.token_cap")
        cap = v if cap is None else min(cap, v)
    trace = _flag(extra, "trace")
    progress = _flag(extra, "progress")
    if progress and not stream:
        raise bad_request(
            "ponder.progress needs stream: true (progress comes as events of the stream)",
            param="ponder.progress",
        )
    return Ask(
        question=question,
        context=context,
        model=model,
        token_cap=cap,
        latency_cap_s=_latency(extra.get("latency_cap_s")),
        trace=trace,
        stream=bool(stream),
        include_usage=include_usage,
        progress=progress,
        policy=_policy(extra.get("policy"), limits.policies),
        lam=_lam(extra.get("lam")),
        user=user,
        mode=_mode(extra.get("mode")),
        tip=_tip(extra.get("tip")),
    )


def _stream_options(v: Any, stream: bool) -> bool:
    if v is None:
        return True
    if not stream:
        raise bad_request("stream_options needs stream: true", param="stream_options")
    if not isinstance(v, dict) or set(v) - {"include_usage"}:
        raise bad_request(
            f'stream_options must be {{"include_usage": true|false}}, got {v!r}',
            param="stream_options",
        )
    inc = v.get("include_usage", True)
    if not isinstance(inc, bool):
        raise bad_request(
            f"stream_options.include_usage must be true or false, got {inc!r}",
            param="stream_options.include_usage",
        )
    return inc


def _same_as_server(body: dict[str, Any], field: str, server: float, flag: str) -> None:
    v = body.get(field)
    if v is None:
        return
    if not _number(v):
        raise bad_request(f"{field} must be a number, got {v!r}", param=field)
    if not math.isclose(float(v), server, rel_tol=0.0, abs_tol=1e-9):
        raise bad_request(
            f"{field}={v!r} is not supported: this server samples every chain at {field}="
            f"{server:g} (ponder serve {flag}); leave {field} out or send {server:g}",
            param=field,
        )


def _flag(extra: dict[str, Any], name: str) -> bool:
    v = extra.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_request(f"ponder.{name} must be true or false, got {v!r}", param=f"ponder.{name}")
    return v


def _latency(lat: Any) -> float | None:
    if lat is None:
        return None
    if not _number(lat) or lat <= 0:
        raise bad_request(
            f"ponder.latency_cap_s must be a number > 0, got {lat!r}",
            param="ponder.latency_cap_s",
        )
    if lat < MIN_LATENCY_CAP_S:
        raise bad_request(
            f"ponder.latency_cap_s must be at least {MIN_LATENCY_CAP_S:g} s (no answer comes "
            f"back sooner), got {lat!r}",
            param="ponder.latency_cap_s",
        )
    return float(lat)


def _policy(v: Any, names: Sequence[str]) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or v not in names:
        raise bad_request(
            f"ponder.policy must be one of the policies this server loaded ({', '.join(names)}; "
            f"GET /v1/models lists them), got {v!r}",
            param="ponder.policy",
        )
    return v


def _lam(v: Any) -> float | None:
    if v is None:
        return None
    if not _number(v) or v <= 0:
        raise bad_request(f"ponder.lam must be a number > 0, got {v!r}", param="ponder.lam")
    return float(v)


def _mode(v: Any) -> PromptMode | None:
    if v is None:
        return None
    if v not in ("cot", "draft"):
        raise bad_request(
            f"ponder.mode must be 'cot' (step by step) or 'draft' (Chain-of-Draft), got {v!r}",
            param="ponder.mode",
        )
    return "cot" if v == "cot" else "draft"


def _tip(v: Any) -> TipConfig | bool | None:
    if v is None or isinstance(v, bool):
        return v
    if not isinstance(v, dict) or set(v) - {"penalty", "window"}:
        raise bad_request(
            f'ponder.tip must be true, false or {{"penalty": NUMBER, "window": TOKENS}}, got {v!r}',
            param="ponder.tip",
        )
    default = TipConfig()
    penalty = v.get("penalty", default.penalty)
    window = v.get("window", default.window)
    if not _number(penalty) or penalty < 0:
        raise bad_request(
            f"ponder.tip.penalty must be a number >= 0, got {penalty!r}", param="ponder.tip.penalty"
        )
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise bad_request(
            f"ponder.tip.window must be a whole number of tokens >= 0, got {window!r}",
            param="ponder.tip.window",
        )
    return TipConfig(penalty=float(penalty), window=window)


def _int_field(v: Any, field: str) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # (JSON does not tell 512 from 512.0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise bad_request(f"{field} must be a positive integer, got {v!r}", param=field)
    return v


def _conversation(messages: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``(question, context)``: the last message, a user's, is the question; the messages
    before it are the context (``developer`` is read as ``system``)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request(
            "'messages' must be a non-empty list of {role, content} objects",
            "messages",
            param="messages",
        )
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(
                "every message must be an object with 'role' and 'content'", param=where
            )
        for key in sorted(set(m) - _MESSAGE_KEYS):
            raise bad_request(
                f"{where}.{key} is not supported: a message has a role and a content",
                param=f"{where}.{key}",
            )
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            why = " (ponder calls no tools)" if role in ("tool", "function") else ""
            raise bad_request(
                f"{where}.role must be one of system, developer, user, assistant{why}, "
                f"got {role!r}",
                param=f"{where}.role",
            )
        role = "system" if role == "developer" else role
        if role == "system" and any(r != "system" for r, _ in turns):
            raise bad_request(
                f"{where}: system messages must come before the conversation's first turn",
                param=f"{where}.role",
            )
        turns.append((role, _content(m.get("content"), where)))
    role, question = turns[-1]
    if role != "user":
        raise bad_request(
            f"the last message must be the user's question, got a {role} message "
            f"(messages[{len(turns) - 1}])",
            param=f"messages[{len(turns) - 1}].role",
        )
    if not question.strip():
        raise bad_request(
            "the last user message has no text", param=f"messages[{len(turns) - 1}].content"
        )
    return question, tuple(turns[:-1])


def _content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(
            f"{where}.content must be a string or a list of text parts, got {content!r}",
            param=f"{where}.content",
        )
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f"{at} must be an object with a 'type'", param=at)
        if part["type"] != "text":
            raise bad_request(
                f"{at}.type {part['type']!r} is not supported: the model reads text parts only",
                param=f"{at}.type",
            )
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{at}.text must be a string", param=f"{at}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise bad_request(
            "'prompt' must be one string (token-id and batched prompts are not supported)",
            param="prompt",
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("'prompt' must be a non-empty string: the question", param="prompt")
    return prompt
