"""The code domain: HumanEval questions, a sandbox for model-written code, execution verification.

Model-written code only ever runs through :mod:`env.code.sandbox` (a separate process with
limits on time, memory, processes and output, no network, a temporary folder). Hidden unit
tests decide correctness only: they live in :class:`env.code.humaneval.CodeTask`, never in the
:class:`env.types.Question` a policy sees.
"""

from __future__ import annotations

from env.code.types import Call, CallOutcome, TestVerdict, Verdict

__all__ = ["Call", "CallOutcome", "TestVerdict", "Verdict"]
