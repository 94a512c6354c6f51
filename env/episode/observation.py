"""The observation of :class:`~env.episode.single.ComputeAllocationEnv`: every feature, documented.

Each feature is a number in [0, 1] (never NaN), computed from what was generated so far with the
pure functions of :mod:`features`. ``FEATURES`` is the schema: learned policies store the names
with their weights and refuse an environment whose schema differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from env.episode.hidden import HIDDEN_FEATURES, HIDDEN_NAMES, NEUTRAL, hidden_features
from features.probes import probe_stability, probe_streak
from features.votes import beta_leader_probability, esc_window_agrees, vote_counts

if TYPE_CHECKING:
    from env.episode.config import EnvConfig
    from env.episode.rules import ChainFold
    from env.episode.single import ChainState

__all__ = [
    "CONF_SCALE",
    "CURRENT_CHAIN_FEATURES",
    "ENTROPY_SCALE",
    "ESC_WINDOW",
    "FEATURES",
    "FEATURE_NAMES",
    "HIDDEN_SLICE",
    "N_FEATURES",
    "Feature",
    "EpisodeView",
    "clip01",
    "current_chain_features",
    "observe",
    "feature_table",
]

#: Token confidence (-mean top-k log-probability) is divided by this and clipped to [0, 1].
CONF_SCALE = 20.0
#: Token entropy (nats, over the renormalised top-k) is divided by this and clipped.
ENTROPY_SCALE = 2.0
#: Chains compared by ``window_agree`` (Early-Stopping Self-Consistency's window).
ESC_WINDOW = 4
#: Probes compared by ``cur_probe_stability``.
PROBE_WINDOW = 3
#: Streak and switch counts are divided by these and clipped.
STREAK_SCALE = 8.0
SWITCH_SCALE = 10.0


@dataclass(frozen=True, slots=True)
class Feature:
    """One observation entry."""

    name: str
    meaning: str

    def table_row(self) -> str:
        return f"| {self.name} | {self.meaning} |"


FEATURES: tuple[Feature, ...] = (
    Feature("budget_used", "decoded tokens / token_cap"),
    Feature("n_chains", "chains started / max_chains"),
    Feature("cur_tokens", "tokens of the current chain / max_chain_tokens (clipped)"),
    Feature("cur_ended", "1 if the current chain has ended"),
    Feature("cur_extensions", "budget-forced extensions of the current chain / extension_chunks"),
    Feature("cur_conf_mean", "mean token confidence of the current chain / 20 (DeepConf)"),
    Feature("cur_conf_last", "mean confidence of its last chunk / 20 (tail confidence)"),
    Feature("cur_conf_min", "lowest chunk-mean confidence / 20 (lowest group, window = a chunk)"),
    Feature("cur_entropy_last", "mean token entropy of its last chunk / 2 nats"),
    Feature(
        "cur_probe_stability", "share of its last 3 probe answers equal to the latest (Certaindex)"
    ),
    Feature("cur_probe_streak", "consecutive equal latest probe answers / 8 (clipped)"),
    Feature("cur_has_answer", "1 if the current chain has an answer (final or probe)"),
    Feature("cur_switches", "thought switches ('Wait', 'Alternatively', ...) in it / 10 (clipped)"),
    Feature("vote_share", "share of the chains' answers held by the leading answer"),
    Feature("vote_margin", "leader share - runner-up share"),
    Feature("distinct", "distinct answers / chains"),
    Feature("answered", "chains with an answer / chains"),
    Feature(
        "ended",
        "chains that have ended (their answer is final, not a probe's) / chains",
    ),
    Feature(
        "beta_leader",
        "P(leader's rate > runner-up's) under a Beta posterior (Adaptive-Consistency)",
    ),
    Feature("conf_vote_share", "leader share with votes weighted by chain confidence"),
    Feature("verified", "chains with a verifier score / chains"),
    Feature("cur_verifier", "verifier P(yes) of the current chain (0.5 if unscored)"),
    Feature("verifier_mean", "mean verifier P(yes) over scored chains (0.5 if none)"),
    Feature(
        "verifier_vote_share",
        "leader share with votes weighted by verifier P(yes) (0.5 if unscored)",
    ),
    Feature("cur_agrees", "1 if the current chain's answer equals the leading answer"),
    Feature(
        "window_agree",
        "1 if the last 4 chains started all have an answer and all answers are equal (ESC); "
        "0 with fewer than 4 chains",
    ),
    Feature(
        "difficulty", "predicted difficulty from the question and first chunk (0.5 if no predictor)"
    ),
    Feature("can_continue", "1 if continue can run"),
    Feature("can_branch", "1 if branch can run"),
    Feature("can_verify", "1 if verify has something new to score"),
    Feature("steps", "decisions taken / the episode's step limit"),
    # The model's own state (env.episode.hidden): NEUTRAL without probes.
    *(Feature(n, m) for n, m in HIDDEN_FEATURES),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
N_FEATURES = len(FEATURES)
_IX = {n: i for i, n in enumerate(FEATURE_NAMES)}
#: Where the hidden-state features sit in the observation (its last columns).
HIDDEN_SLICE = slice(_IX[HIDDEN_NAMES[0]], _IX[HIDDEN_NAMES[-1]] + 1)
assert FEATURE_NAMES[HIDDEN_SLICE] == HIDDEN_NAMES and HIDDEN_SLICE.stop == len(FEATURE_NAMES)


def feature_table() -> str:
    """The features as a Markdown table."""
    return "\n".join(["| feature | meaning |", "|---|---|", *(f.table_row() for f in FEATURES)])


@dataclass(slots=True)
class EpisodeView:
    """What :func:`observe` reads."""

    states: Sequence[ChainState]
    cur: int
    decoded: int
    steps: int
    difficulty: float | None
    mask: np.ndarray
    config: EnvConfig
    #: with probes: the question's predicted pass rate (``None``: no probes, NEUTRAL features)
    pass_rate: float | None = None


def clip01(x: float) -> float:
    """``x`` clipped to [0, 1] as every feature is (0 for NaN)."""
    if not math.isfinite(x):
        return 0.0
    return 0.0 if x < 0 else 1.0 if x > 1 else float(x)


#: The features of the current chain alone, in :data:`FEATURES` order (they are consecutive there):
#: what :func:`current_chain_features` gives.
CURRENT_CHAIN_FEATURES: tuple[str, ...] = (
    "cur_tokens",
    "cur_ended",
    "cur_extensions",
    "cur_conf_mean",
    "cur_conf_last",
    "cur_conf_min",
    "cur_entropy_last",
    "cur_probe_stability",
    "cur_probe_streak",
    "cur_has_answer",
    "cur_switches",
)
_CUR = slice(_IX[CURRENT_CHAIN_FEATURES[0]], _IX[CURRENT_CHAIN_FEATURES[-1]] + 1)
assert FEATURE_NAMES[_CUR] == CURRENT_CHAIN_FEATURES


def current_chain_features(
    s: ChainFold, *, tokens: int, ended: bool, config: EnvConfig
) -> tuple[float, ...]:
    """The :data:`CURRENT_CHAIN_FEATURES` of a chain in state ``s`` with ``tokens`` tokens."""
    chunk_conf, chunk_entropy, probes = s.chunk_conf, s.chunk_entropy, s.probes
    return (
        clip01(tokens / config.max_chain_tokens),
        float(ended),
        clip01(s.extensions / max(1, config.extension_chunks)),
        clip01(s.mean_confidence / CONF_SCALE),
        clip01(chunk_conf[-1] / CONF_SCALE) if chunk_conf else 0.0,
        clip01(min(chunk_conf) / CONF_SCALE) if chunk_conf else 0.0,
        clip01(chunk_entropy[-1] / ENTROPY_SCALE) if chunk_entropy else 0.0,
        clip01(probe_stability(probes, PROBE_WINDOW)) if probes else 0.0,
        clip01(probe_streak(probes) / STREAK_SCALE) if probes else 0.0,
        float(s.answer is not None),
        clip01(s.switches / SWITCH_SCALE),
    )


def _shares(
    answers: Sequence[str | None], weights: Sequence[float] | None
) -> tuple[Any, float, float]:
    counts = vote_counts(answers, weights)
    total = sum(counts.values())
    if total <= 0:
        return None, 0.0, 0.0
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])  # stable: first-seen wins ties
    top = ranked[0][1] / total
    second = ranked[1][1] / total if len(ranked) > 1 else 0.0
    return ranked[0][0], top, second


def observe(v: EpisodeView) -> np.ndarray:
    """The observation vector for an episode state."""
    from features.answers import answers_equal

    cfg = v.config
    x = np.zeros(N_FEATURES, dtype=np.float32)
    x[_IX["budget_used"]] = clip01(v.decoded / cfg.token_cap)
    n = len(v.states)
    x[_IX["n_chains"]] = clip01(n / cfg.max_chains)
    x[_IX["difficulty"]] = clip01(0.5 if v.difficulty is None else v.difficulty)
    x[_IX["can_continue"]] = float(v.mask[0])
    x[_IX["can_branch"]] = float(v.mask[1])
    x[_IX["can_verify"]] = float(v.mask[2])
    x[_IX["steps"]] = clip01(v.steps / cfg.steps_limit)
    x[HIDDEN_SLICE] = NEUTRAL
    x[_IX["cur_verifier"]] = 0.5
    x[_IX["verifier_mean"]] = 0.5
    if n == 0:
        x[_IX["beta_leader"]] = 0.5
        return x
    s = v.states[v.cur]
    c = s.chain
    x[_CUR] = current_chain_features(s, tokens=c.num_tokens, ended=c.finished, config=cfg)

    answers = [t.answer for t in v.states]
    answered = sum(a is not None for a in answers)
    leader, top, second = _shares(answers, None)
    x[_IX["vote_share"]] = clip01(top)
    x[_IX["vote_margin"]] = clip01(top - second)
    x[_IX["distinct"]] = clip01(len(vote_counts(answers)) / n)
    x[_IX["answered"]] = clip01(answered / n)
    x[_IX["ended"]] = clip01(sum(t.chain.finished for t in v.states) / n)
    counts = sorted(vote_counts(answers).values(), reverse=True)
    c1 = counts[0] if counts else 0.0
    c2 = counts[1] if len(counts) > 1 else 0.0
    x[_IX["beta_leader"]] = clip01(beta_leader_probability(c1, c2))
    conf = [t.confidence_weight for t in v.states]
    x[_IX["conf_vote_share"]] = clip01(_shares(answers, conf)[1])
    scored = [t.verifier for t in v.states if t.verifier is not None]
    x[_IX["verified"]] = clip01(len(scored) / n)
    if s.verifier is not None:
        x[_IX["cur_verifier"]] = clip01(s.verifier)
    if scored:
        x[_IX["verifier_mean"]] = clip01(float(np.mean(scored)))
    ver = [t.verifier if t.verifier is not None else 0.5 for t in v.states]
    x[_IX["verifier_vote_share"]] = clip01(_shares(answers, ver)[1])
    x[_IX["cur_agrees"]] = float(leader is not None and answers_equal(s.answer, leader))
    x[_IX["window_agree"]] = float(esc_window_agrees(answers, ESC_WINDOW))
    if v.pass_rate is not None:
        x[HIDDEN_SLICE] = hidden_features(
            answers, [t.right for t in v.states], v.cur, leader, v.pass_rate
        )
    return x
