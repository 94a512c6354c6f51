"""MLflow tracking: the local store, a real `mlflow server`, policies as pyfunc models from code,
and the main job (`ponder run --quick`) end to end in a subprocess."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
pd = pytest.importorskip("pandas")

from env.episode.observation import FEATURE_NAMES  # noqa: E402
from env.episode.vector import BatchedReplayEnv  # noqa: E402
from policies import BestOfN, BoundedThinking, DeepConfOnline, ProbeAgreement  # noqa: E402
from policies.base import Policy  # noqa: E402
from policies.evaluation.runner import EvalResult, Evaluator  # noqa: E402
from policies.registry import heuristic_to_json, load_policy, save_policy  # noqa: E402
from policies.tracking import (  # noqa: E402
    Tracker,
    default_tracking_uri,
    log_policy_model,
    resolve_tracking_uri,
)

ROOT = Path(__file__).resolve().parents[2]
# DeepConf online takes a percentile over warm-up chains that some episodes do not have yet.
pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
BANK = ROOT / "data" / "banks" / "testbed-arith"


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="module")
def result() -> EvalResult:
    return Evaluator(BANK, seeds=2)(ProbeAgreement(2))


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracker]:
    """A tracker on a local store in a temporary folder (one database for the module)."""
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path_factory.mktemp("store") / "mlruns"
    yield Tracker(BANK, root=root)
    if old is not None:
        os.environ["MLFLOW_TRACKING_URI"] = old


def test_where_runs_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert resolve_tracking_uri() == default_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri() == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_sqlite_store_keeps_artifacts_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, result: EvalResult
) -> None:
    """A SQLite URI from the environment: artifacts go beside the database, not into ./mlruns."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    (tmp_path / "store").mkdir()
    tracker = Tracker(BANK)
    run_id = tracker.log_eval(result, nested=False)
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.artifact_location == (tmp_path / "store" / "artifacts").as_uri()
    assert list((tmp_path / "store" / "artifacts").rglob("episodes.csv"))
    assert tracker.client.get_run(run_id).info.artifact_uri.startswith(exp.artifact_location)
    assert not list(elsewhere.iterdir())


def _check_eval_run(client: Any, run_id: str, result: EvalResult, tmp: Path) -> None:
    run = client.get_run(run_id)
    assert run.data.metrics["eval/accuracy"] == pytest.approx(result.accuracy.mean)
    assert run.data.metrics["eval/tokens_high"] == pytest.approx(result.tokens.high)
    assert "eval/accuracy/L1" in run.data.metrics
    assert run.data.params["policy"] == result.policy
    assert run.data.params["seeds"] == "0,1"
    assert run.data.params["env.max_chains"] == "16"
    path = client.download_artifacts(run_id, "episodes.csv", str(tmp))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.episodes)
    assert {r["qid"] for r in rows} == {e.qid for e in result.episodes}


def test_local_store_runs(local: Tracker, result: EvalResult, tmp_path: Path) -> None:
    assert local.uri.startswith("sqlite:///") and local.experiment == "testbed-arith"
    with local.run("parent", params={"what": "test"}) as parent:
        run_id = local.log_eval(result)
        local.log_table([{"a": 1, "b": 2}], "comparison.csv")
    _check_eval_run(local.client, run_id, result, tmp_path)
    child = local.client.get_run(run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    names = [a.path for a in local.client.list_artifacts(parent.info.run_id)]
    assert names == ["comparison.csv"]
    assert {r.info.run_id for r in local.runs()} >= {run_id, parent.info.run_id}
    # a second tracker on the same store finds the experiment
    assert Tracker(BANK, root=Path(local.uri.removeprefix("sqlite:///")).parent).experiment_id == (
        local.experiment_id
    )


def _trajectories(policy: Policy, n: int = 6) -> list[np.ndarray]:
    """Observations of ``n`` real episodes of ``policy`` on the bank, one array per episode."""
    env = BatchedReplayEnv(BANK, n, split="test", difficulty="auto")
    obs, _ = env.reset(seed=1)
    policy.reset(n, config=env.config)
    traj: list[list[np.ndarray]] = [[] for _ in range(n)]
    done_once = np.zeros(n, bool)
    while not done_once.all():
        for i in np.flatnonzero(~done_once):
            traj[i].append(obs[i].copy())
        obs, _, term, trunc, _ = env.step(policy.act(obs))
        policy.end(term | trunc)
        done_once |= term | trunc
    return [np.stack(t) for t in traj]


def _learned_policies() -> list[Any]:
    """Both learned policies, trained with tiny budgets."""
    from policies.learned import train_ppo, train_value_policy

    kw: dict[str, Any] = {"split": "train", "seed": 0, "eval_seeds": 0, "progress": False}
    value = train_value_policy(BANK, transitions=2_000, fqi_iters=1, **kw)
    ppo = train_ppo(BANK, total_steps=2_048, num_envs=64, **kw)
    return [value.with_lam(3e-4), ppo.with_lam(3e-4)]


def test_policies_reload_as_pyfunc_models(local: Tracker) -> None:
    from env.episode.config import EnvConfig

    config = EnvConfig(chunk_tokens=32, max_chain_tokens=256, extension_chunks=2)
    policies: list[Any] = [
        BestOfN(4, "verifier"),
        DeepConfOnline(keep_percent=10),
        BoundedThinking(32, 256),
    ]
    policies += _learned_policies()
    with local.run("models"):
        infos = [log_policy_model(p, config, name=f"policy{i}") for i, p in enumerate(policies)]
    for policy, info in zip(policies, infos, strict=True):
        # no pickle: the model is this repository's code plus the policy's own files
        files = {
            p.name for p in Path(mlflow.artifacts.download_artifacts(info.model_uri)).rglob("*")
        }
        assert "python_model.pkl" not in files and "pyfunc.py" in files
        model = mlflow.pyfunc.load_model(info.model_uri)
        for traj in _trajectories(policy)[:3]:
            df = pd.DataFrame(traj, columns=list(FEATURE_NAMES))
            # each row its own episode's first decision
            policy.reset(len(traj), config=config)
            np.testing.assert_array_equal(model.predict(df), policy.act(traj))
            # the rows as one episode, in order
            policy.reset(1, config=config)
            seq = [policy.act(row) for row in traj]
            np.testing.assert_array_equal(model.predict(df, params={"episode": True}), seq)
            if hasattr(policy, "with_lam"):  # a learned policy, at another price
                other = policy.with_lam(1e-3)
                other.reset(len(traj), config=config)
                np.testing.assert_array_equal(
                    model.predict(df, params={"lam": 1e-3}), other.act(traj)
                )


def test_saved_heuristics_round_trip(tmp_path: Path) -> None:
    from policies.evaluation.sweeps import heuristic_sweeps

    for fam in heuristic_sweeps(16):
        for _, p in fam.points:
            q = load_policy(save_policy(p, tmp_path / p.name))
            assert type(q) is type(p) and q.name == p.name
            assert heuristic_to_json(q) == heuristic_to_json(p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store and artifacts in ``tmp_path``."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"mlflow server exited: {(tmp_path / 'server.log').read_text()}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("mlflow server did not start in 120 s")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_mlflow_server_runs(server: str, result: EvalResult, tmp_path: Path) -> None:
    tracker = Tracker(BANK, tracking_uri=server)
    assert tracker.uri == server
    run_id = tracker.log_eval(result, nested=False)
    _check_eval_run(tracker.client, run_id, result, tmp_path)
    # the artifact went through the server into its artifact folder
    assert list((tmp_path / "artifacts").rglob("episodes.csv"))


def test_ponder_run_quick_smoke(tmp_path: Path) -> None:
    """The main job's real entry point, with tiny budgets, in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "run",
            "--bank",
            str(BANK),
            "--quick",
            "--out",
            str(out),
            "--mlruns",
            str(tmp_path / "mlruns"),
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "headline per family" in text and "every operating point" in text
    assert "best-of-N" in text and "oracle" in text and "tokens to match" in text
    for name in ("frontier.png", "difficulty.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "comparison.csv").exists() and (out / "headline.csv").exists()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("testbed-arith")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    kinds = [r.data.tags.get("ponder.kind") for r in runs]
    assert kinds.count("main") == 1 and kinds.count("evaluation") >= 30
    # value-chain, two PPOs and the stop policy, each also with hidden-state features (the
    # testbed bank has them): 3 training seeds each, each logged as a pyfunc model
    assert kinds.count("training") == 24
    assert "value-chain" in text and "ppo" in text and "ppo-chain" in text
    assert "stop-chain" in text and "stop-chain-hidden" in text
    assert "ppo-chain-hidden" in text and "probe-stop" in text
    for r in runs:
        if r.data.tags.get("ponder.kind") == "training":
            assert r.data.metrics["train/wall_s"] > 0
            assert r.outputs is not None and r.outputs.model_outputs
    main = next(r for r in runs if r.data.tags.get("ponder.kind") == "main")
    arts = {a.path for a in client.list_artifacts(main.info.run_id)}
    assert {"frontier.png", "difficulty.png", "comparison.csv", "headline.csv"} <= arts
    assert "results.json" in arts
    # the headline per family: each learned family's tokens to match per training seed
    assert "per seed" in text and "learned minus the best heuristic" in text
    assert "headline/ppo-chain/seed_0/area" in main.data.metrics
    assert "oracle/accuracy" in main.data.metrics
    # the product's target, per learned family, in the output and in MLflow
    assert "target: a learned policy matches maj@16" in text
    assert main.data.metrics["target/met"] in (0.0, 1.0)
    assert "target/value-chain/budgets_below" in main.data.metrics
    assert "target/value-chain/budgets_clearly_below" in main.data.metrics
    assert "any-learned: " in text  # the envelope of the learned families
    # the oracle voters' floor under the target, with its share of maj@16's tokens
    assert "floor: to match maj@16, an oracle that knows which answers are right" in text
    m = main.data.metrics
    assert 0 < m["floor/any/match_share"] <= m["floor/majority/match_share"] <= 1.0
    # the learned policies answer with confidence-weighted votes (--aggregate), saved with them
    for fam in ("value-chain", "ppo", "ppo-chain", "stop-chain"):
        saved = json.loads((out / "policies" / fam / "policy.json").read_text())
        assert saved["params"]["aggregate"] == "confidence", saved["params"]
        # the chain-deciding ones train, and so run, without probes (--chain-probes)
        assert saved["env"]["probe"] is (fam == "ppo"), (fam, saved["env"])
    # the two quick λ values, and at most one more where the spending jumps (--refine)
    import csv

    rows = list(csv.DictReader((out / "comparison.csv").open()))
    for fam in ("value-chain", "ppo", "ppo-chain", "stop-chain"):
        assert {r["train_seed"] for r in rows if r["family"] == fam} == {"0", "10000", "20000"}
        for seed in ("0", "10000", "20000"):
            params = [r["param"] for r in rows if r["family"] == fam and r["train_seed"] == seed]
            assert 2 <= len(params) <= 3 and len(set(params)) == len(params), params
        # every seed's policy, and the representative one where `ponder serve` finds it
        assert (out / "policies" / fam / "seed-10000" / "policy.json").exists()
    head = list(csv.DictReader((out / "headline.csv").open()))
    ppo_chain = next(r for r in head if r["family"] == "ppo-chain")
    assert ppo_chain["train_seeds"] == "0;10000;20000"
    assert len(ppo_chain["tokens_to_match_per_seed"].split(";")) == 3


def test_policy_names_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    from env.episode.config import EnvConfig
    from features.errors import PolicyError
    from policies.evaluate_cli import evaluate_main

    cfg = EnvConfig()
    for spec, kind in (
        ("best-of-3-verifier", "BestOfN"),
        ("s1-200", "BudgetForcing"),
        ("router-0.1-0.4", "DifficultyRouter"),
        ("deepconf-online-50", "DeepConfOnline"),
        ("esc-4", "EarlyStoppingSC"),
        ("single", "SingleChain"),
    ):
        p = load_policy(spec, config=cfg)
        assert (type(p).__name__, p.name) == (kind, spec)
    assert load_policy("best-of-3-verifier", config=cfg).aggregate == "verifier"
    with pytest.raises(PolicyError, match="did you mean"):
        load_policy("best-of-four", config=cfg)
    assert evaluate_main(["--policy", "probe-agree-2", "--bank", str(BANK), "--no-track"]) == 0
    out = capsys.readouterr().out
    assert "probe-agree-2 on testbed-arith" in out and "L8" in out and "oracle" in out


def test_main_job_picks_its_bank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default bank while it is too small: the main job says so and runs the fallback. A
    bank given with --bank runs with few test questions (a warning), not with none."""
    from io import StringIO

    from rich.console import Console

    import policies.main
    from features.errors import ConfigError
    from policies.main import RunArgs, pick_banks

    xl = ROOT / "data" / "banks" / "testbed-arith-xl"
    out = StringIO()
    console = Console(file=out, width=300)
    monkeypatch.setattr(policies.main, "DEFAULT_BANK", str(BANK))  # 24 test questions
    assert pick_banks(RunArgs(min_test_questions=24), console) == [BANK]
    assert pick_banks(RunArgs(min_test_questions=25, fallback_bank=str(xl)), console) == [xl]
    assert "holds only 24 recorded test" in out.getvalue()
    assert f"running {xl} instead" in out.getvalue()
    with pytest.raises(ConfigError, match="give another --bank"):
        pick_banks(RunArgs(min_test_questions=25, fallback_bank=""), console)
    # chosen with --bank: it runs, with a warning
    out.truncate(0)
    assert pick_banks(RunArgs(bank=str(BANK), min_test_questions=25), console) == [BANK]
    assert "intervals will be wider" in out.getvalue()
    with pytest.raises(ConfigError, match="no bank at"):
        pick_banks(RunArgs(bank="data/banks/absent"), console)


def test_tuning_run_reads_no_test_question(tmp_path: Path) -> None:
    """``--eval-split dev``: the learned policies and the difficulty predictor train on ``fit``,
    every policy and the oracle are evaluated on ``dev``; no test question is touched."""
    from rich.console import Console

    from env.bank.store import TraceBank
    from env.questions import select_split
    from features.errors import ConfigError
    from policies.main import RunArgs, run

    qs = TraceBank(BANK).questions
    fit = {q.qid for q in select_split(qs, "fit")}
    dev = {q.qid for q in select_split(qs, "dev")}
    console = Console(file=open(os.devnull, "w"), width=200)  # noqa: SIM115
    args = RunArgs(
        bank=str(BANK),
        eval_split="dev",
        quick=True,
        seeds=2,
        out=str(tmp_path / "out"),
        track=False,
        progress=False,
    )
    (res,) = run(args, console)
    evaluated = {e.qid for r in res.results.values() for x in r for e in x.episodes}
    assert evaluated == dev
    assert {o.qid for o in res.oracle.questions} == dev
    for name in ("value-chain", "ppo", "ppo-chain", "stop-chain"):
        meta = json.loads((tmp_path / "out" / "policies" / name / "policy.json").read_text())
        assert meta["training"]["split"] == "fit"
        assert meta["bank"]["n_questions"] == len(fit)
    assert json.loads((tmp_path / "out" / "difficulty.json").read_text())["train_questions"] == 18
    with pytest.raises(ConfigError, match="--eval-split must be test"):
        run(dataclasses.replace(args, eval_split="train"), console)
    with pytest.raises(
        ConfigError, match="--aggregate must be auto, majority, confidence or verifier"
    ):
        run(dataclasses.replace(args, aggregate="vote"), console)
