"""The deployable runtime of ponder.

The controller answers a question under token and latency caps by letting a policy decide, while
the model generates, whether to continue, branch, verify or stop; the OpenAI-compatible proxy
puts it in front of vLLM; ``controller.cli`` is the ``ponder`` command line::

    from controller import Controller, load_policy
    from env.generators import OpenAIGenerator

    gen = OpenAIGenerator("http://127.0.0.1:8000/v1")
    ctl = Controller(gen, load_policy("adaptive-consistency"), token_cap=4096, latency_cap_s=30)
    result = ctl.solve("What is 17 * 23?")  # answer, confidence, trace, tokens, reason

``load_policy`` is :func:`policies.registry.load_policy` (a heuristic's name or a saved policy's
folder; the grammar is documented there). Names import lazily, so ``ponder --help`` stays fast.

Imports run one way: ``controller`` -> ``policies`` -> ``env`` -> ``features``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Controller",
    "FleetResult",
    "Result",
    "Step",
    "create_app",
    "load_policy",
]

_LAZY = {
    "Controller": "controller.controller",
    "FleetResult": "controller.result",
    "Result": "controller.result",
    "Step": "controller.result",
    "create_app": "controller.app",
    "load_policy": "policies.registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'controller' has no attribute {name!r}")
