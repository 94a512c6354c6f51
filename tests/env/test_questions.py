"""Question loaders: ids, gold answers, difficulty, seeded subsets, clear errors."""

from __future__ import annotations

import pytest

from env.questions import gsm8k_steps, load_gsm8k, load_math500, load_questions, load_testbed
from features.answers import answers_equal
from features.errors import ConfigError


def test_gsm8k_gold_and_difficulty() -> None:
    qs = load_gsm8k("test", 5)
    assert [q.qid for q in qs] == [f"gsm8k/test/{i}" for i in range(5)]
    assert qs[0].gold == "18" and qs[0].difficulty == 2  # Janet's ducks: two calculations
    assert all(1 <= (q.difficulty or 0) <= 6 for q in load_gsm8k("train", 200))


def test_seeded_subsets_are_stable_and_split_disjoint() -> None:
    a = load_gsm8k("train", 50, seed=1)
    assert [q.qid for q in a] == [q.qid for q in load_gsm8k("train", 50, seed=1)]
    assert [q.qid for q in a] != [q.qid for q in load_gsm8k("train", 50, seed=2)]
    test_ids = {q.qid for q in load_gsm8k("test", 50, seed=1)}
    assert not test_ids & {q.qid for q in a}


def test_math500_levels() -> None:
    qs = load_math500("test", 20)
    assert all(q.difficulty in (1, 2, 3, 4, 5) for q in qs)
    assert all(q.gold for q in qs)


def test_testbed_questions_cover_levels() -> None:
    qs = load_testbed("test", 2)
    assert sorted({q.difficulty for q in qs}) == list(range(1, 9))
    assert all(answers_equal(q.gold, q.gold) for q in qs)
    assert load_questions("arith", "test", 16)[0].dataset == "arith"


def test_steps_and_errors() -> None:
    assert gsm8k_steps("a <<1+1=2>> b <<2*3=6>>\n#### 6") == 2
    assert gsm8k_steps("no calculator annotations\n#### 6") == 1
    with pytest.raises(ConfigError, match="split"):
        load_gsm8k("dev")
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_questions("squad")
    with pytest.raises(ConfigError, match=">= 0"):
        load_gsm8k("test", -1)


def test_factual_questions_ship_with_their_licence_and_split_in_halves() -> None:
    from env.questions import DATA_DIR, load_factual, question_split

    licence = (DATA_DIR / "factual" / "LICENSE").read_text()
    assert "CC BY-SA 3.0" in licence and "Kwiatkowski" in licence
    train, test = load_factual("train"), load_factual("test")
    assert len(train) + len(test) == 3610 and 1700 < len(train) < 1900
    assert {question_split(q) for q in train} == {"train"}
    assert not {q.text for q in train} & {q.text for q in test}
    q = next(q for q in test if q.text == "When was the last time anyone was on the moon?")
    assert q.gold == "14 December 1972 UTC" and q.dataset == "factual"
    # any alias is right, in any case or spacing; another answer is not
    assert q.is_right("December 1972") and q.is_right("december 1972")
    assert q.is_right("14 December 1972 UTC") and not q.is_right("1972")
    assert load_questions("factual", "test", 5, seed=0) == load_factual("test", 5, seed=0)


def test_factual_aliases_drop_articles_and_punctuation() -> None:
    from env.questions import load_factual

    with_article = [
        q for q in load_factual(None) if any(a.startswith("the") for a in q.accepted or ())
    ]
    assert with_article
    q = with_article[0]
    bare = next(a for a in q.accepted or () if not a.startswith("the"))
    assert q.is_right(bare)
