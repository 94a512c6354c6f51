"""The policy registry: one grammar for ``ponder serve`` and ``ponder evaluate``, saved policies,
clear errors, and never a pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from env.episode.config import EnvConfig
from env.generators.fake import FakeGenerator
from features.errors import PolicyError
from policies import heuristics as H
from policies.base import Policy
from policies.evaluation.sweeps import heuristic_sweeps
from policies.registry import EXAMPLES, check_policy, heuristic_to_json, load_policy, save_policy

#: Every spelling ``ponder serve`` (``controller.policy_spec``) or ``ponder evaluate`` (the sweep
#: names and their numbers) accepted before the registry, and the policy each gave under the
#: default env settings: ``(class, constructor parameters, name)``.
SPELLINGS: list[tuple[str, str, dict[str, Any], str]] = [
    ("single", "SingleChain", {}, "single"),
    ("best-of-1", "BestOfN", {"n": 1, "aggregate": "majority"}, "best-of-1"),
    ("best-of-4", "BestOfN", {"n": 4, "aggregate": "majority"}, "best-of-4"),
    (" Best-Of-4 ", "BestOfN", {"n": 4, "aggregate": "majority"}, "best-of-4"),
    ("BEST-OF-4", "BestOfN", {"n": 4, "aggregate": "majority"}, "best-of-4"),
    ("best-of-4-majority", "BestOfN", {"n": 4, "aggregate": "majority"}, "best-of-4"),
    ("best-of-16", "BestOfN", {"n": 16, "aggregate": "majority"}, "best-of-16"),
    ("best-of-3-verifier", "BestOfN", {"n": 3, "aggregate": "verifier"}, "best-of-3-verifier"),
    ("best-of-4-verifier", "BestOfN", {"n": 4, "aggregate": "verifier"}, "best-of-4-verifier"),
    (
        "best-of-8-confidence",
        "BestOfN",
        {"n": 8, "aggregate": "confidence"},
        "best-of-8-confidence",
    ),
    ("s1-64", "BudgetForcing", {"budget": 64}, "s1-64"),
    ("s1-200", "BudgetForcing", {"budget": 200}, "s1-200"),
    ("s1-256", "BudgetForcing", {"budget": 256}, "s1-256"),
    ("s1-640", "BudgetForcing", {"budget": 640}, "s1-640"),
    (
        "adaptive-consistency",
        "AdaptiveConsistency",
        {"threshold": 0.95, "max_n": 16},
        "adaptive-consistency-0.95",
    ),
    *[
        (
            f"adaptive-consistency-{t}",
            "AdaptiveConsistency",
            {"threshold": float(t), "max_n": 16},
            f"adaptive-consistency-{float(t):g}",
        )
        for t in ("0.6", "0.7", "0.9", "0.90", "0.95")
    ],
    ("esc", "EarlyStoppingSC", {"max_n": 16}, "esc-4"),
    ("esc-4", "EarlyStoppingSC", {"max_n": 16}, "esc-4"),
    ("esc-4-max4", "EarlyStoppingSC", {"max_n": 4}, "esc-4-max4"),
    ("esc-4-max8", "EarlyStoppingSC", {"max_n": 8}, "esc-4-max8"),
    ("probe-agree", "ProbeAgreement", {"k": 3}, "probe-agree-3"),
    *[(f"probe-agree-{k}", "ProbeAgreement", {"k": k}, f"probe-agree-{k}") for k in (1, 3, 6)],
    (
        "deepconf-online",
        "DeepConfOnline",
        {"n_init": 4, "keep_percent": 90.0, "consensus": 0.95, "max_n": 16},
        "deepconf-online-90",
    ),
    *[
        (
            f"deepconf-online-{p}",
            "DeepConfOnline",
            {"n_init": 4, "keep_percent": float(p), "consensus": 0.95, "max_n": 16},
            f"deepconf-online-{p}",
        )
        for p in (10, 50, 90)
    ],
    ("router", "DifficultyRouter", {"easy": 0.3, "hard": 0.7, "n_medium": 4}, "router-0.3-0.7"),
    *[
        (
            f"router-{e}-{h}",
            "DifficultyRouter",
            {"easy": e, "hard": h, "n_medium": 4},
            f"router-{e}-{h}",
        )
        for e, h in ((0.1, 0.4), (0.2, 0.5), (0.3, 0.7))
    ],
    (
        "bounded",
        "BoundedThinking",
        {"start": 64, "max_budget": 512, "confidence": 10.0},
        "bounded-64-512",
    ),
    *[
        (
            f"bounded-{s}-{m}",
            "BoundedThinking",
            {"start": s, "max_budget": m, "confidence": 10.0},
            f"bounded-{s}-{m}",
        )
        for s, m in ((64, 512), (32, 256), (128, 256))
    ],
    ("random", "RandomPolicy", {"seed": 0, "p_stop": 0.1}, "random"),
    ("random-0", "RandomPolicy", {"seed": 0, "p_stop": 0.1}, "random"),
    ("random-7", "RandomPolicy", {"seed": 7, "p_stop": 0.1}, "random"),
]


def _described(policy: Policy) -> tuple[str, dict[str, Any], str]:
    d = heuristic_to_json(policy)
    return d["class"], d["params"], d["name"]


def _serve(spec: str, monkeypatch: pytest.MonkeyPatch) -> Policy:
    """The policy ``ponder serve --policy spec`` runs (the upstream replaced by a fake)."""
    import env.generators.openai
    from controller.build import build_controller
    from controller.serve_args import ServeArgs

    class Upstream(FakeGenerator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__()

        def close(self) -> None:
            pass

    monkeypatch.setattr(env.generators.openai, "OpenAIGenerator", Upstream)
    controller, _ = build_controller(ServeArgs(policy=spec))
    return controller.policy


class _Picked(Exception):
    def __init__(self, policy: Policy) -> None:
        self.policy = policy


def _evaluate(
    spec: str, monkeypatch: pytest.MonkeyPatch, config: EnvConfig | None = None
) -> Policy:
    """The policy ``ponder evaluate --policy spec`` evaluates (on a bank with ``config``)."""
    import policies.evaluate_cli

    class Evaluator:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.config = config or EnvConfig()

        def __call__(self, policy: Policy) -> None:
            raise _Picked(policy)

    monkeypatch.setattr(policies.evaluate_cli, "Evaluator", Evaluator)
    with pytest.raises(_Picked) as got:
        policies.evaluate_cli.evaluate_main(["--policy", spec, "--no-track"])
    return got.value.policy


@pytest.mark.parametrize(
    ("spec", "cls", "params", "name"), SPELLINGS, ids=[s[0] for s in SPELLINGS]
)
def test_every_spelling_gives_the_same_policy_to_serve_and_evaluate(
    spec: str, cls: str, params: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _described(load_policy(spec)) == (cls, params, name)
    assert _described(_serve(spec, monkeypatch)) == (cls, params, name)
    assert _described(_evaluate(spec, monkeypatch)) == (cls, params, name)


def test_chain_caps_follow_the_env_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heuristics that cap their chains take the bank's ``max_chains`` (as the sweeps do);
    names that spell a cap keep it."""
    small = EnvConfig(max_chains=8, max_chain_tokens=256, chunk_tokens=32)
    for spec, cls, params in (
        ("adaptive-consistency-0.9", "AdaptiveConsistency", {"threshold": 0.9, "max_n": 8}),
        (
            "deepconf-online-90",
            "DeepConfOnline",
            {"n_init": 4, "keep_percent": 90.0, "consensus": 0.95, "max_n": 8},
        ),
        ("router-0.3-0.7", "DifficultyRouter", {"easy": 0.3, "hard": 0.7, "n_medium": 4}),
        ("esc-4", "EarlyStoppingSC", {"max_n": 16}),
        ("esc-4-max4", "EarlyStoppingSC", {"max_n": 4}),
        ("bounded-64-512", "BoundedThinking", {"start": 64, "max_budget": 512, "confidence": 10.0}),
    ):
        assert _described(_evaluate(spec, monkeypatch, small)) == (cls, params, spec)
        assert _described(load_policy(spec, config=small)) == (cls, params, spec)
    tiny = EnvConfig(max_chains=2)
    assert load_policy("router", config=tiny).n_medium == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("max_chains", [16, 8, 2])
def test_every_sweep_name_loads_back_as_its_policy(max_chains: int) -> None:
    """The names in the main job's tables are specs: each loads the very policy evaluated."""
    config = EnvConfig(max_chains=max_chains)
    for fam in heuristic_sweeps(max_chains, max_chain_tokens=256, chunk_tokens=32):
        for _, p in fam.points:
            q = load_policy(p.name, config=config)
            assert heuristic_to_json(q) == heuristic_to_json(p), p.name


def test_a_heuristic_is_named_by_its_spec() -> None:
    for p in (
        H.SingleChain(),
        H.BestOfN(2, "verifier"),
        H.BudgetForcing(96),
        H.AdaptiveConsistency(0.8),
        H.EarlyStoppingSC(),
        H.EarlyStoppingSC(max_n=12),
        H.ProbeAgreement(5),
        H.DeepConfOnline(keep_percent=10),
        H.DifficultyRouter(0.2, 0.6),
        H.BoundedThinking(32, 256),
    ):
        assert heuristic_to_json(load_policy(p.name)) == heuristic_to_json(p)


@pytest.mark.parametrize("spec", list(EXAMPLES))
def test_every_example_loads_and_acts(spec: str) -> None:
    assert isinstance(check_policy(load_policy(spec)), Policy)


def test_saved_heuristics_load_by_folder_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = load_policy("esc-4-max8")
    folder = save_policy(p, tmp_path / "esc")
    assert (folder / "heuristic.json").is_file()
    for spec in (str(folder), str(folder / "heuristic.json")):
        assert _described(load_policy(spec)) == _described(p)
        assert _described(_serve(spec, monkeypatch)) == _described(p)
        assert _described(_evaluate(spec, monkeypatch)) == _described(p)
    assert _described(load_policy(folder)) == _described(p)  # a Path works too


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch", "unknown policy 'nosuch'.*policies.registry.*saved policy's folder"),
        ("best-of-four", "did you mean 'best-of-4'"),
        ("best-of-2.5", "unknown policy 'best-of-2.5'"),
        ("best-of-0", "best-of-N needs n >= 1"),
        ("probe-agree-99", "k must be in"),
        ("adaptive-consistency-1.5", "threshold must be in"),
        ("", "non-empty string"),
        ("  ", "non-empty string"),
    ],
)
def test_bad_names_say_what_is_wrong(
    spec: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(PolicyError, match=message):
        load_policy(spec)
    with pytest.raises(PolicyError, match=message):
        _serve(spec, monkeypatch)
    with pytest.raises(PolicyError, match=message):
        _evaluate(spec, monkeypatch)


def test_files_are_never_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkl = tmp_path / "policy.pkl"
    pkl.write_bytes(b"\x80\x04N.")
    for spec in (str(pkl), "policy.pt", str(tmp_path / "model.joblib")):
        with pytest.raises(PolicyError, match="never loads pickle"):
            load_policy(spec)
        with pytest.raises(PolicyError, match="never loads pickle"):
            _serve(spec, monkeypatch)
        with pytest.raises(PolicyError, match="never loads pickle"):
            _evaluate(spec, monkeypatch)
    with pytest.raises(PolicyError, match="never loads pickle"):
        load_policy(pkl)
    # a folder that holds only a pickle: named, and refused
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(PolicyError, match="pickle-based files are never loaded"):
        load_policy(str(tmp_path / "p"))


def test_paths_that_are_not_policies_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    js = tmp_path / "policy.json"
    js.write_text("{}")
    with pytest.raises(PolicyError, match="not a ponder policy file"):
        load_policy(str(js))
    with pytest.raises(PolicyError, match="no policy file"):
        load_policy(str(tmp_path / "missing.safetensors"))
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "heuristic.json").write_text('{"kind": "other"}')
    with pytest.raises(PolicyError, match="not a saved ponder heuristic"):
        load_policy(str(tmp_path / "h"))
    (tmp_path / "h" / "heuristic.json").write_text("{")
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_policy(str(tmp_path / "h"))
    data = {**heuristic_to_json(H.BestOfN(4)), "params": {"n": 4, "window": 3}}
    (tmp_path / "h" / "heuristic.json").write_text(json.dumps(data))
    with pytest.raises(PolicyError, match="bad parameters"):
        load_policy(str(tmp_path / "h"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError, match=r"folder without policy\.json or heuristic\.json"):
        load_policy("empty")


def test_a_policy_that_cannot_act_fails_at_startup() -> None:
    class Broken(H.SingleChain):
        def _act(self, obs: np.ndarray) -> np.ndarray:
            raise KeyError("no_such_feature")

    with pytest.raises(PolicyError, match="cannot act on this environment's observation"):
        check_policy(Broken())


def test_help_points_to_the_grammar(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from controller.proxy import main as serve_main
    from policies.evaluate_cli import evaluate_main

    monkeypatch.setenv("COLUMNS", "400")
    for main in (serve_main, evaluate_main):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "policies/registry.py" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
        (
            '{"kind": "ponder.heuristic", "version": 1, "class": "BestOfN", "params": {"n": '
            + "9" * 5000
            + "}}",
            "is not valid JSON",
        ),
        ('{"kind": "ponder.heuristic", "version": 1, "class": ["x"]}', "unknown heuristic class"),
        (
            '{"kind": "ponder.heuristic", "version": 1, "class": "BestOfN", "params": [4]}',
            "'params' must be an object",
        ),
    ],
)
def test_damaged_heuristic_files_are_policy_errors(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reproduction: a heuristic.json that was not JSON Python reads (nested 100k deep, a
    5000-digit number) printed a raw traceback. Now it is a PolicyError naming the file and what
    to do, and `ponder serve` prints one line."""
    from controller.cli import main as cli_main

    (tmp_path / "h").mkdir()
    path = tmp_path / "h" / "heuristic.json"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message) as err:
        load_policy(str(tmp_path / "h"))
    assert str(path) in str(err.value)
    code = cli_main(["serve", "--upstream", "http://127.0.0.1:1/v1", "--policy", str(path.parent)])
    out = capsys.readouterr().err.strip()
    assert code == 1 and out.startswith("error: ") and "\n" not in out, out


def test_a_heuristic_named_otherwise_than_its_parameters_is_refused(tmp_path: Path) -> None:
    """The reproduction: a heuristic.json saying best-of-4's parameters under the name
    best-of-8 was served and reported as best-of-8. Now it is refused (the name is what every
    result is reported under); without a name the canonical one is used."""
    data = heuristic_to_json(H.BestOfN(4))
    (tmp_path / "h").mkdir()
    path = tmp_path / "h" / "heuristic.json"
    for name in ("best-of-8", "", ["best-of-4"]):
        path.write_text(json.dumps({**data, "name": name}))
        with pytest.raises(PolicyError, match=r"is 'best-of-4', but the file names it"):
            load_policy(str(path))
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "name"}))
    assert load_policy(str(path)).name == "best-of-4"
    path.write_text(json.dumps(data))
    assert load_policy(str(path)).name == "best-of-4"
