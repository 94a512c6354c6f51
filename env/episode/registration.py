"""Entry points behind ``gymnasium.make("ponder/ComputeAllocation-v0", ...)`` and ``make_vec``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from env.episode.single import ComputeAllocationEnv
from features.errors import ConfigError

__all__ = ["DEFAULT_BANK", "make_env", "make_vector_env"]

#: The bank an environment replays when neither ``bank`` nor ``generator`` is given.
DEFAULT_BANK = Path(__file__).resolve().parents[2] / "data" / "banks" / "testbed-arith"


def make_env(
    bank: str | Path | None = None,
    *,
    generator: Any = None,
    questions: Any = None,
    split: str | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> ComputeAllocationEnv:
    """A :class:`ComputeAllocationEnv` replaying ``bank`` (default: the shipped testbed bank), or
    running live over ``generator`` on ``questions``."""
    if generator is not None:
        if bank is not None:
            raise ConfigError("pass either bank= (replay) or generator= (live), not both")
        if questions is None:
            raise ConfigError("a live environment needs questions= as well as generator=")
        return ComputeAllocationEnv(generator, questions, **kwargs)
    return ComputeAllocationEnv.from_bank(bank or DEFAULT_BANK, split=split, seed=seed, **kwargs)


def make_vector_env(
    num_envs: int = 1,
    *,
    bank: Any = None,
    split: str | None = None,
    seed: int | None = 0,
    difficulty: Any = None,
    **kwargs: Any,
) -> Any:
    """The batched replay environment (numpy, many episodes at once) over ``bank`` (default: the
    shipped testbed bank), what ``gym.make_vec("ponder/ComputeAllocation-v0", num_envs=...)``
    builds.

    ``split``, ``seed``, ``difficulty`` (``None``, ``"auto"`` or a callable), ``config`` or its
    fields (``lam=...``, ``token_cap=...``) and ``replay_seeds`` go to
    :class:`~env.episode.vector.BatchedReplayEnv`, as ``gym.make`` passes them to ``from_bank``.
    """
    from env.episode.vector import BatchedReplayEnv

    if kwargs.get("generator") is not None or kwargs.get("questions") is not None:
        raise ConfigError(
            "the vector environment replays a bank: pass bank=, not generator= or questions= "
            "(for a live generator, use gym.make or ComputeAllocationEnv)"
        )
    kwargs.pop("generator", None)
    kwargs.pop("questions", None)
    return BatchedReplayEnv(
        bank or DEFAULT_BANK,
        num_envs=num_envs,
        split=split,
        seed=seed,
        difficulty=difficulty,
        **kwargs,
    )
