"""Many replayed episodes at once: :class:`ComputeAllocationEnv` over a trace bank, in numpy.

:class:`BatchedReplayEnv` runs ``num_envs`` episodes of the compute-allocation environment side by
side over one recorded bank, with no Python loop over episodes: for training policies on millions
of decisions. Everything a replayed episode can see is a pure function of which recorded chunk
each of its chains has reached, so the bank is flattened once, at construction, into per-chunk
arrays (cost pieces, features, answer classes); a step is then a handful of array operations.

Episodes are the single environment's exactly: the same actions on the same question with the same
chains handed out give the same observations, rewards, flags and answers (``tests/env/
test_vector.py`` replays thousands of episodes through both).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from env.bank.store import TraceBank, shared
from env.episode.config import PROBE_AGGREGATES, Action, EnvConfig
from env.episode.difficulty import bank_difficulty
from env.episode.hidden import NEUTRAL, HiddenProbes
from env.episode.observation import (
    ESC_WINDOW,
    FEATURE_NAMES,
    HIDDEN_SLICE,
    N_FEATURES,
    clip01,
)
from env.episode.rules import (
    Reason,
    action_mask,
    reason_text,
    unavailable_reason,
)
from env.episode.tables import (
    Tables,
    build_tables,
    difficulty_table,
    hidden_tables,
    to_int,
)
from env.generators.replay import ReplayGenerator, chain_order
from env.questions import select_split, training_split
from features.errors import BankError, ConfigError, PolicyError
from features.votes import beta_leader_probability

__all__ = ["REPLAY_ENDS", "BatchedReplayEnv", "replay_order"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: The reasons a batched replay ends an episode with (``info["reason_code"]``): it has no wall
#: clock, no episode without a chain, and no generator edge (its tables end where the bank does).
REPLAY_ENDS: tuple[Reason, ...] = (
    Reason.STOP,
    Reason.TOKEN_CAP,
    Reason.MAX_STEPS,
    Reason.NO_CONTINUE,
    Reason.MAX_CHAINS,
    Reason.NO_CHAINS,
    Reason.NO_VERIFY,
)

_IX = {n: i for i, n in enumerate(FEATURE_NAMES)}


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``arrays`` made read-only: kept by :func:`~env.bank.store.shared`, they are read by every
    replay of the process, and none may write to them."""
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _read_only(tables: Tables) -> Tables:
    """``tables`` with every array made read-only (:func:`_frozen`)."""
    values = (getattr(tables, f.name) for f in dataclasses.fields(tables))
    _frozen(*(v for v in values if isinstance(v, np.ndarray)))
    return tables


def replay_order(gen_seed: int, qid: str, k: int) -> IntArray:
    """The order in which :class:`~env.generators.replay.ReplayGenerator`, reset with
    ``gen_seed``, hands out the ``k`` recorded chains of question ``qid``
    (:func:`~env.generators.replay.chain_order`, as an array)."""
    return np.array(chain_order(int(gen_seed), qid, k), dtype=np.int64)


class BatchedReplayEnv(VectorEnv):  # type: ignore[type-arg]
    """``num_envs`` compute-allocation episodes over a trace bank, stepped together in numpy.

    Each sub-environment is a :class:`~env.episode.single.ComputeAllocationEnv` replaying the bank
    (:meth:`ComputeAllocationEnv.from_bank <env.episode.single.ComputeAllocationEnv.from_bank>`):
    the same actions, action masks, observation, token accounting, rewards and episode ends.

    ## Action Space

    ``MultiDiscrete([4] * num_envs)``: one of continue (0), branch (1), verify (2), stop (3) per
    episode, as in :class:`~env.episode.single.ComputeAllocationEnv`. ``info["action_mask"]``
    (``[num_envs, 4]`` bool) says which can run.

    ## Observation Space

    ``Box(0, 1, (num_envs, N), float32)``: row ``i`` is episode ``i``'s observation, the
    single environment's ``N`` features (``env.episode.observation.FEATURES``). ``difficulty`` is the
    ``difficulty`` predictor's value on the opening chain's first chunk (0.5 without one),
    precomputed for every recorded chain at construction; ``window_agree`` compares the answer
    classes of the last ``ESC_WINDOW`` chains in the order they were started.

    ## Rewards

    As the single environment: ``-lam * info["cost_delta"]`` per step (the opening chunk's cost
    on the first step), plus ``correct_reward`` on the step that ends an episode with a correct
    answer.

    ## Episode End

    ``terminations[i]``: episode ``i`` stopped; ``truncations[i]``: the token cap, ``max_steps``
    or an unavailable action ended it (``unavailable="raise"`` raises :class:`PolicyError`
    instead, before any episode moves). There is no wall clock: ``time_cap_s`` is refused.

    Autoreset is ``AutoresetMode.NEXT_STEP`` (``metadata["autoreset_mode"]``), as Gymnasium's
    own vector environments: the step that ends episode ``i`` returns its last observation; the
    next :meth:`step` ignores action ``i``, starts a new episode there and returns its first
    observation with reward 0 and both flags false.

    ``info`` always holds, per episode:

    * ``action_mask`` (``[num_envs, 4]`` bool);
    * ``correct_now`` (``[num_envs]`` bool): whether stopping now would be correct: the answer
      the configured ``aggregate`` picks from the chains so far is the gold answer (on the step
      that ends an episode, its ``correct``; after an autoreset, the new episode's);
    * ``answer_now`` (``[num_envs]`` int): that answer's class among the question's recorded
      answers (-1: none yet), the same numbering all episode long, so that two states of one
      episode hold the same answer exactly when their classes are equal (what
      :mod:`policies.learned.stop` learns from);
    * ``cost_delta`` (``[num_envs]`` float): the priced cost this step's reward charges, so that
      ``reward == -lam * cost_delta + correct_reward * correct * (terminated | truncated)``
      and rewards for another ``lam`` or ``correct_reward`` can be recomputed from one rollout.
      As in the single environment, the opening chunk (and probe) generated at reset is charged
      on the episode's first step: ``reset`` and the autoreset step report 0 (their reward is 0)
      and the first step's ``cost_delta`` is the opening's cost plus that step's own; an
      episode's ``cost_delta`` add up to its final ``cost``.

    For the episodes that ended on this step (the mask
    ``info["_<key>"]``, Gymnasium's convention) it holds ``correct`` (bool), ``answer`` (object:
    the answer's canonical text, ``None`` for none), ``return``
    (``correct_reward * correct - lam * cost``), ``cost``, ``decoded`` (tokens, what the cap
    counts) and its split ``tokens_base`` (the first chain's), ``tokens_deep`` (past a chain's
    end) and ``tokens_wide`` (the other chains'), ``reason_code`` (int, a
    :class:`~env.episode.rules.Reason`: one of :data:`REPLAY_ENDS`), ``reason`` (object: its
    text), ``steps``, ``chains`` and ``question`` (an index into :attr:`questions`). These keys mean what the single environment's mean
    (:data:`~env.episode.rules.INFO_KEYS`), one entry per episode.

    ## Arguments

    * ``bank``: a :class:`~env.bank.store.TraceBank` or its folder.
    * ``num_envs``: episodes run at once.
    * ``split``: only the bank's questions of this split (``train`` / ``test``, or ``fit`` /
      ``dev``: the training questions cut for tuning, see :func:`~env.questions.select_split`).
    * ``seed``: seeds the episode draws until ``reset(seed=...)`` reseeds them.
    * ``config`` or its fields: an :class:`~env.episode.config.EnvConfig`; unset fields default to
      the bank's settings, as in ``from_bank``.
    * ``difficulty``: the ``difficulty`` feature's predictor, as the single environment's:
      ``None`` (0.5), ``"auto"`` (fitted on the bank's training questions, or on ``fit`` for
      ``fit`` / ``dev``, as ``from_bank`` does: :func:`~env.episode.difficulty.bank_difficulty`) or a ``callable(question, first_chunk)
      -> [0, 1]`` such as :class:`~env.episode.difficulty.DifficultyModel`.
    * ``probes``: :class:`~env.episode.hidden.HiddenProbes` for the hidden-state features and
      the ``probe`` / ``probe-best`` aggregations, as the single environment's; the bank must be
      annotated (``ponder bank annotate``) with the states they read. P(right) is computed once
      per recorded chunk at construction.
    * ``replay_seeds``: hand out chains as :class:`~env.generators.replay.ReplayGenerator` does
      (see below); slower (a hash and a generator per episode).

    Episodes draw their question uniformly with the environment's RNG. The order in which an
    episode's recorded chains are handed out is, by default, a uniform random permutation drawn
    lazily with the same RNG (one draw per branch): the distribution the single environment has,
    without its per-episode hashing. To replay the single environment's episodes exactly, give
    generator seeds: ``reset(options={"questions": q, "gen_seeds": s})`` starts episode ``i`` on
    question ``q[i]`` with the chains in :func:`replay_order` ``(s[i], qid, k)``, what
    ``ComputeAllocationEnv.reset(options={"question": q[i]})`` replays when it draws generator
    seed ``s[i]`` (it draws ``gen_seed = np_random.integers(2**31 - 1)`` right after the
    question). Negative entries draw as usual. These options hold for that reset only; with
    ``replay_seeds=True`` every episode, autoresets included, draws its question and then its
    generator seed from the environment's RNG one episode after the other, as the single
    environment does, so that with ``num_envs=1`` and the same seed both run the same episodes.
    ``options={"reset_mask": m}`` resets only the episodes where ``m`` is true.
    """

    def __init__(
        self,
        bank: TraceBank | str | Path,
        num_envs: int = 1,
        *,
        split: str | None = None,
        seed: int | None = 0,
        config: EnvConfig | None = None,
        difficulty: Any = None,
        probes: HiddenProbes | None = None,
        replay_seeds: bool = False,
        **config_fields: Any,
    ) -> None:
        if config is not None and config_fields:
            raise ConfigError("pass either config or its fields, not both")
        if isinstance(num_envs, bool) or not isinstance(num_envs, int | np.integer) or num_envs < 1:
            raise ConfigError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.bank = bank if isinstance(bank, TraceBank) else TraceBank(bank)
        m = self.bank.manifest
        if config is None:
            config = EnvConfig.from_manifest(m, **config_fields)
        if config.chunk_tokens != m.chunk_tokens:
            raise ConfigError(
                f"the bank at {self.bank.path} serves chunks of {m.chunk_tokens} tokens; "
                f"set chunk_tokens={m.chunk_tokens}"
            )
        if config.time_cap_s:
            raise ConfigError(
                "the batched replay has no wall clock: time_cap_s must be 0 (use token_cap or "
                "max_steps to bound episodes)"
            )
        qs = self.bank.questions
        if split:
            qs = select_split(qs, split)
            if not qs:
                raise ConfigError(
                    f"the bank at {self.bank.path} has no recorded {split!r} questions"
                )
        if not qs:
            raise ConfigError(f"the bank at {self.bank.path} has no recorded questions yet")
        no_gold = [q.qid for q in qs if not q.scorable]
        if no_gold:
            raise ConfigError(
                f"questions {no_gold[:5]} have no gold answer: their reward cannot be scored"
            )
        self.config = config
        self.questions = qs
        self.replay_seeds = bool(replay_seeds)
        self.num_envs = int(num_envs)
        self.single_observation_space = spaces.Box(0.0, 1.0, (N_FEATURES,), np.float32)
        self.single_action_space = spaces.Discrete(4)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}
        self._np_random, self._np_random_seed = seeding.np_random(seed)
        if isinstance(difficulty, str):
            if difficulty != "auto":
                raise ConfigError(
                    f"difficulty must be None, 'auto' or a callable(question, first_chunk), "
                    f"got {difficulty!r}"
                )
            difficulty = bank_difficulty(self.bank, training_split(split))
        elif difficulty is not None and not callable(difficulty):
            raise ConfigError(
                f"difficulty must be None, 'auto' or a callable(question, first_chunk), "
                f"got {type(difficulty).__name__}"
            )
        self.difficulty_fn = difficulty
        self._t = shared(
            lambda: ("tables", self.bank.content_key(), tuple(q.qid for q in qs), config),
            lambda: _read_only(build_tables(self.bank, qs, config)),
        )
        self._diff = difficulty_table(self.bank, qs, self._t.kmax, difficulty)
        self.probes = probes
        if probes is not None:
            self._right, self._pass = shared(
                lambda: (
                    "hidden",
                    self.bank.content_key(hidden=True),
                    tuple(q.qid for q in qs),
                    config,
                    probes.fingerprint(),
                ),
                lambda: _frozen(*hidden_tables(self.bank, qs, config, probes)),
            )
            if self._right.size != self._t.answer.size:
                raise BankError(  # pragma: no cover - both walk replay_chain
                    "the hidden-state table does not line up with the bank's chunks"
                )
        elif config.aggregate in PROBE_AGGREGATES:
            raise ConfigError(
                f"aggregate={config.aggregate!r} reads the hidden-state probe: give the "
                "environment probes=HiddenProbes (HiddenProbes.fit on an annotated bank, or a "
                "policy's own)"
            )
        self._can_judge = ReplayGenerator(self.bank).traits.can_judge
        self._k = min(config.max_chains, self._t.kmax)
        self._steps_limit = config.steps_limit
        self._reason_text = np.array([reason_text(r, config) for r in Reason], object)
        k = self._t.kmax
        beta = np.zeros((k + 1, k + 1), np.float64)
        for c1 in range(k + 1):
            for c2 in range(k + 1):
                beta[c1, c2] = clip01(beta_leader_probability(c1, c2))
        self._beta = beta.ravel()
        self._alloc()

    # -- state -------------------------------------------------------------------------------

    def _alloc(self) -> None:
        b, k, c = self.num_envs, self._k, self._t.n_classes
        self._ar = np.arange(b, dtype=np.int64)

        def z(dtype: Any = np.int64) -> Any:
            return np.zeros(b, dtype)

        self._q, self._n, self._cur, self._steps = z(), z(), z(), z()
        self._dec, self._nv, self._kq = z(), z(), z()  # decoded tokens, chains to verify, recorded
        # Decoded tokens past a chain's end, of chains after the first, of the verifier.
        self._deep, self._wide, self._vdec = z(), z(), z()
        self._cost, self._charged = z(np.float64), z(np.float64)  # priced; given as reward
        self._distinct, self._answered, self._ended = z(), z(), z()
        self._wc_tot, self._wv_tot = z(), z()
        self._n_scored, self._ver_sum = z(), z(np.float64)
        self._fixed = z(np.bool_)
        self._dval = np.full(b, 0.5, np.float64)  # the difficulty feature
        self._gen_seed = np.full(b, -1, np.int64)
        # Votes per (answer class, episode) cell, cell = class * num_envs + episode; class
        # n_classes is "no answer": counts, confidence and verifier weights.
        self._none = c * b
        self._cnt = np.zeros((c + 1) * b, np.int16)
        self._w = np.zeros(((c + 1) * b, 2), np.int64)  # gathered together: one pass
        self._wc, self._wv = self._w[:, 0], self._w[:, 1]
        # Chain slots, slot-major ([k, num_envs]) so that reductions over an episode's chains
        # run along rows; written through flat views (1-D fancy indexing is the fast kind).
        # Slots at or past an episode's chain count are stale leftovers: a branch initialises
        # the slot it fills, so a reset need not clear them (they point at their episode's
        # own cells, which the reset zeroes, and come after every live slot: they never win
        # a vote or a tie).
        self._slot = np.arange(k, dtype=np.int64)[:, None]
        self._fi = np.full((k, b), -1, np.int64)  # chunk reached
        self._vf = np.full((k, b), -1, np.int64)  # chunk last verified (-1: never)
        self._cls = np.broadcast_to(self._none + self._ar, (k, b)).copy()  # answer cell
        self._c16 = np.full((k, b), c, np.int16)  # answer class
        self._wc_eff = np.zeros((k, b), np.int64)  # confidence vote (0 without an answer)
        self._wv_raw = np.zeros((k, b), np.int64)  # verifier weight (0.5 when unscored)
        self._wv_eff = np.zeros((k, b), np.int64)  # verifier vote (0 without an answer)
        self._vval = np.full((k, b), 0.5, np.float64)  # verifier score (0.5: unscored)
        # Recorded chains: order[:n] handed out, in that order; the rest is the pool.
        self._order = np.repeat(np.arange(self._t.kmax, dtype=np.int64)[:, None], b, axis=1)
        self._fi_, self._vf_, self._cls_, self._c16_ = (
            self._fi.ravel(),
            self._vf.ravel(),
            self._cls.ravel(),
            self._c16.ravel(),
        )
        self._wc_eff_, self._wv_raw_, self._wv_eff_, self._vval_ = (
            self._wc_eff.ravel(),
            self._wv_raw.ravel(),
            self._wv_eff.ravel(),
            self._vval.ravel(),
        )
        self._order_ = self._order.ravel()
        self._cbase_ = self._t.cbase.ravel()
        self._needs_reset = np.ones(b, np.bool_)
        self._mask = np.zeros((b, 4), np.bool_)
        self._mask[:, 3] = True
        self._fcur = np.full(b, -1, np.int64)
        self._started = False
        self._half = int(to_int(0.5, self._t.ver_scale))
        self._shift = max(1, (k - 1).bit_length())
        self._rev = (k - 1 - np.arange(k, dtype=np.int16))[:, None]

    # -- Gymnasium API -------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None and not isinstance(seed, int | np.integer):
            raise ConfigError(
                f"seed must be an int (one RNG drives every episode of the batch), got {seed!r}"
            )
        super().reset(seed=None if seed is None else int(seed))
        opts = dict(options or {})
        b = self.num_envs
        mask = opts.pop("reset_mask", None)
        questions = opts.pop("questions", None)
        gen_seeds = opts.pop("gen_seeds", None)
        if opts:
            raise ConfigError(
                f"unknown reset options {sorted(opts)}: use questions, gen_seeds, reset_mask"
            )
        rows = self._ar
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype != np.bool_ or m.shape != (b,):
                raise ConfigError(f"options['reset_mask'] must be a bool array of shape ({b},)")
            rows = np.flatnonzero(m)
        pins = self._per_env(questions, "questions")
        seeds = self._per_env(gen_seeds, "gen_seeds")
        if pins is not None and ((pins >= len(self.questions)).any()):
            raise ConfigError(
                f"question indices must be below {len(self.questions)}, got {pins.max()}"
            )
        if mask is None:
            self._started = True
        elif not self._started:
            raise PolicyError("reset every episode once (no reset_mask) before a partial reset")
        self._reset_rows(
            rows,
            None if pins is None else pins[rows],
            None if seeds is None else seeds[rows],
        )
        self._open(rows)
        self._needs_reset[rows] = False
        self._compute_mask()
        obs, lead = self._observe()
        answers = self._final_answer(self._ar, lead)
        info = {
            "action_mask": self._mask,
            "correct_now": self._correct(answers),
            "answer_now": answers,
            "cost_delta": np.zeros(b),
        }
        return obs, info

    def step(
        self, actions: npt.ArrayLike
    ) -> tuple[np.ndarray, FloatArray, BoolArray, BoolArray, dict[str, Any]]:
        if not self._started:
            raise PolicyError("call reset() before step()")
        cfg = self.config
        b = self.num_envs
        a = self._actions(actions)
        starting = self._needs_reset
        live = ~starting
        # Availability is judged on the state the agent saw (the mask it was given; stop is
        # always available).
        ok = self._mask.ravel()[self._ar * 4 + np.minimum(a, 3)]
        stop = live & (a == 3)
        bad = live & ~ok
        if cfg.unavailable == "raise" and bad.any():
            i = int(np.flatnonzero(bad)[0])
            text = reason_text(int(self._why_unavailable(a, bad)[i]), cfg)
            raise PolicyError(
                f"action {Action(int(a[i])).name.lower()} is unavailable in episode {i}: {text}"
                f" ({int(bad.sum())} episodes chose an unavailable action)"
            )
        why = self._why_unavailable(a, bad) if bad.any() else None
        before = self._charged  # (a reset zeroes it in place: a new episode's reward is 0)
        self._steps += live
        new = np.flatnonzero(starting)
        if new.size:
            self._reset_rows(new, None, None)
        acting = live & ok & (a != 3)
        cont = np.flatnonzero(acting & (a == 0))
        br = np.flatnonzero(acting & (a == 1))
        ver = np.flatnonzero(acting & (a == 2))
        if ver.size:
            self._verify(ver)
        self._advance(new, cont, br)
        mask = self._compute_mask()
        max_steps = acting & (self._steps >= self._steps_limit)
        capped = acting & ~max_steps & ~(mask[:, 0] | mask[:, 1] | mask[:, 2])
        terminated = stop
        truncated = bad | max_steps | capped
        done = terminated | truncated
        # A new episode's opening is charged on its first step.
        charged = np.where(starting, 0.0, self._cost)
        delta = charged - before
        reward = -cfg.lam * delta
        self._charged = charged
        obs, lead = self._observe()
        answers = self._final_answer(self._ar, lead)
        correct_now = self._correct(answers)
        info: dict[str, Any] = {
            "action_mask": mask,
            "correct_now": correct_now,
            "answer_now": answers,
            "cost_delta": delta,
        }
        if done.any():
            d = np.flatnonzero(done)
            answer = answers[d]
            correct = correct_now[d]
            reward[d] += cfg.correct_reward * correct
            reason = np.where(
                stop[d], Reason.STOP, np.where(max_steps[d], Reason.MAX_STEPS, Reason.TOKEN_CAP)
            )
            if why is not None:
                reason = np.where(bad[d], why[d], reason)
            end = {
                "correct": np.zeros(b, np.bool_),
                "answer": np.full(b, None, object),
                "return": np.zeros(b),
                "reason_code": np.zeros(b, np.int64),
            }
            end["correct"][d] = correct
            # The canonical answer of the class: entry n_classes of a question is "no answer".
            k = self._t.n_classes
            end["answer"][d] = self._t.answer_text[
                self._q[d] * (k + 1) + np.where(answer < 0, k, answer)
            ]
            end["return"][d] = cfg.correct_reward * correct - cfg.lam * charged[d]
            end["reason_code"][d] = reason
            end["reason"] = self._reason_text[end["reason_code"]]
            end["cost"] = np.where(done, charged, 0.0)
            end["decoded"] = np.where(done, self._dec, 0)
            end["tokens_deep"] = np.where(done, self._deep, 0)
            end["tokens_wide"] = np.where(done, self._wide, 0)
            base = self._dec - self._deep - self._wide - self._vdec
            end["tokens_base"] = np.where(done, base, 0)
            end["steps"] = np.where(done, self._steps, 0)
            end["chains"] = np.where(done, self._n, 0)
            end["question"] = np.where(done, self._q, -1)
            for key, val in end.items():
                info[key] = val
                info[f"_{key}"] = done
        self._needs_reset = done
        return obs, reward, terminated, truncated, info

    def _actions(self, actions: npt.ArrayLike) -> IntArray:
        a = np.asarray(actions)
        b = self.num_envs
        if a.shape != (b,):
            raise PolicyError(f"actions must have shape ({b},), got {a.shape}")
        if not np.issubdtype(a.dtype, np.integer) and not (
            np.issubdtype(a.dtype, np.floating) and (a == np.floor(a)).all()
        ):
            raise PolicyError(
                f"actions must be integers 0..3 (continue, branch, verify, stop), got {a.dtype}"
            )
        a = a.astype(np.int64, copy=False)
        if a.min() < 0 or a.max() > 3:
            # An episode about to restart ignores its action (NEXT_STEP autoreset).
            wrong = ~self._needs_reset & ((a < 0) | (a > 3))
            if wrong.any():
                raise PolicyError(
                    f"invalid actions {np.unique(a[wrong])[:5].tolist()}: use 0 (continue), "
                    "1 (branch), 2 (verify) or 3 (stop)"
                )
            a = np.clip(a, 0, 3)
        return a

    # -- what the info says ------------------------------------------------------------------

    @property
    def decoded(self) -> IntArray:
        """Tokens each episode has decoded so far (what ``token_cap`` bounds)."""
        return self._dec.copy()

    @property
    def cost(self) -> FloatArray:
        """Each episode's priced cost so far."""
        return self._cost.copy()

    @property
    def gen_seeds(self) -> IntArray:
        """Each episode's generator seed (-1 where the chain order was drawn uniformly)."""
        return self._gen_seed.copy()

    @property
    def episode_questions(self) -> IntArray:
        """Each episode's question (an index into :attr:`questions`)."""
        return self._q.copy()

    # -- episode mechanics -------------------------------------------------------------------

    def _per_env(self, values: Any, name: str) -> IntArray | None:
        if values is None:
            return None
        v = np.asarray(values)
        if v.shape != (self.num_envs,) or not np.issubdtype(v.dtype, np.integer):
            raise ConfigError(f"options[{name!r}] must be {self.num_envs} integers, got {values!r}")
        return v.astype(np.int64)

    def _reset_rows(self, rows: IntArray, pins: IntArray | None, seeds: IntArray | None) -> None:
        """Clear ``rows`` and draw their questions and chain orders (the opening comes later)."""
        t = self._t
        b = self.num_envs
        rng = self.np_random
        nq = len(self.questions)
        kmax = t.kmax
        if self.replay_seeds or seeds is not None:
            # One episode after the other, as ComputeAllocationEnv.reset draws them.
            q = np.empty(rows.size, np.int64)
            gs = np.full(rows.size, -1, np.int64)
            for i in range(rows.size):
                if pins is not None and pins[i] >= 0:
                    q[i] = pins[i]
                else:
                    q[i] = rng.integers(nq)
                if seeds is not None and seeds[i] >= 0:
                    gs[i] = seeds[i]
                elif self.replay_seeds:
                    gs[i] = rng.integers(2**31 - 1)
        else:
            q = rng.integers(nq, size=rows.size)
            if pins is not None:
                q = np.where(pins >= 0, pins, q)
            gs = np.full(rows.size, -1, np.int64)
        self._q[rows] = q
        self._gen_seed[rows] = gs
        fixed = gs >= 0
        self._fixed[rows] = fixed
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
                    order[:k, i] = replay_order(int(gs[row]), self.questions[q[row]].qid, k)
            self._order_[(np.arange(kmax)[:, None] * b + rows[sub]).ravel()] = order.ravel()
        self._kq[rows] = kq
        # Zero the vote cells of the episodes' chains (every cell holding votes is one), and
        # point their slots at "no answer", where slots past the chain count always point.
        kk, col = np.nonzero(self._slot < self._n[rows])
        r = rows[col]
        s = kk * b + r
        cells = self._cls_[s]
        self._cnt[cells] = 0
        self._w[cells] = 0
        none = self._none + rows
        self._cnt[none] = 0
        self._cls_[s] = self._none + r
        self._c16_[s] = t.n_classes
        for arr in (
            self._n, self._cur, self._steps, self._dec, self._nv, self._distinct,
            self._answered, self._ended, self._wc_tot, self._wv_tot, self._n_scored,
            self._deep, self._wide, self._vdec,
        ):  # fmt: skip
            arr[rows] = 0
        self._cost[rows] = 0.0
        self._charged[rows] = 0.0
        self._ver_sum[rows] = 0.0

    def _open(self, rows: IntArray) -> None:
        empty = np.zeros(0, np.int64)
        self._advance(rows, empty, empty)

    def _advance(self, opening: IntArray, cont: IntArray, br: IntArray) -> None:
        """One chunk (and probe) for a chain of each episode: a new chain (``opening`` and
        ``br``) or the current one (``cont``)."""
        t = self._t
        b = self.num_envs
        new = np.concatenate([opening, br])
        nn = new.size
        if nn == 0 and cont.size == 0:
            return
        # Branch: the next recorded chain, drawn without replacement (Fisher-Yates, one draw
        # per branch) unless the episode replays a generator seed's order.
        q_new = self._q[new]
        j_new = self._n[new]
        r = j_new.copy()
        drawn = ~self._fixed[new]
        if drawn.any():  # (no draw for a replayed order: the RNG stream stays the single env's)
            u = self.np_random.random(int(drawn.sum()))
            r[drawn] += np.floor(u * (t.kq[q_new[drawn]] - j_new[drawn])).astype(np.int64)
        sj, sr = j_new * b + new, r * b + new
        at_j, at_r = self._order_[sj], self._order_[sr]
        self._order_[sr] = at_j
        self._order_[sj] = at_r
        f_new = self._cbase_[q_new * t.kmax + at_r]
        if opening.size:  # the opening chain's first chunk sets the episode's difficulty
            no = opening.size
            self._dval[opening] = self._diff[q_new[:no] * t.kmax + at_r[:no]]
        # Continue: the current chain's next chunk; it needs verifying again if it was verified.
        s_cont = self._cur[cont] * b + cont
        f_old = self._fi_[s_cont]
        self._nv[cont] += self._vf_[s_cont] == f_old
        self._n[new] += 1
        self._cur[new] = j_new
        self._nv[new] += 1
        rows = np.concatenate([new, cont])
        s = np.concatenate([sj, s_cont])
        f = np.concatenate([f_new, f_old + 1])
        self._cost[rows] += t.step_cost[f]
        dec, deep = t.step_dec[f], t.step_deep[f]
        self._dec[rows] += dec
        self._deep[rows] += deep
        self._wide[rows] += np.where(s >= b, dec - deep, 0)  # slot > 0: not the first chain
        ended = t.ended[f]
        ended[nn:] -= t.ended[f_old]  # a continued chain may end, or reopen (budget forcing)
        self._ended[rows] += ended
        self._fi_[s] = f
        # Votes: the chain's answer moves from its old cell (a new chain's: none) to its new one.
        cls = t.answer[f]
        valid = cls < t.n_classes
        new_cell = cls * b + rows
        old_cell = self._cls_[s]
        old_cell[:nn] = self._none + new
        was_valid = old_cell < self._none
        moved = old_cell != new_cell
        co, cn = self._cnt[old_cell], self._cnt[new_cell]
        self._distinct[rows] += (valid & moved & (cn == 0)).astype(np.int64) - (
            was_valid & moved & (co == 1)
        )
        self._answered[rows] += valid.astype(np.int64) - was_valid
        self._cnt[old_cell] -= 1
        self._cnt[new_cell] += 1
        wo = self._wc_eff_[s]
        wo[:nn] = 0
        wn = np.where(valid, t.conf_int[f], 0)
        self._wc[old_cell] -= wo
        self._wc[new_cell] += wn
        self._wc_tot[rows] += wn - wo
        self._wc_eff_[s] = wn
        raw = self._wv_raw_[s]
        raw[:nn] = self._half  # a new chain is unscored: it votes 0.5
        vo = self._wv_eff_[s]
        vo[:nn] = 0
        vn = np.where(valid, raw, 0)
        self._wv[old_cell] -= vo
        self._wv[new_cell] += vn
        self._wv_tot[rows] += vn - vo
        self._wv_eff_[s] = vn
        self._cls_[s] = new_cell
        self._c16_[s] = cls
        if nn:
            sn = s[:nn]
            self._wv_raw_[sn] = self._half
            self._vf_[sn] = -1
            self._vval_[sn] = 0.5

    def _verify(self, rows: IntArray) -> None:
        """Score every chain of ``rows`` whose end changed since it was last scored."""
        t = self._t
        b = self.num_envs
        n = self._n[rows]
        kk = int(n.max())
        fi = np.take(self._fi[:kk], rows, axis=1)
        vf = np.take(self._vf[:kk], rows, axis=1)
        todo = (self._slot[:kk] < n) & (vf != fi)
        ks, col = np.nonzero(todo)
        r = rows[col]
        s = ks * b + r
        f = fi[ks, col]
        nv = self._nv[rows]
        v = rows.size
        self._dec[rows] += nv
        self._vdec[rows] += nv
        self._cost[rows] += np.bincount(col, t.judge_cost[f], v)
        was_scored = vf[ks, col] >= 0
        self._vf_[s] = f
        cells = self._cls_[s]
        raw = t.judge_int[f]
        eff = np.where(cells < self._none, raw, 0)
        delta = eff - self._wv_eff_[s]
        np.add.at(self._wv, cells, delta)  # several chains may share an answer
        np.add.at(self._wv_tot, r, delta)
        self._wv_raw_[s] = raw
        self._wv_eff_[s] = eff
        p = t.judge_p[f]
        old = self._vval_[s]
        self._vval_[s] = p
        self._n_scored[rows] += np.bincount(col, ~was_scored, v).astype(np.int64)
        self._ver_sum[rows] += np.bincount(col, p - np.where(was_scored, old, 0.0), v)
        self._nv[rows] = 0

    def _compute_mask(self) -> BoolArray:
        room = self.config.token_cap - self._dec
        fcur = self._fi_[self._cur * self.num_envs + self._ar]
        self._fcur = fcur
        mask = np.empty((self.num_envs, 4), np.bool_)
        mask[:, 0], mask[:, 1], mask[:, 2] = action_mask(
            cur_can_continue=self._t.cont_ok[fcur],
            chains=self._n,
            chains_left=self._n < self._kq,
            to_verify=self._nv,
            can_judge=self._can_judge,
            room=room,
            config=self.config,
        )
        mask[:, 3] = True
        self._mask = mask
        return mask

    def _correct(self, answers: IntArray) -> BoolArray:
        """Whether each episode's answer class (-1: none) is a right one for its question."""
        right = self._t.right
        return right[self._q, np.where(answers >= 0, answers, right.shape[1] - 1)]

    def _why_unavailable(self, a: IntArray, bad: BoolArray) -> IntArray:
        """Why the unavailable actions ``a[bad]`` cannot run, on the state before the step."""
        why = unavailable_reason(
            a,
            chains=self._n,
            room=self.config.token_cap - self._dec,
            to_verify=self._nv,
            config=self.config,
        )
        return np.where(bad, why, Reason.NONE).astype(np.int64)

    def _observe(self) -> tuple[np.ndarray, IntArray]:
        """The observations, and each episode's leading answer cell (majority; -1 for none)."""
        t = self._t
        b = self.num_envs
        cfg = self.config
        ar = self._ar
        inv_n = 1.0 / self._n  # every episode has a chain from its start
        kk = int(self._n.max())  # slots past every episode's chain count hold nothing
        cells = self._cls[:kk]
        # Leader: most votes, ties to the lowest slot (first appearance, as features.votes):
        # the slot rides in the low bits of the key. A class's count is 0 in an episode's
        # stale slots and at most 0 in its "no answer" cell.
        cs = self._cnt[cells]
        top = ((cs << self._shift) + self._rev[:kk]).max(0)
        c1 = np.maximum(top >> self._shift, 0).astype(np.int64)
        ls = ((self._k - 1) - (top & ((1 << self._shift) - 1))) * b + ar
        has_lead = c1 > 0
        lead = np.where(has_lead, self._cls_[ls], -1)
        lead16 = np.where(has_lead, self._c16_[ls], -1).astype(np.int16)
        c2 = np.maximum(np.where(self._c16[:kk] == lead16, 0, cs).max(0), 0).astype(np.int64)
        # With no answer every count and weight is 0: the shares come out 0 as they should.
        inv_tot = 1.0 / np.maximum(self._answered, 1)
        share = c1 * inv_tot
        second = c2 * inv_tot
        cur = self._cur * b + ar
        ns = self._n_scored
        w_top = np.take(self._w, cells, axis=0).max(0)
        obs = np.take(t.obs, self._fcur, axis=0)
        obs[:, _IX["budget_used"]] = np.minimum(self._dec * (1.0 / cfg.token_cap), 1.0)
        obs[:, _IX["n_chains"]] = self._n * (1.0 / cfg.max_chains)
        obs[:, _IX["vote_share"]] = share
        obs[:, _IX["vote_margin"]] = share - second
        obs[:, _IX["distinct"]] = self._distinct * inv_n
        obs[:, _IX["answered"]] = self._answered * inv_n
        obs[:, _IX["ended"]] = self._ended * inv_n
        obs[:, _IX["beta_leader"]] = self._beta[c1 * (t.kmax + 1) + c2]
        obs[:, _IX["conf_vote_share"]] = w_top[:, 0] / np.maximum(self._wc_tot, 1)
        obs[:, _IX["verified"]] = ns * inv_n
        obs[:, _IX["cur_verifier"]] = self._vval_[cur]
        obs[:, _IX["verifier_mean"]] = np.where(ns > 0, self._ver_sum / np.maximum(ns, 1), 0.5)
        obs[:, _IX["verifier_vote_share"]] = w_top[:, 1] / np.maximum(self._wv_tot, 1)
        obs[:, _IX["cur_agrees"]] = has_lead & (self._cls_[cur] == lead)
        if self._k >= ESC_WINDOW:  # the last ESC_WINDOW chains started hold one answer class
            n = self._n
            base = np.maximum(n - ESC_WINDOW, 0) * b + ar
            first = self._c16_[base]
            agree = (n >= ESC_WINDOW) & (first != t.n_classes)
            for d in range(1, ESC_WINDOW):
                agree &= self._c16_[base + d * b] == first
            obs[:, _IX["window_agree"]] = agree
        obs[:, _IX["difficulty"]] = self._dval
        obs[:, _IX["can_continue"] : _IX["can_verify"] + 1] = self._mask[:, :3]
        obs[:, _IX["steps"]] = self._steps * (1.0 / self._steps_limit)
        if self.probes is None:
            obs[:, HIDDEN_SLICE] = NEUTRAL
        else:
            p, valid, w_same = self._right_votes(kk, self._ar)
            tot = (p * valid).sum(0)
            top = np.where(valid, w_same, 0.0).max(0)
            best, any_valid = self._best_slot(p, valid)
            best_cls = np.take_along_axis(self._c16[:kk], best[None], 0)[0]
            obs[:, _IX["cur_right"]] = self._right[self._fcur]
            obs[:, _IX["right_vote_share"]] = np.where(tot > 0, top / np.where(tot > 0, tot, 1), 0)
            obs[:, _IX["right_best"]] = np.where(
                any_valid, np.take_along_axis(p, best[None], 0)[0], 0.0
            )
            obs[:, _IX["right_best_agrees"]] = any_valid & has_lead & (best_cls == lead16)
            obs[:, _IX["pass_rate"]] = self._pass[self._q]
        return obs, lead

    def _right_votes(self, kk: int, d: IntArray) -> tuple[FloatArray, BoolArray, FloatArray]:
        """For episodes ``d``: each slot's latest P(right) ``[kk, |d|]``, whether it is a live
        chain with an answer, and the P(right) summed over the live answered slots of its answer
        class (its class's weighted vote)."""
        n = self._n[d]
        fi = np.take(self._fi[:kk], d, axis=1)
        cls = np.take(self._c16[:kk], d, axis=1)
        p = self._right[fi]
        valid = (self._slot[:kk] < n) & (cls != self._t.n_classes)
        pw = np.where(valid, p, 0.0)
        same = cls[:, None, :] == cls[None, :, :]  # [kk, kk, |d|]
        return p, valid, (same * pw[None, :, :]).sum(1)

    @staticmethod
    def _best_slot(p: FloatArray, valid: BoolArray) -> tuple[IntArray, BoolArray]:
        """The live answered slot with the highest P(right) (ties: the first) per column."""
        best = np.where(valid, p, -1.0).argmax(0)
        return best.astype(np.int64), np.asarray(valid.any(0), np.bool_)

    def _final_answer(self, d: IntArray, lead: IntArray) -> IntArray:
        """The aggregated answer class of episodes ``d`` (-1: none), as ``_aggregate`` picks it."""
        agg = self.config.aggregate
        b = self.num_envs
        if agg in PROBE_AGGREGATES:
            kk = int(self._n[d].max()) if d.size else 1
            p, valid, w_same = self._right_votes(kk, d)
            if agg == "probe":
                slot = np.where(valid, w_same, -1.0).argmax(0)  # ties: first appearance
                ok = (p * valid).sum(0) > 0
            else:
                slot, ok = self._best_slot(p, valid)
            cls = np.take_along_axis(np.take(self._c16[:kk], d, axis=1), slot[None], 0)[0]
            return np.where(ok, cls.astype(np.int64), -1)
        if agg == "majority":
            cell = lead[d]
        else:
            table, tot = (
                (self._wc, self._wc_tot) if agg == "confidence" else (self._wv, self._wv_tot)
            )
            cells = np.take(self._cls, d, axis=1)
            live = self._slot < self._n[d]
            w = np.where(live & (cells < self._none), table[cells], -1)
            slot = w.argmax(0)  # first slot of the heaviest class: ties to first appearance
            cell = np.where(tot[d] > 0, cells[slot, np.arange(d.size)], -1)
        return np.where(cell >= 0, cell // b, -1)
