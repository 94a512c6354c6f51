"""Train the testbed reasoning model on the synthetic arithmetic task (CPU, resumable).

Run it as ``ponder testbed train`` (or ``python -m env.models.testbed.train``). It writes a Hugging Face
folder (Llama architecture, safetensors, tokenizer) that vLLM serves. Checkpoints go to
``<out>/.ckpt`` every ``checkpoint_every`` steps; a rerun resumes from the last one.

Afterwards ``ponder testbed evaluate`` measures accuracy by difficulty level and majority voting
with vLLM, and writes the step-level labels for training a verifier.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from env.models.testbed.model import TESTBED_DIR, build_tokenizer, model_config
from env.models.testbed.task import training_text

__all__ = ["TrainArgs", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainArgs:
    """Train the testbed model."""

    out: Path = TESTBED_DIR
    """folder to write the model to (Hugging Face format)"""
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


def _batches(tok, args: TrainArgs, rng: random.Random):  # type: ignore[no-untyped-def]
    """Endless packed blocks of training text."""
    import torch

    buf: list[int] = []
    need = args.batch * (args.block + 1)
    while True:
        while len(buf) < need:
            buf.extend(tok(training_text(rng))["input_ids"])
        x = torch.tensor(buf[:need], dtype=torch.long).view(args.batch, args.block + 1)
        buf = buf[need:]
        yield x


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
    else:
        tok = build_tokenizer(seed=args.seed)
        tok.save_pretrained(ckpt)
    model = LlamaForCausalLM(model_config(len(tok), hidden=args.hidden, layers=args.layers))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    step = 0
    state_file = ckpt / "state.pt"
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        rng = random.Random()
        rng.setstate(state["rng"])
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
        loss = float(out_.loss)
        loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr_at(step):.1e}")
        timeout = args.max_minutes > 0 and time.time() - t0 > args.max_minutes * 60
        if step % args.checkpoint_every == 0 or step == args.steps or timeout:
            tmp = state_file.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "rng": rng.getstate(),
                },
                tmp,
            )
            tmp.replace(state_file)
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


def main(argv: list[str] | None = None) -> None:
    import tyro

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = tyro.cli(TrainArgs, args=argv)
    path = train(args)
    print(f"testbed model written to {path}")


if __name__ == "__main__":
    main()
