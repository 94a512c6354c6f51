"""A step-level process reward model (PRM) for the testbed: its features, head and loaded model.

The PRM predicts, at the end of every written step, whether all steps so far are correct
(``prefix_ok`` in ``data/testbed/step_labels.parquet``). It is a linear head on features of the
frozen testbed model read at the step's last token:

* the final hidden state there (what the model "thinks" after writing the step), and
* how sure the model was while writing the step: the log-probability of its tokens (all of the
  line, the result after the last ``=``, the last three) and the entropy of its predictions.

The model already shipped in ``models/testbed`` does the reading, so the PRM adds a few kilobytes
of weights. Because the encoder is causal, a step's features depend only on the text up to it:
re-scoring a longer chain reads only the new tokens (see :class:`PRMState`).

Train it with ``ponder testbed prm --out models/testbed/prm`` (or ``python -m
env.models.testbed.prm``; the training is :mod:`env.models.testbed.prm_train`). It writes
``model.safetensors`` (the head) and ``config.json`` (encoder fingerprint, feature schema, how to
aggregate step scores, validation metrics, the training data's sha256). No pickle is ever read. :class:`env.verifiers.PRMVerifier` puts it behind the verifier protocol.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from env.models.testbed.model import TESTBED_DIR
from env.models.testbed.task import EOS, prompt_text
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
    "aggregate_scores",
    "build_head",
    "step_spans",
]

log = logging.getLogger(__name__)

#: The folder format this module writes and reads.
FORMAT = "ponder-prm/1"
#: Where the trained PRM ships.
PRM_DIR: Path = TESTBED_DIR / "prm"
#: Default training data.
STEP_LABELS: Path = Path(__file__).resolve().parents[3] / "data" / "testbed" / "step_labels.parquet"
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


if __name__ == "__main__":
    # The documented command; training lives in prm_train.
    from env.models.testbed.prm_train import main

    main()
