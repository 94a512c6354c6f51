"""One question's episode as the controller runs it (:class:`QuestionRun`).

The policy steps the env in a worker thread, within the token cap, the latency deadline and (in
fleet mode) an allowance; the thread that waits reads snapshots of the trace and can abandon the
episode at any time, which cancels its engine work.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from controller.result import Result, Step
from env.episode.config import Action
from env.episode.observation import FEATURE_NAMES
from env.episode.single import ComputeAllocationEnv
from env.generators.cancel import CancelScope
from env.types import TokenUsage
from features.errors import GeneratorError
from policies.base import HasValue, Policy

__all__ = ["QuestionRun"]

log = logging.getLogger(__name__)

_ACTION_NAMES = {int(a): a.name.lower() for a in Action}
#: The observation features that say which of continue, branch, verify can run.
_MASK_FEATURES = ("can_continue", "can_branch", "can_verify")
#: Weight of the latest step in the estimate of the next step's duration.
_STEP_EMA = 0.5


class QuestionRun:
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
