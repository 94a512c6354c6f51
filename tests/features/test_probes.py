"""Tests for features.probes: probe stability and streaks, thought switches, verifier scores."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.errors import ConfigError
from features.probes import (
    DEFAULT_SWITCH_WORDS,
    probe_stability,
    probe_streak,
    switch_count,
    verifier_stats,
)

NAN = math.nan
probe_lists = st.lists(
    st.sampled_from(["0.5", "1/2", "3", "3.0", "7", "", None]), min_size=0, max_size=20
)

# --------------------------------------------------------------------------------------------
# Probe stability and streaks
# --------------------------------------------------------------------------------------------


def test_probe_stability_hand_cases() -> None:
    assert probe_stability(["1", "2", "2"]) == pytest.approx(2 / 3)
    assert probe_stability(["1", "2", "2"], last=2) == 1.0
    assert probe_stability(["2", "2", "2", "1"], last=3) == pytest.approx(1 / 3)
    assert probe_stability(["1", "1/2", "0.5"]) == pytest.approx(2 / 3)  # equivalent answers
    assert probe_stability(["2"]) == 1.0  # fewer probes than `last`: those present
    assert probe_stability(["3", "2"], last=5) == 0.5
    assert probe_stability([None, "2", "2"]) == pytest.approx(2 / 3)  # None never agrees
    assert probe_stability([]) == 0.0
    assert probe_stability(["1", "1", None]) == 0.0
    assert probe_stability(["1", "1", ""]) == 0.0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_probe_stability_bad_last(bad: object) -> None:
    with pytest.raises(ConfigError, match="last must be a positive integer"):
        probe_stability(["1"], last=bad)  # type: ignore[arg-type]


def test_probe_streak_hand_cases() -> None:
    assert probe_streak(["1", "2", "2", "2"]) == 3
    assert probe_streak(["2", "2", "1"]) == 1
    assert probe_streak(["2", None, "2"]) == 1
    assert probe_streak(["1/2", "0.5", r"\frac12"]) == 3
    assert probe_streak([]) == 0
    assert probe_streak(["1", None]) == 0


@settings(max_examples=300, deadline=None)
@given(probe_lists, st.integers(1, 8))
def test_probe_stability_and_streak_properties(probes: list[str | None], last: int) -> None:
    s = probe_stability(probes, last)
    streak = probe_streak(probes)
    assert 0.0 <= s <= 1.0
    assert 0 <= streak <= len(probes)
    latest_present = bool(probes) and probes[-1] is not None and probes[-1].strip() != ""
    assert (streak > 0) == latest_present
    assert (s > 0) == latest_present
    if latest_present:
        assert s >= 1 / min(last, len(probes))
        # the streak's probes all agree; one more would not
        assert probe_stability(probes, streak) == 1.0
        if streak < len(probes):
            assert probe_stability(probes, streak + 1) < 1.0
        # stability is at least the streak's share of the window
        assert s >= min(streak, last) / min(last, len(probes)) - 1e-12


# --------------------------------------------------------------------------------------------
# Thought switches
# --------------------------------------------------------------------------------------------


def test_switch_count_hand_cases() -> None:
    text = (
        "So x = 3. Wait, that is wrong. Hmm... Alternatively, we could factor.\n"
        "Let me try the other root. Another approach: complete the square."
    )
    assert switch_count(text) == 5
    assert switch_count("wait, hmm, alternatively") == 0  # case-sensitive
    assert switch_count("Await the Waitress") == 1  # "Waitress" starts with "Wait"; "Await" not
    assert switch_count("Hmmm. (Wait) ...Wait") == 3
    assert switch_count("") == 0
    assert switch_count("Wait Wait", words=[]) == 0
    assert switch_count("But then; But no", words=["But"]) == 2
    assert switch_count("Let me try. Let me", words=["Let", "Let me try"]) == 2


def test_switch_count_bad_words() -> None:
    with pytest.raises(ConfigError, match="non-empty strings"):
        switch_count("text", words=["Wait", ""])
    with pytest.raises(ConfigError, match="sequence of strings"):
        switch_count("text", words="Wait")


TOKENS = [*DEFAULT_SWITCH_WORDS, "wait", "ok", "the", "Awaited", "Let me", "another approach"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=30), st.sampled_from([" ", "\n", ", ", ". "]))
def test_switch_count_counts_each_switch_once(tokens: list[str], sep: str) -> None:
    text = sep.join(tokens)
    assert switch_count(text) == sum(t in DEFAULT_SWITCH_WORDS for t in tokens)


# --------------------------------------------------------------------------------------------
# Verifier scores
# --------------------------------------------------------------------------------------------


def test_verifier_stats_hand_cases() -> None:
    assert verifier_stats([0.2, NAN, 0.8, 0.5]) == (0.5, 0.5, 0.2)
    assert verifier_stats([0.9, NAN]) == (0.9, 0.9, 0.9)  # NaN ignored, also when latest
    assert verifier_stats([1.0]) == (1.0, 1.0, 1.0)
    for empty in ([], [NAN, NAN]):
        assert all(math.isnan(v) for v in verifier_stats(empty))


@pytest.mark.parametrize("bad", [[1.2], [-0.1], [math.inf], [[0.5]]])
def test_verifier_stats_bad_input(bad: list[float]) -> None:
    with pytest.raises(ConfigError):
        verifier_stats(bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.floats(0.0, 1.0), st.just(NAN)), max_size=20))
def test_verifier_stats_properties(p: list[float]) -> None:
    last, mean, low = verifier_stats(p)
    vals = [x for x in p if not math.isnan(x)]
    if not vals:
        assert math.isnan(last) and math.isnan(mean) and math.isnan(low)
        return
    assert last == vals[-1]
    assert low == min(vals)
    assert low - 1e-12 <= mean <= max(vals) + 1e-12
