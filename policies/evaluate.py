"""Evaluate policies on a bank's test questions: every question, every seed, exactly once.

:func:`evaluate` (or an :class:`Evaluator` reused across many policies) replays each
(question x seed) episode of a split once in :class:`~env.vector.BatchedReplayEnv`: episode
``(q, s)`` is pinned to question ``q`` with the chains handed out in the order generator seed
``s`` gives (``reset(options={"questions": ..., "gen_seeds": ...})``), so every policy sees the
same chains in the same order and the single environment would replay the very same episodes.
Each env's first finished episode is kept; the episodes the env starts by itself afterwards
(autoreset) are ignored.

Accuracy and mean decoded tokens come with per-question bootstrap intervals
(:mod:`policies.metrics`: a question's score is its mean over seeds, questions are resampled),
overall and per difficulty level of the bank's questions.

Sweeps: :func:`heuristic_sweeps` lists the fixed strategies with their parameter grids,
:func:`learned_sweep` a learned policy over ``lam``; :func:`evaluate_families` runs them and
:func:`headline` condenses each family into the numbers the comparison reports: tokens needed to
match best-of-16 majority voting (maj@16) within 0.5 point, accuracy at fixed mean budgets, the
area under the accuracy-tokens frontier, and the gap to the oracle (:mod:`policies.oracle`).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from env.bank import TraceBank
from env.compute_env import EnvConfig, bank_difficulty, select_split, training_split
from env.vector import BatchedReplayEnv
from features.errors import ConfigError, PolicyError
from policies.base import STOP, Policy
from policies.heuristics import (
    AdaptiveConsistency,
    BestOfN,
    BoundedThinking,
    BudgetForcing,
    DeepConfOnline,
    DifficultyRouter,
    EarlyStoppingSC,
    ProbeAgreement,
)
from policies.metrics import (
    FrontierPoint,
    Interval,
    accuracy_at_budget,
    bootstrap_mean,
    frontier_area,
    per_question_means,
    tokens_to_match,
)

__all__ = [
    "EpisodeRecord",
    "bank_config",
    "EvalResult",
    "Evaluator",
    "Family",
    "FamilySummary",
    "LevelStats",
    "MATCH_TOLERANCE",
    "evaluate",
    "evaluate_families",
    "headline",
    "heuristic_sweeps",
    "lam_of",
    "learned_sweep",
    "refine_sweep",
    "run_pinned",
    "level_label",
    "reference_result",
    "summarize_scores",
    "TARGET_SHARE",
    "ANY_LEARNED",
    "TargetCheck",
    "target_check",
    "write_rows",
]


#: "Matches maj@16" means an accuracy at least maj@16's minus this (0.5 point).
MATCH_TOLERANCE = 0.005


def level_label(difficulty: int | None) -> str:
    """The label of a bank question's difficulty level (``L3``; ``-`` when it has none)."""
    return f"L{difficulty}" if difficulty is not None else "-"


@dataclass(frozen=True, slots=True)
class EpisodeRecord:
    """One evaluated episode."""

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


@dataclass(frozen=True, slots=True)
class LevelStats:
    """Accuracy and tokens of the questions of one difficulty level."""

    questions: int
    accuracy: Interval
    tokens: Interval


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
) -> tuple[Interval, Interval, dict[str, LevelStats]]:
    acc = bootstrap_mean(per_question_means(qids, correct), n_boot=n_boot, seed=seed)
    tok = bootstrap_mean(per_question_means(qids, tokens), n_boot=n_boot, seed=seed)
    by: dict[str, LevelStats] = {}
    for lv in sorted(set(levels), key=_level_key):
        idx = [i for i, x in enumerate(levels) if x == lv]
        q = [qids[i] for i in idx]
        by[lv] = LevelStats(
            questions=len(set(q)),
            accuracy=bootstrap_mean(
                per_question_means(q, [correct[i] for i in idx]), n_boot=n_boot, seed=seed
            ),
            tokens=bootstrap_mean(
                per_question_means(q, [tokens[i] for i in idx]), n_boot=n_boot, seed=seed
            ),
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

    @property
    def label(self) -> str:
        """``family`` and ``param`` (``best-of-N N=16``), or the policy's name."""
        return f"{self.family} {self.param}".strip() if self.param else self.policy

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
        base = {"policy": self.policy, "family": self.family, "param": self.param}
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


def bank_config(bank: TraceBank, **fields: Any) -> EnvConfig:
    """Env settings for ``bank``: ``fields``, and the bank's own settings (chunking, chains,
    chain cap, extensions, probe size) for the rest, as :class:`BatchedReplayEnv` sets them."""
    m = bank.manifest
    fields.setdefault("chunk_tokens", m.chunk_tokens)
    fields.setdefault("max_chains", m.chains)
    fields.setdefault("max_chain_tokens", m.max_tokens)
    fields.setdefault("extension_chunks", m.extension_chunks)
    fields.setdefault("probe_tokens", m.probe_tokens)
    return EnvConfig(**fields)


class Evaluator:
    """Runs policies on every (question x seed) episode of a split, reusing the flattened bank.

    Args:
        bank: a :class:`~env.bank.TraceBank` or its folder.
        split: the questions evaluated (``test``, or ``dev`` when tuning; ``None`` or ``""`` for
            all recorded ones; see :func:`~env.compute_env.select_split`).
        seeds: generator seeds: a count (``0..seeds-1``) or the seeds themselves.
        config: env settings (unset: the bank's own, as :class:`BatchedReplayEnv` picks them);
            its ``aggregate`` is replaced by each policy's, and ``probe`` is turned off for a
            policy that reads no probe (``uses_probes = False``).
        difficulty: the ``difficulty`` feature's predictor: ``"auto"`` (fitted once on the
            bank's training questions, ``fit`` ones for ``dev``), ``None`` (0.5) or a ``callable(question, first_chunk)``.
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
        self.max_envs = int(max_envs)
        self.n_boot = int(n_boot)
        self._envs: dict[EnvConfig, BatchedReplayEnv] = {}
        n = len(self.questions) * len(self.seeds)
        # Episodes question-major: (q0, s0), (q0, s1), ..., (q1, s0), ...
        self._q = np.repeat(np.arange(len(self.questions)), len(self.seeds))
        self._s = np.tile(np.asarray(self.seeds, np.int64), len(self.questions))
        self.num_envs = min(n, self.max_envs)
        self.config = config if config is not None else bank_config(self.bank, **config_fields)

    @property
    def bank_name(self) -> str:
        return self.bank.path.resolve().name

    @property
    def episodes(self) -> int:
        return int(self._q.size)

    def _env(self, aggregate: str, probe: bool = True) -> BatchedReplayEnv:
        """The env for ``aggregate`` and ``probe`` (one per setting: the flattened bank is
        reused)."""
        config = dataclasses.replace(
            self.config,
            aggregate=aggregate,  # type: ignore[arg-type]
            probe=self.config.probe and probe,
        )
        env = self._envs.get(config)
        if env is None:
            env = BatchedReplayEnv(
                self.bank,
                self.num_envs,
                split=self.split or None,
                config=config,
                difficulty=self.difficulty,
            )
            if [q.qid for q in env.questions] != [q.qid for q in self.questions]:
                raise ConfigError("the env's questions differ from the evaluator's")
            self._envs[config] = env
        return env

    def __call__(self, policy: Policy, *, family: str | None = None, param: str = "") -> EvalResult:
        """Evaluate ``policy``: every (question x seed) episode once."""
        aggregate = getattr(policy, "aggregate", "majority")
        # A policy that never reads a probe is not charged for probes.
        env = self._env(aggregate, bool(getattr(policy, "uses_probes", True)))
        lam = getattr(policy, "lam", None)
        lam_used = float(lam) if isinstance(lam, int | float) else env.config.lam
        t0 = time.perf_counter()
        n = self.episodes
        cols: dict[str, np.ndarray] = {
            "correct": np.zeros(n, np.bool_),
            "answer": np.full(n, -1, np.int64),
            "decoded": np.zeros(n, np.int64),
            "cost": np.zeros(n, np.float64),
            "chains": np.zeros(n, np.int64),
            "steps": np.zeros(n, np.int64),
            "reason": np.zeros(n, np.int64),
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
                    answer=env.answer_text(int(self._q[i]), int(cols["answer"][i])),
                    decoded=int(cols["decoded"][i]),
                    cost=cost,
                    chains=int(cols["chains"][i]),
                    steps=int(cols["steps"][i]),
                    reason=env.reason_text(int(cols["reason"][i])),
                    ret=env.config.correct_reward * correct - lam_used * cost,
                )
            )
        acc, tok, by = summarize_scores(
            [r.qid for r in records],
            [r.level for r in records],
            [float(r.correct) for r in records],
            [float(r.decoded) for r in records],
            n_boot=self.n_boot,
        )
        name = str(getattr(policy, "name", type(policy).__name__))
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
    raise PolicyError(
        f"{getattr(policy, 'name', policy)}: episodes did not end within {limit} steps"
    )


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


@dataclass(frozen=True)
class Family:
    """A strategy and its operating points: ``(parameter label, policy)`` pairs.

    ``kind`` is ``heuristic`` or ``learned``.
    """

    name: str
    points: tuple[tuple[str, Policy], ...]
    kind: str = "heuristic"


def heuristic_sweeps(
    max_chains: int = 16,
    *,
    max_chain_tokens: int = 512,
    chunk_tokens: int = 64,
    extension_chunks: int = 2,
) -> list[Family]:
    """Every fixed heuristic family with its parameter grid, for chains of at most
    ``max_chain_tokens`` in chunks of ``chunk_tokens`` and up to ``max_chains`` chains.

    | family | grid |
    |---|---|
    | best-of-N (majority, confidence, verifier vote) | N in 1, 2, 4, 8, 16 (up to ``max_chains``) |
    | s1 budget forcing | budgets of 1, 2, 4, ... chunks up to the chain cap plus its extensions |
    | Adaptive-Consistency | Beta-rule thresholds 0.6, 0.8, 0.9, 0.95, 0.99 |
    | ESC | windows of 4 up to 4, 8, 16 chains |
    | DeepConf online | keep 10 % and 90 % |
    | probe agreement | k = 1, 2, 3, 4, 6 agreeing probes |
    | difficulty router | (easy, hard) thresholds (0.2, 0.5), (0.3, 0.7), (0.5, 0.9) |
    | bounded thinking | start 1, 2, 4 chunks, up to the chain cap |
    """
    if max_chains < 1:
        raise ConfigError(f"max_chains must be >= 1, got {max_chains}")
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max_chains]
    fams = [
        Family(
            "best-of-N" + ("" if agg == "majority" else f"-{agg}"),
            tuple((f"N={n}", BestOfN(n, agg)) for n in ns),  # type: ignore[arg-type]
        )
        for agg in ("majority", "confidence", "verifier")
    ]
    top = max_chain_tokens + extension_chunks * chunk_tokens
    budgets, b = [], chunk_tokens
    while b < top:
        budgets.append(b)
        b *= 2
    budgets.append(top)
    fams.append(Family("s1", tuple((f"B={b}", BudgetForcing(b)) for b in budgets)))
    fams.append(
        Family(
            "adaptive-consistency",
            tuple(
                (f"t={t:g}", AdaptiveConsistency(t, max_n=max_chains))
                for t in (0.6, 0.8, 0.9, 0.95, 0.99)
            ),
        )
    )
    w = EarlyStoppingSC.WINDOW
    fams.append(
        Family(
            "esc",
            tuple(
                (f"max={m}", _named(EarlyStoppingSC(max_n=m), f"esc-4-max{m}", m != 16))
                for m in sorted({min(max_chains, x) for x in (w, 2 * w, 4 * w)})
            ),
        )
    )
    fams.append(
        Family(
            "deepconf-online",
            tuple(
                (
                    f"keep={k}",
                    DeepConfOnline(n_init=min(4, max_chains), keep_percent=k, max_n=max_chains),
                )
                for k in (10, 90)
            ),
        )
    )
    fams.append(
        Family("probe-agree", tuple((f"k={k}", ProbeAgreement(k)) for k in (1, 2, 3, 4, 6)))
    )
    fams.append(
        Family(
            "router",
            tuple(
                (f"{e:g}-{h:g}", DifficultyRouter(e, h, n_medium=min(4, max_chains)))
                for e, h in ((0.2, 0.5), (0.3, 0.7), (0.5, 0.9))
            ),
        )
    )
    starts = [
        s for s in (chunk_tokens, 2 * chunk_tokens, 4 * chunk_tokens) if s <= max_chain_tokens
    ]
    fams.append(
        Family(
            "bounded",
            tuple((f"start={s}", BoundedThinking(s, max_chain_tokens)) for s in starts),
        )
    )
    return fams


def _named(policy: Any, name: str, rename: bool = True) -> Any:
    if rename:
        policy.name = name
    return policy


def learned_sweep(name: str, policy: Any, lams: Iterable[float]) -> Family:
    """A learned policy over ``lam``: ``policy.with_lam(lam)`` for each value."""
    if not callable(getattr(policy, "with_lam", None)):
        raise ConfigError(f"{name}: a learned sweep needs a policy with with_lam(lam)")
    return Family(
        name, tuple((f"lam={lam:g}", policy.with_lam(float(lam))) for lam in lams), "learned"
    )


def evaluate_families(
    evaluator: Evaluator,
    families: Sequence[Family],
    *,
    on_result: Callable[[EvalResult], None] | None = None,
) -> dict[str, list[EvalResult]]:
    """Evaluate every point of every family; ``on_result`` is called after each (progress)."""
    out: dict[str, list[EvalResult]] = {}
    for fam in families:
        res = []
        for param, policy in fam.points:
            r = evaluator(policy, family=fam.name, param=param)
            res.append(r)
            if on_result is not None:
                on_result(r)
        out[fam.name] = res
    return out


def lam_of(result: EvalResult) -> float:
    """The λ of a learned sweep's point (its ``lam=<value>`` parameter label)."""
    key, _, value = result.param.partition("=")
    if key != "lam":
        raise ConfigError(
            f"{result.label} is not a point of a learned sweep (param {result.param!r})"
        )
    return float(value)


def refine_sweep(
    evaluator: Evaluator,
    name: str,
    policy: Any,
    results: Sequence[EvalResult],
    *,
    extra: int = 3,
    ratio: float = 2.0,
    min_step: float = 1.05,
    on_result: Callable[[EvalResult], None] | None = None,
) -> list[EvalResult]:
    """A learned sweep with up to ``extra`` λ values added where its spending jumps.

    While two neighbouring λ values of the sweep differ in mean tokens by more than ``ratio``
    times, the widest such gap (by the token ratio) gets the geometric mean of its two λ (never
    closer than ``min_step`` times to either). A fixed grid is blind there: on the GSM8K bank a
    policy can go from 16 chains to one between two grid values, exactly across the budgets the
    frontier is read at, and chunk-level PPO went from 71 tokens at λ = 1.62e-3 to a whole chain
    (310) at 1.24e-3 on its dev questions. Where the points are placed depends on tokens only,
    never on accuracy. Returns all points, sorted by λ (the new ones evaluated and passed to
    ``on_result``).

    ``min_step`` 1.05 was chosen on the GSM8K dev questions (25-value grid, 3 extra points): the
    learned envelope was below the best heuristic at 14 of 31 budgets, 4 of them beyond the
    paired interval, with 1.25 (the earlier rule); 13 and 2 with 1.1; 13 and none with 1.05 or
    1.02."""
    if not callable(getattr(policy, "with_lam", None)):
        raise ConfigError(f"{name}: refining a sweep needs a policy with with_lam(lam)")
    if ratio <= 1:
        raise ConfigError(f"ratio must be > 1, got {ratio}")
    if min_step <= 1:
        raise ConfigError(f"min_step must be > 1, got {min_step}")
    pts = sorted(((lam_of(r), r) for r in results), key=lambda p: p[0])
    for _ in range(max(0, extra)):
        gaps = []
        for (l1, r1), (l2, r2) in itertools.pairwise(pts):
            lo, hi = sorted((r1.tokens.mean, r2.tokens.mean))
            jump = hi / max(lo, 1e-9)
            if jump > ratio and l2 > min_step**2 * l1:
                gaps.append((jump, l1, l2))
        if not gaps:
            break
        _, l1, l2 = max(gaps)
        # the geometric mean, to as few significant digits (2 to 4) as keep it min_step from
        # both ends; unrounded if none does (the mean itself always does: see the gap test)
        lam = mid = math.sqrt(l1 * l2)
        for digits in (2, 3, 4):
            x = float(f"{mid:.{digits}g}")
            if l1 * min_step <= x * (1 + 1e-9) and x <= l2 / min_step * (1 + 1e-9):
                lam = x
                break
        r = evaluator(policy.with_lam(lam), family=name, param=f"lam={lam:g}")
        if on_result is not None:
            on_result(r)
        pts = sorted([*pts, (lam, r)], key=lambda p: p[0])
    return [r for _, r in pts]


# -- headline metrics --------------------------------------------------------------------------


@dataclass
class FamilySummary:
    """A family's headline numbers (see :func:`headline`).

    Attributes:
        family: its name; ``kind``: heuristic / learned.
        best: its most accurate point (fewest tokens among equals).
        match: its cheapest point within :data:`MATCH_TOLERANCE` of the reference (maj@16)
            accuracy (``None`` if none reaches it).
        tokens_to_match: that point's mean tokens, with a paired bootstrap interval over
            questions (the reference's accuracy recomputed on each resample); ``nan`` if none.
        match_rate: share of bootstrap resamples in which some point matched.
        accuracy_at: best accuracy with mean tokens <= each budget (``nan``: none that cheap).
        area: mean best accuracy over the budget range (:func:`policies.metrics.frontier_area`).
        oracle_gap: oracle accuracy - the family's best accuracy (``nan`` without an oracle).
    """

    family: str
    kind: str
    points: list[EvalResult]
    best: EvalResult
    match: EvalResult | None
    tokens_to_match: Interval
    match_rate: float
    accuracy_at: dict[float, float]
    area: float
    oracle_gap: float
    extra: dict[str, float] = field(default_factory=dict)


def reference_result(results: dict[str, list[EvalResult]], n: int = 16) -> EvalResult | None:
    """The best-of-``n`` majority result (maj@n) among ``results`` (the largest N up to ``n``)."""
    fam = results.get("best-of-N", [])
    best = None
    for r in fam:
        k = int(r.param.removeprefix("N=")) if r.param.startswith("N=") else 0
        if k <= n and (best is None or k > int(best.param.removeprefix("N="))):
            best = r
    return best


def _bootstrap_idx(nq: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, nq, size=(n_boot, nq))


def headline(
    results: dict[str, list[EvalResult]],
    *,
    reference: EvalResult,
    budgets: Sequence[float],
    area_range: tuple[float, float],
    oracle_accuracy: float | None = None,
    kinds: dict[str, str] | None = None,
    tolerance: float = MATCH_TOLERANCE,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[FamilySummary]:
    """Per-family headline metrics against ``reference`` (maj@16).

    Every result must cover the same questions (one :class:`Evaluator`): the bootstrap for
    tokens-to-match resamples questions once for all points and the reference together.
    """
    ref_q, ref_acc, _ = reference.per_question()
    idx = _bootstrap_idx(len(ref_q), n_boot, seed)
    ref_b = ref_acc[idx].mean(axis=1)
    out = []
    for fam, res in results.items():
        if not res:
            continue
        pts = [(r.tokens.mean, r.accuracy.mean) for r in res]
        best = max(res, key=lambda r: (r.accuracy.mean, -r.tokens.mean))
        target = reference.accuracy.mean
        t_match = tokens_to_match(pts, target, tolerance)
        match = None
        if not math.isnan(t_match):
            match = min(
                (r for r in res if r.accuracy.mean >= target - tolerance),
                key=lambda r: r.tokens.mean,
            )
        accs, toks = [], []
        for r in res:
            q, a, t = r.per_question()
            if q != ref_q:
                raise ConfigError(f"{r.label} was evaluated on other questions than the reference")
            accs.append(a[idx].mean(axis=1))
            toks.append(t[idx].mean(axis=1))
        a_b, t_b = np.stack(accs), np.stack(toks)  # [points, n_boot]
        ok = a_b >= ref_b[None, :] - tolerance
        tm = np.where(ok, t_b, np.inf).min(axis=0)
        found = np.isfinite(tm)
        rate = float(found.mean())
        if math.isnan(t_match):
            interval = Interval(float("nan"), float("nan"), float("nan"))
        else:
            # Resamples where nothing matches count as "more than any point": the upper end
            # is then unbounded (inf), which the table shows as such.
            # (quantiles without interpolation: between two inf resamples it would give nan)
            lo, hi = np.quantile(np.where(found, tm, np.inf), [0.025, 0.975], method="inverted_cdf")
            interval = Interval(t_match, float(lo), float(hi))
        acc_at = {float(b): accuracy_at_budget(pts, float(b)) for b in budgets}
        lo_t, hi_t = area_range
        area = frontier_area(pts, lo_t, hi_t) if hi_t > lo_t else float("nan")
        gap = oracle_accuracy - best.accuracy.mean if oracle_accuracy is not None else float("nan")
        out.append(
            FamilySummary(
                family=fam,
                kind=(kinds or {}).get(fam, "heuristic"),
                points=res,
                best=best,
                match=match,
                tokens_to_match=interval,
                match_rate=rate,
                accuracy_at=acc_at,
                area=area,
                oracle_gap=gap,
            )
        )
    return out


# -- the product's target ----------------------------------------------------------------------

#: The target: a learned policy matches maj@16 with at most this share of its mean tokens ...
TARGET_SHARE = 0.15


@dataclass
class TargetCheck:
    """How one learned family stands against the product's target (:func:`target_check`).

    Attributes:
        family: the learned family.
        share: its tokens to match maj@16 / maj@16's mean tokens (``nan``: it never matches).
        budgets: the budgets compared: every heuristic operating point's mean tokens up to
            maj@16's.
        shortfalls: ``(budget, heuristic point, its accuracy, the family's best accuracy at <=
            budget)`` where the family is more than the tolerance below the best heuristic
            (``nan`` accuracy: it has no point that cheap).
        clear: the shortfalls' budgets where the family has a point that cheap and is below
            beyond sampling noise: the paired bootstrap interval over questions (95%) of the heuristic's
            accuracy minus the family's lies wholly above the tolerance. The others may be noise.
    """

    family: str
    share: float
    budgets: list[float]
    shortfalls: list[tuple[float, str, float, float]]
    clear: list[float] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        """Matches maj@16 with at most :data:`TARGET_SHARE` of its tokens."""
        return math.isfinite(self.share) and self.share <= TARGET_SHARE

    @property
    def frontier_ok(self) -> bool:
        """At or above the best heuristic at every budget (within the tolerance)."""
        return not self.shortfalls

    @property
    def met(self) -> bool:
        return self.matches and self.frontier_ok

    @property
    def worst(self) -> tuple[float, str, float, float] | None:
        """The largest shortfall among budgets where the family has a point that cheap."""
        gaps = [x for x in self.shortfalls if not math.isnan(x[3])]
        return max(gaps, key=lambda x: x[2] - x[3]) if gaps else None

    def describe(self) -> str:
        """One line: both halves of the target, with the numbers behind them."""
        if math.isfinite(self.share):
            head = f"matches maj@16 with {100 * self.share:.0f}% of its tokens"
        else:
            head = "never matches maj@16"
        head += f" (target <= {100 * TARGET_SHARE:.0f}%: {'met' if self.matches else 'not met'})"
        n, k = len(self.budgets), len(self.shortfalls)
        if not k:
            return f"{head}; at or above the best heuristic at all {n} budgets (met)"
        parts = [
            f"{head}; below the best heuristic at {k} of {n} budgets (not met; "
            f"{len(self.clear)} of them beyond the paired 95% interval)"
        ]
        worst = self.worst
        if worst is not None:
            b, label, h_acc, l_acc = worst
            parts.append(
                f"most at {b:.0f} tokens: {label} {100 * h_acc:.1f}% against {100 * l_acc:.1f}%"
            )
        uncovered = [x[0] for x in self.shortfalls if math.isnan(x[3])]
        if uncovered:
            parts.append(
                f"no point as cheap as {len(uncovered)} budget(s) up to {max(uncovered):.0f} tokens"
            )
        return "; ".join(parts)


#: The name of :func:`target_check`'s row for the envelope of all learned families.
ANY_LEARNED = "any-learned"


def target_check(
    results: dict[str, list[EvalResult]],
    *,
    reference: EvalResult,
    kinds: dict[str, str],
    tolerance: float = MATCH_TOLERANCE,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[TargetCheck]:
    """Each learned family against the target: it matches maj@16 (within ``tolerance``) with at
    most :data:`TARGET_SHARE` of its tokens, and at every budget up to maj@16's tokens its best
    accuracy is at or above the best heuristic's (within ``tolerance``). Point estimates decide;
    each shortfall is also tested with a paired bootstrap over questions (``n_boot`` resamples,
    the same for every comparison), and :attr:`TargetCheck.clear` lists those beyond noise.

    With two or more learned families a last row, :data:`ANY_LEARNED`, checks the envelope of
    all their points, which is what the heuristics are held to (the best of every heuristic
    family at each budget)."""
    ref_tokens = reference.tokens.mean
    heur = [
        r
        for fam, res in results.items()
        if kinds.get(fam, "heuristic") == "heuristic"
        for r in res
        if r.tokens.mean <= ref_tokens * (1 + 1e-9)
    ]
    budgets = sorted({r.tokens.mean for r in heur})
    ref_q = reference.per_question()[0]
    idx = _bootstrap_idx(len(ref_q), n_boot, seed)

    def clearly_below(heuristic: EvalResult, mine: EvalResult) -> bool:
        (qh, ah, _), (qm, am, _) = heuristic.per_question(), mine.per_question()
        if qh != ref_q or qm != ref_q:
            raise ConfigError(f"{mine.label} was evaluated on other questions than the reference")
        gap = (ah - am)[idx].mean(axis=1)
        return bool(np.quantile(gap, 0.025) > tolerance)

    def check(fam: str, res: list[EvalResult]) -> TargetCheck:
        pts = [(r.tokens.mean, r.accuracy.mean) for r in res]
        t_match = tokens_to_match(pts, reference.accuracy.mean, tolerance)
        shortfalls, clear = [], []
        for b in budgets:
            best_h = max((r for r in heur if r.tokens.mean <= b), key=lambda r: r.accuracy.mean)
            mine = accuracy_at_budget(pts, b)
            if math.isnan(mine) or mine < best_h.accuracy.mean - tolerance:
                shortfalls.append((b, best_h.label, best_h.accuracy.mean, mine))
                if not math.isnan(mine):
                    at_b = max(
                        (r for r in res if r.tokens.mean <= b),
                        key=lambda r: (r.accuracy.mean, -r.tokens.mean),
                    )
                    if clearly_below(best_h, at_b):
                        clear.append(b)
        return TargetCheck(fam, t_match / ref_tokens, budgets, shortfalls, clear)

    learned = {f: res for f, res in results.items() if kinds.get(f) == "learned" and res}
    out = [check(f, res) for f, res in learned.items()]
    if len(learned) > 1:
        out.append(check(ANY_LEARNED, [r for res in learned.values() for r in res]))
    return out
