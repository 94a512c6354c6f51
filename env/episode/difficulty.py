"""How hard is this question? A predictor from the question and the first chunk, trained on a bank.

"Learning how hard to think": before spending compute, estimate the chance that a chain fails,
from what is known after one chunk: the question's length and how many numbers it holds, and the
first chunk's confidence, entropy and thought switches. The target is the question's failure rate
over its recorded chains (1 - pass@1), fitted by logistic regression on soft labels (numpy, a few
milliseconds), on the bank's *training* questions only.

The fitted model is a small JSON file (weights, standardisation, feature names, the bank it was
fitted on); :class:`DifficultyModel` is callable as ``model(question, first_chunk) -> [0, 1]``,
which is what :class:`~env.episode.single.ComputeAllocationEnv` takes as ``difficulty``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from env.questions import select_split
from env.types import Chunk, Question
from features.errors import ConfigError, ModelError
from features.probes import switch_count

__all__ = [
    "DIFFICULTY_FEATURES",
    "DifficultyModel",
    "difficulty_features",
    "fit_difficulty",
    "bank_difficulty",
]

DIFFICULTY_FEATURES: tuple[str, ...] = (
    "log_question_chars",
    "question_numbers",
    "first_conf_mean",
    "first_conf_min",
    "first_entropy_mean",
    "first_switches",
)
_NUM = re.compile(r"\d+(?:\.\d+)?")


def _finite_mean(x: Any) -> float:
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else 0.0


def _finite_min(x: Any) -> float:
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.min()) if a.size else 0.0


def difficulty_features(question_text: str, conf: Any, entropy: Any, text: str) -> np.ndarray:
    """The predictor's inputs (see :data:`DIFFICULTY_FEATURES`) from a question and a first chunk."""
    return np.array(
        [
            math.log1p(len(question_text)),
            float(len(_NUM.findall(question_text))),
            _finite_mean(conf),
            _finite_min(conf),
            _finite_mean(entropy),
            float(switch_count(text)),
        ],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class DifficultyModel:
    """A fitted logistic model: P(a chain fails) from :func:`difficulty_features`."""

    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    features: tuple[str, ...] = DIFFICULTY_FEATURES
    fitted_on: str = ""
    train_questions: int = 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Failure probability for rows of features ``[n, f]`` (or one row ``[f]``)."""
        z = (np.asarray(x, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.std)
        logit = z @ np.asarray(self.weights) + self.bias
        return 1.0 / (1.0 + np.exp(-logit))

    def __call__(self, question: Question, chunk: Chunk) -> float:
        x = difficulty_features(question.text, chunk.confidence, chunk.entropy, chunk.text)
        return float(self.predict(x))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "kind": "ponder.difficulty",
            "version": 1,
            "weights": list(self.weights),
            "bias": self.bias,
            "mean": list(self.mean),
            "std": list(self.std),
            "features": list(self.features),
            "fitted_on": self.fitted_on,
            "train_questions": self.train_questions,
        }
        p.write_text(json.dumps(data, indent=2) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> DifficultyModel:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot read a difficulty model from {p}: {e}") from e
        if d.get("kind") != "ponder.difficulty" or d.get("version") != 1:
            raise ModelError(f"{p} is not a ponder difficulty model (version 1)")
        if tuple(d["features"]) != DIFFICULTY_FEATURES:
            raise ModelError(
                f"{p} was fitted on features {d['features']}, this ponder computes "
                f"{list(DIFFICULTY_FEATURES)}: refit it with fit_difficulty"
            )
        return cls(
            weights=tuple(d["weights"]),
            bias=float(d["bias"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            features=tuple(d["features"]),
            fitted_on=str(d.get("fitted_on", "")),
            train_questions=int(d.get("train_questions", 0)),
        )


def _bank_rows(bank: Any, questions: Sequence[Question]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for q in questions:
        trace = bank[q.qid]
        fail = 1.0 - float(np.mean([c.correct for c in trace.chains]))
        for c in trace.chains:
            r = c.rows
            xs.append(
                difficulty_features(q.text, r["confidence"][0], r["entropy"][0], r["text"][0])
            )
            ys.append(fail)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def fit_difficulty(
    bank: Any, questions: Sequence[Question], *, l2: float = 1.0, iters: int = 50
) -> DifficultyModel:
    """Fit on ``questions`` of ``bank`` (a :class:`~env.bank.store.TraceBank`): training questions only."""
    if not questions:
        raise ConfigError("fit_difficulty needs at least one recorded question")
    x, y = _bank_rows(bank, questions)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-9] = 1.0
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2 / len(x))
    reg[-1] = 0.0  # no penalty on the bias
    for _ in range(iters):  # Newton / IRLS on the soft-label cross-entropy
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - y) / len(x) + reg * w
        h = (z * (p * (1 - p))[:, None]).T @ z / len(x) + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(h, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return DifficultyModel(
        weights=tuple(float(v) for v in w[:-1]),
        bias=float(w[-1]),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        fitted_on=str(getattr(bank, "path", "")),
        train_questions=len(questions),
    )


def bank_difficulty(bank: Any, split: str = "train") -> Any:
    """The difficulty predictor fitted on a bank's ``split`` questions (``None`` if < 2).

    Pass the split the policies train on: ``train``, or ``fit`` when tuning on ``dev``
    (:func:`training_split` of the evaluated split), so the predictor never sees the labels of
    the questions it is evaluated on.
    """
    from env.bank.store import shared

    train = select_split(bank.questions, split)
    if len(train) < 2:
        return None
    return shared(
        lambda: ("difficulty", bank.content_key(), tuple(q.qid for q in train)),
        lambda: fit_difficulty(bank, train),
    )
