"""``ponder probes BANK``: fit the hidden-state probes and report them on the test questions.

The probes (:mod:`env.probes`) are fitted on the bank's annotated training questions, every
choice made on ``dev``, saved in ponder's safe format, read back (refused if they do not fit the
bank's annotation), and scored on the annotated *test* questions against the signals ponder had
before, on the same rows:

- **difficulty**: Spearman between predicted and true pass rates, for the probe on the prompt
  state, the current difficulty predictor (:mod:`env.episode.difficulty`, question length and
  chain 0's first chunk, fitted on the same training questions), and the two combined (the mean
  of their predicted pass rates);
- **chain correctness at a chain's last main boundary**: AUROC over all chains, the mean
  within-question AUROC (questions with both right and wrong chains), Brier and ECE (10 bins),
  for the probe, the chain's mean token confidence and the self-verifier's P(yes) at that chunk
  (their Brier and ECE after Platt scaling on the training chains: a mean token confidence is no
  probability), the share of the question's chains that gave the chain's final answer (the vote
  it belongs to: it reads the other chains, which the probe does not) and that share weighted by
  the probe (the ``probe`` aggregate's weighted vote), and the probe and confidence stacked in one
  logistic regression (does the state add to confidence?), with paired differences;
- **by layer**: each captured layer alone and all together (the best configuration of each on
  ``dev``);
- **how early**: AUROC after each chunk (a chain that ended earlier is scored where it ended).

Intervals: 95% percentile bootstrap over test questions (a question's chains move together;
one draw shared by every row, so differences are paired).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import tyro

from features.errors import BankError, ConfigError
from policies.evaluation.bootstrap import Draws, draws, interval
from policies.evaluation.classification import (
    auroc_rows,
    brier_rows,
    ece_rows,
    group_mean_rows,
    spearman_rows,
)
from policies.evaluation.metrics import Interval

if TYPE_CHECKING:
    from env.bank.hidden import HiddenStates
    from env.bank.store import TraceBank
    from env.probes import BoundarySet, LinearProbe, ProbeFit, PromptSet

__all__ = [
    "ProbeReport",
    "ProbesArgs",
    "Table",
    "chain_metrics",
    "dev_table",
    "main",
    "platt",
    "probe_report",
    "render",
    "run",
    "stack",
    "vote_shares",
]

CHAIN_METRICS = ("AUROC", "AUROC within", "Brier", "ECE")


@dataclass
class ProbesArgs:
    """Fit the hidden-state probes (question difficulty from the prompt state, chain correctness
    at every chunk boundary) on a bank's annotated training questions, choosing on dev, save them,
    and report them on its annotated test questions against mean token confidence, the
    self-verifier and the current difficulty predictor, with bootstrap intervals over questions."""

    bank: Annotated[Path, tyro.conf.Positional]
    """bank folder (annotated with `ponder bank annotate`)"""
    out: Path | None = None
    """where to save the probes (`difficulty/`, `chain-correctness/`); default
    runs/probes/<bank folder name>"""
    boot: int = 1000
    """bootstrap resamples over test questions"""
    seed: int = 0
    """seed of the bootstrap"""
    json: Path | None = None
    """also write every number to this JSON file"""
    dev_grid: bool = False
    """also print every configuration tried on dev"""
    threads: int = 1
    """BLAS threads"""
    note_choices: bool = True
    """write the points chosen on dev to the bank's hidden/probe-choices.json, where `ponder run` refits them rather than searching the grid again (`ponder run --probe-choices dev` searches it anyway)"""


@dataclass
class Table:
    """A report table: a title, column names, and rows of cells (text or intervals)."""

    title: str
    columns: list[str]
    rows: list[list[str | Interval | float | int]]
    notes: list[str] = field(default_factory=list)


@dataclass
class ProbeReport:
    """Everything ``ponder probes`` prints (and writes as JSON)."""

    bank: str
    summary: dict[str, Any]
    tables: list[Table]

    def to_json(self) -> dict[str, Any]:
        def cell(c: Any) -> Any:
            if isinstance(c, Interval):
                return {"mean": c.mean, "low": c.low, "high": c.high}
            if isinstance(c, float) and not math.isfinite(c):
                return None
            return c

        return {
            "bank": self.bank,
            "summary": self.summary,
            "tables": [
                {
                    "title": t.title,
                    "columns": t.columns,
                    "rows": [[cell(c) for c in r] for r in t.rows],
                    "notes": t.notes,
                }
                for t in self.tables
            ],
        }


# -- metrics with intervals -------------------------------------------------------------------


def _iv(rows: np.ndarray) -> Interval:
    """Row 0 with the interval of the finite resamples (a resample can lack a class)."""
    x = np.asarray(rows, np.float64)
    rest = x[1:][np.isfinite(x[1:])]
    if not math.isfinite(x[0]) or rest.size == 0:
        return Interval(float(x[0]), float("nan"), float("nan"))
    return interval(np.r_[x[0], rest])


def _within(y: np.ndarray, score: np.ndarray, question: np.ndarray, nq: int) -> np.ndarray:
    """Each question's AUROC among its own chains (NaN without both classes): ``[nq]``."""
    out = np.full(nq, np.nan)
    for g in range(nq):
        m = question == g
        if m.any():
            out[g] = auroc_rows(y[m], score[m], np.ones((1, int(m.sum()))))[0]
    return out


def chain_metrics(
    y: np.ndarray,
    score: np.ndarray,
    question: np.ndarray,
    d: Draws,
    prob: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """AUROC, within-question AUROC, Brier and ECE of one score per chain, on every resample
    of ``d`` (row 0 the test set itself): ``{name: float[1 + n_boot]}``.

    Args:
        prob: the probabilities Brier and ECE read, when ``score`` is not one (default
            ``score``).
    """
    wq = d.questions
    w = wq[:, question]
    within = _within(y, score, question, wq.shape[1])
    p = score if prob is None else prob
    return {
        "AUROC": auroc_rows(y, score, w),
        "AUROC within": group_mean_rows(within, wq),
        "Brier": brier_rows(y, p, w),
        "ECE": ece_rows(y, p, w),
    }


def stack(
    columns: Sequence[np.ndarray], y: np.ndarray
) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """A logistic regression from a few signals (standardised) to P(right), fitted on
    ``(columns, y)`` (the training chains), returned as a function of new columns."""
    from sklearn.linear_model import LogisticRegression

    x = np.stack([np.asarray(c, np.float64) for c in columns], axis=1)
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd[sd < 1e-12] = 1.0
    model = LogisticRegression(C=1e6, max_iter=1000).fit((x - mu) / sd, y.astype(int))
    w, b = model.coef_[0].astype(np.float64), float(model.intercept_[0])

    def predict(new: Sequence[np.ndarray]) -> np.ndarray:
        z = np.stack([np.asarray(c, np.float64) for c in new], axis=1)
        return 1.0 / (1.0 + np.exp(-(((z - mu) / sd) @ w + b)))

    return predict


def platt(score: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Platt scaling: a one-input logistic regression from ``score`` to P(right), fitted on
    ``(score, y)`` (the training chains), returned as a function of new scores."""
    f = stack([score], y)
    return lambda x: f([x])


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, np.float64), 1e-9, 1 - 1e-9)
    return np.log(q / (1 - q))


def _mixed(y: np.ndarray, question: np.ndarray) -> int:
    """Questions with both right and wrong chains."""
    return sum(1 for g in np.unique(question) if 0 < y[question == g].mean() < 1)


# -- the report -------------------------------------------------------------------------------


def _baselines(b: BoundarySet) -> dict[str, np.ndarray]:
    """The signals ponder had, higher meaning "right" (the episode's defaults for missing
    values: confidence 0, an unscored chain 0.5)."""
    from env.episode.rules import UNSCORED

    out = {"mean token confidence": np.where(np.isfinite(b.confidence), b.confidence, 0.0)}
    if np.isfinite(b.p_yes).any():
        out["self-verifier P(yes)"] = np.where(np.isfinite(b.p_yes), b.p_yes, UNSCORED)
    return out


VOTE_SHARE = "its answer's share of the vote"
WEIGHTED_SHARE = "its answer's probe-weighted vote share"


def vote_shares(
    bank: TraceBank, b: BoundarySet, p_right: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each chain of ``b`` (one row per chain: a last-boundary set), the share of its
    question's chains in ``b`` whose final answer is in its answer class (the vote's grouping,
    :func:`env.episode.tables.answer_classes`), and the same share with each chain weighted by
    ``p_right`` (the ``probe`` aggregate's vote); 0 for a chain without an answer."""
    from env.episode.tables import answer_classes

    share, weighted = np.zeros(len(b)), np.zeros(len(b))
    p = np.asarray(p_right, np.float64)
    for g in np.unique(b.question):
        rows = np.flatnonzero(b.question == g)
        trace = bank[b.qids[int(g)]]
        by_id = {c.chain: c.answer for c in trace.chains}
        answers = [by_id[int(b.chain[i])] for i in rows]
        cls, _ = answer_classes([a for a in answers if a is not None], None, trace.question.qid)
        key = np.array([-1 if a is None else cls[a] for a in answers])
        total = p[rows].sum()
        for j, i in enumerate(rows):
            if key[j] < 0:
                continue
            same = rows[key == key[j]]
            share[i] = same.size / rows.size
            weighted[i] = p[same].sum() / total if total > 0 else 0.0
    return share, weighted


def _current_difficulty(bank: TraceBank, train_qids: Sequence[str], test: PromptSet) -> np.ndarray:
    """The current predictor's pass rate for each test question (1 - its failure probability),
    fitted on the same training questions as the probes."""
    from env.episode.difficulty import difficulty_features, fit_difficulty

    model = fit_difficulty(bank, [bank.question(q) for q in train_qids])
    x = np.stack([difficulty_features(*fc) for fc in test.first_chunk])
    return 1.0 - model.predict(x)


def _layers_name(layers: Sequence[int]) -> str:
    return "layers " + "+".join(str(la) for la in layers)


def _difficulty_table(
    bank: TraceBank, fit: ProbeFit, diff: LinearProbe, test: PromptSet, d: Draws
) -> Table:
    true = test.pass_rate
    cur = _current_difficulty(bank, fit.splits["train"], test)
    mine = diff(test.states, test.layers)
    base = spearman_rows(cur, true, d.questions)
    preds = {
        f"hidden-state probe ({_layers_name(diff.layers)})": mine,
        "current predictor (question + first chunk)": cur,
        "both (mean of the two predicted pass rates)": (mine + cur) / 2,
    }
    for ch, (dp, _) in fit.by_layers.items():
        preds[f"  probe, {_layers_name(ch)} (alpha {dp.params['alpha']:g})"] = dp(
            test.states, test.layers
        )
    rows: list[list[Any]] = []
    for name, pred in preds.items():
        rho = spearman_rows(pred, true, d.questions)
        rows.append([name, _iv(rho), _iv(rho - base) if pred is not cur else "-"])
    return Table(
        "Question difficulty: Spearman(predicted, true pass rate) on test questions",
        ["predictor", "Spearman", "minus the current predictor's (paired)"],
        rows,
        [
            f"{len(true)} test questions; true pass rate over each question's "
            f"{bank.manifest.chains} chains; the current predictor reads chain 0's first chunk "
            "and is fitted on the same training questions"
        ],
    )


def _last_tables(
    bank: TraceBank,
    hidden: HiddenStates,
    fit: ProbeFit,
    chain: LinearProbe,
    last: BoundarySet,
    d: Draws,
) -> list[Table]:
    from env.probes import boundary_set, cross_fit

    y, qi = last.correct, last.question
    probe = chain(last.states, last.layers, last.extras)
    scores = {f"chain probe ({_layers_name(chain.layers)})": probe}
    scores.update(_baselines(last))
    every = boundary_set(bank, hidden, [bank.question(q) for q in fit.splits["train"]])
    train = every.take(every.last)
    oof = cross_fit(every, chain, hidden.manifest)[every.last]
    # The vote a chain belongs to, plain and weighted by the probe (out of fold on training).
    scores[VOTE_SHARE], scores[WEIGHTED_SHARE] = vote_shares(bank, last, probe)
    train_signals = dict(_baselines(train))
    train_signals[VOTE_SHARE], train_signals[WEIGHTED_SHARE] = vote_shares(bank, train, oof)
    probs = {name: platt(s, train.correct)(scores[name]) for name, s in train_signals.items()}
    # Does the state add to what confidence knows? Both in one logistic regression, fitted on
    # the training chains with the probe's out-of-fold predictions.
    conf = train_signals["mean token confidence"]
    both = stack([_logit(oof), conf], train.correct)(
        [_logit(probe), _baselines(last)["mean token confidence"]]
    )
    scores["stacked: probe + mean token confidence"] = both
    mets = {name: chain_metrics(y, s, qi, d, probs.get(name)) for name, s in scores.items()}
    main = Table(
        "Chain correctness at a chain's last main boundary (test chains)",
        ["signal", *CHAIN_METRICS],
        [[name, *(_iv(m[k]) for k in CHAIN_METRICS)] for name, m in mets.items()],
        [
            f"{len(y)} chains of {len(last.qids)} questions ({y.mean():.1%} right); AUROC "
            f"within: mean over the {_mixed(y, qi)} questions with both right and wrong chains",
            "Brier and ECE of confidence, P(yes) and the vote shares: after Platt scaling "
            "fitted on the training chains' last boundaries (mean token confidence is not a "
            "probability); their AUROCs are of the raw signals",
            "vote shares: of the question's chains, those that gave the chain's final answer "
            "(0 without one), plain and weighted by the probe (out of fold on training); they "
            "read every chain of the question, the probe only its own",
            "stacked: a logistic regression on the probe's logit and mean token confidence, "
            "fitted on the training chains' last boundaries with the probe's predictions out of "
            "fold (4 folds of training questions)",
        ],
    )
    names = list(mets)
    conf_name = "mean token confidence"
    short = {names[0]: "probe", names[-1]: "stacked", WEIGHTED_SHARE: "probe-weighted vote share"}
    pairs = [(names[0], n) for n in names[1:-1]] + [
        (WEIGHTED_SHARE, VOTE_SHARE),  # does the probe add to the vote?
        (names[-1], conf_name),
    ]
    diffs: list[list[Any]] = [
        [
            f"{short.get(a, a)} - {b}",
            *(_iv(mets[a][k] - mets[b][k]) for k in CHAIN_METRICS),
        ]
        for a, b in pairs
    ]
    paired = Table("Paired differences (last boundary)", ["difference", *CHAIN_METRICS], diffs)
    rows: list[list[Any]] = []
    for ch, (_, cp) in fit.by_layers.items():
        m = chain_metrics(y, cp(last.states, last.layers, last.extras), qi, d)
        extras = "+".join(cp.schema.extras) or "none"
        weight = f" (x{cp.params.get('extras_weight', 1.0):g})" if cp.schema.extras else ""
        ended = ", state at ended boundaries" if cp.schema.ended_states else ""
        rows.append(
            [
                _layers_name(ch),
                f"C {cp.params['C']:g}, extras {extras}{weight}{ended}",
                *(_iv(m[k]) for k in CHAIN_METRICS),
            ]
        )
    by_layer = Table(
        "Chain correctness by layer (last boundary; each choice's best configuration on dev)",
        ["layers", "chosen on dev", *CHAIN_METRICS],
        rows,
    )
    return [main, paired, by_layer]


def _early_table(chain: LinearProbe, test: BoundarySet, d: Draws) -> Table:
    rows: list[list[Any]] = []
    names: list[str] = []
    for k in range(int(test.chunk.max()) + 1 if len(test) else 0):
        at = test.at_boundary(k)
        sig = {"probe": chain(at.states, at.layers, at.extras), **_baselines(at)}
        names = list(sig)
        row: list[Any] = [k + 1, int((at.chunk == k).sum())]
        for s in sig.values():
            m = chain_metrics(at.correct, s, at.question, d)
            row += [_iv(m["AUROC"]), _iv(m["AUROC within"])]
        rows.append(row)
    cols = ["after chunk", "chains still running"]
    for n in names:
        short = {"mean token confidence": "confidence", "self-verifier P(yes)": "P(yes)"}.get(n, n)
        cols += [f"{short} AUROC", f"{short} within"]
    return Table(
        "How early: AUROC after each main chunk (test chains)",
        cols,
        rows,
        [
            "every chain at every row: a chain that ended before the chunk is scored at its "
            "last boundary; confidence is the mean over the chain's main chunks so far"
        ],
    )


def probe_report(
    bank: TraceBank,
    hidden: HiddenStates,
    fit: ProbeFit,
    *,
    probes: tuple[LinearProbe, LinearProbe] | None = None,
    boot: int = 1000,
    seed: int = 0,
) -> ProbeReport:
    """Score the fitted probes on the annotated test questions (see the module docstring).

    Args:
        probes: ``(difficulty, chain)`` to report as "the probe" (default the best of ``fit``;
            pass the ones read back from disk to report what was saved).
    """
    from env.probes import boundary_set, prompt_set

    test_q = [bank.question(q) for q in fit.splits["test"]]
    if len(test_q) < 2:
        raise ConfigError(
            f"{bank.path} has {len(test_q)} annotated test question(s); the report needs at "
            f"least 2: annotate more with `ponder bank annotate {bank.path}`"
        )
    diff, chain = probes or (fit.difficulty, fit.chain)
    b_test = boundary_set(bank, hidden, test_q)
    d = draws(len(test_q), boot, seed)
    tables = [
        _difficulty_table(bank, fit, diff, prompt_set(bank, hidden, test_q), d),
        *_last_tables(bank, hidden, fit, chain, b_test.take(b_test.last), d),
        _early_table(chain, b_test, d),
    ]
    hm = hidden.manifest
    summary = {
        "bank": str(bank.path),
        "annotation": f"layers {list(hidden.layers)} of {hm.model.get('name')}, "
        f"{hidden.dims} dims, {hm.engine} {hm.dtype}",
        "annotated": len(hidden.annotated),
        "recorded": len(bank),
        "questions": {k: len(v) for k, v in fit.splits.items()},
        "difficulty probe": {"layers": list(diff.layers), **diff.params},
        "chain probe": {
            "layers": list(chain.layers),
            "extras": list(chain.schema.extras),
            "ended_states": chain.schema.ended_states,
            **chain.params,
        },
        "fit seconds": round(fit.seconds, 1),
        "bootstrap": {"resamples": boot, "seed": seed, "unit": "test question"},
    }
    return ProbeReport(str(bank.path), summary, tables)


def dev_table(fit: ProbeFit, *, every: bool = False) -> Table:
    """The configurations tried on dev: the chosen one per kind and layer choice, or all."""
    from env.probes import best_of

    rows: list[list[Any]] = []
    groups: dict[tuple[str, tuple[int, ...]], list[Any]] = {}
    for s in fit.dev:
        groups.setdefault((s.kind, s.layers), []).append(s)
    for (kind, layers), scores in groups.items():
        chosen = best_of(scores)
        for s in scores if every else [chosen]:
            strength = f"alpha {s.strength:g}" if kind == "difficulty" else f"C {s.strength:g}"
            if kind != "difficulty" and s.extras:
                strength += f", extras x{s.extras_weight:g}"
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in s.metrics.items())
            mark = " *" if every and s is chosen else ""
            rows.append(
                [kind, _layers_name(layers), strength + mark, "+".join(s.extras) or "-", metrics]
            )
    return Table(
        f"Choices on dev ({len(fit.splits['fit'])} fit / {len(fit.splits['dev'])} dev questions)",
        ["probe", "layers", "strength", "extras", "dev metrics"],
        rows,
        [
            "chosen: the lowest dev loss (difficulty: mean squared error of the pass rate; "
            "chain correctness: log loss over every dev boundary)"
            + ("; '*' marks it" if every else "")
        ],
    )


# -- rendering --------------------------------------------------------------------------------


def _cell(c: Any) -> str:
    if isinstance(c, Interval):
        if not math.isfinite(c.mean):
            return "-"
        if not math.isfinite(c.low):
            return f"{c.mean:.3f}"
        return f"{c.mean:.3f} [{c.low:.3f}, {c.high:.3f}]"
    if isinstance(c, float):
        return f"{c:.3f}"
    return str(c)


def render(tables: Sequence[Table]) -> str:
    """The tables as Markdown."""
    out = []
    for t in tables:
        out.append(f"### {t.title}\n")
        out.append("| " + " | ".join(t.columns) + " |")
        out.append("|" + "|".join("---" for _ in t.columns) + "|")
        for r in t.rows:
            out.append("| " + " | ".join(_cell(c) for c in r) + " |")
        out += [f"\n{n}" for n in t.notes]
        out.append("")
    return "\n".join(out)


def _open(path: Path) -> tuple[TraceBank, HiddenStates]:
    from env.bank.hidden import HiddenStates
    from env.bank.store import TraceBank

    bank = TraceBank(path)
    hidden = HiddenStates.open(path, bank)
    if hidden is None:
        raise BankError(
            f"{path} has no hidden states: run `ponder bank annotate {path}` first (the probes "
            "read them)"
        )
    return bank, hidden


def run(args: ProbesArgs, echo: Callable[[str], None] = print) -> ProbeReport:
    """Fit, save, read back and report (what ``ponder probes`` does)."""
    from threadpoolctl import threadpool_limits

    from env.probes import LinearProbe, fit_probes

    bank, hidden = _open(args.bank)
    with threadpool_limits(max(1, args.threads)):
        fit = fit_probes(bank, hidden)
        out = args.out or Path("runs") / "probes" / args.bank.resolve().name
        paths = (fit.difficulty.save(out / "difficulty"), fit.chain.save(out / "chain-correctness"))
        loaded = (
            LinearProbe.load(paths[0], kind="difficulty", hidden=hidden.manifest, bank=bank.path),
            LinearProbe.load(
                paths[1], kind="chain-correctness", hidden=hidden.manifest, bank=bank.path
            ),
        )
        report = probe_report(bank, hidden, fit, probes=loaded, boot=args.boot, seed=args.seed)
    report.summary["saved"] = [str(p) for p in paths]
    if args.note_choices:
        from env.probes.choices import ProbeChoices

        try:
            noted = ProbeChoices.of(fit, hidden.manifest).save(hidden.path)
            report.summary["choices"] = str(noted)
        except OSError as e:  # a read-only bank: the report stands, the main job searches
            echo(
                f"(the choices could not be noted in {hidden.path}: {e}; `ponder run` will "
                "search the probes' grid on dev)"
            )
    report.tables.insert(0, dev_table(fit, every=args.dev_grid))
    s = report.summary
    q = s["questions"]
    echo(
        f"## Probes on {s['bank']}\n\n{s['annotation']}; {s['annotated']}/{s['recorded']} "
        f"questions annotated: {q['train']} train ({q['fit']} fit + {q['dev']} dev), "
        f"{q['test']} test. Fitted in {s['fit seconds']} s; saved to {out}/"
        + (f"; the choices noted in {s['choices']}" if "choices" in s else "")
        + f". Intervals: 95% bootstrap over test questions ({args.boot} resamples).\n"
    )
    echo(render(report.tables))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    """``ponder probes``."""
    args = tyro.cli(ProbesArgs, args=argv, prog="ponder probes")
    run(args)
