"""Calibration data for the quantizer.

The default text is the Wikipedia sample that exllamav2 ships inside its wheel
(`.../conversion/standard_cal_data/wiki.utf8`): a few hundred KB of clean English prose, fetched
with `pip download` (no install, nothing imported from it) and read straight out of the zip.

The text is cut in two halves at a line break. Calibration windows come only from the FIRST half
(`calib_text()`); anything that measures the quantized model (perplexity, say) must read the
SECOND half (`eval_text()`), so the model is never evaluated on the text it was calibrated on.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

WIKI_MEMBER = "conversion/standard_cal_data/wiki.utf8"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "folovllm" / "calib"


def find_wheel(directory: str | Path | None = None, download: bool = True) -> Path:
    """An exllamav2 wheel in `directory` (the cache by default), fetched with pip if none is there."""
    d = Path(directory) if directory is not None else cache_dir()
    found = sorted(glob.glob(str(d / "exllamav2-*.whl")))
    if found:
        return Path(found[-1])
    if not download:
        raise FileNotFoundError(f"no exllamav2 wheel in {d}")
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "exllamav2", "-d", str(d)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(str(d / "exllamav2-*.whl")))
    if r.returncode != 0 or not found:
        raise FileNotFoundError(
            f"could not fetch the calibration text (`{' '.join(cmd)}` failed: "
            f"{(r.stderr or r.stdout).strip()[-300:]}); pass --calib-file PATH with a local text "
            f"file, or --calib-random for a model without a tokenizer")
    return Path(found[-1])


def read_wheel_member(wheel: str | Path, suffix: str = WIKI_MEMBER) -> str:
    """The text of the wheel's member whose path ends in `suffix`."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if not names:
            raise FileNotFoundError(f"{wheel} has no member ending in {suffix}")
        return zf.read(sorted(names, key=len)[0]).decode("utf-8")


def split_halves(text: str) -> tuple[str, str]:
    """(first half, second half), cut at the first line break after the middle."""
    mid = len(text) // 2
    cut = text.find("\n", mid)
    cut = mid if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def wiki_text(directory: str | Path | None = None) -> str:
    return read_wheel_member(find_wheel(directory))


def calib_text(directory: str | Path | None = None) -> str:
    """The half of the Wikipedia sample that calibration uses."""
    return split_halves(wiki_text(directory))[0]


def eval_text(directory: str | Path | None = None) -> str:
    """The other half: evaluate a quantized model on this, never on calib_text()."""
    return split_halves(wiki_text(directory))[1]


def windows(ids: list[int] | torch.Tensor, num_samples: int, seq_len: int) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens, spread evenly over `ids` (they overlap only when
    the text is shorter than num_samples * seq_len tokens)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"calibration needs at least one sample of one token, got "
                         f"{num_samples} x {seq_len}")
    if ids.numel() < seq_len:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than one window of "
                         f"--calib-seq-len {seq_len}")
    last = ids.numel() - seq_len
    starts = [0] if num_samples == 1 else [round(i * last / (num_samples - 1)) for i in range(num_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def random_samples(vocab_size: int, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Random token ids: for dummy / random-weight models, whose quality nobody measures."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_samples, seq_len), generator=gen)


def calibration_ids(tokenizer, num_samples: int, seq_len: int, *, calib_file: str | None = None,
                    random_vocab: int | None = None, seed: int = 0,
                    wheel_dir: str | Path | None = None) -> torch.Tensor:
    """[num_samples, seq_len] token ids: random when `random_vocab` is given, else windows of
    `calib_file`'s text (all of it) or of the first half of the Wikipedia sample."""
    if random_vocab is not None:
        return random_samples(random_vocab, num_samples, seq_len, seed)
    if tokenizer is None:
        raise ValueError("the model folder has no tokenizer to cut calibration text with; "
                         "use --calib-random for random token ids")
    if calib_file is not None:
        path = Path(calib_file)
        if not path.is_file():
            raise FileNotFoundError(f"--calib-file {calib_file}: no such file")
        text = path.read_text(encoding="utf-8")
    else:
        text = calib_text(wheel_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return windows(ids, num_samples, seq_len)
