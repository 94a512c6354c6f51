"""Synthetic annotated banks for tests: hidden states written from arrays, no model needed.

* :func:`write_synthetic_annotation` gives any bank a ``hidden/`` annotation whose states a
  function chooses, in the exact format :mod:`env.bank.annotate` writes (manifest, identity
  metadata), so :class:`~env.bank.hidden.HiddenStates` reads it as a real one;
* :func:`planted_bank` writes a bank of training and test questions whose chains are right or
  wrong at random and whose boundary states carry the answer along one planted direction of the
  last layer (and the prompt state the question's pass rate along another): probes should find
  both, and nothing else in the states helps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from env.bank.hidden import (
    HIDDEN_DIR,
    HiddenManifest,
    HiddenStates,
    encode_hidden_file,
    hidden_file,
    hidden_file_identity,
    main_boundaries,
    projection_sha256,
)
from env.bank.store import TraceBank
from env.bank.writer import atomic_write_bytes
from env.types import Question
from features.errors import BankError

if TYPE_CHECKING:
    from env.bank.store import QuestionTrace

__all__ = ["StatesFn", "planted_bank", "write_synthetic_annotation"]

#: ``(question's trace, chain_chunk [n, 2]) -> (prompt [L, dims], boundary [n, L, dims])``.
StatesFn = Callable[["QuestionTrace", np.ndarray], tuple[np.ndarray, np.ndarray]]


def write_synthetic_annotation(
    bank: TraceBank,
    states: StatesFn,
    *,
    layers: Sequence[int] = (2, 4),
    dims: int = 16,
    model_sha256: str = "synthetic",
    hidden_size: int = 64,
    seed: int = 0,
) -> HiddenStates:
    """Write ``bank``'s ``hidden/`` with the states ``states`` gives each recorded question.

    Raises:
        BankError: the bank already has hidden states.
    """
    root = bank.path / HIDDEN_DIR
    if (root / "manifest.json").exists():
        raise BankError(f"{root} exists already")
    manifest = HiddenManifest(
        engine="synthetic",
        model={
            "name": "synthetic",
            "path": "",
            "sha256": model_sha256,
            "num_layers": max(layers),
            "hidden_size": hidden_size,
        },
        bank_id=bank.manifest.bank_id,
        bank_model_sha256=bank.manifest.model.get("sha256", ""),
        dtype="float32",
        layers=list(layers),
        dims=dims,
        projection={
            "kind": "gaussian",
            "seed": seed,
            "sha256": projection_sha256(seed, layers, hidden_size, dims),
        },
    ).fingerprinted()
    atomic_write_bytes(root / "manifest.json", manifest.to_json().encode())
    for i, qid in enumerate(bank.manifest.questions):
        if qid not in bank:
            continue
        qt = bank[qid]
        ids, index = [], []
        for c in qt.chains:
            ids.append(main_boundaries(c.rows)[0])
            index += [
                (c.chain, k) for k, e in zip(c.rows["chunk"], c.rows["ext"], strict=True) if not e
            ]
        chain_chunk = np.asarray(index, dtype=np.int32).reshape(-1, 2)
        prompt, boundary = states(qt, chain_chunk)
        data = encode_hidden_file(
            prompt,
            boundary,
            chain_chunk,
            hidden_file_identity(qid, qt.question, manifest, ids),
        )
        atomic_write_bytes(hidden_file(bank.path, i), data)
    hs = HiddenStates.open(bank.path, bank)
    assert hs is not None
    return hs


def planted_bank(
    path: str | Path,
    *,
    n_train: int = 32,
    n_test: int = 16,
    chains: int = 8,
    layers: Sequence[int] = (2, 4),
    dims: int = 16,
    signal: float = 2.0,
    seed: int = 0,
) -> tuple[TraceBank, HiddenStates]:
    """A bank (``synthetic/train/<i>``, ``synthetic/test/<i>``) with planted hidden states.

    Each question gets a pass rate drawn uniformly; each chain is right with that probability
    (answer ``\\boxed{7}``, gold ``7``) or wrong (``\\boxed{8}``), after 1 to 3 main chunks.
    States are standard normal noise, plus, in the last layer, ``signal * (+1 right, -1 wrong)``
    along coordinate 0 at every boundary of the chain, and in the prompt state of every layer
    ``4 * signal * (pass rate - 0.5)`` along coordinate 1.
    """
    from env.bank.synthetic import SyntheticChunk, write_synthetic_bank

    rng = np.random.default_rng(seed)
    specs = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            q = Question(
                qid=f"synthetic/{split}/{i}",
                text=f"question {split} {i}",
                gold="7",
                dataset="synthetic",
            )
            rate = rng.uniform()
            chain_specs = []
            for _ in range(chains):
                right = rng.uniform() < rate
                steps = [
                    SyntheticChunk(f"step {k}. ", 16, judge_p_yes=float(rng.uniform()))
                    for k in range(int(rng.integers(0, 3)))
                ]
                end = SyntheticChunk(
                    "\\boxed{7}" if right else "\\boxed{8}",
                    8,
                    "stop",
                    judge_p_yes=float(rng.uniform()),
                    confidence=float(rng.uniform(0.5, 1.0)),
                )
                chain_specs.append([*steps, end])
            specs.append((q, chain_specs))
    bank = write_synthetic_bank(path, specs, chains=chains)
    top = len(layers) - 1

    def states(qt: QuestionTrace, chain_chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng([seed, bank.manifest.questions.index(qt.question.qid)])
        rate = float(np.mean([c.correct for c in qt.chains]))
        prompt = r.standard_normal((len(layers), dims))
        prompt[:, 1] += 4 * signal * (rate - 0.5)
        boundary = r.standard_normal((len(chain_chunk), len(layers), dims))
        right = np.array([qt.chains[int(c)].correct for c in chain_chunk[:, 0]])
        boundary[:, top, 0] += signal * np.where(right, 1.0, -1.0)
        return prompt, boundary

    return bank, write_synthetic_annotation(bank, states, layers=layers, dims=dims)
