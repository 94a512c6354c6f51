"""The main job's results file: one JSON document per bank, what the README's report is made of.

``ponder run`` writes it to ``<out>/results.json`` and, for a report run (the test questions,
not ``--quick``), to ``results/<bank>.json``, which is committed; ``ponder report`` renders the
README's tables from it (:mod:`policies.evaluation.markdown`). Sections, in this order:

| key | what |
|---|---|
| ``schema`` | :data:`SCHEMA` |
| ``bank`` | the bank's folder name, id, split evaluated, questions trained on and evaluated |
| ``settings`` | the arguments that shape the numbers: training seeds, replay seeds, λ grid, budgets, training budgets, bootstrap |
| ``reference``, ``one_chain``, ``oracle`` | maj@16, best-of-1 and the oracle, with per-level numbers |
| ``families`` | every family's operating points (per training seed), accuracy and tokens with their intervals over questions |
| ``headline`` | per family: tokens to match maj@16 with the interval over questions and training seeds and the per-seed values, accuracy at the headline budgets, area, the paired differences to the best heuristic |
| ``targets``, ``floors`` | the product's target per learned family; the oracle voters' floors |
| ``token_split`` | per difficulty level, how each family's shown point splits its tokens (deep: past a chain's end; wide: other chains), beside the rule of thumb (``null``: the questions have no levels) |
| ``verified_reference``, ``verified_targets`` | code banks only: best-of-16 with execution verification and each learned family against it (its accuracy with at most 30% of its tokens), with the interval of the share |
| ``provenance`` | date, git commit, machine (CPU model, cores), package versions |
| ``timings`` | wall time, training seconds per family and seed |

Only ``provenance`` and ``timings`` differ between two runs with the same arguments on one
machine (:func:`comparable` drops them; a test runs the job twice and compares). Numbers that
JSON cannot hold are written as ``null`` (nan: none) and ``"inf"`` (more than any).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.errors import ConfigError
from policies.evaluation.headline import BudgetDiff, FamilySummary, TargetCheck
from policies.evaluation.metrics import Interval
from policies.evaluation.oracle import OracleResult, VoteFloor
from policies.evaluation.runner import (
    RULE_OF_THUMB,
    EvalResult,
    LevelStats,
    difficulty_regimes,
)

__all__ = [
    "SCHEMA",
    "VOLATILE",
    "LevelRecord",
    "PointRecord",
    "comparable",
    "dumps",
    "interval_of",
    "machine",
    "num",
    "packages",
    "provenance",
    "read_results",
    "results_document",
    "to_float",
    "token_split",
    "write_results",
]

#: The results file's format version.
SCHEMA = 1
#: The sections that differ between two runs of the same job on one machine.
VOLATILE = ("provenance", "timings")
#: The packages whose versions the results file records.
PACKAGES = ("ponder", "numpy", "scipy", "torch", "scikit-learn", "gymnasium", "pyarrow", "mlflow")


def num(x: float | None) -> float | str | None:
    """A number as JSON holds it, to 8 significant digits (more than any table shows, and no
    double rounding of what it shows; a file that diffs by the numbers that matter): ``nan`` ->
    ``null``, ``±inf`` -> ``"inf"`` / ``"-inf"``."""
    if x is None or math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.8g}")


def to_float(v: Any) -> float:
    """The inverse of :func:`num`."""
    if v is None:
        return math.nan
    if isinstance(v, str):
        return float(v)
    return float(v)


def _iv(i: Interval) -> list[float | str | None]:
    return [num(i.mean), num(i.low), num(i.high)]


def _levels(by_level: Mapping[str, LevelStats]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lv, s in by_level.items():
        rec = {"questions": s.questions, "accuracy": _iv(s.accuracy), "tokens": _iv(s.tokens)}
        if s.deep is not None and s.wide is not None:
            rec.update(deep=num(s.deep), wide=num(s.wide))
        out[lv] = rec
    return out


def _point(r: EvalResult) -> dict[str, Any]:
    return {
        "param": r.param,
        "train_seed": r.train_seed,
        "lam": num(r.lam),
        "accuracy": _iv(r.accuracy),
        "tokens": _iv(r.tokens),
        "chains": num(sum(e.chains for e in r.episodes) / max(1, len(r.episodes))),
        "episodes": len(r.episodes),
    }


def _featured(r: EvalResult | OracleResult, label: str) -> dict[str, Any]:
    return {
        "label": label,
        "accuracy": _iv(r.accuracy),
        "tokens": _iv(r.tokens),
        "by_level": _levels(r.by_level),
    }


def _diff(d: BudgetDiff, seeds: Sequence[int | None]) -> dict[str, Any]:
    return {
        "budget": num(d.budget),
        "heuristic": d.heuristic,
        "heuristic_accuracy": num(d.heuristic_accuracy),
        "accuracy": num(d.accuracy),
        "diff": _iv(d.diff),
        "per_seed": [num(d.per_seed.get(s, math.nan)) for s in seeds],
        "above": d.above,
        "below": d.below,
    }


def _summary(s: FamilySummary) -> dict[str, Any]:
    seeds = list(s.seeds)
    shown = s.match if s.match is not None else s.best
    return {
        "kind": s.kind,
        "seeds": seeds,
        "representative_seed": s.representative,
        "best": s.best.label,
        "best_accuracy": num(s.best_accuracy),
        "match": s.match.label if s.match is not None else None,
        "tokens_to_match": _iv(s.tokens_to_match),
        "tokens_to_match_per_seed": [num(s.seed_tokens_to_match[x]) for x in seeds],
        "match_rate": num(s.match_rate),
        "accuracy_at": [
            {"budget": num(b), "accuracy": _iv(i)} for b, i in s.accuracy_at_interval.items()
        ],
        "area": num(s.area),
        "area_per_seed": [num(s.seed_area[x]) for x in seeds],
        "oracle_gap": num(s.oracle_gap),
        "shown": _featured(shown, shown.label),
        "diff_at": [_diff(d, seeds) for d in s.diff_at.values()],
        "diffs": [_diff(d, seeds) for d in s.diffs],
        "above": [num(b) for b in s.above],
        "below": [num(b) for b in s.below],
    }


def token_split(summaries: Sequence[FamilySummary]) -> dict[str, Any] | None:
    """The ``token_split`` section: how each family's shown point (its cheapest point matching
    maj@16, else its most accurate; a learned family's from its representative seed) spends
    its decoded tokens on each difficulty level, beside the rule of thumb for the level.

    ``levels`` maps each level to easy / medium / hard
    (:func:`~policies.evaluation.runner.difficulty_regimes`), ``rule`` each of those to
    :data:`~policies.evaluation.runner.RULE_OF_THUMB`'s advice, and
    ``families`` each family to its point's ``label`` and, per level, its mean decoded
    ``tokens`` per question and the mean of them ``deep`` (past a chain's own end: thinking
    longer) and ``wide`` (in the chains after the first: sampling wider). ``None`` when the
    questions have no difficulty levels.
    """
    shown = [(s.family, s.match if s.match is not None else s.best) for s in summaries]
    regimes = difficulty_regimes(lv for _, r in shown for lv in r.by_level)
    if not regimes:
        return None
    return {
        "rule": dict(RULE_OF_THUMB),
        "levels": regimes,
        "families": {
            fam: {
                "label": r.label,
                "by_level": {
                    lv: {"tokens": num(x.tokens.mean), "deep": num(x.deep), "wide": num(x.wide)}
                    for lv, x in r.by_level.items()
                    if lv in regimes
                },
            }
            for fam, r in shown
        },
    }


def _target(t: TargetCheck) -> dict[str, Any]:
    return {
        "family": t.family,
        "share": num(t.share),
        "matches": t.matches,
        "met": t.met,
        "budgets": len(t.budgets),
        "shortfalls": [[num(b), label, num(h), num(m)] for b, label, h, m in t.shortfalls],
        "clear": [num(b) for b in t.clear],
        "describe": t.describe(),
    }


def results_document(
    *,
    bank: Mapping[str, Any],
    settings: Mapping[str, Any],
    results: Mapping[str, list[EvalResult]],
    kinds: Mapping[str, str],
    reference: EvalResult,
    oracle: OracleResult,
    summaries: Sequence[FamilySummary],
    targets: Sequence[TargetCheck],
    floors: Sequence[VoteFloor],
    timings: Mapping[str, Any],
    prov: Mapping[str, Any] | None = None,
    verified: EvalResult | None = None,
    verified_targets: Sequence[TargetCheck] = (),
) -> dict[str, Any]:
    """The results file's document (see the module docstring for its sections; the verified
    ones only with ``verified``, a code bank's best-of-16 with execution verification)."""
    one = next(
        (r for r in results.get("best-of-N", []) if r.param == "N=1"),
        None,
    )
    doc = {
        "schema": SCHEMA,
        "bank": dict(bank),
        "settings": dict(settings),
        "reference": _featured(reference, reference.label),
        "one_chain": _featured(one, one.label) if one is not None else None,
        "oracle": _featured(oracle, "oracle"),
        "families": {
            fam: {"kind": kinds.get(fam, "heuristic"), "points": [_point(r) for r in res]}
            for fam, res in results.items()
        },
        "headline": {s.family: _summary(s) for s in summaries},
        "targets": [_target(t) for t in targets],
        "floors": [
            {
                "vote": f.vote,
                "tokens": num(f.tokens),
                "accuracy": num(f.accuracy),
                "share": num(f.share(reference.tokens.mean)),
            }
            for f in floors
        ],
        "token_split": token_split(summaries),
    }
    if verified is not None:
        doc["verified_reference"] = _featured(verified, verified.label)
        doc["verified_targets"] = [
            {
                **_target(t),
                "reference": t.reference,
                "target_share": num(t.target_share),
                "share_interval": [num(x) for x in t.share_interval],
            }
            for t in verified_targets
        ]
    doc["provenance"] = dict(prov if prov is not None else provenance())
    doc["timings"] = dict(timings)
    return doc


def dumps(obj: Any, indent: int = 0, width: int = 160) -> str:
    """JSON laid out for reading and for diffs: a list or object goes on one line when it holds
    no object and fits in ``width`` characters, else one item per line."""
    flat = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    nested = isinstance(obj, dict | list) and any(
        isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, dict | list) for x in v))
        for v in (obj.values() if isinstance(obj, dict) else obj)
    )
    if not isinstance(obj, dict | list) or (not nested and indent + len(flat) <= width):
        return flat
    pad = " " * (indent + 1)
    if isinstance(obj, dict):
        items = [
            f"{pad}{json.dumps(k, ensure_ascii=False)}: {dumps(v, indent + 1, width)}"
            for k, v in obj.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + dumps(v, indent + 1, width) for v in obj]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def write_results(path: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` as JSON laid out by :func:`dumps` (atomically: a temporary file, then a
    rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(dumps(dict(doc)) + "\n")
    tmp.replace(p)
    return p


def read_results(path: str | Path) -> dict[str, Any]:
    """A results file, checked for its schema.

    Raises:
        ConfigError: not a results file of this schema.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: not a readable results file ({e})") from e
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ConfigError(
            f"{p}: results schema {doc.get('schema') if isinstance(doc, dict) else None!r}, "
            f"this ponder reads {SCHEMA}: rerun `ponder run` to write it again"
        )
    return doc


def comparable(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` without the sections that differ between runs (:data:`VOLATILE`)."""
    return {k: v for k, v in doc.items() if k not in VOLATILE}


# -- provenance --------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def machine() -> dict[str, Any]:
    """The CPU model, its cores (all, and those this process may use), the OS and Python."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def packages(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """The installed version of each package (``None``: not installed)."""
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def provenance() -> dict[str, Any]:
    """Where and when the numbers were made: date (UTC), git commit (and whether tracked
    files differed from it), machine, package versions."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "machine": machine(),
        "packages": packages(),
    }


# -- reading points back -----------------------------------------------------------------------


@dataclass(frozen=True)
class LevelRecord:
    """One difficulty level of a featured point, read back from a results file (``deep``,
    ``wide``: as :class:`~policies.evaluation.runner.LevelStats`; ``None`` in files written
    before they were recorded)."""

    questions: int
    accuracy: Interval
    tokens: Interval
    deep: float | None = None
    wide: float | None = None


@dataclass(frozen=True)
class PointRecord:
    """An operating point read back from a results file (what the plots need)."""

    family: str
    param: str
    train_seed: int | None
    accuracy: Interval
    tokens: Interval
    by_level: dict[str, LevelRecord] = field(default_factory=dict)

    @property
    def label(self) -> str:
        label = f"{self.family} {self.param}".strip()
        return label if self.train_seed is None else f"{label} seed={self.train_seed}"

    @classmethod
    def featured(cls, rec: Mapping[str, Any]) -> PointRecord:
        """A featured point (``reference``, ``oracle``, a summary's ``shown``)."""
        return cls(
            family=str(rec["label"]),
            param="",
            train_seed=None,
            accuracy=interval_of(rec["accuracy"]),
            tokens=interval_of(rec["tokens"]),
            by_level={
                lv: LevelRecord(
                    int(x["questions"]),
                    interval_of(x["accuracy"]),
                    interval_of(x["tokens"]),
                    None if x.get("deep") is None else to_float(x["deep"]),
                    None if x.get("wide") is None else to_float(x["wide"]),
                )
                for lv, x in rec.get("by_level", {}).items()
            },
        )

    @classmethod
    def points(cls, doc: Mapping[str, Any]) -> dict[str, list[PointRecord]]:
        """Every family's operating points."""
        return {
            fam: [
                cls(
                    family=fam,
                    param=str(p["param"]),
                    train_seed=p["train_seed"],
                    accuracy=interval_of(p["accuracy"]),
                    tokens=interval_of(p["tokens"]),
                )
                for p in f["points"]
            ]
            for fam, f in doc["families"].items()
        }


def interval_of(v: Sequence[Any]) -> Interval:
    """An :class:`Interval` from its ``[mean, low, high]`` record."""
    return Interval(to_float(v[0]), to_float(v[1]), to_float(v[2]))
