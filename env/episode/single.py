"""The compute-allocation environment: think longer, think wider, check, or answer now.

One episode is one question. While a :class:`~env.generators.base.Generator` (live vLLM, a vLLM
server, llama.cpp, or the replay of a trace bank) produces chains of thought chunk by chunk, the
agent decides what to spend compute on next. See :class:`ComputeAllocationEnv`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from env.episode.config import PROBE_AGGREGATES, Action, EnvConfig, Prices, decode_tokens
from env.episode.difficulty import bank_difficulty
from env.episode.hidden import HiddenProbes, probe_answer
from env.episode.observation import N_FEATURES, EpisodeView, feature_table, observe
from env.episode.rules import (
    UNSCORED,
    ChainFold,
    Reason,
    action_mask,
    can_continue,
    ended_in_thinking,
    fold_answer,
    fold_chunk,
    reason_text,
    text_reader,
    unavailable_reason,
    verifier_score,
)
from env.generators.base import Generator
from env.questions import select_split, training_split
from env.types import BudgetForcing, Chain, Chunk, PromptMode, Question, TipConfig, TokenUsage
from env.verifiers import Verifier
from features.answers import answers_equal
from features.errors import BudgetExhausted, ConfigError, GeneratorError, PolicyError

__all__ = [
    "ComputeAllocationEnv",
    "ChainState",
]


@dataclass
class ChainState(ChainFold):
    """What the environment tracks per chain: the chain, its :class:`~env.episode.rules.ChainFold`
    (answer, probes, confidences, ...) and its verifier score."""

    chain: Chain
    verifier: float | None = None
    verified_at: int = -1

    @property
    def n_chunks(self) -> int:
        return len(self.chain.chunks)


def _code_reader(qid: str) -> Callable[[str], str | None]:
    """How an ended chain of code question ``qid`` is read: its program's behaviour class."""
    from env.code.grade import grader_for

    grader = grader_for(qid)
    return lambda text: grader.read(text, ended=True)[0]


class ComputeAllocationEnv(gym.Env[np.ndarray, int]):
    """Allocate test-time compute to one question at a time: continue, branch, verify or stop.

    ## Action Space

    ``Discrete(4)``:

    | action | name | what happens | cost |
    |---|---|---|---|
    | 0 | continue | the current chain gets one more chunk (if it had ended: ``Wait,`` is appended and it goes on, s1 budget forcing), then an answer-forcing probe | the chunk's tokens, the probe's |
    | 1 | branch | a new chain starts from the prompt, becomes current, and gets its first chunk and probe | same |
    | 2 | verify | the verifier scores every chain whose end changed since it was last scored | self-verifier: one generated token per chain, plus its prompt at the prefill price; a PRM: the text it reads, at the prefill price |
    | 3 | stop | answer now: the aggregated answer of all chains | nothing |

    Every episode opens (at ``reset``) with one chain and its first chunk and probe; their cost
    is charged on the first step. A chain's answer is its final answer once it has ended, else its
    latest probe answer.
    An action that cannot run (see ``info["action_mask"]`` and the ``can_*`` features) ends the
    episode as truncated with the answer so far (or raises, with ``unavailable="raise"``).

    ## Observation Space

    ``Box(0, 1, (N,), float32)``; every feature is scaled to [0, 1] and is never NaN:

    {features}

    ## Rewards

    Every step costs ``-lam * Δcost`` where ``cost = prices · tokens`` (generated, probe, verifier,
    injected, prefill; cached prompt tokens are free). The step that ends the episode adds
    ``correct_reward`` if the answer equals the gold answer (answer equivalence from
    :mod:`features.answers`). So an episode's return is ``correct_reward * correct - lam * cost``,
    which ``info`` reports.

    ## Episode End

    * terminated: the agent stops.
    * truncated: an action that could exceed ``token_cap`` (never exceeded), the wall-clock cap,
      ``max_steps``, an unavailable action, or the generator's edge (a replayed bank has nothing
      more to serve). The answer so far is scored.

    ``info`` always holds ``answer``, ``correct``, ``gold``, ``tokens`` (by kind), ``cost``,
    ``decoded`` (what the cap counts, with ``ahead``) and its split ``tokens_base``,
    ``tokens_deep``, ``tokens_wide``, ``ahead`` (tokens a lookahead generator
    decoded that no action has taken yet, 0 otherwise), ``chains``, ``chain_tokens`` (each
    chain's generated tokens), ``steps``, ``action_mask``,
    ``qid``, ``correct_now``, ``cost_delta`` and, at the end, ``reason_code``, ``reason`` and
    ``return``. The keys both environments give mean the same in both:
    :data:`~env.episode.rules.INFO_KEYS` documents them.

    For learners, two per-step keys let rewards be recomputed for any ``lam`` and
    ``correct_reward`` from one rollout:

    * ``correct_now``: whether stopping now would be correct (the aggregated answer of the
      chains so far equals the gold answer); the same value as ``correct``, at every step
      (``None`` without a gold answer).
    * ``cost_delta``: the priced cost this step's reward charges, so that every step's reward is
      ``-lam * cost_delta``, plus ``correct_reward * correct`` on the step that ends the episode.
      The opening chunk (and probe) generated at ``reset`` is charged on the episode's first
      step: ``reset``'s info has ``cost_delta == 0.0`` and the first step's ``cost_delta`` is
      the opening's cost plus that step's own. The ``cost_delta`` of an episode's steps add up
      to its final ``cost``.

    ## Arguments

    * ``generator``: any :class:`~env.generators.base.Generator`.
    * ``questions``: the questions episodes draw from (uniformly, with the env's RNG), or pick one
      with ``reset(options={"question": i or qid})``.
    * ``config``: an :class:`EnvConfig` (or its fields as keyword arguments).
    * ``difficulty``: optional ``callable(question, first_chunk) -> float in [0, 1]``, the
      ``difficulty`` feature (0.5 when absent).
    * ``probes``: :class:`~env.episode.hidden.HiddenProbes`: the hidden-state features (the
      last five; neutral without) and the ``probe`` / ``probe-best`` aggregations read them.
      The generator must capture the states they were fitted on (``traits.hidden``: a replayed
      annotated bank, ``ReplayGenerator(bank, hidden=True)``, or a live engine behind
      :class:`~env.generators.capture.Capturing`).
    * ``verifier``: what ``verify`` asks: any object with ``judge(chains) -> list[JudgeResult]``
      (see :mod:`env.verifiers`); default: the generator's own self-verification.

    * ``mode``: how chains are prompted: ``cot`` (step by step) or ``draft`` (Chain-of-Draft).
    * ``tip``: a :class:`~env.types.TipConfig`: the thought-switching penalty applied to every
      chunk (``None``: none). A replayed bank was recorded in one mode and without TIP: replay
      refuses others.
    * ``require_gold``: a question without a gold answer cannot be scored, so the env refuses it
      at reset; with ``require_gold=False`` (serving, see :mod:`controller`) it runs, its reward
      never includes correctness and ``info["correct"]`` is ``None``.

    ``reset(options=...)`` also takes ``"reset_generator": False`` to leave the generator's
    cache and seed alone (a generator shared by concurrent questions).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}  # noqa: RUF012 (gymnasium's API)

    def __init__(
        self,
        generator: Generator,
        questions: Sequence[Question],
        config: EnvConfig | None = None,
        *,
        difficulty: Any = None,
        probes: HiddenProbes | None = None,
        verifier: Verifier | None = None,
        require_gold: bool = True,
        render_mode: str | None = None,
        mode: PromptMode = "cot",
        tip: TipConfig | None = None,
        **config_fields: Any,
    ) -> None:
        if mode not in ("cot", "draft"):
            raise ConfigError(f"mode must be 'cot' or 'draft', got {mode!r}")
        if tip is not None and not isinstance(tip, TipConfig):
            raise ConfigError(f"tip must be a TipConfig or None, got {type(tip).__name__}")
        self.mode: PromptMode = mode
        self.tip = tip
        if config is not None and config_fields:
            raise ConfigError("pass either config or its fields, not both")
        config = config if config is not None else EnvConfig(**config_fields)
        self._layers: tuple[int, ...] = ()
        if probes is not None:
            hidden = generator.traits.hidden
            probes.check(
                hidden,
                where=_generator_name(generator),
                what="the environment's hidden-state features",
            )
            self._layers = tuple(hidden.layers)
        elif config.aggregate in PROBE_AGGREGATES:
            raise ConfigError(
                f"aggregate={config.aggregate!r} reads the hidden-state probe: give the "
                "environment probes=HiddenProbes (fitted with HiddenProbes.fit on an annotated "
                "bank, or loaded with a policy that reads hidden states)"
            )
        self.probes = probes
        bank_k = generator.traits.chunk_tokens
        if bank_k is not None and bank_k != config.chunk_tokens:
            raise ConfigError(
                f"the generator serves chunks of {bank_k} tokens (a replayed bank); "
                f"set chunk_tokens={bank_k}"
            )
        qs = list(questions)
        if not qs:
            raise ConfigError("the environment needs at least one question")
        if render_mode not in (None, "ansi"):
            raise ConfigError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.generator = generator
        self.questions = qs
        self._by_qid = {q.qid: i for i, q in enumerate(qs)}
        self.config = config
        self.difficulty_fn = difficulty
        self.verifier = verifier
        self.require_gold = bool(require_gold)
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(4)  # type: ignore[assignment]
        self.observation_space = spaces.Box(0.0, 1.0, (N_FEATURES,), np.float32)
        self._ep: _Episode | None = None

    @classmethod
    def from_bank(
        cls,
        bank: str | Path,
        *,
        split: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> ComputeAllocationEnv:
        """An environment that replays a trace bank (questions of ``split`` only, if given).

        ``difficulty="auto"`` fits the difficulty predictor (:mod:`env.episode.difficulty`) on the bank's
        training questions (``None`` if it has fewer than two).
        """
        from env.generators.replay import ReplayGenerator

        gen = ReplayGenerator(bank, seed=seed)
        qs = gen.bank.questions
        if split:
            qs = select_split(qs, split)
            if not qs:
                raise ConfigError(f"the bank at {bank} has no recorded {split!r} questions")
        if kwargs.get("difficulty") == "auto":
            kwargs["difficulty"] = bank_difficulty(gen.bank, training_split(split))
        if kwargs.get("probes") is not None:
            gen = ReplayGenerator(gen.bank, seed=seed, hidden=True)
        cfg = kwargs.pop("config", None)
        if cfg is None:
            fields = {k: kwargs.pop(k) for k in _CONFIG_FIELDS & kwargs.keys()}
            cfg = EnvConfig.from_manifest(gen.bank.manifest, **fields)
        return cls(gen, qs, cfg, **kwargs)

    # -- gymnasium API -------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        pick = (options or {}).get("question")
        if pick is None:
            index = int(self.np_random.integers(len(self.questions)))
        elif isinstance(pick, str):
            if pick not in self._by_qid:
                raise ConfigError(f"question {pick!r} is not among this environment's questions")
            index = self._by_qid[pick]
        else:
            index = int(pick)
            if not 0 <= index < len(self.questions):
                raise ConfigError(f"question index {index} is outside 0..{len(self.questions) - 1}")
        q = self.questions[index]
        if not q.scorable and self.require_gold:
            raise ConfigError(
                f"question {q.qid!r} has no gold answer: its reward cannot be scored; "
                "drop it from the environment's questions"
            )
        gen_seed = int(self.np_random.integers(2**31 - 1))
        if (options or {}).get("reset_generator", True):
            self.generator.reset(gen_seed)
        if self.verifier is not None:
            self.verifier.reset()  # a verifier's cache never makes one episode cheaper than another
        self._ep = _Episode(question=q, t0=time.monotonic())
        try:
            self._branch()  # every episode opens with one chain's first chunk
        except BudgetExhausted as e:
            raise ConfigError(f"question {q.qid!r} cannot start: {e}") from e
        return self._observe(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        ep = self._ep
        if ep is None or ep.done:
            raise PolicyError("call reset() before step() (the episode has ended)")
        a = _as_action(action)
        cfg = self.config
        before = ep.charged
        ep.steps += 1
        mask = self.action_mask()
        terminated = truncated = False
        reason, detail = Reason.NONE, ""
        if a == Action.STOP:
            terminated, reason = True, Reason.STOP
        elif not mask[a]:
            reason = self._why_unavailable(a)
            if cfg.unavailable == "raise":
                ep.steps -= 1
                raise PolicyError(
                    f"action {a.name.lower()} is unavailable: {reason_text(reason, cfg)}"
                )
            truncated = True
        else:
            try:
                if a == Action.CONTINUE:
                    self._continue(ep.states[ep.cur])
                elif a == Action.BRANCH:
                    self._branch()
                else:
                    self._verify()
            except BudgetExhausted as e:
                truncated, reason, detail = True, Reason.GENERATOR_EDGE, str(e)
        if not (terminated or truncated):
            if cfg.time_cap_s and time.monotonic() - ep.t0 > cfg.time_cap_s:
                truncated, reason = True, Reason.TIME_CAP
            elif ep.steps >= cfg.steps_limit:
                truncated, reason = True, Reason.MAX_STEPS
            elif not self.action_mask()[:3].any():
                # Nothing left but stopping: the token cap (or the bank) is reached.
                truncated, reason = True, Reason.TOKEN_CAP
        ep.charged = ep.cost(cfg.prices)
        ep.cost_delta = ep.charged - before
        reward = -cfg.lam * ep.cost_delta
        if terminated or truncated:
            ep.done = True
            ep.reason = reason
            ep.reason_detail = detail
            ep.final = self._aggregate()
            ep.correct = ep.question.is_right(ep.final[0])
            reward += cfg.correct_reward * float(ep.correct)
        return self._observe(), float(reward), terminated, truncated, self._info()

    def answer_chain(self, answer: str | None = None) -> tuple[Chain, bool] | None:
        """The chain that best shows ``answer`` (default: the episode's: its stop answer, else
        the aggregate so far), and whether the chain's own text reaches it (it ended with it)
        rather than a probe reading it from its unfinished text.

        Among the chains with that answer: an ended one before an open one, then the most
        confident (mean token confidence), then the first opened. ``None`` before any chain
        and when no chain has the answer.
        """
        ep = self._ep
        if ep is None or not ep.states:
            return None
        if answer is None:
            answer, _ = ep.final if ep.final is not None else self._aggregate()
        if answer is None:
            return None
        best: tuple[tuple[bool, float, int], ChainState] | None = None
        for i, s in enumerate(list(ep.states)):
            if s.answer is None or not answers_equal(s.answer, answer):
                continue
            key = (s.chain.finished, s.confidence_weight, -i)
            if best is None or key > best[0]:
                best = (key, s)
        if best is None:
            return None
        return best[1].chain, best[1].chain.finished

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self._ep is None:
            return None
        ep = self._ep
        lines = [f"{ep.question.qid}: {len(ep.states)} chains, {ep.decoded} tokens decoded"]
        for i, s in enumerate(ep.states):
            mark = "*" if i == ep.cur else " "
            lines.append(
                f"{mark} chain {i}: {s.chain.num_tokens} tokens, "
                f"{'ended' if s.chain.finished else 'open'}, answer {s.answer!r}, "
                f"verifier {s.verifier if s.verifier is not None else '-'}"
            )
        return "\n".join(lines)

    # -- actions -------------------------------------------------------------------------------

    def action_mask(self, *, room: int | None = None) -> np.ndarray:
        """Which actions can run now: ``[continue, branch, verify, stop]``.

        ``room``: as if the token cap left that many decoded tokens (default: what it leaves);
        the controller asks with no limit to tell whether the cap is what stopped a policy.
        """
        ep = self._ep
        if ep is None:
            return np.array([False, False, False, True])
        left = self.generator.remaining_chains(ep.question)
        can_cont, can_branch, can_verify = action_mask(
            cur_can_continue=bool(ep.states) and self._can_continue(ep.states[ep.cur]),
            chains=len(ep.states),
            chains_left=left is None or left > 0,
            to_verify=len(self._to_verify()),
            can_judge=self._can_judge(),
            room=self._room() if room is None else room,
            config=self.config,
        )
        return np.array([can_cont, can_branch, can_verify, True])

    def action_bound(self, action: Action | int) -> int:
        """The most decoded tokens ``action`` can cost now (what the token cap is checked against)."""
        a = _as_action(action)
        n = len(self._to_verify()) if a == Action.VERIFY and self._ep is not None else 0
        return self.config.bound(a, n)

    def _ahead(self) -> int:
        """Tokens a lookahead generator decoded that no action has taken yet (the cap counts them)."""
        return self.generator.ahead

    def _room(self) -> int:
        """Decoded tokens the token cap leaves (what was decoded ahead counts)."""
        ep = self._ep
        assert ep is not None
        return self.config.token_cap - ep.decoded - self._ahead()

    def _can_judge(self) -> bool:
        if self.verifier is not None:
            return self.verifier.can_judge
        return self.generator.traits.can_judge

    def _can_continue(self, s: ChainState) -> bool:
        c = s.chain
        return can_continue(
            ended=c.finished,
            finish_reason=c.finish_reason,
            past_end=c.finished or c.budget is not None,
            extensions=s.extensions,
            tokens=c.num_tokens,
            config=self.config,
        ) and self.generator.can_extend(c)

    def _why_unavailable(self, a: Action) -> Reason:
        ep = self._ep
        assert ep is not None
        why = unavailable_reason(
            a,
            chains=len(ep.states),
            room=self._room(),
            to_verify=len(self._to_verify()),
            config=self.config,
        )
        return Reason(int(why))

    def _extend(self, s: ChainState) -> Chunk:
        chunks = self.generator.extend([s.chain], self.config.chunk_tokens, tip=self.tip)
        if len(chunks) != 1:
            raise GeneratorError(
                f"the generator returned {len(chunks)} chunks for one chain (chain "
                f"{s.chain.chain_id} of {s.chain.question.qid!r})"
            )
        return chunks[0]

    def _continue(self, s: ChainState) -> None:
        c = s.chain
        ep = self._ep
        assert ep is not None
        if c.finished or c.budget is not None:
            # s1 budget forcing past the chain's end: "Wait," is appended to an ended chain and
            # sampling goes on for one more chunk (each such chunk counts as an extension).
            cap = (
                self.config.max_chain_tokens
                + self.config.extension_chunks * self.config.chunk_tokens
            )
            c.budget = BudgetForcing(
                min_tokens=c.num_tokens + 1, max_tokens=max(cap, c.num_tokens + 1)
            )
            c.finished = False
            s.extensions += 1
        self._after_chunk(s, self._extend(s))

    def _branch(self) -> None:
        ep = self._ep
        assert ep is not None
        (chain,) = self.generator.start(ep.question, 1, mode=self.mode)
        s = ChainState(chain)
        ep.states.append(s)
        ep.cur = len(ep.states) - 1
        self._after_chunk(s, self._extend(s))
        if ep.difficulty is None:
            fn = self.difficulty_fn
            ep.difficulty = float(fn(ep.question, chain.chunks[0])) if fn is not None else 0.5
        if ep.pass_rate is None and self.probes is not None:
            if chain.prompt_hidden is None:
                raise GeneratorError(
                    f"{_generator_name(self.generator)} captures hidden states but gave no "
                    f"prompt state for {ep.question.qid!r}"
                )
            ep.pass_rate = self.probes.pass_rate(ep.question.qid, chain.prompt_hidden, self._layers)

    def _after_chunk(self, s: ChainState, chunk: Chunk) -> None:
        ep = self._ep
        assert ep is not None
        before = ep.decoded
        ep.usage = ep.usage + chunk.usage
        fold_chunk(s, chunk.text, chunk.confidence, chunk.entropy)
        c = s.chain
        hidden = chunk.hidden
        if self.probes is not None and hidden is None:
            raise GeneratorError(
                f"{_generator_name(self.generator)} captures hidden states but its chunk of "
                f"chain {c.chain_id} of {c.question.qid!r} carries none"
            )
        read = _code_reader(c.question.qid) if c.question.is_code else text_reader(c.question)
        if c.finished and ended_in_thinking(c.text, self.generator.traits.thinking_end):
            read = self._closing_read(c)
        fold_answer(
            s,
            final_text=c.text if c.finished else None,
            probe=(lambda: self._probe(c)) if self.config.probe else None,
            read=read,
        )
        if self.probes is not None and hidden is not None:
            # After the answer: the probe's inputs read the chain's answers so far.
            extras = self.probes.extras(s, c.num_tokens, chunk.finish_reason == "stop")
            s.right = float(
                self.probes.right(c.question.qid, hidden[None], self._layers, [extras])[0]
            )
        ep.split(s, ep.decoded - before)

    def _closing_read(self, c: Chain) -> Callable[[str], str | None]:
        """The answer of a chain that ended inside its thinking section: the probe, which
        closes the section (:func:`env.episode.rules.ended_in_thinking`; not charged, like
        any final answer)."""

        def read(_text: str) -> str | None:
            (p,) = self.generator.probe([c], max_tokens=self.config.probe_tokens)
            return p.answer

        return read

    def _probe(self, c: Chain) -> str | None:
        """Probe the open chain ``c`` (at cost); its raw answer."""
        ep = self._ep
        assert ep is not None
        (p,) = self.generator.probe([c], max_tokens=self.config.probe_tokens)
        ep.usage = ep.usage + p.usage
        return p.answer

    def _to_verify(self) -> list[ChainState]:
        ep = self._ep
        assert ep is not None
        return [s for s in ep.states if s.n_chunks > 0 and s.verified_at != s.n_chunks]

    def _verify(self) -> None:
        ep = self._ep
        assert ep is not None
        todo = self._to_verify()
        judge = self.verifier.judge if self.verifier is not None else self.generator.judge
        results = judge([s.chain for s in todo])
        for s, r in zip(todo, results, strict=True):
            ep.usage = ep.usage + r.usage
            s.verifier = verifier_score(float(r.p_yes))
            s.verified_at = s.n_chunks

    # -- answers, observation, info ------------------------------------------------------------

    def _aggregate(self) -> tuple[str | None, float]:
        from features.aggregate import (
            confidence_weighted_vote,
            majority_vote,
            verifier_weighted_vote,
        )

        ep = self._ep
        assert ep is not None
        answers = [s.answer for s in ep.states]
        if self.config.aggregate in PROBE_AGGREGATES:
            return probe_answer(answers, [s.right for s in ep.states], self.config.aggregate)
        if self.config.aggregate == "confidence":
            conf = [s.confidence_weight for s in ep.states]
            return confidence_weighted_vote(answers, conf)
        if self.config.aggregate == "verifier":
            return verifier_weighted_vote(
                answers, [s.verifier if s.verifier is not None else UNSCORED for s in ep.states]
            )
        return majority_vote(answers)

    def _observe(self) -> np.ndarray:
        ep = self._ep
        assert ep is not None
        view = EpisodeView(
            states=ep.states,
            cur=ep.cur,
            decoded=ep.decoded,
            steps=ep.steps,
            difficulty=ep.difficulty,
            mask=self.action_mask(),
            config=self.config,
            pass_rate=ep.pass_rate,
        )
        return observe(view)

    def _info(self) -> dict[str, Any]:
        ep = self._ep
        assert ep is not None
        answer, share = ep.final if ep.final is not None else self._aggregate()
        u = ep.usage
        correct = ep.question.is_right(answer) if ep.question.scorable else None
        info: dict[str, Any] = {
            "qid": ep.question.qid,
            "answer": answer,
            "share": share,
            "gold": ep.question.gold,
            "correct": correct,
            "correct_now": correct,
            "cost_delta": ep.cost_delta,
            "tokens": {
                "generated": u.generated,
                "probe": u.probe,
                "judge": u.judge,
                "injected": u.injected,
                "prefill": u.prefill,
                "cached": u.cached,
            },
            "decoded": ep.decoded,
            "tokens_base": ep.base,
            "tokens_deep": ep.deep,
            "tokens_wide": ep.wide,
            "ahead": self._ahead(),
            "cost": ep.cost(self.config.prices),
            "chains": len(ep.states),
            "chain_tokens": [s.chain.num_tokens for s in ep.states],
            "steps": ep.steps,
            "action_mask": self.action_mask(),
            "difficulty": ep.question.difficulty,
        }
        if ep.done:
            info["reason_code"] = int(ep.reason)
            info["reason"] = reason_text(ep.reason, self.config, ep.reason_detail)
            info["return"] = self.config.correct_reward * float(
                ep.correct
            ) - self.config.lam * ep.cost(self.config.prices)
        return info

    @property
    def episode(self) -> _Episode | None:
        """The episode in progress (read-only use: heuristics read chain states from it)."""
        return self._ep


@dataclass
class _Episode:
    question: Question
    t0: float
    states: list[ChainState] = field(default_factory=list)
    cur: int = 0
    steps: int = 0
    usage: TokenUsage = field(default_factory=TokenUsage)
    difficulty: float | None = None
    #: the difficulty probe's prediction (``None`` without probes)
    pass_rate: float | None = None
    done: bool = False
    reason: Reason = Reason.NONE
    reason_detail: str = ""
    final: tuple[str | None, float] | None = None
    correct: bool = False
    #: Cost already given as reward (the opening chunk's cost is charged on the first step).
    charged: float = 0.0
    #: The cost the last step's reward charged (0 before the first step).
    cost_delta: float = 0.0
    #: Decoded tokens of the chunks (with their probes): the first chain's up to its own end,
    #: those past a chain's end (budget forcing), the other chains' up to their own ends.
    base: int = 0
    deep: int = 0
    wide: int = 0

    @property
    def decoded(self) -> int:
        return decode_tokens(self.usage)

    def split(self, s: ChainState, tokens: int) -> None:
        """Count ``tokens``, decoded for a chunk of ``s`` and its probe, as base, deep or wide
        (``info["tokens_base"]`` and the rest: :data:`~env.episode.rules.INFO_KEYS`)."""
        if s.extensions:
            self.deep += tokens
        elif s is self.states[0]:
            self.base += tokens
        else:
            self.wide += tokens

    def cost(self, prices: Prices) -> float:
        return prices.cost(self.usage)


def _generator_name(generator: Generator) -> str:
    """The generator as an error message names it (a replayed bank by its folder)."""
    from env.generators.replay import ReplayGenerator

    if isinstance(generator, ReplayGenerator):
        return f"the bank at {generator.bank.path}"
    return f"the generator {type(generator).__name__}"


def _as_action(action: Any) -> Action:
    try:
        if isinstance(action, np.ndarray):
            if action.size != 1:
                raise ValueError
            action = action.reshape(()).item()
        if isinstance(action, bool | float) and not float(action).is_integer():
            raise ValueError
        return Action(int(action))
    except (ValueError, TypeError):
        raise PolicyError(
            f"invalid action {action!r}: use 0 (continue), 1 (branch), 2 (verify) or 3 (stop)"
        ) from None


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(EnvConfig))


ComputeAllocationEnv.__doc__ = (ComputeAllocationEnv.__doc__ or "").replace(
    "{features}", feature_table().replace("\n", "\n    ")
)
