"""The controller: a question in; an answer, its confidence, a trace and the cost out.

:class:`Controller` runs a policy (:mod:`policies`) over a
:class:`~env.episode.single.ComputeAllocationEnv` built on a generator for one question at a time:
the policy reads the observation and picks continue / branch / verify / stop until it stops or a
cap ends the episode. Every exit gives the best answer so far (the vote of the chains so far) with
its confidence (the leader's vote share) and the reason:

=========================  =====================================================================
reason                     what ended the episode
=========================  =====================================================================
``stop``                   the policy stopped
``token cap``              the next action could exceed the token cap (never exceeded: the env
                           refuses an action whose worst case does not fit), or the policy
                           stopped only because the cap left no room for what it would have
                           done next (``Result.cut_short`` names that action)
``latency cap``            the wall-clock cap: checked between steps (a step that would likely not
                           finish in time is not started) and enforced around generator calls
                           (the episode runs in a worker thread; at the deadline the controller
                           stops waiting and answers with the state after the last finished step)
``generator fault: ...``   the generator failed (an error, a timeout, an empty first chunk)
``fleet budget``           :meth:`Controller.solve_fleet` had no tokens left for this question
``cancelled``              :meth:`Controller.asolve` was cancelled, or its ``cancel`` event set
others                     the env's own truncations (``max steps``, an unavailable action)
=========================  =====================================================================

Tokens are counted once, by the env: a result's ``decoded`` equals the sum of its trace's
``delta`` and of its decoded kinds plus ``unused``. A step abandoned at the latency cap or on
cancellation is not in the result (its tokens are not known), but it was admitted under the token
cap, so even then the engine never decodes more than the cap for a question; its worst case is
``Result.in_flight``. Abandoning an episode cancels its engine work
(:class:`~env.generators.cancel.CancelScope`): no new engine call starts, and the calls in flight
are closed (an OpenAI-server generator cancels its HTTP requests; vLLM aborts them).

A policy that plans several chains (``planned_chains > 1``: best-of-N, ESC) gets them generated
side by side (:class:`~env.generators.lookahead.Lookahead`): each engine call extends the current
chain and the planned chains not opened yet, so best-of-4 costs about one chain's round trips, not
four. A policy that reads no probe runs without probes, and one that acts only between chains
(``acts_between_chains``) gets each chain in one piece when the cap has room for its planned chains
in full: best-of-N is then one engine request. A policy that runs every chain to its end but reads
features inside it (``finishes_chains``: the learned policies that decide between chains) gets
each chain read ahead: the rest of the chain in one engine call, handed to the env chunk by chunk,
so it sees what it was trained on at one round trip per chain. Tokens generated ahead count
against the token cap from the moment they are decoded; those the policy then never took (chains
it never opened, the rest of a chain it cut) are reported as ``unused`` (included in
``decoded``). Fleet mode admits one step at a time against the shared budget, so it generates
nothing ahead.

Questions need no gold answer: the controller never reports correctness (a placeholder gold
answer satisfies the env, which refuses ``gold=None``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from env.episode.config import Action, EnvConfig
from env.episode.hidden import HiddenProbes
from env.episode.observation import FEATURE_NAMES
from env.episode.single import ComputeAllocationEnv
from env.generators.base import Generator
from env.generators.cancel import CancelScope
from env.generators.lookahead import Lookahead
from env.types import INJECT_ALLOWANCE, PromptMode, Question, TipConfig, TokenUsage
from features.errors import ConfigError, GeneratorError
from policies.base import HasValue, LamConditioned, Policy

__all__ = ["MIN_LATENCY_CAP_S", "NO_GOLD", "Controller", "FleetResult", "Result", "Step"]

log = logging.getLogger(__name__)

#: The gold answer given to the env for questions that have none (never reported).
NO_GOLD = "ponder:no-gold-answer"
#: The smallest latency cap (seconds) a controller (``latency_cap_s``, ``ponder serve
#: --latency-cap``) or a request to the proxy may set: no engine answers sooner, so a smaller cap
#: could only ever answer "nothing yet" (0 means no cap). Per-call caps are not held to it: the
#: proxy passes what is left of a request's cap after it waited for a slot.
MIN_LATENCY_CAP_S = 0.1
_ACTION_NAMES = {int(a): a.name.lower() for a in Action}
#: The observation features that say which of continue, branch, verify can run.
_MASK_FEATURES = ("can_continue", "can_branch", "can_verify")
#: Weight of the latest step in the estimate of the next step's duration.
_STEP_EMA = 0.5
#: Smallest difficulty used by the proportional fleet split (so an easy question is not starved).
_MIN_DIFFICULTY = 0.05


@dataclass(frozen=True, slots=True)
class Step:
    """One decision of an episode (the first record, ``start``, is the opening chain).

    Attributes:
        action: ``start``, ``continue``, ``branch``, ``verify`` or ``stop``.
        features: the observation the policy decided on, by feature name (empty for ``start``).
        decoded: decoded tokens of the question so far, after the step.
        delta: decoded tokens the step cost.
        elapsed_s: seconds since the question arrived, after the step.
    """

    action: str
    features: dict[str, float]
    decoded: int
    delta: int
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class Result:
    """What the controller answers for one question.

    Attributes:
        answer: the aggregated answer of the chains (``None`` if no chain had one).
        confidence: the leading answer's share of the vote, in [0, 1].
        trace: the decisions, in order (see :class:`Step`).
        tokens: tokens by kind (``generated``, ``probe``, ``judge``, ``injected``, ``prefill``,
            ``cached``).
        decoded: decoded tokens (generated + probe + judge + injected, plus ``unused``): what the
            token cap counts.
        latency_s: seconds from the call to the answer.
        reason: why the episode ended (see the module docstring).
        n_chains: chains started.
        qid: the question's id.
        policy: the policy's name.
        prompt_tokens: tokens of the question's prompt as the model saw it (0 if none started).
        unused: tokens decoded ahead for planned chains the policy never took (see the module
            docstring); they are in ``decoded`` but in none of ``tokens``' kinds.
        chain_tokens: each chain's generated tokens, in the order the chains were opened.
        cut_short: the action (``continue``, ``branch`` or ``verify``) the policy would have
            taken instead of stopping had the token cap left room for it: the cap, not the
            policy, ended the episode (``reason`` is then ``token cap``). ``None`` otherwise.
        in_flight: the most decoded tokens a step still running when the episode was abandoned
            (``latency cap``, ``cancelled``) could have cost: its engine calls were cancelled,
            so its exact cost is unknown and not in ``decoded``. 0 when none was running.
        text: the answer in full, as a user reads it: the text of a chain that gave the answer
            (an ended one first, then the most confident: see
            :meth:`~env.episode.single.ComputeAllocationEnv.answer_chain`); when only a probe
            read the answer from an unfinished chain, that chain's text so far followed by
            ``The answer is \\boxed{ANSWER}.``. Empty when there is no answer.
        chain_id: the chain :attr:`text` comes from (``None`` when empty).
    """

    answer: str | None
    confidence: float
    trace: tuple[Step, ...]
    tokens: dict[str, int]
    decoded: int
    latency_s: float
    reason: str
    n_chains: int
    qid: str = ""
    policy: str = ""
    prompt_tokens: int = 0
    unused: int = 0
    chain_tokens: tuple[int, ...] = ()
    cut_short: str | None = None
    in_flight: int = 0
    text: str = ""
    chain_id: int | None = None

    @property
    def fault(self) -> bool:
        """Whether the generator failed (the answer is the best one before the failure)."""
        return self.reason.startswith("generator fault")


@dataclass(frozen=True, slots=True)
class FleetResult:
    """The answers to a batch of questions that shared one token budget.

    Attributes:
        results: one :class:`Result` per question, in order.
        total_tokens: the budget.
        decoded: decoded tokens spent (never more than ``total_tokens``).
        base_share: the tokens each question was given before the rest was spent greedily.
    """

    results: tuple[Result, ...]
    total_tokens: int
    decoded: int
    base_share: int


class Controller:
    """Answer questions under token and latency caps with a policy over a generator.

    Args:
        generator: any :class:`~env.generators.base.Generator`. It is shared by concurrent
            questions when it says it is thread-safe (``generator.traits.thread_safe``: an
            :class:`~env.generators.openai.OpenAIGenerator`, whose HTTP client is); other
            generators are called by one question at a time.
        policy: any :class:`~policies.base.Policy`; every question gets its own copy
            (``policy.clone()`` if it has one, else a deep copy), reset for one episode.
        config: the episode settings (default: ``EnvConfig`` with the policy's aggregation).
        token_cap: decoded tokens per question (overrides ``config.token_cap``); per-call caps
            are clamped to it.
        latency_cap_s: seconds per question (``None`` or 0: none); per-call caps are clamped to it.
        difficulty: the env's difficulty predictor, ``callable(question, first_chunk) -> [0, 1]``.
        verifier: the env's verifier (default: the generator's self-verification).
        seed: the env seed of every question (the same question gets the same generator seed).
        lookahead: generate a policy's planned chains side by side, and read chains ahead for a
            policy that finishes them (see the module docstring).
        probes: hidden-state probes for a rule that reads the model's state and has none of
            its own (a learned policy trained with hidden-state features brings its own); the
            generator must capture the states they read (``traits.hidden``:
            :class:`~env.generators.capture.Capturing`).
        mode: how chains are prompted by default: ``cot`` or ``draft`` (Chain-of-Draft).
        tip: the default thought-switching penalty (``None``: none).

    Raises:
        ConfigError: a cap below what opening one chain costs, or a bad value.
    """

    def __init__(
        self,
        generator: Generator,
        policy: Policy,
        *,
        config: EnvConfig | None = None,
        token_cap: int | None = None,
        latency_cap_s: float | None = None,
        difficulty: Any = None,
        verifier: Any = None,
        seed: int = 0,
        lookahead: bool = True,
        probes: HiddenProbes | None = None,
        mode: PromptMode = "cot",
        tip: TipConfig | None = None,
    ) -> None:
        if not isinstance(policy, Policy):
            raise ConfigError(
                "policy must follow the Policy protocol (policies.base: subclass BasePolicy), "
                f"got {policy!r}"
            )
        self.probes: HiddenProbes | None = None
        if policy.reads_hidden:
            self.probes = policy.hidden_probes if policy.hidden_probes is not None else probes
            if self.probes is None:
                raise ConfigError(
                    f"policy {policy.name!r} reads the model's hidden states and has no probes "
                    "of its own: give the controller probes=HiddenProbes (fitted on an "
                    "annotated bank: HiddenProbes.fit)"
                )
            self.probes.check(
                generator.traits.hidden,
                where=f"the generator {type(generator).__name__}",
                what=f"policy {policy.name!r}",
            )
        if config is None:
            config = EnvConfig(aggregate=policy.aggregate)  # type: ignore[arg-type]
        elif config.aggregate != policy.aggregate:
            log.warning(
                "policy %s is meant for aggregate=%r, the config says %r",
                policy.name,
                policy.aggregate,
                config.aggregate,
            )
        if token_cap is not None:
            config = replace(config, token_cap=_positive_int(token_cap, "token_cap"))
        _check_opening(config, config.token_cap)
        self.generator = generator
        self.policy = policy
        self.config = config
        self.latency_cap_s = _latency(latency_cap_s, MIN_LATENCY_CAP_S)
        self.difficulty = difficulty
        self.verifier = verifier
        self.seed = int(seed)
        self.lookahead = bool(lookahead)
        if mode not in ("cot", "draft"):
            raise ConfigError(f"mode must be 'cot' or 'draft', got {mode!r}")
        self.mode: PromptMode = mode
        self.tip = tip
        self._counter = itertools.count()
        self._gen_lock: threading.RLock | None = (
            None if generator.traits.thread_safe else threading.RLock()
        )

    @property
    def token_cap(self) -> int:
        return self.config.token_cap

    def __repr__(self) -> str:
        cap = f", latency_cap_s={self.latency_cap_s:g}" if self.latency_cap_s else ""
        return f"Controller({self.policy.name!r}, token_cap={self.token_cap}{cap})"

    # -- one question -----------------------------------------------------------------------

    def solve(
        self,
        question: str | Question,
        *,
        token_cap: int | None = None,
        latency_cap_s: float | None = None,
        seed: int | None = None,
        lam: float | None = None,
        mode: PromptMode | None = None,
        tip: TipConfig | bool | None = None,
    ) -> Result:
        """Answer one question (blocking).

        Args:
            question: the question text, or a :class:`~env.types.Question`.
            token_cap: a tighter token cap for this call (clamped to the controller's).
            latency_cap_s: a tighter latency cap for this call (clamped to the controller's).
            seed: the env seed (default: the controller's).
            lam: the price λ of compute this call's policy acts for (a learned policy's, see
                :class:`~policies.base.LamConditioned`; default: the policy's own).
            mode: how this call's chains are prompted, ``cot`` or ``draft`` (Chain-of-Draft);
                default: the controller's.
            tip: this call's thought-switching penalty: a :class:`~env.types.TipConfig`,
                ``False`` for none, ``None`` for the controller's.

        Raises:
            ConfigError: an empty question, one too long for the model, or a cap below what
                opening one chain costs. Generator failures are not raised: the result says
                ``generator fault: ...``.
        """
        t0 = time.monotonic()
        run = self._run(question, token_cap, latency_cap_s, seed, t0, lam=lam, mode=mode, tip=tip)
        if run.deadline is None:
            run.solve()
            return run.outcome()
        th = threading.Thread(target=run.solve, name="ponder-question", daemon=True)
        th.start()
        th.join(max(0.0, run.deadline - time.monotonic()))
        if th.is_alive():
            return run.abandon("latency cap")
        return run.outcome()

    async def asolve(
        self,
        question: str | Question,
        *,
        token_cap: int | None = None,
        latency_cap_s: float | None = None,
        seed: int | None = None,
        cancel: asyncio.Event | None = None,
        lam: float | None = None,
        on_step: Callable[[Step], None] | None = None,
        mode: PromptMode | None = None,
        tip: TipConfig | bool | None = None,
    ) -> Result:
        """Answer one question without blocking the event loop (see :meth:`solve`).

        The episode runs in a worker thread; the coroutine waits for it until the latency cap.
        Cancelling the coroutine, or setting ``cancel`` (the proxy sets it when the client
        disconnects), abandons the episode and cancels its engine work: no new engine call
        starts and those in flight are closed. With ``cancel`` the result so far comes back
        with reason ``cancelled``; a cancelled coroutine raises ``CancelledError``.
        ``on_step`` is called with each decision once it is made, in the episode's worker
        thread (the proxy's progress events).
        """
        t0 = time.monotonic()
        run = self._run(question, token_cap, latency_cap_s, seed, t0, lam=lam, mode=mode, tip=tip)
        run.on_step = on_step
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def target() -> None:
            try:
                run.solve()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=target, name="ponder-question", daemon=True).start()
        finished = asyncio.ensure_future(done.wait())
        waits = {finished}
        if cancel is not None:
            waits.add(asyncio.ensure_future(cancel.wait()))
        timeout = None if run.deadline is None else max(0.0, run.deadline - time.monotonic())
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            run.abandon("cancelled")
            raise
        finally:
            for w in waits:
                w.cancel()
        if finished.done() and not finished.cancelled():
            return run.outcome()
        if cancel is not None and cancel.is_set():
            return run.abandon("cancelled")
        return run.abandon("latency cap")

    # -- many questions ---------------------------------------------------------------------

    def solve_many(
        self,
        questions: Sequence[str | Question],
        *,
        max_concurrency: int = 8,
        token_cap: int | None = None,
        latency_cap_s: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Answer questions concurrently (each with its own env and policy state), in order.

        With an OpenAI-server generator the concurrent requests are batched by the server.

        Args:
            questions: the questions.
            max_concurrency: questions in flight at once.
            token_cap: per-question token cap (clamped to the controller's).
            latency_cap_s: per-question latency cap (clamped to the controller's).
            return_exceptions: put a question's exception in its slot instead of raising it.

        Returns:
            One :class:`Result` per question (or its exception, with ``return_exceptions``).
        """
        k = _positive_int(max_concurrency, "max_concurrency")
        items = list(questions)
        if not items:
            return []

        def one(q: str | Question) -> Any:
            try:
                return self.solve(q, token_cap=token_cap, latency_cap_s=latency_cap_s)
            except Exception as exc:
                if return_exceptions:
                    return exc
                raise

        with ThreadPoolExecutor(min(k, len(items)), thread_name_prefix="ponder-many") as pool:
            return list(pool.map(one, items))

    def solve_fleet(
        self,
        questions: Sequence[str | Question],
        total_tokens: int,
        *,
        base_fraction: float = 0.5,
        max_concurrency: int = 8,
        latency_cap_s: float | None = None,
    ) -> FleetResult:
        """Answer a batch of questions under one total token budget.

        Every question first gets a base share (``base_fraction`` of the budget, split evenly,
        and at least what opening one chain costs) and runs its policy within it; a question
        whose policy wants more pauses with its next action pending. The rest of the budget is
        then spent greedily, one step at a time (up to ``max_concurrency`` steps at once), on the
        pending questions where it pays most:

        * if the policy has a value estimate, ``policy.value(obs) -> float`` (the expected gain in
          answer quality from going on rather than stopping now, in units of one correct
          answer), the highest value per token of the pending step wins, and a question whose
          value is not positive is not given more;
        * otherwise the extra tokens are split in proportion to the ``difficulty`` feature (an
          equal split when there is no difficulty predictor, which gives 0.5 to every question).

        A step is admitted only if its worst case fits what is left, so the decoded tokens of
        the batch never exceed ``total_tokens``. Questions left pending end with reason
        ``fleet budget`` and their best answer so far.

        Args:
            questions: the batch.
            total_tokens: decoded tokens for the whole batch.
            base_fraction: share of the budget split evenly up front, in [0, 1].
            max_concurrency: steps (or questions, in the base phase) in flight at once.
            latency_cap_s: a deadline for the whole batch (clamped to the controller's cap).

        Raises:
            ConfigError: a budget below what opening one chain per question costs.
        """
        total = _positive_int(total_tokens, "total_tokens")
        k = _positive_int(max_concurrency, "max_concurrency")
        if not (isinstance(base_fraction, int | float) and 0.0 <= base_fraction <= 1.0):
            raise ConfigError(f"base_fraction must be in [0, 1], got {base_fraction!r}")
        items = list(questions)
        if not items:
            return FleetResult((), total, 0, 0)
        t0 = time.monotonic()
        n = len(items)
        cap = min(self.token_cap, total)
        opening = self.config.bound(Action.BRANCH)
        if total < n * opening:
            raise ConfigError(
                f"a budget of {total} tokens cannot open {n} questions: each needs at least "
                f"{opening} (chunk_tokens + probe_tokens); give at least {n * opening}"
            )
        base = min(cap, max(opening, int(total * base_fraction) // n))
        base = min(base, total // n)
        runs = [self._run(q, cap, latency_cap_s, None, t0, allowance=base) for q in items]
        deadline = runs[0].deadline
        pool = ThreadPoolExecutor(min(k, n), thread_name_prefix="ponder-fleet")
        try:
            # Base phase: every question runs within its share.
            _wait_all(pool, [(r, r.advance) for r in runs], deadline)
            # Greedy phase: the rest, one admitted step at a time.
            greedy = _Greedy(runs)
            while deadline is None or time.monotonic() < deadline:
                left = total - sum(r.committed for r in runs)
                chosen = greedy.choose(left, k)
                if not chosen:
                    break
                for r, bound in chosen:
                    r.allowance = r.decoded + bound
                _wait_all(pool, [(r, r.advance) for r, _ in chosen], deadline)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        for r in runs:
            if not r.settled:
                r.finish("latency cap" if r.past_deadline() else "fleet budget")
        results = tuple(r.outcome() for r in runs)
        spent = sum(res.decoded for res in results)
        return FleetResult(results, total, spent, base)

    # -- internals ---------------------------------------------------------------------------

    def _question(self, question: str | Question) -> Question:
        if isinstance(question, Question):
            q = question
        elif isinstance(question, str):
            q = Question(qid=f"ponder/{next(self._counter)}", text=question)
        else:
            raise ConfigError(
                f"a question is a string or a Question, got {type(question).__name__}"
            )
        if not q.text or not q.text.strip():
            raise ConfigError("the question is empty: give it some text")
        return q if q.gold is not None else replace(q, gold=NO_GOLD)

    def _fresh_policy(self) -> Policy:
        return self.policy.clone()

    def _run(
        self,
        question: str | Question,
        token_cap: int | None,
        latency_cap_s: float | None,
        seed: int | None,
        t0: float,
        allowance: int | None = None,
        lam: float | None = None,
        mode: PromptMode | None = None,
        tip: TipConfig | bool | None = None,
    ) -> _Run:
        cap = self.token_cap
        if token_cap is not None:
            cap = min(cap, _positive_int(token_cap, "token_cap"))
        config = (
            self.config if cap == self.config.token_cap else replace(self.config, token_cap=cap)
        )
        _check_opening(config, cap if allowance is None else min(cap, allowance))
        lat = _latency(latency_cap_s)
        if self.latency_cap_s:
            lat = min(lat, self.latency_cap_s) if lat else self.latency_cap_s
        q = self._question(question)
        policy = self._fresh_policy()
        if lam is not None:
            if not isinstance(policy, LamConditioned):
                raise ConfigError(
                    f"policy {policy.name!r} takes no price λ (only the learned policies do): "
                    "leave lam out"
                )
            if isinstance(lam, bool) or not isinstance(lam, int | float) or not lam > 0:
                raise ConfigError(f"lam must be a number > 0, got {lam!r}")
            policy = policy.with_lam(float(lam))
        gen: Generator = self.generator
        width = min(max(policy.planned_chains, 1), self.config.max_chains)
        live = gen.traits.chunk_tokens is None  # (a replayed bank fixes the chunks)
        config = _serving_config(config, policy, width, live and allowance is None)
        policy.reset(1, config=config)
        lookahead = None
        # A policy that runs its chains to their ends gets each chain read ahead (one engine
        # call for the rest of it) where the chunks are smaller than a chain.
        read_ahead = (
            policy.finishes_chains
            and config.chunk_tokens < config.max_chain_tokens
            and gen.traits.splits_chunks
        )
        if (
            self.lookahead
            and (width > 1 or read_ahead)
            and allowance is None  # a fleet admits one step at a time: nothing ahead
            and live
        ):
            lookahead = gen = Lookahead(
                gen,
                width,
                token_cap=cap,
                probe_tokens=config.probe_tokens if config.probe else None,
                max_chains=config.max_chains,
                chain_tokens=config.chain_tokens,
                read_ahead=config.max_chain_tokens if read_ahead else None,
            )
        if tip is True:
            tip = TipConfig()
        env = ComputeAllocationEnv(
            gen,
            [q],
            config,
            difficulty=self.difficulty,
            verifier=self.verifier,
            probes=self.probes,
            mode=self.mode if mode is None else mode,
            tip=self.tip if tip is None else (tip or None),
        )
        if lookahead is not None:
            lookahead.spent = lambda: env.episode.decoded if env.episode is not None else 0
        return _Run(
            env=env,
            policy=policy,
            seed=self.seed if seed is None else int(seed),
            t0=t0,
            deadline=t0 + lat if lat else None,
            gen_lock=self._gen_lock,
            allowance=allowance,
        )


class _Run:
    """One question's episode; it runs in one thread at a time, the waiter reads snapshots.

    Everything another thread may read (the trace, the last info, the final result) changes
    under ``lock``; after :meth:`abandon` the episode publishes nothing more.
    """

    def __init__(
        self,
        *,
        env: ComputeAllocationEnv,
        policy: Policy,
        seed: int,
        t0: float,
        deadline: float | None,
        gen_lock: threading.RLock | None,
        allowance: int | None,
    ) -> None:
        self.env = env
        self.policy = policy
        self.seed = seed
        self.t0 = t0
        self.deadline = deadline
        self.gen_lock = gen_lock
        #: The most decoded tokens :meth:`advance` may reach (fleet mode; ``None``: the cap).
        self.allowance = allowance
        self.lock = threading.Lock()
        self.trace: list[Step] = []
        self.info: dict[str, Any] | None = None
        self.final: Result | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.obs: np.ndarray | None = None
        self.pending: int | None = None
        self.opened = False
        self.prompt_tokens = 0
        self.step_s = 0.0
        #: Worst case of the step in flight (fleet accounting).
        self.in_flight = 0
        #: The engine work of the episode: cancelled when the episode is abandoned.
        self.scope = CancelScope()
        #: Called with each published decision (outside the lock, in the episode's thread).
        self.on_step: Callable[[Step], None] | None = None
        #: What the policy would have done instead of stopping, had the token cap left room.
        self.cut_short: str | None = None

    # -- state read by other threads ----------------------------------------------------------

    @property
    def decoded(self) -> int:
        info = self.info
        return _spent(info) if info is not None else 0

    @property
    def committed(self) -> int:
        """Decoded tokens plus the worst case of a step still running."""
        return self.decoded + self.in_flight

    @property
    def settled(self) -> bool:
        return self.final is not None or self.cancelled

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def outcome(self) -> Result:
        """The result (raises what the episode raised, such as a ConfigError at reset)."""
        if self.error is not None:
            raise self.error
        with self.lock:
            if self.final is not None:
                return self.final
            info, trace = self.info, list(self.trace)
        return self._result(info, "cancelled", trace)

    def abandon(self, reason: str) -> Result:
        """Stop waiting: the state after the last finished step, with ``reason``; the engine
        work still running is cancelled (its calls closed, no new ones)."""
        with self.lock:
            if self.final is not None:
                return self.final
            if self.error is not None:
                raise self.error
            self.cancelled = True
            self.final = replace(
                self._result(self.info, reason, list(self.trace)), in_flight=self.in_flight
            )
            final = self.final
        self.scope.cancel(reason)
        return final

    # -- the episode (one thread at a time) ---------------------------------------------------

    def solve(self) -> None:
        """Run the policy to the end (the single-question loop)."""
        try:
            self.advance()
        except BaseException as exc:
            self.error = exc

    def advance(self) -> None:
        """Open the episode if needed, then step while the policy's next action fits the
        allowance; pause with it pending otherwise (inside the episode's cancel scope)."""
        with self.scope.active():
            self._advance()

    def _advance(self) -> None:
        if not self.opened:
            self.opened = True
            if not self._open():
                return
        while not self.settled:
            if self.past_deadline():
                self.finish("latency cap")
                return
            a = self.pending if self.pending is not None else self._decide()
            if (
                a != Action.STOP
                and self.deadline is not None
                and time.monotonic() + self.step_s >= self.deadline
            ):
                # The step would likely not finish in time: answer now instead.
                self.finish("latency cap")
                return
            if (
                self.allowance is not None
                and a != Action.STOP
                and self.decoded + self.bound(a) > self.allowance
            ):
                self.pending = a
                return
            self.pending = None
            self._step(a)

    def bound(self, a: int) -> int:
        """The most decoded tokens action ``a`` can cost now."""
        ep = self.env.episode
        n_verify = 0
        if ep is not None:
            n_verify = sum(1 for s in ep.states if s.n_chunks > 0 and s.verified_at != s.n_chunks)
        return self.env.config.bound(Action(a), n_verify)

    def value(self) -> float | None:
        """The policy's value estimate for the current observation (``None``: it has none)."""
        if not isinstance(self.policy, HasValue) or self.obs is None:
            return None
        v = float(np.asarray(self.policy.value(self.obs), dtype=np.float64).reshape(-1)[0])
        return v if math.isfinite(v) else 0.0

    def difficulty(self) -> float:
        if self.obs is None:
            return 0.5
        return float(self.obs[FEATURE_NAMES.index("difficulty")])

    def _guarded(self) -> contextlib.AbstractContextManager[Any]:
        return self.gen_lock if self.gen_lock is not None else contextlib.nullcontext()

    def _open(self) -> bool:
        self.in_flight = self.env.config.bound(Action.BRANCH)
        t = time.monotonic()
        try:
            with self._guarded():
                obs, info = self.env.reset(seed=self.seed, options={"question": 0})
        except GeneratorError as exc:
            self.finish(f"generator fault: {exc}", ("start", {}))
            return False
        finally:
            self.in_flight = 0
        self.step_s = time.monotonic() - t
        ep = self.env.episode
        assert ep is not None
        self.prompt_tokens = len(ep.states[0].chain.prompt_ids) if ep.states else 0
        self.obs = obs
        decoded = _spent(info)
        self._publish(info, Step("start", {}, decoded, decoded, self._elapsed()))
        if _empty_new_chain(self.env):
            self.finish("generator fault: the generator returned an empty completion")
            return False
        return True

    def _decide(self) -> int:
        assert self.obs is not None
        a = int(self.policy.act(self.obs))
        if a == Action.STOP:
            self.cut_short = self._cap_refused(self.obs)
        return a

    def _cap_refused(self, obs: np.ndarray) -> str | None:
        """The action the policy would take instead of stopping if the token cap left room for
        it (asked of a copy of the policy, on the observation without the cap's refusals)."""
        actual = self.env.action_mask()
        free = self.env.action_mask(room=sys.maxsize)
        if not (free[:3] & ~actual[:3]).any():
            return None  # the cap refused nothing: the policy stopped of its own accord
        x = np.array(obs, copy=True)
        for i, name in enumerate(_MASK_FEATURES):
            x[FEATURE_NAMES.index(name)] = float(free[i])
        try:
            a = int(self.policy.clone().act(x))
        except Exception:  # a policy that cannot answer the question: say nothing
            log.debug("policy %s: the uncapped counterfactual failed", self.policy.name)
            return None
        return _ACTION_NAMES[a] if a != Action.STOP and free[a] and not actual[a] else None

    def _step(self, a: int) -> None:
        assert self.obs is not None
        name = _ACTION_NAMES[a]
        features = _features(self.obs)
        before = self.decoded
        self.in_flight = self.bound(a)
        t = time.monotonic()
        try:
            with self._guarded():
                obs, _, terminated, truncated, info = self.env.step(a)
        except GeneratorError as exc:
            self.finish(f"generator fault: {exc}", (name, features))
            return
        finally:
            self.in_flight = 0
        dt = time.monotonic() - t
        if a != Action.STOP:
            self.step_s = dt if self.step_s == 0 else _STEP_EMA * dt + (1 - _STEP_EMA) * self.step_s
        self.obs = obs
        decoded = _spent(info)
        record = Step(name, features, decoded, decoded - before, self._elapsed())
        final = None
        if terminated or truncated:
            reason = str(info.get("reason", ""))
            cut = self.cut_short if a == Action.STOP else None
            if cut is not None:
                reason = "token cap"  # the policy stopped only because the cap left no room
            final = replace(self._result(info, reason, [*self.trace, record]), cut_short=cut)
        if not self._publish(info, record, final):
            return
        if final is not None:
            self.policy.end(np.ones(1, dtype=bool))
        elif a == Action.BRANCH and _empty_new_chain(self.env):
            self.finish("generator fault: the generator returned an empty completion")

    def finish(self, reason: str, failed: tuple[str, dict[str, float]] | None = None) -> None:
        """End the episode now with ``reason`` (answer: the vote of the chains so far).

        ``failed`` is the action that raised, recorded with what it had cost before failing.
        """
        if self.settled:
            return
        ep = self.env.episode
        info = self.info
        if ep is not None and not ep.done:
            # Stop only aggregates: no generator call, safe after a failed step.
            _, _, _, _, info = self.env.step(Action.STOP)
        trace = list(self.trace)
        if failed is not None and info is not None:
            decoded = _spent(info)
            trace.append(
                Step(failed[0], failed[1], decoded, decoded - self.decoded, self._elapsed())
            )
        final = self._result(info, reason, trace)
        with self.lock:
            if self.cancelled:
                return
            self.trace = trace
            if info is not None:
                self.info = info
            self.final = final
        self.policy.end(np.ones(1, dtype=bool))

    def _publish(self, info: dict[str, Any], record: Step, final: Result | None = None) -> bool:
        with self.lock:
            if self.cancelled:
                return False
            self.trace.append(record)
            self.info = info
            if final is not None:
                self.final = final
        if self.on_step is not None:
            try:
                self.on_step(record)
            except Exception:  # a listener's bug must not end the episode
                log.exception("on_step listener failed")
        return True

    def _elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _result(self, info: dict[str, Any] | None, reason: str, trace: list[Step]) -> Result:
        if info is None:
            tokens = TokenUsage().as_dict()
            answer, share, decoded, chains, unused = None, 0.0, 0, 0, 0
            chain_tokens: tuple[int, ...] = ()
        else:
            tokens = {k: int(v) for k, v in info["tokens"].items()}
            answer, share = info["answer"], float(info["share"])
            decoded, chains = _spent(info), int(info["chains"])
            unused = int(info.get("ahead", 0))
            chain_tokens = tuple(int(n) for n in info.get("chain_tokens", ()))
        q = self.env.questions[0]
        text, chain_id = self._answer_text(answer)
        return Result(
            answer=answer,
            confidence=share if math.isfinite(share) else 0.0,
            trace=tuple(trace),
            tokens=tokens,
            decoded=decoded,
            latency_s=time.monotonic() - self.t0,
            reason=reason,
            n_chains=chains,
            qid=q.qid,
            policy=str(self.policy.name),
            prompt_tokens=self.prompt_tokens,
            unused=unused,
            chain_tokens=chain_tokens,
            text=text,
            chain_id=chain_id,
        )

    def _answer_text(self, answer: str | None) -> tuple[str, int | None]:
        """:attr:`Result.text` and :attr:`Result.chain_id` for ``answer``."""
        if answer is None:
            return "", None
        picked = self.env.answer_chain(answer)
        if picked is None:
            return f"The answer is \\boxed{{{answer}}}.", None
        chain, own = picked
        text = chain.text.strip()
        if not own:
            stated = f"The answer is \\boxed{{{answer}}}."
            text = f"{text}\n\n{stated}" if text else stated
        return text, chain.chain_id


class _Greedy:
    """The greedy phase of a fleet budget: which pending questions step next.

    With value estimates, the highest value per token of the pending step goes first (questions
    whose value is not positive get nothing). Without, each question may take up to its target,
    a share of what is left in proportion to its difficulty; when no target admits a step, the
    targets are recomputed from what is left, and the last crumbs go to the question furthest
    below its share.
    """

    def __init__(self, runs: Sequence[_Run]) -> None:
        self.runs = runs
        self.start = [r.decoded for r in runs]
        self.target: dict[int, float] = {}

    def extra(self, i: int) -> int:
        return self.runs[i].decoded - self.start[i]

    def choose(self, left: int, k: int) -> list[tuple[_Run, int]]:
        pending = [
            (i, r, r.bound(r.pending))
            for i, r in enumerate(self.runs)
            if not r.settled and r.pending is not None
        ]
        if not pending:
            return []
        values = {i: r.value() for i, r, _ in pending}
        if any(v is not None for v in values.values()):
            scored = [
                (v / max(b, 1), i, r, b)
                for i, r, b in pending
                if (v := values[i]) is not None and v > 0
            ]
            return _fit(scored, left, k)
        diff = {i: max(r.difficulty(), _MIN_DIFFICULTY) for i, r, _ in pending}

        def eligible() -> list[tuple[float, int, _Run, int]]:
            return [
                (-(self.extra(i) + b) / diff[i], i, r, b)
                for i, r, b in pending
                if self.extra(i) + b <= self.target.get(i, -1.0)
            ]

        scored = eligible()
        if not _fit(scored, left, k):
            total = sum(diff.values())
            for i, _, _ in pending:
                self.target[i] = self.extra(i) + left * diff[i] / total
            scored = eligible()
        chosen = _fit(scored, left, k)
        if chosen:
            return chosen
        crumbs = [(-(self.extra(i) + b) / diff[i], i, r, b) for i, r, b in pending]
        return _fit(crumbs, left, 1)


def _fit(scored: list[tuple[float, int, _Run, int]], left: int, k: int) -> list[tuple[_Run, int]]:
    """The best-scored steps (ties: the earlier question) that fit in ``left``, at most ``k``."""
    chosen: list[tuple[_Run, int]] = []
    for _, _, r, bound in sorted(scored, key=lambda s: (-s[0], s[1])):
        if bound <= left:
            chosen.append((r, bound))
            left -= bound
            if len(chosen) == k:
                break
    return chosen


def _wait_all(
    pool: ThreadPoolExecutor,
    work: Sequence[tuple[_Run, Callable[[], None]]],
    deadline: float | None,
) -> None:
    """Run every job in the pool; at the deadline abandon the runs still going."""
    futures: dict[Future[None], _Run] = {pool.submit(fn): r for r, fn in work}
    pending = set(futures)
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
        for f in done:
            exc = f.exception()
            if exc is not None:
                for p in pending:
                    futures[p].abandon("cancelled")
                raise exc
        if not done and pending:
            for f in pending:
                futures[f].abandon("latency cap")
            return


def _serving_config(config: EnvConfig, policy: Policy, width: int, whole: bool) -> EnvConfig:
    """The episode settings ``policy`` needs: no probes if it reads none; if it acts only between
    chains (and ``whole``), each chain in one piece rather than chunk by chunk, provided the cap
    has room for its ``width`` planned chains in full (else chunks keep the cap finely used)."""
    if config.probe and not policy.uses_probes:
        config = replace(config, probe=False)  # it would pay for probes it never reads
    if (
        whole
        and policy.acts_between_chains
        and not config.probe
        and config.chunk_tokens < config.max_chain_tokens
        and width * (config.chain_tokens + INJECT_ALLOWANCE) <= config.token_cap
    ):
        config = replace(config, chunk_tokens=config.max_chain_tokens)
    return config


def _spent(info: dict[str, Any]) -> int:
    """Decoded tokens the cap counts: the env's, plus any a lookahead generated ahead."""
    return int(info["decoded"]) + int(info.get("ahead", 0))


def _features(obs: np.ndarray) -> dict[str, float]:
    return {name: float(v) for name, v in zip(FEATURE_NAMES, obs.tolist(), strict=True)}


def _empty_new_chain(env: ComputeAllocationEnv) -> bool:
    """Whether the newest chain's first chunk came back with no tokens (a broken generator)."""
    ep = env.episode
    if ep is None or not ep.states:
        return False
    chunks = ep.states[ep.cur].chain.chunks
    return len(chunks) == 1 and len(chunks[0]) == 0 and chunks[0].finish_reason != "cap"


def _positive_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
        raise ConfigError(f"{what} must be a positive integer, got {v!r}")
    return int(v)


def _latency(v: float | None, minimum: float = 0.0) -> float:
    if v is None:
        return 0.0
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"latency_cap_s must be a finite number >= 0 (0: none), got {v!r}")
    if 0 < v < minimum:
        raise ConfigError(
            f"latency_cap_s must be 0 (none) or at least {minimum:g} s (no answer comes back "
            f"sooner), got {v!r}"
        )
    return float(v)


def _check_opening(config: EnvConfig, cap: int) -> None:
    opening = config.bound(Action.BRANCH)
    if cap < opening:
        raise ConfigError(
            f"a token cap of {cap} cannot open one chain: that costs up to {opening} tokens "
            f"(chunk_tokens {config.chunk_tokens} + probe_tokens); raise the cap or lower "
            "chunk_tokens"
        )
