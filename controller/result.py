"""What the controller answers: a :class:`Result` per question, a :class:`FleetResult` per batch.

Every exit of an episode (:class:`~controller.controller.Controller` runs them) gives the best
answer so far (the vote of the chains so far) with its confidence (the leader's vote share) and
the reason:

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
``fleet budget``           :meth:`~controller.controller.Controller.solve_fleet` had no tokens
                           left for this question
``cancelled``              :meth:`~controller.controller.Controller.asolve` was cancelled, or its
                           ``cancel`` event set
others                     the env's own truncations (``max steps``, an unavailable action)
=========================  =====================================================================

Tokens are counted once, by the env: a result's ``decoded`` equals the sum of its trace's
``delta`` and of its decoded kinds plus ``unused``. A step abandoned at the latency cap or on
cancellation is not in the result (its tokens are not known), but it was admitted under the token
cap, so even then the engine never decodes more than the cap for a question; its worst case is
``Result.in_flight``. Abandoning an episode cancels its engine work
(:class:`~env.generators.cancel.CancelScope`): no new engine call starts, and the calls in flight
are closed (an OpenAI-server generator cancels its HTTP requests; vLLM aborts them).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FleetResult", "Result", "Step"]


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
        unused: tokens decoded ahead for planned chains the policy never took (see
            :mod:`controller.controller`); they are in ``decoded`` but in none of ``tokens``'
            kinds.
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
