"""The OpenAPI schema of the proxy (``GET /openapi.json``): what it accepts and what it answers.

The schema says exactly what :mod:`controller.proxy` checks, so a body that fits it is answered
(200, or 502/503 for the upstream and the load) and one that does not is refused with a 4xx; the
fuzz tests (``tests/controller/test_proxy_fuzz.py``) hold the proxy to it. Fields it does not
name (``temperature``, ``top_p``, ...) are accepted and ignored: the server's settings hold.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ROLES", "openapi_schema"]

#: The message roles a chat request may use (the question is the last ``user`` message).
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
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
    model: str, *, min_tokens: int = 1, max_body_bytes: int = 1_000_000
) -> dict[str, Any]:
    """The proxy's OpenAPI 3.1 document.

    Args:
        model: the model name the proxy reports.
        min_tokens: the smallest token cap a request may ask for (what opening one chain costs).
        max_body_bytes: the largest body accepted.
    """
    cap = {"type": ["integer", "null"], "minimum": min_tokens}
    ponder_options = {
        "type": ["object", "null"],
        "description": "ponder's per-request settings: they only tighten the server's",
        "additionalProperties": False,
        "properties": {
            "token_cap": cap,
            "latency_cap_s": {"type": ["number", "null"], "minimum": 0.1},
            "trace": {"type": ["boolean", "null"]},
        },
    }
    common = {
        "model": {"type": ["string", "null"]},
        "max_tokens": cap,
        "max_completion_tokens": cap,
        "stream": {"enum": [False, None], "description": "streaming is not supported"},
        "n": {"enum": [1, None], "description": "one answer per question"},
        "ponder": ponder_options,
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
        },
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
        },
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
                "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
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
                        "description": "the answer, with ponder's accounting under `ponder`",
                        "content": {"application/json": {"schema": _ref(response)}},
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
                "the one model the proxy serves",
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
