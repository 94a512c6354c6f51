"""The controller: a question in; an answer, its confidence, a trace and the cost out.

:class:`Controller` runs a policy (:mod:`policies`) over a
:class:`~env.episode.single.ComputeAllocationEnv` built on a generator for one question at a time
(:class:`~controller.run.QuestionRun`): the policy reads the observation and picks continue /
branch / verify / stop until it stops or a cap ends the episode. Every exit gives the best answer
so far with its confidence and the reason (:class:`~controller.result.Result`; the reasons and how
tokens are counted are in :mod:`controller.result`). A batch of questions can share one token
budget (:meth:`Controller.solve_fleet`, allocated by :mod:`controller.fleet`).

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
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from controller.fleet import run_fleet
from controller.result import FleetResult, Result, Step
from controller.run import QuestionRun
from env.episode.config import Action, EnvConfig
from env.episode.hidden import HiddenProbes
from env.episode.single import ComputeAllocationEnv
from env.generators.base import Generator
from env.generators.lookahead import Lookahead
from env.types import INJECT_ALLOWANCE, PromptMode, Question, TipConfig
from features.errors import ConfigError
from policies.base import LamConditioned, Policy

__all__ = ["MIN_LATENCY_CAP_S", "NO_GOLD", "Controller"]

log = logging.getLogger(__name__)

#: The gold answer given to the env for questions that have none (never reported).
NO_GOLD = "ponder:no-gold-answer"
#: The smallest latency cap (seconds) a controller (``latency_cap_s``, ``ponder serve
#: --latency-cap``) or a request to the proxy may set: no engine answers sooner, so a smaller cap
#: could only ever answer "nothing yet" (0 means no cap). Per-call caps are not held to it: the
#: proxy passes what is left of a request's cap after it waited for a slot.
MIN_LATENCY_CAP_S = 0.1


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
        results = run_fleet(runs, total, k)
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
    ) -> QuestionRun:
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
        return QuestionRun(
            env=env,
            policy=policy,
            seed=self.seed if seed is None else int(seed),
            t0=t0,
            deadline=t0 + lat if lat else None,
            gen_lock=self._gen_lock,
            allowance=allowance,
        )


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
