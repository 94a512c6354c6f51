"""Policy specs: every heuristic by name, clear errors, and no file loading (never pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from controller.policy_spec import EXAMPLES, check_policy, load_policy, parse_policy_spec
from features.errors import PolicyError
from policies import heuristics as H
from policies.base import Policy

DEFAULTS = [
    H.SingleChain(),
    H.BestOfN(4),
    H.BestOfN(8, "confidence"),
    H.BestOfN(2, "verifier"),
    H.BudgetForcing(256),
    H.AdaptiveConsistency(),
    H.AdaptiveConsistency(0.8),
    H.EarlyStoppingSC(),
    H.ProbeAgreement(),
    H.ProbeAgreement(5),
    H.DeepConfOnline(),
    H.DeepConfOnline(keep_percent=10),
    H.DifficultyRouter(),
    H.DifficultyRouter(0.2, 0.6),
    H.BoundedThinking(),
    H.BoundedThinking(32, 256),
    H.RandomPolicy(),
]


@pytest.mark.parametrize("name", [p.name for p in DEFAULTS])
def test_a_policy_name_is_its_spec(name: str) -> None:
    policy = next(p for p in DEFAULTS if p.name == name)
    parsed = load_policy(name)
    assert type(parsed) is type(policy)
    assert parsed.name == policy.name
    assert parsed.aggregate == policy.aggregate


@pytest.mark.parametrize("spec", list(EXAMPLES))
def test_every_example_loads_and_acts(spec: str) -> None:
    assert isinstance(load_policy(spec), Policy)


def test_short_forms_and_parameters() -> None:
    assert load_policy("adaptive-consistency").threshold == 0.95  # type: ignore[attr-defined]
    assert load_policy("probe-agree").k == 3  # type: ignore[attr-defined]
    assert parse_policy_spec("esc").name == "esc-4"
    assert load_policy(" Best-Of-4 ").name == "best-of-4"
    assert load_policy("random-7").name == "random"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch", "unknown policy 'nosuch'"),
        ("best-of-four", "did you mean 'best-of-4'"),
        ("best-of-0", "best-of-N needs n >= 1"),
        ("probe-agree-99", "k must be in"),
        ("adaptive-consistency-1.5", "threshold must be in"),
        ("", "non-empty string"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        load_policy(spec)


def test_files_are_never_unpickled(tmp_path: Path) -> None:
    pkl = tmp_path / "policy.pkl"
    pkl.write_bytes(b"\x80\x04N.")
    with pytest.raises(PolicyError, match="never loads pickle"):
        load_policy(str(pkl))
    with pytest.raises(PolicyError, match="never loads pickle"):
        load_policy("policy.pt")
    js = tmp_path / "policy.json"
    js.write_text("{}")
    with pytest.raises(PolicyError, match="not a ponder policy file"):
        load_policy(str(js))
    with pytest.raises(PolicyError, match="no policy file"):
        load_policy(str(tmp_path / "missing.safetensors"))


def test_a_policy_that_cannot_act_fails_at_startup() -> None:
    class Broken(H.SingleChain):
        def _act(self, obs: np.ndarray) -> np.ndarray:
            raise KeyError("no_such_feature")

    with pytest.raises(PolicyError, match="cannot act on this environment's observation"):
        check_policy(Broken())
