"""Pure functions from what was generated to numbers: answers, confidence, votes, probes.

``features`` imports none of ponder's other packages; they all import from it.
"""

from features.aggregate import (
    confidence_weighted_vote,
    majority_vote,
    verifier_weighted_vote,
    weighted_vote,
)
from features.answers import (
    answers_equal,
    extract_answer,
    extract_boxed,
    group_answers,
    gsm8k_gold,
    is_correct,
    normalize_answer,
    read_probe,
)
from features.confidence import (
    ChainConfidence,
    bottom_percent_confidence,
    chain_confidence,
    group_confidence,
    lowest_group_confidence,
    mean_confidence,
    tail_confidence,
    token_confidence,
    token_entropy,
)
from features.errors import (
    AnswerError,
    BankError,
    BudgetExhausted,
    Cancelled,
    ConfigError,
    GeneratorError,
    ModelError,
    PolicyError,
    PonderError,
)
from features.probes import (
    DEFAULT_SWITCH_WORDS,
    probe_stability,
    probe_streak,
    switch_count,
    verifier_stats,
)
from features.votes import (
    beta_leader_probability,
    dirichlet_leader_probability,
    esc_window_agrees,
    leader,
    n_distinct,
    vote_counts,
    vote_margin,
)

__all__ = [
    "DEFAULT_SWITCH_WORDS",
    "AnswerError",
    "BankError",
    "BudgetExhausted",
    "Cancelled",
    "ChainConfidence",
    "ConfigError",
    "GeneratorError",
    "ModelError",
    "PolicyError",
    "PonderError",
    "answers_equal",
    "beta_leader_probability",
    "bottom_percent_confidence",
    "chain_confidence",
    "confidence_weighted_vote",
    "dirichlet_leader_probability",
    "esc_window_agrees",
    "extract_answer",
    "extract_boxed",
    "group_answers",
    "group_confidence",
    "gsm8k_gold",
    "is_correct",
    "leader",
    "lowest_group_confidence",
    "majority_vote",
    "mean_confidence",
    "n_distinct",
    "normalize_answer",
    "probe_stability",
    "probe_streak",
    "read_probe",
    "switch_count",
    "tail_confidence",
    "token_confidence",
    "token_entropy",
    "verifier_stats",
    "verifier_weighted_vote",
    "vote_counts",
    "vote_margin",
    "weighted_vote",
]
