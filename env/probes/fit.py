"""Fitting the probes on a bank's training questions, with every choice made on ``dev``.

The questions: those of the bank that have hidden states. The probes are fitted on their
``train`` split only; the hyper-parameters are chosen by fitting on ``fit`` and scoring on
``dev`` (:func:`~env.questions.select_split` of the annotated questions, so a bank annotated in
part still gets a stratified quarter for ``dev``), then the chosen configuration is refitted on
all of ``train``. Test questions are never read here.

- **Difficulty** (:func:`fit_difficulty_probe`): ridge regression of the question's pass rate
  on the standardised prompt state; ``alpha`` from :data:`ALPHA_GRID`.
- **Chain correctness** (:func:`fit_chain_probe`): logistic regression of the chain's final
  correctness on the standardised state at every main boundary of every training chain (each
  boundary a row, labelled with its chain's outcome), and the state again at the boundaries
  where the chain ended (``ended_states``: the end, where the answer is written, gets its own
  direction); ``C`` from :data:`C_GRID`, the extra inputs (how far into its budget the open
  chain is, whether it ended, its token confidence and entropy so far, the trajectory of its
  chunk confidences and how stable its answer has been across its boundaries) from
  :data:`EXTRA_CHOICES`, and how much less the extras are penalised than the state's
  coordinates from :data:`EXTRAS_WEIGHTS` (a few extras beside 256 coordinates under one ``C``
  are squashed with them).

What is minimised on ``dev`` is each model's own loss, a proper score of the predictions: the
pass rate's mean squared error, and the log loss over every dev boundary (the probe is read at
every boundary, so it should be right in probability at each, not only rank the chains at their
end). The numbers the issue sets targets for (Spearman; AUROC over all chains and within a
question at the last boundary) are recorded beside it: on a ``dev`` of 32 questions they move by
several hundredths from one value of ``C`` to the next without a trend (the within-question
AUROC most), and choosing by them picked the strongest regularisation and probabilities squashed
into a narrow band.

Both choose the layers read too: each captured layer alone and all of them together
(:func:`layer_choices`); :class:`ProbeFit` keeps the best probe of each choice for a report
by layer, and the best overall.

What the grid offers was itself decided on ``dev`` of the GSM8K bank (71 fit / 24 dev
questions, layers 14+28; dev log loss over every boundary / AUROC within a question at the last
boundary), an input kept only where it helped both. Kept: the chain's token confidence and
entropy (0.658 / 0.731 without, 0.600 / 0.779 with), the state again at ended boundaries (0.589
/ 0.847). Not kept: the chain's budget fraction once it has ended in place of ``budget_open``
(0.592 / 0.773: a hard question's chains run long, so it ranks questions, not the chains of
one), and the running mean of the chain's boundary states beside its state (0.590 / 0.792).
Offered since, on the same bank (95 fit / 32 dev questions, dev log loss over every boundary /
AUROC over all chains / within a question, at the last boundary): the confidence trajectory and
answer stability inputs (best 0.556 / 0.871 / 0.792, against 0.554 / 0.856 / 0.779 for budget,
end and mean confidence, which dev chose), and extras weights 30 and 100 (chosen: 100). Budget
and end alone left the grid to pay for them (dev had taken the three with mean confidence).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from env.probes.data import BOUNDARY_EXTRAS, BoundarySet, PromptSet, boundary_set, prompt_set
from env.probes.model import LinearProbe, ProbeSchema
from env.questions import select_split
from features.errors import ConfigError

if TYPE_CHECKING:
    from env.bank.hidden import HiddenManifest, HiddenStates
    from env.bank.store import TraceBank
    from env.types import Question

__all__ = [
    "ALPHA_GRID",
    "C_GRID",
    "EXTRAS_WEIGHTS",
    "EXTRA_CHOICES",
    "DevScore",
    "ProbeFit",
    "auroc",
    "best_of",
    "cross_fit",
    "fit_chain_like",
    "fit_chain_probe",
    "fit_difficulty_probe",
    "fit_probes",
    "layer_choices",
    "questions_sha256",
    "spearman",
    "within_auroc",
]

#: Inverse L2 strengths tried for the chain-correctness probe (on standardised inputs).
C_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
#: L2 strengths tried for the difficulty probe (on standardised inputs).
ALPHA_GRID: tuple[float, ...] = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
#: Extra inputs tried for the chain-correctness probe, beside the state
#: (:data:`~env.probes.data.BOUNDARY_EXTRAS`).
EXTRA_CHOICES: tuple[tuple[str, ...], ...] = (
    (),
    ("budget_open", "ended", "mean_confidence"),
    ("budget_open", "ended", "mean_confidence", "chunk_confidence", "chunk_entropy"),
    # all of them but ``budget_fraction`` (``budget_open`` in its place, see below)
    ("budget_open", *(e for e in BOUNDARY_EXTRAS if e not in ("budget_fraction", "budget_open"))),
)
#: Factors the standardised extra inputs are multiplied by before the fit (their L2 penalty
#: divided by the square), tried with each choice of extras. The larger ones let the fit lean on
#: the extras and all but drop the state (100: the state's penalty is 10,000 times theirs).
EXTRAS_WEIGHTS: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)


def layer_choices(layers: Sequence[int]) -> list[tuple[int, ...]]:
    """Each layer alone, then all of them (one choice if there is one layer)."""
    alone = [(int(la),) for la in layers]
    return alone + ([tuple(int(la) for la in layers)] if len(layers) > 1 else [])


# -- scores used to choose ---------------------------------------------------------------------


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN without both classes."""
    y = np.asarray(y, bool)
    s = np.asarray(score, np.float64)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def within_auroc(y: np.ndarray, score: np.ndarray, group: np.ndarray) -> float:
    """Mean AUROC within each group (question) that has both classes; NaN if none has."""
    vals = [auroc(y[group == g], score[group == g]) for g in np.unique(group)]
    ok = [v for v in vals if math.isfinite(v)]
    return float(np.mean(ok)) if ok else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (NaN if either side is constant or there are < 3 values)."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# -- fitting one probe ---------------------------------------------------------------------------


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    return mean, scale


def _fill_missing(x: np.ndarray, n_extras: int) -> None:
    """Missing extra values (NaN) in place: their column's mean (0 for a column with none)."""
    if not n_extras:
        return
    tail = x[:, -n_extras:]
    bad = ~np.isfinite(tail)
    if bad.any():
        ok = np.where(bad, 0.0, tail)
        n = (~bad).sum(axis=0)
        fill = np.where(n > 0, ok.sum(axis=0) / np.maximum(n, 1), 0.0)
        tail[bad] = np.broadcast_to(fill, tail.shape)[bad]


def fit_chain_probe(
    data: BoundarySet,
    manifest: HiddenManifest,
    *,
    layers: Sequence[int],
    extras: Sequence[str] = (),
    c: float,
    extras_weight: float = 1.0,
    ended_states: bool = True,
    params: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> LinearProbe:
    """Logistic regression (L2, inverse strength ``c``) of chain correctness on every boundary
    row of ``data`` (standardised inputs).

    Args:
        extras: the extra inputs read (:data:`~env.probes.data.BOUNDARY_EXTRAS`).
        extras_weight: the standardised extras are multiplied by it for the fit (their penalty
            divided by its square); the probe's coefficients are those of the unscaled inputs.
        ended_states: also read the state at ended boundaries (:class:`ProbeSchema`).
    """
    from sklearn.linear_model import LogisticRegression

    y = data.correct.astype(int)
    if len(np.unique(y)) < 2:
        raise ConfigError("the chain-correctness probe needs both right and wrong chains to fit")
    if not extras_weight > 0:
        raise ConfigError(f"extras_weight must be positive, got {extras_weight}")
    schema = ProbeSchema.of(manifest, layers, extras, ended_states=ended_states)
    x = schema.inputs(data.states, data.layers, data.extras)
    _fill_missing(x, len(schema.extras))
    mean, scale = _standardise(x)
    weight = np.ones(x.shape[1])
    if schema.extras:
        weight[-len(schema.extras) :] = extras_weight
    # Newton steps on the ~500 inputs: the same optimum as lbfgs, in a few iterations where
    # lbfgs took hundreds (thousands, unconverged, with heavily weighted extras).
    model = LogisticRegression(C=c, solver="newton-cholesky", max_iter=200, tol=1e-8)
    model.fit((x - mean) / scale * weight, y)
    return LinearProbe(
        "chain-correctness",
        schema,
        mean,
        scale,
        model.coef_[0].astype(np.float64) * weight,
        float(model.intercept_[0]),
        params={
            "model": "logistic regression (L2)",
            "C": c,
            "extras_weight": extras_weight,
            **(params or {}),
        },
        meta=dict(meta or {}),
    )


def fit_chain_like(data: BoundarySet, probe: LinearProbe, manifest: HiddenManifest) -> LinearProbe:
    """A chain-correctness probe fitted on ``data`` with ``probe``'s configuration (layers,
    extras, ``ended_states``, ``C``, extras weight)."""
    return fit_chain_probe(
        data,
        manifest,
        layers=probe.layers,
        extras=probe.schema.extras,
        c=float(probe.params["C"]),
        extras_weight=float(probe.params.get("extras_weight", 1.0)),
        ended_states=probe.schema.ended_states,
    )


def fit_difficulty_probe(
    data: PromptSet,
    manifest: HiddenManifest,
    *,
    layers: Sequence[int],
    alpha: float,
    params: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> LinearProbe:
    """Ridge regression (strength ``alpha``) of the pass rate on the standardised prompt state."""
    from sklearn.linear_model import Ridge

    if len(data.qids) < 2:
        raise ConfigError("the difficulty probe needs at least two training questions")
    schema = ProbeSchema.of(manifest, layers)
    x = schema.inputs(data.states, data.layers)
    mean, scale = _standardise(x)
    model = Ridge(alpha=alpha)
    model.fit((x - mean) / scale, data.pass_rate)
    return LinearProbe(
        "difficulty",
        schema,
        mean,
        scale,
        np.asarray(model.coef_, np.float64),
        float(model.intercept_),
        params={"model": "ridge regression of the pass rate", "alpha": alpha, **(params or {})},
        meta=dict(meta or {}),
    )


def cross_fit(
    data: BoundarySet, probe: LinearProbe, manifest: HiddenManifest, *, folds: int = 4
) -> np.ndarray:
    """``probe``'s configuration (:func:`fit_chain_like`) refitted ``folds`` times, each time
    without a fold of ``data``'s questions, and each row predicted by the fit that did not see
    its question: out-of-fold P(right) for every row (for stacking the probe with other
    signals without the probe's in-sample optimism)."""
    fold = np.arange(len(data.qids)) % max(2, folds)
    out = np.empty(len(data))
    for f in np.unique(fold):
        held = fold[data.question] == f
        p = fit_chain_like(data.take(~held), probe, manifest)
        part = data.take(held)
        out[held] = p(part.states, part.layers, part.extras)
    return out


# -- choosing on dev -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DevScore:
    """One configuration fitted on ``fit`` and scored on ``dev``.

    Attributes:
        kind: ``difficulty`` or ``chain-correctness``.
        layers, extras: what it reads.
        strength: ``alpha`` (difficulty) or ``C`` (chain correctness).
        metrics: dev numbers: ``mse`` of the pass rate and ``spearman`` (difficulty);
            ``log_loss`` over every boundary, ``auroc`` and ``auroc_within`` at the last
            boundary (chain correctness).
        score: the number maximised: minus ``mse`` or minus ``log_loss``.
        extras_weight: the chain probe's extras weight (:func:`fit_chain_probe`).
    """

    kind: str
    layers: tuple[int, ...]
    extras: tuple[str, ...]
    strength: float
    metrics: dict[str, float]
    score: float
    extras_weight: float = 1.0


def best_of(scores: Sequence[DevScore]) -> DevScore:
    """The highest score (NaN lowest); a tie goes to the configuration tried first."""
    best = scores[0]
    for s in scores[1:]:
        if math.isfinite(s.score) and (not math.isfinite(best.score) or s.score > best.score):
            best = s
    return best


def _chain_dev(
    fit: BoundarySet,
    dev: BoundarySet,
    manifest: HiddenManifest,
    layers: tuple[int, ...],
    c_grid: Sequence[float],
    extra_choices: Sequence[tuple[str, ...]],
    weight_grid: Sequence[float],
    ended_states: bool,
) -> list[DevScore]:
    out = []
    last = dev.last
    y = dev.correct
    for extras in extra_choices:
        for weight in weight_grid if extras else (1.0,):
            for c in c_grid:
                probe = fit_chain_probe(
                    fit,
                    manifest,
                    layers=layers,
                    extras=extras,
                    c=c,
                    extras_weight=weight,
                    ended_states=ended_states,
                )
                p = probe(dev.states, dev.layers, dev.extras)
                ll = float(-np.mean(np.where(y, np.log(p + 1e-12), np.log(1 - p + 1e-12))))
                a = auroc(y[last], p[last])
                w = within_auroc(y[last], p[last], dev.question[last])
                metrics = {"log_loss": ll, "auroc": a, "auroc_within": w}
                out.append(DevScore("chain-correctness", layers, extras, c, metrics, -ll, weight))
    return out


def _difficulty_dev(
    fit: PromptSet,
    dev: PromptSet,
    manifest: HiddenManifest,
    layers: tuple[int, ...],
    alpha_grid: Sequence[float],
) -> list[DevScore]:
    out = []
    for alpha in alpha_grid:
        probe = fit_difficulty_probe(fit, manifest, layers=layers, alpha=alpha)
        pred = probe(dev.states, dev.layers)
        mse = float(np.mean((pred - dev.pass_rate) ** 2))
        rho = spearman(pred, dev.pass_rate)
        out.append(DevScore("difficulty", layers, (), alpha, {"mse": mse, "spearman": rho}, -mse))
    return out


# -- everything ----------------------------------------------------------------------------------


@dataclass
class ProbeFit:
    """What :func:`fit_probes` fitted.

    Attributes:
        difficulty, chain: the best probe of each kind on ``dev``, refitted on ``train``.
        by_layers: per layer choice, the best probe of each kind with those layers, refitted on
            ``train`` (``(difficulty, chain)``): the report by layer.
        dev: every configuration tried, with its dev scores.
        splits: the question ids of ``train``, ``fit``, ``dev`` and ``test`` among the annotated
            questions (``test`` is listed for the report, never read here).
        seconds: time spent fitting.
    """

    difficulty: LinearProbe
    chain: LinearProbe
    by_layers: dict[tuple[int, ...], tuple[LinearProbe, LinearProbe]]
    dev: list[DevScore]
    splits: dict[str, list[str]]
    seconds: float = 0.0


def questions_sha256(qids: Sequence[str]) -> str:
    """The sha256 of question ids in order (what a probe records of its training questions)."""
    return hashlib.sha256("\n".join(qids).encode()).hexdigest()


def fit_probes(
    bank: TraceBank,
    hidden: HiddenStates,
    *,
    pool: Sequence[Question] | None = None,
    layers: Sequence[Sequence[int]] | None = None,
    c_grid: Sequence[float] = C_GRID,
    alpha_grid: Sequence[float] = ALPHA_GRID,
    extra_choices: Sequence[tuple[str, ...]] = EXTRA_CHOICES,
    weight_grid: Sequence[float] = EXTRAS_WEIGHTS,
    ended_states: bool = True,
    chosen: str = "",
) -> ProbeFit:
    """Fit both probes on the annotated training questions of ``bank``, choosing on ``dev``.

    Args:
        pool: the questions split into train/fit/dev (default: every recorded one); only the
            annotated ones are read.
        layers: the layer choices to try (default :func:`layer_choices` of the annotation's).
        c_grid, alpha_grid, extra_choices, weight_grid: the rest of the grid tried on ``dev``
            (``weight_grid``: the chain probe's extras weights).
        ended_states: the chain probe also reads the state at ended boundaries.
        chosen: where the grid came from, noted in the probes' params (empty: the grid is
            this ponder's; :meth:`~env.probes.choices.ProbeChoices.grid` names its file).

    Fitting is BLAS-bound: on a small machine run it under ``threadpoolctl.threadpool_limits(1)``
    (lbfgs on many threads of a busy CPU was 25 times slower here).

    Raises:
        ConfigError: too few annotated training questions to fit and choose.
    """
    t0 = time.perf_counter()
    annotated = set(hidden.annotated)
    questions = [q for q in (pool if pool is not None else bank.questions) if q.qid in annotated]
    splits = {s: select_split(questions, s) for s in ("train", "fit", "dev", "test")}
    if len(splits["fit"]) < 2 or len(splits["dev"]) < 1:
        raise ConfigError(
            f"{bank.path} has {len(splits['train'])} annotated training question(s); the probes "
            "need at least 3 (two to fit, one to choose on): annotate more with `ponder bank "
            f"annotate {bank.path}`"
        )
    choices = [tuple(c) for c in (layers or layer_choices(hidden.layers))]
    manifest = hidden.manifest
    p_fit, p_dev = (prompt_set(bank, hidden, splits[s]) for s in ("fit", "dev"))
    b_fit, b_dev = (boundary_set(bank, hidden, splits[s]) for s in ("fit", "dev"))
    p_train = prompt_set(bank, hidden, splits["train"])
    b_train = boundary_set(bank, hidden, splits["train"])
    train_ids = [q.qid for q in splits["train"]]
    meta = {
        "bank": str(bank.path),
        "bank_id": bank.manifest.bank_id,
        "questions": train_ids,
        "questions_sha256": questions_sha256(train_ids),
        "dev_questions": [q.qid for q in splits["dev"]],
    }
    dev: list[DevScore] = []
    by_layers: dict[tuple[int, ...], tuple[LinearProbe, LinearProbe]] = {}
    best_overall: dict[str, DevScore] = {}
    for ch in choices:
        d_scores = _difficulty_dev(p_fit, p_dev, manifest, ch, alpha_grid)
        c_scores = _chain_dev(
            b_fit, b_dev, manifest, ch, c_grid, extra_choices, weight_grid, ended_states
        )
        dev += d_scores + c_scores
        bd, bc = best_of(d_scores), best_of(c_scores)
        for b in (bd, bc):
            cur = best_overall.get(b.kind)
            if cur is None or best_of([cur, b]) is b:
                best_overall[b.kind] = b
        how = "fitted on fit, chosen by the lowest {} on dev, refitted on train"
        note = f" ({chosen})" if chosen else ""
        diff = fit_difficulty_probe(
            p_train,
            manifest,
            layers=ch,
            alpha=bd.strength,
            params={"chosen": how.format("mean squared error") + note, "grid": list(alpha_grid)},
            meta={**meta, "dev": bd.metrics},
        )
        chain = fit_chain_probe(
            b_train,
            manifest,
            layers=ch,
            extras=bc.extras,
            c=bc.strength,
            extras_weight=bc.extras_weight,
            ended_states=ended_states,
            params={
                "chosen": how.format("log loss over every boundary")
                + " (C, extras and their weight)"
                + note,
                "grid": list(c_grid),
                "extra_choices": [list(e) for e in extra_choices],
                "weight_grid": list(weight_grid),
                "rows": "every main boundary of every training chain",
            },
            meta={**meta, "dev": bc.metrics},
        )
        by_layers[ch] = (diff, chain)
    return ProbeFit(
        difficulty=by_layers[best_overall["difficulty"].layers][0],
        chain=by_layers[best_overall["chain-correctness"].layers][1],
        by_layers=by_layers,
        dev=dev,
        splits={k: [q.qid for q in v] for k, v in splits.items()},
        seconds=time.perf_counter() - t0,
    )
