"""The generating model's hidden states, an optional part of a trace bank (``PATH/hidden/``).

``ponder bank annotate PATH`` (:mod:`env.bank.annotate`) writes them; :class:`HiddenStates`
reads them. A bank without them loads everywhere as before::

    hidden/manifest.json        what was captured and how (schema below), written first
    hidden/00000.safetensors    one file per annotated question, numbered as chunks/00000.parquet
    hidden/00001.safetensors    ...

What is stored. For each layer ``L`` in ``layers``, the residual stream after ``L`` decoder
layers, un-normed (the output of ``model.model.layers[L-1]``; for the last layer this is *before*
the final norm, unlike transformers' ``hidden_states[-1]``), at

- the prompt's last token: ``prompt``, float16 ``[n_layers, dims]``;
- every chunk boundary of every chain, i.e. the last token of each *main* chunk (rows with
  ``ext == False``): ``boundary``, float16 ``[n, n_layers, dims]``, in (chain, chunk) order,
  which is the chunk file's row order, with ``chain_chunk``, int32 ``[n, 2]``, naming each row.

Budget-forced extension chunks (``ext == True``) are not annotated (they are a quarter of a
bank's tokens). A reader wanting the state at an extension chunk's end falls back to the chain's
last main boundary (:meth:`HiddenStates.at` does), the state before ``Wait,`` was appended.

The reduction. Each state vector is divided by its RMS, then projected to ``dims`` dimensions by
a fixed Gaussian matrix per layer (entries N(0, 1/hidden_size), so a projected coordinate of a
unit-RMS vector has unit variance), drawn from ``numpy.random.Generator(PCG64([seed, L]))``: the
same on every machine, and recorded with its sha256 in the manifest. Nothing is fitted to the
data, so no statistic of a test question leaks into the stored features, and annotation can
resume and grow question by question (a PCA would need every training question first).
The raw states (:func:`env.models.states.capture_states`) and the reduction
(:func:`reduce_states`) are separate functions, so a later reader can recompute the raw states
and fit its own reduction.

``manifest.json`` (schema version 1): ``schema_version``, ``engine`` (``transformers``),
``model`` (``name``, ``path``, ``sha256``: :func:`~env.bank.identity.model_sha256` of the Hugging
Face folder, ``num_layers``, ``hidden_size``), ``bank_id``, ``bank_model_sha256`` (the bank's own
model, which may be a GGUF file), ``dtype`` of the forward pass, ``layers``, ``dims``,
``projection`` (``kind``, ``seed``, ``sha256`` of the float64 matrices), ``fingerprint``
(sha256 over the settings that decide the values), ``ponder_version``, ``transformers_version``,
``torch_version``, ``created``. Every file carries in its safetensors metadata ``ponder.qid``,
``ponder.question_sha256``, ``ponder.bank_id``, ``ponder.fingerprint`` and
``ponder.tokens_sha256`` (the chains' main token ids it was computed from), so a file from
another bank, another annotation or another recording of the question is refused by name.
Files are written atomically (temporary file, fsync, rename) with a canonical header, so the
same values give the same bytes. Never pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from env.bank.identity import model_sha256
from env.models.states import model_name, model_shape
from features.errors import BankError

if TYPE_CHECKING:
    from env.bank.store import TraceBank
    from env.types import Question

__all__ = [
    "HIDDEN_DIR",
    "HIDDEN_SCHEMA_VERSION",
    "HiddenFile",
    "HiddenManifest",
    "HiddenStates",
    "check_hidden_file",
    "describe",
    "encode_hidden_file",
    "hidden_file",
    "hidden_file_identity",
    "hidden_manifest",
    "main_boundaries",
    "projection_matrix",
    "projection_sha256",
    "read_hidden_file",
    "reduce_states",
    "require_hidden",
    "tokens_sha256",
]

HIDDEN_DIR = "hidden"
HIDDEN_SCHEMA_VERSION = 1

_META_PREFIX = "ponder."


def hidden_file(bank_path: Path, index: int) -> Path:
    """The hidden-state file of the bank's question number ``index``."""
    return bank_path / HIDDEN_DIR / f"{index:05d}.safetensors"


# -- the reduction ---------------------------------------------------------------------------


def projection_matrix(seed: int, layer: int, hidden_size: int, dims: int) -> np.ndarray:
    """The fixed Gaussian projection of ``layer``: float64 ``[hidden_size, dims]``, entries
    N(0, 1/hidden_size), from ``PCG64([seed, layer])`` (independent of which other layers are
    captured, the same on every machine)."""
    rng = np.random.Generator(np.random.PCG64([int(seed), int(layer)]))
    return rng.standard_normal((int(hidden_size), int(dims))) / np.sqrt(hidden_size)


def projection_sha256(seed: int, layers: Sequence[int], hidden_size: int, dims: int) -> str:
    """sha256 over the projection matrices (catches a numpy whose generator drew otherwise)."""
    h = hashlib.sha256()
    for layer in layers:
        h.update(projection_matrix(seed, layer, hidden_size, dims).tobytes())
    return h.hexdigest()


def reduce_states(raw: np.ndarray, layers: Sequence[int], *, seed: int, dims: int) -> np.ndarray:
    """Raw states ``[..., n_layers, hidden_size]`` to stored ones ``[..., n_layers, dims]``,
    float16: each vector divided by its RMS, then projected by its layer's matrix."""
    x = np.asarray(raw, dtype=np.float64)
    if x.ndim < 2 or x.shape[-2] != len(layers):
        raise ValueError(f"raw states of shape {x.shape} do not hold {len(layers)} layers")
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True))
    x = x / np.maximum(rms, np.finfo(np.float64).tiny)
    out = np.empty((*x.shape[:-1], dims), dtype=np.float64)
    for j, layer in enumerate(layers):
        out[..., j, :] = x[..., j, :] @ projection_matrix(seed, layer, x.shape[-1], dims)
    return out.astype(np.float16)


# -- the manifest ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HiddenManifest:
    """What a bank's hidden states hold and how they were computed (``hidden/manifest.json``)."""

    engine: str
    model: dict[str, Any]
    """``name``, ``path``, ``sha256`` (of the Hugging Face folder), ``num_layers``, ``hidden_size``"""
    bank_id: str
    bank_model_sha256: str
    dtype: str
    layers: list[int]
    dims: int
    projection: dict[str, Any]
    """``kind`` (``gaussian``), ``seed``, ``sha256`` of the matrices"""
    schema_version: int = HIDDEN_SCHEMA_VERSION
    ponder_version: str = ""
    transformers_version: str = ""
    torch_version: str = ""
    created: str = ""
    fingerprint: str = field(default="")
    """:meth:`settings_fingerprint` (filled in by :meth:`fingerprinted`)"""

    @property
    def hidden_size(self) -> int:
        return int(self.model["hidden_size"])

    @property
    def seed(self) -> int:
        return int(self.projection["seed"])

    def settings(self) -> dict[str, Any]:
        """The settings that decide the stored values (compared when a run resumes)."""
        return {
            "engine": self.engine,
            "model sha256": self.model.get("sha256", ""),
            "dtype": self.dtype,
            "layers": list(self.layers),
            "dims": int(self.dims),
            "projection seed": self.seed,
            "projection sha256": self.projection.get("sha256", ""),
            "hidden size": self.hidden_size,
            "bank id": self.bank_id,
        }

    def settings_fingerprint(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def fingerprinted(self) -> HiddenManifest:
        return dataclasses.replace(self, fingerprint=self.settings_fingerprint())

    def differences(self, other: HiddenManifest) -> list[str]:
        """Settings that differ between two annotations, as ``name: mine vs theirs``."""
        a, b = self.settings(), other.settings()
        diffs = [k for k in a if a[k] != b[k]]
        if len(diffs) > 1 and "projection sha256" in diffs:
            diffs.remove("projection sha256")  # follows from the other differences
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in diffs]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> HiddenManifest:
        """Read and validate ``hidden/manifest.json``."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise BankError(
                f"{path} is not valid JSON ({e}): delete the folder {path.parent} and re-run "
                f"`ponder bank annotate {path.parent.parent}`"
            ) from e
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != HIDDEN_SCHEMA_VERSION:
            raise BankError(
                f"{path} has schema version {version!r}, but this ponder reads hidden states of "
                f"version {HIDDEN_SCHEMA_VERSION}: upgrade ponder, or delete {path.parent} and "
                f"re-run `ponder bank annotate {path.parent.parent}`"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = required - set(raw)
        if missing:
            raise BankError(f"{path} lacks fields {sorted(missing)}: it is damaged; delete it")
        m = cls(**{k: v for k, v in raw.items() if k in names})
        if m.fingerprint != m.settings_fingerprint():
            raise BankError(
                f"{path} was edited after its files were written (its settings no longer match "
                f"its fingerprint): restore it, or delete {path.parent} and annotate again"
            )
        return m


# -- one question's file ---------------------------------------------------------------------


def main_boundaries(rows: dict[str, list[Any]]) -> tuple[list[int], list[int]]:
    """A chain's main token ids and, per main chunk, the tokens of the chain up to and
    including its last one (its boundary): ``(token_ids, ends)``.

    Raises:
        ValueError: the chunks' ``start`` / ``n_tokens`` / ``token_ids`` disagree.
    """
    ids: list[int] = []
    ends: list[int] = []
    for ext, start, n, toks in zip(
        rows["ext"], rows["start"], rows["n_tokens"], rows["token_ids"], strict=True
    ):
        if ext:
            continue
        if int(start) != len(ids) or int(n) != len(toks):
            raise ValueError(
                f"chunk {len(ends)} starts at {start} with {n} tokens and {len(toks)} token ids, "
                f"after {len(ids)} tokens"
            )
        ids.extend(int(t) for t in toks)
        ends.append(len(ids))
    return ids, ends


def tokens_sha256(chains: Sequence[Sequence[int]]) -> str:
    """sha256 over each chain's main token ids (binds a hidden file to the chains it read)."""
    h = hashlib.sha256()
    for c in chains:
        h.update(len(c).to_bytes(8, "little"))
        h.update(np.asarray(c, dtype="<i4").tobytes())
    return h.hexdigest()


def hidden_file_identity(
    qid: str, question: Question, manifest: HiddenManifest, chains: Sequence[Sequence[int]]
) -> dict[str, str]:
    """The metadata that binds a hidden file to its question, bank, annotation and chains (what
    :func:`encode_hidden_file` stores and a reader checks)."""
    from env.bank.identity import question_sha256

    return {
        "qid": qid,
        "question_sha256": question_sha256(question),
        "bank_id": manifest.bank_id,
        "fingerprint": manifest.fingerprint,
        "tokens_sha256": tokens_sha256(chains),
    }


def encode_hidden_file(
    prompt: np.ndarray, boundary: np.ndarray, chain_chunk: np.ndarray, metadata: dict[str, str]
) -> bytes:
    """A question's hidden states as safetensors bytes with a canonical header (sorted keys;
    safetensors itself writes its metadata in hash order), so equal values give equal bytes."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {
        "prompt": np.ascontiguousarray(prompt, dtype=np.float16),
        "boundary": np.ascontiguousarray(boundary, dtype=np.float16),
        "chain_chunk": np.ascontiguousarray(chain_chunk, dtype=np.int32),
    }
    blob = save(tensors, metadata={_META_PREFIX + k: v for k, v in metadata.items()})
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


@dataclass(frozen=True)
class HiddenFile:
    """One question's stored states (see the module docstring)."""

    prompt: np.ndarray
    boundary: np.ndarray
    chain_chunk: np.ndarray
    metadata: dict[str, str]


def read_hidden_file(path: Path, layers: int, dims: int) -> HiddenFile:
    """Read and shape-check one hidden file; a damaged one is a :class:`BankError` naming it."""
    from safetensors.numpy import load

    fix = (
        f"delete it and re-run `ponder bank annotate {path.parent.parent}` to compute that "
        "question again"
    )
    try:
        blob = path.read_bytes()
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + n])
        tensors = load(blob)
    except Exception as e:  # truncated or corrupt: json, safetensors and OS errors alike
        raise BankError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}): {fix}") from e
    meta = header.get("__metadata__") or {}
    metadata = {k[len(_META_PREFIX) :]: v for k, v in meta.items() if k.startswith(_META_PREFIX)}
    want = {"prompt": np.float16, "boundary": np.float16, "chain_chunk": np.int32}
    for name, dtype in want.items():
        if name not in tensors or tensors[name].dtype != dtype:
            raise BankError(f"{path} lacks a {np.dtype(dtype).name} tensor {name!r}: {fix}")
    p, b, cc = tensors["prompt"], tensors["boundary"], tensors["chain_chunk"]
    if (
        p.shape != (layers, dims)
        or b.ndim != 3
        or b.shape[1:] != (layers, dims)
        or cc.shape != (b.shape[0], 2)
    ):
        raise BankError(
            f"{path} holds tensors of shapes prompt {p.shape}, boundary {b.shape}, chain_chunk "
            f"{cc.shape}; expected [{layers}, {dims}], [n, {layers}, {dims}], [n, 2]: {fix}"
        )
    return HiddenFile(prompt=p, boundary=b, chain_chunk=cc, metadata=metadata)


def check_hidden_file(
    path: Path, f: HiddenFile, manifest: HiddenManifest, question: Question
) -> None:
    """Refuse a hidden file that is not this annotation's file of ``question``."""
    from env.bank.identity import question_sha256

    fix = f"delete it and re-run `ponder bank annotate {path.parent.parent}`"
    m = f.metadata
    if m.get("qid") != question.qid:
        raise BankError(
            f"{path} holds the hidden states of question {m.get('qid')!r}, not of "
            f"{question.qid!r}: it was copied or renamed; {fix}"
        )
    if m.get("bank_id") != manifest.bank_id or m.get("fingerprint") != manifest.fingerprint:
        raise BankError(
            f"{path} was written by another annotation (bank {m.get('bank_id')!r}, settings "
            f"{(m.get('fingerprint') or '')[:12]!r}) than {path.parent / 'manifest.json'} "
            f"describes (bank {manifest.bank_id!r}, settings {manifest.fingerprint[:12]!r}); {fix}"
        )
    if m.get("question_sha256") != question_sha256(question):
        raise BankError(
            f"{path} was computed for another text or gold answer of {question.qid!r} than "
            f"the bank's questions.parquet holds; {fix}"
        )


# -- the reader ------------------------------------------------------------------------------


class HiddenStates:
    """A bank's hidden states, read lazily per question (see the module docstring).

    Open with :meth:`open`, which gives ``None`` for a bank without them.
    """

    def __init__(self, bank: TraceBank, manifest: HiddenManifest) -> None:
        self.bank = bank
        self.path = bank.path / HIDDEN_DIR
        self.manifest = manifest
        self._cache: dict[str, HiddenFile] = {}

    @classmethod
    def open(cls, bank_path: str | Path, bank: TraceBank | None = None) -> HiddenStates | None:
        """The hidden states of the bank at ``bank_path``, or ``None`` if it has none.

        Raises:
            BankError: the annotation is damaged, of an unknown schema, or another bank's.
        """
        from env.bank.store import TraceBank

        root = Path(bank_path)
        mpath = root / HIDDEN_DIR / "manifest.json"
        if not mpath.is_file():
            return None
        manifest = HiddenManifest.load(mpath)
        bank = bank if bank is not None else TraceBank(root)
        if manifest.bank_id != bank.manifest.bank_id:
            raise BankError(
                f"{mpath} belongs to bank {manifest.bank_id!r}, not to {root} (bank "
                f"{bank.manifest.bank_id!r}): it was copied in from another bank; delete "
                f"{root / HIDDEN_DIR} and run `ponder bank annotate {root}`"
            )
        return cls(bank, manifest)

    @property
    def layers(self) -> tuple[int, ...]:
        """The captured layers (residual stream after that many decoder layers)."""
        return tuple(self.manifest.layers)

    @property
    def dims(self) -> int:
        """Dimensions of each stored state vector."""
        return int(self.manifest.dims)

    @property
    def annotated(self) -> list[str]:
        """Recorded questions that have their hidden states, in recording order."""
        try:
            names = set(os.listdir(self.path))
        except FileNotFoundError:
            names = set()
        return [
            qid
            for i, qid in enumerate(self.bank.manifest.questions)
            if qid in self.bank and f"{i:05d}.safetensors" in names
        ]

    @property
    def complete(self) -> bool:
        """Whether every recorded question of the bank has its hidden states."""
        return len(self.annotated) == len(self.bank)

    def __contains__(self, qid: object) -> bool:
        if not isinstance(qid, str) or qid not in self.bank:
            return False
        return hidden_file(self.bank.path, self.bank.manifest.questions.index(qid)).is_file()

    def _load(self, qid: str) -> HiddenFile:
        if qid in self._cache:
            return self._cache[qid]
        if qid not in self.bank:
            raise BankError(f"question {qid!r} is not recorded in the bank at {self.bank.path}")
        path = hidden_file(self.bank.path, self.bank.manifest.questions.index(qid))
        if not path.is_file():
            raise BankError(
                f"question {qid!r} has no hidden states yet (no {path}): run "
                f"`ponder bank annotate {self.bank.path}`"
            )
        f = read_hidden_file(path, len(self.layers), self.dims)
        check_hidden_file(path, f, self.manifest, self.bank.question(qid))
        self._cache[qid] = f
        return f

    def prompt(self, qid: str) -> np.ndarray:
        """The state at the prompt's last token: float16 ``[n_layers, dims]``."""
        return self._load(qid).prompt

    def boundaries(self, qid: str) -> tuple[np.ndarray, np.ndarray]:
        """Every main chunk's end state: ``(chain_chunk [n, 2] int32, states [n, n_layers,
        dims] float16)``, in (chain, chunk) order."""
        f = self._load(qid)
        return f.chain_chunk, f.boundary

    def at(self, qid: str, chain: int, chunk: int) -> np.ndarray:
        """The state at the end of ``chunk`` of ``chain``: float16 ``[n_layers, dims]``.

        An extension chunk (not annotated) gets the chain's last main boundary; a chain with
        no main chunk, the prompt's state.
        """
        f = self._load(qid)
        rows = np.flatnonzero(f.chain_chunk[:, 0] == chain)
        if rows.size == 0:
            return f.prompt
        chunks = f.chain_chunk[rows, 1]
        hit = rows[chunks == chunk]
        if hit.size:
            return f.boundary[hit[0]]
        if chunk < int(chunks.max()):
            raise BankError(f"chunk {chunk} of chain {chain} of {qid!r} has no hidden state")
        return f.boundary[rows[-1]]


def require_hidden(bank: TraceBank) -> HiddenStates:
    """The bank's hidden states, every recorded question annotated.

    Raises:
        BankError: the bank has none, or some questions lack them (named, with what to run).
    """
    hs = HiddenStates.open(bank.path, bank)
    if hs is None:
        raise BankError(
            f"the bank at {bank.path} has no hidden states (no {bank.path / HIDDEN_DIR}): run "
            f"`ponder bank annotate {bank.path}` (hours for a large bank: it resumes)"
        )
    done = set(hs.annotated)
    missing = [q for q in bank.manifest.questions if q in bank and q not in done]
    if missing:
        shown = ", ".join(repr(q) for q in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise BankError(
            f"the hidden states of the bank at {bank.path} cover {len(done)} of {len(bank)} "
            f"recorded questions ({len(missing)} lack them: {shown}): finish them with "
            f"`ponder bank annotate {bank.path}` (it resumes where it stopped)"
        )
    return hs


def describe(bank: TraceBank) -> str:
    """One line for ``ponder bank info``: whether the bank has hidden states and how far."""
    hs = HiddenStates.open(bank.path, bank)
    if hs is None:
        return f"hidden states: none (`ponder bank annotate {bank.path}` adds them)"
    m = hs.manifest
    return (
        f"hidden states: {len(hs.annotated)}/{len(bank)} questions annotated (layers "
        f"{', '.join(map(str, hs.layers))} of {m.model.get('name')}, {hs.dims} dims, "
        f"{m.engine} {m.dtype})"
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def hidden_manifest(
    folder: Path,
    layers: Sequence[int],
    *,
    dims: int,
    seed: int,
    dtype: str,
    sha: str | None = None,
    bank_id: str = "",
    bank_model_sha256: str = "",
) -> HiddenManifest:
    """The (fingerprinted) :class:`~env.bank.hidden.HiddenManifest` of a capture with these
    settings by the transformers model in ``folder`` (``sha``: its
    :func:`~env.bank.identity.model_sha256`, computed if not given). ``layers`` are taken as
    checked (:func:`~env.models.states.check_layers`)."""
    num_layers, hidden = model_shape(folder)
    return HiddenManifest(
        engine="transformers",
        model={
            "name": model_name(folder),
            "path": str(folder),
            "sha256": sha if sha is not None else model_sha256(folder),
            "num_layers": num_layers,
            "hidden_size": hidden,
        },
        bank_id=bank_id,
        bank_model_sha256=bank_model_sha256,
        dtype=dtype,
        layers=list(layers),
        dims=int(dims),
        projection={
            "kind": "gaussian",
            "seed": int(seed),
            "sha256": projection_sha256(seed, layers, hidden, dims),
        },
        ponder_version=_version("ponder"),
        transformers_version=_version("transformers"),
        torch_version=_version("torch"),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    ).fingerprinted()
