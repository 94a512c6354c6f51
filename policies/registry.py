"""The policy registry: one grammar names every policy, and :func:`load_policy` builds it.

``ponder serve --policy``, ``ponder evaluate``, the main job's sweeps, the MLflow model
(:mod:`policies.pyfunc`) and ``bench/`` all go through :func:`load_policy`. A spec is a heuristic's
name or the path of a saved policy.

## Heuristic names

A heuristic's name spells its parameters, and the policy's own ``name`` is the canonical spelling,
so ``load_policy(p.name).name == p.name`` for every heuristic. Case and surrounding spaces do not
matter; a part in brackets may be left out (it then takes the default in parentheses).

| spec | policy |
|---|---|
| ``single`` | :class:`~policies.heuristics.SingleChain` |
| ``best-of-N[-AGG]`` | :class:`~policies.heuristics.BestOfN`: ``N`` chains, vote ``AGG`` = ``majority`` (default), ``confidence``, ``verifier``, ``probe`` (weighted by the hidden-state probe's P(right)) or ``probe-best`` (the chain it rates highest) |
| ``s1-B`` | :class:`~policies.heuristics.BudgetForcing`: a budget of ``B`` tokens |
| ``adaptive-consistency[-T]`` | :class:`~policies.heuristics.AdaptiveConsistency`: threshold ``T`` (0.95), up to ``max_chains`` chains |
| ``esc[-4][-maxM]`` | :class:`~policies.heuristics.EarlyStoppingSC`: windows of 4, up to ``M`` chains (16) |
| ``verify-stop[-T][-maxM]`` | :class:`~policies.heuristics.VerifyStop`: stop at the first chain whose verifier score is >= ``T`` (1), up to ``M`` chains (16) |
| ``probe-stop[-T]`` | :class:`~policies.heuristics.ProbeStop`: LYNX-style, stop once the current chain's P(right) >= ``T`` (0.8) |
| ``probe-agree[-K]`` | :class:`~policies.heuristics.ProbeAgreement`: ``K`` agreeing probes (3) |
| ``deepconf-online[-P]`` | :class:`~policies.heuristics.DeepConfOnline`: keep ``P`` percent (90), ``min(4, max_chains)`` warm-up chains, up to ``max_chains`` |
| ``router[-E-H]`` | :class:`~policies.heuristics.DifficultyRouter`: thresholds ``E`` and ``H`` (0.3, 0.7), ``min(4, max_chains)`` chains when medium |
| ``bounded[-S-M]`` | :class:`~policies.heuristics.BoundedThinking`: start ``S``, at most ``M`` tokens (64, 512) |
| ``random[-SEED]`` | :class:`~policies.heuristics.RandomPolicy`: seed ``SEED`` (0) |

``N``, ``B``, ``M``, ``K``, ``S`` and ``SEED`` are whole numbers; ``T``, ``P``, ``E`` and ``H``
may have decimals. ``max_chains`` is that of the env settings passed as ``config`` (16 without:
``ponder evaluate`` passes the bank's, ``ponder serve`` none). The one name that does not spell
all its parameters is ``random``'s (the seed is left out).

## Saved policies

A spec with a path separator, one of ponder's file suffixes (``.json``, ``.safetensors``,
``.npz``) or a pickle-like one, or naming a folder that holds ``policy.json`` or
``heuristic.json``, is a saved policy (a ``pathlib.Path`` always is):

* a learned policy's folder (``policy.save(folder)``: ``policy.json`` + ``weights.safetensors``,
  :mod:`policies.learned`), or its ``policy.json``; one trained on other features is refused;
* a heuristic's folder (:func:`save_policy`: ``heuristic.json``, its class and constructor
  parameters), or its ``heuristic.json``. The policy's name is the one its parameters spell: a
  file whose ``name`` says otherwise (edited by hand, or damaged) is refused rather than served
  under a name that is not what runs; a file without a ``name`` gets the canonical one.

Nothing is ever unpickled: pickle-like files (``.pkl``, ``.pt``, ``.joblib``, ...) are refused
by name, before they are opened.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from env.episode.config import EnvConfig
from env.episode.observation import N_FEATURES
from features.errors import PolicyError
from policies import heuristics
from policies.base import Policy, Saveable
from policies.serialize import PICKLE_SUFFIXES, POLICY_JSON

__all__ = [
    "EXAMPLES",
    "HEURISTIC_FILE",
    "check_policy",
    "heuristic_to_json",
    "load_policy",
    "save_policy",
]

#: A saved heuristic's file: its class and constructor parameters.
HEURISTIC_FILE = "heuristic.json"

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
    "verify-stop-1-max8",
    "probe-agree-3",
    "deepconf-online-90",
    "router-0.3-0.7",
    "bounded-64-512",
    "random-0",
)

#: File suffixes of ponder's own formats (JSON headers, safetensors / npz weights).
_SAVED_SUFFIXES = (".json", ".safetensors", ".npz")


def _int(name: str) -> str:
    return rf"(?P<{name}>\d+)"


def _num(name: str) -> str:
    return rf"(?P<{name}>\d+(?:\.\d+)?)"


@dataclass(frozen=True)
class _Family:
    """One heuristic's spelling: a pattern whose named groups are constructor arguments, and the
    arguments that follow the env's ``max_chains`` rather than the name."""

    cls: Callable[..., Policy]
    pattern: str
    caps: Callable[[int], dict[str, int]] = lambda max_chains: {}


# The caps are those the main job's sweeps have always used: as many chains as the env allows,
# and the warm-up / medium groups at their default 4 unless the env allows fewer.
_FAMILIES: tuple[_Family, ...] = (
    _Family(heuristics.SingleChain, "single"),
    _Family(
        heuristics.BestOfN,
        rf"best-of-{_int('n')}(?:-(?P<aggregate>majority|confidence|verifier|probe-best|probe))?",
    ),
    _Family(heuristics.BudgetForcing, rf"s1-{_int('budget')}"),
    _Family(
        heuristics.AdaptiveConsistency,
        rf"adaptive-consistency(?:-{_num('threshold')})?",
        lambda mc: {"max_n": mc},
    ),
    _Family(
        heuristics.ProbeStop,
        rf"probe-stop(?:-{_num('threshold')})?",
        lambda mc: {"max_n": mc},
    ),
    _Family(heuristics.EarlyStoppingSC, rf"esc(?:-4)?(?:-max{_int('max_n')})?"),
    _Family(
        heuristics.VerifyStop, rf"verify-stop(?:-{_num('threshold')})?(?:-max{_int('max_n')})?"
    ),
    _Family(heuristics.ProbeAgreement, rf"probe-agree(?:-{_int('k')})?"),
    _Family(
        heuristics.DeepConfOnline,
        rf"deepconf-online(?:-{_num('keep_percent')})?",
        lambda mc: {"n_init": min(4, mc), "max_n": mc},
    ),
    _Family(
        heuristics.DifficultyRouter,
        rf"router(?:-{_num('easy')}-{_num('hard')})?",
        lambda mc: {"n_medium": min(4, mc)},
    ),
    _Family(heuristics.BoundedThinking, rf"bounded(?:-{_int('start')}-{_int('max_budget')})?"),
    _Family(heuristics.RandomPolicy, rf"random(?:-{_int('seed')})?"),
)
_RULES = tuple((re.compile(rf"^{f.pattern}$"), f) for f in _FAMILIES)


def _value(text: str) -> int | float | str:
    """A matched group as the constructor takes it: a whole number, a decimal, or a word."""
    if text.isdigit():
        return int(text)
    return float(text) if text[:1].isdigit() else text


def _heuristic(spec: str, max_chains: int) -> Policy | None:
    """The heuristic ``spec`` names, or ``None`` if it names none."""
    text = spec.strip().lower()
    for pattern, fam in _RULES:
        m = pattern.match(text)
        if m is None:
            continue
        kwargs = {k: _value(v) for k, v in m.groupdict().items() if v is not None}
        try:
            return fam.cls(**fam.caps(max_chains), **kwargs)
        except PolicyError:
            raise
        except Exception as exc:  # ConfigError from the policy's own checks
            raise PolicyError(f"policy spec {spec!r}: {exc}") from exc
    return None


def load_policy(spec: str | os.PathLike[str], *, config: EnvConfig | None = None) -> Policy:
    """The policy a spec names: a heuristic's name or a saved policy (see the module docstring).

    Args:
        spec: the name or path.
        config: the env settings the policy will act under: heuristics that cap their chains
            take its ``max_chains`` (default: :class:`~env.episode.config.EnvConfig`'s).

    Raises:
        PolicyError: an unknown name (with the nearest known one), parameters the heuristic
            rejects, a pickle-like file, or a path that is not a ponder policy (none there, a
            damaged file, one trained on other features).
    """
    if isinstance(spec, os.PathLike):
        return _load_saved(Path(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise PolicyError("a policy spec must be a non-empty string such as 'best-of-4'")
    path = Path(spec)
    suffix = path.suffix.lower()
    saved = (path / POLICY_JSON).is_file() or (path / HEURISTIC_FILE).is_file()
    if "/" in spec or "\\" in spec or suffix in _SAVED_SUFFIXES + PICKLE_SUFFIXES or saved:
        return _load_saved(path)
    max_chains = (config or EnvConfig()).max_chains
    policy = _heuristic(spec, max_chains)
    if policy is not None:
        return policy
    if path.is_dir():
        raise PolicyError(
            f"{spec} is a folder without {POLICY_JSON} or {HEURISTIC_FILE}: give a saved "
            "policy's folder (policy.save(folder)) or a heuristic's name"
        )
    text = spec.strip().lower()
    hint = difflib.get_close_matches(text, EXAMPLES, n=1, cutoff=0.5)
    maybe = f"did you mean {hint[0]!r}? " if hint else ""
    raise PolicyError(
        f"unknown policy {spec!r}; {maybe}name a heuristic such as {', '.join(EXAMPLES)} "
        "(other numbers work too; the grammar is in policies.registry) or give a saved "
        "policy's folder"
    )


def _load_saved(path: Path) -> Policy:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PolicyError(
            f"refusing to load {path}: ponder never loads pickle-based files (they can run "
            "code); save learned policies with policy.save(folder) (JSON + safetensors)"
        )
    if not path.exists():
        raise PolicyError(
            f"no policy file at {path}: give a heuristic's name or a saved policy's folder"
        )
    heuristic = path if path.name == HEURISTIC_FILE else path / HEURISTIC_FILE
    if heuristic.is_file():
        try:
            return _heuristic_from_json(_read_json(heuristic))
        except PolicyError as e:
            if str(heuristic) in str(e):
                raise
            raise PolicyError(f"{heuristic}: {e}") from e
    from policies.learned import load_policy as load_learned  # (imports torch: only here)

    return load_learned(path)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(
            f"cannot read {path} as UTF-8 text ({e}): save the policy again with "
            "policies.registry.save_policy"
        ) from e
    try:
        return json.loads(text)
    except RecursionError:
        raise PolicyError(
            f"{path} is not a policy file: its JSON nests too deeply to read; save the policy "
            "again with policies.registry.save_policy"
        ) from None
    except ValueError as e:  # JSONDecodeError, or a number Python refuses (4300+ digits)
        raise PolicyError(
            f"{path} is not valid JSON ({e}): fix it, or save the policy again with "
            "policies.registry.save_policy"
        ) from e


def save_policy(policy: Policy, folder: str | os.PathLike[str]) -> Path:
    """Write ``policy`` to ``folder`` so that :func:`load_policy` reads it back: a learned
    policy in its own format (:class:`~policies.base.Saveable`), a heuristic as
    ``heuristic.json``. Returns the folder."""
    out = Path(folder)
    if isinstance(policy, Saveable):
        return policy.save(out)
    data = heuristic_to_json(policy)
    out.mkdir(parents=True, exist_ok=True)
    (out / HEURISTIC_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return out


#: Constructor arguments a heuristic keeps under another attribute name.
_ALIASES = {("BestOfN", "n"): "n_chains"}


def heuristic_to_json(policy: Policy) -> dict[str, Any]:
    """A fixed heuristic as JSON data: its class, the constructor arguments it keeps, its name
    (what ``heuristic.json`` holds; two heuristics are the same policy when these are equal).

    Raises:
        PolicyError: ``policy`` is not one of :mod:`policies.heuristics`.
    """
    cls = type(policy).__name__
    if cls not in heuristics.__all__ or getattr(heuristics, cls) is not type(policy):
        raise PolicyError(f"{policy!r} is not one of ponder's fixed heuristics")
    params: dict[str, Any] = {}
    for name in list(inspect.signature(type(policy).__init__).parameters)[1:]:
        value = vars(policy).get(_ALIASES.get((cls, name), name))
        if isinstance(value, bool | int | float | str):
            params[name] = value
    return {
        "kind": "ponder.heuristic",
        "version": 1,
        "class": cls,
        "params": params,
        "name": policy.name,
    }


def _heuristic_from_json(data: Mapping[str, Any]) -> Policy:
    if (
        not isinstance(data, Mapping)
        or data.get("kind") != "ponder.heuristic"
        or data.get("version") != 1
    ):
        raise PolicyError(
            "not a saved ponder heuristic (kind ponder.heuristic, version 1): save it with "
            "policies.registry.save_policy"
        )
    cls = data.get("class")
    if not isinstance(cls, str) or cls not in heuristics.__all__:
        raise PolicyError(f"unknown heuristic class {cls!r}: use one of {heuristics.__all__}")
    params = data.get("params", {})
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise PolicyError(
            f"heuristic {cls}: 'params' must be an object of constructor arguments, got {params!r}"
        )
    try:
        policy: Policy = getattr(heuristics, cls)(**params)
    except Exception as e:  # TypeError (unknown argument), ConfigError (a bad value)
        raise PolicyError(f"heuristic {cls}: bad parameters {params}: {e}") from e
    name = data.get("name")
    if name is not None and name != policy.name:
        # The name is what reports, tables and the proxy's answers call the policy: one that
        # is not what the parameters run would mislabel every result.
        raise PolicyError(
            f"heuristic {cls} with parameters {dict(params)} is {policy.name!r}, but the file "
            f"names it {name!r}: correct the name (or remove it: the canonical name is used), "
            "or save the policy again with policies.registry.save_policy"
        )
    return policy


def check_policy(policy: Policy) -> Policy:
    """Act once on an all-zero observation, so that a policy that cannot run on this env's
    features (one it does not know, a wrong shape) fails at startup, not on the first request.

    Raises:
        PolicyError: the policy cannot act.
    """
    try:
        policy.reset(1)
        policy.act(np.zeros(N_FEATURES, dtype=np.float32))
        policy.reset(1)
    except Exception as exc:
        raise PolicyError(
            f"policy {policy.name!r} cannot act on this environment's observation "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return policy
