"""``ponder record``: sample K chains per question once, with probes and verifier scores, into a bank.

For each question the recorder samples ``chains`` independent chains in chunks of
``chunk_tokens`` tokens up to ``max_tokens``. At every chunk boundary it records an answer-forcing
probe and the generative self-verifier's P(yes). A chain that ends before the cap also gets a
budget-forced extension (``Wait,`` appended, ``extension_chunks`` more chunks with their probes), so
that replay can serve "continue" past a chain's natural end (s1-style serial scaling).

Recording is resumable and exact: questions already in the bank are skipped, each question is
written atomically, and before each question the engine's prefix cache is cleared and its sampler
reseeded from ``seed`` and the question id. With the in-process vLLM generator an interrupted and
resumed recording therefore equals an uninterrupted one. ``--model X.gguf`` records with llama.cpp
instead (about twice vLLM's float32 speed on a CPU; seeded per request, see :mod:`env.bank.schema`).
``--questions-at-once N`` records N consecutive questions side by side, their chains in one engine
batch (faster on an engine whose throughput grows with the batch, as vLLM's does on a CPU); the
group is reseeded once from its questions' ids and noted in each file (:func:`groups_of`,
:func:`~env.bank.sampler.record_group_as`), so resuming is exact as well. ``--group-size G`` (G > N) keeps the batch
full: a group of G questions, N of them at once, the next starting as soon as a question ends.
How the chains are sampled is :mod:`env.bank.sampler`'s; this module is the command: its
arguments, the engine, the questions, their groups and the files. One recorder at a time: a run holds the folder's :class:`~env.bank.lock.BankLock` throughout, and
a second one on the same folder is refused with the first one named.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from env.bank.identity import model_sha256
from env.bank.lock import BankLock
from env.bank.manifest import BankManifest
from env.bank.sampler import record_group_as
from env.bank.writer import BankWriter
from env.generators.base import Generator
from env.types import CODE_DATASETS, Question
from features.errors import ConfigError

__all__ = [
    "RecordArgs",
    "bank_manifest",
    "describe_generator",
    "make_generator",
    "questions_of",
    "record",
    "groups_of",
    "group_size",
    "split_counts",
]


log = logging.getLogger(__name__)


@dataclass
class RecordArgs:
    """Record a trace bank: K chains per question with probes and verifier scores."""

    out: Path
    """bank folder to create or resume"""
    model: str = ""
    """model folder for the in-process vLLM engine (default: the testbed model), or a `.gguf` file
    for the in-process llama.cpp engine (about twice as fast on a CPU); `fake` records from the
    scripted fake generator (for testing the recorder itself)"""
    url: str = ""
    """instead of --model: base URL of a vLLM OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1)"""
    dataset: Literal["arith", "gsm8k", "math500", "humaneval", "factual"] = "arith"
    """question set (humaneval: code, graded by running it, see env.code; its chains are read and run at every boundary instead of probed and judged by the model)"""
    splits: tuple[str, ...] = ("test",)
    """splits to draw from; several are interleaved so a partial bank stays balanced"""
    n: int = 16
    """questions per split (for arith: rounded up to a multiple of 8 levels)"""
    split_n: tuple[str, ...] = ()
    """per-split counts that override --n, as SPLIT=N (e.g. train=400 test=200); the splits stay interleaved, so raising one split's count of gsm8k or math500 appends its questions after the ones recorded (a recorded bank grows by resuming; arith's draws are stratified by level, so a larger arith draw reorders and is refused)"""
    question_seed: int = 0
    """seed of the question subset"""
    template: str = ""
    """prompt template: testbed, chat, code, factual, reasoning or testbed-reasoning (default: chat if the model has a chat template; a template with a thinking section is recorded s1-style: the README, "Reasoning models")"""
    mode: Literal["cot", "draft"] = "cot"
    """prompt mode"""
    chains: int = 16
    """chains per question (K)"""
    chunk_tokens: int = 64
    """tokens per chunk (T)"""
    max_tokens: int = 512
    """token cap per chain"""
    temperature: float = 0.7
    """sampling temperature"""
    top_p: float = 1.0
    """nucleus sampling mass"""
    top_logprobs: int = 5
    """top log-probabilities kept per token for the confidence statistics"""
    extension_chunks: int = 2
    """budget-forced chunks recorded after a chain's natural end (0: none)"""
    probe_tokens: int = 16
    """tokens a probe may read"""
    judge: bool = True
    """record the self-verifier's P(yes) at every boundary"""
    seed: int = 0
    """recording seed"""
    limit_minutes: float = 0.0
    """stop after the question (or group: --questions-at-once, --group-size) in progress once this many minutes have passed (0: no limit)"""
    kv_cache_gib: float = 2.0
    """vLLM CPU KV cache size"""
    dtype: str = ""
    """vLLM weight dtype (auto, bfloat16, float32; default: float32 on CPU, auto on GPU)"""
    max_model_len: int = 0
    """context length per chain (0: the model's own, capped at 4096 for vLLM, 2048 for llama.cpp)"""
    slots: int = 0
    """llama.cpp parallel slots (0: one per chain of the questions recorded at once)"""
    threads: int = 0
    """llama.cpp CPU threads (0: all cores)"""
    questions_at_once: int = 1
    """questions whose chains share the engine's batch (vLLM on a CPU samples more tokens a second in a larger batch, and one question's last long chains share their steps with the others'); with a larger --group-size the next question of the group starts as soon as there is room for its chains, so the batch stays full; 1: each question alone, from its own seed"""
    group_size: int = 0
    """questions sampled from one seed (0: --questions-at-once): groups of this many consecutive questions of the bank's order, from a seed drawn from their ids and noted in each file (`ponder.sampling`), so that a resumed run records the same groups and chains; an interrupted group is recorded whole again and only its missing files written"""
    fake_token_ms: float = 0.0
    """--model fake only: milliseconds per generated token, standing in for an engine's speed (benchmarks, tests)"""
    ray: str = ""
    """record on a Ray cluster (pip install -e '.[ray]'): `local` starts one on this machine, `auto` joins the one running here, `ray://HOST:10001` a remote one; questions are spread over --ray-workers actors, each with its own generator, and the driver writes each question's file once (empty: no Ray)"""
    ray_workers: int = 2
    """Ray actors recording side by side (each takes one CPU, or --ray-gpus)"""
    ray_gpus: float = 0.0
    """GPUs each Ray actor takes (an in-process vLLM engine per GPU)"""


def group_size(args: RecordArgs) -> int:
    """The questions ``args`` samples from one seed: ``--group-size``, or ``--questions-at-once``."""
    return args.group_size or args.questions_at_once


def groups_of(n_questions: int, size: int, done: Callable[[int], bool]) -> list[list[int]]:
    """The groups ``ponder record --questions-at-once size`` records, as question positions:
    consecutive runs of ``size`` in the bank's order (the last may be shorter), those with a
    question still to record. A group is fixed by position, not by what is left, so a resumed
    run records the same groups (with the same seeds) as an uninterrupted one; a group of which
    some files exist (written before an interruption, or alone before the size was raised) is
    recorded whole again and only its missing files are written (with a warning saying what that
    costs: every recorder, in process or on Ray, takes its groups from here)."""
    if size < 1:
        raise ConfigError(f"--questions-at-once must be at least 1, got {size}")
    out = []
    for lo in range(0, n_questions, size):
        group = list(range(lo, min(lo + size, n_questions)))
        recorded = [done(i) for i in group]
        if not all(recorded):
            _warn_redone(group, recorded)
            out.append(group)
    return out


def _warn_redone(group: list[int], recorded: list[bool]) -> None:
    """Say so when part of ``group`` is recorded already (``recorded[k]``: its k-th question):
    it is sampled whole again."""
    redone = sum(recorded)
    if not redone:
        return
    first = group[recorded.index(False)]
    skip = ""
    if redone == first - group[0]:  # the recorded ones lead the group: a smaller size skips them
        fits = next(d for d in range(len(group), 0, -1) if first % d == 0)
        skip = (
            f"; if they were written with another group size, a --group-size that divides "
            f"{first} (e.g. {fits}) skips them instead"
        )
    log.warning(
        "questions %d-%d are one group of which %d are recorded already: the group is sampled "
        "whole again from its seed (its chains share the batch), so those %d questions' chains "
        "are generated again and dropped, about %.0f%% of the group's time (that is how an "
        "interrupted group resumes exactly)%s",
        group[0],
        group[-1],
        redone,
        redone,
        100 * redone / len(group),
        skip,
    )


def _chat_template(args: RecordArgs) -> str:
    """The chat template a data set's questions are asked with by default."""
    if args.dataset in CODE_DATASETS:
        return "code"
    return "factual" if args.dataset == "factual" else "chat"


def make_generator(args: RecordArgs):  # type: ignore[no-untyped-def]
    from env.types import SamplingConfig

    sampling = SamplingConfig(
        temperature=args.temperature,
        top_p=args.top_p,
        top_logprobs=args.top_logprobs,
        max_chain_tokens=args.max_tokens,
    )
    if args.model == "fake":
        from env.generators.fake import FakeGenerator

        extra: dict[str, Any] = {}
        if args.dataset in CODE_DATASETS:  # it writes each task's reference solution
            from env.code.reference import reference_script

            extra = {"script": reference_script(), "template": "code", "chat": True}
        elif args.template:
            extra = {"template": args.template}
        fake = FakeGenerator(
            sampling=sampling, seed=args.seed, token_delay_s=args.fake_token_ms / 1000, **extra
        )
        return fake, {
            "name": "fake",
            "path": "",
            "sha256": "fake",
        }
    if args.url:
        from env.generators.openai import OpenAIGenerator

        gen = OpenAIGenerator(
            args.url, template=args.template or _chat_template(args), sampling=sampling
        )
        return gen, {"name": gen.model_name, "path": args.url, "sha256": ""}
    if args.model.endswith(".gguf"):
        return _make_llamacpp(args, sampling)
    from env.generators.vllm import VLLMGenerator, build_engine
    from env.models.testbed.model import testbed_model_path

    path = Path(args.model) if args.model else testbed_model_path()
    sha = model_sha256(path)
    max_len = args.max_model_len
    if max_len <= 0:
        import json as _json

        cfg = (
            _json.loads((path / "config.json").read_text())
            if (path / "config.json").exists()
            else {}
        )
        max_len = min(4096, int(cfg.get("max_position_embeddings", 2048)))
    llm = build_engine(
        path,
        seed=args.seed,
        kv_cache_gib=args.kv_cache_gib,
        dtype=args.dtype or None,
        max_model_len=max_len,
    )
    template = args.template
    if not template:
        has_chat = getattr(llm.get_tokenizer(), "chat_template", None)
        template = _chat_template(args) if has_chat else "testbed"
    vgen = VLLMGenerator(llm, template=template, sampling=sampling)
    name = path.name
    meta = path / "ponder_model.json"
    if meta.exists():
        import json

        name = json.loads(meta.read_text()).get("name", name)
    # The weights' precision decides the chains as much as the weights do: a bank records it,
    # and a resume in another precision is refused (BankManifest.compatible).
    dtype = str(llm.model_config.dtype).removeprefix("torch.")
    return vgen, {"name": name, "path": str(path), "sha256": sha, "engine": "vllm", "dtype": dtype}


def _make_llamacpp(args: RecordArgs, sampling: Any):  # type: ignore[no-untyped-def]
    import json

    from env.generators.llamacpp import LlamaCppGenerator, find_tokenizer_folder

    path = Path(args.model)
    if not path.is_file():
        raise ConfigError(f"no GGUF file at {str(path)!r}")
    gen = LlamaCppGenerator(
        path,
        template=args.template or _chat_template(args),
        sampling=sampling,
        slots=args.slots or args.chains * max(1, args.questions_at_once),
        context=args.max_model_len or 2048,
        threads=args.threads,
        seed=args.seed,
    )
    name = path.stem
    folder = find_tokenizer_folder(path)
    if folder is not None and (folder / "ponder_model.json").exists():
        name = json.loads((folder / "ponder_model.json").read_text()).get("name", name)
    return gen, {
        "name": name,
        "path": str(path),
        "sha256": model_sha256(path),
        "engine": "llama.cpp",
    }


def split_counts(splits: Sequence[str], n: int, split_n: Sequence[str]) -> dict[str, int]:
    """Questions to draw per split: ``n`` for each, overridden by ``SPLIT=N`` entries.

    Raises:
        ConfigError: an entry that is not ``SPLIT=N`` with a positive N, or names a split not in
            ``splits``.
    """
    out = {s: int(n) for s in splits}
    for item in split_n:
        name, sep, value = str(item).partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(
                f"--split-n takes SPLIT=N with a positive N (e.g. train=400), got {item!r}"
            )
        if name not in out:
            raise ConfigError(
                f"--split-n names split {name!r}, which --splits ({' '.join(splits)}) does not draw"
            )
        out[name] = int(value)
    return out


def questions_of(args: RecordArgs) -> list[Question]:
    from env.questions import load_questions

    counts = split_counts(args.splits, args.n, args.split_n)
    per_split = [
        load_questions(args.dataset, s, counts[s], seed=args.question_seed) for s in args.splits
    ]
    out: list[Question] = []
    for i in range(max(len(p) for p in per_split)):
        out.extend(p[i] for p in per_split if i < len(p))
    return out


def record(args: RecordArgs, stats: dict[str, float] | None = None) -> Path:
    """Create or resume the bank at ``args.out``, holding its :class:`BankLock` throughout (a
    second recorder of the same folder is refused with the first one named). On Ray,
    ``stats`` receives where the driver's time went (:func:`env.bank.ray_record.record_on_ray`)."""
    if args.chains < 1 or args.chunk_tokens < 1 or args.max_tokens < args.chunk_tokens:
        raise ConfigError("need chains >= 1, chunk_tokens >= 1 and max_tokens >= chunk_tokens")
    if args.ray_workers < 1 or args.ray_gpus < 0:
        raise ConfigError("need --ray-workers >= 1 and --ray-gpus >= 0")
    if args.questions_at_once < 1:
        raise ConfigError(
            f"--questions-at-once must be at least 1 (1: each question alone), "
            f"got {args.questions_at_once}"
        )
    if args.group_size < 0:
        raise ConfigError(
            f"--group-size must be 0 (the same as --questions-at-once) or more, got {args.group_size}"
        )
    if args.ray:
        from env.ray_cluster import check_ray

        check_ray(args.ray)  # (Ray installed, the address well-formed: before the lock)
    with BankLock(args.out, "ponder record"):
        if args.ray:
            from env.bank.ray_record import record_on_ray

            return record_on_ray(args, stats)
        return _record(args)


def describe_generator(gen: Generator, args: RecordArgs) -> tuple[str, dict[str, str]]:
    """``(template name, prompt texts)`` of ``gen`` for the bank manifest."""
    tmpl = getattr(gen, "template", None)
    template = getattr(tmpl, "name", args.template)
    prompts = tmpl.prompt_texts() if tmpl is not None and hasattr(tmpl, "prompt_texts") else {}
    return str(template), dict(prompts)


def bank_manifest(
    args: RecordArgs,
    questions: Sequence[Question],
    model: dict[str, Any],
    template: str,
    prompts: dict[str, str],
) -> BankManifest:
    """The manifest ``ponder record`` writes for ``args`` (recorded by ``model``)."""
    return BankManifest(
        model=model,
        dataset=args.dataset,
        questions=[q.qid for q in questions],
        template=template,
        mode=args.mode,
        sampling={
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_logprobs": args.top_logprobs,
        },
        chains=args.chains,
        chunk_tokens=args.chunk_tokens,
        max_tokens=args.max_tokens,
        extension_chunks=args.extension_chunks,
        probe_tokens=args.probe_tokens,
        judge=args.judge,
        seed=args.seed,
        prompts=prompts,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _record(args: RecordArgs) -> Path:
    from tqdm import tqdm

    questions = questions_of(args)
    gen, model = make_generator(args)
    manifest = bank_manifest(args, questions, model, *describe_generator(gen, args))
    writer = BankWriter(args.out, manifest, questions)
    todo = [i for i in range(len(questions)) if not writer.done(i)]
    t0 = time.time()
    tokens = 0
    bar = tqdm(
        total=len(questions),
        initial=len(questions) - len(todo),
        desc=f"record {args.out}",
        unit="q",
    )
    for group in groups_of(len(questions), group_size(args), writer.done):

        def write(j: int, cols: dict[str, Any], group: list[int] = group) -> None:
            nonlocal tokens
            i = group[j]
            tokens += int(sum(cols["n_tokens"])) + int(sum(cols["probe_tokens"]))
            if not writer.done(i):  # (written before: only the group's missing files are written)
                writer.write(i, cols)
                bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / max(1e-9, time.time() - t0):.1f}")

        record_group_as(
            gen,
            [questions[i] for i in group],
            manifest,
            at_once=args.questions_at_once,
            on_done=write,
        )
        if args.limit_minutes > 0 and time.time() - t0 > args.limit_minutes * 60:
            log.warning(
                "time limit reached after %d questions; rerun the same command to resume", bar.n
            )
            break
    bar.close()
    return Path(args.out)


def main(argv: list[str] | None = None) -> None:
    import tyro

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = tyro.cli(RecordArgs, args=argv, prog="ponder record")
    path = record(args)
    from env.bank.store import TraceBank

    bank = TraceBank(path)
    print(f"bank {path}: {len(bank)} of {len(bank.manifest.questions)} questions recorded")


if __name__ == "__main__":
    main()
