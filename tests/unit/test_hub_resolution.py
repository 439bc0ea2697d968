"""Hub ids resolve through huggingface_hub's real cache lookup, offline, from a temporary cache
laid out as huggingface_hub lays it out (blobs, snapshots/<commit> symlinks, refs/main)."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest
from conftest import build_tiny_model

from folovllm import LLM, SamplingParams, assets

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test: offline, a fresh hub cache, and no socket may connect anywhere."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path / "hub"


def put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Write `files` into `cache` as one commit of `repo_id`; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(path, "llama")
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_cached_hub_id_resolves_to_its_snapshot(offline, tiny_folder):
    snapshot = put_in_hub_cache(offline, "org/tiny-llama", files_of(tiny_folder))
    path = assets.resolve_model("org/tiny-llama")
    assert Path(path).resolve() == snapshot.resolve()
    assert (Path(path) / "model.safetensors").read_bytes() == (tiny_folder / "model.safetensors").read_bytes()
    assert (Path(path) / "config.json").is_file()


def test_llm_from_a_hub_id_matches_the_plain_folder(offline, tiny_folder):
    put_in_hub_cache(offline, "org/tiny-llama", files_of(tiny_folder))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [9, 3]}]
    outs = {}
    for model in ("org/tiny-llama", str(tiny_folder)):
        llm = LLM(model, max_model_len=64)
        outs[model] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["org/tiny-llama"] == outs[str(tiny_folder)]
    assert all(len(ids) == 8 for ids in outs[str(tiny_folder)])


def test_one_gguf_file_of_a_repo(offline):
    put_in_hub_cache(offline, "org/tiny-GGUF", {"tiny-q4.gguf": b"GGUF...", "other-q8.gguf": b"GGUF.."})
    path = assets.resolve_model("org/tiny-GGUF/tiny-q4.gguf")
    assert path.endswith("tiny-q4.gguf") and Path(path).read_bytes() == b"GGUF..."


def test_uncached_id_offline_names_the_env_and_the_cache(offline):
    with pytest.raises(ValueError) as e:
        assets.resolve_model("org/not-cached")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and str(offline / "models--org--not-cached") in msg
    assert "not in the cache" in msg and "pass a local model folder" in msg
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE.*not in the cache"):
        assets.resolve_model("org/not-cached/model.gguf")


def test_cache_location_is_read_at_call_time(monkeypatch, tmp_path, tiny_folder):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert assets.hub_cache_dir() == tmp_path / "home" / "hub"
    with pytest.raises(ValueError, match=str(tmp_path / "home" / "hub" / "models--org--tiny-llama")):
        assets.resolve_model("org/tiny-llama")
    put_in_hub_cache(tmp_path / "home" / "hub", "org/tiny-llama", files_of(tiny_folder))
    assert (Path(assets.resolve_model("org/tiny-llama")) / "config.json").is_file()


def test_partial_snapshot_offline_says_what_is_missing(offline, tiny_folder):
    put_in_hub_cache(offline, "org/half", {"config.json": (tiny_folder / "config.json").read_bytes()})
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set and the cached copy lacks config.json or some"):
        assets.resolve_model("org/half")


def test_online_fetches_only_what_the_engine_reads(monkeypatch, offline, tiny_folder):
    """Online with nothing cached: the download is asked for the engine's files only. The hub
    itself is faked (and sockets are blocked), so this never touches the network."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    monkeypatch.delenv("HF_HUB_OFFLINE")
    repo_files = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                  "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                  "tokenizer_config.json", "chat_template.jinja", "README.md", "pytorch_model.bin",
                  "original/consolidated.safetensors", "onnx/model.onnx", "model-q4.gguf"]
    calls = []
    real_snapshot_download = huggingface_hub.snapshot_download

    def fake_snapshot_download(repo_id, *, cache_dir, local_files_only, allow_patterns, ignore_patterns, **kw):
        calls.append(local_files_only)
        if local_files_only:  # the cache lookup stays real
            return real_snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True,
                                          allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        wanted = list(filter_repo_objects(repo_files, allow_patterns=allow_patterns,
                                          ignore_patterns=ignore_patterns))
        assert sorted(wanted) == sorted(repo_files[:8])
        assert Path(cache_dir) == offline
        return str(put_in_hub_cache(Path(cache_dir), repo_id, files_of(tiny_folder)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    path = assets.resolve_model("org/tiny-llama")
    assert calls == [True, False] and (Path(path) / "model.safetensors").is_file()
    # now cached: no second download
    assert assets.resolve_model("org/tiny-llama") == path and calls == [True, False, True]


def test_unreachable_hub_names_the_env_and_the_cache(monkeypatch, offline):
    """Online, nothing cached, and the hub does not answer: huggingface_hub raises
    LocalEntryNotFoundError then (faked here, as the sockets are blocked)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(*args, local_files_only, **kwargs):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ValueError) as e:
        assets.resolve_model("org/far-away")
    msg = str(e.value)
    assert "could not be reached (Got: ConnectError: [Errno -2] Name or service not known)" in msg
    assert "HF_HUB_OFFLINE" in msg and str(offline / "models--org--far-away") in msg


@pytest.mark.parametrize("model, hub", [
    ("Qwen/Qwen3-0.6B", ("Qwen/Qwen3-0.6B", None)),
    ("org/repo.v2_x/sub/file-q4_k_m.gguf", ("org/repo.v2_x", "sub/file-q4_k_m.gguf")),
    ("org--x/name", None), ("org/na..me", None), ("/abs/model", None), ("./rel/model", None),
    ("../up/model", None), ("~/model/x", None), ("name", None), ("a/b/c", None), ("org/name/", None),
])
def test_what_reads_as_a_hub_id(model, hub):
    assert assets.hub_id_of(model) == hub


def test_other_missing_paths_pass_through_to_the_loaders_error(tmp_path):
    for model in (str(tmp_path / "nope"), "./nope/x", "nope", "a/b/c"):
        assert assets.resolve_model(model) == model
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_known_names_still_fetch_the_default_model(monkeypatch, tmp_path):
    fetched = tmp_path / "m.gguf"
    monkeypatch.setattr(assets, "fetch_default_model", lambda progress=True: fetched)
    assert assets.resolve_model("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF") == str(fetched)
