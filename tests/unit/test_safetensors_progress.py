"""A checkpoint of several safetensors shards shows a progress bar, one step per shard, while it
loads; a single file shows none."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from folovllm.model_executor.model_loader import safetensors_loader


def test_sharded_checkpoint_shows_one_bar_step_per_shard(tmp_path, capsys):
    names = {"a.weight": "model-00001-of-00003.safetensors", "b.weight": "model-00002-of-00003.safetensors",
             "c.weight": "model-00003-of-00003.safetensors"}
    for i, (name, file) in enumerate(names.items()):
        save_file({name: torch.full((2,), float(i))}, tmp_path / file)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    got = dict(safetensors_loader.iterate_safetensors_weights(tmp_path))
    assert {k: v.tolist() for k, v in got.items()} == {"a.weight": [0.0, 0.0], "b.weight": [1.0, 1.0],
                                                       "c.weight": [2.0, 2.0]}
    err = capsys.readouterr().err
    assert "Loading safetensors shards" in err and "3/3" in err

    single = tmp_path / "single"
    single.mkdir()
    save_file({"w": torch.zeros(1)}, single / "model.safetensors")
    assert list(dict(safetensors_loader.iterate_safetensors_weights(single))) == ["w"]
    assert "Loading safetensors shards" not in capsys.readouterr().err
