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

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import numpy as np
import tyro

from env.bank.hidden import (
    HIDDEN_DIR,
    HiddenManifest,
    check_hidden_file,
    encode_hidden_file,
    hidden_file,
    hidden_file_identity,
    hidden_manifest,
    main_boundaries,
    read_hidden_file,
    reduce_states,
    tokens_sha256,
)
from env.bank.identity import model_sha256
from env.bank.lock import BankLock
from env.bank.store import TraceBank, read_question_file
from env.bank.writer import atomic_write_bytes
from env.models.states import (
    Dtype,
    StateCapture,
    capture_states,
    check_layers,
    default_layers,
    is_model_folder,
    load_tokenizer,
    model_shape,
    render_prompt_ids,
)
from features.errors import BankError, ConfigError, ModelError

if TYPE_CHECKING:
    from env.bank.store import QuestionTrace
    from env.types import PromptMode

__all__ = [
    "AnnotateArgs",
    "AnnotateReport",
    "annotate",
    "main",
    "prompt_ids",
    "resolve_model",
]

log = logging.getLogger(__name__)


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


# -- the bank side ---------------------------------------------------------------------------


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
