"""A damaged ``policy.json`` is a PolicyError naming the file, whatever the damage (issue 26)."""

from __future__ import annotations

from pathlib import Path

import pytest

from features.errors import PolicyError
from policies.serialize import read_policy_files


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,  # deeper than the JSON parser's stack
        '{"format": ' + "9" * 10_000 + "}",  # longer than Python converts to an int
        "{not json",
        "\udcff",  # not UTF-8 once written
    ],
    ids=["deep", "huge-number", "garbled", "bad-utf8"],
)
def test_a_damaged_policy_json_is_a_policy_error(tmp_path: Path, text: str) -> None:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "policy.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(PolicyError, match=r"policy\.json is not valid JSON"):
        read_policy_files(folder, kinds={"value": (1,)})
