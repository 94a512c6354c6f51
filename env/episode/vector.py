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
from env.episode.hidden import HiddenProbes
from env.episode.observation import N_FEATURES
from env.episode.replay_state import ReplayState
from env.episode.replay_view import ReplayView
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
)
from env.generators.replay import ReplayGenerator
from env.questions import select_split, training_split
from features.errors import BankError, ConfigError, PolicyError

__all__ = ["REPLAY_ENDS", "BatchedReplayEnv"]

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
        # The episodes' arrays and moves, and what an agent sees of them.
        self._s = ReplayState(self._t, self.num_envs, self._k, [q.qid for q in qs], self._diff)
        self._view = ReplayView(
            self._s,
            config,
            self._right if probes is not None else None,
            self._pass if probes is not None else None,
        )
        self._ar = self._s.ar
        b = self.num_envs
        self._needs_reset = np.ones(b, np.bool_)
        self._mask = np.zeros((b, 4), np.bool_)
        self._mask[:, 3] = True
        self._fcur = np.full(b, -1, np.int64)
        self._started = False

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
        obs, lead = self._view.observe(self._mask, self._fcur)
        answers = self._view.final_answer(self._ar, lead)
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
        before = self._s.charged  # (a reset zeroes it in place: a new episode's reward is 0)
        self._s.steps += live
        new = np.flatnonzero(starting)
        if new.size:
            self._reset_rows(new, None, None)
        acting = live & ok & (a != 3)
        cont = np.flatnonzero(acting & (a == 0))
        br = np.flatnonzero(acting & (a == 1))
        ver = np.flatnonzero(acting & (a == 2))
        if ver.size:
            self._s.verify(ver)
        self._s.advance(new, cont, br, self.np_random)
        mask = self._compute_mask()
        max_steps = acting & (self._s.steps >= self._steps_limit)
        capped = acting & ~max_steps & ~(mask[:, 0] | mask[:, 1] | mask[:, 2])
        terminated = stop
        truncated = bad | max_steps | capped
        done = terminated | truncated
        # A new episode's opening is charged on its first step.
        charged = np.where(starting, 0.0, self._s.cost)
        delta = charged - before
        reward = -cfg.lam * delta
        self._s.charged = charged
        obs, lead = self._view.observe(self._mask, self._fcur)
        answers = self._view.final_answer(self._ar, lead)
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
                self._s.q[d] * (k + 1) + np.where(answer < 0, k, answer)
            ]
            end["return"][d] = cfg.correct_reward * correct - cfg.lam * charged[d]
            end["reason_code"][d] = reason
            end["reason"] = self._reason_text[end["reason_code"]]
            end["cost"] = np.where(done, charged, 0.0)
            end["decoded"] = np.where(done, self._s.dec, 0)
            end["tokens_deep"] = np.where(done, self._s.deep, 0)
            end["tokens_wide"] = np.where(done, self._s.wide, 0)
            base = self._s.dec - self._s.deep - self._s.wide - self._s.vdec
            end["tokens_base"] = np.where(done, base, 0)
            end["steps"] = np.where(done, self._s.steps, 0)
            end["chains"] = np.where(done, self._s.n, 0)
            end["question"] = np.where(done, self._s.q, -1)
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
        return self._s.dec.copy()

    @property
    def cost(self) -> FloatArray:
        """Each episode's priced cost so far."""
        return self._s.cost.copy()

    @property
    def gen_seeds(self) -> IntArray:
        """Each episode's generator seed (-1 where the chain order was drawn uniformly)."""
        return self._s.gen_seed.copy()

    @property
    def episode_questions(self) -> IntArray:
        """Each episode's question (an index into :attr:`questions`)."""
        return self._s.q.copy()

    # -- episode mechanics -------------------------------------------------------------------

    def _per_env(self, values: Any, name: str) -> IntArray | None:
        if values is None:
            return None
        v = np.asarray(values)
        if v.shape != (self.num_envs,) or not np.issubdtype(v.dtype, np.integer):
            raise ConfigError(f"options[{name!r}] must be {self.num_envs} integers, got {values!r}")
        return v.astype(np.int64)

    def _reset_rows(self, rows: IntArray, pins: IntArray | None, seeds: IntArray | None) -> None:
        """Draw the questions and chain orders of ``rows`` and clear them (the opening comes
        later): ``pins`` and ``seeds`` (-1: draw) as ``reset``'s options give them."""
        rng = self.np_random
        nq = len(self.questions)
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
        self._s.reset(rows, q, gs)

    def _open(self, rows: IntArray) -> None:
        empty = np.zeros(0, np.int64)
        self._s.advance(rows, empty, empty, self.np_random)

    def _compute_mask(self) -> BoolArray:
        room = self.config.token_cap - self._s.dec
        fcur = self._s.fi_[self._s.cur * self.num_envs + self._ar]
        self._fcur = fcur
        mask = np.empty((self.num_envs, 4), np.bool_)
        mask[:, 0], mask[:, 1], mask[:, 2] = action_mask(
            cur_can_continue=self._t.cont_ok[fcur],
            chains=self._s.n,
            chains_left=self._s.n < self._s.kq,
            to_verify=self._s.nv,
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
        return right[self._s.q, np.where(answers >= 0, answers, right.shape[1] - 1)]

    def _why_unavailable(self, a: IntArray, bad: BoolArray) -> IntArray:
        """Why the unavailable actions ``a[bad]`` cannot run, on the state before the step."""
        why = unavailable_reason(
            a,
            chains=self._s.n,
            room=self.config.token_cap - self._s.dec,
            to_verify=self._s.nv,
            config=self.config,
        )
        return np.where(bad, why, Reason.NONE).astype(np.int64)
