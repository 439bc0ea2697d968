"""folovllm.bench: the workloads follow their spec, the floor arithmetic matches hand-computed
numbers, and `bench throughput` / `bench latency` run end to end on a tiny model (CPU; no timing
is asserted: speed lives in benchmarks)."""

from __future__ import annotations

import json

import pytest
import torch

from folovllm.bench.workloads import default_bench_model
from folovllm.entrypoints.cli import main
from folovllm.bench.floor import Ceilings, ModelShape, measure_ceilings, workload_floor
from folovllm.bench.workloads import parse_range, throughput_workload

from conftest import build_tiny_model, tiny_config


# ---- workloads ----------------------------------------------------------------------------

def test_throughput_workload_follows_its_spec():
    reqs = throughput_workload()
    assert len(reqs) == 256
    assert all(100 <= len(r.prompt_token_ids) <= 1024 and 100 <= r.output_len <= 1024 for r in reqs)
    assert all(0 <= t < 10_000 for r in reqs for t in r.prompt_token_ids)
    # Spread over the whole range, not a constant.
    assert min(r.output_len for r in reqs) < 200 and max(r.output_len for r in reqs) > 900


def test_throughput_workload_is_deterministic_and_a_prefix_when_smaller():
    a, b = throughput_workload(seed=0), throughput_workload(seed=0)
    assert a == b
    assert throughput_workload(num_prompts=10, seed=0) == a[:10]
    assert throughput_workload(seed=1) != a
    small = throughput_workload(5, (3, 3), (2, 4), seed=7, token_id_limit=50)
    assert all(len(r.prompt_token_ids) == 3 and 2 <= r.output_len <= 4 for r in small)
    assert all(0 <= t < 50 for r in small for t in r.prompt_token_ids)


def test_parse_range():
    assert parse_range("100,1024") == (100, 1024)
    assert parse_range("7") == (7, 7)
    with pytest.raises(ValueError):
        parse_range("10,5")


# ---- the floor ----------------------------------------------------------------------------

def test_floor_matches_hand_computation():
    shape = ModelShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, non_embedding_params=1000,
                       lm_head_params=500, dtype_bytes=2)
    assert shape.kv_bytes_per_token == 2 * 2 * 8 * 2 * 2 == 128
    assert shape.weight_bytes == 3000
    ceil = Ceilings(device="x", label="CPU", bandwidth=1e3, flops=1e4, copy_bytes=0, matmul_n=0, dtype="bf16")
    # A: P=3, O=2 -> T=4 tokens forwarded; its one decode step reads context 4; attends 1+2+3+4 = 10 keys.
    # B: P=1, O=4 -> T=4; decode steps read 2 + 3 + 4 = 9; attends 10 keys.
    f = workload_floor(shape, [(3, 2), (1, 4)], ceil)
    assert f["decode_steps"] == 3  # the longest request, B
    assert f["kv_read_bytes"] == 128 * (4 + 9)
    assert f["kv_write_bytes"] == 128 * (4 + 4)
    assert f["weight_read_bytes"] == 3000 * 3
    assert f["memory_floor_s"] == pytest.approx((9000 + 1664 + 1024) / 1e3)  # 11.688 s
    assert f["linear_flops"] == 2 * 1000 * 8 + 2 * 500 * 6
    assert f["attention_flops"] == 4 * 4 * 8 * 2 * 20
    assert f["compute_floor_s"] == pytest.approx((22000 + 5120) / 1e4)  # 2.712 s
    assert f["floor_s"] == pytest.approx(11.688) and f["bound"] == "memory"


def test_model_shape_of_the_bench_config_and_a_tiny_one():
    from transformers import AutoConfig

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(default_bench_model()), torch.bfloat16)
    assert shape.kv_bytes_per_token == 114_688  # BENCHMARKS.md
    # Per layer: q 1024x2048 + k, v 1024x1024 + o 2048x1024 + q/k norms 2x128 + MLP 3x1024x3072 + 2 norms of 1024.
    per_layer = 2 * 2_097_152 + 2 * 1_048_576 + 256 + 9_437_184 + 2048
    assert shape.non_embedding_params == 28 * per_layer + 1024 == 440_467_456
    assert shape.lm_head_params == 151_936 * 1024  # tied: the embedding table, read by the LM head
    assert shape.weight_bytes == 2 * 596_049_920

    # Untied, head_dim 64 / 4 = 16, q/k/v biases: q 64x64+64, k and v 64x32+32, o 64x64, MLP, 2 norms.
    tiny = ModelShape.from_hf_config(tiny_config("qwen2"), torch.float32)
    per_layer = (4096 + 64) + 2 * (2048 + 32) + 4096 + 3 * 64 * 128 + 2 * 64
    assert tiny.non_embedding_params == 2 * per_layer + 64 == 74_304
    assert tiny.lm_head_params == 320 * 64 and tiny.kv_bytes_per_token == 2 * 2 * 16 * 4 * 2


def test_cpu_ceilings_are_measured_and_labelled():
    c = measure_ceilings("cpu", torch.float32)
    assert c.label == "CPU" and c.bandwidth > 0 and c.flops > 0


# ---- end to end on a tiny model -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-qwen3")
    build_tiny_model(path, "qwen3")
    return str(path)


@pytest.mark.parametrize("backend", ["folovllm", "hf"])
def test_bench_throughput_end_to_end(tiny, tmp_path, backend, capsys):
    out = tmp_path / "tp.json"
    rc = main(["bench", "throughput", "--model", tiny, "--backend", backend, "--num-prompts", "4",
               "--input-len-range", "8,24", "--output-len-range", "2,12", "--seed", "3",
               "--output-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    requested = throughput_workload(4, (8, 24), (2, 12), seed=3, token_id_limit=320)
    assert r["num_requests"] == 4 and r["backend"] == backend
    assert r["output_tokens"] == r["requested_output_tokens"] == sum(q.output_len for q in requested)
    assert r["prompt_tokens"] == sum(len(q.prompt_token_ids) for q in requested)
    assert r["wall_s"] > 0 and r["floor_s"] > 0 and r["floor_fraction"] == pytest.approx(r["floor_s"] / r["wall_s"])
    assert r["ceilings"]["label"] == "CPU" and r["notes"]
    assert "floor fraction" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["folovllm", "hf"])
def test_bench_latency_end_to_end(tiny, tmp_path, backend):
    out = tmp_path / "lat.json"
    rc = main(["bench", "latency", "--model", tiny, "--backend", backend, "--batch-sizes", "1,3",
               "--input-len", "8", "--output-len", "5", "--num-iters", "2", "--output-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert [row["batch_size"] for row in r["results"]] == [1, 3]
    for row in r["results"]:
        assert len(row["runs"]) == 2 and row["ttft_ms"] > 0 and row["tpot_ms"] > 0
        assert row["output_tokens"] == row["batch_size"] * 5


def test_bench_table(tmp_path, capsys):
    tp = dict(kind="throughput", backend="folovllm", device="dev", wall_s=2.0, output_tokens_per_s=100.0,
              total_tokens_per_s=200.0, floor_s=1.0, floor_fraction=0.5, notes=[], num_requests=4)
    (tmp_path / "a.json").write_text(json.dumps(tp))
    (tmp_path / "b.json").write_text(json.dumps(dict(tp, backend="hf", output_tokens_per_s=50.0)))
    assert main(["bench", "table", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 str(tmp_path / "missing.json")]) == 0
    text = capsys.readouterr().out
    assert "2.00x" in text and "missing" in text and "FAILED" in text
