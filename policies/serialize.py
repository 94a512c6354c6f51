"""ponder's learned-policy format: a folder with ``policy.json`` and ``weights.safetensors``.

``policy.json`` holds everything but the arrays: the format tag, the policy ``kind`` and its format
``version``, the constructor parameters, the feature schema (:data:`env.episode.observation.FEATURE_NAMES`)
the weights were trained on, the training arguments, the bank's fingerprint, the λ grid and the
metrics. The weights are plain named arrays in safetensors (numpy, no code), and their sha256 is
in the JSON, so a truncated or swapped weights file is refused.

Nothing here unpickles: loading reads JSON and safetensors only, and refuses (with
:class:`~features.errors.PolicyError`) a folder whose schema differs from the current features,
an unknown kind or version, a pickle file, or anything else that is not ponder's format.

Inference runs in numpy (:class:`NumpyMLP`): a saved policy needs neither scikit-learn nor torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from env.episode.config import EnvConfig
from env.episode.observation import FEATURE_NAMES
from env.models.prepare import sha256_file
from features.errors import PolicyError

__all__ = [
    "FORMAT",
    "PICKLE_SUFFIXES",
    "POLICY_JSON",
    "WEIGHTS_FILE",
    "NumpyMLP",
    "PolicyFiles",
    "bank_fingerprint",
    "env_config_dict",
    "lam_feature",
    "read_policy_files",
    "write_policy_files",
]

#: The format tag every ``policy.json`` carries.
FORMAT = "ponder-policy"
POLICY_JSON = "policy.json"
WEIGHTS_FILE = "weights.safetensors"
#: Formats that can run code when loaded: always refused.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".ckpt", ".bin", ".zip")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.(safetensors|npz)$")


def lam_feature(lam: np.ndarray | float, lam_range: tuple[float, float]) -> np.ndarray:
    """λ as a network input: ``log10(λ)`` mapped from the trained range to [-1, 1] (clipped).

    λ outside the range is clipped to it: the networks never saw it, and extrapolating a price
    they were not trained on is worse than using the nearest one they were.
    """
    lo, hi = (math.log10(v) for v in lam_range)
    x = np.log10(np.maximum(np.asarray(lam, dtype=np.float64), 1e-30))
    x = np.clip(x, lo, hi)
    return 2.0 * (x - lo) / max(hi - lo, 1e-12) - 1.0


@dataclass
class NumpyMLP:
    """A multilayer perceptron evaluated in numpy: standardise, hidden layers, linear output.

    Args:
        weights: ``[in, out]`` matrices, first to last layer.
        biases: ``[out]`` vectors.
        activation: of the hidden layers, ``relu`` (scikit-learn's default) or ``tanh``.
        mean, scale: input standardisation ``(x - mean) / scale`` (none if ``None``).
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    activation: str = "relu"
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.activation not in ("relu", "tanh"):
            raise PolicyError(f"unknown activation {self.activation!r}: use relu or tanh")
        # C order, as saved and loaded: a transposed (Fortran-order) matrix takes another BLAS
        # path, so a policy's outputs would change in the last bit across save and load.
        self.weights = [np.ascontiguousarray(w) for w in self.weights]
        self.biases = [np.ascontiguousarray(b) for b in self.biases]
        self.mean = None if self.mean is None else np.ascontiguousarray(self.mean)
        self.scale = None if self.scale is None else np.ascontiguousarray(self.scale)
        if not self.weights or len(self.weights) != len(self.biases):
            raise PolicyError("an MLP needs as many bias vectors as weight matrices (at least one)")
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if w.ndim != 2 or b.shape != (w.shape[1],):
                raise PolicyError(f"layer {i}: weights {w.shape} and bias {b.shape} do not fit")
            if i and w.shape[0] != self.weights[i - 1].shape[1]:
                raise PolicyError(
                    f"layer {i} takes {w.shape[0]} inputs, the layer before gives "
                    f"{self.weights[i - 1].shape[1]}"
                )
        for name in ("mean", "scale"):
            v = getattr(self, name)
            if v is not None and v.shape != (self.n_in,):
                raise PolicyError(f"{name} has shape {v.shape}, the MLP takes {self.n_in} inputs")
        for a in [
            *self.weights,
            *self.biases,
            *(x for x in (self.mean, self.scale) if x is not None),
        ]:
            if not np.isfinite(a).all():
                raise PolicyError("MLP weights contain NaN or infinity")

    @property
    def n_in(self) -> int:
        return int(self.weights[0].shape[0])

    @property
    def n_out(self) -> int:
        return int(self.weights[-1].shape[1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=self.weights[0].dtype)
        if self.mean is not None:
            h = h - self.mean
        if self.scale is not None:
            h = h / self.scale
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < last:
                h = np.maximum(h, 0.0) if self.activation == "relu" else np.tanh(h)
        return h

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The named arrays to save (``prefix.w0``, ``prefix.b0``, ..., ``prefix.mean``)."""
        out: dict[str, np.ndarray] = {}  # (every array is C-ordered already: __post_init__)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"{prefix}.w{i}"] = w
            out[f"{prefix}.b{i}"] = b
        if self.mean is not None:
            out[f"{prefix}.mean"] = self.mean
        if self.scale is not None:
            out[f"{prefix}.scale"] = self.scale
        return out

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], prefix: str, activation: str
    ) -> NumpyMLP:
        """Rebuild the MLP saved under ``prefix`` by :meth:`arrays`."""
        n = 0
        while f"{prefix}.w{n}" in arrays:
            n += 1
        if n == 0:
            raise PolicyError(f"the weights hold no network {prefix!r}")
        try:
            return cls(
                [arrays[f"{prefix}.w{i}"] for i in range(n)],
                [arrays[f"{prefix}.b{i}"] for i in range(n)],
                activation,
                arrays.get(f"{prefix}.mean"),
                arrays.get(f"{prefix}.scale"),
            )
        except KeyError as e:
            raise PolicyError(f"the weights of network {prefix!r} lack {e}") from e

    @classmethod
    def from_sklearn(
        cls, model: Any, mean: np.ndarray | None, scale: np.ndarray | None
    ) -> NumpyMLP:
        """The arrays of a fitted scikit-learn ``MLPRegressor`` / ``MLPClassifier``."""
        return cls(
            [np.asarray(w, np.float64).copy() for w in model.coefs_],
            [np.asarray(b, np.float64).copy() for b in model.intercepts_],
            str(model.activation),
            None if mean is None else np.asarray(mean, np.float64).copy(),
            None if scale is None else np.asarray(scale, np.float64).copy(),
        )


def env_config_dict(config: EnvConfig) -> dict[str, Any]:
    """An :class:`EnvConfig` as JSON-ready values (prices nested)."""
    return dataclasses.asdict(config)


def bank_fingerprint(bank: Any, questions: Sequence[str] = ()) -> dict[str, Any]:
    """What identifies the data a policy was trained on: the bank's path, its model's sha256 and
    name, its recording settings and the questions used."""
    m = bank.manifest
    return {
        "path": str(bank.path),
        "model_sha256": m.model.get("sha256", ""),
        "model_name": m.model.get("name", ""),
        "dataset": m.dataset,
        "chunk_tokens": m.chunk_tokens,
        "chains": m.chains,
        "judge": bool(m.judge),
        "n_questions": len(questions),
        "questions_sha256": hashlib.sha256("\n".join(questions).encode()).hexdigest(),
    }


def _jsonable(x: Any) -> Any:
    """Plain JSON values (numpy scalars and arrays, tuples, paths, dataclasses)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _ponder_version() -> str:
    try:
        from importlib.metadata import version

        return version("ponder")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


def write_policy_files(
    directory: str | Path,
    *,
    kind: str,
    version: int,
    params: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
) -> Path:
    """Write a policy folder (``policy.json`` + ``weights.safetensors``); returns the folder.

    Args:
        kind, version: what :func:`policies.learned.load_policy` dispatches on.
        params: the constructor parameters (JSON values).
        arrays: the weights (float arrays).
        meta: ``training``, ``bank``, ``lams``, ``env``, ``metrics`` and anything else to record.
    """
    from safetensors.numpy import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    weights = d / WEIGHTS_FILE
    tmp = d / (WEIGHTS_FILE + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    tmp.replace(weights)
    header = {
        "format": FORMAT,
        "kind": kind,
        "version": int(version),
        "features": list(FEATURE_NAMES),
        "params": _jsonable(params),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights)},
        **{k: _jsonable(v) for k, v in meta.items()},
        "ponder_version": _ponder_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    text = json.dumps(header, indent=2, allow_nan=False) + "\n"
    tmp_json = d / (POLICY_JSON + ".tmp")
    tmp_json.write_text(text, encoding="utf-8")
    tmp_json.replace(d / POLICY_JSON)
    return d


@dataclass(frozen=True)
class PolicyFiles:
    """What :func:`read_policy_files` found: the header (``policy.json``) and the weights."""

    path: Path
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        return str(self.header["kind"])

    @property
    def version(self) -> int:
        return int(self.header["version"])

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.header.get("params") or {})


def _schema_diff(saved: Sequence[str]) -> str:
    cur = list(FEATURE_NAMES)
    added = [n for n in cur if n not in saved]
    removed = [n for n in saved if n not in cur]
    parts = []
    if added:
        parts.append(f"the environment now has {added} that the policy never saw")
    if removed:
        parts.append(f"the policy needs {removed} that the environment no longer has")
    if not parts:
        parts.append("the same features in another order")
    return "; ".join(parts)


def read_policy_files(path: str | Path, *, kinds: Mapping[str, Sequence[int]]) -> PolicyFiles:
    """Read and check a policy folder (or its ``policy.json``).

    Args:
        path: the folder, its ``policy.json`` or its weights file.
        kinds: the known kinds and the format versions each can read.

    Raises:
        PolicyError: a pickle file, a missing or garbled ``policy.json``, another format, an
            unknown kind or version, a feature schema other than the current one, or weights
            that are missing, altered or unreadable.
    """
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise PolicyError(
            f"refusing to load {p}: ponder never loads pickle-based files (they can run code); "
            "save learned policies with policy.save(folder) (JSON + safetensors)"
        )
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise PolicyError(f"no policy folder at {p}: train one with `python -m policies.learned`")
    header_path = p / POLICY_JSON
    if not header_path.is_file():
        pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        why = (
            f" (it holds {pickles}: pickle-based files are never loaded, they can run code)"
            if pickles
            else ""
        )
        raise PolicyError(
            f"{p} is not a ponder policy folder: it has no {POLICY_JSON}{why}; save learned "
            "policies with policy.save(folder)"
        )
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        # ValueError covers bad JSON, bad UTF-8 and numbers too long to convert; RecursionError
        # JSON nested deeper than the parser's stack.
        raise PolicyError(
            f"{header_path} is not valid JSON ({type(e).__name__}): the file is damaged; save "
            "the policy again"
        ) from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise PolicyError(
            f"{header_path} is not a ponder policy file (format {got!r}, expected {FORMAT!r}); "
            "save learned policies with policy.save(folder)"
        )
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        raise PolicyError(
            f"{header_path}: unknown policy kind {kind!r}; this ponder loads {sorted(kinds)}"
        )
    version = header.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version not in kinds[kind]:
        raise PolicyError(
            f"{header_path}: {kind} policy format version {version!r} is not supported "
            f"(this ponder reads versions {list(kinds[kind])}); upgrade ponder or retrain"
        )
    saved = header.get("features")
    if not isinstance(saved, list) or [str(s) for s in saved] != list(FEATURE_NAMES):
        if not isinstance(saved, list):
            raise PolicyError(f"{header_path} has no feature schema: the file is damaged")
        raise PolicyError(
            f"{header_path} was trained on another observation ({len(saved)} features, the "
            f"environment has {len(FEATURE_NAMES)}): {_schema_diff(saved)}; retrain the policy "
            "on the current features"
        )
    if not isinstance(header.get("params", {}), dict):
        raise PolicyError(f"{header_path}: params must be a JSON object")
    w = header.get("weights")
    if not isinstance(w, dict) or not isinstance(w.get("file"), str):
        raise PolicyError(f"{header_path} names no weights file: the file is damaged")
    name = w["file"]
    if not _SAFE_NAME.match(name):
        raise PolicyError(
            f"{header_path}: weights file {name!r} is not a plain .safetensors or .npz name"
        )
    wpath = p / name
    if not wpath.is_file():
        raise PolicyError(f"{wpath} is missing: copy the whole policy folder")
    if w.get("sha256") != sha256_file(wpath):
        raise PolicyError(
            f"{wpath} does not match the sha256 in {POLICY_JSON}: the weights were altered or "
            "belong to another policy"
        )
    try:
        if wpath.suffix == ".npz":
            with np.load(wpath, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(wpath))
    except Exception as e:  # a damaged file: the libraries raise their own types
        raise PolicyError(f"{wpath} cannot be read ({type(e).__name__}: {e})") from e
    for k, a in arrays.items():
        if a.dtype.kind not in "fiu":
            raise PolicyError(f"{wpath}: array {k!r} has dtype {a.dtype}, expected numbers")
    return PolicyFiles(p, header, dict(arrays))
