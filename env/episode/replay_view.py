"""What an agent sees of many replayed episodes: observations and aggregated answers.

:class:`ReplayView` reads a :class:`~env.episode.replay_state.ReplayState` (it never writes
one) into the single environment's observation (``env.episode.observation.FEATURES``), each
episode's leading answer, and the answer the configured ``aggregate`` would give if the episode
stopped now, for :class:`~env.episode.vector.BatchedReplayEnv`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from env.episode.config import PROBE_AGGREGATES, EnvConfig
from env.episode.hidden import NEUTRAL
from env.episode.observation import ESC_WINDOW, FEATURE_NAMES, HIDDEN_SLICE, clip01
from env.episode.replay_state import ReplayState
from features.errors import ConfigError
from features.votes import beta_leader_probability

__all__ = ["ReplayView"]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

_IX = {n: i for i, n in enumerate(FEATURE_NAMES)}


class ReplayView:
    """The observations and answers of ``state``'s episodes under ``config``. ``right`` (P(right)
    of every recorded chunk) and ``pass_rate`` (each question's predicted pass rate) are the
    hidden-state tables (:func:`~env.episode.tables.hidden_tables`), ``None`` without probes:
    the hidden features are then neutral."""

    def __init__(
        self,
        state: ReplayState,
        config: EnvConfig,
        right: FloatArray | None = None,
        pass_rate: FloatArray | None = None,
    ) -> None:
        self.state = state
        self.t = state.t
        self.config = config
        self.right = right
        self.pass_rate = pass_rate
        self.steps_limit = config.steps_limit
        k = self.t.kmax
        beta = np.zeros((k + 1, k + 1), np.float64)
        for c1 in range(k + 1):
            for c2 in range(k + 1):
                beta[c1, c2] = clip01(beta_leader_probability(c1, c2))
        self.beta = beta.ravel()

    def observe(self, mask: BoolArray, fcur: IntArray) -> tuple[np.ndarray, IntArray]:
        """The observations, and each episode's leading answer cell (majority; -1 for none),
        given the action ``mask`` and each episode's current chunk ``fcur``."""
        s = self.state
        t = self.t
        b = s.num_envs
        cfg = self.config
        ar = s.ar
        inv_n = 1.0 / s.n  # every episode has a chain from its start
        kk = int(s.n.max())  # slots past every episode's chain count hold nothing
        cells = s.cls[:kk]
        # Leader: most votes, ties to the lowest slot (first appearance, as features.votes):
        # the slot rides in the low bits of the key. A class's count is 0 in an episode's
        # stale slots and at most 0 in its "no answer" cell.
        cs = s.cnt[cells]
        top = ((cs << s.shift) + s.rev[:kk]).max(0)
        c1 = np.maximum(top >> s.shift, 0).astype(np.int64)
        ls = ((s.k - 1) - (top & ((1 << s.shift) - 1))) * b + ar
        has_lead = c1 > 0
        lead = np.where(has_lead, s.cls_[ls], -1)
        lead16 = np.where(has_lead, s.c16_[ls], -1).astype(np.int16)
        c2 = np.maximum(np.where(s.c16[:kk] == lead16, 0, cs).max(0), 0).astype(np.int64)
        # With no answer every count and weight is 0: the shares come out 0 as they should.
        inv_tot = 1.0 / np.maximum(s.answered, 1)
        share = c1 * inv_tot
        second = c2 * inv_tot
        cur = s.cur * b + ar
        ns = s.n_scored
        w_top = np.take(s.w, cells, axis=0).max(0)
        obs = np.take(t.obs, fcur, axis=0)
        obs[:, _IX["budget_used"]] = np.minimum(s.dec * (1.0 / cfg.token_cap), 1.0)
        obs[:, _IX["n_chains"]] = s.n * (1.0 / cfg.max_chains)
        obs[:, _IX["vote_share"]] = share
        obs[:, _IX["vote_margin"]] = share - second
        obs[:, _IX["distinct"]] = s.distinct * inv_n
        obs[:, _IX["answered"]] = s.answered * inv_n
        obs[:, _IX["ended"]] = s.ended * inv_n
        obs[:, _IX["beta_leader"]] = self.beta[c1 * (t.kmax + 1) + c2]
        obs[:, _IX["conf_vote_share"]] = w_top[:, 0] / np.maximum(s.wc_tot, 1)
        obs[:, _IX["verified"]] = ns * inv_n
        obs[:, _IX["cur_verifier"]] = s.vval_[cur]
        obs[:, _IX["verifier_mean"]] = np.where(ns > 0, s.ver_sum / np.maximum(ns, 1), 0.5)
        obs[:, _IX["verifier_vote_share"]] = w_top[:, 1] / np.maximum(s.wv_tot, 1)
        obs[:, _IX["cur_agrees"]] = has_lead & (s.cls_[cur] == lead)
        if s.k >= ESC_WINDOW:  # the last ESC_WINDOW chains started hold one answer class
            n = s.n
            base = np.maximum(n - ESC_WINDOW, 0) * b + ar
            first = s.c16_[base]
            agree = (n >= ESC_WINDOW) & (first != t.n_classes)
            for d in range(1, ESC_WINDOW):
                agree &= s.c16_[base + d * b] == first
            obs[:, _IX["window_agree"]] = agree
        obs[:, _IX["difficulty"]] = s.dval
        obs[:, _IX["can_continue"] : _IX["can_verify"] + 1] = mask[:, :3]
        obs[:, _IX["steps"]] = s.steps * (1.0 / self.steps_limit)
        if self.right is None or self.pass_rate is None:
            obs[:, HIDDEN_SLICE] = NEUTRAL
        else:
            p, valid, w_same = self.right_votes(kk, s.ar)
            tot = (p * valid).sum(0)
            top = np.where(valid, w_same, 0.0).max(0)
            best, any_valid = self.best_slot(p, valid)
            best_cls = np.take_along_axis(s.c16[:kk], best[None], 0)[0]
            obs[:, _IX["cur_right"]] = self.right[fcur]
            obs[:, _IX["right_vote_share"]] = np.where(tot > 0, top / np.where(tot > 0, tot, 1), 0)
            obs[:, _IX["right_best"]] = np.where(
                any_valid, np.take_along_axis(p, best[None], 0)[0], 0.0
            )
            obs[:, _IX["right_best_agrees"]] = any_valid & has_lead & (best_cls == lead16)
            obs[:, _IX["pass_rate"]] = self.pass_rate[s.q]
        return obs, lead

    def right_votes(self, kk: int, d: IntArray) -> tuple[FloatArray, BoolArray, FloatArray]:
        """For episodes ``d``: each slot's latest P(right) ``[kk, |d|]``, whether it is a live
        chain with an answer, and the P(right) summed over the live answered slots of its answer
        class (its class's weighted vote)."""
        s = self.state
        if self.right is None:  # pragma: no cover - observe and the aggregates check first
            raise ConfigError("the probes' P(right) needs the hidden-state tables")
        n = s.n[d]
        fi = np.take(s.fi[:kk], d, axis=1)
        cls = np.take(s.c16[:kk], d, axis=1)
        p = self.right[fi]
        valid = (s.slot[:kk] < n) & (cls != self.t.n_classes)
        pw = np.where(valid, p, 0.0)
        same = cls[:, None, :] == cls[None, :, :]  # [kk, kk, |d|]
        return p, valid, (same * pw[None, :, :]).sum(1)

    @staticmethod
    def best_slot(p: FloatArray, valid: BoolArray) -> tuple[IntArray, BoolArray]:
        """The live answered slot with the highest P(right) (ties: the first) per column."""
        best = np.where(valid, p, -1.0).argmax(0)
        return best.astype(np.int64), np.asarray(valid.any(0), np.bool_)

    def final_answer(self, d: IntArray, lead: IntArray) -> IntArray:
        """The aggregated answer class of episodes ``d`` (-1: none), as the single environment's
        ``_aggregate`` picks it; ``lead`` is :meth:`observe`'s leading cells."""
        s = self.state
        agg = self.config.aggregate
        b = s.num_envs
        if agg in PROBE_AGGREGATES:
            kk = int(s.n[d].max()) if d.size else 1
            p, valid, w_same = self.right_votes(kk, d)
            if agg == "probe":
                slot = np.where(valid, w_same, -1.0).argmax(0)  # ties: first appearance
                ok = (p * valid).sum(0) > 0
            else:
                slot, ok = self.best_slot(p, valid)
            cls = np.take_along_axis(np.take(s.c16[:kk], d, axis=1), slot[None], 0)[0]
            return np.where(ok, cls.astype(np.int64), -1)
        if agg == "majority":
            cell = lead[d]
        else:
            table, tot = (s.wc, s.wc_tot) if agg == "confidence" else (s.wv, s.wv_tot)
            cells = np.take(s.cls, d, axis=1)
            live = s.slot < s.n[d]
            w = np.where(live & (cells < s.none), table[cells], -1)
            slot = w.argmax(0)  # first slot of the heaviest class: ties to first appearance
            cell = np.where(tot[d] > 0, cells[slot, np.arange(d.size)], -1)
        return np.where(cell >= 0, cell // b, -1)
