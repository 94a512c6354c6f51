"""The hidden-state features of an episode: what the model's own state says about its chains.

Two probes read the generating model's states (:mod:`env.probes`, fitted with ``ponder probes``
or :meth:`HiddenProbes.fit`): the **chain-correctness** probe gives each chain, at each of its
chunk boundaries, P(its final answer will be right); the **difficulty** probe gives the question
a predicted pass rate from the state at the prompt's last token. The episode reads five numbers
from them (:data:`HIDDEN_FEATURES`), appended to every observation
(:data:`~env.episode.observation.FEATURES` ends with them). An environment without probes fills
them with :data:`NEUTRAL`, and a policy trained without hidden states never reads them (its
``feature_set`` is ``base``; see :mod:`policies.base`), so a policy either reads the model's
state or provably does not.

Cross-fitting. A probe fitted on the training questions is optimistic on them: a policy trained
on its in-sample P(right) would learn to trust it more than it deserves on new questions.
:meth:`HiddenProbes.fit` therefore also fits the chosen configuration once per fold of the
training questions, without that fold, and an episode of a training question reads the probes
that did not see it (``held_out``). Test questions and served ones read the probes fitted on all
of ``train``; only those are saved with a policy.

Two answer aggregations read the probe too (``EnvConfig.aggregate``): ``probe`` (votes weighted
by each chain's latest P(right)) and ``probe-best`` (the answer of the chain with the highest).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from features.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from env.bank.hidden import HiddenManifest, HiddenStates
    from env.bank.store import TraceBank
    from env.episode.rules import ChainFold
    from env.probes.model import LinearProbe
    from env.types import Question

__all__ = [
    "HIDDEN_FEATURES",
    "HIDDEN_NAMES",
    "NEUTRAL",
    "HiddenProbes",
    "hidden_features",
    "probe_answer",
    "probe_best_index",
]

#: (name, meaning) of the hidden-state features, in observation order.
HIDDEN_FEATURES: tuple[tuple[str, str], ...] = (
    (
        "cur_right",
        "chain-correctness probe: P(the current chain's final answer is right) at its latest "
        "boundary",
    ),
    (
        "right_vote_share",
        "leader share with each answered chain's vote weighted by its latest P(right)",
    ),
    ("right_best", "the highest latest P(right) among chains with an answer (0 if none)"),
    (
        "right_best_agrees",
        "1 if the answered chain with the highest P(right) holds the leading (majority) answer",
    ),
    ("pass_rate", "difficulty probe: the question's predicted pass rate, from the prompt's state"),
)
HIDDEN_NAMES: tuple[str, ...] = tuple(n for n, _ in HIDDEN_FEATURES)
#: The hidden-state features of an environment without probes.
NEUTRAL: tuple[float, ...] = (0.5, 0.0, 0.0, 0.0, 0.5)

_FILE = "hidden_probes.json"


def hidden_features(
    answers: Sequence[str | None],
    rights: Sequence[float],
    cur: int,
    leader: str | None,
    pass_rate: float,
) -> tuple[float, ...]:
    """The :data:`HIDDEN_FEATURES` of an episode state.

    Args:
        answers: each chain's answer (normalised; ``None``: none yet).
        rights: each chain's latest P(right).
        cur: the current chain's index.
        leader: the leading answer of the majority vote (``None``: no answer yet).
        pass_rate: the difficulty probe's prediction for the question.
    """
    from features.answers import answers_equal

    if not answers:
        return (0.5, 0.0, 0.0, 0.0, _clip(pass_rate))
    share = _weighted_share(answers, rights)
    best = probe_best_index(answers, rights)
    top = rights[best] if best is not None else 0.0
    agrees = best is not None and leader is not None and bool(answers_equal(answers[best], leader))
    return (_clip(rights[cur]), _clip(share), _clip(top), float(agrees), _clip(pass_rate))


def probe_best_index(answers: Sequence[str | None], rights: Sequence[float]) -> int | None:
    """The answered chain with the highest P(right) (ties: the first), ``None`` if none."""
    best: int | None = None
    for i, (a, p) in enumerate(zip(answers, rights, strict=True)):
        if a is not None and (best is None or p > rights[best]):
            best = i
    return best


def probe_answer(
    answers: Sequence[str | None], rights: Sequence[float], how: str
) -> tuple[str | None, float]:
    """The answer chosen by ``how``: ``probe`` (votes weighted by P(right)) or ``probe-best``
    (the answer of the chain with the highest P(right)), and its weighted share."""
    from features.votes import vote_counts

    counts = vote_counts(answers, list(rights))
    total = sum(counts.values())
    if how == "probe":
        if total <= 0:
            return None, 0.0
        top = max(counts.items(), key=lambda kv: kv[1])  # first-seen wins ties
        return top[0], top[1] / total
    if how != "probe-best":
        raise ConfigError(f"probe_answer: how must be 'probe' or 'probe-best', got {how!r}")
    best = probe_best_index(answers, rights)
    if best is None:
        return None, 0.0
    from features.answers import answers_equal

    share = sum(w for a, w in counts.items() if answers_equal(a, answers[best]))
    return answers[best], (share / total if total > 0 else 0.0)


def _weighted_share(answers: Sequence[str | None], rights: Sequence[float]) -> float:
    from features.votes import vote_counts

    counts = vote_counts(answers, list(rights))
    total = sum(counts.values())
    return max(counts.values()) / total if total > 0 else 0.0


def _clip(x: float) -> float:
    if not math.isfinite(x):
        return 0.0
    return 0.0 if x < 0 else 1.0 if x > 1 else float(x)


@dataclass(frozen=True)
class HiddenProbes:
    """The two probes the hidden-state features read, and how to feed them.

    Attributes:
        chain: the chain-correctness probe (P(right) at a boundary).
        difficulty: the difficulty probe (pass rate from the prompt's state).
        max_tokens: the chain token budget its ``budget_fraction`` and ``budget_open`` inputs
            are relative to (the bank's ``max_tokens`` when it was fitted).
        held_out: per training question, the probes fitted without its fold (see the module
            docstring); empty for probes loaded from a file.
    """

    chain: LinearProbe
    difficulty: LinearProbe
    max_tokens: int
    held_out: Mapping[str, tuple[LinearProbe, LinearProbe]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.chain.kind != "chain-correctness" or self.difficulty.kind != "difficulty":
            raise ModelError(
                f"HiddenProbes needs a chain-correctness and a difficulty probe, got "
                f"{self.chain.kind!r} and {self.difficulty.kind!r}"
            )
        if int(self.max_tokens) < 1:
            raise ModelError(f"max_tokens must be positive, got {self.max_tokens}")

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer either probe reads."""
        return tuple(sorted({*self.chain.layers, *self.difficulty.layers}))

    def fingerprint(self) -> str:
        """The sha256 of what the probes compute, the held-out ones included (for
        :func:`~env.bank.store.shared`: equal fingerprints give equal features)."""
        h = hashlib.sha256(f"{self.chain.fingerprint()} {self.difficulty.fingerprint()}".encode())
        h.update(str(int(self.max_tokens)).encode())
        for qid in sorted(self.held_out):
            c, d = self.held_out[qid]
            h.update(f"\n{qid} {c.fingerprint()} {d.fingerprint()}".encode())
        return h.hexdigest()

    def describe(self) -> str:
        a = self.chain.schema.annotation
        return (
            f"probes on {a['model']['name']} (sha256 {a['model']['sha256'][:12]}…) layers "
            f"{list(self.chain.layers)} / {list(self.difficulty.layers)}, {a['dims']} dims"
        )

    def manifest(self, model_path: str = "") -> HiddenManifest:
        """The annotation the probes were fitted on (their schema's), as a
        :class:`~env.bank.hidden.HiddenManifest`: what a live capture must reproduce
        (:func:`~env.generators.capture.capture_from_manifest`)."""
        from env.bank.hidden import HiddenManifest

        a = self.chain.schema.annotation
        return HiddenManifest(
            engine=str(a["engine"]),
            model={**a["model"], "path": model_path},
            bank_id=str(a.get("bank_id", "")),
            bank_model_sha256="",
            dtype=str(a["dtype"]),
            layers=[int(x) for x in a["layers"]],
            dims=int(a["dims"]),
            projection=dict(a["projection"]),
            schema_version=int(a["schema_version"]),
        )

    def check(self, manifest: HiddenManifest | None, *, where: str, what: str) -> None:
        """Refuse states that are not the probes' inputs.

        Args:
            manifest: the capture of the bank or generator (``None``: it captures none).
            where: the bank or generator, for the message.
            what: who needs the probes (a policy, an aggregation), for the message.

        Raises:
            ConfigError: no states; ModelError: other states (the differences named).
        """
        if manifest is None:
            raise ConfigError(
                f"{what} reads the model's hidden states, and {where} gives none: replay a bank "
                f"annotated with `ponder bank annotate BANK`, or serve with a capturing "
                f"generator (`ponder serve --hidden-model FOLDER`, env.generators.Capturing)"
            )
        self.chain.schema.check(manifest, what=f"{what} (chain-correctness probe)", bank=where)
        self.difficulty.schema.check(manifest, what=f"{what} (difficulty probe)", bank=where)

    def _pick(self, qid: str | None) -> tuple[LinearProbe, LinearProbe]:
        if qid is not None and qid in self.held_out:
            return self.held_out[qid]
        return self.chain, self.difficulty

    def extras(self, fold: ChainFold, tokens: int, stopped: bool) -> dict[str, float]:
        """A boundary's extra inputs (:func:`~env.probes.data.boundary_extras`, their one
        definition): the chain's state ``fold`` with the boundary's chunk folded in, its tokens
        there and whether its sampling stopped there (end of sequence). Both environments call
        it after folding each chunk and its answer (probe or final), a budget-forced extension
        chunk included (whose hidden state is the chain's last main boundary's)."""
        from env.probes.data import boundary_extras

        return boundary_extras(fold, tokens=tokens, stopped=stopped, max_tokens=self.max_tokens)

    def right(
        self,
        qid: str | None,
        states: np.ndarray,
        layers: Sequence[int],
        extras: Sequence[Mapping[str, float]],
    ) -> np.ndarray:
        """P(right) at boundaries: ``states [n, n_layers, dims]`` of question ``qid`` (the
        probes that did not see it, for a training question) and each boundary's extra inputs
        (:meth:`extras`)."""
        chain, _ = self._pick(qid)
        if len(extras) != len(states):
            raise ConfigError(f"{len(states)} states but {len(extras)} rows of extra inputs")
        names = extras[0].keys() if len(extras) else ()
        cols = {k: np.array([e[k] for e in extras], np.float64) for k in names}
        return np.asarray(chain(np.asarray(states, np.float32), layers, cols), np.float64)

    def pass_rate(self, qid: str | None, prompt_state: np.ndarray, layers: Sequence[int]) -> float:
        """The difficulty probe's predicted pass rate from the prompt's state ``[n_layers,
        dims]``."""
        _, diff = self._pick(qid)
        return float(diff(np.asarray(prompt_state, np.float32)[None], layers)[0])

    # -- files ---------------------------------------------------------------------------------

    def save(self, directory: str | Path, *, training: bool = False) -> Path:
        """Write both probes (their safe format: JSON + safetensors) under ``directory``.

        Args:
            training: also write the held-out probes (``folds/<i>/``, and which training
                question reads which), for trainers (``hidden_probes`` of
                :mod:`policies.learned`); a policy saves without them.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.chain.save(d / "chain")
        self.difficulty.save(d / "difficulty")
        meta: dict[str, Any] = {"format": 1, "max_tokens": int(self.max_tokens)}
        if training and self.held_out:
            folds: list[tuple[LinearProbe, LinearProbe]] = []
            index: dict[str, int] = {}
            for qid, pair in self.held_out.items():
                at = next((i for i, f in enumerate(folds) if f is pair), None)
                if at is None:
                    at = len(folds)
                    folds.append(pair)
                    pair[0].save(d / "folds" / str(at) / "chain")
                    pair[1].save(d / "folds" / str(at) / "difficulty")
                index[qid] = at
            meta["held_out"] = index
        tmp = d / (_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(d / _FILE)
        return d

    @classmethod
    def load(cls, directory: str | Path, *, training: bool = False) -> HiddenProbes:
        """Read probes written by :meth:`save` (with ``training``: the held-out ones too).

        Raises:
            ModelError: a missing or damaged file (named).
        """
        from env.probes.model import LinearProbe

        d = Path(directory)
        path = d / _FILE
        try:
            meta = json.loads(path.read_text())
            max_tokens = int(meta["max_tokens"])
            index = {str(k): int(v) for k, v in (meta.get("held_out") or {}).items()}
        except FileNotFoundError:
            raise ModelError(
                f"{d} holds no hidden-state probes (no {_FILE}): fit them with "
                "HiddenProbes.fit(bank) and save them, or retrain the policy"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{path} is damaged ({e}): fit and save the probes again") from None
        held: dict[str, tuple[LinearProbe, LinearProbe]] = {}
        if training:
            folds = {
                i: (
                    LinearProbe.load(d / "folds" / str(i) / "chain"),
                    LinearProbe.load(d / "folds" / str(i) / "difficulty"),
                )
                for i in sorted(set(index.values()))
            }
            held = {q: folds[i] for q, i in index.items()}
        return cls(
            LinearProbe.load(d / "chain"), LinearProbe.load(d / "difficulty"), max_tokens, held
        )

    # -- fitting -------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        bank: TraceBank,
        hidden: HiddenStates | None = None,
        *,
        pool: Sequence[Question] | None = None,
        folds: int = 4,
        **grid: Any,
    ) -> HiddenProbes:
        """Fit both probes on ``bank``'s annotated training questions (choices on ``dev``:
        :func:`~env.probes.fit.fit_probes`), and the held-out probes of each fold of them.

        Args:
            hidden: the bank's hidden states (default: opened, every question annotated).
            pool: the questions to split into train/fit/dev (default: every annotated one;
                the ``fit`` questions when a run is tuned on ``dev``).
            folds: folds of the training questions for the held-out probes (0: none).
            grid: ``c_grid``, ``alpha_grid``, ``extra_choices``, ``weight_grid``,
                ``ended_states``, ``layers`` for ``fit_probes``.
        """
        from env.bank.hidden import require_hidden
        from env.probes.data import boundary_set, prompt_set
        from env.probes.fit import fit_chain_like, fit_difficulty_probe, fit_probes
        from env.questions import select_split

        hs = hidden if hidden is not None else require_hidden(bank)
        fitted = fit_probes(bank, hs, pool=pool, **grid)
        chain, diff = fitted.chain, fitted.difficulty
        held: dict[str, tuple[LinearProbe, LinearProbe]] = {}
        annotated = set(hs.annotated)
        base = [q for q in (pool if pool is not None else bank.questions) if q.qid in annotated]
        train = select_split(base, "train")
        if folds and len(train) >= 2 * max(2, folds):
            k = max(2, int(folds))
            for f in range(k):
                out = [q for i, q in enumerate(train) if i % k == f]
                keep = [q for i, q in enumerate(train) if i % k != f]
                c = fit_chain_like(boundary_set(bank, hs, keep), chain, hs.manifest)
                d = fit_difficulty_probe(
                    prompt_set(bank, hs, keep),
                    hs.manifest,
                    layers=diff.layers,
                    alpha=float(diff.params["alpha"]),
                )
                for q in out:
                    held[q.qid] = (c, d)
        return cls(chain, diff, int(bank.manifest.max_tokens), held)
