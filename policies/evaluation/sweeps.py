"""Families of policies swept over a parameter (heuristic settings, learned policies over λ) and their refinement."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from env.episode.config import EnvConfig
from features.errors import ConfigError
from policies.base import LamConditioned, Policy
from policies.evaluation.runner import EvalResult, Evaluator
from policies.heuristics import EarlyStoppingSC
from policies.registry import load_policy

__all__ = [
    "Family",
    "Point",
    "PointMap",
    "heuristic_sweeps",
    "learned_sweep",
    "evaluate_families",
    "lam_of",
    "refine_sweep",
]


@dataclass(frozen=True)
class Family:
    """A strategy and its operating points: ``(parameter label, policy)`` pairs.

    ``kind`` is ``heuristic`` or ``learned``; ``train_seed`` the seed a learned one was trained
    with (kept with its results).
    """

    name: str
    points: tuple[tuple[str, Policy], ...]
    kind: str = "heuristic"
    train_seed: int | None = None


def heuristic_sweeps(
    max_chains: int = 16,
    *,
    max_chain_tokens: int = 512,
    chunk_tokens: int = 64,
    extension_chunks: int = 2,
    hidden: bool = False,
    execution: bool = False,
) -> list[Family]:
    """Every fixed heuristic family with its parameter grid, for chains of at most
    ``max_chain_tokens`` in chunks of ``chunk_tokens`` and up to ``max_chains`` chains.

    Each point is built from its name (:func:`policies.registry.load_policy`), so a name in the
    tables is what ``ponder evaluate`` and ``ponder serve`` take.

    | family | grid |
    |---|---|
    | best-of-N (majority, confidence, verifier vote) | N in 1, 2, 4, 8, 16 (up to ``max_chains``) |
    | s1 budget forcing | budgets of 1, 2, 4, ... chunks up to the chain cap plus its extensions |
    | Adaptive-Consistency | Beta-rule thresholds 0.6, 0.8, 0.9, 0.95, 0.99 |
    | ESC | windows of 4 up to 4, 8, 16 chains |
    | DeepConf online | keep 10 % and 90 % |
    | probe agreement | k = 1, 2, 3, 4, 6 agreeing probes |
    | difficulty router | (easy, hard) thresholds (0.2, 0.5), (0.3, 0.7), (0.5, 0.9) |
    | bounded thinking | start 1, 2, 4 chunks, up to the chain cap |
    | with ``hidden`` (the bank's hidden states): probe-stop | thresholds 0.5, 0.6, 0.7, 0.8, 0.9, 0.95 |
    | with ``hidden``: best-of-N, the chain the probe rates highest | N as best-of-N |
    | with ``execution`` (a code bank, its verifier runs the visible tests): verify-stop at score 1 | up to N chains, N as best-of-N from 2 |

    verify-stop is swept only where the verifier is execution: with a model's own yes/no
    (P(yes) ranks chains at AUROC 0.57 on the GSM8K bank) it stops on a coin's judgement.
    """
    if max_chains < 1:
        raise ConfigError(f"max_chains must be >= 1, got {max_chains}")
    config = EnvConfig(max_chains=max_chains)

    def family(name: str, points: Iterable[tuple[str, str]]) -> Family:
        return Family(
            name, tuple((label, load_policy(spec, config=config)) for label, spec in points)
        )

    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max_chains]
    fams = [
        family(f"best-of-N{suffix}", ((f"N={n}", f"best-of-{n}{suffix}") for n in ns))
        for suffix in ("", "-confidence", "-verifier")
    ]
    top = max_chain_tokens + extension_chunks * chunk_tokens
    budgets, b = [], chunk_tokens
    while b < top:
        budgets.append(b)
        b *= 2
    budgets.append(top)
    fams.append(family("s1", ((f"B={b}", f"s1-{b}") for b in budgets)))
    thresholds = (0.6, 0.8, 0.9, 0.95, 0.99)
    fams.append(
        family(
            "adaptive-consistency",
            ((f"t={t:g}", f"adaptive-consistency-{t:g}") for t in thresholds),
        )
    )
    w = EarlyStoppingSC.WINDOW
    maxes = sorted({min(max_chains, x) for x in (w, 2 * w, 4 * w)})
    fams.append(family("esc", ((f"max={m}", f"esc-{w}-max{m}") for m in maxes)))
    fams.append(
        family("deepconf-online", ((f"keep={k}", f"deepconf-online-{k}") for k in (10, 90)))
    )
    fams.append(family("probe-agree", ((f"k={k}", f"probe-agree-{k}") for k in (1, 2, 3, 4, 6))))
    routes = ((0.2, 0.5), (0.3, 0.7), (0.5, 0.9))
    if hidden:
        fams.append(
            family(
                "probe-stop",
                ((f"t={t:g}", f"probe-stop-{t:g}") for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)),
            )
        )
        fams.append(family("best-of-N-probe", ((f"N={n}", f"best-of-{n}-probe") for n in ns)))
        fams.append(
            family("best-of-N-probe-best", ((f"N={n}", f"best-of-{n}-probe-best") for n in ns))
        )
    if execution:
        fams.append(
            family(
                "verify-stop",
                ((f"max={n}", "verify-stop-1" + ("" if n == 16 else f"-max{n}")) for n in ns[1:]),
            )
        )
    fams.append(family("router", ((f"{e:g}-{h:g}", f"router-{e:g}-{h:g}") for e, h in routes)))
    starts = [
        s for s in (chunk_tokens, 2 * chunk_tokens, 4 * chunk_tokens) if s <= max_chain_tokens
    ]
    fams.append(
        family("bounded", ((f"start={s}", f"bounded-{s}-{max_chain_tokens}") for s in starts))
    )
    return fams


def learned_sweep(
    name: str, policy: Policy, lams: Iterable[float], *, train_seed: int | None = None
) -> Family:
    """A learned policy over ``lam``: ``policy.with_lam(lam)`` for each value."""
    if not isinstance(policy, LamConditioned):
        raise ConfigError(f"{name}: a learned sweep needs a policy with with_lam(lam)")
    return Family(
        name,
        tuple((f"lam={lam:g}", policy.with_lam(float(lam))) for lam in lams),
        "learned",
        train_seed,
    )


#: One point to evaluate: the policy, its family, its sweep parameter, its training seed.
Point = tuple[Policy, str, str, int | None]
#: Evaluates points (in any order, calling ``on_result`` after each) and returns their results
#: in the points' order: :func:`evaluate_families` runs them here; ``ponder run --ray`` on Ray
#: (:class:`policies.ray_run.RayEvaluators`).
PointMap = Callable[[Sequence[Point], Callable[[EvalResult], None] | None], list[EvalResult]]


def evaluate_families(
    evaluator: Evaluator,
    families: Sequence[Family],
    *,
    on_result: Callable[[EvalResult], None] | None = None,
    points_map: PointMap | None = None,
) -> dict[str, list[EvalResult]]:
    """Evaluate every point of every family; ``on_result`` is called after each (progress).
    Families of one name (a learned family's training seeds) share its list of results.
    ``points_map`` evaluates the points elsewhere (Ray); the results are the same."""
    points: list[Point] = [
        (policy, fam.name, param, fam.train_seed)
        for fam in families
        for param, policy in fam.points
    ]
    if points_map is None:
        results = []
        for policy, family, param, train_seed in points:
            r = evaluator(policy, family=family, param=param, train_seed=train_seed)
            results.append(r)
            if on_result is not None:
                on_result(r)
    else:
        results = points_map(points, on_result)
    out: dict[str, list[EvalResult]] = {}
    for fam in families:
        out.setdefault(fam.name, [])
    for (_, family, _, _), r in zip(points, results, strict=True):
        out[family].append(r)
    return out


def lam_of(result: EvalResult) -> float:
    """The λ of a learned sweep's point (its ``lam=<value>`` parameter label)."""
    key, _, value = result.param.partition("=")
    if key != "lam":
        raise ConfigError(
            f"{result.label} is not a point of a learned sweep (param {result.param!r})"
        )
    return float(value)


def refine_sweep(
    evaluator: Evaluator,
    name: str,
    policy: LamConditioned,
    results: Sequence[EvalResult],
    *,
    extra: int = 3,
    ratio: float = 2.0,
    min_step: float = 1.05,
    on_result: Callable[[EvalResult], None] | None = None,
    train_seed: int | None = None,
) -> list[EvalResult]:
    """A learned sweep with up to ``extra`` λ values added where its spending jumps.

    While two neighbouring λ values of the sweep differ in mean tokens by more than ``ratio``
    times, the widest such gap (by the token ratio) gets the geometric mean of its two λ (never
    closer than ``min_step`` times to either). A fixed grid is blind there: on the GSM8K bank a
    policy can go from 16 chains to one between two grid values, exactly across the budgets the
    frontier is read at, and chunk-level PPO went from 71 tokens at λ = 1.62e-3 to a whole chain
    (310) at 1.24e-3 on its dev questions. Where the points are placed depends on tokens only,
    never on accuracy. Returns all points, sorted by λ (the new ones evaluated and passed to
    ``on_result``).

    ``min_step`` 1.05 was chosen on the GSM8K dev questions (25-value grid, 3 extra points): the
    learned envelope was below the best heuristic at 14 of 31 budgets, 4 of them beyond the
    paired interval, with 1.25 (the earlier rule); 13 and 2 with 1.1; 13 and none with 1.05 or
    1.02."""
    if not isinstance(policy, LamConditioned):
        raise ConfigError(f"{name}: refining a sweep needs a policy with with_lam(lam)")
    if ratio <= 1:
        raise ConfigError(f"ratio must be > 1, got {ratio}")
    if min_step <= 1:
        raise ConfigError(f"min_step must be > 1, got {min_step}")
    pts = sorted(((lam_of(r), r) for r in results), key=lambda p: p[0])
    for _ in range(max(0, extra)):
        gaps = []
        for (l1, r1), (l2, r2) in itertools.pairwise(pts):
            lo, hi = sorted((r1.tokens.mean, r2.tokens.mean))
            jump = hi / max(lo, 1e-9)
            if jump > ratio and l2 > min_step**2 * l1:
                gaps.append((jump, l1, l2))
        if not gaps:
            break
        _, l1, l2 = max(gaps)
        # the geometric mean, to as few significant digits (2 to 4) as keep it min_step from
        # both ends; unrounded if none does (the mean itself always does: see the gap test)
        lam = mid = math.sqrt(l1 * l2)
        for digits in (2, 3, 4):
            x = float(f"{mid:.{digits}g}")
            if l1 * min_step <= x * (1 + 1e-9) and x <= l2 / min_step * (1 + 1e-9):
                lam = x
                break
        r = evaluator(
            policy.with_lam(lam), family=name, param=f"lam={lam:g}", train_seed=train_seed
        )
        if on_result is not None:
            on_result(r)
        pts = sorted([*pts, (lam, r)], key=lambda p: p[0])
    return [r for _, r in pts]
