"""Policies: the Policy protocol, fixed heuristics, learned policies, evaluation and tracking.

``policies`` imports ``env`` and ``features``; never ``controller``. MLflow is heavy to import:
the tracking names (``Tracker``, ``log_policy_model``, ``PolicyModel``) load it on first use.
"""

from typing import Any

from policies.base import BRANCH, CONTINUE, STOP, VERIFY, BasePolicy, ObsView, Policy
from policies.evaluation.headline import headline
from policies.evaluation.oracle import OracleResult, oracle
from policies.evaluation.runner import EvalResult, Evaluator, evaluate
from policies.evaluation.sweeps import Family, heuristic_sweeps, learned_sweep
from policies.heuristics import (
    AdaptiveConsistency,
    BestOfN,
    BoundedThinking,
    BudgetForcing,
    DeepConfOnline,
    DifficultyRouter,
    EarlyStoppingSC,
    ProbeAgreement,
    RandomPolicy,
    SingleChain,
)

__all__ = [
    "BRANCH",
    "CONTINUE",
    "STOP",
    "VERIFY",
    "AdaptiveConsistency",
    "EvalResult",
    "Evaluator",
    "Family",
    "OracleResult",
    "PolicyModel",
    "Tracker",
    "evaluate",
    "headline",
    "heuristic_sweeps",
    "learned_sweep",
    "log_policy_model",
    "oracle",
    "BasePolicy",
    "BestOfN",
    "BoundedThinking",
    "BudgetForcing",
    "DeepConfOnline",
    "DifficultyRouter",
    "EarlyStoppingSC",
    "ObsView",
    "Policy",
    "ProbeAgreement",
    "RandomPolicy",
    "SingleChain",
]

_LAZY = {
    "Tracker": "policies.tracking",
    "log_policy_model": "policies.tracking",
    "PolicyModel": "policies.pyfunc",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'policies' has no attribute {name!r}")
