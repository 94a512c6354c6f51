"""HumanEval tasks: visible calls parsed from the docstrings, the fixed split, question ids, and
that hidden tests never reach a question. Nothing from the data set is executed."""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

import pytest

from env.code.humaneval import (
    DEFAULT_PATH,
    CodeTask,
    code_question,
    load_humaneval,
    load_tasks,
    task_of,
    task_split,
    visible_calls,
)
from env.code.types import Call
from env.questions import question_split
from features.code import assemble_program
from features.errors import ConfigError


@pytest.fixture(scope="module")
def tasks() -> dict[int, CodeTask]:
    return {t.index: t for t in load_tasks()}


def calls(tasks: dict[int, CodeTask], index: int) -> list[tuple[str, str | None]]:
    t = tasks[index]
    parsed = visible_calls(t.prompt, t.entry_point)
    assert tuple(parsed) == t.visible
    return [(c.args, c.expected) for c in parsed]


def test_the_shipped_file(tasks: dict[int, CodeTask]) -> None:
    assert sorted(tasks) == list(range(164))
    t = tasks[17]
    assert t.task_id == "HumanEval/17" and t.entry_point == "parse_music"
    assert "def check(candidate)" in t.test and t.canonical_solution.strip()
    assert (DEFAULT_PATH.parent / "LICENSE-humaneval").exists()


# --------------------------------------------------------------------------------------------
# visible_calls, one real prompt per format
# --------------------------------------------------------------------------------------------


def test_doctest_calls(tasks: dict[int, CodeTask]) -> None:
    assert calls(tasks, 0) == [
        ("[1.0, 2.0, 3.0], 0.5", "False"),
        ("[1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3", "True"),
    ]
    # no output line is doctest's None
    assert calls(tasks, 12) == [
        ("[]", "None"),
        ("['a', 'b', 'c']", "'a'"),
        ("['a', 'bb', 'ccc']", "'ccc'"),
    ]
    # escapes stay as written in the source
    assert calls(tasks, 51)[1] == ('"abcdef\\nghijklm"', "'bcdf\\nghjklm'")


def test_doctest_output_over_several_lines(tasks: dict[int, CodeTask]) -> None:
    assert calls(tasks, 113)[1] == (
        "['3',\"11111111\"]",
        '["the number of odd elements 1n the str1ng 1 of the 1nput.", '
        '"the number of odd elements 8n the str8ng 8 of the 8nput."]',
    )


def test_doctest_with_an_inline_comparison(tasks: dict[int, CodeTask]) -> None:
    assert calls(tasks, 108) == [("[]", "0"), ("[-1, 11, -11]", "1"), ("[1, 1, 2]", "3")]
    # ">>> f(x) [0, 1]" (no operator): the call stays, without an expected value
    assert calls(tasks, 116)[2] == ("[1, 0, 2, 3, 4]", None)


def test_a_call_inside_an_expression_has_no_expected_value(tasks: dict[int, CodeTask]) -> None:
    assert calls(tasks, 32) == [("[1, 2]", None), ("[-6, 11, -6, 1]", None)]


@pytest.mark.parametrize(
    ("index", "first"),
    [
        (69, ("[4, 1, 2, 2, 3, 1]", "2")),  # ==
        (77, ("1", "True")),  # ==>
        (109, ("[3, 4, 5, 1, 2]", "True")),  # ==> with no spaces
        (76, ("1, 4", "True")),  # => true
        (72, ("[1, 2], 5", "False")),  # ➞
        (46, ("0", "0")),  # ->
        (67, ('"5 apples and 6 oranges", 19', "8")),  # -> 19 - 5 - 6 = 8
        (151, ("[1, 3, 2, 0]", "10")),  # == 1 + 9 + 0 + 0 = 10
        (102, ("12, 15", "14")),  # =
        (97, ("148, 412", "16")),  # should return 16.
        (86, ("'Hi'", "'Hi'")),  # returns
        (79, ("15", '"db1111db"')),  # # returns
        (141, ('"example.txt"', "'Yes'")),  # # =>
        (150, ("7, 34, 12", "34")),  # for f(x) == v
    ],
)
def test_separator_formats(tasks: dict[int, CodeTask], index: int, first: tuple[str, str]) -> None:
    assert calls(tasks, index)[0] == first


def test_separator_formats_whole_prompts(tasks: dict[int, CodeTask]) -> None:
    assert calls(tasks, 67) == [
        ('"5 apples and 6 oranges", 19', "8"),
        ('"0 apples and 1 oranges",3', "2"),
        ('"2 apples and 3 oranges", 100', "95"),
        ('"100 apples and 1 oranges",120', "19"),
    ]
    assert calls(tasks, 141) == [('"example.txt"', "'Yes'"), ('"1example.dll"', "'No'")]
    # prose: "closest_integer("14.5") should\n return 15 and closest_integer("-14.5") should ..."
    assert calls(tasks, 99) == [
        ('"10"', "10"),
        ('"15.3"', "15"),
        ('"14.5"', "15"),
        ('"-14.5"', "-15"),
    ]


def test_arguments_over_several_lines(tasks: dict[int, CodeTask]) -> None:
    assert calls(tasks, 87)[0] == (
        "[[1,2,3,4,5,6], [1,2,3,4,1,6], [1,2,3,4,5,1]], 1",
        "[(0, 0), (1, 4), (1, 0), (2, 5), (2, 0)]",
    )


def test_input_output_pairs(tasks: dict[int, CodeTask]) -> None:
    assert calls(tasks, 68) == [
        ("[4,2,3]", "[2, 1]"),
        ("[1,2,3]", "[2, 1]"),
        ("[]", "[]"),
        ("[5, 0, 3, 0, 4, 2]", "[0, 1]"),
    ]
    assert calls(tasks, 120) == [
        ("[-3, -4, 5], 3", "[-4, -3, 5]"),
        ("[4, -4, 4], 2", "[4, 4]"),
        ("[-3, 2, 1, 2, -1, -2, 1], 1", "[2]"),
    ]
    # "Input:" then "grid : [...]" and "bucket_capacity : 1" lines; "Output: 24 # comment"
    assert calls(tasks, 115)[0] == ("[[0,0,1,0], [0,1,0,0], [1,1,1,1]], 1", "6")
    assert calls(tasks, 122) == [("[111,21,3,4000,5,6,7,8,9], 4", "24")]


def test_for_assignments_the_output_should_be(tasks: dict[int, CodeTask]) -> None:
    assert calls(tasks, 142) == [("[1,2,3]", "6"), ("[]", "0"), ("[-1,-5,2,-1,-5]", "-126")]
    assert calls(tasks, 112)[0] == ('"abcde", "ae"', "('bcd',False)")
    # "For N = 1000, the sum of digits will be 1 the output should be "1"."
    assert calls(tasks, 84) == [("1000", '"1"'), ("150", '"110"'), ("147", '"1100"')]


def test_other_functions_and_prompts_without_examples(tasks: dict[int, CodeTask]) -> None:
    assert calls(tasks, 38) == []  # only the helper encode_cyclic, no examples
    assert calls(tasks, 81) == []  # the examples call grade_equation
    assert calls(tasks, 149) == []  # the examples call list_sort
    assert calls(tasks, 80) == []  # is_happy(a): not a literal
    # next_smallest() in prose does not fit the parameters
    assert calls(tasks, 90) == [
        ("[1, 2, 3, 4, 5]", "2"),
        ("[5, 1, 4, 3, 2]", "2"),
        ("[]", "None"),
        ("[1, 1]", "None"),
    ]


def test_expected_values_that_disagree_in_type(tasks: dict[int, CodeTask]) -> None:
    # the prose defines tri(n) as numbers, the example returns a list: the example wins
    assert calls(tasks, 130) == [("1", None), ("2", None), ("4", None), ("3", "[1, 3, 2, 8]")]
    # mixed types after one heading are all kept
    assert calls(tasks, 125)[-1] == ('"abcdef"', "3")


def test_unparseable_expected_values_keep_the_call(tasks: dict[int, CodeTask]) -> None:
    assert calls(tasks, 158)[-1] == ('["aaaaaaa", "bb" ,"cc"]', None)  # == ""aaaaaaa"


def test_synthetic_prompts() -> None:
    prompt = '''def f(x, y=0):
    """Doubles.
    >>> f(1)
    2
    >>> f(1)
    2
    >>> f(2, 3, 4)
    9
    f([1]) == [1, 1]
    f(x) == 2 * x
    f(y=3) == 6
    g(3) == 6
    """
'''
    assert visible_calls(prompt, "f") == [Call("1", "2"), Call("[1]", "[1, 1]")]
    assert visible_calls(prompt, "g") == []
    assert visible_calls("def f(x):\n    return x\n", "f") == []
    assert visible_calls("def f(:\n", "f") == []
    assert visible_calls('def f(x):\n    """f(1) == 2 and f(1) == 3"""\n', "f") == [Call("1", "2")]


def test_every_call_is_literal(tasks: dict[int, CodeTask]) -> None:
    for t in tasks.values():
        for c in t.visible:
            call = ast.parse(f"f({c.args})", mode="eval").body
            assert isinstance(call, ast.Call) and not call.keywords
            for a in call.args:
                ast.literal_eval(a)
            if c.expected is not None:
                ast.literal_eval(c.expected)
        assert len({c.args for c in t.visible}) == len(t.visible)


def test_counts_over_all_tasks(tasks: dict[int, CodeTask]) -> None:
    ts = tasks.values()
    assert sum(bool(t.visible) for t in ts) >= 155
    assert sum(any(c.expected is not None for c in t.visible) for t in ts) >= 154
    assert sum(len(t.visible) for t in ts) >= 452
    assert sum(c.expected is not None for t in ts for c in t.visible) >= 445


# --------------------------------------------------------------------------------------------
# Split, questions, ids
# --------------------------------------------------------------------------------------------


def test_split_is_half_and_half_disjoint_and_stable(tasks: dict[int, CodeTask]) -> None:
    ts = list(tasks.values())
    test_ids = {t.task_id for t in ts if task_split(t) == "test"}
    train_ids = {t.task_id for t in ts if task_split(t) == "train"}
    assert len(test_ids) == len(train_ids) == 82 and not test_ids & train_ids
    # independent of the file's order
    assert {t.task_id for t in ts if task_split(t, ts[::-1]) == "test"} == test_ids
    test_qs = load_humaneval("test")
    assert {f"HumanEval/{q.qid.rsplit('/', 1)[1]}" for q in test_qs} == test_ids
    assert [q.qid for q in test_qs] == [q.qid for q in load_humaneval("test")]
    assert len(load_humaneval("train")) == 82


def test_split_is_stratified_by_prompt_length(tasks: dict[int, CodeTask]) -> None:
    lengths = {
        s: sorted(len(t.prompt) for t in tasks.values() if task_split(t) == s)
        for s in ("train", "test")
    }
    for s in lengths.values():
        assert len(s) == 82
    # paired by length: the halves' medians are close
    assert abs(lengths["train"][41] - lengths["test"][41]) < 50


def test_questions(tasks: dict[int, CodeTask]) -> None:
    for split in ("train", "test"):
        qs = load_humaneval(split)
        indices = [int(q.qid.rsplit("/", 1)[1]) for q in qs]
        assert indices == sorted(indices)
        for q in qs:
            t = tasks[int(q.qid.rsplit("/", 1)[1])]
            assert q.qid == f"humaneval/{split}/{t.index}"
            assert question_split(q) == split
            assert q.dataset == "humaneval" and q.gold is None and q.difficulty is None
            assert q.text == t.prompt and q.context == ()
            # the hidden tests never reach a question
            assert "def check(" not in q.text and "candidate" not in q.text
            assert t.test.strip() not in q.text
            assert task_of(q.qid) is t


def test_golds_by_task_id_and_seeded_subsets() -> None:
    qs = load_humaneval("test")
    first = qs[0]
    task_id = f"HumanEval/{first.qid.rsplit('/', 1)[1]}"
    with_gold = load_humaneval("test", golds={task_id: "code:0123456789abcdef"})
    assert with_gold[0].gold == "code:0123456789abcdef"
    assert all(q.gold is None for q in with_gold[1:])
    a = load_humaneval("test", 10, seed=1)
    assert [q.qid for q in a] == [q.qid for q in load_humaneval("test", 10, seed=1)]
    assert [q.qid for q in a] != [q.qid for q in load_humaneval("test", 10, seed=2)]
    assert [q.qid for q in load_humaneval("test", 3)] == [q.qid for q in qs[:3]]


def test_repr_hides_the_tests(tasks: dict[int, CodeTask]) -> None:
    t = tasks[0]
    text = repr(t)
    assert "HumanEval/0" in text and "has_close_elements" in text
    assert "check" not in text and "candidate" not in text and t.canonical_solution not in text


def test_code_question(tasks: dict[int, CodeTask]) -> None:
    q = code_question(tasks[5], "train", gold="code:ffffffffffffffff")
    assert q.qid == "humaneval/train/5" and q.gold == "code:ffffffffffffffff"
    with pytest.raises(ConfigError, match="split"):
        code_question(tasks[5], "dev")


def test_errors(tasks: dict[int, CodeTask], tmp_path: Path) -> None:
    missing = tmp_path / "none.jsonl.gz"
    with pytest.raises(ConfigError, match=r"none\.jsonl\.gz.*data/"):
        load_tasks(missing)
    with pytest.raises(ConfigError, match="split"):
        load_humaneval("dev")
    with pytest.raises(ConfigError, match=">= 0"):
        load_humaneval("test", -1)
    with pytest.raises(ConfigError, match="not a HumanEval question id"):
        task_of("gsm8k/test/3")
    with pytest.raises(ConfigError, match="no HumanEval task"):
        task_of("humaneval/test/999")
    wrong = "train" if task_split(tasks[3]) == "test" else "test"
    with pytest.raises(ConfigError, match="wrong split"):
        task_of(f"humaneval/{wrong}/3")
    with pytest.raises(ConfigError, match="not among"):
        task_split(tasks[3], [tasks[4], tasks[5]])
    broken = tmp_path / "broken.jsonl.gz"
    with gzip.open(broken, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"task_id": "HumanEval/0"}) + "\n")
    with pytest.raises(ConfigError, match="unreadable"):
        load_tasks(broken)


def test_a_task_file_of_ones_own(tmp_path: Path) -> None:
    path = tmp_path / "tiny.jsonl.gz"
    rows = [
        {
            "task_id": f"HumanEval/{i}",
            "prompt": f'def f{i}(x):\n    """>>> f{i}({i})\n    {i}\n    """\n',
            "entry_point": f"f{i}",
            "canonical_solution": "    return x\n",
            "test": "def check(candidate):\n    assert candidate(1) == 1\n",
        }
        for i in range(3)
    ]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    own = load_tasks(path)
    assert [t.visible for t in own] == [(Call(str(i), str(i)),) for i in range(3)]
    splits = [task_split(t, own) for t in own]
    assert sorted(splits) == ["test", "test", "train"]
    t = next(t for t in own if task_split(t, own) == "train")
    assert task_of(f"humaneval/train/{t.index}", own) is t


def test_programs_assemble_from_every_prompt(tasks: dict[int, CodeTask]) -> None:
    """The canonical solutions, as a body and as a whole ``def``, assemble into programs that
    parse (parsed only, never run)."""
    for t in tasks.values():
        body_only = assemble_program(t.prompt, t.canonical_solution, t.entry_point)
        defs = [
            n
            for n in ast.parse(body_only).body
            if isinstance(n, ast.FunctionDef) and n.name == t.entry_point
        ]
        assert len(defs) == 1 and len(defs[0].body) >= 2
        header = next(
            line for line in t.prompt.splitlines() if line.startswith(f"def {t.entry_point}(")
        )
        whole = assemble_program(t.prompt, f"{header}\n{t.canonical_solution}", t.entry_point)
        assert whole.startswith(t.prompt.rstrip())
        assert ast.parse(whole)
