"""The one exception hierarchy of ponder.

Every error ponder raises on purpose derives from :class:`PonderError`, so a caller can catch
everything ponder-specific with one clause. Messages say what was wrong and how to fix it.

It lives in ``features`` because that is the lowest package: ``env``, ``policies`` and
``controller`` all import it from here (and re-export it).
"""

from __future__ import annotations

__all__ = [
    "PonderError",
    "ConfigError",
    "GeneratorError",
    "UpstreamDown",
    "Cancelled",
    "ModelError",
    "BankError",
    "BudgetExhausted",
    "AnswerError",
    "PolicyError",
]


class PonderError(Exception):
    """Base class of every error ponder raises on purpose."""


class ConfigError(PonderError, ValueError):
    """An argument or configuration value is invalid (for example ``k <= 0`` or an empty question)."""


class GeneratorError(PonderError):
    """The generator could not produce what was asked (engine failure, server down, timeout)."""


class UpstreamDown(GeneratorError):
    """A model server could not be reached or kept failing (connection refused or lost, 5xx
    answers) after its retries: the server, not the request, is at fault (a fleet fails over)."""


class Cancelled(GeneratorError):
    """The work was cancelled before the generator finished it (the client that asked left, or a
    latency cap gave up on it): in-flight engine requests were closed, no new ones were sent."""


class ModelError(PonderError):
    """A model path is missing, unreadable, not a causal LM, or does not match its checksum."""


class BankError(PonderError):
    """A trace bank is missing, corrupt, of an unknown schema version or inconsistent."""


class BudgetExhausted(PonderError):
    """A request asked for more than a budget or a recorded bank holds."""


class AnswerError(PonderError, ValueError):
    """An answer could not be parsed or compared."""


class PolicyError(PonderError):
    """A policy file is missing, of an unknown format, or does not match the features it is given."""
