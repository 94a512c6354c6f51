"""The token-level bookkeeping on completions (env.generators.tokens), on a toy vocabulary where
each token id is one piece of text."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from env.generators.backend import Completion
from env.generators.tokens import (
    chunk_arrays,
    drop_stop,
    eos_trim,
    forced_answer,
    judge_p_yes,
    probe_reading,
    top_arrays,
)

VOCAB = ["4", "2", "}.", "</", "think", ">", " yes", "No", "x", "<eos>"]


def decode(ids: Sequence[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


def completion(
    ids: list[int], finish: str = "length", stop_reason: str | None = None, m: int = 2
) -> Completion:
    n = len(ids)
    return Completion(
        token_ids=np.asarray(ids, np.int32),
        text=decode(ids),
        logprobs=np.full(n, -0.5, np.float32),
        top_logprobs=np.full((n, m), -1.0, np.float32),
        top_token_ids=np.zeros((n, m), np.int32),
        finish_reason=finish,  # type: ignore[arg-type]
        prompt_tokens=10,
        cached_tokens=4,
        stop_reason=stop_reason,
    )


def test_a_forced_answer_ends_at_the_token_that_closes_it() -> None:
    # "}." closes the answer in one token: the "x" after it is not kept.
    keep, trail, text = forced_answer(completion([0, 1, 2, 8]), decode, [2])
    assert (keep, trail, text) == (3, [], "42}.")


def test_a_forced_answer_that_never_closed_gets_the_brace_appended() -> None:
    keep, trail, text = forced_answer(completion([0, 1]), decode, [2])
    assert (keep, trail, text) == (2, [2], "42}")


def test_drop_stop_removes_every_token_of_the_stop_string() -> None:
    # The engine ended on "</think>" (three tokens) and dropped it from the text only.
    comp = drop_stop(completion([0, 1, 3, 4, 5], "stop", "</think>"), ["</think>"], decode)
    assert comp.token_ids.tolist() == [0, 1]
    assert comp.text == "42"
    assert comp.logprobs.shape == (2,) and comp.top_logprobs.shape == (2, 2)


def test_drop_stop_removes_the_start_of_a_marker_cut_by_the_length() -> None:
    comp = drop_stop(completion([0, 1, 3]), ["</think>"], decode)
    assert comp.token_ids.tolist() == [0, 1]


def test_drop_stop_keeps_a_chunk_of_nothing_but_the_markers_start() -> None:
    # Dropping it would hand the same chunk back forever.
    comp = drop_stop(completion([3]), ["</think>"], decode)
    assert comp.token_ids.tolist() == [3]


def test_drop_stop_leaves_an_eos_ending_alone() -> None:
    comp = drop_stop(completion([0, 3], "stop", None), ["</think>"], decode)
    assert comp.token_ids.tolist() == [0, 3]


def test_eos_trim_drops_only_a_trailing_eos_of_a_stopped_completion() -> None:
    assert eos_trim(completion([0, 9], "stop"), 9).token_ids.tolist() == [0]
    assert eos_trim(completion([0, 9], "length"), 9).token_ids.tolist() == [0, 9]


def test_top_arrays_pad_to_the_requested_width() -> None:
    lp, ids = top_arrays(completion([0, 1], m=2), 3)
    assert lp.shape == (2, 3) and ids.shape == (2, 3)
    assert np.isneginf(lp[:, 2]).all() and (ids[:, 2] == -1).all()
    lp, ids = top_arrays(completion([0, 1], m=4), 3)
    assert lp.shape == (2, 3)


def test_injected_tokens_have_no_logprobs() -> None:
    comp = completion([0, 1])
    ids, lp, top_lp, top_id = chunk_arrays(
        [8], comp.token_ids, comp.logprobs, top_arrays(comp, 2), 2, [2]
    )
    assert ids.tolist() == [8, 0, 1, 2]
    assert np.isnan(lp[[0, 3]]).all() and (lp[1:3] == -0.5).all()
    assert np.isneginf(top_lp[[0, 3]]).all() and (top_id[[0, 3]] == -1).all()


def test_probe_reading_cuts_at_the_closing_brace() -> None:
    assert probe_reading(completion([0, 1, 2, 8], "stop"), decode) == ("42}", "42")


def test_judge_p_yes_normalises_over_yes_and_no() -> None:
    comp = completion([6], m=3)
    comp.top_logprobs = np.asarray([[math.log(0.6), math.log(0.2), math.log(0.1)]], np.float32)
    comp.top_token_ids = np.asarray([[6, 7, 8]], np.int32)
    assert judge_p_yes(comp, lambda t: VOCAB[t]) == pytest.approx(0.75)
    comp.top_token_ids = np.asarray([[8, 8, -1]], np.int32)
    assert judge_p_yes(comp, lambda t: VOCAB[t]) == 0.5
