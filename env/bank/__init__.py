"""Trace banks: the on-disk store, the recorder, and the ``ponder bank`` commands."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "BankManifest",
    "ChainTrace",
    "QuestionTrace",
    "TraceBank",
    "BankWriter",
    "CHUNK_SCHEMA",
    "CompactReport",
    "compact",
    "StampReport",
    "stamp",
    "answer_correct",
    "correct_mismatches",
    "question_sha256",
    "BankLock",
    "LockOwner",
    "encode_chunk_table",
    "model_sha256",
    "atomic_write_bytes",
    "RecordArgs",
    "record",
    "record_question",
    "question_seed",
    "BankCompactArgs",
    "BankInfoArgs",
    "BankStampArgs",
    "compact_main",
    "info",
    "main",
    "stamp_main",
]

# Names load on first use, so importing the package stays cheap.
_LAZY = {
    "SCHEMA_VERSION": "env.bank.store",
    "BankManifest": "env.bank.store",
    "ChainTrace": "env.bank.store",
    "QuestionTrace": "env.bank.store",
    "TraceBank": "env.bank.store",
    "BankWriter": "env.bank.store",
    "CHUNK_SCHEMA": "env.bank.store",
    "CompactReport": "env.bank.store",
    "compact": "env.bank.store",
    "StampReport": "env.bank.store",
    "stamp": "env.bank.store",
    "answer_correct": "env.bank.store",
    "correct_mismatches": "env.bank.store",
    "question_sha256": "env.bank.store",
    "BankLock": "env.bank.lock",
    "LockOwner": "env.bank.lock",
    "encode_chunk_table": "env.bank.store",
    "model_sha256": "env.bank.store",
    "atomic_write_bytes": "env.bank.store",
    "RecordArgs": "env.bank.record",
    "record": "env.bank.record",
    "record_question": "env.bank.record",
    "question_seed": "env.bank.record",
    "BankCompactArgs": "env.bank.cli",
    "BankInfoArgs": "env.bank.cli",
    "BankStampArgs": "env.bank.cli",
    "stamp_main": "env.bank.cli",
    "compact_main": "env.bank.cli",
    "info": "env.bank.cli",
    "main": "env.bank.cli",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'env.bank' has no attribute {name!r}")
