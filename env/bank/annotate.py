"""``ponder bank annotate PATH``: add the generating model's hidden states to a recorded bank.

The bank is not regenerated: its chains' token ids are fed back through the model with
transformers, and the residual stream at the chosen layers is kept at the prompt's last token and
at every main chunk's last token, reduced by a seeded random projection and stored under
``PATH/hidden/`` (format and reduction: :mod:`env.bank.hidden`).

How. The model is the bank's own Hugging Face folder, or for a bank recorded from a GGUF file the
dequantised folder beside it (``ponder model prepare`` writes both), loaded only as deep as the
deepest layer asked for (deeper layers cost nothing), with a forward hook on each captured
layer. Per question the prompt is rebuilt from the manifest's template and mode exactly as the
recorder rendered it, checked against the bank (each chain's first chunk computed
``prefill + cached`` prompt tokens: they must be the rebuilt prompt's length), run once, and its
KV cache reused for every chain (cropped back to the prompt after each). Only main chunks are fed:
extension chunks are not annotated.

Resumable like ``ponder record``: each question's file is written atomically, a rerun of the same
command skips the questions whose file is complete and valid (a damaged one is refused by name,
never overwritten), and a resumed run equals an uninterrupted one bit for bit at the same dtype
and thread count. Resuming with another model or other layers, dims, seed or dtype is refused
with the differences named. One annotator per bank: it holds ``hidden/bank.lock``
(:class:`~env.bank.lock.BankLock`); it only reads the bank's own files, which are replaced
atomically, so it may run beside ``ponder record`` (it annotates the questions recorded when it
started).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import numpy as np
import tyro

from env.bank.hidden import (
    HIDDEN_DIR,
    HiddenManifest,
    check_hidden_file,
    encode_hidden_file,
    hidden_file,
    hidden_file_identity,
    main_boundaries,
    projection_sha256,
    read_hidden_file,
    reduce_states,
    tokens_sha256,
)
from env.bank.identity import model_sha256
from env.bank.lock import BankLock
from env.bank.store import TraceBank, read_question_file
from env.bank.writer import atomic_write_bytes
from features.errors import BankError, ConfigError, ModelError

if TYPE_CHECKING:
    from env.bank.store import QuestionTrace
    from env.generators.backend import HFTokenizer
    from env.generators.prompts import PromptTemplate
    from env.types import PromptMode

__all__ = [
    "AnnotateArgs",
    "AnnotateReport",
    "StateCapture",
    "annotate",
    "capture_states",
    "check_layers",
    "default_layers",
    "hidden_manifest",
    "is_model_folder",
    "load_tokenizer",
    "main",
    "model_name",
    "model_shape",
    "prompt_ids",
    "render_prompt_ids",
    "resolve_model",
]

log = logging.getLogger(__name__)

Dtype = Literal["bfloat16", "float32"]


@dataclass
class AnnotateArgs:
    """Add the generating model's hidden states (residual stream at chosen layers, at the
    prompt's end and every main chunk boundary, randomly projected, float16) to a recorded bank,
    under PATH/hidden/. Resumable: rerun the same command to continue."""

    path: Annotated[Path, tyro.conf.Positional]
    """bank folder"""
    model: Path | None = None
    """Hugging Face folder of the bank's model (default: the bank's own, or the one beside its GGUF)"""
    layers: tuple[int, ...] | None = None
    """layers to capture: L is the residual stream after L decoder layers (default: middle and last)"""
    dims: int = 128
    """dimensions each state is projected to"""
    seed: int = 0
    """seed of the random projection"""
    dtype: Dtype = "bfloat16"
    """precision of the forward pass"""
    threads: int | None = None
    """CPU threads for torch (default: all cores; a resumed run is bit-identical at the same count)"""
    limit: int | None = None
    """annotate at most this many more questions, then stop"""
    progress: bool = True
    """show a progress bar"""
    ray: str = ""
    """annotate on a Ray cluster (pip install -e '.[ray]'): local, auto or a cluster address; --ray-workers actors each load the model and compute questions' states, this process writes each file once (the nodes must see the bank and the model)"""
    ray_workers: int = 2
    """Ray actors (each takes --threads CPUs, default 1 on Ray)"""


@dataclass(frozen=True)
class AnnotateReport:
    """What :func:`annotate` did."""

    annotated: int
    """questions annotated by this run"""
    already: int
    """questions that were annotated before (skipped)"""
    recorded: int
    """questions recorded in the bank"""
    tokens: int
    """tokens fed through the model by this run (prompts plus main chains)"""
    seconds: float
    """time spent on those questions (model loading excluded)"""
    bytes: int
    """bytes written for them"""
    load_seconds: float = 0.0
    """time spent loading the model"""

    @property
    def remaining(self) -> int:
        return self.recorded - self.already - self.annotated


# -- the model -------------------------------------------------------------------------------


def resolve_model(bank: TraceBank, given: Path | None = None) -> Path:
    """The Hugging Face folder to annotate ``bank`` with.

    ``given`` if set; otherwise the bank's model folder, or for a bank recorded from a GGUF
    file the folder :func:`~env.generators.llamacpp.find_tokenizer_folder` finds beside it (or
    ``models/<name>-instruct``). A relative path in the manifest is looked up from the current
    folder, then from each folder above the bank.
    """
    if given is not None:
        if not (given / "config.json").is_file():
            raise ModelError(
                f"{given} is not a Hugging Face model folder (no config.json): pass --model with "
                "the folder of the model the bank was recorded with"
            )
        return given
    from env.generators.llamacpp import find_tokenizer_folder

    m = bank.manifest.model
    bases = [Path.cwd(), *bank.path.resolve().parents]

    def places(p: Path) -> list[Path]:
        return [p] if p.is_absolute() else [b / p for b in bases]

    recorded = Path(m["path"]) if m.get("path") else None
    candidates: list[Path] = []
    if m.get("engine") == "llama.cpp" or (recorded is not None and recorded.suffix == ".gguf"):
        for g in places(recorded) if recorded is not None else []:
            folder = find_tokenizer_folder(g)
            if folder is not None:
                candidates.append(folder)
        if m.get("name"):
            candidates += places(Path("models") / f"{m['name']}-instruct")
    elif recorded is not None:
        candidates += places(recorded)
    for c in candidates:
        if is_model_folder(c):
            return c
    raise ModelError(
        f"no Hugging Face folder of the bank's model {m.get('name')!r} ({m.get('path')}) was "
        "found: pass --model with it (`ponder model prepare` writes it beside a GGUF file)"
    )


def is_model_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a Hugging Face model: a ``config.json`` and safetensors weights."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def model_shape(folder: Path) -> tuple[int, int]:
    """``(num_hidden_layers, hidden_size)`` from the folder's ``config.json``."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{folder / 'config.json'} cannot be read ({e})") from e
    cfg = cfg.get("text_config", cfg)
    try:
        return int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    except KeyError as e:
        raise ModelError(f"{folder / 'config.json'} has no {e.args[0]!r}") from e


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The middle layer and the last (14 and 28 for Qwen2.5-1.5B, 2 and 4 for the testbed)."""
    return tuple(sorted({max(1, num_layers // 2), num_layers}))


def check_layers(layers: Sequence[int], num_layers: int, folder: Path) -> tuple[int, ...]:
    """``layers`` sorted and deduplicated.

    Raises:
        ConfigError: none given, or one the model in ``folder`` (``num_layers`` layers) lacks.
    """
    out = tuple(sorted(set(int(x) for x in layers)))
    bad = [x for x in out if not 1 <= x <= num_layers]
    if not out or bad:
        raise ConfigError(
            f"layer(s) {bad or list(layers)} are not in {folder}: the model has {num_layers} "
            f"layers; choose layers 1..{num_layers} (layer L is the residual stream after L "
            "decoder layers)"
        )
    return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (it lists every skipped deeper layer) and bars."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = not transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if not bars:
            transformers.utils.logging.enable_progress_bar()


class StateCapture:
    """The model in transformers, loaded only as deep as the deepest captured layer, with a
    forward hook on each captured layer's output (the un-normed residual stream).

    Args:
        folder: Hugging Face model folder.
        layers: layers to capture, 1..num_hidden_layers.
        dtype: ``bfloat16`` or ``float32``.
        threads: torch CPU threads (default: all cores).
    """

    def __init__(
        self, folder: Path, layers: Sequence[int], dtype: Dtype, threads: int | None = None
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.set_num_threads(threads or os.cpu_count() or 1)
        num_layers, self.hidden_size = model_shape(folder)
        self.layers = check_layers(layers, num_layers, folder)
        deepest = max(self.layers)
        config = AutoConfig.from_pretrained(folder)
        text = getattr(config, "text_config", config)
        # Build the model with only the layers needed: the deeper ones are never loaded.
        text.num_hidden_layers = deepest
        if getattr(text, "layer_types", None):
            text.layer_types = list(text.layer_types)[:deepest]
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                folder, config=config, dtype=getattr(torch, dtype)
            )
        model.eval()
        base = getattr(model, "model", None)
        if base is None or len(getattr(base, "layers", ())) != deepest:
            raise ModelError(
                f"{folder} is not a decoder model with `model.layers` (a {type(model).__name__}): "
                "ponder bank annotate supports Llama- and Qwen2-style models"
            )
        self.base = base
        self._out: dict[int, Any] = {}
        for layer in self.layers:
            base.layers[layer - 1].register_forward_hook(self._hook(layer))

    def _hook(self, layer: int) -> Any:
        def keep(module: Any, args: Any, out: Any) -> None:
            self._out[layer] = out[0] if isinstance(out, tuple) else out

        return keep

    def rows(self, positions: Sequence[int]) -> np.ndarray:
        """The last forward's states at ``positions``: float32 ``[n, n_layers, hidden]``."""
        import torch

        idx = torch.tensor(list(positions), dtype=torch.long)
        rows = torch.stack([self._out[layer][0, idx] for layer in self.layers], dim=1)
        return cast(np.ndarray, rows.float().numpy())

    def forward(self, ids: Sequence[int], cache: Any) -> None:
        import torch

        self.base(input_ids=torch.tensor([list(ids)]), past_key_values=cache, use_cache=True)


def capture_states(
    capture: StateCapture,
    prompt: Sequence[int],
    chains: Sequence[Sequence[int]],
    ends: Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray]:
    """Raw states of one question, float32: the prompt's last token ``[n_layers, hidden]`` and
    each boundary ``[n, n_layers, hidden]`` (chain by chain, in the order of ``ends``).

    The prompt runs once; its KV cache serves every chain and is cropped back after each.
    ``ends[c]`` lists, per boundary of chain ``c``, how many of its tokens precede the boundary
    and include it (0: the boundary is the prompt's last token).
    """
    import torch
    from transformers import DynamicCache

    n_prompt = len(prompt)
    if n_prompt == 0:
        raise ConfigError("an empty prompt has no last token to capture")
    out: list[np.ndarray] = []
    with torch.inference_mode():
        cache = DynamicCache(config=capture.base.config)
        capture.forward(prompt, cache)
        prompt_state = capture.rows([n_prompt - 1])[0]
        for ids, chain_ends in zip(chains, ends, strict=True):
            if not chain_ends:
                continue
            if max(chain_ends) > len(ids):
                raise ValueError(f"a boundary at {max(chain_ends)} in a chain of {len(ids)}")
            states = np.broadcast_to(prompt_state, (len(chain_ends), *prompt_state.shape))
            if ids:
                capture.forward(ids, cache)
                states = capture.rows([max(e - 1, 0) for e in chain_ends])
                cache.crop(-len(ids))  # back to the prompt: the next chain reuses it
            out += [prompt_state if e == 0 else states[j] for j, e in enumerate(chain_ends)]
    boundary = np.stack(out) if out else np.zeros((0, *prompt_state.shape), np.float32)
    return prompt_state, boundary


# -- the bank side ---------------------------------------------------------------------------


def _apply_chat(tokenizer: Any) -> Any:
    def apply(messages: list[dict[str, str]]) -> str:
        out = tokenizer.apply_chat(messages)
        if out is None:
            raise ConfigError("the bank's template needs a chat template, the tokenizer has none")
        return cast(str, out)

    return apply


def prompt_ids(bank: TraceBank, question_text: str, tokenizer: Any) -> list[int]:
    """The prompt's token ids exactly as the recorder rendered them: the manifest's template
    and mode over the question text, through ``tokenizer`` (an
    :class:`~env.generators.backend.HFTokenizer`), no special tokens added."""
    from env.generators.prompts import get_template

    m = bank.manifest
    template = get_template(m.template)
    if m.prompts and m.prompts != template.prompt_texts():
        changed = sorted(
            k
            for k in m.prompts.keys() | template.prompt_texts().keys()
            if m.prompts.get(k) != template.prompt_texts().get(k)
        )
        raise ConfigError(
            f"{bank.path / 'manifest.json'} was recorded with other wording of template "
            f"{m.template!r} than this ponder's ({changed}): the prompts cannot be rebuilt; "
            "annotate with the ponder version that recorded the bank"
        )
    return render_prompt_ids(template, cast("PromptMode", m.mode), question_text, tokenizer)


def render_prompt_ids(
    template: PromptTemplate, mode: PromptMode, question_text: str, tokenizer: Any
) -> list[int]:
    """The prompt's token ids as a live generator renders them: ``template`` in ``mode`` over
    the question text, through ``tokenizer`` (an :class:`~env.generators.backend.HFTokenizer`),
    no special tokens added."""
    text = template.question_prompt(
        question_text, mode, _apply_chat(tokenizer) if template.chat else None
    )
    return list(tokenizer.encode(text))


def load_tokenizer(folder: Path) -> HFTokenizer:
    """The tokenizer of a Hugging Face model folder, as the generators' backends wrap it."""
    from transformers import AutoTokenizer

    from env.generators.backend import HFTokenizer

    tokenizer = HFTokenizer()
    tokenizer.tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer


def _chains(qt: QuestionTrace, path: Path) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    """Each chain's main token ids, its boundary ends, and the ``chain_chunk`` index."""
    ids: list[list[int]] = []
    ends: list[list[int]] = []
    index: list[tuple[int, int]] = []
    for c in qt.chains:
        try:
            chain_ids, chain_ends = main_boundaries(c.rows)
        except ValueError as e:
            raise BankError(
                f"{path}: chain {c.chain} of {qt.question.qid!r} is inconsistent ({e}): the "
                "file is damaged; move it away and re-run `ponder record`"
            ) from e
        ids.append(chain_ids)
        ends.append(chain_ends)
        index += [
            (c.chain, k) for k, e in zip(c.rows["chunk"], c.rows["ext"], strict=True) if not e
        ]
    return ids, ends, np.asarray(index, dtype=np.int32).reshape(-1, 2)


def _question(bank: TraceBank, index: int, qid: str) -> QuestionTrace:
    """A question's chains, read and checked without filling the bank's cache (an annotation
    pass visits every question once)."""
    return read_question_file(bank.chunk_file(index), bank.question(qid), bank.manifest)


def _check_prompt(qt: QuestionTrace, n_prompt: int, folder: Path, bank: TraceBank) -> None:
    """Every chain's first chunk computed the prompt: its ``prefill + cached`` is its length."""
    for c in qt.chains:
        first = int(np.argmin(c.rows["chunk"]))
        seen = int(c.rows["prefill"][first]) + int(c.rows["cached"][first])
        if seen != n_prompt:
            m = bank.manifest
            raise BankError(
                f"question {qt.question.qid!r}: the prompt rebuilt from template {m.template!r} "
                f"(mode {m.mode!r}) with the tokenizer of {folder} has {n_prompt} tokens, but "
                f"chain {c.chain} was recorded after a prompt of {seen} tokens: the tokenizer or "
                "chat template differs from the recording's. Nothing was written for it; pass "
                "--model with the Hugging Face folder of the model that recorded the bank"
            )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def model_name(folder: Path) -> str:
    """The model's name as an annotation records it: ``ponder_model.json``'s, else the folder's."""
    name = folder.name
    with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
        name = json.loads((folder / "ponder_model.json").read_text()).get("name", name)
    return str(name)


def hidden_manifest(
    folder: Path,
    layers: Sequence[int],
    *,
    dims: int,
    seed: int,
    dtype: str,
    sha: str | None = None,
    bank_id: str = "",
    bank_model_sha256: str = "",
) -> HiddenManifest:
    """The (fingerprinted) :class:`~env.bank.hidden.HiddenManifest` of a capture with these
    settings by the transformers model in ``folder`` (``sha``: its
    :func:`~env.bank.identity.model_sha256`, computed if not given). ``layers`` are taken as
    checked (:func:`check_layers`)."""
    num_layers, hidden = model_shape(folder)
    return HiddenManifest(
        engine="transformers",
        model={
            "name": model_name(folder),
            "path": str(folder),
            "sha256": sha if sha is not None else model_sha256(folder),
            "num_layers": num_layers,
            "hidden_size": hidden,
        },
        bank_id=bank_id,
        bank_model_sha256=bank_model_sha256,
        dtype=dtype,
        layers=list(layers),
        dims=int(dims),
        projection={
            "kind": "gaussian",
            "seed": int(seed),
            "sha256": projection_sha256(seed, layers, hidden, dims),
        },
        ponder_version=_version("ponder"),
        transformers_version=_version("transformers"),
        torch_version=_version("torch"),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    ).fingerprinted()


def _open_manifest(root: Path, want: HiddenManifest) -> HiddenManifest:
    """The annotation's manifest: written if new, else checked against this run's settings."""
    mpath = root / HIDDEN_DIR / "manifest.json"
    if not mpath.exists():
        atomic_write_bytes(mpath, want.to_json().encode())
        return want
    old = HiddenManifest.load(mpath)
    diffs = old.differences(want)
    if diffs:
        again = (
            f"ponder bank annotate {root} --model {old.model.get('path')} --layers "
            f"{' '.join(map(str, old.layers))} --dims {old.dims} --seed {old.seed} --dtype "
            f"{old.dtype}"
        )
        raise BankError(
            f"{root / HIDDEN_DIR} was annotated with other settings than this run's "
            f"({'; '.join(diffs)}; stored vs asked). Nothing was changed. To resume, run `{again}`; "
            f"to annotate afresh with the new settings, delete {root / HIDDEN_DIR} first"
        )
    return old


def _check_done(
    path: Path, manifest: HiddenManifest, qt: QuestionTrace, chain_chunk: np.ndarray, tokens: str
) -> None:
    """Refuse an existing hidden file that is damaged or not of this question's chains."""
    f = read_hidden_file(path, len(manifest.layers), manifest.dims)
    check_hidden_file(path, f, manifest, qt.question)
    if f.metadata.get("tokens_sha256") != tokens or not np.array_equal(f.chain_chunk, chain_chunk):
        raise BankError(
            f"{path} was computed from other chains than the bank now holds for "
            f"{qt.question.qid!r} (the question was re-recorded after it was annotated): "
            f"delete it and re-run `ponder bank annotate {path.parent.parent}`"
        )


@dataclass(frozen=True)
class _Spec:
    """What computing a question's states needs (sent to Ray actors as is)."""

    bank: str
    folder: str
    layers: tuple[int, ...]
    dtype: Dtype
    threads: int | None
    seed: int
    dims: int


class AnnotateWorker:
    """The model loaded once; :meth:`annotate` computes one question's hidden-state file (in
    this process, or in a Ray actor: :mod:`env.bank.ray_annotate`)."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.bank = TraceBank(spec.bank)
        self.folder = Path(spec.folder)
        self.tokenizer = load_tokenizer(self.folder)
        self.capture = StateCapture(self.folder, spec.layers, spec.dtype, spec.threads)

    def annotate(self, i: int, qid: str, manifest: HiddenManifest) -> tuple[bytes, int]:
        """Question ``i``'s file (its bytes) and the tokens it read."""
        s, bank = self.spec, self.bank
        qt = _question(bank, i, qid)
        ids, ends, chain_chunk = _chains(qt, bank.chunk_file(i))
        prompt = prompt_ids(bank, qt.question.text, self.tokenizer)
        _check_prompt(qt, len(prompt), self.folder, bank)
        raw_prompt, raw_boundary = capture_states(self.capture, prompt, ids, ends)
        data = encode_hidden_file(
            reduce_states(raw_prompt, s.layers, seed=s.seed, dims=s.dims),
            reduce_states(raw_boundary, s.layers, seed=s.seed, dims=s.dims),
            chain_chunk,
            hidden_file_identity(qid, qt.question, manifest, ids),
        )
        return data, len(prompt) + sum(len(c) for c in ids)


def annotate(args: AnnotateArgs) -> AnnotateReport:
    """Annotate the bank at ``args.path`` (see the module docstring); returns what was done."""
    bank = TraceBank(args.path)
    root = bank.path
    folder = resolve_model(bank, args.model)
    num_layers, hidden = model_shape(folder)
    layers = check_layers(args.layers or default_layers(num_layers), num_layers, folder)
    if not 1 <= args.dims <= hidden:
        raise ConfigError(f"--dims must be between 1 and the model's hidden size {hidden}")
    if args.limit is not None and args.limit < 0:
        raise ConfigError("--limit must be >= 0")
    if args.ray:
        from env.ray_cluster import check_ray

        if args.ray_workers < 1:
            raise ConfigError("--ray-workers must be >= 1")
        check_ray(args.ray)
    sha = model_sha256(folder)
    if bank.manifest.model.get("engine") != "llama.cpp" and sha != bank.manifest.model.get(
        "sha256"
    ):
        log.warning(
            "%s is not the model the bank was recorded with (sha256 %s vs %s)",
            folder,
            sha[:12],
            str(bank.manifest.model.get("sha256"))[:12],
        )
    want = hidden_manifest(
        folder,
        layers,
        dims=args.dims,
        seed=args.seed,
        dtype=args.dtype,
        sha=sha,
        bank_id=bank.manifest.bank_id,
        bank_model_sha256=bank.manifest.model.get("sha256", ""),
    )

    with BankLock(root / HIDDEN_DIR, "ponder bank annotate"):
        manifest = _open_manifest(root, want)
        for stale in (root / HIDDEN_DIR).glob("*.tmp"):
            stale.unlink()  # a write interrupted before its rename: never a complete file
        todo: list[tuple[int, str]] = []
        already = 0
        for i, qid in enumerate(bank.manifest.questions):
            if qid not in bank:
                continue
            path = hidden_file(root, i)
            if path.exists():
                qt = _question(bank, i, qid)
                ids, _, chain_chunk = _chains(qt, bank.chunk_file(i))
                _check_done(path, manifest, qt, chain_chunk, tokens_sha256(ids))
                already += 1
            else:
                todo.append((i, qid))
        if args.limit is not None:
            todo = todo[: args.limit]
        if not todo:
            return AnnotateReport(0, already, len(bank), 0, 0.0, 0)

        t0 = time.perf_counter()
        spec = _Spec(str(root), str(folder), layers, args.dtype, args.threads, args.seed, args.dims)
        load_seconds = 0.0
        tokens = written = done = 0
        bar = _bar(len(todo), args.progress)

        def write(i: int, data: bytes, n_tokens: int) -> None:
            nonlocal tokens, written, done
            path = hidden_file(root, i)
            if path.exists():  # (a retried Ray task never writes a question twice)
                return
            atomic_write_bytes(path, data)
            done += 1
            written += len(data)
            tokens += n_tokens
            if bar is not None:
                bar.update(1)
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")

        try:
            if args.ray:
                from env.bank.ray_annotate import annotate_on_ray

                load_seconds = annotate_on_ray(spec, todo, manifest, args, write)
            else:
                worker = AnnotateWorker(spec)
                load_seconds = time.perf_counter() - t0
                for i, qid in todo:
                    write(i, *worker.annotate(i, qid, manifest))
        finally:
            if bar is not None:
                bar.close()
        return AnnotateReport(
            annotated=done,
            already=already,
            recorded=len(bank),
            tokens=tokens,
            seconds=time.perf_counter() - t0,
            bytes=written,
            load_seconds=load_seconds,
        )


def _bar(total: int, show: bool) -> Any:
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="q", desc="annotate", smoothing=0.1)


def main(argv: list[str] | None = None) -> None:
    """``ponder bank annotate``."""
    args = tyro.cli(AnnotateArgs, args=argv, prog="ponder bank annotate")
    r = annotate(args)
    total = r.already + r.annotated
    if r.annotated:
        rate = 1000 * r.seconds / max(r.tokens, 1)
        print(
            f"{args.path}: annotated {r.annotated} question(s), {r.tokens} tokens in "
            f"{r.seconds:.1f} s ({rate:.1f} s per 1k tokens; model loaded in "
            f"{r.load_seconds:.1f} s), {r.bytes / r.annotated / 1e3:.1f} KB per question; "
            f"{total}/{r.recorded} annotated"
        )
    else:
        print(f"{args.path}: nothing to do; {total}/{r.recorded} questions annotated")


if __name__ == "__main__":
    main()
