"""A fitted linear probe on hidden states, its schema, and its file format.

A probe is ``standardise -> linear -> link``: ``logistic`` for chain correctness (P(the chain's
final answer is right)), ``identity`` clipped to [0, 1] for question difficulty (the predicted
pass rate). Both point the same way: higher means more likely right.

The file format is the house one (:mod:`policies.serialize` for policies): a folder with
``probe.json`` (everything but the arrays) and ``weights.safetensors`` (``mean``, ``scale``,
``coef``, ``intercept``; numpy, no code), whose sha256 ``probe.json`` records, so a truncated or
swapped weights file is refused by name. Never pickled.

The schema (:class:`ProbeSchema`) says what the inputs are: the annotation the probe was fitted
on (its model's sha256 and size, the captured layers, the dimensions, the projection's kind, seed
and sha256, the annotation schema version; :mod:`env.bank.hidden`), the layers the probe reads,
whether it also reads the state a second time at boundaries where the chain ended
(``ended_states``), its extra inputs, and the feature list (``L14/0`` .. ``L14/127``, then
``ended*L14/0`` .. with ``ended_states``, then the extras). A probe
refuses hidden states whose model, size or projection differ, or that lack a layer it reads:
the projected coordinates would mean something else.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from env.probes.data import BOUNDARY_EXTRAS
from features.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from env.bank.hidden import HiddenManifest

__all__ = [
    "FORMAT",
    "KINDS",
    "PROBE_JSON",
    "VERSION",
    "WEIGHTS_FILE",
    "LinearProbe",
    "ProbeSchema",
]

FORMAT = "ponder-probe"
#: Version 2 added ``ended_states`` to the schema; version 1 files (without it) still load.
VERSION = 2
_READS = (1, 2)
PROBE_JSON = "probe.json"
WEIGHTS_FILE = "weights.safetensors"
#: kind -> link: what each probe predicts, and how its linear score becomes that.
KINDS: dict[str, str] = {"difficulty": "identity", "chain-correctness": "logistic"}

#: The annotation settings a probe records (from ``hidden/manifest.json``).
_ANNOTATION_KEYS = ("schema_version", "engine", "dtype", "layers", "dims", "bank_id", "fingerprint")


def _refit_hint(bank: str) -> str:
    where = bank or "BANK"
    return f"fit probes for these hidden states with `ponder probes {where}`"


@dataclass(frozen=True)
class ProbeSchema:
    """What a probe reads (see the module docstring).

    Attributes:
        annotation: the annotation it was fitted on: ``model`` (``name``, ``sha256``,
            ``num_layers``, ``hidden_size``), ``projection`` (``kind``, ``seed``, ``sha256``),
            and ``schema_version``, ``engine``, ``dtype``, ``layers``, ``dims``, ``bank_id``,
            ``fingerprint``.
        layers: the layers it reads, in input order.
        extras: its inputs beyond the states (:data:`~env.probes.data.BOUNDARY_EXTRAS`).
        ended_states: it also reads the states of ``layers`` multiplied by ``ended`` (the
            state again where the chain's sampling ended, zeros elsewhere): its own direction
            at a chain's end, where its answer is written, beside the one it reads at every
            boundary.
    """

    annotation: dict[str, Any]
    layers: tuple[int, ...]
    extras: tuple[str, ...] = ()
    ended_states: bool = False

    @classmethod
    def of(
        cls,
        manifest: HiddenManifest,
        layers: Sequence[int],
        extras: Sequence[str] = (),
        *,
        ended_states: bool = False,
    ) -> ProbeSchema:
        """The schema of a probe reading ``layers`` (and ``extras``, and with ``ended_states``
        the states again at ended boundaries) of an annotation."""
        missing = [la for la in layers if la not in manifest.layers]
        if not layers or missing:
            raise ConfigError(
                f"a probe must read some of the annotated layers {manifest.layers}, got "
                f"{list(layers)}"
            )
        unknown = [e for e in extras if e not in BOUNDARY_EXTRAS]
        if unknown:
            raise ConfigError(f"unknown extra inputs {unknown}; choose from {BOUNDARY_EXTRAS}")
        m = manifest.model
        annotation: dict[str, Any] = {
            "model": {
                "name": m.get("name", ""),
                "sha256": m.get("sha256", ""),
                "num_layers": int(m.get("num_layers", 0)),
                "hidden_size": int(m["hidden_size"]),
            },
            "projection": {
                "kind": manifest.projection.get("kind", ""),
                "seed": int(manifest.projection["seed"]),
                "sha256": manifest.projection.get("sha256", ""),
            },
        }
        for k in _ANNOTATION_KEYS:
            v = getattr(manifest, k)
            annotation[k] = list(v) if isinstance(v, list | tuple) else v
        return cls(annotation, tuple(int(la) for la in layers), tuple(extras), bool(ended_states))

    @property
    def dims(self) -> int:
        return int(self.annotation["dims"])

    @property
    def features(self) -> tuple[str, ...]:
        """The input names, in order: ``L<layer>/<i>`` for each layer read, then
        ``ended*L<layer>/<i>`` with ``ended_states``, then the extras."""
        states = tuple(f"L{la}/{i}" for la in self.layers for i in range(self.dims))
        ended = tuple(f"ended*{f}" for f in states) if self.ended_states else ()
        return (*states, *ended, *self.extras)

    def mismatches(self, manifest: HiddenManifest) -> list[str]:
        """Why hidden states of ``manifest`` are not this probe's inputs (empty: they are)."""
        a = self.annotation
        m, p = a["model"], a["projection"]
        out = []
        if manifest.schema_version != a["schema_version"]:
            out.append(
                f"annotation schema version {manifest.schema_version} vs {a['schema_version']}"
            )
        if manifest.model.get("sha256", "") != m["sha256"]:
            out.append(
                f"model sha256 {str(manifest.model.get('sha256', ''))[:12]}… "
                f"({manifest.model.get('name')}) vs {m['sha256'][:12]}… ({m['name']})"
            )
        if manifest.hidden_size != m["hidden_size"]:
            out.append(f"hidden size {manifest.hidden_size} vs {m['hidden_size']}")
        if int(manifest.dims) != self.dims:
            out.append(f"{manifest.dims} projected dimensions vs {self.dims}")
        if manifest.projection.get("kind", "") != p["kind"] or manifest.seed != p["seed"]:
            out.append(
                f"projection {manifest.projection.get('kind')} seed {manifest.seed} vs "
                f"{p['kind']} seed {p['seed']}"
            )
        elif list(manifest.layers) == list(a["layers"]) and manifest.projection.get(
            "sha256", ""
        ) != p.get("sha256", ""):
            out.append("projection sha256 (the same seed drew other matrices)")
        lacking = [la for la in self.layers if la not in manifest.layers]
        if lacking:
            out.append(f"layers {list(manifest.layers)} lack {lacking}")
        return out

    def check(
        self, manifest: HiddenManifest, *, what: str = "this probe", bank: str | Path | None = None
    ) -> None:
        """Refuse hidden states that are not this probe's inputs, saying what to run.

        Args:
            what: names the probe in the message.
            bank: the bank the hidden states belong to (named in the commands to run).

        Raises:
            ModelError: naming every difference.
        """
        diffs = self.mismatches(manifest)
        if diffs:
            a = self.annotation
            layers = " ".join(str(la) for la in a["layers"])
            where = str(bank) if bank is not None else "BANK"
            raise ModelError(
                f"{what} reads other hidden states than the bank's annotation "
                f"({'; '.join(diffs)}; the annotation's value first): "
                f"{_refit_hint(where)}, or annotate the bank as the probe's was, with "
                f"`ponder bank annotate {where} --layers {layers} --dims {self.dims} --seed "
                f"{a['projection']['seed']}` (after moving its hidden/ folder away)"
            )

    def inputs(
        self,
        states: np.ndarray,
        layers: Sequence[int],
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Input rows from states ``[..., len(layers), dims]`` (and, for a schema with extra
        inputs or ``ended_states``, their values ``[...]`` by name, ``ended`` for the latter):
        float64 ``[..., n_features]``. A missing extra value (NaN) stays NaN here.

        Args:
            layers: the layers along the states' second-to-last axis (the annotation's).
        """
        where = list(layers)
        try:
            idx = [where.index(la) for la in self.layers]
        except ValueError:
            raise ConfigError(
                f"the probe reads layers {list(self.layers)}, the states hold {where}"
            ) from None
        s = np.asarray(states)
        if s.shape[-2:] != (len(where), self.dims):
            raise ConfigError(
                f"states of shape {s.shape} do not hold {len(where)} layers of {self.dims} dims"
            )
        lead = s.shape[:-2]
        x = s[..., idx, :].astype(np.float64).reshape(*lead, len(idx) * self.dims)
        needs = [*self.extras, *(["ended"] if self.ended_states else [])]
        if not needs:
            return x
        if extras is None or any(e not in extras for e in needs):
            raise ConfigError(f"the probe also reads {sorted(set(needs))}")
        blocks = [x]
        if self.ended_states:
            blocks.append(x * np.asarray(extras["ended"], np.float64).reshape(*lead, 1))
        blocks += [np.asarray(extras[e], np.float64).reshape(*lead, 1) for e in self.extras]
        return np.concatenate(blocks, axis=-1)

    def to_json(self) -> dict[str, Any]:
        return {
            "annotation": self.annotation,
            "layers": list(self.layers),
            "extras": list(self.extras),
            "ended_states": self.ended_states,
            "features": list(self.features),
        }


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: ``link((x - mean) / scale @ coef + intercept)``.

    Attributes:
        kind: ``difficulty`` or ``chain-correctness`` (:data:`KINDS`).
        schema: what it reads.
        mean, scale: the input standardisation, float64 ``[n_features]``.
        coef: float64 ``[n_features]``.
        intercept: the bias.
        params: the hyper-parameters (``C`` or ``alpha``) and how they were chosen.
        meta: how it was fitted: the bank, the questions it was fitted on, dev metrics.
    """

    kind: str
    schema: ProbeSchema
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown probe kind {self.kind!r}; choose from {sorted(KINDS)}")
        n = len(self.schema.features)
        for name in ("mean", "scale", "coef"):
            a = np.ascontiguousarray(getattr(self, name), dtype=np.float64)
            if a.shape != (n,):
                raise ModelError(f"probe {name} has shape {a.shape}, its schema has {n} features")
            if not np.isfinite(a).all():
                raise ModelError(f"probe {name} holds NaN or infinity")
            object.__setattr__(self, name, a)
        if not math.isfinite(self.intercept) or (self.scale <= 0).any():
            raise ModelError("probe intercept is not finite, or a scale is not positive")

    @property
    def link(self) -> str:
        return KINDS[self.kind]

    @property
    def layers(self) -> tuple[int, ...]:
        return self.schema.layers

    def inputs(
        self,
        states: np.ndarray,
        layers: Sequence[int],
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """The probe's input rows (:meth:`ProbeSchema.inputs`), a missing extra value (NaN:
        a chain with no token confidence yet) read as its training mean, so it moves nothing."""
        x = self.schema.inputs(states, layers, extras)
        if self.schema.extras:
            tail = x[..., -len(self.schema.extras) :]
            bad = ~np.isfinite(tail)
            if bad.any():
                tail[bad] = np.broadcast_to(self.mean[-len(self.schema.extras) :], tail.shape)[bad]
        return x

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The prediction for input rows ``[..., n_features]``: P(right) (chain correctness) or
        the predicted pass rate (difficulty), in [0, 1]."""
        z = ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept
        if self.link == "logistic":
            return 1.0 / (1.0 + np.exp(-z))
        return np.clip(z, 0.0, 1.0)

    def __call__(
        self,
        states: np.ndarray,
        layers: Sequence[int],
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        return self.predict(self.inputs(states, layers, extras))

    def fingerprint(self) -> str:
        """The sha256 of what the probe computes (kind, link, schema and weights): equal
        fingerprints give equal predictions."""
        h = hashlib.sha256()
        head = {"kind": self.kind, "link": self.link, "schema": self.schema.to_json()}
        h.update(json.dumps(head, sort_keys=True).encode())
        for a in (self.mean, self.scale, self.coef, np.array([self.intercept])):
            h.update(np.ascontiguousarray(a, np.float64).tobytes())
        return h.hexdigest()

    # -- the file format ---------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``probe.json`` and ``weights.safetensors`` into ``directory`` (atomically, the
        weights first); returns the folder."""
        from safetensors.numpy import save

        from env.bank.writer import atomic_write_bytes

        d = Path(directory)
        blob = save(
            {
                "mean": self.mean,
                "scale": self.scale,
                "coef": self.coef,
                "intercept": np.array([self.intercept], dtype=np.float64),
            }
        )
        atomic_write_bytes(d / WEIGHTS_FILE, blob)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "link": self.link,
            "schema": self.schema.to_json(),
            "params": self.params,
            "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(blob).hexdigest()},
            "meta": self.meta,
            "ponder_version": _ponder_version(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        text = json.dumps(header, indent=2, allow_nan=False) + "\n"
        atomic_write_bytes(d / PROBE_JSON, text.encode("utf-8"))
        return d

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        kind: str | None = None,
        hidden: HiddenManifest | None = None,
        bank: str | Path | None = None,
    ) -> LinearProbe:
        """Read a probe folder (or its ``probe.json``), refusing anything else.

        Args:
            kind: the kind expected (any if ``None``).
            hidden: the annotation the probe will read; refused if it is not the probe's
                (:meth:`ProbeSchema.check`).
            bank: the bank of ``hidden`` (named in the message).

        Raises:
            ModelError: no probe there, a damaged or truncated file (named), another format,
                kind or version, a feature list that does not follow from the schema, or
                hidden states the probe cannot read.
        """
        p = Path(path)
        if p.is_file():
            p = p.parent
        jpath = p / PROBE_JSON
        if not jpath.is_file():
            raise ModelError(
                f"no probe at {p} (no {PROBE_JSON}): fit one with `ponder probes BANK --out {p}`"
            )
        redo = f"the file is damaged; fit the probe again (`ponder probes BANK --out {p.parent}`)"
        try:
            h = json.loads(jpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{jpath} is not valid JSON ({e}): {redo}") from e
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise ModelError(f"{jpath} is not a ponder probe file (format {FORMAT!r} expected)")
        if h.get("version") not in _READS:
            raise ModelError(
                f"{jpath} is probe format version {h.get('version')!r}; this ponder reads "
                f"versions {', '.join(map(str, _READS))}: upgrade ponder or fit the probe again"
            )
        if h.get("kind") not in KINDS or (kind is not None and h.get("kind") != kind):
            want = kind or " or ".join(sorted(KINDS))
            raise ModelError(f"{jpath} holds a {h.get('kind')!r} probe, not a {want} probe")
        fitted_on = str((h.get("meta") or {}).get("bank", ""))
        try:
            s = h["schema"]
            schema = ProbeSchema(
                annotation=dict(s["annotation"]),
                layers=tuple(int(la) for la in s["layers"]),
                extras=tuple(str(e) for e in s["extras"]),
                ended_states=bool(s.get("ended_states", False)),
            )
            features = [str(f) for f in s["features"]]
            wname = str(h["weights"]["file"])
            wsha = str(h["weights"]["sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{jpath} lacks {e}: {redo}") from e
        if features != list(schema.features):
            raise ModelError(
                f"{jpath} lists {len(features)} features that do not follow from its schema "
                f"({len(schema.features)} for layers {list(schema.layers)}, extras "
                f"{list(schema.extras)} and ended_states {schema.ended_states}): {redo}"
            )
        if wname != WEIGHTS_FILE:
            raise ModelError(f"{jpath} names weights {wname!r}, expected {WEIGHTS_FILE!r}")
        wpath = p / WEIGHTS_FILE
        try:
            blob = wpath.read_bytes()
        except OSError as e:
            raise ModelError(f"{wpath} is missing ({e}): copy the whole probe folder") from e
        if hashlib.sha256(blob).hexdigest() != wsha:
            raise ModelError(
                f"{wpath} is truncated or altered (its sha256 is not the one {PROBE_JSON} "
                f"records): copy the probe folder again, or {_refit_hint(fitted_on)}"
            )
        from safetensors.numpy import load

        try:
            arrays = load(blob)
            probe = cls(
                kind=str(h["kind"]),
                schema=schema,
                mean=arrays["mean"],
                scale=arrays["scale"],
                coef=arrays["coef"],
                intercept=float(arrays["intercept"][0]),
                params=dict(h.get("params") or {}),
                meta=dict(h.get("meta") or {}),
            )
        except ModelError as e:
            raise ModelError(f"{wpath}: {e}") from e
        except Exception as e:  # safetensors raises its own types for damaged files
            raise ModelError(f"{wpath} cannot be read ({type(e).__name__}: {e}): {redo}") from e
        if hidden is not None:
            schema.check(hidden, what=f"the probe at {p}", bank=bank)
        return probe


def _ponder_version() -> str:
    try:
        from importlib.metadata import version

        return version("ponder")
    except Exception:  # not installed (running from a checkout)
        return "unknown"
