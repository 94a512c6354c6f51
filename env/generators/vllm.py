"""The in-process vLLM backend: one engine, built once and injected.

:func:`build_engine` checks the model folder, sets the CPU engine's environment (when unset) and
builds a ``vllm.LLM`` with prefix caching on and the TIP logits processor registered.
:class:`VLLMBackend` runs a batch of :class:`~env.generators.backend.CompletionRequest` in ONE
``LLM.generate`` call and converts the outputs with numpy (no per-token Python objects: vLLM is
asked for flat logprobs and, where the stop strings allow, for no detokenization at all; text is
decoded in one batched tokenizer call). :class:`VLLMGenerator` is the full
:class:`~env.generators.base.Generator` on top of it.

Example::

    llm = build_engine(testbed_model_path())
    gen = VLLMGenerator(llm)
    chains = gen.start(question, n=4)
    chunks = gen.extend(chains, k=64)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from env.generators.backend import Completion, CompletionRequest, HFTokenizer
from env.generators.live import LiveGenerator
from env.generators.prompts import TESTBED, PromptTemplate
from env.types import SamplingConfig
from features.errors import ConfigError, GeneratorError, ModelError

if TYPE_CHECKING:
    from vllm import LLM

__all__ = ["VLLMBackend", "VLLMGenerator", "build_engine", "check_model_path", "cpu_env"]

log = logging.getLogger(__name__)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_model_path(model_path: str | os.PathLike[str]) -> Path:
    """Check that ``model_path`` is a Hugging Face causal-LM folder.

    Raises:
        ModelError: if the path is missing, has no readable ``config.json``, or its
            ``architectures`` name no causal LM (for example a ``BertModel`` encoder).
    """
    path = Path(model_path)
    if not path.exists():
        raise ModelError(
            f"model path {str(path)!r} does not exist: check the path or train/fetch it"
        )
    if not path.is_dir():
        raise ModelError(
            f"model path {str(path)!r} is not a folder: give a Hugging Face model folder"
        )
    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise ModelError(f"model folder {str(path)!r} has no config.json") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {str(cfg_file)!r}: {e}") from e
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise ModelError(
            f"model at {str(path)!r} is not a causal language model (architectures={archs!r}, "
            f"model_type={cfg.get('model_type')!r}): ponder needs a *ForCausalLM model"
        )
    return path


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover - vllm needs torch anyway
        return True


def cpu_env(kv_cache_gib: float = 1) -> dict[str, str]:
    """Set vLLM's CPU environment variables (only those not set already); return what was set.

    The engine runs in this process (no engine-core subprocess), its OpenMP threads bound to
    every core this process may use, none held back.
    """
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = list(range(os.cpu_count() or 1))
    contiguous = cores == list(range(cores[0], cores[-1] + 1))
    bind = f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores))
    wanted = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib if kv_cache_gib % 1 else int(kv_cache_gib)),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    set_now = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(set_now)
    return set_now


def _warn_kv_override(kv_cache_gib: float) -> None:
    """Say so when ``VLLM_CPU_KVCACHE_SPACE``, set before, differs from ``kv_cache_gib``: the
    variable wins (vLLM reads it), so an option such as ``--kv-cache-gib`` would be ignored."""
    have = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    try:
        differs = float(have) != float(kv_cache_gib)
    except ValueError:
        differs = True
    if differs:
        log.warning(
            "VLLM_CPU_KVCACHE_SPACE=%s is set in the environment, so the engine's KV cache is "
            "that many GiB, not the %g asked for (unset it to use the option)",
            have,
            kv_cache_gib,
        )


def build_engine(
    model_path: str | os.PathLike[str],
    *,
    seed: int = 0,
    kv_cache_gib: float = 1,
    max_model_len: int = 1024,
    enforce_eager: bool = True,
    dtype: str | None = None,
    tip: bool = True,
    block_size: int | None = None,
    **kwargs: Any,
) -> LLM:
    """Build the in-process vLLM engine for ``model_path`` (do it once; inject it).

    Args:
        model_path: a Hugging Face causal-LM folder.
        seed: the engine seed (vLLM's CPU engine does not take per-request seeds).
        kv_cache_gib: KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``, if unset).
        max_model_len: context length.
        enforce_eager: no CUDA graphs / compilation (fast start, needed on CPU).
        dtype: ``None`` picks ``float32`` on CPU and ``auto`` on GPU.
        tip: register :class:`~env.generators.tip.TipLogitsProcessor`.
        block_size: KV block size; small blocks let short shared prefixes hit the prefix cache
            (only full blocks are cached). ``None`` picks 32 on CPU (the smallest its attention
            kernel takes) and vLLM's default on GPU.
        **kwargs: passed to ``vllm.LLM``.

    Raises:
        ModelError: the path is missing or not a causal LM, or the engine could not load it.
    """
    path = check_model_path(model_path)
    cpu = _on_cpu()
    if cpu:
        cpu_env(kv_cache_gib)
        _warn_kv_override(kv_cache_gib)
        kwargs.setdefault("gpu_memory_utilization", 0.2)
        if block_size is None:
            block_size = 32
    if block_size is not None:
        kwargs["block_size"] = block_size
    from vllm import LLM

    if tip:
        from env.generators.tip import TipLogitsProcessor

        kwargs["logits_processors"] = [*kwargs.get("logits_processors", []), TipLogitsProcessor]
    try:
        return LLM(
            str(path),
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            dtype=cast(Any, dtype or ("float32" if cpu else "auto")),
            enable_prefix_caching=True,
            **kwargs,
        )
    except Exception as e:
        raise ModelError(
            f"vLLM could not load the model at {str(path)!r}: {type(e).__name__}: {e}"
        ) from e


class VLLMBackend(HFTokenizer):
    """:class:`~env.generators.backend.Backend` over an in-process ``vllm.LLM``.

    Args:
        llm: the engine (see :func:`build_engine`).
        engine_detokenize: let vLLM detokenize every output token (and the top-logprob tokens).
            Off by default: text is decoded here in one batched call, and single-character stop
            strings become stop token ids (every token whose text contains one), which is exact.
    """

    def __init__(self, llm: LLM, *, engine_detokenize: bool = False) -> None:
        self.llm = llm
        self.tokenizer: Any = llm.get_tokenizer()
        cfg = llm.llm_engine.model_config
        self.model_name: str = str(cfg.model)
        self.max_model_len: int = int(cfg.max_model_len)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ModelError(f"the tokenizer of {self.model_name!r} has no EOS token")
        self.eos_token_id: int = int(eos)
        self.engine_detokenize = engine_detokenize
        self._stop_ids: dict[str, list[int]] = {}
        self._warned_mp = False

    def reset(self, seed: int) -> None:
        """Clear the prefix cache and reseed the sampler, so what follows is reproducible.

        Requests carry no per-request seed (the CPU engine rejects them), so unseeded requests
        draw from torch's global generator. With the engine core in this process
        (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the CPU default here) reseeding it here reseeds the
        sampler; with a separate engine-core process only the cache is cleared and a warning says
        that sampling is then not reproducible.
        """
        import torch

        if not self.llm.reset_prefix_cache():
            log.warning("vLLM did not clear its prefix cache (requests still running?)")
        torch.manual_seed(int(seed))
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0" and not self._warned_mp:
            self._warned_mp = True
            log.warning(
                "the vLLM engine core runs in another process: reset() cannot reseed its sampler, "
                "so recordings are not exactly reproducible (set VLLM_ENABLE_V1_MULTIPROCESSING=0)"
            )

    def _stop_token_ids(self, stop: str) -> list[int]:
        """Every token id whose text contains the one-character string ``stop``."""
        ids = self._stop_ids.get(stop)
        if ids is None:
            vocab = len(self.tokenizer)
            pieces = self.tokenizer.batch_decode([[i] for i in range(vocab)])
            ids = [i for i, p in enumerate(pieces) if stop in p]
            self._stop_ids[stop] = ids
        return ids

    # -- completion --------------------------------------------------------------------------

    def _params(self, r: CompletionRequest, detok: bool) -> Any:
        from vllm import SamplingParams

        extra = None
        if r.tip is not None:
            from env.generators.tip import tip_extra_args

            extra = tip_extra_args(r.tip)
        stop_ids: list[int] = []
        if not detok:
            for s in r.stop:
                stop_ids.extend(self._stop_token_ids(s))
        return SamplingParams(
            n=1,
            max_tokens=r.max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            logprobs=max(0, r.top_logprobs),
            stop=list(r.stop) if detok and r.stop else None,
            stop_token_ids=stop_ids or None,
            detokenize=detok,
            skip_special_tokens=True,
            flat_logprobs=True,
            extra_args=extra,
        )

    def complete(self, requests: Sequence[CompletionRequest]) -> list[Completion]:
        """Run every request in one ``LLM.generate`` call."""
        if not requests:
            return []
        from vllm.inputs import TokensPrompt

        for r in requests:
            if r.max_tokens < 1:
                raise ConfigError(f"max_tokens must be >= 1, got {r.max_tokens}")
        detok = self.engine_detokenize or any(len(s) != 1 for r in requests for s in r.stop)
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        params = [self._params(r, detok) for r in requests]
        try:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as e:
            raise GeneratorError(
                f"vLLM generate failed on {self.model_name!r} for {len(requests)} requests: "
                f"{type(e).__name__}: {e}"
            ) from e
        results = [self._convert(r, o, detok) for r, o in zip(requests, outs, strict=True)]
        if not detok:
            texts = self.tokenizer.batch_decode(
                [c.token_ids.tolist() for c in results], skip_special_tokens=True
            )
            for r, c, t in zip(requests, results, texts, strict=True):
                c.text, matched = _cut_at_stop(t, r.stop)
                if c.finish_reason == "stop" and matched is not None:
                    c.stop_reason = matched  # (the engine names only the stop token's id)
        return results

    def _convert(self, r: CompletionRequest, out: Any, detok: bool) -> Completion:
        o = out.outputs[0]
        ids = np.asarray(o.token_ids, dtype=np.int32)
        n = int(ids.shape[0])
        m = max(0, r.top_logprobs)
        lp_all = o.logprobs
        if lp_all is not None and n:
            # Flat logprobs: per position the sampled token first, then the top m.
            flat_lp = np.asarray(lp_all.logprobs, dtype=np.float32)
            flat_id = np.asarray(lp_all.token_ids, dtype=np.int32)
            width = flat_lp.shape[0] // n
            flat_lp = flat_lp[: n * width].reshape(n, width)
            flat_id = flat_id[: n * width].reshape(n, width)
            logprobs = flat_lp[:, 0].copy()
            top_lp = flat_lp[:, 1 : 1 + m].copy()
            top_id = flat_id[:, 1 : 1 + m].copy()
        else:
            logprobs = np.full(n, np.nan, dtype=np.float32)
            top_lp = np.full((n, m), -np.inf, dtype=np.float32)
            top_id = np.full((n, m), -1, dtype=np.int32)
        finish: Literal["length", "stop"] = "length" if o.finish_reason == "length" else "stop"
        # EOS ends the chain but is not part of it (continuations must not see it).
        if finish == "stop" and n and int(ids[-1]) == self.eos_token_id:
            ids, logprobs, top_lp, top_id = ids[:-1], logprobs[:-1], top_lp[:-1], top_id[:-1]
        prompt_tokens = len(r.prompt_ids)
        cached = int(out.num_cached_tokens or 0)
        return Completion(
            token_ids=ids,
            text=o.text if detok else "",
            logprobs=logprobs,
            top_logprobs=top_lp,
            top_token_ids=top_id,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            cached_tokens=min(cached, prompt_tokens),
            # vLLM names the stop string that matched (an int for a stop token id)
            stop_reason=o.stop_reason if isinstance(o.stop_reason, str) else None,
        )


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """Text before the first stop string (what vLLM's stop strings give), and that string
    (None when none occurs)."""
    cut, matched = len(text), None
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut, matched = i, s
    return text[:cut], matched


class VLLMGenerator(LiveGenerator):
    """The :class:`~env.generators.base.Generator` over an in-process vLLM engine.

    Args:
        llm_or_path: a built ``vllm.LLM`` (preferred: build once, inject) or a model folder,
            in which case :func:`build_engine` builds one with ``engine_kwargs``.
        template: prompt template or its name.
        sampling: how chains are sampled.
        engine_detokenize: see :class:`VLLMBackend`.
        **engine_kwargs: for :func:`build_engine` when given a path.
    """

    def __init__(
        self,
        llm_or_path: LLM | str | os.PathLike[str],
        *,
        template: PromptTemplate | str = TESTBED,
        sampling: SamplingConfig | None = None,
        engine_detokenize: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        if isinstance(llm_or_path, str | os.PathLike):
            llm = build_engine(llm_or_path, **engine_kwargs)
        elif engine_kwargs:
            raise ConfigError(
                f"engine options {sorted(engine_kwargs)} only apply when VLLMGenerator builds the "
                "engine from a path; pass them to build_engine instead"
            )
        else:
            llm = llm_or_path
        self.llm = llm
        super().__init__(
            VLLMBackend(llm, engine_detokenize=engine_detokenize),
            template=template,
            sampling=sampling or SamplingConfig(),
        )
