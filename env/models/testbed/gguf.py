"""The testbed model as a GGUF file, for the llama.cpp engine (``python -m env.models.testbed.gguf``).

:func:`export_gguf` writes the testbed Llama (a Hugging Face folder: ``config.json``,
``model.safetensors``, ``tokenizer.json``) to a GGUF file that llama.cpp runs with architecture
``llama``, so that tests can drive :class:`env.generators.llamacpp.LlamaCppBackend` on a real
model without any download. It writes what llama.cpp's ``convert_hf_to_gguf.py`` writes for a
Llama with a byte-level BPE vocabulary, including its one subtle step: the rows of ``q_proj`` and
``k_proj`` are permuted from Hugging Face's rotary layout (each head's first half rotates with its
second half) to GGML's (adjacent pairs rotate together), see :func:`permute_rotary`.

The file holds no chat template and the tokenizer is not needed from it (the backend sends token
ids and decodes with the Hugging Face tokenizer of the GGUF's own folder), but the vocabulary,
merges and special ids are complete, so llama.cpp's own tokenizer and stop strings work too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from features.errors import ConfigError, ModelError

__all__ = ["export_gguf", "permute_rotary", "main"]

Dtype = Literal["f32", "f16"]


def permute_rotary(w: np.ndarray[Any, Any], n_head: int) -> np.ndarray[Any, Any]:
    """Reorder the output rows of a q or k projection from HF's rotary layout to GGML's.

    Hugging Face's Llama rotates dimension ``i`` of a head with dimension ``i + d/2``
    (``rotate_half``); GGML's ``rope`` (normal mode, which the ``llama`` architecture uses)
    rotates ``2i`` with ``2i + 1``. Within each head, row ``j * d/2 + i`` (half ``j``, pair ``i``)
    moves to row ``2i + j``: the same reshape-and-swap as ``LlamaModel.permute`` in llama.cpp's
    converter. ``n_head`` is the number of heads the projection produces (KV heads for ``k``).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ConfigError(f"a projection of {rows} rows does not split into {n_head} rotary heads")
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise ModelError(f"no config.json in {folder}: not a Hugging Face model folder")
    cfg: dict[str, Any] = json.loads(path.read_text())
    arch = cfg.get("model_type")
    if arch != "llama":
        raise ModelError(f"{folder} holds a {arch!r} model; only 'llama' exports to GGUF here")
    return cfg


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"rope type {rope.get('rope_type')!r} is not supported by this exporter")
    scaling = cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ModelError(f"rope scaling {scaling!r} is not supported by this exporter")
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _tokenizer(folder: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens, token types and merges from ``tokenizer.json`` (a byte-level BPE)."""
    from gguf import TokenType

    path = folder / "tokenizer.json"
    if not path.exists():
        raise ModelError(f"no tokenizer.json in {folder}")
    tj = json.loads(path.read_text())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelError(f"the tokenizer in {folder} is {model.get('type')!r}, not a BPE")
    id_to_tok: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special: set[int] = set()
    for a in tj.get("added_tokens") or []:
        id_to_tok[int(a["id"])] = a["content"]
        if a.get("special"):
            special.add(int(a["id"]))
    if max(id_to_tok) >= vocab_size:
        raise ModelError(
            f"token id {max(id_to_tok)} is outside the model's {vocab_size} embeddings"
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            types.append(int(TokenType.CONTROL if i in special else TokenType.NORMAL))
        else:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    cfg_path = folder / "tokenizer_config.json"
    tcfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    by_text = {t: i for i, t in id_to_tok.items()}

    def special_id(name: str) -> int | None:
        tok = tcfg.get(name)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return by_text.get(tok) if isinstance(tok, str) else None

    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": special_id("bos_token"),
        "eos": special_id("eos_token"),
        "pad": special_id("pad_token"),
    }


def _weights(folder: Path) -> dict[str, np.ndarray[Any, Any]]:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors weights in {folder}")
    out: dict[str, np.ndarray[Any, Any]] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def export_gguf(hf_folder: Path, out: Path, dtype: Dtype = "f16") -> Path:
    """Write the Llama in ``hf_folder`` to the GGUF file ``out``; return ``out``.

    Args:
        hf_folder: a Hugging Face Llama folder (``config.json``, ``*.safetensors``,
            ``tokenizer.json``), such as ``models/testbed``.
        out: the GGUF file to write (its folder is created).
        dtype: ``f16`` (2-D weights in half precision, norms in float32, as llama.cpp's converter
            writes them) or ``f32`` (everything in float32).

    Raises:
        ModelError: if the folder is not a Llama with a byte-level BPE tokenizer.
        ConfigError: for an unknown ``dtype``.
    """
    import gguf

    if dtype not in ("f32", "f16"):
        raise ConfigError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    hf_folder, out = Path(hf_folder), Path(out)
    cfg = _config(hf_folder)
    n_layer = int(cfg["num_hidden_layers"])
    n_embd = int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    if head_dim * n_head != n_embd:
        raise ModelError(f"head_dim {head_dim} x {n_head} heads != hidden size {n_embd}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ModelError("biases in attention or MLP are not supported by this exporter")
    vocab_size = int(cfg["vocab_size"])
    tok = _tokenizer(hf_folder, vocab_size)
    w = _weights(hf_folder)
    prefix = "model." if "model.embed_tokens.weight" in w else ""

    def take(name: str) -> np.ndarray[Any, Any]:
        try:
            return np.asarray(w.pop(prefix + name), dtype=np.float32)
        except KeyError:
            raise ModelError(f"{hf_folder} has no tensor {prefix + name!r}") from None

    tensors: dict[str, np.ndarray[Any, Any]] = {"token_embd.weight": take("embed_tokens.weight")}
    for i in range(n_layer):
        hf, gg = f"layers.{i}.", f"blk.{i}."
        tensors[gg + "attn_norm.weight"] = take(hf + "input_layernorm.weight")
        tensors[gg + "attn_q.weight"] = permute_rotary(take(hf + "self_attn.q_proj.weight"), n_head)
        tensors[gg + "attn_k.weight"] = permute_rotary(
            take(hf + "self_attn.k_proj.weight"), n_head_kv
        )
        tensors[gg + "attn_v.weight"] = take(hf + "self_attn.v_proj.weight")
        tensors[gg + "attn_output.weight"] = take(hf + "self_attn.o_proj.weight")
        tensors[gg + "ffn_norm.weight"] = take(hf + "post_attention_layernorm.weight")
        tensors[gg + "ffn_gate.weight"] = take(hf + "mlp.gate_proj.weight")
        tensors[gg + "ffn_up.weight"] = take(hf + "mlp.up_proj.weight")
        tensors[gg + "ffn_down.weight"] = take(hf + "mlp.down_proj.weight")
    tensors["output_norm.weight"] = take("norm.weight")
    head = w.pop("lm_head.weight", None)
    if head is not None and not cfg.get("tie_word_embeddings", False):
        tensors["output.weight"] = np.asarray(head, dtype=np.float32)
    # With tied embeddings llama.cpp reuses token_embd.weight as the output projection.
    w = {k: v for k, v in w.items() if "rotary_emb" not in k}
    if w:
        raise ModelError(f"{hf_folder} has tensors this exporter does not know: {sorted(w)[:5]}")

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(str(cfg.get("_name_or_path") or hf_folder.name))
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(
        int(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    )
    writer.add_tokenizer_model("gpt2")
    # GPT-2's split regex: with no merges across digits in the vocabulary, llama.cpp's own
    # tokenizer then gives the HF tokenizer's ids (which split digits first); llama.cpp's
    # "default" pre-tokenizer splits punctuation runs apart and does not.
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if tok[key] is not None:
            add(int(tok[key]))
    # The HF tokenizer adds no special tokens (its post-processor is the bare sequence).
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    for name, t in tensors.items():
        # 1-D tensors (norms) stay float32, as llama.cpp's converter keeps them.
        data = t.astype(np.float16) if dtype == "f16" and t.ndim >= 2 else t
        writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m env.models.testbed.gguf [--model models/testbed] --out models/testbed/testbed.gguf``."""
    from env.models.testbed.model import testbed_model_path

    p = argparse.ArgumentParser(
        prog="python -m env.models.testbed.gguf",
        description="Write the testbed model (a Hugging Face Llama folder) as a GGUF file.",
    )
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: the testbed)")
    p.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    p.add_argument("--dtype", choices=("f16", "f32"), default="f16", help="weight precision")
    a = p.parse_args(argv)
    folder = a.model if a.model is not None else testbed_model_path()
    path = export_gguf(folder, a.out, a.dtype)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {a.dtype})")


if __name__ == "__main__":
    main()
