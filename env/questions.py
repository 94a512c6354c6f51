"""Question sets shipped in ``data/``: GSM8K, MATH-500, HumanEval and the testbed's synthetic
arithmetic.

Every loader returns :class:`env.types.Question` records with stable ids, a gold
answer and, where one can be had, a difficulty level:

- GSM8K has no official levels; its difficulty is the number of calculation steps in the
  reference solution (the ``<<...>>`` annotations), capped at 6: a common proxy.
- MATH-500 carries MATH's level 1-5.
- The testbed's levels are its own knob (:data:`env.models.testbed.task.LEVELS`).
- HumanEval (:mod:`env.code.humaneval`) has none; its gold answer is the reference solution's
  behaviour on the prompt's visible calls (:mod:`env.code.reference`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from env.types import Question
from features.errors import ConfigError

__all__ = [
    "DATA_DIR",
    "load_gsm8k",
    "load_math500",
    "load_factual",
    "factual_split",
    "factual_accepted",
    "math500_split",
    "load_testbed",
    "load_questions",
    "gsm8k_steps",
    "SPLITS",
    "take_subset",
    "DEV_FRACTION",
    "question_split",
    "select_split",
    "training_split",
]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_steps(answer_field: str) -> int:
    """Number of calculation steps in a GSM8K reference solution (at least 1)."""
    return max(1, len(_CALC.findall(answer_field)))


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        raise ConfigError(
            f"question file {path} is missing: it ships in the repository's data/ folder"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def take_subset(items: list[Question], n: int | None, seed: int | None) -> list[Question]:
    """The first ``n`` of ``items`` (all for None), after a shuffle seeded by ``seed`` (none
    for None): how every question set draws a subset."""
    if n is not None and n < 0:
        raise ConfigError(f"number of questions must be >= 0, got {n}")
    if seed is not None:
        items = list(items)
        random.Random(seed).shuffle(items)
    return items if n is None else items[:n]


def load_gsm8k(
    split: str = "test", n: int | None = None, *, seed: int | None = None
) -> list[Question]:
    """GSM8K questions (``split`` is ``train`` or ``test``), optionally a seeded random subset."""
    if split not in ("train", "test"):
        raise ConfigError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    from features.answers import gsm8k_gold

    rows = _read_jsonl(DATA_DIR / "gsm8k" / f"{split}.jsonl")
    items = [
        Question(
            qid=f"gsm8k/{split}/{i}",
            text=str(r["question"]),
            gold=gsm8k_gold(str(r["answer"])),
            dataset="gsm8k",
            difficulty=min(6, gsm8k_steps(str(r["answer"]))),
        )
        for i, r in enumerate(rows)
    ]
    return take_subset(items, n, seed)


def math500_split(unique_id: str) -> str:
    """MATH-500 ships as one set: a fixed half of it (by the sha256 of the problem's id) is the
    ``train`` split here, the rest ``test``."""
    return "train" if hashlib.sha256(unique_id.encode()).digest()[0] < 128 else "test"


def load_math500(
    split: str | None = "test", n: int | None = None, *, seed: int | None = None
) -> list[Question]:
    """MATH-500 questions with MATH's level as difficulty: the ``train`` or ``test`` half
    (:func:`math500_split`; None for all 500). Ids read ``math500/<split>/<subject>/<number>``."""
    if split not in ("train", "test", None):
        raise ConfigError(f"MATH-500 split must be 'train', 'test' or None, got {split!r}")
    rows = _read_jsonl(DATA_DIR / "math" / "math500_test.jsonl")
    items = []
    for i, r in enumerate(rows):
        uid = str(r.get("unique_id", i))
        half = math500_split(uid)
        if split is not None and half != split:
            continue
        name = uid.removeprefix("test/").removesuffix(".json")
        items.append(
            Question(
                qid=f"math500/{half}/{name}",
                text=str(r["problem"]),
                gold=str(r["answer"]),
                dataset="math500",
                difficulty=int(str(r["level"])) if "level" in r else None,
            )
        )
    return take_subset(items, n, seed)


_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCT = re.compile(r"[^\w\s]")


def factual_split(question: str) -> str:
    """NQ-Open ships one set here: a fixed half of it (by the sha256 of the question) is the
    ``train`` split, the rest ``test``."""
    return "train" if hashlib.sha256(question.encode()).digest()[0] < 128 else "test"


def _aliases(answers: Sequence[str]) -> tuple[str, ...]:
    """The canonical forms a factual answer may take: each alias as the answer normaliser reads
    it, and again after SQuAD's normalisation (lower case, no punctuation, no articles)."""
    from features.answers import normalize_answer

    out: list[str] = []
    for a in answers:
        for form in (a, " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", a.lower())).split())):
            key = normalize_answer(form)
            if key is not None and key not in out:
                out.append(key)
    return tuple(out)


def load_factual(
    split: str | None = "test", n: int | None = None, *, seed: int | None = None
) -> list[Question]:
    """Short factual questions: NQ-Open's 3,610 (CC BY-SA 3.0, ``data/factual/LICENSE``), the
    ``train`` or ``test`` half (:func:`factual_split`; None for all). The gold answer is the
    first alias; any alias counts as right (``Question.accepted``: exact match after
    normalisation, so a longer or shorter name is wrong, as in NQ-Open's own scoring)."""
    if split not in ("train", "test", None):
        raise ConfigError(f"factual split must be 'train', 'test' or None, got {split!r}")
    rows = _factual_rows()
    items = []
    for i, r in enumerate(rows):
        text = str(r["question"]).strip()
        half = factual_split(text)
        if split is not None and half != split:
            continue
        answers = [str(a) for a in r["answers"]]  # type: ignore[attr-defined]
        items.append(
            Question(
                qid=f"factual/{half}/{i}",
                text=text[:1].upper() + text[1:] + ("" if text.endswith("?") else "?"),
                gold=answers[0],
                dataset="factual",
                accepted=_aliases(answers),
            )
        )
    return take_subset(items, n, seed)


def factual_accepted(qid: str) -> tuple[str, ...] | None:
    """The accepted answers of factual question ``qid`` (``factual/<split>/<row>``), from the
    shipped file: a bank stores questions without them (:mod:`env.bank.store` adds them back).
    None for an id that is not a factual question's."""
    parts = qid.split("/")
    if len(parts) != 3 or parts[0] != "factual" or not parts[2].isdigit():
        return None
    rows = _factual_rows()
    i = int(parts[2])
    return _aliases([str(a) for a in rows[i]["answers"]]) if i < len(rows) else None  # type: ignore[attr-defined]


@lru_cache(maxsize=1)
def _factual_rows() -> list[dict[str, object]]:
    return _read_jsonl(DATA_DIR / "factual" / "nq_open.jsonl")


def load_testbed(split: str = "test", per_level: int = 25, *, seed: int = 0) -> list[Question]:
    """The testbed's synthetic questions, ``per_level`` at each difficulty level."""
    from env.models.testbed.task import make_questions

    return [q for q, _ in make_questions(per_level, seed=seed, split=split)]


def load_questions(
    dataset: str, split: str = "test", n: int | None = None, *, seed: int | None = None
) -> list[Question]:
    """Load by name: ``gsm8k``, ``math500``, ``humaneval`` (code, :mod:`env.code`) or
    ``arith`` (the testbed task)."""
    if dataset == "gsm8k":
        return load_gsm8k(split, n, seed=seed)
    if dataset == "math500":
        return load_math500(split, n, seed=seed)
    if dataset == "arith":
        per_level = 25 if n is None else max(1, -(-n // 8))
        return load_testbed(split, per_level, seed=seed or 0)[: n if n is not None else None]
    if dataset == "factual":
        return load_factual(split, n, seed=seed)
    if dataset == "humaneval":
        from env.code.humaneval import load_humaneval
        from env.code.reference import reference_answers

        return load_humaneval(split, n, seed=seed, golds=reference_answers())
    raise ConfigError(
        f"unknown dataset {dataset!r}; choose gsm8k, math500, humaneval, factual or arith"
    )


SPLITS = ("train", "test", "fit", "dev")
"""Question splits: a bank's own ``train`` and ``test``, and the training questions cut in two
for tuning without the test questions: ``dev`` (a quarter of them, :data:`DEV_FRACTION`) and
``fit`` (the rest)."""

DEV_FRACTION = 0.25
"""Share of the training questions in the ``dev`` split."""


def question_split(q: Question) -> str:
    """``train`` / ``test`` from a question id such as ``gsm8k/test/17`` (``""`` if none)."""
    parts = q.qid.split("/")
    return parts[1] if len(parts) > 1 and parts[1] in ("train", "test") else ""


def _id_hash(qid: str) -> bytes:
    return hashlib.sha256(qid.encode()).digest()


def select_split(questions: Sequence[Question], split: str | None) -> list[Question]:
    """The questions of ``split`` (one of :data:`SPLITS`; all of them for ``None`` or ``""``),
    in their order.

    ``dev`` and ``fit`` partition the ``train`` questions among ``questions`` (pass all of a
    bank's): ``dev`` is a quarter of them (at least one, of two or more), stratified by
    difficulty: the questions are ordered by difficulty level and, within a level, by the
    sha256 of their id, and ``dev`` takes evenly spaced ones, so each level gives it its share
    (a cut by hash alone gave testbed-arith-xl a dev quarter with 3 of its 40 questions from
    the two hardest levels, which hold a quarter of the bank). The cut is the same on every
    machine and does not depend on the order the questions were recorded in; ``fit`` is the
    rest.
    """
    if not split:
        return list(questions)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split in ("train", "test"):
        return [q for q in questions if question_split(q) == split]
    train = [q for q in questions if question_split(q) == "train"]
    n_dev = max(1, round(DEV_FRACTION * len(train))) if len(train) >= 2 else 0
    ordered = sorted(
        train, key=lambda q: (q.difficulty is None, q.difficulty or 0, _id_hash(q.qid))
    )
    dev = {ordered[int((i + 0.5) * len(ordered) / n_dev)].qid for i in range(n_dev)}
    return [q for q in train if (q.qid in dev) == (split == "dev")]


def training_split(split: str | None) -> str:
    """The split policies evaluated on ``split`` train on: ``fit`` for ``dev`` (and ``fit``),
    else ``train``."""
    return "fit" if split in ("fit", "dev") else "train"
