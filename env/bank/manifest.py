"""A bank's ``manifest.json``: what it holds and how it was recorded (fields in
:mod:`env.bank.schema`), validated field by field on load, with the settings fingerprint that
binds its chunk files to those settings."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from env.bank.schema import SCHEMA_VERSION
from features.errors import BankError

__all__ = ["BankManifest"]

_PONDER_VERSION = "0.1.0"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _mapping_of(check: Any) -> Any:
    return lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and check(x) for k, x in v.items())
    )


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


#: What each manifest field holds, and in words (a hand-edited manifest is refused by name).
_MANIFEST_TYPES: dict[str, tuple[Any, str]] = {
    "model": (_mapping_of(_is_str), "an object of strings"),
    "dataset": (_is_str, "a string"),
    "questions": (lambda v: isinstance(v, list) and all(map(_is_str, v)), "a list of ids"),
    "template": (_is_str, "a string"),
    "mode": (_is_str, "a string"),
    "sampling": (_mapping_of(_is_number), "an object of numbers"),
    "chains": (_is_int, "an integer"),
    "chunk_tokens": (_is_int, "an integer"),
    "max_tokens": (_is_int, "an integer"),
    "extension_chunks": (_is_int, "an integer"),
    "probe_tokens": (_is_int, "an integer"),
    "judge": (lambda v: isinstance(v, bool), "true or false"),
    "seed": (_is_int, "an integer"),
    "prompts": (_mapping_of(_is_str), "an object of strings"),
    "schema_version": (_is_int, "an integer"),
    "ponder_version": (_is_str, "a string"),
    "created": (_is_str, "a string"),
    "bank_id": (_is_str, "a string"),
    "fingerprint": (_is_str, "a string"),
}


def _check_manifest_types(path: Path, raw: dict[str, Any]) -> None:
    for name, (ok, what) in _MANIFEST_TYPES.items():
        if name in raw and not ok(raw[name]):
            raise BankError(
                f"{path}: {name} must be {what}, got {str(raw[name])[:80]!r}: the manifest is "
                "damaged; restore it from version control or re-record"
            )


@dataclass(frozen=True)
class BankManifest:
    """What a bank holds and how it was recorded (``manifest.json``)."""

    model: dict[str, str]
    dataset: str
    questions: list[str]
    template: str
    mode: str
    sampling: dict[str, float]
    chains: int
    chunk_tokens: int
    max_tokens: int
    extension_chunks: int
    probe_tokens: int
    judge: bool
    seed: int
    prompts: dict[str, str] = field(default_factory=dict)
    """The template's wording (system, question, probe, wait and judge texts); empty in banks
    recorded before ponder wrote it."""
    schema_version: int = SCHEMA_VERSION
    ponder_version: str = _PONDER_VERSION
    created: str = ""
    bank_id: str = ""
    """Random, made when the bank is created; every chunk file carries it. Empty in banks
    recorded before ponder wrote it (``ponder bank stamp`` adds it)."""
    fingerprint: str = ""
    """:meth:`settings_fingerprint` when the bank was created; every chunk file carries it."""

    @property
    def thinking_end(self) -> str | None:
        """The marker that closes the recorded model's thinking section (its template's), or
        ``None``: a bank of a model without one."""
        return self.prompts.get("thinking_end") or None

    def settings_fingerprint(self) -> str:
        """sha256 over the settings that decide what the chunks hold (not the question list,
        which grows by appending, nor names, paths and dates)."""
        settings = {
            "model_sha256": self.model.get("sha256", ""),
            "engine": self.model.get("engine", ""),
            "dataset": self.dataset,
            "template": self.template,
            "prompts": self.prompts,
            "mode": self.mode,
            "sampling": self.sampling,
            "chains": self.chains,
            "chunk_tokens": self.chunk_tokens,
            "max_tokens": self.max_tokens,
            "extension_chunks": self.extension_chunks,
            "probe_tokens": self.probe_tokens,
            "judge": self.judge,
            "seed": self.seed,
        }
        if self.model.get("dtype"):
            # (banks from before ponder recorded the precision keep their fingerprint)
            settings["dtype"] = self.model["dtype"]
        blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def identified(self) -> BankManifest:
        """This manifest with a new bank id and its fingerprint (for a bank being created)."""
        return dataclasses.replace(
            self, bank_id=uuid.uuid4().hex, fingerprint=self.settings_fingerprint()
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> BankManifest:
        """Read and validate ``manifest.json``."""
        if not path.exists():
            raise BankError(
                f"{path} is missing: this folder is not a trace bank (record one with `ponder record`)"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # (bad UTF-8 and JSON are ValueErrors)
            raise BankError(
                f"{path} is not valid JSON ({type(e).__name__}: {e}); restore it from version "
                "control or re-record"
            ) from e
        if not isinstance(raw, dict):
            raise BankError(
                f"{path} holds a JSON {type(raw).__name__}, not a manifest object: the manifest "
                "is damaged; restore it from version control or re-record"
            )
        _check_manifest_types(path, raw)
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BankError(
                f"{path} has schema version {version!r}, but this ponder reads version {SCHEMA_VERSION}: "
                "upgrade ponder (or re-record the bank with this version)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {
            "created",
            "ponder_version",
            "schema_version",
            "prompts",
            "bank_id",
            "fingerprint",
        }
        missing = names - set(raw) - optional
        if missing:
            raise BankError(
                f"{path} lacks fields {sorted(missing)}: the manifest is damaged; re-record"
            )
        m = cls(**{k: v for k, v in raw.items() if k in names})
        if bool(m.bank_id) != bool(m.fingerprint):
            raise BankError(
                f"{path} has a bank_id without a fingerprint or the other way round: the manifest "
                "is damaged; restore it from version control"
            )
        if m.fingerprint and m.fingerprint != m.settings_fingerprint():
            raise BankError(
                f"{path} was edited after the bank was recorded: its settings no longer match its "
                f"fingerprint ({m.fingerprint[:12]}, the settings hash to "
                f"{m.settings_fingerprint()[:12]}), so its chunks would be read under settings "
                "they were not recorded with. Restore the manifest from version control"
            )
        return m

    def compatible(self, other: BankManifest) -> list[str]:
        """Fields that differ in ways that make two recordings incompatible."""
        keys = (
            "dataset",
            "template",
            "mode",
            "sampling",
            "chains",
            "chunk_tokens",
            "max_tokens",
            "extension_chunks",
            "probe_tokens",
            "judge",
            "seed",
        )
        diffs = [
            f"{k}: {getattr(self, k)!r} vs {getattr(other, k)!r}"
            for k in keys
            if getattr(self, k) != getattr(other, k)
        ]
        # Banks from before the wording was recorded have none: nothing to compare.
        if self.prompts and other.prompts and self.prompts != other.prompts:
            changed = sorted(
                k
                for k in self.prompts.keys() | other.prompts.keys()
                if self.prompts.get(k) != other.prompts.get(k)
            )
            diffs.append(f"prompt wording differs: {changed}")
        if self.model.get("sha256") != other.model.get("sha256"):
            diffs.append(f"model sha256: {self.model.get('sha256')} vs {other.model.get('sha256')}")
        # A bank from before the precision was recorded has none: nothing to compare.
        mine, theirs = self.model.get("dtype"), other.model.get("dtype")
        if mine and theirs and mine != theirs:
            diffs.append(f"model dtype: {mine} vs {theirs} (pass the bank's --dtype to resume)")
        return diffs
