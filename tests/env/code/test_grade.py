"""Execution grading (env.code.grade), code banks (record, store, info) and their scoring."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from env.bank.cli import BankInfoArgs, info
from env.bank.schema import EXECUTION_KEY
from env.bank.store import TraceBank
from env.code.grade import NO_EVIDENCE, ChainExecution, CodeGrader, accepted_answers
from env.code.humaneval import CodeTask, load_tasks, task_of
from env.code.reference import reference_answers
from env.questions import load_questions
from env.types import Question
from features.answers import judged_correct


def _task(index: int = 0) -> CodeTask:  # HumanEval/0: has_close_elements
    return next(t for t in load_tasks() if t.index == index)


def _fenced(code: str) -> str:
    return f"Sure.\n```python\n{code}```\nThat is all."


def test_the_reference_solution_is_right_and_is_the_gold_answer() -> None:
    t = _task(0)
    g = CodeGrader(t)
    e = g.grade(3, _fenced(t.prompt + t.canonical_solution))
    assert e.chain == 3 and e.passed and e.verdict == "ok"
    assert e.visible_pass == 1.0 and len(e.visible) == len(t.visible)
    assert e.answer == reference_answers()[t.task_id]


def test_a_wrong_program_fails_and_has_another_answer() -> None:
    t = _task(0)
    g = CodeGrader(t)
    right = g.grade(0, _fenced(t.prompt + t.canonical_solution))
    wrong = g.grade(1, _fenced(t.prompt + "    return False\n"))
    assert not wrong.passed and wrong.verdict == "error" and "AssertionError" in wrong.detail
    assert wrong.answer is not None and wrong.answer != right.answer
    assert wrong.visible_pass is not None and wrong.visible_pass < 1.0
    # the same outputs on the visible calls: the same answer, whatever the code looks like
    same = g.grade(2, _fenced(t.prompt + "    return len(numbers) < 0\n"))
    assert same.answer == wrong.answer


def test_a_chain_without_code_has_no_answer_and_no_evidence() -> None:
    g = CodeGrader(_task(0))
    assert g.read("I am still thinking about", ended=False) == (None, NO_EVIDENCE)
    e = g.grade(0, "No code here.")
    assert e.answer is None and not e.passed and e.verdict == "none"
    # an open code block is not read until the chain has ended
    t = _task(0)
    assert g.read("```python\n" + t.prompt + t.canonical_solution, ended=False) == (
        None,
        NO_EVIDENCE,
    )


def test_each_program_runs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import env.code.grade as grade

    calls = {"visible": 0, "hidden": 0}
    real_calls, real_tests = grade.run_calls, grade.run_tests

    def count_calls(*a, **k):  # type: ignore[no-untyped-def]
        calls["visible"] += 1
        return real_calls(*a, **k)

    def count_tests(*a, **k):  # type: ignore[no-untyped-def]
        calls["hidden"] += 1
        return real_tests(*a, **k)

    monkeypatch.setattr(grade, "run_calls", count_calls)
    monkeypatch.setattr(grade, "run_tests", count_tests)
    t = _task(0)
    g = CodeGrader(t)
    text = _fenced(t.prompt + t.canonical_solution)
    for i in range(3):
        g.read(text, ended=True)
        g.grade(i, text)
    assert calls == {"visible": 1, "hidden": 1}


def test_a_class_is_right_when_at_least_half_its_programs_pass() -> None:
    def ex(chain: int, answer: str | None, passed: bool) -> ChainExecution:
        return ChainExecution(chain, answer, (), None, passed, "ok", "", "")

    execs = [
        ex(0, "code:a", True),
        ex(1, "code:a", False),  # a: 1 of 2 pass -> right
        ex(2, "code:b", False),
        ex(3, "code:b", False),
        ex(4, "code:b", True),  # b: 1 of 3 -> wrong
        ex(5, None, True),  # no code: in no class
        ex(6, "code:c", True),
    ]
    assert accepted_answers(execs) == ("code:a", "code:c")
    assert accepted_answers([]) == ()
    e = execs[0]
    assert ChainExecution.from_json(json.loads(json.dumps(e.as_json()))) == e


def test_judged_correct_uses_accepted_classes_when_given() -> None:
    assert judged_correct("code:a", "code:z", ("code:a",))
    assert not judged_correct("code:z", "code:z", ("code:a",))  # gold does not count then
    assert not judged_correct("code:z", "code:z", ())  # graded: no class is right
    assert judged_correct("42", "42.0")  # math: equality with the gold answer
    q = Question("humaneval/test/0", "p", gold="code:z", dataset="humaneval")
    assert q.is_code and q.scorable and q.is_right("code:z")
    assert Question("q", "t", accepted=()).scorable


def test_humaneval_questions_carry_the_reference_answer_and_no_test() -> None:
    qs = load_questions("humaneval", "test", 5, seed=0)
    assert len(qs) == 5 and all(q.is_code and q.gold and q.gold.startswith("code:") for q in qs)
    for q in qs:
        assert q.gold == reference_answers()[task_of(q.qid).task_id]
        assert "def check(" not in q.text


def test_a_recorded_code_bank_keeps_every_chains_execution(
    code_bank: Path, wrong_for: Callable[[int], bool]
) -> None:
    bank = TraceBank(code_bank)
    assert len(bank) == 6 and bank.manifest.dataset == "humaneval"
    assert bank.manifest.template == "code"
    for qt in bank:
        wrong = wrong_for(task_of(qt.question.qid).index)
        assert qt.execution is not None
        assert [c["passed"] for c in qt.execution["chains"]] == [not wrong] * 4
        # one behaviour class (the fake writes the same program every time), right or not
        assert len({c.answer for c in qt.chains}) == 1
        assert qt.question.accepted == (() if wrong else (qt.chains[0].answer,))
        assert all(c.correct == (not wrong) for c in qt.chains)
        rows = qt.chains[0].rows
        # boundaries: the code is read (free) once its block has closed, and verify runs the
        # visible examples; before that there is no answer and no evidence
        assert rows["probe_tokens"] == [0] * len(rows["probe_tokens"])
        assert rows["probe_answer"][-1] == qt.chains[0].answer
        assert rows["probe_answer"][0] is None and rows["judge_p_yes"][0] == NO_EVIDENCE
        assert rows["probe_correct"][-1] == (not wrong)
        assert rows["judge_p_yes"][-1] == pytest.approx(qt.execution["chains"][0]["visible_pass"])
    # the results are in the chunk file itself (written atomically with the chunks)
    import pyarrow.parquet as pq

    meta = pq.read_metadata(bank.chunk_file(0)).metadata
    assert EXECUTION_KEY in meta


def test_bank_info_prints_execution_results_by_problem(
    code_bank: Path, capsys: pytest.CaptureFixture[str], wrong_for: Callable[[int], bool]
) -> None:
    stats = info(BankInfoArgs(path=code_bank))
    out = capsys.readouterr().out
    assert "execution results by problem" in out and "verified" in out
    bank = TraceBank(code_bank)
    rights = [not wrong_for(task_of(q).index) for q in bank.recorded]
    assert stats["code"]["pass@1"] == pytest.approx(sum(rights) / len(rights))
    assert stats["code"]["verified"] == stats["code"]["pass@k"] == stats["code"]["pass@1"]
    for qid in bank.recorded:
        assert qid in out
    as_json = info(BankInfoArgs(path=code_bank, json=True))
    assert as_json["code"] == stats["code"]
    assert json.loads(capsys.readouterr().out)["code"]["problems"] == 6


def test_a_damaged_execution_record_is_refused(code_bank: Path, tmp_path: Path) -> None:
    import shutil

    import pyarrow.parquet as pq

    from env.bank.writer import encode_chunk_table
    from features.errors import BankError

    copy = tmp_path / "b"
    shutil.copytree(code_bank, copy)
    f = TraceBank(copy).chunk_file(0)
    table = pq.read_table(f)
    table = table.replace_schema_metadata({**table.schema.metadata, EXECUTION_KEY: b"{oops"})
    f.write_bytes(encode_chunk_table(table))
    with pytest.raises(BankError, match="execution results"):
        TraceBank(copy)[TraceBank(copy).recorded[0]]


def test_replayed_code_episodes_score_alike_in_both_envs(code_bank: Path) -> None:
    """The single env (which reads ended chains by running their code) and the batched replay
    (which reads the recorded answers and the accepted classes) agree step by step."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "episode"))
    from test_vector import _lockstep

    bank = TraceBank(code_bank)
    reasons, steps = _lockstep(bank, n_envs=4, rounds=3, seed=3)
    assert steps > 0 and sum(reasons.values()) == 12


def test_the_execution_verifier_scores_visible_examples() -> None:
    from env.code.humaneval import code_question, task_split
    from env.types import Chain
    from env.verifiers import ExecutionVerifier
    from features.errors import ConfigError

    t = _task(0)
    q = code_question(t, task_split(t))

    def chain(i: int, text: str, q: Question = q) -> Chain:
        return Chain(i, q, "cot", [], prefix_text=text, finished=True)

    v = ExecutionVerifier()
    a, b, c = v.judge(
        [
            chain(0, _fenced(t.prompt + t.canonical_solution)),
            chain(1, _fenced(t.prompt + "    return False\n")),
            chain(2, "no code yet"),
        ]
    )
    assert (a.p_yes, c.p_yes) == (1.0, NO_EVIDENCE) and b.p_yes < 1.0
    assert a.usage.judge == b.usage.judge == 1 and v.can_judge
    with pytest.raises(ConfigError, match="not code"):
        v.judge([chain(0, "4", Question("gsm8k/test/0", "2+2?", gold="4"))])


@pytest.mark.timeout(600)
def test_the_main_job_runs_on_a_code_bank(code_bank: Path, tmp_path: Path) -> None:
    """`ponder run --quick` on a code bank: every family, and the execution-verification
    target beside maj@16's."""
    import subprocess
    import sys

    args = f"run --bank {code_bank} --quick --no-track --out {tmp_path / 'out'} --no-progress"
    # An 80-column terminal, the narrowest the tables meet (and what a pytest process that
    # loaded readline hands its children): the numbers squeeze, the families' names stay whole.
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run(
        [sys.executable, "-m", "controller.cli", *args.split(), "--results-dir", ""],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = " ".join(proc.stdout.split())
    assert "best-of-N-verifier" in text and "adaptive-consistency" in text and "verify-stop" in text
    assert "matches best-of-4-verifier with" in text and "target <= 30%" in text
    assert "ppo-chain" in text
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # the execution-verification target is kept in the results file and in the report
    from policies.evaluation.markdown import render

    ver, targets = results["verified_reference"], results["verified_targets"]
    assert ver["label"] == "best-of-N-verifier N=4" and 0 < ver["accuracy"][0] <= 1
    assert {t["family"] for t in targets} >= {"ppo-chain", "stop-chain"}
    for t in targets:
        assert t["reference"] == "best-of-4-verifier" and len(t["share_interval"]) == 2
        if t["share"] is not None:
            low, high = t["share_interval"]
            assert low is not None and (high == "inf" or low <= t["share"] <= high)
    report = render(results)
    assert "Against execution verification (a code bank): best-of-4-verifier" in report
    assert "| reaches best-of-4-verifier with [95% interval] |" in report


def test_the_shipped_reference_answers_are_what_the_references_give_now() -> None:
    from env.code.reference import reference_answer

    shipped = reference_answers()
    tasks = load_tasks()
    assert set(shipped) == {t.task_id for t in tasks}
    changed = [t.task_id for t in tasks if reference_answer(t) != shipped[t.task_id]]
    assert not changed, f"rewrite data/code/humaneval-reference.json: {changed}"


def test_verify_stop_stops_at_the_first_program_that_passes_its_examples(
    code_bank: Path, wrong_for: Callable[[int], bool]
) -> None:
    """verify-stop on the fake code bank: a right program passes its docstring's examples, so
    one chain and one verification decide; a wrong one never passes, so every chain is drawn.
    It answers as best-of-N by execution verification does, with fewer tokens."""
    from policies.evaluation.runner import evaluate
    from policies.registry import load_policy

    bank = TraceBank(code_bank)
    stop = evaluate(load_policy("verify-stop-1"), bank, split="test", seeds=2, difficulty=None)
    full = evaluate(load_policy("best-of-4-verifier"), bank, split="test", seeds=2, difficulty=None)
    assert stop.config.aggregate == "verifier"
    k = bank.manifest.chains
    for e in stop.episodes:
        index = int(e.qid.rsplit("/", 1)[1])
        assert e.chains == (k if wrong_for(index) else 1), (e.qid, e.chains)
        assert e.correct is not wrong_for(index)
    assert [e.correct for e in stop.episodes] == [e.correct for e in full.episodes]
    assert stop.tokens.mean < full.tokens.mean


def test_the_main_jobs_aggregate_follows_the_bank(code_bank: Path) -> None:
    """--aggregate auto: the verifier's vote on a code bank (execution), confidence on math;
    a value given is kept."""
    import dataclasses

    from policies.bank_run import resolved_aggregate
    from policies.main import RunArgs

    code = TraceBank(code_bank)
    gsm8k = TraceBank(Path(__file__).parents[3] / "data" / "banks" / "gsm8k-qwen2.5-coder-1.5b")
    assert RunArgs().aggregate == "auto"
    assert resolved_aggregate(RunArgs(), code).aggregate == "verifier"
    assert resolved_aggregate(RunArgs(), gsm8k).aggregate == "confidence"
    given = dataclasses.replace(RunArgs(), aggregate="majority")
    assert resolved_aggregate(given, code).aggregate == "majority"


def test_the_stop_policy_verifies_each_chain_on_a_code_bank(code_bank: Path) -> None:
    """With the verifier's vote the learned stop policy scores every chain as it ends: its
    training states all hold every chain's score, it verifies an ended chain before deciding,
    and it answers as best-of-N by execution does. With confidence it never verifies."""
    from env.episode.observation import FEATURE_NAMES
    from policies.base import VERIFY
    from policies.evaluation.runner import evaluate
    from policies.learned.replay import replay_env
    from policies.learned.stop import StopArgs, settled_rows, train_stop_policy
    from policies.registry import load_policy

    verified, can_verify = FEATURE_NAMES.index("verified"), FEATURE_NAMES.index("can_verify")
    kw: dict[str, object] = {"orders": 2, "num_envs": 8, "eval_seeds": 0, "progress": False}
    for aggregate in ("verifier", "confidence"):
        config = {"aggregate": aggregate}
        env = replay_env(TraceBank(code_bank), StopArgs(num_envs=8, config=config), None)
        rows = settled_rows(env, 8, seed=0)
        assert (rows.obs[:, verified] == (1.0 if aggregate == "verifier" else 0.0)).all()
        stop = train_stop_policy(code_bank, config=config, **kw)
        obs = rows.obs[:1].copy()
        obs[:, can_verify] = 1.0  # a chain that just ended, not yet scored
        stop.reset(1)
        assert bool(stop.act(obs)[0] == VERIFY) == (aggregate == "verifier")
    full = evaluate(load_policy("best-of-4-verifier"), code_bank, split="test", seeds=2)
    stop = train_stop_policy(code_bank, config={"aggregate": "verifier"}, **kw)
    r = evaluate(stop.with_lam(1e-9), code_bank, split="test", seeds=2, difficulty=None)
    assert [e.correct for e in r.episodes] == [e.correct for e in full.episodes]
