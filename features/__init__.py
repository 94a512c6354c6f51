"""Pure functions from what was generated to numbers: answers, confidence, votes, probes.

``features`` imports none of ponder's other packages; they all import from it.
"""

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
from features.errors import (
    AnswerError,
    BankError,
    BudgetExhausted,
    ConfigError,
    GeneratorError,
    ModelError,
    PolicyError,
    PonderError,
)

__all__ = [
    "AnswerError",
    "BankError",
    "BudgetExhausted",
    "ConfigError",
    "GeneratorError",
    "ModelError",
    "PolicyError",
    "PonderError",
    "answers_equal",
    "extract_answer",
    "extract_boxed",
    "group_answers",
    "gsm8k_gold",
    "is_correct",
    "normalize_answer",
    "read_probe",
]
