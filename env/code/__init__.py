"""The code domain: HumanEval questions, a sandbox for model-written code, execution verification.

Model-written code only ever runs through :mod:`env.code.sandbox` (a separate process with
limits on time, memory, processes and output, no network, a temporary folder). Hidden unit
tests decide correctness only: they live in :class:`env.code.humaneval.CodeTask`, never in the
:class:`env.types.Question` a policy sees. :mod:`env.code.grade` turns a chain's code into its
answer (its behaviour on the prompt's visible calls), its verify score (the visible examples it
passes) and its correctness (the hidden tests).
"""

from __future__ import annotations

from env.code.execute import run_calls, run_tests
from env.code.grade import NO_EVIDENCE, ChainExecution, CodeGrader, accepted_answers
from env.code.humaneval import CodeTask, load_humaneval, load_tasks, task_of, visible_calls
from env.code.sandbox import Limits, SandboxResult, run_python
from env.code.types import Call, CallOutcome, TestVerdict, Verdict

__all__ = [
    "NO_EVIDENCE",
    "Call",
    "CallOutcome",
    "ChainExecution",
    "CodeGrader",
    "CodeTask",
    "Limits",
    "SandboxResult",
    "TestVerdict",
    "Verdict",
    "accepted_answers",
    "load_humaneval",
    "load_tasks",
    "run_calls",
    "run_python",
    "run_tests",
    "task_of",
    "visible_calls",
]
