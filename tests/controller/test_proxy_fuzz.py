"""Fuzzing the proxy over its own OpenAPI schema (schemathesis, the app in process, the fake
generator upstream): bodies that fit the schema and bodies that do not, every operation.

What must hold for every request: no 5xx (the fake upstream never fails, and a slot is always
free), only the statuses the schema documents, answers that fit the schema, and every 4xx an
OpenAI-style error whose message says what was wrong. Bounded in time: a fixed number of
examples per operation, each under a deadline.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[dev]'")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from controller.app import create_app  # noqa: E402
from controller.controller import Controller  # noqa: E402
from env.episode.config import EnvConfig  # noqa: E402
from env.generators.fake import FakeGenerator  # noqa: E402
from policies.heuristics import BestOfN  # noqa: E402

CFG = EnvConfig(chunk_tokens=16, max_chain_tokens=96, max_chains=6, probe_tokens=8, token_cap=400)
APP = create_app(
    Controller(FakeGenerator(), BestOfN(2), config=CFG, latency_cap_s=30), max_body_bytes=20_000
)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
# Bodies that fit the schema and bodies that break it; text may hold NUL and any code point.
SCHEMA.config.generation.update(modes=list(schemathesis.GenerationMode), allow_x00=True, codec=None)
STATUSES: Counter[tuple[str, int]] = Counter()
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@SCHEMA.parametrize()
@settings(
    max_examples=60,
    deadline=5000,  # ms per request: a hang fails
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_the_proxy_answers_its_schema(case: Any) -> None:
    response = case.call()
    STATUSES[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)
    if 400 <= response.status_code < 500:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"].strip(), error
        assert error["type"] == "invalid_request_error", error


def test_the_fuzzer_reached_answers_and_refusals() -> None:
    """Both kinds of body were sent: some answered (200), some refused (400)."""
    if not STATUSES:
        pytest.skip("runs after the fuzz test (run the module)")
    for op in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert STATUSES[(op, 200)] > 0 and STATUSES[(op, 400)] > 0, dict(STATUSES)


def test_the_schema_is_served_and_names_the_routes() -> None:
    from starlette.testclient import TestClient

    with TestClient(APP) as client:
        doc = client.get("/openapi.json").json()
    assert set(doc["paths"]) == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/openapi.json",
    }
