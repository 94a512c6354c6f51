"""Policy specs: the short names ``ponder serve --policy`` and the controller accept.

A spec names a fixed heuristic of :mod:`policies.heuristics` and its parameters, spelled as the
policy's own ``name`` (so ``load_policy(p.name).name == p.name`` for every heuristic):

| spec | policy |
|---|---|
| ``single`` | :class:`~policies.heuristics.SingleChain` |
| ``best-of-N``, ``best-of-N-confidence``, ``best-of-N-verifier`` | :class:`~policies.heuristics.BestOfN` |
| ``s1-B`` | :class:`~policies.heuristics.BudgetForcing` with a budget of ``B`` tokens |
| ``adaptive-consistency[-T]`` | :class:`~policies.heuristics.AdaptiveConsistency`, threshold ``T`` (0.95) |
| ``esc[-4]`` | :class:`~policies.heuristics.EarlyStoppingSC` |
| ``probe-agree[-K]`` | :class:`~policies.heuristics.ProbeAgreement`, ``K`` agreeing probes (3) |
| ``deepconf-online[-P]`` | :class:`~policies.heuristics.DeepConfOnline`, keep ``P`` percent (90) |
| ``router[-E-H]`` | :class:`~policies.heuristics.DifficultyRouter`, thresholds ``E`` and ``H`` (0.3, 0.7) |
| ``bounded[-S-M]`` | :class:`~policies.heuristics.BoundedThinking`, start ``S``, max ``M`` tokens (64, 512) |
| ``random[-SEED]`` | :class:`~policies.heuristics.RandomPolicy` |

A path names a learned policy folder saved by ``policy.save(folder)``
(:mod:`policies.learned`: ``policy.json`` beside safetensors weights), or its ``policy.json``.
Only that format is loaded, never pickle; a folder trained on other features is refused.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from env.episode.observation import N_FEATURES
from features.errors import PolicyError
from policies.base import Policy
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

__all__ = ["EXAMPLES", "LEARNED_SUFFIXES", "check_policy", "load_policy", "parse_policy_spec"]

_NUM = r"(\d+(?:\.\d+)?)"
_INT = r"(\d+)"

#: One example per family, for error messages and ``--help``.
EXAMPLES: tuple[str, ...] = (
    "single",
    "best-of-4",
    "best-of-8-confidence",
    "best-of-4-verifier",
    "s1-256",
    "adaptive-consistency",
    "adaptive-consistency-0.9",
    "esc-4",
    "probe-agree-3",
    "deepconf-online-90",
    "router-0.3-0.7",
    "bounded-64-512",
    "random-0",
)

#: File suffixes of ponder's own learned-policy formats (JSON header + safetensors / npz weights).
LEARNED_SUFFIXES: tuple[str, ...] = (".json", ".safetensors", ".npz")
#: Formats that can run code when loaded: always refused.
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".ckpt", ".bin", ".zip")


def _best_of(n: str, agg: str | None) -> Policy:
    return BestOfN(int(n), agg or "majority")  # type: ignore[arg-type]


_RULES: tuple[tuple[re.Pattern[str], Callable[..., Policy]], ...] = tuple(
    (re.compile(rf"^{pattern}$"), make)
    for pattern, make in (
        ("single", lambda: SingleChain()),
        (rf"best-of-{_INT}(?:-(majority|confidence|verifier))?", _best_of),
        (rf"s1-{_INT}", lambda b: BudgetForcing(int(b))),
        (
            rf"adaptive-consistency(?:-{_NUM})?",
            lambda t: AdaptiveConsistency(float(t)) if t else AdaptiveConsistency(),
        ),
        (r"esc(?:-4)?", lambda: EarlyStoppingSC()),
        (rf"probe-agree(?:-{_INT})?", lambda k: ProbeAgreement(int(k)) if k else ProbeAgreement()),
        (
            rf"deepconf-online(?:-{_NUM})?",
            lambda p: DeepConfOnline(keep_percent=float(p)) if p else DeepConfOnline(),
        ),
        (
            rf"router(?:-{_NUM}-{_NUM})?",
            lambda e, h: DifficultyRouter(float(e), float(h)) if e else DifficultyRouter(),
        ),
        (
            rf"bounded(?:-{_INT}-{_INT})?",
            lambda s, m: BoundedThinking(int(s), int(m)) if s else BoundedThinking(),
        ),
        (rf"random(?:-{_INT})?", lambda s: RandomPolicy(int(s)) if s else RandomPolicy()),
    )
)


def parse_policy_spec(spec: str) -> Policy:
    """The heuristic policy a spec names (see the module docstring).

    Raises:
        PolicyError: an unknown name, or parameters the policy rejects.
    """
    text = spec.strip().lower()
    for pattern, make in _RULES:
        m = pattern.match(text)
        if m is None:
            continue
        try:
            return make(*m.groups())
        except PolicyError:
            raise
        except Exception as exc:  # ConfigError from the policy's own checks, bad numbers
            raise PolicyError(f"policy spec {spec!r}: {exc}") from exc
    hint = difflib.get_close_matches(text, EXAMPLES, n=1, cutoff=0.5)
    maybe = f"did you mean {hint[0]!r}? " if hint else ""
    raise PolicyError(
        f"unknown policy {spec!r}; {maybe}use a heuristic such as {', '.join(EXAMPLES)} "
        "(see controller.policy_spec)"
    )


def check_policy(policy: Policy) -> Policy:
    """Act once on an all-zero observation, so that a policy that cannot run on this env's
    features (one it does not know, a wrong shape) fails at startup, not on the first request.

    Raises:
        PolicyError: the policy cannot act.
    """
    name = getattr(policy, "name", type(policy).__name__)
    try:
        policy.reset(1)
        policy.act(np.zeros(N_FEATURES, dtype=np.float32))
        policy.reset(1)
    except Exception as exc:
        raise PolicyError(
            f"policy {name!r} cannot act on this environment's observation "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return policy


def load_policy(spec: str) -> Policy:
    """A policy from a heuristic spec or a learned policy folder.

    Paths are recognised by a path separator, a file suffix, or an existing folder holding a
    ``policy.json``. Only ponder's own format (JSON + safetensors) is loaded, never pickle.

    Raises:
        PolicyError: an unknown spec, a pickle-based file, a file that is not a ponder policy
            (or was trained on other features), or a policy that cannot act on the env's
            observation.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PolicyError("a policy spec must be a non-empty string such as 'best-of-4'")
    path = Path(spec)
    suffix = path.suffix.lower()
    looks_like_file = "/" in spec or "\\" in spec or suffix in LEARNED_SUFFIXES + _PICKLE_SUFFIXES
    policy_dir = path.is_dir() and (path / "policy.json").is_file()
    if looks_like_file or path.is_file() or policy_dir:
        if suffix in _PICKLE_SUFFIXES:
            raise PolicyError(
                f"refusing to load {spec}: ponder never loads pickle-based files (they can run "
                f"code); save learned policies as JSON + safetensors or npz"
            )
        if not path.exists():
            raise PolicyError(f"no policy file at {spec}: give a heuristic spec or a policy file")
        from policies.learned import load_policy as load_learned

        return check_policy(load_learned(path))
    return check_policy(parse_policy_spec(spec))
