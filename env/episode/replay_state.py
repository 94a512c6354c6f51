"""The state of many replayed episodes, and the moves that change it.

:class:`ReplayState` holds every array :class:`~env.episode.vector.BatchedReplayEnv` steps, for
``num_envs`` episodes over one flattened bank (:class:`~env.episode.tables.Tables`): each
episode's question, the recorded chunk each of its chains has reached, the vote cells of their
answers, its tokens and priced cost. Its methods are an episode's moves, each a handful of array
operations over the episodes that make it: :meth:`~ReplayState.reset` (a new question and chain
order), :meth:`~ReplayState.advance` (a chunk of a new or the current chain) and
:meth:`~ReplayState.verify`. What an agent sees of the state is read by
:class:`~env.episode.replay_view.ReplayView`; which moves may run, and what ends an episode, by
the environment through :mod:`env.episode.rules`.

Arrays are per episode (``[num_envs]``) or per chain slot, slot-major (``[k, num_envs]``) so that
reductions over an episode's chains run along rows; a name ending in ``_`` is the flat view of the
slot array of that name (1-D fancy indexing is the fast kind). Vote cells are ``class *
num_envs + episode``; class ``n_classes`` is "no answer".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from env.episode.tables import Tables, to_int
from env.generators.replay import chain_order

__all__ = ["ReplayState", "replay_order"]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def replay_order(gen_seed: int, qid: str, k: int) -> IntArray:
    """The order in which :class:`~env.generators.replay.ReplayGenerator`, reset with
    ``gen_seed``, hands out the ``k`` recorded chains of question ``qid``
    (:func:`~env.generators.replay.chain_order`, as an array)."""
    return np.array(chain_order(int(gen_seed), qid, k), dtype=np.int64)


class ReplayState:
    """The arrays of ``num_envs`` replayed episodes over ``tables`` with at most ``k`` chains
    each (see the module docstring). ``qids`` name the tables' questions (a replayed chain order
    hashes them) and ``difficulty`` holds the ``difficulty`` feature of every recorded chain's
    first chunk (``[n_questions * kmax]``)."""

    def __init__(
        self, tables: Tables, num_envs: int, k: int, qids: Sequence[str], difficulty: FloatArray
    ) -> None:
        self.t = tables
        self.num_envs = b = int(num_envs)
        self.k = k
        self.qids = tuple(qids)
        self.diff = difficulty
        c = tables.n_classes
        self.ar = np.arange(b, dtype=np.int64)

        def z(dtype: Any = np.int64) -> Any:
            return np.zeros(b, dtype)

        self.q, self.n, self.cur, self.steps = z(), z(), z(), z()
        self.dec, self.nv, self.kq = z(), z(), z()  # decoded tokens, chains to verify, recorded
        # Decoded tokens past a chain's end, of chains after the first, of the verifier.
        self.deep, self.wide, self.vdec = z(), z(), z()
        self.cost, self.charged = z(np.float64), z(np.float64)  # priced; given as reward
        self.distinct, self.answered, self.ended = z(), z(), z()
        self.wc_tot, self.wv_tot = z(), z()
        self.n_scored, self.ver_sum = z(), z(np.float64)
        self.fixed = z(np.bool_)
        self.dval = np.full(b, 0.5, np.float64)  # the difficulty feature
        self.gen_seed = np.full(b, -1, np.int64)
        # Votes per (answer class, episode) cell, cell = class * num_envs + episode; class
        # n_classes is "no answer": counts, confidence and verifier weights.
        self.none = c * b
        self.cnt = np.zeros((c + 1) * b, np.int16)
        self.w = np.zeros(((c + 1) * b, 2), np.int64)  # gathered together: one pass
        self.wc, self.wv = self.w[:, 0], self.w[:, 1]
        # Chain slots, slot-major ([k, num_envs]) so that reductions over an episode's chains
        # run along rows; written through flat views (1-D fancy indexing is the fast kind).
        # Slots at or past an episode's chain count are stale leftovers: a branch initialises
        # the slot it fills, so a reset need not clear them (they point at their episode's
        # own cells, which the reset zeroes, and come after every live slot: they never win
        # a vote or a tie).
        self.slot = np.arange(k, dtype=np.int64)[:, None]
        self.fi = np.full((k, b), -1, np.int64)  # chunk reached
        self.vf = np.full((k, b), -1, np.int64)  # chunk last verified (-1: never)
        self.cls = np.broadcast_to(self.none + self.ar, (k, b)).copy()  # answer cell
        self.c16 = np.full((k, b), c, np.int16)  # answer class
        self.wc_eff = np.zeros((k, b), np.int64)  # confidence vote (0 without an answer)
        self.wv_raw = np.zeros((k, b), np.int64)  # verifier weight (0.5 when unscored)
        self.wv_eff = np.zeros((k, b), np.int64)  # verifier vote (0 without an answer)
        self.vval = np.full((k, b), 0.5, np.float64)  # verifier score (0.5: unscored)
        # Recorded chains: order[:n] handed out, in that order; the rest is the pool.
        self.order = np.repeat(np.arange(self.t.kmax, dtype=np.int64)[:, None], b, axis=1)
        self.fi_, self.vf_, self.cls_, self.c16_ = (
            self.fi.ravel(),
            self.vf.ravel(),
            self.cls.ravel(),
            self.c16.ravel(),
        )
        self.wc_eff_, self.wv_raw_, self.wv_eff_, self.vval_ = (
            self.wc_eff.ravel(),
            self.wv_raw.ravel(),
            self.wv_eff.ravel(),
            self.vval.ravel(),
        )
        self.order_ = self.order.ravel()
        self.cbase_ = self.t.cbase.ravel()
        self.half = int(to_int(0.5, self.t.ver_scale))
        self.shift = max(1, (k - 1).bit_length())
        self.rev = (k - 1 - np.arange(k, dtype=np.int16))[:, None]

    def reset(self, rows: IntArray, q: IntArray, gen_seeds: IntArray) -> None:
        """Clear episodes ``rows`` for questions ``q``, their chains handed out in
        :func:`replay_order` of ``gen_seeds`` (-1: drawn at random as they branch). The opening
        chain comes with :meth:`advance`."""
        t = self.t
        b = self.num_envs
        kmax = t.kmax
        gs = gen_seeds
        self.q[rows] = q
        self.gen_seed[rows] = gs
        fixed = gs >= 0
        self.fixed[rows] = fixed
        kq = t.kq[q]
        # The chains not handed out yet sit in order[n:kq] (any order: they are drawn at
        # random); a question with fewer chains than kmax, or a replayed order, needs it set.
        set_order = fixed | (kq < kmax)
        if set_order.any():
            sub = np.flatnonzero(set_order)
            order = np.repeat(np.arange(kmax, dtype=np.int64)[:, None], sub.size, axis=1)
            for i, row in enumerate(sub):
                if fixed[row]:
                    k = int(kq[row])
                    order[:k, i] = replay_order(int(gs[row]), self.qids[q[row]], k)
            self.order_[(np.arange(kmax)[:, None] * b + rows[sub]).ravel()] = order.ravel()
        self.kq[rows] = kq
        # Zero the vote cells of the episodes' chains (every cell holding votes is one), and
        # point their slots at "no answer", where slots past the chain count always point.
        kk, col = np.nonzero(self.slot < self.n[rows])
        r = rows[col]
        s = kk * b + r
        cells = self.cls_[s]
        self.cnt[cells] = 0
        self.w[cells] = 0
        none = self.none + rows
        self.cnt[none] = 0
        self.cls_[s] = self.none + r
        self.c16_[s] = t.n_classes
        for arr in (
            self.n, self.cur, self.steps, self.dec, self.nv, self.distinct,
            self.answered, self.ended, self.wc_tot, self.wv_tot, self.n_scored,
            self.deep, self.wide, self.vdec,
        ):  # fmt: skip
            arr[rows] = 0
        self.cost[rows] = 0.0
        self.charged[rows] = 0.0
        self.ver_sum[rows] = 0.0

    def advance(
        self, opening: IntArray, cont: IntArray, br: IntArray, rng: np.random.Generator
    ) -> None:
        """One chunk (and probe) for a chain of each episode: a new chain (``opening`` and
        ``br``, drawn with ``rng`` unless the episode replays an order) or the current one
        (``cont``)."""
        t = self.t
        b = self.num_envs
        new = np.concatenate([opening, br])
        nn = new.size
        if nn == 0 and cont.size == 0:
            return
        # Branch: the next recorded chain, drawn without replacement (Fisher-Yates, one draw
        # per branch) unless the episode replays a generator seed's order.
        q_new = self.q[new]
        j_new = self.n[new]
        r = j_new.copy()
        drawn = ~self.fixed[new]
        if drawn.any():  # (no draw for a replayed order: the RNG stream stays the single env's)
            u = rng.random(int(drawn.sum()))
            r[drawn] += np.floor(u * (t.kq[q_new[drawn]] - j_new[drawn])).astype(np.int64)
        sj, sr = j_new * b + new, r * b + new
        at_j, at_r = self.order_[sj], self.order_[sr]
        self.order_[sr] = at_j
        self.order_[sj] = at_r
        f_new = self.cbase_[q_new * t.kmax + at_r]
        if opening.size:  # the opening chain's first chunk sets the episode's difficulty
            no = opening.size
            self.dval[opening] = self.diff[q_new[:no] * t.kmax + at_r[:no]]
        # Continue: the current chain's next chunk; it needs verifying again if it was verified.
        s_cont = self.cur[cont] * b + cont
        f_old = self.fi_[s_cont]
        self.nv[cont] += self.vf_[s_cont] == f_old
        self.n[new] += 1
        self.cur[new] = j_new
        self.nv[new] += 1
        rows = np.concatenate([new, cont])
        s = np.concatenate([sj, s_cont])
        f = np.concatenate([f_new, f_old + 1])
        self.cost[rows] += t.step_cost[f]
        dec, deep = t.step_dec[f], t.step_deep[f]
        self.dec[rows] += dec
        self.deep[rows] += deep
        self.wide[rows] += np.where(s >= b, dec - deep, 0)  # slot > 0: not the first chain
        ended = t.ended[f]
        ended[nn:] -= t.ended[f_old]  # a continued chain may end, or reopen (budget forcing)
        self.ended[rows] += ended
        self.fi_[s] = f
        # Votes: the chain's answer moves from its old cell (a new chain's: none) to its new one.
        cls = t.answer[f]
        valid = cls < t.n_classes
        new_cell = cls * b + rows
        old_cell = self.cls_[s]
        old_cell[:nn] = self.none + new
        was_valid = old_cell < self.none
        moved = old_cell != new_cell
        co, cn = self.cnt[old_cell], self.cnt[new_cell]
        self.distinct[rows] += (valid & moved & (cn == 0)).astype(np.int64) - (
            was_valid & moved & (co == 1)
        )
        self.answered[rows] += valid.astype(np.int64) - was_valid
        self.cnt[old_cell] -= 1
        self.cnt[new_cell] += 1
        wo = self.wc_eff_[s]
        wo[:nn] = 0
        wn = np.where(valid, t.conf_int[f], 0)
        self.wc[old_cell] -= wo
        self.wc[new_cell] += wn
        self.wc_tot[rows] += wn - wo
        self.wc_eff_[s] = wn
        raw = self.wv_raw_[s]
        raw[:nn] = self.half  # a new chain is unscored: it votes 0.5
        vo = self.wv_eff_[s]
        vo[:nn] = 0
        vn = np.where(valid, raw, 0)
        self.wv[old_cell] -= vo
        self.wv[new_cell] += vn
        self.wv_tot[rows] += vn - vo
        self.wv_eff_[s] = vn
        self.cls_[s] = new_cell
        self.c16_[s] = cls
        if nn:
            sn = s[:nn]
            self.wv_raw_[sn] = self.half
            self.vf_[sn] = -1
            self.vval_[sn] = 0.5

    def verify(self, rows: IntArray) -> None:
        """Score every chain of ``rows`` whose end changed since it was last scored."""
        t = self.t
        b = self.num_envs
        n = self.n[rows]
        kk = int(n.max())
        fi = np.take(self.fi[:kk], rows, axis=1)
        vf = np.take(self.vf[:kk], rows, axis=1)
        todo = (self.slot[:kk] < n) & (vf != fi)
        ks, col = np.nonzero(todo)
        r = rows[col]
        s = ks * b + r
        f = fi[ks, col]
        nv = self.nv[rows]
        v = rows.size
        self.dec[rows] += nv
        self.vdec[rows] += nv
        self.cost[rows] += np.bincount(col, t.judge_cost[f], v)
        was_scored = vf[ks, col] >= 0
        self.vf_[s] = f
        cells = self.cls_[s]
        raw = t.judge_int[f]
        eff = np.where(cells < self.none, raw, 0)
        delta = eff - self.wv_eff_[s]
        np.add.at(self.wv, cells, delta)  # several chains may share an answer
        np.add.at(self.wv_tot, r, delta)
        self.wv_raw_[s] = raw
        self.wv_eff_[s] = eff
        p = t.judge_p[f]
        old = self.vval_[s]
        self.vval_[s] = p
        self.n_scored[rows] += np.bincount(col, ~was_scored, v).astype(np.int64)
        self.ver_sum[rows] += np.bincount(col, p - np.where(was_scored, old, 0.0), v)
        self.nv[rows] = 0
