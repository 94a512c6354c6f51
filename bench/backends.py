"""Tokens per second of the real model on this machine: vLLM (bf16, float32) versus llama.cpp.

vLLM serves the converted Hugging Face folder (``python -m env.models.prepare``); llama.cpp (the
``xllamacpp`` wheel) runs the GGUF directly. Every backend generates chat-formatted GSM8K test
questions with top-k logprobs, for a fixed wall-clock budget, in its own subprocess (an engine
cannot be torn down cleanly inside one process). Throughput counts generated tokens only; the
prompt prefill is inside the timed window, the model load and a short warm-up are not.

Usage::

    python bench/backends.py                       # all four rows, ~90 s of generation each
    python bench/backends.py --backends llamacpp-1 --seconds 30
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: ``vllm-bf16``, ``vllm-fp32`` or ``llamacpp-N`` (llama.cpp with N parallel slots).
Backend = str
ROOT = Path(__file__).resolve().parents[1]
_RESULT = "RESULT "


@dataclass
class BenchArgs:
    """Measure generation throughput of the real model under vLLM and llama.cpp."""

    model: str = "qwen2.5-coder-1.5b"
    """Registry name of the model (see ``python -m env.models.prepare --list-models``)."""
    models_root: Path = ROOT / "models"
    """Where ``python -m env.models.prepare`` put the GGUF and the converted folder."""
    backends: tuple[Backend, ...] = ("vllm-bf16", "vllm-fp32", "llamacpp-1", "llamacpp-2")
    """Rows of the table: vLLM in a dtype, or llama.cpp with N parallel slots."""
    seqs: int = 16
    """Parallel sequences for vLLM (llama.cpp runs as many as it has slots)."""
    max_tokens: int = 128
    """Tokens per sequence (EOS is ignored so every sequence runs to the end)."""
    logprobs: int = 5
    """Top-k logprobs returned with every generated token."""
    seconds: float = 90.0
    """Wall-clock budget of the timed generation per backend."""
    threads: int = 1
    """CPU threads for llama.cpp. On a 2-core machine shared with other jobs, 2 spinning threads
    ran 8x slower than 1 (0.55 vs 4.7 tok/s); use 2 only on an idle machine."""
    vllm_threads_bind: str = "0-1"
    """VLLM_CPU_OMP_THREADS_BIND for vLLM ("0" for one core when the machine is shared)."""
    data: Path = ROOT / "data" / "gsm8k" / "test.jsonl"
    """GSM8K questions used as prompts."""
    one: Backend | None = None
    """Internal: measure this one backend in this process and print its result."""


@dataclass
class BenchResult:
    """One row of the table."""

    backend: str
    load_s: float
    tokens: int
    seconds: float
    sequences: int
    finished: int
    note: str = ""
    per_seq: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _prompts(args: BenchArgs, folder: Path, n: int) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    data = args.data if args.data.exists() else Path("/work/shared/data/gsm8k/test.jsonl")
    questions = [json.loads(line)["question"] for line in data.open()][:n]
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": q + "\nReason step by step, then give the answer."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for q in questions
    ]


def _paths(args: BenchArgs) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from env.models.prepare import get_model_spec

    spec = get_model_spec(args.model)
    return args.models_root / spec.folder, args.models_root / spec.gguf_name


def _bench_vllm(args: BenchArgs, dtype: str) -> BenchResult:
    for key, value in {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": args.vllm_threads_bind,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }.items():
        os.environ.setdefault(key, value)
    from vllm import LLM, SamplingParams

    folder, _ = _paths(args)
    prompts = _prompts(args, folder, args.seqs)
    start = time.perf_counter()
    llm = LLM(
        str(folder),
        dtype=dtype,
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=2048,
        enable_prefix_caching=True,
        seed=0,
    )
    load_s = time.perf_counter() - start
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up

    params = SamplingParams(
        temperature=0.7, top_p=0.95, max_tokens=args.max_tokens, logprobs=args.logprobs,
        ignore_eos=True,
    )  # fmt: skip
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    counts: dict[str, int] = {}
    finished = 0
    start = time.perf_counter()
    deadline = start + args.seconds
    while engine.has_unfinished_requests() and time.perf_counter() < deadline:
        for out in engine.step():
            counts[out.request_id] = len(out.outputs[0].token_ids)
            assert out.outputs[0].logprobs is None or len(out.outputs[0].logprobs) > 0
            finished += int(out.finished)
    elapsed = time.perf_counter() - start
    return BenchResult(
        backend=f"vllm-{dtype}",
        load_s=round(load_s, 1),
        tokens=sum(counts.values()),
        seconds=round(elapsed, 1),
        sequences=len(prompts),
        finished=finished,
        note="" if finished == len(prompts) else "stopped at the time budget",
        per_seq=sorted(counts.values()),
    )


def _bench_llamacpp(args: BenchArgs, slots: int) -> BenchResult:
    import xllamacpp as xlc

    folder, gguf = _paths(args)
    prompts = _prompts(args, folder, max(args.seqs, slots))
    params = xlc.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = 1024 * slots
    params.n_parallel = slots
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.verbosity = 0
    start = time.perf_counter()
    server = xlc.Server(params)
    load_s = time.perf_counter() - start
    server.handle_completions({"prompt": prompts[0], "max_tokens": 4})  # warm-up

    lock = threading.Lock()
    queue = list(enumerate(prompts))
    per_seq: list[int] = []
    errors: list[str] = []
    deadline = time.perf_counter() + args.seconds

    def worker() -> None:
        # Whole requests only: a worker starts no new request after the deadline.
        while time.perf_counter() < deadline:
            with lock:
                if not queue:
                    return
                i, prompt = queue.pop(0)
            req = {
                "prompt": prompt,
                "max_tokens": args.max_tokens,
                "n_probs": args.logprobs,
                "temperature": 0.7,
                "top_p": 0.95,
                "seed": i,
                "ignore_eos": True,
            }
            out = server.handle_completions(req)
            if "choices" not in out:
                errors.append(str(out)[:200])
                return
            content = out["choices"][0]["logprobs"]["content"]
            with lock:
                per_seq.append(len(content))

    start = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(slots)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    return BenchResult(
        backend=f"llamacpp-{slots}",
        load_s=round(load_s, 1),
        tokens=sum(per_seq),
        seconds=round(elapsed, 1),
        sequences=len(per_seq),
        finished=len(per_seq),
        note="; ".join(errors)[:200],
        per_seq=sorted(per_seq),
    )


def _run_one(args: BenchArgs) -> BenchResult:
    assert args.one is not None
    if args.one.startswith("vllm-"):
        return _bench_vllm(args, {"vllm-bf16": "bfloat16", "vllm-fp32": "float32"}[args.one])
    return _bench_llamacpp(args, int(args.one.split("-")[1]))


def _child(args: BenchArgs, backend: str) -> BenchResult:
    cmd = [sys.executable, __file__, "--one", backend, "--model", args.model]
    cmd += ["--models-root", str(args.models_root), "--seqs", str(args.seqs)]
    cmd += ["--max-tokens", str(args.max_tokens), "--logprobs", str(args.logprobs)]
    cmd += [
        "--seconds",
        str(args.seconds),
        "--threads",
        str(args.threads),
        "--data",
        str(args.data),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return BenchResult(**json.loads(line[len(_RESULT) :]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return BenchResult(backend, 0.0, 0, 0.0, 0, 0, note=f"failed (exit {proc.returncode}): {tail}")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table (or, with ``--one``, one row as JSON)."""
    import tyro

    args = tyro.cli(BenchArgs, args=argv)
    if args.one is not None:
        print(_RESULT + json.dumps(asdict(_run_one(args))), flush=True)
        return
    load = os.getloadavg()[0]
    rows = []
    for backend in args.backends:
        print(f"measuring {backend} ...", file=sys.stderr, flush=True)
        rows.append(_child(args, backend))
    print(f"\nmodel {args.model}, {args.max_tokens} tokens/seq, top-{args.logprobs} logprobs, "
          f"{args.seconds:.0f} s budget, {os.cpu_count()} CPUs, llama.cpp threads {args.threads}, "
        f"vLLM cores {args.vllm_threads_bind}, load average at start {load:.1f}")  # fmt: skip
    header = f"{'backend':<12} {'load s':>7} {'seqs':>5} {'done':>5} {'tokens':>7} {'secs':>6} {'tok/s':>7}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.backend:<12} {r.load_s:>7.1f} {r.sequences:>5} {r.finished:>5} {r.tokens:>7} "
            f"{r.seconds:>6.1f} {r.tokens_per_s:>7.2f}  {r.note}"
        )


if __name__ == "__main__":
    main()
