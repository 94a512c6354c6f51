"""What ``ponder probes`` chose on ``dev``, kept beside the bank's states
(``hidden/probe-choices.json``), so that the main job refits the chosen probes without searching
the grid again.

:func:`~env.probes.fit.fit_probes` fits a probe for every point of its grid (layers, ``C``,
extra inputs and their weight, the difficulty probe's ``alpha``) on ``fit``, picks the best on
``dev`` and refits it on ``train``: 343 logistic regressions on the GSM8K bank, 148 s of one
core, all but a few seconds of it the search. The choice depends only on the annotation and on
which questions are ``train`` (``fit`` and ``dev`` follow from their ids), so it is recorded
with both, and a run on the same annotation and questions searches a grid of the chosen point
alone. That refit gives the same probes: the point that won on ``dev`` against the whole grid
wins again against itself at the other layer choice (:meth:`ProbeChoices.grid`).

Where the annotation or the training questions differ (the bank grew, it was annotated again,
a dev run fits on ``fit`` alone), :meth:`ProbeChoices.mismatch` says how, and the caller
searches the whole grid. A damaged file is refused by name and never overwritten silently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from env.probes.fit import questions_sha256
from features.errors import ConfigError

if TYPE_CHECKING:
    from env.bank.hidden import HiddenManifest
    from env.probes.fit import ProbeFit

__all__ = ["CHOICES_FILE", "ProbeChoices"]

#: The file, in a bank's ``hidden/`` folder, that holds :class:`ProbeChoices`.
CHOICES_FILE = "probe-choices.json"
_FORMAT = "ponder-probe-choices"
_VERSION = 1


@dataclass(frozen=True)
class ProbeChoices:
    """The grid point chosen on ``dev`` for each probe, and what it was chosen on.

    Attributes:
        bank_id, fingerprint: the annotation's (:class:`~env.bank.hidden.HiddenManifest`).
        questions_sha256: the sha256 of the training questions' ids (in order) the probes
            were fitted and chosen on.
        difficulty_layers, alpha: the difficulty probe's layers and L2 strength.
        chain_layers, extras, c, extras_weight, ended_states: the chain-correctness probe's.
        dev: the chosen probes' scores on ``dev`` (for the record).
    """

    bank_id: str
    fingerprint: str
    questions_sha256: str
    difficulty_layers: tuple[int, ...]
    alpha: float
    chain_layers: tuple[int, ...]
    extras: tuple[str, ...]
    c: float
    extras_weight: float
    ended_states: bool
    dev: dict[str, Any]

    @classmethod
    def of(cls, fitted: ProbeFit, manifest: HiddenManifest) -> ProbeChoices:
        """The choices of a full-grid fit on an annotation."""
        d, ch = fitted.difficulty, fitted.chain
        return cls(
            bank_id=manifest.bank_id,
            fingerprint=manifest.fingerprint,
            questions_sha256=questions_sha256(fitted.splits["train"]),
            difficulty_layers=tuple(int(x) for x in d.layers),
            alpha=float(d.params["alpha"]),
            chain_layers=tuple(int(x) for x in ch.layers),
            extras=tuple(ch.schema.extras),
            c=float(ch.params["C"]),
            extras_weight=float(ch.params.get("extras_weight", 1.0)),
            ended_states=bool(ch.schema.ended_states),
            dev={"difficulty": d.meta.get("dev", {}), "chain": ch.meta.get("dev", {})},
        )

    def grid(self) -> dict[str, Any]:
        """The arguments of :func:`~env.probes.fit.fit_probes` that search only the chosen
        point: each probe's point at the layer choices of both (so the by-layer comparison
        that picks each probe's layers sees its own winner again)."""
        layers = [self.difficulty_layers]
        if self.chain_layers != self.difficulty_layers:
            layers.append(self.chain_layers)
        return {
            "layers": layers,
            "alpha_grid": (self.alpha,),
            "c_grid": (self.c,),
            "extra_choices": (self.extras,),
            "weight_grid": (self.extras_weight,),
            "ended_states": self.ended_states,
        }

    def mismatch(self, manifest: HiddenManifest, train_qids: Sequence[str]) -> str | None:
        """How these choices were made on something else than ``manifest``'s annotation and
        the training questions ``train_qids`` (None: they were not)."""
        if self.bank_id != manifest.bank_id:
            return f"another bank ({self.bank_id}, not {manifest.bank_id})"
        if self.fingerprint != manifest.fingerprint:
            return "another annotation of the bank (its settings fingerprint differs)"
        if self.questions_sha256 != questions_sha256(train_qids):
            return f"other training questions (not these {len(train_qids)})"
        return None

    # -- the file ------------------------------------------------------------------------------

    def save(self, hidden_dir: str | Path) -> Path:
        """Write ``hidden_dir/probe-choices.json`` (atomically)."""
        from env.bank.writer import atomic_write_bytes

        path = Path(hidden_dir) / CHOICES_FILE
        body = {"format": _FORMAT, "version": _VERSION, **asdict(self)}
        atomic_write_bytes(path, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ProbeChoices:
        """Read a choices file.

        Raises:
            ConfigError: the file is not valid JSON, not a choices file, of a newer version, or
                a field is missing or of the wrong type (named, with what to do).
        """
        p = Path(path)
        fix = f"delete {p} and run `ponder probes` on the bank to choose again"
        try:
            raw = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p} cannot be read ({e}): {fix}") from e
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
            raise ConfigError(f"{p} is not a probe choices file: {fix}")
        if raw.get("version") != _VERSION:
            raise ConfigError(
                f"{p} has version {raw.get('version')!r}, this ponder reads {_VERSION}: {fix}"
            )
        try:
            out = cls(
                bank_id=_typed(raw["bank_id"], str),
                fingerprint=_typed(raw["fingerprint"], str),
                questions_sha256=_typed(raw["questions_sha256"], str),
                difficulty_layers=tuple(_typed(x, int) for x in raw["difficulty_layers"]),
                alpha=_number(raw["alpha"]),
                chain_layers=tuple(_typed(x, int) for x in raw["chain_layers"]),
                extras=tuple(_typed(x, str) for x in raw["extras"]),
                c=_number(raw["c"]),
                extras_weight=_number(raw["extras_weight"]),
                ended_states=_typed(raw["ended_states"], bool),
                dev=_typed(raw.get("dev", {}), dict),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{p} is damaged ({type(e).__name__}: {e}): {fix}") from e
        if not out.difficulty_layers or not out.chain_layers:
            raise ConfigError(f"{p} names no layers: {fix}")
        return out


def _typed(v: Any, kind: type) -> Any:
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise TypeError(f"{v!r} is not a {kind.__name__}")
    return v


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{v!r} is not a positive number")
    return float(v)
