"""The OpenAPI schema of the proxy (``GET /openapi.json``): what it accepts and what it answers.

The schema says what :mod:`controller.parse` checks, so a body that fits it is answered (200,
or 502/503 for the upstream and the load) and one that does not is refused with a 4xx; the fuzz
tests (``tests/controller/test_proxy_fuzz.py``) hold the proxy to it. Fields it does not name are
refused (``additionalProperties: false``); ``temperature`` and ``top_p`` must be the server's.
A conversation the schema admits can still be refused (a 400 naming the message): one that does
not end with the user's question, or a system message after the first turn.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ROLES", "openapi_schema"]

#: The message roles a chat request may use (the question is the last message, a ``user`` one).
ROLES = ("system", "developer", "user", "assistant")
_TEXT = {"type": "string", "pattern": r"\S"}  # not blank


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_responses(*statuses: int) -> dict[str, Any]:
    what = {
        400: "a malformed body or a bad field (the message and `param` name it)",
        401: "a missing or wrong API key (when the server has one)",
        413: "a body over the server's --max-body-bytes",
        502: "the upstream model server failed before any chain had an answer",
        503: "no free slot within the request's latency cap",
    }
    return {
        str(s): {
            "description": what[s],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        for s in statuses
    }


def openapi_schema(
    model: str,
    *,
    min_tokens: int = 1,
    max_body_bytes: int = 1_000_000,
    policies: tuple[str, ...] = (),
    temperature: float = 0.7,
    top_p: float = 1.0,
) -> dict[str, Any]:
    """The proxy's OpenAPI 3.1 document.

    Args:
        model: the model name the proxy reports.
        min_tokens: the smallest token cap a request may ask for (what opening one chain costs).
        max_body_bytes: the largest body accepted.
        policies: the policies a request may choose (``ponder.policy``).
        temperature: the server's sampling temperature (the only one a request may send).
        top_p: likewise for top-p.
    """
    cap = {"type": ["integer", "null"], "minimum": min_tokens}
    flag = {"type": ["boolean", "null"]}
    ponder_options = {
        "type": ["object", "null"],
        "description": "ponder's per-request settings (caps only tighten the server's)",
        "additionalProperties": False,
        "properties": {
            "token_cap": cap,
            "latency_cap_s": {"type": ["number", "null"], "minimum": 0.1},
            "trace": flag,
            "policy": {"enum": [*policies, None], "description": "one of GET /v1/models"},
            "lam": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0,
                "description": "the price of compute a learned policy acts for",
            },
            "progress": {
                **flag,
                "description": "with stream: a comment line per decision while deciding",
            },
            "mode": {"enum": ["cot", "draft", None], "description": "draft: Chain-of-Draft"},
            "tip": {
                "description": "thought-switching penalty: true, false or its settings",
                "oneOf": [
                    {"type": ["boolean", "null"]},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "penalty": {"type": "number", "minimum": 0},
                            "window": {"type": "integer", "minimum": 0},
                        },
                    },
                ],
            },
        },
    }
    nothing = {"description": "accepted only at the value that asks for nothing special"}
    common = {
        "model": {"type": ["string", "null"]},
        "max_tokens": cap,
        "stream": flag,
        "stream_options": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {"include_usage": {"type": "boolean"}},
        },
        "n": {"enum": [1, None], "description": "one answer per question"},
        "temperature": {"enum": [temperature, None], "description": "the server's only"},
        "top_p": {"enum": [top_p, None], "description": "the server's only"},
        "user": {"type": ["string", "null"]},
        "stop": {**nothing, "enum": [None, "", []]},
        "seed": {**nothing, "type": "null"},
        "frequency_penalty": {**nothing, "enum": [0, None]},
        "presence_penalty": {**nothing, "enum": [0, None]},
        "logit_bias": {**nothing, "type": ["object", "null"], "maxProperties": 0},
        "store": {**nothing, "enum": [False, None]},
        "metadata": {**nothing, "type": ["object", "null"], "maxProperties": 0},
        "ponder": ponder_options,
    }
    chat_only = {
        "max_completion_tokens": cap,
        "logprobs": {**nothing, "enum": [False, None]},
        "top_logprobs": {**nothing, "enum": [0, None]},
        "response_format": {
            "type": ["object", "null"],
            "required": ["type"],
            "properties": {"type": {"const": "text"}},
        },
    }
    completions_only = {
        "logprobs": {**nothing, "enum": [False, 0, None]},
        "top_logprobs": {**nothing, "enum": [0, None]},
        "echo": {**nothing, "enum": [False, None]},
        "suffix": {**nothing, "enum": ["", None]},
        "best_of": {**nothing, "enum": [1, None]},
    }
    part = {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"type": "string"}},
        "if": {"properties": {"type": {"const": "text"}}},
        "then": {"required": ["text"], "properties": {"text": {"type": "string"}}},
    }
    user_content = {  # text, or parts of which at least one is text (the text parts are joined)
        "oneOf": [
            _TEXT,
            {
                "type": "array",
                "items": part,
                "contains": {
                    "type": "object",
                    "required": ["type", "text"],
                    "properties": {"type": {"const": "text"}, "text": _TEXT},
                },
            },
        ]
    }
    message = {
        "type": "object",
        "required": ["role"],
        "additionalProperties": False,
        "properties": {
            "role": {"enum": list(ROLES)},
            "content": {"type": ["string", "array", "null"], "items": part},
        },
        # A user message has text: the last one is the question.
        "if": {"properties": {"role": {"const": "user"}}},
        "then": {"required": ["content"], "properties": {"content": user_content}},
    }
    chat_request = {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {
                "description": "the question is the last user message (its text parts joined)",
                "type": "array",
                "minItems": 1,
                "items": message,
                "contains": {"type": "object", "properties": {"role": {"const": "user"}}},
            },
            **common,
            **chat_only,
        },
        "additionalProperties": False,
    }
    completion_request = {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "prompt": {
                "description": "the question: one string (or a list of exactly one)",
                "oneOf": [
                    _TEXT,
                    {"type": "array", "minItems": 1, "maxItems": 1, "items": _TEXT},
                ],
            },
            **common,
            **completions_only,
        },
        "additionalProperties": False,
    }
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            k: {"type": "integer", "minimum": 0}
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    }
    ponder_result = {
        "type": "object",
        "required": ["answer", "confidence", "reason", "chains", "decoded", "policy", "cut_short"],
        "properties": {
            "answer": {"type": ["string", "null"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "reason": {
                "type": "string",
                "description": "stop, token cap, latency cap, generator fault: ..., ...",
            },
            "chains": {"type": "integer", "minimum": 0},
            "decoded": {"type": "integer", "minimum": 0},
            "unused": {"type": "integer", "minimum": 0},
            "chain_tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "tokens": {"type": "object", "additionalProperties": {"type": "integer"}},
            "latency_s": {"type": "number", "minimum": 0},
            "trace_length": {"type": "integer", "minimum": 0},
            "policy": {"type": "string"},
            "cut_short": {
                "enum": ["continue", "branch", "verify", None],
                "description": "what the policy would have done next had the token cap left "
                "room (finish_reason is then length)",
            },
            "in_flight": {"type": "integer", "minimum": 0},
            "chain": {"type": ["integer", "null"], "description": "the chain the text is from"},
            "request_id": {"type": "string"},
            "trace": {"type": "array", "items": {"type": "object"}},
        },
    }
    finish = {"enum": ["stop", "length"]}

    def completion(obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage", "ponder"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": obj},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": choice},
                "usage": _ref("Usage"),
                "ponder": _ref("PonderResult"),
            },
        }

    chat_choice = {
        "type": "object",
        "required": ["index", "message", "finish_reason"],
        "properties": {
            "index": {"const": 0},
            "message": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"const": "assistant"},
                    "content": {"type": "string"},
                    "reasoning_content": {
                        "type": "string",
                        "description": "the chain's thinking section, when it has one",
                    },
                },
            },
            "finish_reason": finish,
        },
    }
    text_choice = {
        "type": "object",
        "required": ["index", "text", "finish_reason"],
        "properties": {
            "index": {"const": 0},
            "text": {"type": "string"},
            "finish_reason": finish,
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    }

    def post(summary: str, request: str, response: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "security": [{"bearer": []}, {}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(request)}},
                },
                "responses": {
                    "200": {
                        "description": "the answer, with ponder's accounting under `ponder`; "
                        "with stream: Server-Sent Events of chunks, usage, then [DONE]",
                        "content": {
                            "application/json": {"schema": _ref(response)},
                            "text/event-stream": {
                                "schema": {
                                    "type": "object",
                                    "required": ["data"],
                                    "properties": {"data": {"type": "string"}},
                                }
                            },
                        },
                    },
                    **_error_responses(400, 401, 413, 502, 503),
                },
            }
        }

    def get(summary: str, media: str, schema: dict[str, Any], *errors: int) -> dict[str, Any]:
        op: dict[str, Any] = {
            "summary": summary,
            "responses": {
                "200": {"description": summary, "content": {media: {"schema": schema}}},
                **_error_responses(*errors),
            },
        }
        if errors:
            op["security"] = [{"bearer": []}, {}]
        return {"get": op}

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ponder serve",
            "version": "1",
            "description": f"An OpenAI-compatible endpoint ({model}): ponder decides how much "
            f"compute each question gets. Bodies up to {max_body_bytes} bytes.",
        },
        "paths": {
            "/v1/chat/completions": post(
                "answer the last user message", "ChatRequest", "ChatCompletion"
            ),
            "/v1/completions": post("answer the prompt", "CompletionRequest", "TextCompletion"),
            "/v1/models": get(
                "the policies the proxy serves, one model each",
                "application/json",
                {
                    "type": "object",
                    "properties": {"object": {"const": "list"}, "data": {"type": "array"}},
                },
                401,
            ),
            "/health": get(
                "whether the proxy is up",
                "application/json",
                {"type": "object", "properties": {"status": {"const": "ok"}}},
            ),
            "/metrics": get("Prometheus metrics", "text/plain", {"type": "string"}),
            "/openapi.json": get("this document", "application/json", {"type": "object"}),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "ChatRequest": chat_request,
                "CompletionRequest": completion_request,
                "ChatCompletion": completion("chat.completion", chat_choice),
                "TextCompletion": completion("text_completion", text_choice),
                "PonderResult": ponder_result,
                "Usage": usage,
                "Error": error,
            },
        },
    }
