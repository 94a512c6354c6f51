"""A guarantee on what early stopping gives up: Learn-then-Test calibration of a stopping parameter.

The user states ``alpha``, the accuracy they accept to lose against the full vote (majority over
all of the bank's chains, maj@16 on a 16-chain bank), and ``delta``. :func:`calibrate` picks a
policy's stopping parameter on *calibration* questions (the bank's training questions by
default) so that, with probability at least ``1 - delta`` over the draw of those questions, the
chosen policy's expected loss on new questions from the same distribution is at most ``alpha``;
then it reports the realised loss and tokens on the *test* questions.

This is Learn-then-Test (Angelopoulos, Bates, Candès, Jordan and Lei, 2021) over a family of
policies ordered by one parameter, as Conformal Thinking (arXiv 2602.03814) does for reasoning
budgets:

1. **Loss.** On question ``q`` replayed with generator seed ``s``,
   ``1[full vote right] - 1[policy right]``: the accuracy the policy gives up against the full
   vote on that episode (negative where stopping early happens to be right and the full vote
   wrong). A question's loss is its mean over the replay seeds. For the bound it is clipped to
   ``[0, 1]`` per question: the clipped loss is never below the signed one, so a bound on the
   clipped risk bounds the signed risk too, at the price of not counting the questions where
   the policy gains.
2. **p-values.** For each candidate, a p-value for ``H0: risk > alpha`` from the mean clipped
   loss of the ``n`` calibration questions: **Hoeffding-Bentkus** by default (Bates et al.
   2021, "Distribution-free, risk-controlling prediction sets", the p-value the LTT paper
   uses), ``min(exp(-n h(min(r, alpha), alpha)), e P(Binom(n, alpha) <= ceil(n r)))`` with
   ``h`` the Bernoulli KL divergence. It is valid for any loss in ``[0, 1]``; averaging over
   replay seeds makes the losses fractional (0, 1/3, 2/3, 1 with three seeds), so the exact
   binomial tail ``P(Binom(n, alpha) <= k)``, valid only for 0/1 losses, is offered
   (``method="binomial"``) for one seed alone. Both are valid for finite ``n``; neither is
   asymptotic.
3. **Fixed-sequence testing.** Candidates are ordered from the most conservative (most
   compute) to the least, *before* the calibration losses are seen; they are tested in that
   order at level ``delta`` while ``p <= delta``, and the first ``p > delta`` ends the sequence.
   The family-wise error is at most ``delta`` with no multiplicity correction, and no
   monotonicity is assumed (a non-monotone family only loses power). The cheapest certified
   candidate (fewest mean tokens on the calibration questions) is chosen; with none certified
   the answer is the full vote itself.

A zero-loss candidate is certified only if ``(1 - alpha)^n <= delta``: below
:func:`~policies.evaluation.ltt.certifiable_alpha` (``1 - delta^(1/n)``, 1.8 points for 127
questions at ``delta = 0.1``) nothing can be certified, however good the policy.

**What the guarantee says.** ``P(R(chosen) <= alpha) >= 1 - delta``, where ``R`` is the
expected (clipped) loss over questions exchangeable with the calibration ones, replayed from
the same bank's chains, under the same env settings. It is a statement about the *expected*
loss: the realised loss on a finite test set scatters around ``R`` (its bootstrap interval is
reported). Live, with fresh chains, it holds against the vote of as many fresh chains as the
bank has per question (a vote the server never takes), if each question's chains are drawn as
the bank's were. It does not cover questions from another distribution (another dataset, other
difficulty mix), another model, sampling temperature, chunk size or chain cap, a policy whose
training saw the calibration questions (train a learned policy on ``fit`` and calibrate on
``dev``), nor a grid chosen after looking at the calibration results.

The p-values and fixed-sequence testing are in :mod:`policies.evaluation.ltt`; ``--risk ALPHA``
on the command line (in points) is :mod:`policies.evaluation.risk_cli`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from env.bank.store import TraceBank
from env.episode.config import EnvConfig
from env.episode.observation import STREAK_SCALE
from env.questions import select_split
from features.errors import ConfigError, PolicyError
from policies import heuristics
from policies.base import LamConditioned, Policy
from policies.evaluation.ltt import Method, certifiable_alpha, check_level, learn_then_test
from policies.evaluation.metrics import Interval, bootstrap_mean, per_question_means
from policies.evaluation.runner import EvalResult, Evaluator
from policies.registry import load_policy

__all__ = [
    "CandidateRow",
    "RiskFamily",
    "RiskResult",
    "RiskTestReport",
    "calibrate",
    "full_vote_spec",
    "question_losses",
    "risk_family",
]

#: The λ values a learned policy is calibrated over by default (ascending: the smallest price
#: spends the most, so it comes first): those the main job sweeps, 25 log-spaced from 1e-6 to
#: 3e-3 at two significant digits.
DEFAULT_LAMS: tuple[float, ...] = tuple(float(f"{x:.2g}") for x in np.geomspace(1e-6, 3e-3, 25))


# -- families ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RiskFamily:
    """Policies ordered by one parameter, the most conservative (most compute) first.

    The order is fixed before any calibration loss is seen: that is what makes fixed-sequence
    testing valid.
    """

    name: str
    """the family's spec (``adaptive-consistency``, or a learned policy's name)"""
    param: str
    """the parameter calibrated (``threshold``, ``lam``, ...)"""
    values: tuple[float, ...]
    """the parameter's values, most conservative first"""
    make: Callable[[float], Policy] = field(repr=False, compare=False)
    """the policy at one value"""
    trained_on: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    """a learned policy's training record (its ``meta``: ``training`` and ``bank``), so that
    calibration refuses the questions it was trained on; ``None`` for a rule"""

    def label(self, value: float) -> str:
        return f"{self.param}={value:g}"


@dataclass(frozen=True)
class _Kind:
    """One heuristic family: its parameter, how a member is named, its default grid."""

    cls: type
    param: str
    member: Callable[[float], str]
    default: Callable[[EnvConfig], tuple[float, ...]]
    whole: bool
    aggregate: str = "majority"


def _best_of_grid(c: EnvConfig) -> tuple[float, ...]:
    return tuple(sorted({c.max_chains, *(n for n in (1, 2, 3, 4, 6, 8, 12) if n < c.max_chains)}))


def _esc_grid(c: EnvConfig) -> tuple[float, ...]:
    w = heuristics.EarlyStoppingSC.WINDOW
    return tuple(sorted({c.max_chains, *range(w, c.max_chains, w)}))


def _s1_grid(c: EnvConfig) -> tuple[float, ...]:
    top = c.max_chain_tokens + c.extension_chunks * c.chunk_tokens
    out, b = [top], c.chunk_tokens
    while b < top:
        out.append(b)
        b *= 2
    return tuple(sorted(out))


def _best_of(agg: str) -> _Kind:
    suffix = "" if agg == "majority" else f"-{agg}"
    return _Kind(
        heuristics.BestOfN, "N", lambda n: f"best-of-{n:g}{suffix}", _best_of_grid, True, agg
    )


#: The heuristic families a risk level can calibrate, by spec. Larger parameter values are
#: more conservative in every one (more chains, a stricter agreement rule, a larger budget).
_KINDS: dict[str, _Kind] = {
    "adaptive-consistency": _Kind(
        heuristics.AdaptiveConsistency,
        "threshold",
        lambda t: f"adaptive-consistency-{t:g}",
        lambda c: (0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999),
        False,
    ),
    "esc": _Kind(
        heuristics.EarlyStoppingSC, "max_chains", lambda m: f"esc-4-max{m:g}", _esc_grid, True
    ),
    "best-of": _best_of("majority"),
    "best-of-confidence": _best_of("confidence"),
    "best-of-verifier": _best_of("verifier"),
    "probe-agree": _Kind(
        heuristics.ProbeAgreement,
        "k",
        lambda k: f"probe-agree-{k:g}",
        lambda c: tuple(float(k) for k in range(1, int(STREAK_SCALE) + 1)),
        True,
    ),
    "s1": _Kind(heuristics.BudgetForcing, "budget", lambda b: f"s1-{b:g}", _s1_grid, True),
    "deepconf-online": _Kind(
        heuristics.DeepConfOnline,
        "keep_percent",
        lambda p: f"deepconf-online-{p:g}",
        lambda c: (10.0, 30.0, 50.0, 70.0, 90.0),
        False,
    ),
}
#: Other spellings of a family: ESC's default name, and best-of-N as the registry writes it.
_ALIASES = {"esc-4": "esc", "best-of-n": "best-of"}


def _families_text() -> str:
    kinds = ", ".join(f"{name} ({k.param})" for name, k in _KINDS.items())
    return f"{kinds}, or a learned policy's folder (lam)"


def _family_of(policy: Policy) -> str | None:
    """The family a fixed heuristic belongs to, if it belongs to one."""
    for name, kind in _KINDS.items():
        if type(policy) is kind.cls and (
            kind.cls is not heuristics.BestOfN or policy.aggregate == kind.aggregate
        ):
            return name
    return None


def _grid(values: Sequence[float], *, whole: bool, descending: bool, what: str) -> list[float]:
    out = []
    for v in values:
        x = float(v)
        if not math.isfinite(x) or (whole and (x != int(x) or x < 1)):
            kind = "whole numbers >= 1" if whole else "finite numbers"
            raise ConfigError(f"--grid values for {what} must be {kind}, got {v!r}")
        out.append(x)
    if not out:
        raise ConfigError(f"the grid for {what} is empty: give at least one value")
    return sorted(set(out), reverse=descending)


def risk_family(
    spec: str | Path | Policy,
    *,
    config: EnvConfig | None = None,
    grid: Sequence[float] | None = None,
) -> RiskFamily:
    """The family a spec names, ordered most conservative first.

    | spec | parameter | default grid |
    |---|---|---|
    | ``adaptive-consistency`` | Beta-rule threshold | 0.999 ... 0.6 (12 values) |
    | ``esc`` (``esc-4``) | most chains (windows of 4) | ``max_chains``, then multiples of 4 down to 4 |
    | ``best-of[-confidence\\|-verifier]`` | chains N | ``max_chains``, 12, 8, 6, 4, 3, 2, 1 |
    | ``probe-agree`` | agreeing probes k | 8 ... 1 |
    | ``s1`` | token budget | the chain cap with its extensions, then halving chunk multiples |
    | ``deepconf-online`` | percent of chains kept | 90, 70, 50, 30, 10 |
    | a learned policy's folder | price λ (ascending) | 25 values from 1e-6 to 3e-3 |

    Args:
        spec: a family's name, a learned policy's folder, or a learned policy.
        config: the env settings the members act under (their chain cap, chunk size).
        grid: the parameter values to try instead of the default (any order; they are sorted
            most conservative first).

    Raises:
        PolicyError: a policy with no parameter to calibrate (``single``, ``router``, ...), a
            member with its parameter already fixed (``adaptive-consistency-0.9``), or an
            unknown spec.
        ConfigError: a bad grid.
    """
    config = config or EnvConfig()
    if not isinstance(spec, str | Path):
        return _policy_family(spec, spec.name, grid)
    text = str(spec).strip().lower()
    name = _ALIASES.get(text, text)
    kind = _KINDS.get(name) if isinstance(spec, str) else None
    if kind is not None:
        values = _grid(
            kind.default(config) if grid is None else grid,
            whole=kind.whole,
            descending=True,
            what=name,
        )
        member = kind.member
        make = _heuristic_maker(member, config, name)
        for v in values:  # a value the heuristic refuses fails now, not mid-calibration
            make(v)
        return RiskFamily(name, kind.param, tuple(values), make)
    return _policy_family(load_policy(spec, config=config), str(spec), grid)


def _policy_family(policy: Policy, spec: str, grid: Sequence[float] | None) -> RiskFamily:
    """A learned policy's λ family, or the refusal of any other policy."""
    if isinstance(policy, LamConditioned):
        lams = _grid(
            DEFAULT_LAMS if grid is None else grid, whole=False, descending=False, what="lam"
        )
        if lams[0] < 0:
            raise ConfigError(f"--grid values for lam must be >= 0, got {lams[0]:g}")
        learned = policy

        def make_learned(lam: float) -> Policy:
            return learned.with_lam(lam)

        meta = getattr(policy, "meta", None)
        return RiskFamily(policy.name, "lam", tuple(lams), make_learned, trained_on=meta)
    text = spec.strip().lower()
    shown = repr(spec) if text == policy.name else f"{spec!r} ({policy.name})"
    fam = _family_of(policy)
    if fam is not None:
        raise PolicyError(
            f"{shown} is one member of the {fam} family, with its {_KINDS[fam].param} fixed: "
            f"give the family's name, {fam!r}, and ponder calibrates its {_KINDS[fam].param} "
            "(--grid sets the values tried)"
        )
    raise PolicyError(
        f"{shown} has no stopping parameter to calibrate: a risk level needs a family of "
        f"policies ordered by one parameter: {_families_text()}"
    )


def _heuristic_maker(
    member: Callable[[float], str], config: EnvConfig, family: str
) -> Callable[[float], Policy]:
    def make(value: float) -> Policy:
        try:
            return load_policy(member(value), config=config)
        except PolicyError as e:
            raise ConfigError(f"--grid value {value:g} for {family}: {e}") from e

    return make


def full_vote_spec(config: EnvConfig) -> str:
    """The full vote's policy: majority over every chain the env allows (``best-of-16``)."""
    return f"best-of-{config.max_chains}"


# -- calibration -------------------------------------------------------------------------------


def question_losses(policy: EvalResult, full: EvalResult) -> tuple[list[str], np.ndarray]:
    """Per question, the mean over seeds of ``1[full vote right] - 1[policy right]``
    (in ``[-1, 1]``; question ids in first-seen order).

    Raises:
        ConfigError: the two results are not on the same (question, seed) episodes.
    """
    keys = [(e.qid, e.seed) for e in policy.episodes]
    if keys != [(e.qid, e.seed) for e in full.episodes]:
        raise ConfigError(
            f"{policy.policy} and {full.policy} were not evaluated on the same episodes"
        )
    diff = [
        float(f.correct) - float(p.correct)
        for p, f in zip(policy.episodes, full.episodes, strict=True)
    ]
    qids = [k[0] for k in keys]
    return list(dict.fromkeys(qids)), per_question_means(qids, diff)


@dataclass(frozen=True)
class CandidateRow:
    """One candidate on the calibration questions."""

    value: float
    """its parameter"""
    policy: str
    """its name (what ``ponder evaluate`` and ``ponder serve`` take, for a heuristic)"""
    risk: float
    """mean clipped loss (what the p-value reads)"""
    loss: float
    """mean signed loss: the full vote's accuracy minus the candidate's"""
    accuracy: float
    tokens: float
    """mean decoded tokens"""
    p_value: float
    status: str
    """``certified``, ``stops the sequence`` (the first ``p > delta``) or ``not tested``"""


@dataclass(frozen=True)
class RiskTestReport:
    """The chosen policy against the full vote on the test questions (intervals: 95%
    percentile bootstrap over questions, paired)."""

    split: str
    questions: int
    loss: Interval
    """accuracy given up: the full vote's accuracy minus the policy's (signed)"""
    clipped_loss: Interval
    """the same with each question's loss clipped to [0, 1] (the risk the guarantee bounds)"""
    accuracy: Interval
    full_accuracy: Interval
    tokens: Interval
    full_tokens: Interval
    saved: Interval
    """share of the full vote's tokens saved: ``1 - tokens / full tokens``"""
    within_alpha: bool
    """the realised (signed) loss is at most ``alpha``"""


@dataclass(frozen=True)
class RiskResult:
    """A calibrated stopping parameter and what it gave."""

    family: str
    param: str
    alpha: float
    delta: float
    method: str
    bank: str
    split: str
    """the calibration questions"""
    questions: int
    seeds: tuple[int, ...]
    full_vote: str
    """the full vote's policy (``best-of-16``)"""
    full_accuracy: float
    full_tokens: float
    """the full vote's mean decoded tokens on the calibration questions"""
    rows: tuple[CandidateRow, ...]
    """every candidate, most conservative first"""
    chosen: CandidateRow | None
    """the cheapest certified candidate (``None``: none certified, the full vote is used)"""
    min_alpha: float
    """:func:`certifiable_alpha` for these questions and ``delta``"""
    test: RiskTestReport | None = None
    policy: Policy | None = field(default=None, repr=False, compare=False)
    """the policy to run: the chosen candidate, or the full vote"""

    @property
    def policy_name(self) -> str:
        return self.chosen.policy if self.chosen is not None else self.full_vote

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (everything but the policy object)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.pop("policy")
        return json.loads(json.dumps(out, default=_plain))


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    raise TypeError(f"not JSON data: {obj!r}")


def _disjoint(calib: Evaluator, test: Evaluator) -> None:
    overlap = {q.qid for q in calib.questions} & {q.qid for q in test.questions}
    if overlap:
        raise ConfigError(
            f"the calibration split {calib.split or 'all'!r} and the test split "
            f"{test.split or 'all'!r} share {len(overlap)} questions: the guarantee needs them "
            "apart (calibrate on train or dev, report on test)"
        )


def _unseen(fam: RiskFamily, bank: TraceBank, calib: Evaluator) -> None:
    """Refuse calibration questions a learned policy was trained on (its saved training split
    of the same bank: the same questions when its record's hash of them matches)."""
    meta = fam.trained_on or {}
    split = (meta.get("training") or {}).get("split")
    record = meta.get("bank") or {}
    if not split or record.get("model_sha256") != bank.manifest.model.get("sha256", ""):
        return
    if record.get("dataset") != bank.manifest.dataset:
        return
    seen = [q.qid for q in select_split(bank.questions, str(split))]
    digest = hashlib.sha256("\n".join(seen).encode()).hexdigest()
    if digest != record.get("questions_sha256"):
        # the bank's questions changed since (it grew), or another recording of the model
        warnings.warn(
            f"{fam.name} was trained on {record.get('n_questions')} {split!r} questions of a "
            f"bank of this model and data set, not the {len(seen)} this bank has now: ponder "
            "cannot tell whether it saw the calibration questions (if it did, the guarantee "
            "does not hold)",
            stacklevel=3,
        )
        return
    overlap = set(seen) & {q.qid for q in calib.questions}
    if overlap:
        raise ConfigError(
            f"{fam.name} was trained on the {split!r} questions of this bank, and {len(overlap)} "
            f"of the {len(calib.questions)} calibration questions ({calib.split!r}) are among "
            "them: its losses there are optimistic and the guarantee would not hold. Train it "
            "on fit (`ponder train ... --split fit`, or `ponder run --eval-split dev`) and "
            "calibrate on dev (--calibration-split dev)"
        )


def calibrate(
    family: RiskFamily | str | Path,
    bank: TraceBank | str | Path,
    *,
    alpha: float,
    delta: float = 0.1,
    split: str = "train",
    test_split: str | None = "test",
    seeds: int | Sequence[int] = 3,
    method: Method = "hb",
    grid: Sequence[float] | None = None,
    difficulty: Any = "auto",
    n_boot: int = 2000,
) -> RiskResult:
    """Calibrate a family's stopping parameter so that the accuracy lost against the full vote
    is at most ``alpha`` with probability at least ``1 - delta`` (see the module docstring),
    then report it on ``test_split``.

    Args:
        family: a :class:`RiskFamily`, or a spec for :func:`risk_family`.
        bank: the trace bank (or its folder).
        alpha: the accuracy one accepts to lose, as a fraction (0.02 = 2 points).
        delta: the probability that the guarantee fails, as a fraction.
        split: the calibration questions (``train``, or ``dev`` for a policy trained on
            ``fit``).
        test_split: the questions reported on (``None``: none).
        seeds: replay seeds: each question is replayed once per seed, its loss is the mean.
        method: the p-value (``hb`` or ``binomial``, see :func:`learn_then_test`).
        grid: the parameter values tried (with a spec; default: the family's).
        difficulty: the evaluator's difficulty predictor (see
            :class:`~policies.evaluation.runner.Evaluator`).
        n_boot: bootstrap resamples of the test intervals.

    Raises:
        ConfigError: a bad level, overlapping calibration and test questions, a bad grid.
        PolicyError: a spec with no parameter to calibrate.
    """
    alpha = check_level(alpha, "alpha")
    delta = check_level(delta, "delta")
    if not split:
        raise ConfigError("name the calibration split (train, or dev)")
    tb = bank if isinstance(bank, TraceBank) else TraceBank(bank)
    ev = Evaluator(tb, split=split, seeds=seeds, difficulty=difficulty, n_boot=n_boot)
    test_ev = None
    if test_split is not None:
        test_ev = Evaluator(tb, split=test_split, seeds=seeds, difficulty=difficulty, n_boot=n_boot)
        _disjoint(ev, test_ev)
    if isinstance(family, RiskFamily):
        if grid is not None:
            raise ConfigError("a grid goes with a family's spec, not with a RiskFamily")
        fam = family
    else:
        fam = risk_family(family, config=ev.config, grid=grid)
    _unseen(fam, tb, ev)
    full_policy = load_policy(full_vote_spec(ev.config), config=ev.config)
    full = ev(full_policy, family="full vote")
    results = [ev(fam.make(v), family=fam.name, param=fam.label(v)) for v in fam.values]
    signed = np.stack([question_losses(r, full)[1] for r in results])
    ltt = learn_then_test(np.clip(signed, 0.0, 1.0), alpha, delta, method=method)
    rows = []
    for i, (v, r) in enumerate(zip(fam.values, results, strict=True)):
        status = (
            "certified"
            if i < ltt.certified
            else "stops the sequence"
            if i == ltt.certified
            else "not tested"
        )
        rows.append(
            CandidateRow(
                value=v,
                policy=r.policy,
                risk=ltt.risks[i],
                loss=float(signed[i].mean()),
                accuracy=r.accuracy.mean,
                tokens=r.tokens.mean,
                p_value=ltt.p_values[i],
                status=status,
            )
        )
    chosen_i = (
        min(range(ltt.certified), key=lambda i: (rows[i].tokens, i)) if ltt.certified else None
    )
    chosen = rows[chosen_i] if chosen_i is not None else None
    policy = fam.make(fam.values[chosen_i]) if chosen_i is not None else full_policy
    report = None
    if test_ev is not None:
        report = _test_report(test_ev, policy, full_policy, alpha, n_boot)
    return RiskResult(
        family=fam.name,
        param=fam.param,
        alpha=alpha,
        delta=delta,
        method=method,
        bank=ev.bank_name,
        split=split,
        questions=len(ev.questions),
        seeds=ev.seeds,
        full_vote=full_policy.name,
        full_accuracy=full.accuracy.mean,
        full_tokens=full.tokens.mean,
        rows=tuple(rows),
        chosen=chosen,
        min_alpha=certifiable_alpha(len(ev.questions), delta),
        test=report,
        policy=policy,
    )


def _test_report(
    ev: Evaluator, policy: Policy, full_policy: Policy, alpha: float, n_boot: int
) -> RiskTestReport:
    r = ev(policy)
    full = r if policy.name == full_policy.name else ev(full_policy)
    _, signed = question_losses(r, full)
    _, _, tok = r.per_question()
    _, _, full_tok = full.per_question()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, tok.size, size=(n_boot, tok.size))
    saved = 1.0 - tok[idx].mean(axis=1) / full_tok[idx].mean(axis=1)
    point = 1.0 - tok.mean() / full_tok.mean()
    loss = bootstrap_mean(signed, n_boot=n_boot)
    return RiskTestReport(
        split=ev.split,
        questions=len(ev.questions),
        loss=loss,
        clipped_loss=bootstrap_mean(np.clip(signed, 0.0, 1.0), n_boot=n_boot),
        accuracy=r.accuracy,
        full_accuracy=full.accuracy,
        tokens=r.tokens,
        full_tokens=full.tokens,
        saved=Interval(
            float(point), float(np.quantile(saved, 0.025)), float(np.quantile(saved, 0.975))
        ),
        within_alpha=bool(loss.mean <= alpha + 1e-12),
    )
