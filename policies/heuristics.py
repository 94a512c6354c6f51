"""Every fixed strategy a user would otherwise pick, as batched policies over the same env.

Each heuristic reads only the observation (and its own per-episode state), so it runs unchanged
on one live episode or on thousands of replayed ones (:class:`env.episode.vector.BatchedReplayEnv`). The
decision rules follow the papers; where the environment makes a rule differ, the class says so.

| policy | rule | source |
|---|---|---|
| :class:`SingleChain` | one chain to its end | - |
| :class:`BestOfN` | N chains to their ends, then majority / confidence / verifier vote | self-consistency, DeepConf offline, best-of-N |
| :class:`BudgetForcing` | one chain continued (past its end with ``Wait,``) up to a token budget | s1 |
| :class:`AdaptiveConsistency` | chains one at a time until P(leader stays leader) under a Beta posterior >= threshold | Aggarwal et al. 2023 |
| :class:`EarlyStoppingSC` | windows of w chains until one window agrees | ESC, Li et al. 2024 |
| :class:`VerifyStop` | chains one at a time, each verified when it ends, until one passes the verifier | generate-and-filter with an early exit (AlphaCode, CodeT) |
| :class:`DeepConfOnline` | warm-up chains set a confidence threshold; chains dipping below are cut; stop at consensus | DeepConf, Fu et al. 2025 |
| :class:`ProbeAgreement` | one chain, stop when the last k probe answers agree | Dynasor / Certaindex |
| :class:`DifficultyRouter` | first-chunk difficulty: easy -> one chain, medium -> parallel + verifier, hard -> serial | compute-optimal scaling, Snell et al. 2024 |
| :class:`BoundedThinking` | think to a budget; stop if confident, else double the budget | latency-bounded thinking |
| :class:`RandomPolicy` | uniform over the available actions (data collection, baselines) | - |
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from env.episode.config import AGGREGATES
from env.episode.observation import CONF_SCALE, STREAK_SCALE
from features.errors import ConfigError
from policies.base import BRANCH, CONTINUE, STOP, VERIFY, BasePolicy, ObsView

__all__ = [
    "AdaptiveConsistency",
    "BestOfN",
    "BoundedThinking",
    "BudgetForcing",
    "DeepConfOnline",
    "DifficultyRouter",
    "EarlyStoppingSC",
    "ProbeAgreement",
    "RandomPolicy",
    "SingleChain",
    "VerifyStop",
]

Aggregate = Literal["majority", "confidence", "verifier", "probe", "probe-best"]


def _positive(v: float, what: str) -> None:
    if not (v > 0):
        raise ConfigError(f"{what} must be > 0, got {v!r}")


def _open(v: ObsView) -> np.ndarray:
    """The current chain is still going and can take another chunk."""
    return v.flag("can_continue") & ~v.flag("cur_ended")


class SingleChain(BasePolicy):
    """One chain, continued until it ends (or cannot go on), then stop."""

    name = "single"
    uses_probes = False
    acts_between_chains = True

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        return np.where(_open(v), CONTINUE, STOP)


class BestOfN(BasePolicy):
    """``n`` chains, each run to its end, then the vote (``aggregate``); the verifier variant
    scores every chain once before answering.

    Args:
        n: chains.
        aggregate: ``majority`` (self-consistency), ``confidence`` (DeepConf offline weighting),
            ``verifier`` (verifier-weighted best-of-N), ``probe`` (votes weighted by the
            hidden-state probe's P(right)) or ``probe-best`` (the chain the probe rates highest).
    """

    def __init__(self, n: int, aggregate: Aggregate = "majority") -> None:
        if n < 1:
            raise ConfigError(f"best-of-N needs n >= 1, got {n}")
        if aggregate not in AGGREGATES:
            raise ConfigError(
                f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}"
            )
        self.n_chains = int(n)
        self.planned_chains = self.n_chains
        self.uses_probes = False
        self.acts_between_chains = True
        self.aggregate = aggregate
        self.name = f"best-of-{n}" + ("" if aggregate == "majority" else f"-{aggregate}")
        super().__init__()

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        more = (v.n_chains < self.n_chains) & v.flag("can_branch")
        last = STOP
        if self.aggregate == "verifier":
            last = np.where(v.flag("can_verify"), VERIFY, STOP)  # type: ignore[assignment]
        return np.where(_open(v), CONTINUE, np.where(more, BRANCH, last))


class BudgetForcing(BasePolicy):
    """s1 budget forcing: one chain held to ``budget`` tokens.

    A chain that ends early is continued past its end (the env appends ``Wait,``) while
    extensions remain; at the budget the episode stops and the chain's latest answer (its
    answer-forcing probe) is given.
    """

    def __init__(self, budget: int) -> None:
        _positive(budget, "budget")
        self.budget = int(budget)
        self.name = f"s1-{budget}"
        super().__init__()

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        go = v.flag("can_continue") & (v.cur_tokens < self.budget - 0.5)
        return np.where(go, CONTINUE, STOP)


class AdaptiveConsistency(BasePolicy):
    """Adaptive-Consistency's Beta stopping rule.

    Chains are sampled one at a time, each to its end. After each, with ``v1`` and ``v2`` the
    votes of the two leading answers, stop if ``P(p1 > p2) >= threshold`` for
    ``(p1, p2)`` under the posterior ``Beta(v1 + 1, v2 + 1)`` (the ``beta_leader`` feature), or
    when ``max_n`` chains are spent.
    """

    def __init__(self, threshold: float = 0.95, max_n: int = 16) -> None:
        if not 0 < threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = float(threshold)
        self.max_n = int(max_n)
        self.uses_probes = False
        self.acts_between_chains = True
        self.name = f"adaptive-consistency-{threshold:g}"
        super().__init__()

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        sure = v["beta_leader"] >= self.threshold
        more = (v.n_chains < self.max_n) & v.flag("can_branch")
        return np.where(_open(v), CONTINUE, np.where(sure | ~more, STOP, BRANCH))


class ProbeStop(BasePolicy):
    """LYNX-style early exit on the model's own state (arXiv 2512.05325), as a fixed rule.

    Chains are read one at a time, chunk by chunk. Stop as soon as the current chain has an
    answer (its final one, or its answer-forcing probe's) and the chain-correctness probe gives
    it P(right) >= ``threshold`` (the ``cur_right`` feature); the answer is then the chain the
    probe rates highest (``aggregate="probe-best"``). A chain that ends below the threshold
    gives way to a new one, up to ``max_n``; then stop.
    """

    aggregate = "probe-best"

    def __init__(self, threshold: float = 0.8, max_n: int = 16) -> None:
        if not 0 < threshold < 1:
            raise ConfigError(f"threshold must be in (0, 1), got {threshold}")
        _positive(max_n, "max_n")
        self.threshold = float(threshold)
        self.max_n = int(max_n)
        self.name = f"probe-stop-{threshold:g}"
        super().__init__()

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        sure = v.flag("cur_has_answer") & (v["cur_right"] >= self.threshold)
        more = (v.n_chains < self.max_n) & v.flag("can_branch")
        nxt = np.where(more, BRANCH, STOP)
        return np.where(sure, STOP, np.where(_open(v), CONTINUE, nxt))


class EarlyStoppingSC(BasePolicy):
    """ESC: chains in windows of ``window`` (4, the ``window_agree`` feature's width); after a
    full window, stop if all its answers agree, else sample the next window (up to ``max_n``:
    named ``esc-4`` for 16, ``esc-4-max<max_n>`` otherwise)."""

    WINDOW = 4

    def __init__(self, max_n: int = 16) -> None:
        self.max_n = int(max_n)
        self.planned_chains = self.WINDOW
        self.uses_probes = False
        self.acts_between_chains = True
        self.name = f"esc-{self.WINDOW}" + ("" if self.max_n == 16 else f"-max{self.max_n}")
        super().__init__()

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        n = v.n_chains
        boundary = (n % self.WINDOW) == 0
        agree = boundary & v.flag("window_agree")
        more = (n < self.max_n) & v.flag("can_branch")
        return np.where(_open(v), CONTINUE, np.where(agree | ~more, STOP, BRANCH))


class VerifyStop(BasePolicy):
    """Chains one at a time, each verified when it ends; stop at the first whose verifier score
    is at least ``threshold``, else draw the next, up to ``max_n`` chains; the answer is the
    verifier-weighted vote (named ``verify-stop-T``, with ``-max<max_n>`` below 16).

    With execution verification (a code bank's score is the share of its docstring's examples a
    program passes, :class:`env.verifiers.ExecutionVerifier`) and ``threshold`` 1 this is
    "generate until a program passes the visible tests": the filtering of AlphaCode and CodeT
    with an early exit, the fixed rule a learned policy that may verify has to beat on code. A
    question whose prompt shows no example scores every chain 0.5, so it draws all ``max_n``
    and the vote is the plain majority. With a model's own yes/no as the verifier it stops on
    the first chain the model calls right.
    """

    aggregate = "verifier"

    def __init__(self, threshold: float = 1.0, max_n: int = 16) -> None:
        if not 0.5 < threshold <= 1:
            raise ConfigError(
                f"threshold must be in (0.5, 1] (an unscored chain scores 0.5), got {threshold}"
            )
        _positive(max_n, "max_n")
        self.threshold = float(threshold)
        self.max_n = int(max_n)
        self.uses_probes = False
        self.acts_between_chains = True
        self.name = f"verify-stop-{threshold:g}" + ("" if self.max_n == 16 else f"-max{max_n}")
        super().__init__()

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        check = v.flag("can_verify")
        passed = v["cur_verifier"] >= self.threshold
        more = (v.n_chains < self.max_n) & v.flag("can_branch")
        after = np.where(check, VERIFY, np.where(passed | ~more, STOP, BRANCH))
        return np.where(_open(v), CONTINUE, after)


class ProbeAgreement(BasePolicy):
    """Dynasor-style early exit: one chain, probed after every chunk; stop once the last ``k``
    probe answers agree (or the chain ends)."""

    def __init__(self, k: int = 3) -> None:
        if not 1 <= k <= int(STREAK_SCALE):
            raise ConfigError(f"k must be in 1..{int(STREAK_SCALE)}, got {k}")
        self.k = int(k)
        self.name = f"probe-agree-{k}"
        super().__init__()

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        streak = np.rint(v["cur_probe_streak"] * STREAK_SCALE)
        settled = v.flag("cur_has_answer") & (streak >= self.k)
        return np.where(_open(v) & ~settled, CONTINUE, STOP)


class DeepConfOnline(BasePolicy):
    """DeepConf online (Fu et al., 2025), with votes weighted by confidence.

    ``n_init`` warm-up chains run to their ends; the threshold is the ``100 - keep_percent``
    percentile of their lowest group confidences (``cur_conf_min``; a group is a chunk). Then
    each new chain is cut as soon as its lowest group confidence falls below the threshold, and
    the episode stops once the leading answer holds ``consensus`` of the (confidence-weighted)
    vote, or after ``max_n`` chains.

    Difference from the paper: a cut chain keeps its latest probe answer in the vote (the env has
    no "discard"), down-weighted by its low confidence.
    """

    aggregate = "confidence"

    def __init__(
        self,
        n_init: int = 4,
        keep_percent: float = 90.0,
        consensus: float = 0.95,
        max_n: int = 16,
    ) -> None:
        if n_init < 1 or not 0 < keep_percent <= 100 or not 0 < consensus <= 1:
            raise ConfigError("need n_init >= 1, 0 < keep_percent <= 100, 0 < consensus <= 1")
        self.n_init = int(n_init)
        self.keep_percent = float(keep_percent)
        self.consensus = float(consensus)
        self.max_n = int(max_n)
        self.name = f"deepconf-online-{keep_percent:g}"
        super().__init__()

    def _reset_state(self, n: int) -> None:
        self.warm = np.full((n, self.n_init), np.nan)
        self.seen = np.zeros(n, dtype=np.int64)  # chains whose warm-up minimum is recorded
        self.threshold = np.full(n, np.nan)

    def _clear(self, done: np.ndarray) -> None:
        self.warm[done] = np.nan
        self.seen[done] = 0
        self.threshold[done] = np.nan

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        n = v.n_chains
        ended = ~_open(v)
        conf_min = v["cur_conf_min"] * CONF_SCALE
        # record a warm-up chain's lowest group confidence once it has ended
        rec = ended & (n <= self.n_init) & (self.seen < n)
        rows = np.flatnonzero(rec)
        self.warm[rows, n[rows] - 1] = conf_min[rows]
        self.seen[rows] = n[rows]
        warming = n < self.n_init
        fix = np.isnan(self.threshold) & (n >= self.n_init) & ended
        if fix.any():
            warm = self.warm[fix]
            seen = ~np.isnan(warm).all(axis=1)  # a warm-up with no recorded chain sets no threshold
            th = np.full(warm.shape[0], np.nan)
            if seen.any():
                th[seen] = np.nanpercentile(warm[seen], 100.0 - self.keep_percent, axis=1)
            self.threshold[fix] = th
        cut = (n > self.n_init) & ~ended & (conf_min < self.threshold)
        done_chain = ended | cut
        agreed = v["conf_vote_share"] >= self.consensus
        more = (n < self.max_n) & v.flag("can_branch")
        after = np.where(warming & more, BRANCH, np.where(~warming & agreed | ~more, STOP, BRANCH))
        return np.where(done_chain, after, CONTINUE)


class DifficultyRouter(BasePolicy):
    """Compute-optimal routing on predicted difficulty (the ``difficulty`` feature, read after
    the first chunk): below ``easy`` one chain to its end; above ``hard`` one chain run serially
    as far as it goes (budget forcing past its end); in between ``n_medium`` parallel chains,
    verified, with a verifier-weighted vote. Needs an env with a difficulty predictor
    (``difficulty="auto"``)."""

    aggregate = "verifier"

    def __init__(self, easy: float = 0.3, hard: float = 0.7, n_medium: int = 4) -> None:
        if not 0 <= easy <= hard <= 1:
            raise ConfigError(f"need 0 <= easy <= hard <= 1, got {easy}, {hard}")
        self.easy, self.hard, self.n_medium = float(easy), float(hard), int(n_medium)
        self.name = f"router-{easy:g}-{hard:g}"
        super().__init__()

    def _reset_state(self, n: int) -> None:
        self.mode = np.full(n, -1, dtype=np.int64)

    def _clear(self, done: np.ndarray) -> None:
        self.mode[done] = -1

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        d = v["difficulty"]
        unset = self.mode < 0
        self.mode[unset] = np.where(d[unset] < self.easy, 0, np.where(d[unset] >= self.hard, 2, 1))
        is_open = _open(v)
        easy = np.where(is_open, CONTINUE, STOP)
        more = (v.n_chains < self.n_medium) & v.flag("can_branch")
        medium = np.where(
            is_open, CONTINUE, np.where(more, BRANCH, np.where(v.flag("can_verify"), VERIFY, STOP))
        )
        hard = np.where(v.flag("can_continue"), CONTINUE, STOP)
        return np.choose(self.mode, [easy, medium, hard])


class BoundedThinking(BasePolicy):
    """Latency-bounded thinking: think to a budget (``start`` tokens); at the budget stop if the
    answer looks settled (the last probes agree and the last chunk's confidence is at least
    ``confidence``), else double the budget, up to ``max_budget``."""

    def __init__(self, start: int = 64, max_budget: int = 512, confidence: float = 10.0) -> None:
        _positive(start, "start")
        if max_budget < start:
            raise ConfigError("max_budget must be >= start")
        self.start, self.max_budget, self.confidence = (
            int(start),
            int(max_budget),
            float(confidence),
        )
        self.name = f"bounded-{start}-{max_budget}"
        super().__init__()

    def _reset_state(self, n: int) -> None:
        self.budget = np.full(n, float(self.start))

    def _clear(self, done: np.ndarray) -> None:
        self.budget[done] = float(self.start)

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        can = v.flag("can_continue")
        at_budget = v.cur_tokens >= self.budget - 0.5
        settled = (v["cur_probe_stability"] >= 1.0) & (
            v["cur_conf_last"] * CONF_SCALE >= self.confidence
        )
        grow = at_budget & ~settled & can & ~v.flag("cur_ended") & (self.budget < self.max_budget)
        self.budget = np.where(grow, np.minimum(self.budget * 2, self.max_budget), self.budget)
        go = can & ~v.flag("cur_ended") & (v.cur_tokens < self.budget - 0.5)
        return np.where(go, CONTINUE, STOP)


class RandomPolicy(BasePolicy):
    """Uniform over the available actions (stop with probability ``p_stop`` when others exist)."""

    def __init__(self, seed: int = 0, p_stop: float = 0.1) -> None:
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.p_stop = float(p_stop)
        self.name = "random"
        super().__init__()

    def _act(self, obs: np.ndarray) -> np.ndarray:
        v = ObsView(obs, self.config)
        avail = np.stack(
            [v.flag("can_continue"), v.flag("can_branch"), v.flag("can_verify")], axis=1
        )
        u = self.rng.random(avail.shape) * avail
        pick = np.argmax(u, axis=1)
        stop = ~avail.any(axis=1) | (self.rng.random(len(pick)) < self.p_stop)
        return np.where(stop, STOP, pick)
