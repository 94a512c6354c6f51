"""A step-level process reward model (PRM) for the testbed, and its training entry point.

The PRM predicts, at the end of every written step, whether all steps so far are correct
(``prefix_ok`` in ``data/testbed/step_labels.parquet``). It is a linear head on features of the
frozen testbed model read at the step's last token:

* the final hidden state there (what the model "thinks" after writing the step), and
* how sure the model was while writing the step: the log-probability of its tokens (all of the
  line, the result after the last ``=``, the last three) and the entropy of its predictions.

The model already shipped in ``models/testbed`` does the reading, so the PRM adds a few kilobytes
of weights. Because the encoder is causal, a step's features depend only on the text up to it:
re-scoring a longer chain reads only the new tokens (see :class:`PRMState`).

Train it with::

    python -m env.models.testbed.prm --out models/testbed/prm

It writes ``model.safetensors`` (the head) and ``config.json`` (encoder fingerprint, feature
schema, how to aggregate step scores, validation metrics, the training data's sha256). No pickle
is ever read. :class:`env.verifiers.PRMVerifier` puts it behind the verifier protocol.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from env.models.testbed.model import TESTBED_DIR
from env.models.testbed.task import EOS, judge_text, prompt_text
from env.types import PromptMode
from features.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT",
    "LP_FEATURES",
    "PRM_DIR",
    "STEP_PATTERN",
    "Aggregate",
    "PRMConfig",
    "PRMState",
    "ProcessRewardModel",
    "StepEncoder",
    "TrainArgs",
    "aggregate_scores",
    "build_head",
    "step_spans",
    "train",
    "main",
]

log = logging.getLogger(__name__)

#: The folder format this module writes and reads.
FORMAT = "ponder-prm/1"
#: Where the trained PRM ships.
PRM_DIR = TESTBED_DIR / "prm"
#: Default training data.
STEP_LABELS = Path(__file__).resolve().parents[3] / "data" / "testbed" / "step_labels.parquet"
#: A step is a line that assigns a variable (``c = b * 3 = 85 * 3 = 255``), as the labels define it.
STEP_PATTERN = r"^[a-z] = "
#: Confidence features of a step line, in order (after the hidden state).
LP_FEATURES = (
    "line_logprob_min",
    "line_logprob_mean",
    "tail3_logprob_sum",
    "result_logprob_min",
    "result_logprob_sum",
    "line_entropy_max",
    "result_entropy_max",
    "result_tokens",
)

#: How step scores become a chain score: the weakest step, or the product of all.
Aggregate = Literal["min", "product"]


def aggregate_scores(scores: Sequence[float], how: Aggregate) -> float:
    """A chain's P(correct so far) from its step scores (0.5, no evidence, when it has none)."""
    if not scores:
        return 0.5
    if how == "min":
        return float(min(scores))
    if how == "product":
        return float(math.prod(scores))
    raise ConfigError(f"aggregate must be 'min' or 'product', got {how!r}")


def step_spans(text: str, *, finished: bool, pattern: str = STEP_PATTERN) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the complete step lines of a solution text.

    A line is complete once a newline follows it, or when the chain has finished. ``end`` is
    where the line ends (before its newline), as ``end`` in the step labels.
    """
    rx = re.compile(pattern)
    out: list[tuple[int, int]] = []
    start = 0
    while start <= len(text):
        nl = text.find("\n", start)
        if nl < 0:
            if finished and start < len(text) and rx.match(text[start:]):
                out.append((start, len(text)))
            break
        if nl > start and rx.match(text[start:nl]):
            out.append((start, nl))
        start = nl + 1
    return out


# -- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class PRMConfig:
    """What ``config.json`` of a PRM folder holds.

    Attributes:
        encoder: the frozen encoder's folder, relative to the PRM folder (or absolute).
        encoder_sha256: its fingerprint (:func:`env.bank.identity.model_sha256`); checked at load.
        hidden_size: width of the encoder's hidden state.
        features: names of the head's inputs, in order (``hidden_0`` ... then
            :data:`LP_FEATURES`).
        head_hidden: width of the head's hidden layer (0: logistic regression).
        step_pattern: regex that marks a line as a step.
        aggregate: how step scores become a chain score.
        bos: whether the encoder reads an EOS token before the prompt (as in its packed training).
        max_tokens: the encoder's context; text past it is not read.
        metrics: validation metrics (namespaced, ``val/...``).
        data_sha256: sha256 of the training data file.
        train_args: the arguments training ran with.
    """

    encoder: str
    encoder_sha256: str
    hidden_size: int
    features: tuple[str, ...]
    head_hidden: int = 0
    step_pattern: str = STEP_PATTERN
    aggregate: Aggregate = "min"
    bos: bool = True
    max_tokens: int = 1024
    metrics: dict[str, float | int | None] = field(default_factory=dict)
    data_sha256: str = ""
    train_args: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["features"] = list(self.features)
        return json.dumps({"format": FORMAT, **d}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> PRMConfig:
        """Read and check ``config.json``; anything wrong raises :class:`ModelError`."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(
                f"the PRM config {path} cannot be read ({e}); retrain it with "
                "`python -m env.models.testbed.prm --out <folder>`"
            ) from e
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ModelError(f"{path} is not a PRM config of format {FORMAT!r} (got {got!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            cfg = cls(**{k: v for k, v in raw.items() if k in names})
            ok = (
                isinstance(cfg.encoder, str)
                and isinstance(cfg.encoder_sha256, str)
                and isinstance(cfg.hidden_size, int)
                and cfg.hidden_size > 0
                and isinstance(cfg.features, list | tuple)
                and all(isinstance(f, str) for f in cfg.features)
                and len(cfg.features) == cfg.hidden_size + len(LP_FEATURES)
                and isinstance(cfg.head_hidden, int)
                and cfg.head_hidden >= 0
                and cfg.aggregate in ("min", "product")
                and isinstance(cfg.max_tokens, int)
                and cfg.max_tokens > 1
            )
            re.compile(cfg.step_pattern)
        except (TypeError, re.error) as e:
            raise ModelError(f"the PRM config {path} is malformed: {e}") from e
        if not ok:
            raise ModelError(
                f"the PRM config {path} is malformed (a field has the wrong type, or the "
                "feature list does not match the hidden size); retrain it"
            )
        return dataclasses.replace(cfg, features=tuple(cfg.features))


# -- the encoder ------------------------------------------------------------------------------


@dataclass
class PRMState:
    """What the PRM has read of one text: per-token arrays and the encoder's KV cache.

    Every array has one row per token read; ``last_logp`` is the log-distribution after the
    last one (needed for the next token's log-probability).
    """

    ids: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    hidden: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    logprob: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    entropy: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    last_logp: Any = None
    cache: Any = None
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)


class StepEncoder:
    """The frozen testbed model as a feature reader.

    Args:
        path: a Hugging Face folder of a causal LM (the testbed model).
        bos: read an EOS token before the text.
        max_tokens: read at most this many tokens of a text.
    """

    def __init__(self, path: str | Path, *, bos: bool = True, max_tokens: int = 1024) -> None:
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

        p = Path(path)
        if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
            raise ModelError(
                f"no encoder model at {p}: the PRM reads with the testbed model "
                "(train it with `ponder testbed train`)"
            )
        try:
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(p)
            self.model = AutoModelForCausalLM.from_pretrained(p)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            raise ModelError(f"the encoder at {p} cannot be loaded: {e}") from e
        self.model.eval()
        self.model.requires_grad_(False)
        self.path = p
        self.bos = bos
        limit = int(getattr(self.model.config, "max_position_embeddings", max_tokens))
        self.max_tokens = min(max_tokens, limit)
        self.hidden_size = int(self.model.config.hidden_size)

    def tokenize(self, text: str) -> tuple[list[int], list[int], bool]:
        """Token ids of ``text``, each token's start offset (-1 for the leading EOS), and whether
        the text was cut at the context length."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [int(i) for i in enc["input_ids"]]
        starts = [int(a) for a, _ in enc["offset_mapping"]]
        if self.bos:
            eos = self.tokenizer.convert_tokens_to_ids(EOS)
            ids, starts = [int(eos), *ids], [-1, *starts]
        cut = len(ids) > self.max_tokens
        return ids[: self.max_tokens], starts[: self.max_tokens], cut

    def read(self, text: str, prev: PRMState | None = None) -> tuple[PRMState, int, int]:
        """Read ``text``, reusing what ``prev`` read of a common token prefix.

        Returns:
            The new state, how many tokens were reused and how many were computed now.
        """
        import torch

        ids, starts, cut = self.tokenize(text)
        keep = 0
        if prev is not None and len(prev) and prev.cache is not None:
            n = min(len(ids), len(prev.ids))
            while keep < n and ids[keep] == prev.ids[keep]:
                keep += 1
            if keep < len(prev.ids):
                # The log-probability of a token needs the logits of the token before it: only
                # those of the last token read are kept, so step back one and recompute it.
                keep = max(0, keep - 1)
        if prev is None or keep == 0:
            prev = PRMState(hidden=np.zeros((0, self.hidden_size), np.float32))
        if keep == len(ids) == len(prev.ids):
            prev.starts = starts
            return prev, keep, 0
        cache = prev.cache
        if cache is not None and keep < cache.get_seq_length():
            cache.crop(keep - cache.get_seq_length())
        hidden = prev.hidden[:keep]
        logprob, entropy = prev.logprob[:keep], prev.entropy[:keep]
        last_logp = prev.last_logp if keep == len(prev.ids) else None
        new = ids[keep:]
        if new:
            with torch.inference_mode():
                out = self.model(
                    input_ids=torch.tensor([new], dtype=torch.long),
                    past_key_values=cache if keep else None,
                    use_cache=True,
                    output_hidden_states=True,
                )
            logp = torch.log_softmax(out.logits[0].float(), dim=-1)
            ent = -(logp.exp() * logp).sum(-1)
            lp = np.zeros(len(new), np.float32)
            en = np.zeros(len(new), np.float32)
            tgt = torch.tensor(new, dtype=torch.long)
            if len(new) > 1:
                lp[1:] = logp[:-1].gather(1, tgt[1:, None])[:, 0].numpy()
                en[1:] = ent[:-1].numpy()
            if last_logp is not None:
                lp[0] = float(last_logp[new[0]])
                en[0] = float(-(last_logp.exp() * last_logp).sum())
            hidden = np.concatenate([hidden, out.hidden_states[-1][0].float().numpy()], axis=0)
            logprob = np.concatenate([logprob, lp])
            entropy = np.concatenate([entropy, en])
            last_logp = logp[-1].clone()
            cache = out.past_key_values
        state = PRMState(ids, starts, hidden, logprob, entropy, last_logp, cache, cut)
        return state, keep, len(new)

    def features(self, state: PRMState, text: str, span: tuple[int, int]) -> np.ndarray | None:
        """The head's input for the step line at character ``span`` of ``text`` (``None`` if the
        line was not read: past the context, or empty)."""
        a, b = span
        starts = state.starts
        toks = [i for i in range(len(starts)) if a <= starts[i] < b]
        if not toks or (state.truncated and toks[-1] == len(starts) - 1):
            return None  # not read, or it may go on past the context
        eq = text.rfind("=", a, b)
        res = [i for i in toks if starts[i] > eq] if eq >= 0 else []
        res = res or toks[-1:]
        lp, en = state.logprob, state.entropy
        extra = np.array(
            [
                lp[toks].min(),
                lp[toks].mean(),
                lp[toks[-3:]].sum(),
                lp[res].min(),
                lp[res].sum(),
                en[toks].max(),
                en[res].max(),
                float(len(res)),
            ],
            np.float32,
        )
        return np.concatenate([state.hidden[toks[-1]], extra])


# -- the head ---------------------------------------------------------------------------------


def _head_module(n_features: int, hidden: int) -> torch.nn.Module:
    import torch

    class _Head(torch.nn.Module):
        """Standardise, then a linear layer (or a one-hidden-layer MLP) to a logit."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(n_features))
            self.register_buffer("std", torch.ones(n_features))
            if hidden:
                self.net: torch.nn.Module = torch.nn.Sequential(
                    torch.nn.Linear(n_features, hidden),
                    torch.nn.GELU(),
                    torch.nn.Linear(hidden, 1),
                )
            else:
                self.net = torch.nn.Linear(n_features, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = (x - self.get_buffer("mean")) / self.get_buffer("std")
            return self.net(z)[..., 0]

    return _Head()


def build_head(n_features: int, hidden: int = 0) -> torch.nn.Module:
    """A fresh head for ``n_features`` inputs: standardisation buffers ``mean`` and ``std``, then
    a linear layer (``hidden=0``) or a one-hidden-layer MLP, to one logit per row."""
    return _head_module(n_features, hidden)


# -- the loaded model -------------------------------------------------------------------------


class ProcessRewardModel:
    """A trained PRM: encoder, head and config, loaded from a folder.

    Args:
        path: the PRM folder (``config.json`` + ``model.safetensors``).
        encoder: the encoder folder (default: the one the config names, relative to ``path``).

    Raises:
        ModelError: the folder is missing, garbled, or the encoder is not the one it was
            trained on.
    """

    def __init__(self, path: str | Path = PRM_DIR, *, encoder: str | Path | None = None) -> None:
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from env.bank.identity import model_sha256
        from features.errors import BankError

        p = Path(path)
        if not p.is_dir():
            raise ModelError(
                f"no PRM at {p}: train one with `python -m env.models.testbed.prm --out {p}`"
            )
        cfg = PRMConfig.from_file(p / "config.json")
        enc_path = Path(encoder) if encoder is not None else (p / cfg.encoder).resolve()
        try:
            sha = model_sha256(enc_path)
        except BankError as e:
            raise ModelError(f"the PRM's encoder cannot be found: {e}") from e
        if cfg.encoder_sha256 and sha != cfg.encoder_sha256:
            raise ModelError(
                f"the PRM at {p} was trained on the encoder {cfg.encoder_sha256[:12]}, but "
                f"{enc_path} is {sha[:12]}: retrain the PRM for this model"
            )
        try:
            weights = load_file(str(p / "model.safetensors"))
        except (OSError, SafetensorError, ValueError) as e:
            raise ModelError(f"the PRM weights in {p} cannot be read: {e}") from e
        head = _head_module(len(cfg.features), cfg.head_hidden)
        try:
            head.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise ModelError(f"the PRM weights in {p} do not match its config: {e}") from e
        if not all(bool(torch.isfinite(v).all()) for v in weights.values()):
            raise ModelError(f"the PRM weights in {p} hold non-finite numbers; retrain it")
        head.eval()
        self.path = p
        self.config = cfg
        self.head = head
        self.encoder = StepEncoder(enc_path, bos=cfg.bos, max_tokens=cfg.max_tokens)
        self._rx = re.compile(cfg.step_pattern)

    def prompt(self, question: str, mode: PromptMode = "cot") -> str:
        """The text the PRM reads before a solution (the testbed's prompt)."""
        return prompt_text(question, mode)

    def score(
        self,
        question: str,
        solution: str,
        *,
        mode: PromptMode = "cot",
        finished: bool = False,
        state: PRMState | None = None,
    ) -> tuple[list[float], PRMState, int, int]:
        """Score every complete step of ``solution`` so far.

        Only text up to the end of the last complete step is read (an unfinished line is read
        once it is complete). ``state`` is what an earlier call read of this solution.

        Returns:
            Step scores (P(every step so far is correct) at each step, in order), the new
            state, tokens reused from ``state`` and tokens read now.
        """
        import torch

        spans = step_spans(solution, finished=finished, pattern=self.config.step_pattern)
        if not spans:
            return [], state if state is not None else PRMState(), 0, 0
        head = self.prompt(question, mode)
        off = len(head)
        text = head + solution[: spans[-1][1]]
        st, reused, computed = self.encoder.read(text, state)
        rows = [self.encoder.features(st, text, (a + off, b + off)) for a, b in spans]
        feats = [r for r in rows if r is not None]
        if not feats:
            return [], st, reused, computed
        with torch.inference_mode():
            logits = self.head(torch.from_numpy(np.stack(feats)))
        return torch.sigmoid(logits).tolist(), st, reused, computed


# -- training ---------------------------------------------------------------------------------


@dataclass
class TrainArgs:
    """Train the testbed PRM (a head on the frozen testbed model) on the step labels."""

    out: Path = PRM_DIR
    """folder to write the PRM to (model.safetensors + config.json)"""
    data: Path = STEP_LABELS
    """step labels (parquet: qid, question, solution, end, prefix_ok, final_correct, ...)"""
    encoder: Path = TESTBED_DIR
    """the frozen testbed model the head reads with"""
    seed: int = 0
    """seed for the split and the head's initialisation"""
    val_frac: float = 0.2
    """share of questions held out for validation (grouped: no question is on both sides)"""
    epochs: int = 30
    """full-batch L-BFGS steps (each up to 20 iterations)"""
    l2: float = 3e-3
    """L2 penalty on the head's weights (validation chose it; larger heads overfit)"""
    head_hidden: int = 0
    """hidden units of the head (0: logistic regression, which validated best)"""
    aggregate: Literal["auto", "min", "product"] = "auto"
    """how step scores become a chain score; auto: the better on validation (Brier score)"""
    max_rows: int = 0
    """use about this many labelled steps, whole solutions at a time (0: all)"""
    threads: int = 1
    """torch threads"""
    compare_self_verifier: bool = True
    """also score the validation solutions with the testbed model's own yes/no verdict"""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _portable(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (so configs do not name hosts)."""
    root = Path(__file__).resolve().parents[3]
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(path)


def _auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, bool)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, p))


def _self_verifier_p(enc: StepEncoder, question: str, solution: str) -> float:
    """P(`` yes``) of the testbed model's verdict (the generative self-verifier's prompt)."""
    import torch

    ids, _, _ = enc.tokenize(judge_text(question, solution))
    yes = enc.tokenizer(" yes", add_special_tokens=False)["input_ids"][0]
    no = enc.tokenizer(" no", add_special_tokens=False)["input_ids"][0]
    with torch.inference_mode():
        logits = enc.model(input_ids=torch.tensor([ids])).logits[0, -1]
    two = torch.softmax(logits[[yes, no]].float(), dim=0)
    return float(two[0])


def train(args: TrainArgs) -> dict[str, Any]:
    """Encode the labelled steps, fit the head, validate, write the PRM; return its metrics."""
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from env.bank.identity import model_sha256

    t0 = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if not 0 < args.val_frac < 1:
        raise ConfigError(f"val_frac must be in (0, 1), got {args.val_frac}")

    data = Path(args.data)
    if not data.is_file():
        raise ConfigError(f"no step labels at {data}: write them with `ponder testbed evaluate`")
    df = pd.read_parquet(data)
    need = {"qid", "sample", "question", "solution", "end", "prefix_ok", "final_correct"}
    if missing := need - set(df.columns):
        raise ConfigError(f"{data} lacks the columns {sorted(missing)}")
    df = df.assign(key=df["qid"].astype(str) + "#" + df["sample"].astype(str))
    if args.max_rows:
        keys = df["key"].drop_duplicates().sample(frac=1.0, random_state=args.seed).tolist()
        sizes = df.groupby("key").size()
        take, n = [], 0
        for k in keys:
            if n >= args.max_rows:
                break
            take.append(k)
            n += int(sizes[k])
        df = df[df["key"].isin(set(take))]

    enc = StepEncoder(args.encoder)
    # Encode each distinct (question, solution) once: every step's features come from one pass.
    X = np.zeros((len(df), enc.hidden_size + len(LP_FEATURES)), np.float32)
    ok = np.ones(len(df), bool)
    from tqdm import tqdm

    pairs = df.groupby(["question", "solution"], sort=False).indices
    for (question, solution), idx in tqdm(pairs.items(), desc="encode steps", unit="solution"):
        prompt = prompt_text(str(question), "cot")
        sol = str(solution)
        st, _, _ = enc.read(prompt + sol)
        st.cache = None
        for i in idx:
            end = int(df["end"].iloc[i])
            start = sol.rfind("\n", 0, end) + 1
            f = enc.features(st, prompt + sol, (start + len(prompt), end + len(prompt)))
            if f is None:
                ok[i] = False
            else:
                X[i] = f
    df, X = df[ok].reset_index(drop=True), X[ok]
    y = df["prefix_ok"].to_numpy(bool)

    # Group split by question text (a few qids share a question; none may straddle the split).
    qs = sorted(df["question"].unique())
    random.Random(args.seed).shuffle(qs)
    n_val = max(1, round(len(qs) * args.val_frac)) if len(qs) > 1 else 0
    val_q = set(qs[:n_val])
    va = df["question"].isin(val_q).to_numpy()
    tr = ~va
    if not tr.any():
        raise ConfigError("too few questions to train on; raise --max-rows")

    n_feat = X.shape[1]
    head = _head_module(n_feat, args.head_hidden)
    xt = torch.from_numpy(X[tr])
    yt = torch.from_numpy(y[tr].astype(np.float32))
    mean = xt.mean(0)
    std = xt.std(0).clamp_min(1e-4) if len(xt) > 1 else torch.ones(n_feat)
    head.get_buffer("mean").copy_(mean)
    head.get_buffer("std").copy_(std)
    params = [p for p in head.parameters() if p.requires_grad]
    weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(xt), yt)
        return loss + 0.5 * args.l2 * sum((w**2).sum() for w in weights)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    for _ in range(args.epochs):
        opt.step(closure)  # type: ignore[arg-type]
    head.eval()
    with torch.no_grad():
        loss = float(objective())
    log.info("train/loss %.4f after %d L-BFGS steps", loss, args.epochs)

    with torch.inference_mode():
        p_all = torch.sigmoid(head(torch.from_numpy(X))).numpy()
    metrics: dict[str, float | int | None] = {
        "train/loss": loss,
        "train/steps": int(tr.sum()),
        "train/questions": len(qs) - n_val,
        "val/steps": int(va.sum()),
        "val/questions": n_val,
    }
    chosen: Aggregate = "min" if args.aggregate == "auto" else args.aggregate
    if va.any():
        pv, yv = p_all[va], y[va]
        metrics["val/step_auroc"] = _auroc(yv, pv)
        metrics["val/step_accuracy"] = float(((pv > 0.5) == yv).mean())
        metrics["val/step_majority_accuracy"] = float(max(yv.mean(), 1 - yv.mean()))
        metrics["val/step_brier"] = float(((pv - yv) ** 2).mean())
        sol = df[va].assign(p=pv).groupby("key", sort=False)
        fc = sol["final_correct"].first().to_numpy(bool)
        agg = {"min": sol["p"].min().to_numpy(), "product": sol["p"].prod().to_numpy()}
        metrics["val/solutions"] = len(fc)
        metrics["val/solution_majority_accuracy"] = float(max(fc.mean(), 1 - fc.mean()))
        for name, s in agg.items():
            metrics[f"val/solution_auroc_{name}"] = _auroc(fc, s)
            metrics[f"val/solution_accuracy_{name}"] = float(((s > 0.5) == fc).mean())
            metrics[f"val/solution_brier_{name}"] = float(((s - fc) ** 2).mean())
        if args.aggregate == "auto":
            # The chain score is used as a probability (P(yes) weights votes), so a proper
            # scoring rule picks the aggregate; the two rank solutions almost alike (AUROC).
            b_min = metrics["val/solution_brier_min"]
            b_prod = metrics["val/solution_brier_product"]
            if b_min is not None and b_prod is not None and b_prod < b_min:
                chosen = "product"
        if args.compare_self_verifier:
            first = df[va].groupby("key", sort=False).first()
            sv = np.array(
                [
                    _self_verifier_p(enc, str(q), str(s))
                    for q, s in zip(first["question"], first["solution"], strict=True)
                ]
            )
            metrics["val/self_verifier_auroc"] = _auroc(fc, sv)
            metrics["val/self_verifier_accuracy"] = float(((sv > 0.5) == fc).mean())
    metrics["train/seconds"] = round(time.time() - t0, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    enc_rel = os.path.relpath(Path(args.encoder).resolve(), out.resolve())
    train_args = {
        k: (_portable(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(args).items()
    }
    cfg = PRMConfig(
        encoder=enc_rel,
        encoder_sha256=model_sha256(args.encoder),
        hidden_size=enc.hidden_size,
        features=tuple(f"hidden_{i}" for i in range(enc.hidden_size)) + LP_FEATURES,
        head_hidden=args.head_hidden,
        aggregate=chosen,
        bos=enc.bos,
        max_tokens=enc.max_tokens,
        metrics=metrics,
        data_sha256=_sha256(data),
        train_args=train_args,
    )
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": FORMAT})
    tmp.chmod(0o644)
    tmp.replace(out / "model.safetensors")
    tmp = out / "config.json.tmp"
    tmp.write_text(cfg.to_json())
    tmp.replace(out / "config.json")
    for k, v in metrics.items():
        log.info("%s = %s", k, f"{v:.4f}" if isinstance(v, float) else v)
    log.info("aggregate: %s; PRM written to %s", chosen, out)
    return metrics


def main(argv: list[str] | None = None) -> None:
    import tyro

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = tyro.cli(TrainArgs, args=argv)
    train(args)
    print(f"PRM written to {args.out}")


if __name__ == "__main__":
    main()
