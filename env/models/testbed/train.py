"""Train the testbed reasoning model on the synthetic arithmetic task (CPU, resumable).

Run it as ``ponder testbed train`` (or ``python -m env.models.testbed.train``). It writes a Hugging Face
folder (Llama architecture, safetensors, tokenizer) that vLLM serves. Checkpoints go to
``<out>/.ckpt`` every ``checkpoint_every`` steps; a rerun resumes from the last one.

Afterwards ``ponder testbed evaluate`` measures accuracy by difficulty level and majority voting
with vLLM, and writes the step-level labels for training a verifier.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from env.models.testbed.model import TESTBED_DIR, build_tokenizer, model_config
from env.models.testbed.task import training_text
from features.errors import ConfigError

__all__ = ["TrainArgs", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainArgs:
    """Train the testbed model."""

    out: Path = TESTBED_DIR
    """folder to write the model to (Hugging Face format)"""
    task: Literal["arith", "reasoning"] = "arith"
    """the training text: arith (the testbed model: step-by-step solutions) or reasoning (the testbed reasoning model: a thinking section whose re-checks fix slips, env.models.testbed.reasoning; write it to another folder with --out, e.g. models/testbed-reasoning)"""
    seed: int = 1
    """seed for data and initialisation"""
    steps: int = 900
    """optimizer steps in all"""
    batch: int = 32
    """sequences per step"""
    block: int = 256
    """tokens per sequence (documents are packed)"""
    lr: float = 2e-3
    """peak learning rate (cosine decay after warm-up)"""
    warmup: int = 60
    """warm-up steps"""
    hidden: int = 256
    """hidden size"""
    layers: int = 4
    """transformer layers"""
    threads: int = 2
    """torch threads"""
    checkpoint_every: int = 50
    """steps between checkpoints"""
    max_minutes: float = 0.0
    """stop (after checkpointing) once this many minutes have passed; 0 = no limit"""
    init_from: Path | None = None
    """start from this trained model folder (its weights, tokenizer and shape; safetensors only) instead of random weights: fine-tuning on a changed training text"""


def _text(task: str) -> Any:
    """The function that writes one training document of ``task``."""
    if task == "reasoning":
        from env.models.testbed.reasoning import reasoning_text

        return reasoning_text
    return training_text


def _batches(tok, args: TrainArgs, rng: random.Random):  # type: ignore[no-untyped-def]
    """Endless packed blocks of training text."""
    import torch

    buf: list[int] = []
    need = args.batch * (args.block + 1)
    while True:
        while len(buf) < need:
            buf.extend(tok(_text(args.task)(rng))["input_ids"])
        x = torch.tensor(buf[:need], dtype=torch.long).view(args.batch, args.block + 1)
        buf = buf[need:]
        yield x


CKPT_META = "state.json"


def save_checkpoint(ckpt: Path, model: Any, opt: Any, step: int, rng: random.Random) -> None:
    """Write a resumable checkpoint as safetensors (weights, optimiser moments) and JSON (the
    rest). Never pickle: a planted checkpoint must not be able to run code when resumed."""
    from safetensors.torch import save_file

    # Cloned: tied weights (the embedding and the output layer) share memory, which safetensors
    # refuses; loading writes the same values into both names.
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    slots: dict[str, dict[str, Any]] = {}
    for idx, st in opt_state["state"].items():
        slots[str(idx)] = {}
        for key, v in st.items():
            if hasattr(v, "detach"):
                tensors[f"opt.{idx}.{key}"] = v.detach().contiguous()
            else:
                slots[str(idx)][key] = v
    version, internal, gauss = rng.getstate()
    meta = {
        "step": step,
        "rng": [version, list(internal), gauss],
        "param_groups": opt_state["param_groups"],
        "opt_scalars": slots,
    }
    # The JSON names the tensor file of its own step and is renamed into place last: a kill at
    # any moment leaves the previous JSON, still naming the previous (intact) tensor file.
    name = f"state-{step}.safetensors"
    save_file(tensors, str(ckpt / name))
    meta["tensors"] = name
    tmp = ckpt / (CKPT_META + ".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(ckpt / CKPT_META)
    for old in ckpt.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(ckpt: Path, model: Any, opt: Any) -> tuple[int, random.Random]:
    """Read what :func:`save_checkpoint` wrote into ``model`` and ``opt``; the step and RNG."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((ckpt / CKPT_META).read_text())
        tensors = load_file(str(ckpt / Path(meta["tensors"]).name))
        model.load_state_dict(
            {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        )
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        for idx, scalars in meta["opt_scalars"].items():
            state.setdefault(int(idx), {}).update(scalars)
        groups = meta["param_groups"]
        for g in groups:  # JSON made the betas tuple a list
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        opt.load_state_dict({"state": state, "param_groups": groups})
        version, internal, gauss = meta["rng"]
        rng = random.Random()
        rng.setstate((version, tuple(internal), gauss))
        return int(meta["step"]), rng
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise ConfigError(
            f"the checkpoint in {ckpt} is damaged ({type(e).__name__}: {e}); delete the folder "
            "and train again"
        ) from e


def train(args: TrainArgs) -> Path:
    """Train (or resume) and write the final model to ``args.out``."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = out / ".ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    if (ckpt / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast.from_pretrained(ckpt)
    elif args.init_from is not None:
        tok = PreTrainedTokenizerFast.from_pretrained(_init_folder(args.init_from))
        tok.save_pretrained(ckpt)
    else:
        tok = build_tokenizer(seed=args.seed, text=_text(args.task))
        tok.save_pretrained(ckpt)
    if args.init_from is not None:
        model = LlamaForCausalLM.from_pretrained(
            _init_folder(args.init_from), use_safetensors=True, dtype=torch.float32
        )
        if model.config.vocab_size != len(tok):
            raise ConfigError(
                f"{args.init_from} has {model.config.vocab_size} tokens but the tokenizer in "
                f"{ckpt} has {len(tok)}: delete {ckpt} to start again from {args.init_from}"
            )
    else:
        model = LlamaForCausalLM(model_config(len(tok), hidden=args.hidden, layers=args.layers))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    step = 0
    if (ckpt / "state.pt").exists():
        raise ConfigError(
            f"{ckpt / 'state.pt'} is a pickle-based checkpoint of an older ponder; ponder never "
            f"loads pickle files (they can run code). Delete {ckpt} and train again."
        )
    if (ckpt / CKPT_META).exists():
        step, rng = load_checkpoint(ckpt, model, opt)
        log.info("resumed from step %d", step)
    else:
        rng = random.Random(args.seed)

    def lr_at(s: int) -> float:
        if s < args.warmup:
            return args.lr * (s + 1) / args.warmup
        frac = (s - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    from tqdm import tqdm

    t0 = time.time()
    model.train()
    batches = _batches(tok, args, rng)
    bar = tqdm(total=args.steps, initial=step, desc="train testbed", unit="step")
    loss_ema = None
    while step < args.steps:
        x = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out_ = model(input_ids=x[:, :-1], labels=x[:, :-1])
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss = float(out_.loss.detach())
        loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr_at(step):.1e}")
        timeout = args.max_minutes > 0 and time.time() - t0 > args.max_minutes * 60
        if step % args.checkpoint_every == 0 or step == args.steps or timeout:
            save_checkpoint(ckpt, model, opt, step, rng)
        if timeout:
            log.warning(
                "stopping at step %d after %.1f min; rerun to resume", step, args.max_minutes
            )
            bar.close()
            return out
    bar.close()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _init_folder(path: Path) -> Path:
    """A trained model folder to start from: it must hold safetensors weights (never pickle)."""
    folder = Path(path)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise ConfigError(
                f"--init-from {folder}: no {name} there; give a folder `ponder testbed train` "
                "wrote (safetensors weights and its tokenizer)"
            )
    return folder


def main(argv: list[str] | None = None) -> None:
    import tyro

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = tyro.cli(TrainArgs, args=argv)
    path = train(args)
    print(f"testbed model written to {path}")


if __name__ == "__main__":
    main()
