"""Training the testbed's step-level process reward model (:mod:`env.models.testbed.prm`).

Reads like the script it is: load the labelled steps, encode each solution once with the frozen
testbed model, split by question, fit the head with full-batch L-BFGS, validate (steps, whole
solutions, and the model's own yes/no for comparison), write the folder::

    ponder testbed prm --out models/testbed/prm     # or: python -m env.models.testbed.prm

The folder is ``model.safetensors`` (the head) and ``config.json`` (encoder fingerprint, feature
schema, the aggregate chosen on validation, validation metrics, the training data's sha256).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from env.models.prepare import sha256_file
from env.models.testbed.model import TESTBED_DIR
from env.models.testbed.prm import (
    FORMAT,
    LP_FEATURES,
    PRM_DIR,
    STEP_LABELS,
    Aggregate,
    PRMConfig,
    StepEncoder,
    build_head,
)
from env.models.testbed.task import judge_text, prompt_text
from features.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    import torch

__all__ = ["TrainArgs", "main", "train"]

log = logging.getLogger(__name__)

#: The columns the step-labels file must have.
_COLUMNS = frozenset({"qid", "sample", "question", "solution", "end", "prefix_ok", "final_correct"})


@dataclass
class TrainArgs:
    """Train the testbed PRM (a head on the frozen testbed model) on the step labels."""

    out: Path = PRM_DIR
    """folder to write the PRM to (model.safetensors + config.json)"""
    data: Path = STEP_LABELS
    """step labels (parquet: qid, question, solution, end, prefix_ok, final_correct, ...)"""
    encoder: Path = TESTBED_DIR
    """the frozen testbed model the head reads with"""
    seed: int = 0
    """seed for the split and the head's initialisation"""
    val_frac: float = 0.2
    """share of questions held out for validation (grouped: no question is on both sides)"""
    epochs: int = 30
    """full-batch L-BFGS steps (each up to 20 iterations)"""
    l2: float = 3e-3
    """L2 penalty on the head's weights (validation chose it; larger heads overfit)"""
    head_hidden: int = 0
    """hidden units of the head (0: logistic regression, which validated best)"""
    aggregate: Literal["auto", "min", "product"] = "auto"
    """how step scores become a chain score; auto: the better on validation (Brier score)"""
    max_rows: int = 0
    """use about this many labelled steps, whole solutions at a time (0: all)"""
    threads: int = 1
    """torch threads"""
    compare_self_verifier: bool = True
    """also score the validation solutions with the testbed model's own yes/no verdict"""


def train(args: TrainArgs) -> dict[str, Any]:
    """Encode the labelled steps, fit the head, validate, write the PRM; return its metrics."""
    import torch

    t0 = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if not 0 < args.val_frac < 1:
        raise ConfigError(f"val_frac must be in (0, 1), got {args.val_frac}")

    df = _load_labels(Path(args.data), args.max_rows, args.seed)
    enc = StepEncoder(args.encoder)
    df, x = _encode_steps(enc, df)
    y = df["prefix_ok"].to_numpy(bool)
    val_q, va = _split(df, args.val_frac, args.seed)
    head, metrics = _fit_head(x, y, ~va, args)
    metrics["train/questions"] = len(set(df["question"])) - len(val_q)
    metrics["val/steps"] = int(va.sum())
    metrics["val/questions"] = len(val_q)
    with torch.inference_mode():
        p_all = torch.sigmoid(head(torch.from_numpy(x))).numpy()
    chosen: Aggregate = "min" if args.aggregate == "auto" else args.aggregate
    if va.any():
        chosen = _validate(df, p_all, y, va, args, enc, metrics, chosen)
    metrics["train/seconds"] = round(time.time() - t0, 1)
    _write(args, enc, head, metrics, chosen)
    for k, v in metrics.items():
        log.info("%s = %s", k, f"{v:.4f}" if isinstance(v, float) else v)
    log.info("aggregate: %s; PRM written to %s", chosen, args.out)
    return metrics


# -- the steps ----------------------------------------------------------------------------------


def _load_labels(data: Path, max_rows: int, seed: int) -> pd.DataFrame:
    """The labelled steps, keyed by solution (``qid#sample``); with ``max_rows``, about that
    many steps, whole solutions drawn with ``seed``."""
    import pandas as pd

    if not data.is_file():
        raise ConfigError(f"no step labels at {data}: write them with `ponder testbed evaluate`")
    df = pd.read_parquet(data)
    if missing := _COLUMNS - set(df.columns):
        raise ConfigError(f"{data} lacks the columns {sorted(missing)}")
    df = df.assign(key=df["qid"].astype(str) + "#" + df["sample"].astype(str))
    if max_rows:
        keys = df["key"].drop_duplicates().sample(frac=1.0, random_state=seed).tolist()
        sizes = df.groupby("key").size()
        take, n = [], 0
        for k in keys:
            if n >= max_rows:
                break
            take.append(k)
            n += int(sizes[k])
        df = df[df["key"].isin(set(take))]
    return df


def _encode_steps(enc: StepEncoder, df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Every step's features, each distinct (question, solution) read in one pass; the steps
    the encoder cannot read (past its context) are dropped."""
    from tqdm import tqdm

    x = np.zeros((len(df), enc.hidden_size + len(LP_FEATURES)), np.float32)
    ok = np.ones(len(df), bool)
    pairs = df.groupby(["question", "solution"], sort=False).indices
    for (question, solution), idx in tqdm(pairs.items(), desc="encode steps", unit="solution"):
        prompt = prompt_text(str(question), "cot")
        sol = str(solution)
        st, _, _ = enc.read(prompt + sol)
        st.cache = None
        for i in idx:
            end = int(df["end"].iloc[i])
            start = sol.rfind("\n", 0, end) + 1
            f = enc.features(st, prompt + sol, (start + len(prompt), end + len(prompt)))
            if f is None:
                ok[i] = False
            else:
                x[i] = f
    return df[ok].reset_index(drop=True), x[ok]


def _split(df: pd.DataFrame, val_frac: float, seed: int) -> tuple[set[str], np.ndarray]:
    """The validation questions and their rows: a split by question text (a few qids share a
    question; none may straddle the split)."""
    qs = sorted(df["question"].unique())
    random.Random(seed).shuffle(qs)
    n_val = max(1, round(len(qs) * val_frac)) if len(qs) > 1 else 0
    val_q = set(qs[:n_val])
    va = df["question"].isin(val_q).to_numpy()
    if va.all():
        raise ConfigError("too few questions to train on; raise --max-rows")
    return val_q, va


def _fit_head(
    x: np.ndarray, y: np.ndarray, tr: np.ndarray, args: TrainArgs
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The head fitted on the training rows (standardised on them) by full-batch L-BFGS with an
    L2 penalty on its weights; its final training loss."""
    import torch

    n_feat = x.shape[1]
    head = build_head(n_feat, args.head_hidden)
    xt = torch.from_numpy(x[tr])
    yt = torch.from_numpy(y[tr].astype(np.float32))
    mean = xt.mean(0)
    std = xt.std(0).clamp_min(1e-4) if len(xt) > 1 else torch.ones(n_feat)
    head.get_buffer("mean").copy_(mean)
    head.get_buffer("std").copy_(std)
    params = [p for p in head.parameters() if p.requires_grad]
    weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(xt), yt)
        return loss + 0.5 * args.l2 * sum((w**2).sum() for w in weights)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    for _ in range(args.epochs):
        opt.step(closure)  # type: ignore[arg-type]
    head.eval()
    with torch.no_grad():
        loss = float(objective())
    log.info("train/loss %.4f after %d L-BFGS steps", loss, args.epochs)
    return head, {"train/loss": loss, "train/steps": int(tr.sum())}


def _validate(
    df: pd.DataFrame,
    p_all: np.ndarray,
    y: np.ndarray,
    va: np.ndarray,
    args: TrainArgs,
    enc: StepEncoder,
    metrics: dict[str, Any],
    chosen: Aggregate,
) -> Aggregate:
    """Validation metrics into ``metrics`` (steps; whole solutions under each aggregate; the
    model's own verdict), and the aggregate: ``chosen``, or with ``auto`` the one with the lower
    Brier score on whole solutions."""
    pv, yv = p_all[va], y[va]
    metrics["val/step_auroc"] = _auroc(yv, pv)
    metrics["val/step_accuracy"] = float(((pv > 0.5) == yv).mean())
    metrics["val/step_majority_accuracy"] = float(max(yv.mean(), 1 - yv.mean()))
    metrics["val/step_brier"] = float(((pv - yv) ** 2).mean())
    sol = df[va].assign(p=pv).groupby("key", sort=False)
    fc = sol["final_correct"].first().to_numpy(bool)
    agg = {"min": sol["p"].min().to_numpy(), "product": sol["p"].prod().to_numpy()}
    metrics["val/solutions"] = len(fc)
    metrics["val/solution_majority_accuracy"] = float(max(fc.mean(), 1 - fc.mean()))
    for name, s in agg.items():
        metrics[f"val/solution_auroc_{name}"] = _auroc(fc, s)
        metrics[f"val/solution_accuracy_{name}"] = float(((s > 0.5) == fc).mean())
        metrics[f"val/solution_brier_{name}"] = float(((s - fc) ** 2).mean())
    if args.aggregate == "auto":
        # The chain score is used as a probability (P(yes) weights votes), so a proper scoring
        # rule picks the aggregate; the two rank solutions almost alike (AUROC).
        b_min = metrics["val/solution_brier_min"]
        b_prod = metrics["val/solution_brier_product"]
        if b_min is not None and b_prod is not None and b_prod < b_min:
            chosen = "product"
    if args.compare_self_verifier:
        first = df[va].groupby("key", sort=False).first()
        sv = np.array(
            [
                _self_verifier_p(enc, str(q), str(s))
                for q, s in zip(first["question"], first["solution"], strict=True)
            ]
        )
        metrics["val/self_verifier_auroc"] = _auroc(fc, sv)
        metrics["val/self_verifier_accuracy"] = float(((sv > 0.5) == fc).mean())
    return chosen


def _write(
    args: TrainArgs,
    enc: StepEncoder,
    head: torch.nn.Module,
    metrics: dict[str, Any],
    chosen: Aggregate,
) -> None:
    """The PRM folder, each file replaced atomically."""
    from safetensors.torch import save_file

    from env.bank.identity import model_sha256

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    enc_rel = os.path.relpath(Path(args.encoder).resolve(), out.resolve())
    train_args = {
        k: (_portable(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(args).items()
    }
    cfg = PRMConfig(
        encoder=enc_rel,
        encoder_sha256=model_sha256(args.encoder),
        hidden_size=enc.hidden_size,
        features=tuple(f"hidden_{i}" for i in range(enc.hidden_size)) + LP_FEATURES,
        head_hidden=args.head_hidden,
        aggregate=chosen,
        bos=enc.bos,
        max_tokens=enc.max_tokens,
        metrics=metrics,
        data_sha256=sha256_file(Path(args.data)),
        train_args=train_args,
    )
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": FORMAT})
    tmp.chmod(0o644)
    tmp.replace(out / "model.safetensors")
    tmp = out / "config.json.tmp"
    tmp.write_text(cfg.to_json())
    tmp.replace(out / "config.json")


# -- helpers --------------------------------------------------------------------------------------


def _portable(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (so configs do not name hosts)."""
    root = Path(__file__).resolve().parents[3]
    p = Path(path).resolve()
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(path)


def _auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, bool)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, p))


def _self_verifier_p(enc: StepEncoder, question: str, solution: str) -> float:
    """P(`` yes``) of the testbed model's verdict (the generative self-verifier's prompt)."""
    import torch

    ids, _, _ = enc.tokenize(judge_text(question, solution))
    yes = enc.tokenizer(" yes", add_special_tokens=False)["input_ids"][0]
    no = enc.tokenizer(" no", add_special_tokens=False)["input_ids"][0]
    with torch.inference_mode():
        logits = enc.model(input_ids=torch.tensor([ids])).logits[0, -1]
    two = torch.softmax(logits[[yes, no]].float(), dim=0)
    return float(two[0])


def main(argv: list[str] | None = None) -> None:
    import tyro

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = tyro.cli(TrainArgs, args=argv)
    train(args)
    print(f"PRM written to {args.out}")


if __name__ == "__main__":
    main()
