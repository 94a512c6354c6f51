"""Identities that bind a bank's files: the model's sha256, each question's sha256, and the
bank id and settings fingerprint every chunk file carries (see "Identity" in
:mod:`env.bank.schema`), with the checks that refuse a file that is not this bank's."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from env.bank.manifest import BankManifest
from env.bank.schema import BANK_ID_KEY, FINGERPRINT_KEY, QUESTION_KEY
from env.types import Question
from features.errors import BankError

__all__ = [
    "model_sha256",
    "question_sha256",
    "chunk_identity",
    "check_qids",
    "check_identity",
]


def model_sha256(path: str | Path) -> str:
    """A fingerprint of a model: sha256 over its weight and config files (or of a single file).

    For a folder, the hash covers ``config.json`` and every ``*.safetensors`` / ``*.gguf`` /
    ``*.bin`` file (names and contents, in sorted order). A sidecar ``.ponder_sha256.json`` caches
    it by file sizes and modification times.
    """
    p = Path(path)
    if not p.exists():
        raise BankError(f"model {p} does not exist")
    if p.is_file():
        files = [p]
    else:
        files = sorted(
            f
            for f in p.iterdir()
            if f.name == "config.json" or f.suffix in (".safetensors", ".gguf", ".bin")
        )
        if any(f.suffix == ".safetensors" for f in files):
            # A GGUF export beside the weights (models/testbed/testbed.gguf) is another model
            # file, fingerprinted on its own when used; it does not change the folder's.
            files = [f for f in files if f.suffix != ".gguf"]
    if not files:
        raise BankError(f"model folder {p} has no config.json or weight files")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = p / ".ponder_sha256.json" if p.is_dir() else None
    if cache is not None and cache.exists():
        try:
            c = json.loads(cache.read_text())
            if c.get("stamp") == stamp:
                return str(c["sha256"])
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    if cache is not None:
        with contextlib.suppress(OSError):  # a read-only model folder just goes uncached
            cache.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    return digest


def question_sha256(question: Question) -> str:
    """sha256 over a question's id, text and gold answer: binds a chunk file to its question
    (ids alone collide across banks: they do not depend on the question seed)."""
    blob = json.dumps([question.qid, question.text, question.gold], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def chunk_identity(manifest: BankManifest, question: Question) -> dict[bytes, bytes]:
    """The key-value metadata every chunk file of a bank with an identity carries."""
    return {
        BANK_ID_KEY: manifest.bank_id.encode(),
        FINGERPRINT_KEY: manifest.fingerprint.encode(),
        QUESTION_KEY: question_sha256(question).encode(),
    }


def check_qids(path: Path, table: Any, question: Question) -> None:
    if any(q != question.qid for q in table.column("qid").to_pylist()):
        raise BankError(
            f"{path} holds chunks of another question than {question.qid!r}: the bank is "
            "inconsistent. Move the file away and re-run `ponder record` on this bank"
        )


def check_identity(
    path: Path, meta: dict[bytes, bytes] | None, manifest: BankManifest, question: Question
) -> None:
    """Refuse a chunk file that is not this bank's recording of ``question``."""
    meta = meta or {}
    bank = path.parent.parent
    theirs = meta.get(BANK_ID_KEY, b"").decode()
    redo = (
        f"move it away and re-run `ponder record` with this bank's settings to record question "
        f"{question.qid!r} again"
    )
    if not manifest.bank_id:
        if theirs:
            raise BankError(
                f"{path} belongs to bank {theirs}, but {bank / 'manifest.json'} has no bank "
                "identity (it was recorded before ponder wrote one, or it was replaced by an older "
                f"manifest). If the manifest was replaced, restore it; if the file was copied in "
                f"from another bank, {redo}"
            )
        return
    if not theirs:
        raise BankError(
            f"{path} carries no bank identity, but {bank} is bank {manifest.bank_id}: the file was "
            f"copied in from another bank (or written by a ponder from before identities): {redo}. "
            f"If you know it is this bank's own recording, `ponder bank stamp {bank}` "
            "vouches for it"
        )
    if theirs != manifest.bank_id:
        raise BankError(
            f"{path} belongs to another bank ({theirs}), not to {bank} (bank {manifest.bank_id}): "
            f"it was copied in from a bank whose question ids collide with this one's: {redo}"
        )
    if meta.get(FINGERPRINT_KEY, b"").decode() != manifest.fingerprint:
        raise BankError(
            f"{path} was recorded with other settings than {bank / 'manifest.json'} lists "
            f"(fingerprint {meta.get(FINGERPRINT_KEY, b'').decode()[:12] or 'none'}, the manifest's "
            f"{manifest.fingerprint[:12]}): the bank is inconsistent; {redo}"
        )
    if meta.get(QUESTION_KEY, b"").decode() != question_sha256(question):
        raise BankError(
            f"{path} was recorded for another question {question.qid!r} than "
            f"{bank / 'questions.parquet'} holds (its text or gold answer differ, e.g. drawn with "
            "another --question-seed): restore questions.parquet from version control, or "
            f"{redo}"
        )
