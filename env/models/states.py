"""A Hugging Face model's hidden states, read in transformers: the model folder's shape and
layers, its tokenizer and rendered prompts, and :class:`StateCapture`, the model loaded only as
deep as the deepest layer asked for, with forward hooks that keep the residual stream there.

Two readers share it, so the states are one computation wherever they are taken: ``ponder bank
annotate`` (:mod:`env.bank.annotate`, a recorded bank's chains fed back through the model,
:func:`capture_states`) and the live capture beside a generator
(:class:`~env.generators.capture.Capturing`). What the states are stored as is
:mod:`env.bank.hidden`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from features.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from env.generators.backend import HFTokenizer
    from env.generators.prompts import PromptTemplate
    from env.types import PromptMode

__all__ = [
    "Dtype",
    "StateCapture",
    "capture_states",
    "check_layers",
    "default_layers",
    "is_model_folder",
    "load_tokenizer",
    "model_name",
    "model_shape",
    "render_prompt_ids",
]

Dtype = Literal["bfloat16", "float32"]


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


def _apply_chat(tokenizer: Any) -> Any:
    def apply(messages: list[dict[str, str]]) -> str:
        out = tokenizer.apply_chat(messages)
        if out is None:
            raise ConfigError("the bank's template needs a chat template, the tokenizer has none")
        return cast(str, out)

    return apply


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


def model_name(folder: Path) -> str:
    """The model's name as an annotation records it: ``ponder_model.json``'s, else the folder's."""
    name = folder.name
    with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
        name = json.loads((folder / "ponder_model.json").read_text()).get("name", name)
    return str(name)
