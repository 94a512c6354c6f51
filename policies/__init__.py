"""Policies: the Policy protocol, fixed heuristics, learned policies, evaluation and tracking.

``policies`` imports ``env`` and ``features``; never ``controller``.
"""

from policies.base import BRANCH, CONTINUE, STOP, VERIFY, BasePolicy, ObsView, Policy
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
