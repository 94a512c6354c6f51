"""Probes on the generating model's hidden states (the bank's ``hidden/``, :mod:`env.bank.hidden`).

Two linear probes, fitted on a bank's training questions with every choice made on ``dev``:

- **difficulty**: the question's pass rate from the state at the prompt's last token;
- **chain correctness**: whether a chain's final answer will be right, from the state at any
  main chunk boundary (and at ended ones, and, if ``dev`` says so, how far into its budget the
  open chain is and its token confidence so far).

``data.py`` gathers the rows, ``model.py`` is the fitted probe with its schema and its safe file
format (JSON + safetensors), ``fit.py`` fits and chooses. They live in ``env`` because the
environment will read them as observation features (``env`` never imports ``policies``); the
report that compares them with the signals ponder had before is
:mod:`policies.evaluation.probes` (``ponder probes BANK``).
"""

from __future__ import annotations

from env.probes.data import (
    BOUNDARY_EXTRAS,
    BoundarySet,
    PromptSet,
    boundary_extras,
    boundary_set,
    prompt_set,
)
from env.probes.fit import (
    ALPHA_GRID,
    C_GRID,
    EXTRA_CHOICES,
    EXTRAS_WEIGHTS,
    DevScore,
    ProbeFit,
    auroc,
    best_of,
    cross_fit,
    fit_chain_like,
    fit_chain_probe,
    fit_difficulty_probe,
    fit_probes,
    layer_choices,
    spearman,
    within_auroc,
)
from env.probes.model import KINDS, LinearProbe, ProbeSchema

__all__ = [
    "ALPHA_GRID",
    "BOUNDARY_EXTRAS",
    "C_GRID",
    "EXTRAS_WEIGHTS",
    "EXTRA_CHOICES",
    "KINDS",
    "BoundarySet",
    "DevScore",
    "LinearProbe",
    "ProbeFit",
    "ProbeSchema",
    "PromptSet",
    "auroc",
    "best_of",
    "boundary_extras",
    "boundary_set",
    "cross_fit",
    "fit_chain_like",
    "fit_chain_probe",
    "fit_difficulty_probe",
    "fit_probes",
    "layer_choices",
    "prompt_set",
    "spearman",
    "within_auroc",
]
