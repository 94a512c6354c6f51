"""MLflow tracking: one experiment per bank, one run per training and per evaluation.

Where runs go, first match wins:

1. the ``tracking_uri`` argument (``ponder run --tracking-uri http://127.0.0.1:5000`` for an
   ``mlflow server``, or any URI MLflow takes);
2. the ``MLFLOW_TRACKING_URI`` environment variable;
3. the embedded local store: ``sqlite:///<root>/mlflow.db`` with artifacts under ``<root>/``
   (``root`` = ``./mlruns``). MLflow 3's own default is ``sqlite:///mlflow.db`` in the working
   folder (a file store under ``./mlruns`` only where one already exists); ponder keeps both the
   database and the artifacts in ``./mlruns``. Browse it with
   ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``.

Any SQLite store (also one named by 1. or 2.) gets its new experiments' artifacts in an
``artifacts`` folder beside the database file.

The experiment is named after the bank's folder (``gsm8k-qwen2.5-coder-1.5b``). Evaluation runs
log their parameters (policy, family, sweep parameter, seeds, env settings), the metrics of
:meth:`~policies.evaluation.runner.EvalResult.metrics` (``eval/accuracy``, ``eval/tokens``, their interval
ends, per difficulty level, ...) and the per-episode table (``episodes.csv``). Training runs log
their arguments, ``train/...`` metrics and the policy as an MLflow model
(:func:`log_policy_model`: "models from code", loadable with ``mlflow.pyfunc.load_model``, no
pickle).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from env.bank.store import TraceBank
from env.episode.config import EnvConfig
from env.episode.observation import FEATURE_NAMES
from features.errors import ConfigError
from policies.base import Policy
from policies.evaluation.runner import EvalResult, write_rows

__all__ = [
    "DEFAULT_ROOT",
    "Tracker",
    "default_tracking_uri",
    "experiment_name",
    "flat_config",
    "log_policy_model",
    "check_tracking_uri",
    "masked",
    "resolve_tracking_uri",
]

#: The embedded local store's folder (relative to the working folder).
DEFAULT_ROOT = Path("mlruns")
_PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")


def default_tracking_uri(root: str | Path = DEFAULT_ROOT) -> str:
    """The embedded store: a SQLite database in ``root``."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None = None, root: str | Path = DEFAULT_ROOT) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> str:
    """Fail fast, in one line naming ``uri``, where runs cannot go; return ``uri``.

    MLflow itself retries an unreachable server for minutes and then raises a traceback, and
    an unwritable SQLite path fails deep inside SQLAlchemy: both are checked here first.

    Raises:
        ConfigError: an HTTP(S) server that does not answer within ``timeout_s`` (or answers
            its health check with an error), or a local store whose folder cannot be written.
    """
    if uri.startswith(("http://", "https://")):
        import httpx

        try:
            r = httpx.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except httpx.HTTPError as e:
            raise ConfigError(
                f"MLflow tracking server {uri} did not answer ({type(e).__name__}): start it, "
                "or pass another --tracking-uri (or unset MLFLOW_TRACKING_URI for the local store)"
            ) from None
        if r.status_code >= 400:
            raise ConfigError(
                f"MLflow tracking server {uri} answered its health check with HTTP "
                f"{r.status_code}: is it an MLflow server?"
            )
        return uri
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
    elif uri.startswith("file:") or "://" not in uri:
        folder = Path(uri.removeprefix("file://").removeprefix("file:"))
    elif uri.startswith(("postgresql://", "postgresql+")):
        return _check_database(uri, timeout_s)
    else:
        return uri  # another backend (mysql://, databricks, ...): MLflow checks it
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"MLflow tracking URI {uri}: cannot create {folder} ({e.strerror}); pass a writable "
            "--tracking-uri or --mlruns"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"MLflow tracking URI {uri}: {folder} is not writable; pass a writable "
            "--tracking-uri or --mlruns"
        )
    return uri


def masked(uri: str) -> str:
    """``uri`` with its password, if any, written as ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    user = parts.username or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _check_database(uri: str, timeout_s: float) -> str:
    """Connect to a PostgreSQL tracking store once (``SELECT 1``): a wrong password, an unknown
    database or a server that does not answer is one clear error before any work starts."""
    try:
        import sqlalchemy
    except ImportError:  # (MLflow's own dependency: always there)
        return uri
    try:
        engine = sqlalchemy.create_engine(
            uri, connect_args={"connect_timeout": max(1, round(timeout_s))}
        )
    except ImportError as e:
        raise ConfigError(
            f"MLflow tracking URI {masked(uri)} needs the PostgreSQL driver ({e}): "
            "pip install -e '.[postgres]' (psycopg)"
        ) from None
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:
        raise ConfigError(f"MLflow tracking URI {masked(uri)} is malformed: {e}") from None
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.SQLAlchemyError as e:
        why = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise ConfigError(
            f"cannot use the PostgreSQL tracking store {masked(uri)}: {why} (check the user, "
            "password, host, port and database name in --tracking-uri)"
        ) from None
    finally:
        engine.dispose()
    return uri


def experiment_name(bank: TraceBank | str | Path) -> str:
    """The bank's folder name."""
    path = bank.path if isinstance(bank, TraceBank) else Path(bank)
    return path.resolve().name


def flat_config(config: EnvConfig, prefix: str = "env.") -> dict[str, Any]:
    """Env settings as flat MLflow params (``env.max_chains``, ``env.prices.probe``, ...)."""
    out: dict[str, Any] = {}
    for k, v in dataclasses.asdict(config).items():
        if isinstance(v, dict):
            out.update({f"{prefix}{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[f"{prefix}{k}"] = v
    return out


def log_policy_model(
    policy: Policy, config: EnvConfig, *, name: str = "policy", example_rows: int = 4
) -> Any:
    """Log ``policy`` to the active run as an MLflow model from code (:mod:`policies.pyfunc`).

    The policy folder (a heuristic's spec, or a learned policy's own files) and the env settings
    are the model's ``policy`` artifact; nothing is pickled. Returns MLflow's model info
    (``model_uri`` loads it with ``mlflow.pyfunc.load_model``).
    """
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature

    from policies.pyfunc import save_policy_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_policy_folder(policy, Path(tmp) / "policy", config)
        example = pd.DataFrame(
            np.zeros((example_rows, len(FEATURE_NAMES)), np.float32), columns=list(FEATURE_NAMES)
        )
        signature = infer_signature(
            example, np.zeros(example_rows, np.int64), params={"episode": False, "lam": -1.0}
        )
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(_PYFUNC_FILE),
            artifacts={"policy": str(folder)},
            signature=signature,
            input_example=example,
            # Listed, not inferred (inference runs the model in a subprocess: seconds). The
            # model's code imports ponder, which must be installed where it is loaded.
            pip_requirements=_requirements(),
        )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "numpy", "pandas", "gymnasium", "scikit-learn", "torch"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return out


class Tracker:
    """Runs of one bank's experiment.

    Args:
        bank: the bank (its folder name names the experiment), or ``experiment`` directly.
        tracking_uri: where runs go (see the module docstring).
        root: the embedded store's folder, when no URI is given.
        experiment: the experiment's name (default: the bank's folder name).
    """

    def __init__(
        self,
        bank: TraceBank | str | Path | None = None,
        *,
        tracking_uri: str | None = None,
        root: str | Path = DEFAULT_ROOT,
        experiment: str | None = None,
    ) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        if bank is None and experiment is None:
            raise ConfigError("a Tracker needs a bank or an experiment name")
        self.uri = check_tracking_uri(resolve_tracking_uri(tracking_uri, root))
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.experiment = experiment or experiment_name(bank)  # type: ignore[arg-type]
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            # a SQLite store keeps its artifacts beside the database (MLflow's default would be
            # ./mlruns under whatever folder the first run happened to start in)
            db = self.uri.removeprefix("sqlite:///") if self.uri.startswith("sqlite:///") else None
            where = (Path(db).resolve().parent / "artifacts").as_uri() if db else None
            self.experiment_id = self.client.create_experiment(
                self.experiment, artifact_location=where
            )
        else:
            self.experiment_id = exp.experiment_id

    @contextmanager
    def run(
        self,
        name: str,
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
    ) -> Iterator[Any]:
        """An MLflow run of this experiment (nested under the active run if ``nested``)."""
        import mlflow

        with mlflow.start_run(
            experiment_id=self.experiment_id,
            run_name=name,
            nested=nested,
            tags={
                "ponder.experiment": self.experiment,
                **{k: str(v) for k, v in (tags or {}).items()},
            },
        ) as run:
            if params:
                mlflow.log_params({k: _param(v) for k, v in params.items()})
            yield run

    def log_eval(
        self, result: EvalResult, *, nested: bool = True, extra: Mapping[str, Any] | None = None
    ) -> str:
        """One evaluation as a run: params, ``eval/*`` metrics, ``episodes.csv``. Returns its id."""
        import mlflow

        params = {
            "policy": result.policy,
            "family": result.family,
            "param": result.param,
            "bank": result.bank,
            "split": result.split,
            "seeds": ",".join(map(str, result.seeds)),
            "questions": len({e.qid for e in result.episodes}),
            **({"lam": result.lam} if result.lam is not None else {}),
            **flat_config(result.config),
            **(extra or {}),
        }
        with self.run(
            f"eval {result.label}", params=params, tags={"ponder.kind": "evaluation"}, nested=nested
        ) as run:
            mlflow.log_metrics(result.metrics())
            with tempfile.TemporaryDirectory() as tmp:
                path = result.write_csv(Path(tmp) / "episodes.csv")
                mlflow.log_artifact(str(path))
            return str(run.info.run_id)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """A list of dict rows as a CSV artifact of the active run."""
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(write_rows(Path(tmp) / name, rows)))

    def runs(self) -> list[Any]:
        """Every run of the experiment (newest first)."""
        return list(self.client.search_runs([self.experiment_id], max_results=10_000))


def _param(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."
