"""The testbed model's tokenizer and architecture (a small Llama in Hugging Face format)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from env.models.testbed.task import EOS, training_text
from features.errors import ModelError

__all__ = ["build_tokenizer", "model_config", "TESTBED_DIR", "testbed_model_path"]

#: Where the trained testbed model ships.
TESTBED_DIR = Path(__file__).resolve().parents[3] / "models" / "testbed"


def testbed_model_path() -> Path:
    """The testbed model folder: ``$PONDER_TESTBED_MODEL`` if set, else ``models/testbed``.

    Raises:
        ModelError: if the folder has no trained model in it.
    """
    path = Path(os.environ.get("PONDER_TESTBED_MODEL") or TESTBED_DIR)
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise ModelError(
            f"no testbed model at {path}: train it with `ponder testbed train` "
            "(or point PONDER_TESTBED_MODEL at a model folder)"
        )
    return path


def build_tokenizer(  # type: ignore[no-untyped-def]
    vocab_size: int = 384, n_docs: int = 20000, seed: int = 0, *, text: Any = None
):
    """A byte-level BPE tokenizer with one token per digit, trained on the task's own text.

    Digits are split one by one (as in Llama 3 and Qwen) so that arithmetic sees every digit.
    ``text(rng)`` writes one training document (default: the testbed task's,
    :func:`~env.models.testbed.task.training_text`). Returns a
    ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(seed)
    write = text or training_text
    docs = [write(rng).replace(EOS, "") for _ in range(n_docs)]
    docs += ["Hmm, Alternatively, Wait, let me check."] * 50
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def model_config(vocab_size: int, *, hidden: int = 256, layers: int = 6, heads: int = 4):  # type: ignore[no-untyped-def]
    """The Llama configuration of the testbed (head size 64, which vLLM's CPU backend supports)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32 + 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
