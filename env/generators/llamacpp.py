"""llama.cpp in-process: the :class:`~env.generators.backend.Backend` for recording on a CPU.

On a 2-core CPU the quantised GGUF under llama.cpp (the ``xllamacpp`` wheel) generates about twice
as fast as vLLM's CPU backend on the dequantised float32 weights of the same model (measured by
``bench/backends.py``; see the README), so ``ponder record --engine llamacpp`` is the way to grow
a real-model bank on a CPU. The model is the same network (the HF folder ponder converts is the
dequantised GGUF), but numerics differ: a bank records which engine and file it came from.

Requests run on the engine's parallel slots from a thread pool, one slot per chain, and llama.cpp
keeps each slot's KV cache, so a chain's next chunk (and its probe and verifier question) reuse
the chain's prefix. Sampling is seeded per request from :meth:`LlamaCppBackend.reset`'s seed and
the request's position in the call sequence; batching in llama.cpp depends on thread timing, so
two runs agree in distribution and usually token for token, but not bit for bit (unlike the
in-process vLLM engine). TIP needs a logits processor, which llama.cpp lacks: it is refused.

The tokenizer (and chat template) is read from a Hugging Face folder with the same vocabulary,
by default the folder ``ponder model prepare`` converted next to the GGUF.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from env.generators.backend import Completion, CompletionRequest, HFTokenizer
from env.generators.live import LiveGenerator
from env.generators.prompts import PromptTemplate
from env.types import SamplingConfig
from features.errors import ConfigError, GeneratorError, ModelError

__all__ = ["LlamaCppBackend", "LlamaCppGenerator", "find_tokenizer_folder"]

log = logging.getLogger(__name__)


def find_tokenizer_folder(gguf: Path) -> Path | None:
    """The Hugging Face folder that holds the tokenizer of ``gguf``, if there is one.

    ``ponder model prepare`` writes ``<name>.gguf`` and the folder ``<name>-instruct/`` next to
    it: a sibling folder whose ``ponder_model.json`` names this GGUF file is used first.
    Otherwise the GGUF's own folder, if it holds a ``tokenizer_config.json`` (the testbed ships
    ``models/testbed/testbed.gguf`` inside its Hugging Face folder).
    """
    if not gguf.parent.is_dir():
        return None
    for d in sorted(gguf.parent.iterdir()):
        meta = d / "ponder_model.json"
        if d.is_dir() and meta.exists():
            try:
                if json.loads(meta.read_text()).get("gguf_file") == gguf.name:
                    return d
            except (OSError, json.JSONDecodeError):
                continue
    if (gguf.parent / "tokenizer_config.json").is_file():
        return gguf.parent
    return None


class LlamaCppBackend(HFTokenizer):
    """:class:`~env.generators.backend.Backend` over an in-process llama.cpp server (xllamacpp).

    Args:
        gguf: the model file.
        tokenizer: a Hugging Face folder with the same vocabulary (default: see
            :func:`find_tokenizer_folder`).
        slots: parallel sequences (one per chain is best).
        context: tokens of context per slot.
        threads: CPU threads (default: all cores).
        seed: base seed (see :meth:`reset`).
        cache_ram_mib: host memory for llama.cpp's prompt cache of evicted slot states.
    """

    def __init__(
        self,
        gguf: str | os.PathLike[str],
        *,
        tokenizer: str | os.PathLike[str] | None = None,
        slots: int = 16,
        context: int = 2048,
        threads: int = 0,
        seed: int = 0,
        cache_ram_mib: int = 1024,
    ) -> None:
        try:
            import xllamacpp as xlc
        except ImportError as e:
            raise ModelError(
                "the llama.cpp engine needs the xllamacpp package: pip install xllamacpp"
            ) from e
        from transformers import AutoTokenizer

        self.path = Path(gguf)
        if not self.path.is_file():
            raise ModelError(
                f"no GGUF file at {str(self.path)!r}; make one with "
                "`ponder model prepare --name qwen2.5-coder-1.5b`"
            )
        if slots < 1 or context < 64:
            raise ConfigError(f"need slots >= 1 and context >= 64, got {slots} and {context}")
        tok_dir = Path(tokenizer) if tokenizer else find_tokenizer_folder(self.path)
        if tok_dir is None or not (tok_dir / "tokenizer_config.json").exists():
            raise ModelError(
                f"no tokenizer folder for {self.path.name} beside it: run `ponder model prepare "
                "--name NAME` without --gguf-only (it writes NAME-instruct/ next to the GGUF), or "
                "pass tokenizer= (a Hugging Face folder with the same vocabulary)"
            )
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(tok_dir))
        self.model_name: str = self.path.stem
        self.max_model_len: int = int(context)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ModelError(f"the tokenizer in {tok_dir} has no EOS token")
        self.eos_token_id: int = int(eos)
        # Every special token ends a completion's visible text (EOS, end of turn, padding).
        self._special = {int(i) for i in self.tokenizer.all_special_ids}
        self.slots = int(slots)
        params = xlc.CommonParams()
        params.model.path = str(self.path)
        params.n_ctx = int(context) * self.slots
        params.n_parallel = self.slots
        n = int(threads) or (os.cpu_count() or 1)
        params.cpuparams.n_threads = n
        params.cpuparams_batch.n_threads = n
        params.verbosity = -1
        # llama.cpp keeps evicted slot states in RAM for reuse (8 GiB by default); chains stay on
        # their slots, so a small cache is enough.
        params.cache_ram_mib = int(cache_ram_mib)
        try:
            self.server: Any = xlc.Server(params)
        except Exception as e:
            raise ModelError(
                f"llama.cpp could not load {self.path}: {type(e).__name__}: {e}"
            ) from e
        self._pool = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="llamacpp")
        self._lock = threading.Lock()
        self._seed = int(seed)
        self._calls = 0

    def reset(self, seed: int) -> None:
        """Restart the per-request seed sequence from ``seed``."""
        with self._lock:
            self._seed = int(seed)
            self._calls = 0

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- completion --------------------------------------------------------------------------

    def _request_seed(self, call: int, index: int) -> int:
        h = hashlib.sha256(f"{self._seed}:{call}:{index}".encode()).digest()
        return int.from_bytes(h[:4], "little") & 0x7FFFFFFF

    def complete(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Run the requests on the engine's slots, at most ``slots`` at a time."""
        if not requests:
            return []
        for r in requests:
            if r.max_tokens < 1:
                raise ConfigError(f"max_tokens must be >= 1, got {r.max_tokens}")
            if r.tip is not None:
                raise ConfigError(
                    "TIP (thought-switch penalty) needs a logits processor, which the llama.cpp "
                    "engine lacks: use the vLLM engine for TIP"
                )
        with self._lock:
            call = self._calls
            self._calls += 1
        bodies = [self._body(r, self._request_seed(call, i)) for i, r in enumerate(requests)]
        futures = [self._pool.submit(self.server.handle_completions, b) for b in bodies]
        outs = []
        for r, f in zip(requests, futures, strict=True):
            try:
                out = f.result()
            except Exception as e:
                raise GeneratorError(
                    f"llama.cpp completion failed on {self.model_name!r}: {type(e).__name__}: {e}"
                ) from e
            outs.append(self._convert(r, out))
        return outs

    @staticmethod
    def _body(r: CompletionRequest, seed: int) -> dict[str, Any]:
        greedy = r.temperature <= 0
        body: dict[str, Any] = {
            "prompt": [int(t) for t in r.prompt_ids],
            "max_tokens": int(r.max_tokens),
            "temperature": 0.0 if greedy else float(r.temperature),
            "top_p": float(r.top_p),
            "top_k": 1 if greedy else 0,
            "min_p": 0.0,
            "n_probs": max(1, int(r.top_logprobs)),
            "seed": int(seed),
            "cache_prompt": True,
            "stream": False,
        }
        if r.stop:
            body["stop"] = list(r.stop)
        return body

    def _convert(self, r: CompletionRequest, out: Any) -> Completion:
        if not isinstance(out, dict) or "choices" not in out:
            raise GeneratorError(
                f"llama.cpp returned an error for {self.model_name!r}: {out!r:.300}"
            )
        choice = out["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        m = max(0, int(r.top_logprobs))
        ids = [int(c["id"]) for c in content]
        # Drop trailing special tokens (EOS / end of turn): continuations must not see them.
        ended_by_token = bool(ids) and ids[-1] in self._special
        while ids and ids[-1] in self._special:
            ids.pop()
            content = content[:-1]
        n = len(ids)
        logprobs = np.array([float(c["logprob"]) for c in content], dtype=np.float32)
        top_lp = np.full((n, m), -np.inf, dtype=np.float32)
        top_id = np.full((n, m), -1, dtype=np.int32)
        for i, c in enumerate(content):
            for j, t in enumerate((c.get("top_logprobs") or [])[:m]):
                top_lp[i, j] = float(t["logprob"])
                top_id[i, j] = int(t["id"])
        finish: Literal["length", "stop"] = (
            "length" if choice.get("finish_reason") == "length" else "stop"
        )
        # llama.cpp does not say which stop string matched: with one asked for, that one.
        stop_reason = None
        if finish == "stop" and r.stop and not ended_by_token:
            stop_reason = r.stop[0] if len(r.stop) == 1 else ""
        usage = out.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens", len(r.prompt_ids)))
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        return Completion(
            token_ids=np.asarray(ids, dtype=np.int32),
            text=str(choice.get("text", "")),
            logprobs=logprobs,
            top_logprobs=top_lp,
            top_token_ids=top_id,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            cached_tokens=min(cached, prompt_tokens),
            stop_reason=stop_reason,
        )


class LlamaCppGenerator(LiveGenerator):
    """The :class:`~env.generators.base.Generator` over llama.cpp (see :class:`LlamaCppBackend`).

    Args:
        gguf: the model file.
        template: prompt template or its name (default ``chat``).
        sampling: how chains are sampled.
        **backend_kwargs: for :class:`LlamaCppBackend` (tokenizer, slots, context, threads, seed).
    """

    def __init__(
        self,
        gguf: str | os.PathLike[str],
        *,
        template: PromptTemplate | str = "chat",
        sampling: SamplingConfig | None = None,
        **backend_kwargs: Any,
    ) -> None:
        super().__init__(
            LlamaCppBackend(gguf, **backend_kwargs),
            template=template,
            sampling=sampling or SamplingConfig(),
        )
