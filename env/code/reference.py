"""The gold answers of HumanEval: each reference solution's behaviour class on its visible calls.

A code question's gold answer is the answer its reference solution (``canonical_solution``)
gives: the behaviour class of its outputs on the calls the prompt shows
(:mod:`env.code.grade`). A bank's execution results (the classes whose programs pass the
hidden tests) take precedence when scoring recorded chains; the gold answer scores a code
question where no bank has graded it (a live episode): there it means "behaves like the
reference on the visible calls", which the hidden tests can still fail.

Running 164 reference solutions takes the sandbox about half a minute, so the classes ship in
``data/code/humaneval-reference.json``; ``python -m env.code.reference`` rewrites that file,
and a test checks it against fresh runs.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

from env.code.grade import CodeGrader
from env.code.humaneval import CodeTask, load_tasks
from env.questions import DATA_DIR
from features.errors import ConfigError

__all__ = [
    "REFERENCE_FILE",
    "reference_answer",
    "reference_answers",
    "reference_script",
    "write_reference",
]

log = logging.getLogger(__name__)

REFERENCE_FILE = DATA_DIR / "code" / "humaneval-reference.json"


def reference_answer(task: CodeTask) -> str:
    """The behaviour class of ``task``'s reference solution (runs it in the sandbox)."""
    text = f"```python\n{task.prompt}{task.canonical_solution}```"
    answer, _ = CodeGrader(task).read(text, ended=True)
    if answer is None:
        raise ConfigError(f"{task.task_id}: its reference solution could not be read as code")
    return answer


def reference_script() -> dict[str, str]:
    """A script for :class:`env.generators.fake.FakeGenerator` that answers every HumanEval
    prompt with its reference solution in a code block (``ponder record --model fake
    --dataset humaneval``: tests of the recorder, not a model)."""
    return {
        t.prompt: f"Here is the function.\n```python\n{t.prompt}{t.canonical_solution}```"
        for t in load_tasks()
    }


@lru_cache(maxsize=4)
def _load(path: Path) -> dict[str, str]:
    if not path.exists():
        raise ConfigError(
            f"{path} is missing: it ships in the repository's data/ folder "
            "(`python -m env.code.reference` rewrites it)"
        )
    d = json.loads(path.read_text())
    if not isinstance(d, dict) or not all(isinstance(v, str) for v in d.values()):
        raise ConfigError(f"{path} is not the JSON object of task id -> answer ponder writes")
    return dict(d)


def reference_answers(path: Path | None = None) -> dict[str, str]:
    """Task id -> the behaviour class of its reference solution, from the shipped file."""
    return dict(_load(path or REFERENCE_FILE))


def write_reference(path: Path | None = None) -> Path:
    """Run every reference solution and write the classes (``python -m env.code.reference``)."""
    from tqdm import tqdm

    out = path or REFERENCE_FILE
    answers = {t.task_id: reference_answer(t) for t in tqdm(load_tasks(), desc="references")}
    out.write_text(json.dumps(answers, indent=1, sort_keys=True) + "\n")
    _load.cache_clear()
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(write_reference())
