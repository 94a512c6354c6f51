"""Live hidden-state capture: the model's own states on every chunk a live generator returns.

``ponder bank annotate`` (:mod:`env.bank.annotate`) adds the generating model's hidden states to a
recorded bank after the fact. :class:`Capturing` computes the same states while chains are
generated, so a policy or probe fitted on an annotated bank reads the same inputs live: it wraps
any generator (llama.cpp, vLLM, an OpenAI server, the fake, a replayed bank) together with the
Hugging Face folder of the same model, and after every chunk feeds the chunk's tokens through the
model in transformers (:class:`~env.models.states.StateCapture`: forward hooks on the chosen
layers, the model loaded only as deep as the deepest). Each chunk then carries
``Chunk.hidden``, the reduced state after its last token, and each chain ``Chain.prompt_hidden``,
the state at the prompt's last token: RMS-normalised and projected by the seeded Gaussian matrices
of :func:`~env.bank.hidden.reduce_states`, exactly as annotate stores them (float32 here, from
the same float16 values). Its traits are the inner generator's with ``hidden`` set to the
:class:`~env.bank.hidden.HiddenManifest` of the capture, which probes check before they read.

Incremental. Each prompt runs once and its KV cache is kept (the last few prompts); every chain
keeps its own KV cache, so a chunk costs a forward over its own new tokens only. A chain's first
chunk starts from a copy of its prompt's cache (a branch from the prompt too); a branch at a
token offset starts from the prompt's cache and feeds its inherited prefix with its first chunk.
A chain whose cache was dropped (it finished, it was the least recently used past
``max_chains``, or :meth:`Capturing.reset`) is recomputed the same way from its prompt, so the
caches only ever save time. ``probe`` and ``judge`` pass straight through: they change neither
the chain nor its cache.

Prompts. The states are taken over ``chain.prompt_ids``, which every live generator fills. A
replayed bank leaves it empty: its prompts are rebuilt as annotate rebuilds them (the bank's
template and mode, :func:`~env.bank.annotate.prompt_ids`) and checked against the length the
bank recorded; for any other generator without prompt ids pass ``template``.

Numerics. In ``float32`` the states equal one full forward over prompt + chain to float rounding
(tested against llama.cpp's chains); in ``bfloat16`` (annotate's default) a chain fed chunk by
chunk rounds differently from annotate's one forward per chain, so live states match a bank's
to bfloat16 precision, not bit for bit. A Capturing is not thread-safe (one model, one set of
caches).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from env.bank.annotate import prompt_ids
from env.bank.hidden import HiddenManifest, hidden_manifest, reduce_states
from env.bank.identity import model_sha256
from env.generators.base import Generator, GeneratorWrapper, validate_count
from env.generators.prompts import PromptTemplate, get_template
from env.models.states import (
    Dtype,
    StateCapture,
    check_layers,
    default_layers,
    is_model_folder,
    load_tokenizer,
    model_shape,
    render_prompt_ids,
)
from env.types import (
    BudgetForcing,
    Chain,
    Chunk,
    PromptMode,
    Question,
    TipConfig,
)
from features.errors import ConfigError, GeneratorError, ModelError

__all__ = ["CaptureStats", "Capturing", "capture_from_manifest", "model_folder"]

_DTYPES = ("bfloat16", "float32")
#: Prompts whose KV cache is kept (a question's chains and branches share one).
_PROMPTS = 8

_PREPARE = (
    "`ponder model prepare --name NAME` writes a real model's folder (NAME-instruct/ beside "
    "NAME.gguf); the testbed's is models/testbed (`ponder testbed train`)"
)


def model_folder(model: str | os.PathLike[str]) -> Path:
    """The Hugging Face folder to capture with: ``model`` itself, or for a GGUF file the folder
    ``ponder model prepare`` converted beside it
    (:func:`~env.generators.llamacpp.find_tokenizer_folder`).

    Raises:
        ConfigError: no such folder, or not a Hugging Face model (``config.json`` and
            ``*.safetensors``); the message says what to run.
    """
    path = Path(model)
    if path.suffix == ".gguf":
        from env.generators.llamacpp import find_tokenizer_folder

        folder = find_tokenizer_folder(path)
        if folder is None or not is_model_folder(folder):
            raise ConfigError(
                f"no Hugging Face folder of {path} beside it to capture hidden states with: run "
                f"`ponder model prepare --name {path.stem}` without --gguf-only (it writes "
                f"{path.stem}-instruct/ next to the GGUF), or pass the folder itself"
            )
        return folder
    if not path.is_dir():
        raise ConfigError(
            f"no model folder at {path} to capture hidden states with: pass the Hugging Face "
            f"folder of the generating model ({_PREPARE})"
        )
    if not is_model_folder(path):
        raise ConfigError(
            f"{path} is not a Hugging Face model folder (it needs config.json and *.safetensors "
            f"weights): pass the folder of the generating model ({_PREPARE})"
        )
    return path


@dataclass(frozen=True, slots=True)
class CaptureStats:
    """What a :class:`Capturing` has computed since it was built."""

    forwards: int
    """transformers forward passes (prompts and chunks)"""
    tokens: int
    """tokens fed through them"""
    seconds: float
    """time spent in them and in the reduction"""


@dataclass(slots=True)
class _Prompt:
    """A prompt's KV cache and its last token's state (raw and reduced)."""

    cache: Any
    raw: np.ndarray
    state: np.ndarray


@dataclass(slots=True)
class _Run:
    """A chain's KV cache: the tokens it holds (prompt + chain so far)."""

    ids: list[int]
    cache: Any


class Capturing(GeneratorWrapper):
    """Wrap a generator so that its chains and chunks carry the model's hidden states.

    Args:
        inner: the generator (a live engine, the fake, or a replayed bank).
        model: the Hugging Face folder of the model ``inner`` runs, or its GGUF file (the folder
            ``ponder model prepare`` converted beside it is used).
        layers: layers to capture, 1..num_hidden_layers (layer L is the residual stream after L
            decoder layers; default: the middle one and the last, as annotate).
        dims: dimensions each state is projected to.
        seed: seed of the random projection.
        dtype: precision of the forward pass (``bfloat16``, annotate's default, or ``float32``).
        threads: torch CPU threads (default: all cores).
        template: for an ``inner`` whose chains carry no ``prompt_ids`` (other than a replayed
            bank, whose own template is used): the prompt template it renders with.
        max_chains: chains whose KV cache is kept (the least recently extended is dropped past
            it, and recomputed from its prompt if extended again).

    Raises:
        ConfigError: a missing or non-Hugging Face model folder, a layer the model lacks, dims
            outside 1..hidden_size, an unknown dtype.
        ModelError: a model transformers cannot load as a decoder with ``model.layers``.
    """

    def __init__(
        self,
        inner: Generator,
        model: str | os.PathLike[str],
        *,
        layers: Sequence[int] | None = None,
        dims: int = 128,
        seed: int = 0,
        dtype: Dtype = "bfloat16",
        threads: int | None = None,
        template: PromptTemplate | str | None = None,
        max_chains: int = 64,
    ) -> None:
        folder = model_folder(model)
        num_layers, hidden = model_shape(folder)
        chosen = check_layers(
            default_layers(num_layers) if layers is None else layers, num_layers, folder
        )
        if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= hidden:
            raise ConfigError(
                f"dims must be between 1 and the model's hidden size {hidden}, got {dims!r}"
            )
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        if threads is not None:
            validate_count(threads, "threads")
        self.inner = inner
        self.folder = folder
        self.layers = chosen
        self.dims = int(dims)
        self.seed = int(seed)
        self.template = get_template(template) if isinstance(template, str) else template
        self.max_chains = validate_count(max_chains, "max_chains")
        #: The capture's :class:`~env.bank.hidden.HiddenManifest` (``traits.hidden``).
        self.manifest: HiddenManifest = hidden_manifest(
            folder, chosen, dims=self.dims, seed=self.seed, dtype=dtype
        )
        # the inner generator's traits, with ``hidden`` the capture's manifest; not thread-safe
        self._traits = dataclasses.replace(inner.traits, hidden=self.manifest, thread_safe=False)
        self.capture = StateCapture(folder, chosen, dtype, threads)
        self._tokenizer: Any = None
        self._rendered: dict[tuple[str, str], tuple[int, ...]] = {}
        self._prompts: OrderedDict[tuple[int, ...], _Prompt] = OrderedDict()
        self._runs: OrderedDict[int, _Run] = OrderedDict()
        #: Per-token raw states of the last extend's chunks, for :meth:`split_chunk`.
        self._rows: dict[int, tuple[Chunk, np.ndarray]] = {}
        self._forwards = self._tokens = 0
        self._seconds = 0.0

    def __repr__(self) -> str:
        return (
            f"Capturing({self.inner!r}, {str(self.folder)!r}, layers={list(self.layers)}, "
            f"dims={self.dims})"
        )

    @property
    def stats(self) -> CaptureStats:
        """Forward passes, tokens and seconds the capture has cost so far."""
        return CaptureStats(self._forwards, self._tokens, self._seconds)

    @property
    def cached_chains(self) -> list[int]:
        """Ids of the chains whose KV cache is kept, least recently extended first."""
        return list(self._runs)

    # -- the Generator protocol, with states ---------------------------------------------------

    def reset(self, seed: int) -> None:
        """Reset the inner generator; drop every chain's cache (chain ids restart). Prompt caches
        stay: they are keyed by their tokens."""
        self.inner.reset(seed)
        self._runs.clear()
        self._rows.clear()

    def start(
        self,
        question: Question,
        n: int = 1,
        *,
        mode: PromptMode = "cot",
        budget: BudgetForcing | None = None,
    ) -> list[Chain]:
        chains = self.inner.start(question, n, mode=mode, budget=budget)
        self._give_prompt_states(chains)
        return chains

    def branch(self, chain: Chain, n: int = 1, *, at: int | None = None) -> list[Chain]:
        """The inner generator's branches, with the prompt's state; a branch's cache is built
        at its first extend (from the prompt's, feeding its inherited prefix)."""
        chains = self.inner.branch(chain, n, at=at)
        self._give_prompt_states(chains)
        return chains

    def extend(
        self, chains: Sequence[Chain], k: int, *, tip: TipConfig | None = None
    ) -> list[Chunk]:
        """The inner generator's chunks, each with the state after its last token.

        The chunks handed back (and left on the chains) are copies of the inner generator's
        with ``hidden`` set: a replayed bank's chunks are shared and never changed.
        """
        before = [len(c.chunks) for c in chains]
        got = self.inner.extend(chains, k, tip=tip)
        self._rows.clear()
        grown = [(c, n0) for c, n0 in zip(chains, before, strict=True) if len(c.chunks) > n0]
        if not grown:
            return got
        with self._timed():
            ends: list[np.ndarray] = []
            slots: list[tuple[Chain, int, np.ndarray]] = []
            for c, n0 in grown:
                for i, (rows, end) in enumerate(self._advance(c, n0)):
                    ends.append(end)
                    slots.append((c, n0 + i, rows))
            states = self._reduce(np.stack(ends))
        swapped: dict[int, Chunk] = {}
        for (c, i, rows), state in zip(slots, states, strict=True):
            old = c.chunks[i]
            new = dataclasses.replace(old, hidden=state)
            c.chunks[i] = new
            swapped[id(old)] = new
            self._rows[id(new)] = (new, rows)
        for c, _ in grown:
            if c.finished:
                self._runs.pop(c.chain_id, None)  # done: free its cache
        return [swapped.get(id(chunk), chunk) for chunk in got]

    def split_chunk(self, chunk: Chunk, k: int) -> list[Chunk]:
        """The inner generator's pieces, each with the state after its last token.

        Raises:
            GeneratorError: a chunk of another call than the last :meth:`extend` (its states
                are no longer kept).
        """
        pieces = self.inner.split_chunk(chunk, k)
        if len(pieces) <= 1 or chunk.hidden is None:
            return pieces
        kept = self._rows.get(id(chunk))
        if kept is None or kept[0] is not chunk:
            raise GeneratorError(
                "Capturing splits only the chunks of its last extend (it keeps their per-token "
                "states until the next one): split a chunk right after the extend that made it"
            )
        rows = kept[1]
        ends = np.cumsum([len(p) for p in pieces])
        with self._timed():
            states = self._reduce(rows[ends - 1])
        return [dataclasses.replace(p, hidden=s) for p, s in zip(pieces, states, strict=True)]

    # -- the states ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        import torch

        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                yield
        finally:
            self._seconds += time.perf_counter() - t0

    def _reduce(self, raw: np.ndarray) -> np.ndarray:
        reduced = reduce_states(raw, self.layers, seed=self.seed, dims=self.dims)
        return reduced.astype(np.float32)

    def _forward(self, ids: Sequence[int], cache: Any) -> np.ndarray:
        """Feed ``ids`` after what ``cache`` holds; their raw states ``[n, n_layers, hidden]``."""
        self.capture.forward(ids, cache)
        self._forwards += 1
        self._tokens += len(ids)
        return self.capture.rows(range(len(ids)))

    def _prompt_ids(self, chain: Chain) -> tuple[tuple[int, ...], bool]:
        """The chain's prompt token ids, and whether they were rebuilt here (not the chain's)."""
        if chain.prompt_ids:
            return tuple(int(t) for t in chain.prompt_ids), False
        key = (chain.question.text, chain.mode)
        ids = self._rendered.get(key)
        if ids is None:
            from env.generators.replay import ReplayGenerator

            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.folder)
            if self.template is not None:
                got = render_prompt_ids(self.template, chain.mode, key[0], self._tokenizer)
            elif isinstance(self.inner, ReplayGenerator):
                got = prompt_ids(self.inner.bank, key[0], self._tokenizer)
            else:
                raise ConfigError(
                    f"{type(self.inner).__name__} gives chains without prompt token ids: pass "
                    "Capturing(..., template=) the prompt template it renders with"
                )
            if not got:
                raise ConfigError(f"question {chain.question.qid!r} renders an empty prompt")
            ids = self._rendered[key] = tuple(got)
        return ids, True

    def _prompt(self, ids: tuple[int, ...]) -> _Prompt:
        p = self._prompts.pop(ids, None)
        if p is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.capture.base.config)
            raw = self._forward(ids, cache)[-1]
            p = _Prompt(cache=cache, raw=raw, state=self._reduce(raw))
        self._prompts[ids] = p  # the most recently used last
        while len(self._prompts) > _PROMPTS:
            self._prompts.popitem(last=False)
        return p

    def _give_prompt_states(self, chains: Sequence[Chain]) -> None:
        with self._timed():
            for c in chains:
                c.prompt_hidden = self._prompt(self._prompt_ids(c)[0]).state.copy()

    def _advance(self, chain: Chain, n0: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Feed the chain's chunks from ``n0`` on; per chunk, the raw states of its tokens
        ``[n, n_layers, hidden]`` and after its last token ``[n_layers, hidden]``."""
        ids, rendered = self._prompt_ids(chain)
        prompt = self._prompt(ids)
        n_prompt = len(ids)
        if rendered and n0 == 0 and not chain.prefix_ids:
            self._check_rendered(chain, n_prompt)
        full = [*ids, *chain.token_ids]
        new = chain.chunks[n0:]
        start = len(full) - n_prompt - sum(len(c) for c in new)  # chain tokens before them
        # Everything from the first new token on is fed; one token earlier where the first new
        # chunk is empty and its state (the previous token's) is not the prompt's.
        limit = n_prompt + start - (1 if start > 0 and len(new[0]) == 0 else 0)
        run = self._runs.pop(chain.chain_id, None)
        keep = 0
        if run is not None:
            keep = min(_common_prefix(run.ids, full), limit)
        if run is None or keep < n_prompt:
            run, keep = _Run(list(ids), copy.deepcopy(prompt.cache)), n_prompt
        if keep < len(run.ids):
            run.cache.crop(keep - len(run.ids))
        rows = self._forward(full[keep:], run.cache) if len(full) > keep else None
        run.ids = full
        self._runs[chain.chain_id] = run
        while len(self._runs) > self.max_chains:
            self._runs.popitem(last=False)

        def at(pos: int) -> np.ndarray:
            if pos == n_prompt - 1:
                return prompt.raw
            assert rows is not None and pos >= keep
            return rows[pos - keep]

        out: list[tuple[np.ndarray, np.ndarray]] = []
        a = n_prompt + start
        for c in new:
            b = a + len(c)
            chunk_rows = rows[a - keep : b - keep] if rows is not None else prompt.raw[None][:0]
            out.append((chunk_rows, at(b - 1)))
            a = b
        return out

    def _check_rendered(self, chain: Chain, n_prompt: int) -> None:
        """A rebuilt prompt must be as long as the one the chain's first chunk was computed
        after (``prefill + cached``), as annotate checks a bank."""
        u = chain.chunks[0].usage
        if u.prefill + u.cached not in (0, n_prompt):
            raise ConfigError(
                f"question {chain.question.qid!r}: the prompt rebuilt with the tokenizer of "
                f"{self.folder} has {n_prompt} tokens, but chain {chain.chain_id}'s first chunk "
                f"was computed after {u.prefill + u.cached}: the tokenizer or template differs "
                "from the generator's; capture with the folder of the model that generated it"
            )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def capture_from_manifest(
    inner: Generator,
    manifest: HiddenManifest,
    model: str | os.PathLike[str] | None = None,
    *,
    threads: int | None = None,
    template: PromptTemplate | str | None = None,
    max_chains: int = 64,
) -> Capturing:
    """A :class:`Capturing` whose states are those of an annotation (a bank's
    ``hidden/manifest.json``, or what a probe or policy was fitted on): the same model, layers,
    dims, projection seed and dtype, so a policy fitted on an annotated bank reads the same
    states live.

    Args:
        model: the model's Hugging Face folder (or GGUF file); default: the path the manifest
            records.

    Raises:
        ModelError: the folder holds another model than the manifest's (both sha256 named), or
            the settings would give other states (a numpy that draws other projections).
        ConfigError: an annotation not made by transformers with a Gaussian projection, or a
            model folder that is missing or not a Hugging Face folder.
    """
    if manifest.engine != "transformers" or manifest.projection.get("kind") != "gaussian":
        raise ConfigError(
            f"the hidden states were captured by {manifest.engine!r} with a "
            f"{manifest.projection.get('kind')!r} projection; live capture reproduces only "
            "transformers states with a Gaussian projection (ponder bank annotate's)"
        )
    recorded = str(manifest.model.get("path") or "")
    folder = model_folder(model if model is not None else recorded)
    sha = model_sha256(folder)
    want = str(manifest.model.get("sha256", ""))
    if sha != want:
        raise ModelError(
            f"{folder} holds another model (sha256 {sha[:12]}…) than the one the hidden states "
            f"were captured with: {manifest.model.get('name')!r} at {recorded} (sha256 "
            f"{want[:12]}…): pass the Hugging Face folder of that model"
        )
    live = hidden_manifest(
        folder, manifest.layers, dims=manifest.dims, seed=manifest.seed, dtype=manifest.dtype
    )
    diffs = [d for d in live.differences(manifest) if not d.startswith("bank id")]
    if diffs:
        raise ModelError(
            f"capturing with {folder} would give other states than the annotation's "
            f"({'; '.join(diffs)}; live vs annotated)"
        )
    return Capturing(
        inner,
        folder,
        layers=manifest.layers,
        dims=manifest.dims,
        seed=manifest.seed,
        dtype=manifest.dtype,  # type: ignore[arg-type]
        threads=threads,
        template=template,
        max_chains=max_chains,
    )
