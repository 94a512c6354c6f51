"""Learned policies: a calibrated value / stopping model and a PPO actor-critic, with their
training entry points and ponder's safe file format.

| policy | model | trained by |
|---|---|---|
| :class:`~policies.learned.value.ValuePolicy` | P(correct if stopped now) + the gain of each other action, conditioned on λ | scikit-learn (MLP classifier + isotonic calibration, fitted-Q iteration), :func:`train_value_policy` |
| :class:`~policies.learned.ppo.PPOPolicy` | actor-critic over the four actions with action masking, conditioned on λ | PyTorch PPO, :func:`train_ppo` |
| :class:`~policies.learned.stop.StopPolicy` | P(the vote's answer is settled) between chains; stops when a change is worth less than another chain at λ | scikit-learn logistic regression on replayed full episodes, :func:`train_stop_policy` |

The value and PPO policies decide at every chunk or, with ``decide="chain"``, only between
chains (a running chain is always read to its end); the stop policy only between chains. All act in numpy from plain arrays, save to a folder (``policy.save(folder)``: ``policy.json``
and ``weights.safetensors``) and load with :func:`load_policy`, which never unpickles and refuses
files trained on other features. Train from the command line (``ponder train`` and
``python -m policies.learned`` are the same entry, :func:`main`)::

    ponder train value --decide chain --bank data/banks/testbed-arith --out models/policies/value
    ponder train ppo --bank data/banks/testbed-arith --out models/policies/ppo
    ponder train stop --bank data/banks/testbed-arith --out models/policies/stop

The modules: :mod:`~policies.learned.base` (the :class:`LearnedPolicy` base and the
observation rules every algorithm shares), :mod:`~policies.learned.replay` (replaying a bank
for learning: driver, transitions, behaviour policies, pinned rollouts), and one file per
algorithm, CleanRL-style: :mod:`~policies.learned.value`, :mod:`~policies.learned.ppo`,
:mod:`~policies.learned.stop`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from features.errors import PolicyError
from policies.learned.base import DEFAULT_LAMS, LearnedPolicy
from policies.learned.ppo import PPOArgs, PPOPolicy, train_ppo
from policies.learned.replay import rollout_pinned
from policies.learned.stop import StopArgs, StopPolicy, train_stop_policy
from policies.learned.value import ValueArgs, ValuePolicy, train_value_policy
from policies.serialize import read_policy_files

__all__ = [
    "DEFAULT_LAMS",
    "KINDS",
    "LearnedPolicy",
    "PPOArgs",
    "PPOPolicy",
    "StopArgs",
    "StopPolicy",
    "ValueArgs",
    "ValuePolicy",
    "load_policy",
    "main",
    "rollout_pinned",
    "train_ppo",
    "train_stop_policy",
    "train_value_policy",
]

log = logging.getLogger(__name__)

#: The learned policy kinds ponder loads, by the ``kind`` in ``policy.json``.
KINDS: dict[str, type[LearnedPolicy]] = {
    "value": ValuePolicy,
    "ppo": PPOPolicy,
    "stop": StopPolicy,
}


def load_policy(path: str | Path) -> LearnedPolicy:
    """A learned policy saved with ``policy.save(folder)``.

    Args:
        path: the folder (or its ``policy.json``).

    Raises:
        PolicyError: not ponder's format (a pickle file, no or garbled ``policy.json``), an
            unknown kind or version, a feature schema other than the environment's, or weights
            that do not fit the policy.
    """
    files = read_policy_files(path, kinds={k: (c.version,) for k, c in KINDS.items()})
    cls = KINDS[files.kind]
    try:
        policy = cls._from_files(files)
        policy.attach_saved_probes(files)
        return policy
    except PolicyError as e:
        raise PolicyError(f"{files.path}: {e}") from e
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise PolicyError(
            f"{files.path}: the {files.kind} policy's parameters or weights are damaged "
            f"({type(e).__name__}: {e})"
        ) from e


def main(argv: list[str] | None = None, *, prog: str | None = None) -> None:
    """``ponder train {value,ppo,stop} --bank ... --out ...`` (also ``python -m policies.learned``):
    train a learned policy and save it. ``prog`` names the program in ``--help`` (default:
    ``sys.argv[0]``, which ``ponder`` sets to ``ponder train``)."""
    import tyro

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = tyro.extras.subcommand_cli_from_dict(
        {"value": ValueArgs, "ppo": PPOArgs, "stop": StopArgs},
        prog=prog,
        args=argv,
        description="Train a learned ponder policy on a trace bank and save it.",
    )
    policy: LearnedPolicy
    if isinstance(args, ValueArgs):
        policy = train_value_policy(**vars(args))
    elif isinstance(args, StopArgs):
        policy = train_stop_policy(**vars(args))
    else:
        policy = train_ppo(**vars(args))
    out = policy.save(args.out)
    metrics = policy.meta.get("metrics", {})
    summary = {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval/")}
    log.info("saved %s policy to %s %s", policy.kind, out, summary)


if __name__ == "__main__":
    main()
