"""Tests for features.code: code extraction, program assembly, behaviour signatures, pass rates.

Nothing here runs code: assembled programs are only parsed.
"""

from __future__ import annotations

import ast
import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from features.answers import normalize_answer
from features.code import (
    assemble_program,
    behaviour_signature,
    extract_code,
    visible_pass_rate,
)

PROMPT = '''from typing import List


def below_zero(operations: List[int]) -> bool:
    """ Detect if the balance falls below zero.
    >>> below_zero([1, 2, 3])
    False
    """
'''

FULL = """from typing import List


def below_zero(operations: List[int]) -> bool:
    balance = 0
    for op in operations:
        balance += op
        if balance < 0:
            return True
    return False"""

CHAT = f"""Here is the completed function:

```python
{FULL}
```

The function keeps a running balance and returns `True` as soon as it drops below zero.
"""


def _defined_body(program: str, name: str) -> list[ast.stmt]:
    """The body of the last top-level definition of ``name`` in ``program``."""
    defs = [n for n in ast.parse(program).body if isinstance(n, ast.FunctionDef) and n.name == name]
    return defs[-1].body


# --------------------------------------------------------------------------------------------
# extract_code
# --------------------------------------------------------------------------------------------


def test_extracts_the_python_block_from_a_chat_answer() -> None:
    assert extract_code(CHAT, "below_zero") == FULL


@pytest.mark.parametrize("lang", ["python", "py", "Python", ""])
def test_fence_languages(lang: str) -> None:
    text = f"Sure.\n```{lang}\ndef f(x):\n    return x\n```\nDone."
    assert extract_code(text, "f") == "def f(x):\n    return x"


def test_of_two_blocks_with_the_def_the_last_wins() -> None:
    text = (
        "First try:\n```python\ndef f(x):\n    return x\n```\n"
        "Wait, that is wrong. Fixed:\n```python\ndef f(x):\n    return -x\n```\n"
    )
    assert extract_code(text, "f") == "def f(x):\n    return -x"


def test_the_block_with_the_def_beats_a_later_usage_block() -> None:
    text = (
        "```python\ndef f(x):\n    return x + 1\n```\n"
        "Example usage:\n```python\nprint(f(1))  # 2\n```\n"
    )
    assert extract_code(text, "f") == "def f(x):\n    return x + 1"


def test_a_def_of_another_name_does_not_count_as_the_def() -> None:
    text = "```python\ndef helper(x):\n    return x\n```\n```python\nprint(1)\n```"
    # neither block defines f: the last block that parses
    assert extract_code(text, "f") == "print(1)"


def test_block_without_the_def_falls_back_to_the_last_parsing_block() -> None:
    text = (
        "```python\n    return sorted(set(l))\n```\n"
        "And some pseudo-code:\n```\nfor each x in l: keep it\n```\n"
    )
    assert extract_code(text, "unique") == "    return sorted(set(l))"


def test_non_python_blocks_are_ignored() -> None:
    text = "```bash\npip install numpy\n```\n```python\ndef f():\n    return 1\n```"
    assert extract_code(text, "f") == "def f():\n    return 1"
    assert extract_code("```bash\ndef f(): pass\n```", "f") is None


def test_unfenced_code_from_the_first_import_or_def() -> None:
    text = "The answer is:\n\nimport math\n\ndef f(x):\n    return math.sqrt(x)\n"
    assert extract_code(text, "f") == "import math\n\ndef f(x):\n    return math.sqrt(x)"
    assert extract_code("Just prose, no code here.", "f") is None
    assert extract_code("Call f(x) to get it.", "f") is None


def test_unclosed_fence_counts_only_when_the_text_ended() -> None:
    text = "Here you go:\n```python\ndef f(x):\n    return x * 2\n"
    assert extract_code(text, "f", ended=False) is None
    assert extract_code(text, "f", ended=True) == "def f(x):\n    return x * 2"
    assert extract_code(text, "f") == "def f(x):\n    return x * 2"  # ended by default


def test_an_earlier_closed_block_stands_while_a_later_one_is_open() -> None:
    text = "```python\ndef f(x):\n    return 1\n```\nTests:\n```python\ndef f(x):\n    ret"
    assert extract_code(text, "f", ended=False) == "def f(x):\n    return 1"


def test_unfenced_code_needs_an_ended_text() -> None:
    assert extract_code("def f(x):\n    return", "f", ended=False) is None


def test_no_code() -> None:
    assert extract_code("", "f") is None
    assert extract_code("```python\n```", "f") is None


@given(st.text(max_size=300), st.booleans())
def test_extract_never_raises(text: str, ended: bool) -> None:
    out = extract_code(text, "f", ended=ended)
    assert out is None or isinstance(out, str)


@given(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), st.integers(-99, 99))
def test_extract_round_trips_a_fenced_def(name: str, k: int) -> None:
    code = f"def {name}(x):\n    return x + {k}"
    assert extract_code(f"Answer:\n```python\n{code}\n```\nBye.", name) == code


# --------------------------------------------------------------------------------------------
# assemble_program
# --------------------------------------------------------------------------------------------


def test_full_code_follows_the_prompt_and_redefines_the_function() -> None:
    program = assemble_program(PROMPT, FULL, "below_zero")
    assert program.startswith(PROMPT.rstrip())
    tree = ast.parse(program)
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert [d.name for d in defs] == ["below_zero", "below_zero"]
    assert isinstance(_defined_body(program, "below_zero")[-1], ast.Return)


def test_indented_full_code_is_dedented() -> None:
    code = "    def below_zero(operations):\n        return False"
    assert ast.parse(assemble_program(PROMPT, code, "below_zero"))


def test_body_only_code_becomes_the_prompt_functions_body() -> None:
    body = (
        "    balance = 0\n    for op in operations:\n        balance += op\n    return balance < 0"
    )
    program = assemble_program(PROMPT, body, "below_zero")
    stmts = _defined_body(program, "below_zero")
    assert isinstance(stmts[0], ast.Expr)  # the docstring stays first
    assert isinstance(stmts[-1], ast.Return)
    assert program.count("def below_zero") == 1


def test_unindented_body_is_indented_as_the_docstring() -> None:
    program = assemble_program(PROMPT, "return any(x < 0 for x in operations)", "below_zero")
    assert "\n    return any(" in program
    assert isinstance(_defined_body(program, "below_zero")[-1], ast.Return)


def test_body_goes_into_the_target_even_when_a_helper_follows() -> None:
    prompt = 'def target(x):\n    """Doc."""\n\n\ndef helper(y):\n    return y\n'
    program = assemble_program(prompt, "return helper(x)", "target")
    assert isinstance(_defined_body(program, "target")[-1], ast.Return)
    assert isinstance(_defined_body(program, "helper")[-1], ast.Return)


def test_assembled_program_is_a_string_even_when_broken() -> None:
    program = assemble_program(PROMPT, "def below_zero(:\n", "below_zero")
    with pytest.raises(SyntaxError):
        ast.parse(program)


# --------------------------------------------------------------------------------------------
# behaviour_signature and visible_pass_rate
# --------------------------------------------------------------------------------------------

SIGNATURE_RE = re.compile(r"code:[0-9a-f]{16}")


def test_signature_is_stable_and_formatted() -> None:
    sig = behaviour_signature(["False", "True"])
    assert SIGNATURE_RE.fullmatch(sig)
    assert sig == behaviour_signature(("False", "True"))
    assert sig != behaviour_signature(["True", "False"])  # call order matters
    assert sig != behaviour_signature(["False", "True", "None"])
    # pinned: the same on every machine and run
    assert behaviour_signature([]) == "code:4f53cda18c2baa0c"


@given(st.lists(st.text(max_size=20), max_size=6))
def test_signature_normalises_to_itself(values: list[str]) -> None:
    sig = behaviour_signature(values)
    assert SIGNATURE_RE.fullmatch(sig)
    assert normalize_answer(sig) == sig
    assert behaviour_signature(list(values)) == sig


@given(st.lists(st.text(max_size=8), max_size=4), st.lists(st.text(max_size=8), max_size=4))
def test_equal_outputs_equal_answers(a: list[str], b: list[str]) -> None:
    assert (behaviour_signature(a) == behaviour_signature(b)) == (a == b)


def test_pass_rate() -> None:
    assert visible_pass_rate([True, False, None, True]) == pytest.approx(2 / 3)
    assert visible_pass_rate([True, True]) == 1.0
    assert visible_pass_rate([False]) == 0.0
    assert visible_pass_rate([None, None]) is None
    assert visible_pass_rate([]) is None


@given(st.lists(st.sampled_from([True, False, None]), max_size=12), st.randoms())
def test_pass_rate_in_range_and_order_free(matched: list[bool | None], rnd: random.Random) -> None:
    rate = visible_pass_rate(matched)
    if all(m is None for m in matched):
        assert rate is None
    else:
        assert rate is not None and 0.0 <= rate <= 1.0
    shuffled = list(matched)
    rnd.shuffle(shuffled)
    assert visible_pass_rate(shuffled) == rate
