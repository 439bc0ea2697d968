"""`folovllm bench cpu` on a tiny model (its fields exist and are positive; the weight bytes per
decode token shrink with the format), and the CPU thread setting (`num_threads`)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from folovllm.entrypoints.cli import main

SMALL = ["--num-iters", "1", "--prompt-len", "8", "--output-len", "4", "--batch-size", "3",
         "--batch-prompt-len", "10", "--copy-mib", "8"]


def _bench(path, tmp_path, *extra) -> dict:
    out = tmp_path / f"cpu{'-'.join(extra)}.json"
    assert main(["bench", "cpu", "--model", path, *SMALL, "--output-json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_bench_cpu_reports_every_figure(tiny_models, tmp_path, capsys):
    path, hf = tiny_models["qwen2"]
    r = _bench(path, tmp_path)
    printed = capsys.readouterr().out
    for key in ("ttft_s", "decode_tok_s"):
        assert r["batch1"][key] > 0 and all(run[key] > 0 for run in r["batch1"]["runs"])
    assert r["batch"]["output_tokens"] == 3 * 4 and r["batch"]["output_tok_s"] > 0
    assert all(9 <= n <= 11 for n in r["batch"]["prompt_lens"])  # ~10 tokens each
    for key in ("peak_rss_bytes", "weight_bytes", "weight_bytes_per_token", "bandwidth_bytes_s",
                "floor_decode_tok_s", "startup_s"):
        assert r[key] > 0, key
    assert r["floor_decode_tok_s"] == pytest.approx(r["bandwidth_bytes_s"] / r["weight_bytes_per_token"])
    assert r["label"] == "CPU" and r["quantization"] == "none" and r["dtype"] == "float32"
    # float32: every weight but the embedding table (untied LM head: qwen2's tiny config)
    params = sum(p.numel() for p in hf.parameters())
    embed = hf.get_input_embeddings().weight.numel()
    assert r["weight_bytes_per_token"] == 4 * (params - embed)
    for text in ("CPU figures", "TTFT", "decode", "output tok/s", "peak RSS", "GB/s", "floor"):
        assert text in printed, text


def test_bench_cpu_weight_bytes_shrink_with_the_format(tiny_models, tmp_path):
    path, _ = tiny_models["qwen2"]
    per_token = {q: _bench(path, tmp_path, "--quantization", q)["weight_bytes_per_token"]
                 for q in ("none", "int8", "int4")}
    assert per_token["int4"] < per_token["int8"] < per_token["none"] / 3


def test_bench_cpu_bad_input_is_a_clear_error(tiny_models, capsys):
    path, _ = tiny_models["qwen2"]
    assert main(["bench", "cpu", "--model", path, *SMALL, "--output-len", "1"]) == 2
    assert "--output-len must be >= 2" in capsys.readouterr().err
    assert main(["bench", "cpu", "--model", path, *SMALL, "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_num_threads_defaults_to_the_available_cores_and_can_be_set(tiny_models, restore_threads):
    from folovllm import LLM
    from folovllm.config import EngineConfig, ModelConfig
    from folovllm.entrypoints.cli import build_parser

    path, _ = tiny_models["llama"]
    torch.set_num_threads(1)
    config = EngineConfig(ModelConfig(path), device="cpu")
    assert config.num_threads == len(os.sched_getaffinity(0)) == torch.get_num_threads()
    llm = LLM(path, device="cpu", num_threads=1)
    assert llm.llm_engine.config.num_threads == 1 and torch.get_num_threads() == 1
    assert build_parser().parse_args(["generate", "--num-threads", "3"]).num_threads == 3
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(ValueError, match=r"num_threads must be an int >= 1"):
            EngineConfig(ModelConfig(path), device="cpu", num_threads=bad)


def test_an_engine_core_in_its_own_process_sets_its_threads(tiny_models, restore_threads):
    import pickle

    from folovllm.config import EngineConfig, ModelConfig

    path, _ = tiny_models["llama"]
    config = EngineConfig(ModelConfig(path), device="cpu", num_threads=1)
    torch.set_num_threads(2)
    pickle.loads(pickle.dumps(config))  # what a spawned process does with its config
    assert torch.get_num_threads() == 1
