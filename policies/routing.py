"""Routing by query type: recognise what kind of question this is, then pick a strategy for it.

The seed documents' routing table gives each kind of query its own strategy (short factual: no
scaling; multi-step: serial; complex: serial + parallel; code: parallel with execution
verification). :class:`QueryClassifier` recognises the kind from the question's text alone,
as a deployed router must (the data set a question came from is not known at serving time);
:mod:`policies.evaluation.routing` chooses a strategy per kind on training questions and
evaluates the router on a mixed test set against the best single strategy for all.

Kinds (:data:`QUERY_KINDS`) and the question sets that teach them:

============  ============================================================================
kind          examples
============  ============================================================================
``factual``   short factual questions: NQ-Open (CC BY-SA 3.0, ``data/factual``), its
              ``train`` half
``multistep`` GSM8K word problems (its training questions)
``hardmath``  MATH-500 competition problems (its ``train`` half,
              :func:`env.questions.math500_split`)
``code``      HumanEval function stubs (its training problems)
============  ============================================================================

The classifier is a multinomial logistic regression on hashed character n-grams (2 to 4
characters within words) and a few shape features (length, digits, LaTeX, code markers), fitted
in a few seconds on the shipped training questions; it is refitted, not loaded, so no model file
is read. Its accuracy on each kind's test questions is what :func:`classifier_report` prints.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from env.types import Question
from features.errors import ConfigError

__all__ = [
    "DATASET_KINDS",
    "QUERY_KINDS",
    "QueryClassifier",
    "classifier_report",
    "kind_of_dataset",
    "training_questions",
]

#: The kinds of query a router tells apart.
QUERY_KINDS = ("factual", "multistep", "hardmath", "code")

#: The kind of each data set's questions (the label the classifier learns from).
DATASET_KINDS = {
    "factual": "factual",
    "gsm8k": "multistep",
    "arith": "multistep",
    "math500": "hardmath",
    "humaneval": "code",
}

_N_HASH = 1 << 14
_LATEX = re.compile(r"\$|\\(?:frac|sqrt|left|right|cdot|pi|theta|le|ge|begin|text)\b|\^\{?")
_CODE = re.compile(r"\bdef \w+\(|\"\"\"|>>>|\breturn\b|\bimport\b|```")


def kind_of_dataset(dataset: str) -> str:
    """The query kind of a data set's questions."""
    try:
        return DATASET_KINDS[dataset]
    except KeyError:
        raise ConfigError(
            f"no query kind for data set {dataset!r}; known: {', '.join(sorted(DATASET_KINDS))}"
        ) from None


def _shape(text: str) -> list[float]:
    words = text.split()
    n = max(1, len(text))
    return [
        np.log1p(len(words)) / 6,
        sum(c.isdigit() for c in text) / n * 5,
        min(1.0, len(_LATEX.findall(text)) / 5),
        min(1.0, len(_CODE.findall(text)) / 3),
        float(text.rstrip().endswith("?")),
    ]


def _features(texts: Sequence[str]) -> np.ndarray:
    """Hashed character n-grams (2-4 within words, l2-normalised) and the shape features."""
    x = np.zeros((len(texts), _N_HASH + 5), np.float32)
    for i, text in enumerate(texts):
        row = x[i]
        for word in text.lower().split():
            w = f" {word} "
            for k in (2, 3, 4):
                for j in range(len(w) - k + 1):
                    h = int.from_bytes(
                        hashlib.blake2b(w[j : j + k].encode(), digest_size=4).digest(), "little"
                    )
                    row[h % _N_HASH] += 1.0
        norm = float(np.linalg.norm(row[:_N_HASH]))
        if norm > 0:
            row[:_N_HASH] /= norm
        row[_N_HASH:] = _shape(text)
    return x


@dataclass
class QueryClassifier:
    """Tells a question's kind from its text (:data:`QUERY_KINDS`).

    Attributes:
        kinds: the kinds it was fitted on, in the order of its weights' rows.
        weights: ``[kinds, features]``.
        bias: ``[kinds]``.
    """

    kinds: tuple[str, ...]
    weights: np.ndarray
    bias: np.ndarray

    @classmethod
    def fit(cls, texts: Sequence[str], kinds: Sequence[str], *, seed: int = 0) -> QueryClassifier:
        """Fit on labelled texts (each kind balanced by class weight)."""
        from sklearn.linear_model import LogisticRegression

        if len(texts) != len(kinds) or not texts:
            raise ConfigError("fit needs as many kinds as texts, and at least one text")
        labels = sorted(set(kinds))
        if len(labels) < 2:
            raise ConfigError(f"a classifier needs two kinds or more, got only {labels}")
        model = LogisticRegression(
            C=10.0, max_iter=2000, class_weight="balanced", random_state=seed
        )
        model.fit(_features(texts), np.array([labels.index(k) for k in kinds]))
        coef, bias = np.asarray(model.coef_), np.asarray(model.intercept_)
        if len(labels) == 2:  # sklearn keeps one row for two classes
            coef, bias = np.vstack([-coef, coef]) / 2, np.array([-bias[0], bias[0]]) / 2
        return cls(tuple(labels), coef.astype(np.float32), bias.astype(np.float32))

    def proba(self, texts: Sequence[str]) -> np.ndarray:
        """``[texts, kinds]``: P(kind | text)."""
        z = _features(texts) @ self.weights.T + self.bias
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely kind of each text."""
        if not texts:
            return []
        return [self.kinds[i] for i in self.proba(texts).argmax(axis=1)]


def training_questions(
    kinds: Sequence[str] = QUERY_KINDS, *, per_kind: int = 400, seed: int = 0
) -> tuple[list[Question], list[str]]:
    """The shipped training questions of each kind (at most ``per_kind``, a seeded draw) and
    their kinds. A kind with no shipped question set is left out."""
    from env.questions import load_questions

    out: list[Question] = []
    labels: list[str] = []
    for kind in kinds:
        if kind == "multistep":
            qs = load_questions("gsm8k", "train", per_kind, seed=seed)
        elif kind == "hardmath":
            qs = load_questions("math500", "train", seed=seed)
        elif kind == "code":
            qs = load_questions("humaneval", "train", None, seed=seed)
        else:
            qs = load_questions("factual", "train", per_kind, seed=seed)
        qs = qs[:per_kind]
        out.extend(qs)
        labels.extend([kind] * len(qs))
    return out, labels


def classifier_report(clf: QueryClassifier, questions: Sequence[Question]) -> dict[str, float]:
    """Accuracy of ``clf`` on ``questions`` by true kind (from each question's data set)."""
    truth = [kind_of_dataset(q.dataset) for q in questions]
    pred = clf.predict([q.text for q in questions])
    out: dict[str, float] = {}
    for kind in sorted(set(truth)):
        idx = [i for i, t in enumerate(truth) if t == kind]
        out[kind] = float(np.mean([pred[i] == kind for i in idx]))
    out["all"] = float(np.mean([p == t for p, t in zip(pred, truth, strict=True)]))
    return out
