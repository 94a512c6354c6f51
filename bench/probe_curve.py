"""How the chain-correctness probe grows with training questions (a learning curve).

    python bench/probe_curve.py                         # the shipped GSM8K bank
    python bench/probe_curve.py --bank data/banks/testbed-arith-xl --shares 0.5 1

Training questions only, never the test ones: the annotated training questions are split into 4
folds by question; for each fold, a logistic regression (standardised inputs: the chain's
hidden state at its last main boundary, every captured layer, and its mean token confidence) is
fitted on a share of the other folds' questions and scores the held-out fold's chains. The
table: training questions per fit, AUROC over all chains and the mean within-question AUROC
(questions with both right and wrong chains), each the mean of ``--repeats`` fold draws, per
regularisation ``C``. It is the probe of ``ponder probes`` simplified (one model, no dev
choices), to see how much more training questions would give, not to report test numbers.
The numbers go to ``results/bench/probe_curve.json``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Args:
    """A learning curve of the chain-correctness probe on a bank's training questions."""

    bank: Path = ROOT / "data" / "banks" / "gsm8k-qwen2.5-coder-1.5b"
    """an annotated bank (`ponder bank annotate`)"""
    shares: tuple[float, ...] = (0.25, 0.5, 1.0)
    """shares of the other folds' questions each fit sees"""
    cs: tuple[float, ...] = (0.003, 0.01, 0.03)
    """inverse regularisation strengths"""
    repeats: int = 3
    """fold draws per point"""
    seed: int = 0
    """seed of the fold draws"""
    out: Path = ROOT / "results" / "bench" / "probe_curve.json"
    """where the numbers go"""


def _within(y: np.ndarray, score: np.ndarray, question: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    out = [
        roc_auc_score(y[m], score[m])
        for m in (question == g for g in np.unique(question))
        if 0 < y[m].sum() < m.sum()
    ]
    return float(np.mean(out))


def main(argv: list[str] | None = None) -> None:
    import tyro
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from env.bank.hidden import HiddenStates
    from env.bank.store import TraceBank
    from env.probes.data import boundary_set
    from env.questions import select_split
    from features.errors import BankError

    a = tyro.cli(Args, args=argv)
    bank = TraceBank(a.bank)
    hidden = HiddenStates.open(bank.path, bank)
    if hidden is None:
        raise BankError(f"{a.bank} has no hidden states: run `ponder bank annotate {a.bank}`")
    qs = [q for q in select_split(bank.questions, "train") if q.qid in hidden]
    every = boundary_set(bank, hidden, qs)
    last = every.take(every.last)
    x = np.c_[last.states.reshape(len(last), -1).astype(np.float64), last.confidence]
    y = last.correct.astype(int)
    question = last.question
    ids = np.unique(question)
    print(f"{a.bank.name}: {ids.size} annotated training questions, {y.size} chains")
    rng = np.random.default_rng(a.seed)
    rows = []
    print(f"{'C':>6} {'questions':>9} {'AUROC':>6} {'within':>6}")
    for c in a.cs:
        for share in a.shares:
            alls, withins = [], []
            for _ in range(a.repeats):
                order = rng.permutation(ids)
                fold_of = {q: i % 4 for i, q in enumerate(order)}
                fold = np.array([fold_of[q] for q in question])
                score = np.empty(y.size)
                for f in range(4):
                    pool = [q for q in order if fold_of[q] != f]
                    seen = set(pool[: max(2, round(share * len(pool)))])
                    fit = np.array([q in seen for q in question])
                    held = fold == f
                    scale = StandardScaler().fit(x[fit])
                    model = LogisticRegression(C=c, max_iter=3000)
                    model.fit(scale.transform(x[fit]), y[fit])
                    score[held] = model.predict_proba(scale.transform(x[held]))[:, 1]
                alls.append(roc_auc_score(y, score))
                withins.append(_within(y, score, question))
            n = round(share * ids.size * 3 / 4)
            row = {"C": c, "questions": n, "auroc": np.mean(alls), "within": np.mean(withins)}
            rows.append(row)
            print(f"{c:>6g} {n:>9d} {row['auroc']:>6.3f} {row['within']:>6.3f}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1) + "\n"
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
