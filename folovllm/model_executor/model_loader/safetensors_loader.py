"""Weights from an HF folder: one model.safetensors or shards listed in model.safetensors.index.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm


def safetensors_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e}); re-download the model") from e
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ValueError(f"{index} lists shards that are missing: {missing}; re-download the model")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder}; a model folder needs config.json and "
                         "safetensors weights (or use load_format='dummy' for random weights)")
    return files


def iterate_safetensors_weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight, file by file; a checkpoint of several shards shows a
    progress bar (one step per shard) on stderr."""
    files = safetensors_files(folder)
    bar = tqdm(files, desc="Loading safetensors shards", unit="shard", dynamic_ncols=True,
               disable=len(files) < 2)
    for path in bar:
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"cannot read {path}: {e}; the file is corrupt or truncated, re-download it") from e
        with f:
            for name in f.keys():
                yield name, f.get_tensor(name)
