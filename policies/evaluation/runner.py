"""Evaluate policies on a bank's test questions: every question, every seed, exactly once.

:func:`evaluate` (or an :class:`Evaluator` reused across many policies) replays each
(question x seed) episode of a split once in :class:`~env.episode.vector.BatchedReplayEnv`: episode
``(q, s)`` is pinned to question ``q`` with the chains handed out in the order generator seed
``s`` gives (``reset(options={"questions": ..., "gen_seeds": ...})``), so every policy sees the
same chains in the same order and the single environment would replay the very same episodes.
Each env's first finished episode is kept; the episodes the env starts by itself afterwards
(autoreset) are ignored.

Accuracy and mean decoded tokens come with per-question bootstrap intervals
(:mod:`policies.evaluation.metrics`: a question's score is its mean over seeds, questions are resampled),
overall and per difficulty level of the bank's questions.

Sweeps: :func:`heuristic_sweeps` lists the fixed strategies with their parameter grids,
:func:`learned_sweep` a learned policy over ``lam``; :func:`evaluate_families` runs them and
:func:`headline` condenses each family into the numbers the comparison reports: tokens needed to
match best-of-16 majority voting (maj@16) within 0.5 point, accuracy at fixed mean budgets, the
area under the accuracy-tokens frontier, and the gap to the oracle (:mod:`policies.evaluation.oracle`).
"""

from __future__ import annotations

import csv
import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from env.bank.store import TraceBank
from env.episode.config import EnvConfig
from env.episode.difficulty import bank_difficulty
from env.episode.hidden import HiddenProbes
from env.episode.vector import BatchedReplayEnv
from env.questions import select_split, training_split
from features.errors import ConfigError, PolicyError
from policies.base import STOP, LamConditioned, Policy
from policies.evaluation.metrics import (
    FrontierPoint,
    Interval,
    bootstrap_mean,
    per_question_means,
)

__all__ = [
    "EpisodeRecord",
    "EvalResult",
    "Evaluator",
    "LevelStats",
    "MATCH_TOLERANCE",
    "RULE_OF_THUMB",
    "difficulty_regimes",
    "evaluate",
    "run_pinned",
    "level_label",
    "summarize_scores",
    "write_rows",
    "score_metrics",
]


#: "Matches maj@16" means an accuracy at least maj@16's minus this (0.5 point).
MATCH_TOLERANCE = 0.005


def level_label(difficulty: int | None) -> str:
    """The label of a bank question's difficulty level (``L3``; ``-`` when it has none)."""
    return f"L{difficulty}" if difficulty is not None else "-"


#: The seed documents' rule of thumb for test-time compute, by how hard a question is: stop
#: early on easy questions, sample wider (parallel chains) on medium ones, think longer (serial:
#: one chain past its own end) on hard ones. Keys: :func:`difficulty_regimes`' values.
RULE_OF_THUMB: dict[str, str] = {"easy": "stop", "medium": "parallel", "hard": "serial"}


def difficulty_regimes(levels: Iterable[str]) -> dict[str, str]:
    """Each numbered difficulty level among ``levels`` (labels, ``L3``) as ``easy``, ``medium``
    or ``hard``, by terciles of the distinct levels present: of ``n`` levels the lowest
    ``round(n / 3)`` are easy, the highest as many hard, the rest medium (levels 1-8: 1-3 easy,
    4-5 medium, 6-8 hard; a single level is medium). Labels without a level (``-``) are left
    out; the answer is in level order (empty when no label has a level)."""
    ordered = sorted({lv for lv in levels if lv[1:].isdigit()}, key=_level_key)
    n = len(ordered)
    k = round(n / 3)
    return {
        lv: "easy" if i < k else "hard" if i >= n - k else "medium" for i, lv in enumerate(ordered)
    }


@dataclass(frozen=True, slots=True)
class EpisodeRecord:
    """One evaluated episode.

    ``decoded`` splits into the first chain's tokens, ``deep`` and ``wide`` (and the
    verifier's): :data:`~env.episode.rules.INFO_KEYS` ``tokens_deep`` and ``tokens_wide``.
    """

    qid: str
    seed: int
    level: str
    correct: bool
    answer: str | None
    decoded: int
    cost: float
    chains: int
    steps: int
    reason: str
    #: ``correct_reward * correct - lam * cost`` with the policy's ``lam`` (the env's if none).
    ret: float
    #: Decoded tokens past a chain's own end (budget forcing: thinking longer).
    deep: int = 0
    #: Decoded tokens of the chains after the first, up to their own ends (sampling wider).
    wide: int = 0


@dataclass(frozen=True, slots=True)
class LevelStats:
    """Accuracy and tokens of the questions of one difficulty level.

    ``deep`` and ``wide``: the mean over its questions of their mean decoded tokens past a
    chain's own end and of the chains after the first (:class:`EpisodeRecord`), on the same
    footing as ``tokens.mean``; ``None`` where not counted (the oracle).
    """

    questions: int
    accuracy: Interval
    tokens: Interval
    deep: float | None = None
    wide: float | None = None


def score_metrics(
    prefix: str, accuracy: Interval, tokens: Interval, by_level: dict[str, LevelStats]
) -> dict[str, float]:
    """Accuracy and tokens with their interval bounds, and per level, as flat MLflow metrics."""
    out = {
        f"{prefix}/accuracy": accuracy.mean,
        f"{prefix}/accuracy_low": accuracy.low,
        f"{prefix}/accuracy_high": accuracy.high,
        f"{prefix}/tokens": tokens.mean,
        f"{prefix}/tokens_low": tokens.low,
        f"{prefix}/tokens_high": tokens.high,
    }
    for lv, s in by_level.items():
        out[f"{prefix}/accuracy/{lv}"] = s.accuracy.mean
        out[f"{prefix}/tokens/{lv}"] = s.tokens.mean
    return out


def summarize_scores(
    qids: Sequence[str],
    levels: Sequence[str],
    correct: Sequence[float],
    tokens: Sequence[float],
    *,
    n_boot: int,
    seed: int = 0,
    deep: Sequence[float] | None = None,
    wide: Sequence[float] | None = None,
) -> tuple[Interval, Interval, dict[str, LevelStats]]:
    """Accuracy and tokens with per-question bootstrap intervals, overall and per level.

    Args:
        qids, levels, correct, tokens: one entry per episode.
        n_boot, seed: the bootstrap's resamples and seed.
        deep, wide: each episode's tokens past a chain's end and of the chains after the
            first (``None``: not counted), averaged per level like the tokens.
    """
    acc = bootstrap_mean(per_question_means(qids, correct), n_boot=n_boot, seed=seed)
    tok = bootstrap_mean(per_question_means(qids, tokens), n_boot=n_boot, seed=seed)
    by: dict[str, LevelStats] = {}
    for lv in sorted(set(levels), key=_level_key):
        idx = [i for i, x in enumerate(levels) if x == lv]
        q = [qids[i] for i in idx]
        deep_lv, wide_lv = (
            None if v is None else float(per_question_means(q, [v[i] for i in idx]).mean())
            for v in (deep, wide)
        )
        by[lv] = LevelStats(
            questions=len(set(q)),
            accuracy=bootstrap_mean(
                per_question_means(q, [correct[i] for i in idx]), n_boot=n_boot, seed=seed
            ),
            tokens=bootstrap_mean(
                per_question_means(q, [tokens[i] for i in idx]), n_boot=n_boot, seed=seed
            ),
            deep=deep_lv,
            wide=wide_lv,
        )
    return acc, tok, by


def _level_key(label: str) -> tuple[int, str]:
    return (int(label[1:]), label) if label[1:].isdigit() else (10**9, label)


@dataclass
class EvalResult:
    """A policy's episodes on a split and their summary.

    Attributes:
        policy: the policy's name.
        family: the sweep family it belongs to (its name when evaluated alone).
        param: the sweep parameter (``""`` when evaluated alone).
        bank: the bank's folder name.
        split: the questions' split.
        seeds: the generator seeds (each question is run once per seed).
        config: the env settings the episodes ran under (``aggregate`` is the policy's).
        episodes: one record per (question, seed), question-major.
        accuracy: mean correctness, per-question bootstrap interval.
        tokens: mean decoded tokens, per-question bootstrap interval.
        by_level: the same per difficulty level.
        wall_s: seconds the episodes took.
        lam: the price the policy acted for (learned policies; ``None`` for heuristics).
        train_seed: the training seed of a learned policy (``None``: a heuristic, or not said).
    """

    policy: str
    family: str
    param: str
    bank: str
    split: str
    seeds: tuple[int, ...]
    config: EnvConfig
    episodes: list[EpisodeRecord]
    accuracy: Interval
    tokens: Interval
    by_level: dict[str, LevelStats]
    wall_s: float = 0.0
    lam: float | None = None
    train_seed: int | None = None

    @property
    def label(self) -> str:
        """``family`` and ``param`` (``best-of-N N=16``), or the policy's name; with the
        training seed when there is one (``ppo lam=0.0001 seed=1``)."""
        label = f"{self.family} {self.param}".strip() if self.param else self.policy
        return label if self.train_seed is None else f"{label} seed={self.train_seed}"

    def point(self) -> FrontierPoint:
        return FrontierPoint(self.family, self.param, self.tokens, self.accuracy)

    def per_question(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Question ids (first-seen order), mean correctness and mean tokens per question."""
        qids = [e.qid for e in self.episodes]
        acc = per_question_means(qids, [float(e.correct) for e in self.episodes])
        tok = per_question_means(qids, [float(e.decoded) for e in self.episodes])
        return list(dict.fromkeys(qids)), acc, tok

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat, namespaced metrics for MLflow (``eval/accuracy``, ``eval/tokens_low``, ...)."""
        eps = self.episodes
        out = {
            **score_metrics(prefix, self.accuracy, self.tokens, self.by_level),
            f"{prefix}/cost": float(np.mean([e.cost for e in eps])),
            f"{prefix}/chains": float(np.mean([e.chains for e in eps])),
            f"{prefix}/steps": float(np.mean([e.steps for e in eps])),
            f"{prefix}/return": float(np.mean([e.ret for e in eps])),
            f"{prefix}/episodes": float(len(eps)),
            f"{prefix}/wall_s": self.wall_s,
        }
        return out

    def rows(self) -> list[dict[str, Any]]:
        """The per-episode table, one dict per episode."""
        base = {
            "policy": self.policy,
            "family": self.family,
            "param": self.param,
            "train_seed": "" if self.train_seed is None else self.train_seed,
        }
        return [{**base, **dataclasses.asdict(e)} for e in self.episodes]

    def write_csv(self, path: str | Path) -> Path:
        """Write the per-episode table as CSV."""
        return write_rows(path, self.rows())


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write dict rows (same keys) as a CSV file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return p


class Evaluator:
    """Runs policies on every (question x seed) episode of a split, reusing the flattened bank.

    Args:
        bank: a :class:`~env.bank.store.TraceBank` or its folder.
        split: the questions evaluated (``test``, or ``dev`` when tuning; ``None`` or ``""`` for
            all recorded ones; see :func:`~env.questions.select_split`).
        seeds: generator seeds: a count (``0..seeds-1``) or the seeds themselves.
        config: env settings (unset: the bank's own, as :class:`BatchedReplayEnv` picks them);
            its ``aggregate`` is replaced by each policy's, and ``probe`` is turned off for a
            policy that reads no probe (``uses_probes = False``).
        difficulty: the ``difficulty`` feature's predictor: ``"auto"`` (fitted once on the
            bank's training questions, ``fit`` ones for ``dev``), ``None`` (0.5) or a ``callable(question, first_chunk)``.
        hidden: the hidden-state probes for rules that read the model's state and have none of
            their own (``probe-stop``, ``best-of-N-probe``): ``"auto"`` (fitted once, when
            first needed, on the bank's annotated training questions, ``fit`` ones for ``dev``:
            :meth:`~env.episode.hidden.HiddenProbes.fit`), ``None`` (such a rule is refused), or
            :class:`~env.episode.hidden.HiddenProbes`. A learned policy trained with hidden
            states always runs with its own.
        max_envs: episodes stepped at once (more are run in batches).
        n_boot: bootstrap resamples for the intervals.
        config_fields: :class:`EnvConfig` fields, instead of ``config``.
    """

    def __init__(
        self,
        bank: TraceBank | str | Path,
        *,
        split: str | None = "test",
        seeds: int | Sequence[int] = 5,
        config: EnvConfig | None = None,
        difficulty: Any = "auto",
        hidden: HiddenProbes | str | None = "auto",
        max_envs: int = 8192,
        n_boot: int = 2000,
        **config_fields: Any,
    ) -> None:
        if config is not None and config_fields:
            raise ConfigError("pass either config or its fields, not both")
        self.bank = bank if isinstance(bank, TraceBank) else TraceBank(bank)
        self.split = split or ""
        seed_list = list(range(seeds)) if isinstance(seeds, int | np.integer) else list(seeds)
        if not seed_list or any(int(s) < 0 for s in seed_list):
            raise ConfigError(f"seeds must be a positive count or non-negative seeds, got {seeds}")
        self.seeds = tuple(int(s) for s in seed_list)
        self.questions = select_split(self.bank.questions, self.split)
        if not self.questions:
            raise ConfigError(
                f"the bank at {self.bank.path} has no recorded {self.split or 'any'!r} questions"
            )
        if isinstance(difficulty, str):
            if difficulty != "auto":
                raise ConfigError(f"difficulty must be 'auto', None or a callable: {difficulty!r}")
            difficulty = bank_difficulty(self.bank, training_split(self.split))
        self.difficulty = difficulty
        if isinstance(hidden, str) and hidden != "auto":
            raise ConfigError(f"hidden must be 'auto', None or HiddenProbes, got {hidden!r}")
        self._hidden = hidden
        self.max_envs = int(max_envs)
        self.n_boot = int(n_boot)
        self._envs: dict[tuple[EnvConfig, int], BatchedReplayEnv] = {}
        n = len(self.questions) * len(self.seeds)
        # Episodes question-major: (q0, s0), (q0, s1), ..., (q1, s0), ...
        self._q = np.repeat(np.arange(len(self.questions)), len(self.seeds))
        self._s = np.tile(np.asarray(self.seeds, np.int64), len(self.questions))
        self.num_envs = min(n, self.max_envs)
        self.config = (
            config
            if config is not None
            else EnvConfig.from_manifest(self.bank.manifest, **config_fields)
        )

    @property
    def hidden_probes(self) -> HiddenProbes | str | None:
        """The ``hidden`` it was given (probes, ``"auto"`` or ``None``)."""
        return self._hidden

    @property
    def bank_name(self) -> str:
        return self.bank.path.resolve().name

    @property
    def episodes(self) -> int:
        return int(self._q.size)

    @property
    def hidden(self) -> HiddenProbes:
        """The evaluator's own hidden-state probes (fitted on first use with ``hidden="auto"``).

        Raises:
            ConfigError: the evaluator was given ``hidden=None``.
            BankError: the bank is not annotated (the message says what to run).
        """
        if self._hidden is None:
            raise ConfigError(
                "a policy reads the model's hidden states and has no probes of its own, and "
                "this evaluator was given hidden=None: pass hidden='auto' (probes fitted on the "
                "bank's training questions) or HiddenProbes"
            )
        if isinstance(self._hidden, str):
            from threadpoolctl import threadpool_limits

            from env.episode.hidden import HiddenProbes

            train = training_split(self.split)
            pool = (
                self.bank.questions
                if train == "train"
                else select_split(self.bank.questions, train)
            )
            with threadpool_limits(1):  # lbfgs on many threads of a busy CPU is far slower
                self._hidden = HiddenProbes.fit(self.bank, pool=pool, folds=0)
        return self._hidden

    def probes_for(self, policy: Policy) -> HiddenProbes | None:
        """The probes ``policy`` runs with: its own, the evaluator's for a rule that reads
        hidden states, ``None`` for one that reads none."""
        if not policy.reads_hidden:
            return None
        return policy.hidden_probes if policy.hidden_probes is not None else self.hidden

    def _env(
        self, aggregate: str, probe: bool = True, probes: HiddenProbes | None = None
    ) -> BatchedReplayEnv:
        """The env for ``aggregate``, ``probe`` and ``probes`` (one per setting: the flattened
        bank is reused)."""
        config = dataclasses.replace(
            self.config,
            aggregate=aggregate,  # type: ignore[arg-type]
            probe=self.config.probe and probe,
        )
        key = (config, id(probes))
        env = self._envs.get(key)
        if env is None:
            env = BatchedReplayEnv(
                self.bank,
                self.num_envs,
                split=self.split or None,
                config=config,
                difficulty=self.difficulty,
                probes=probes,
            )
            if [q.qid for q in env.questions] != [q.qid for q in self.questions]:
                raise ConfigError("the env's questions differ from the evaluator's")
            self._envs[key] = env
        return env

    def __call__(
        self,
        policy: Policy,
        *,
        family: str | None = None,
        param: str = "",
        train_seed: int | None = None,
    ) -> EvalResult:
        """Evaluate ``policy``: every (question x seed) episode once (``train_seed``: the seed
        a learned policy was trained with, kept with the result)."""
        # A policy that never reads a probe is not charged for probes.
        env = self._env(policy.aggregate, bool(policy.uses_probes), self.probes_for(policy))
        lam = policy.lam if isinstance(policy, LamConditioned) else None
        lam_used = env.config.lam if lam is None else float(lam)
        t0 = time.perf_counter()
        n = self.episodes
        cols: dict[str, np.ndarray] = {
            "correct": np.zeros(n, np.bool_),
            "answer": np.full(n, None, object),
            "decoded": np.zeros(n, np.int64),
            "tokens_deep": np.zeros(n, np.int64),
            "tokens_wide": np.zeros(n, np.int64),
            "cost": np.zeros(n, np.float64),
            "chains": np.zeros(n, np.int64),
            "steps": np.zeros(n, np.int64),
            "reason": np.full(n, "", object),
        }
        for start in range(0, n, env.num_envs):
            self._run_batch(policy, env, start, cols)
        wall = time.perf_counter() - t0
        qs = self.questions
        records = []
        for i in range(n):
            q = qs[int(self._q[i])]
            correct = bool(cols["correct"][i])
            cost = float(cols["cost"][i])
            records.append(
                EpisodeRecord(
                    qid=q.qid,
                    seed=int(self._s[i]),
                    level=level_label(q.difficulty),
                    correct=correct,
                    answer=cols["answer"][i],
                    decoded=int(cols["decoded"][i]),
                    cost=cost,
                    chains=int(cols["chains"][i]),
                    steps=int(cols["steps"][i]),
                    reason=str(cols["reason"][i]),
                    ret=env.config.correct_reward * correct - lam_used * cost,
                    deep=int(cols["tokens_deep"][i]),
                    wide=int(cols["tokens_wide"][i]),
                )
            )
        acc, tok, by = summarize_scores(
            [r.qid for r in records],
            [r.level for r in records],
            [float(r.correct) for r in records],
            [float(r.decoded) for r in records],
            n_boot=self.n_boot,
            deep=[float(r.deep) for r in records],
            wide=[float(r.wide) for r in records],
        )
        name = str(policy.name)
        return EvalResult(
            policy=name,
            family=family or name,
            param=param,
            bank=self.bank_name,
            split=self.split,
            seeds=self.seeds,
            config=env.config,
            episodes=records,
            accuracy=acc,
            tokens=tok,
            by_level=by,
            wall_s=wall,
            lam=lam_used if lam is not None else None,
            train_seed=train_seed,
        )

    def _run_batch(
        self, policy: Policy, env: BatchedReplayEnv, start: int, cols: dict[str, np.ndarray]
    ) -> None:
        b = env.num_envs
        n = self.episodes
        idx = np.arange(start, start + b) % n  # a short last batch repeats episodes: ignored
        keep = np.arange(start, start + b) < n
        out = run_pinned(policy, env, self._q[idx], self._s[idx], tuple(cols))
        for key in cols:
            cols[key][idx[keep]] = out[key][keep]


def run_pinned(
    policy: Policy,
    env: BatchedReplayEnv,
    questions: np.ndarray,
    gen_seeds: np.ndarray,
    keys: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One episode per env slot, slot ``i`` pinned to question ``questions[i]`` with the chain
    order of generator seed ``gen_seeds[i]``, each run exactly once (autoreset episodes are
    stopped at once and ignored). Returns ``info[key]`` of each slot's episode at its end."""
    b = env.num_envs
    obs, _ = env.reset(seed=seed, options={"questions": questions, "gen_seeds": gen_seeds})
    policy.reset(b, config=env.config)
    got = np.zeros(b, np.bool_)
    out: dict[str, np.ndarray] = {}
    limit = env.config.steps_limit + 2
    for _ in range(limit):
        a = np.asarray(policy.act(obs), dtype=np.int64)
        a = np.where(got, STOP, a)  # finished rows: end the autoreset episodes fast
        obs, _, term, trunc, info = env.step(a)
        done = term | trunc
        new = done & ~got
        if new.any():
            for key in keys:
                v = np.asarray(info[key])
                col = out.setdefault(key, np.zeros(b, v.dtype))
                col[new] = v[new]
            got |= new
        policy.end(done)
        if got.all():
            return out
    raise PolicyError(f"{policy.name}: episodes did not end within {limit} steps")


def evaluate(
    policy: Policy,
    bank: TraceBank | str | Path,
    *,
    split: str | None = "test",
    seeds: int | Sequence[int] = 5,
    config: EnvConfig | None = None,
    difficulty: Any = "auto",
    **config_fields: Any,
) -> EvalResult:
    """Evaluate one policy on every (question x seed) episode of ``split`` (see :class:`Evaluator`)."""
    ev = Evaluator(
        bank, split=split, seeds=seeds, config=config, difficulty=difficulty, **config_fields
    )
    return ev(policy)


# -- sweeps ------------------------------------------------------------------------------------


# -- headline metrics --------------------------------------------------------------------------
