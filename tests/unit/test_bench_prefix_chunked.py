"""`folovllm bench prefix` and `folovllm bench chunked`: their workloads follow BENCHMARKS.md, and
both run end to end on a tiny model (CPU; no timing is asserted: speed lives in benchmarks)."""

from __future__ import annotations

import json

import pytest

from folovllm.bench.workloads import chunked_workload, prefix_workload
from folovllm.entrypoints.cli import main

from conftest import build_tiny_model


def test_prefix_workload_follows_its_spec():
    prefixes, prompts = prefix_workload()
    assert len(prefixes) == 4 and len({tuple(p) for p in prefixes}) == 4
    assert all(len(p) == 2048 for p in prefixes)
    assert len(prompts) == 64 and all(len(p) == 2048 + 128 for p in prompts)
    for i, p in enumerate(prompts):
        assert p[:2048] == prefixes[i // 16]
    assert len({tuple(p[2048:]) for p in prompts}) == 64  # a suffix of its own each
    assert all(0 <= t < 10_000 for p in prompts for t in p)
    assert prefix_workload(seed=0) == (prefixes, prompts) != prefix_workload(seed=1)
    with pytest.raises(ValueError, match="at least one prefix"):
        prefix_workload(num_prefixes=0)


def test_chunked_workload_follows_its_spec():
    decoders, longs = chunked_workload()
    assert len(decoders) == 64 and all(len(p) == 512 for p in decoders)
    assert len(longs) == 4 and all(len(p) == 8192 for p in longs)
    with pytest.raises(ValueError, match="at least one decoder"):
        chunked_workload(num_decoders=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-qwen3")
    build_tiny_model(path, "qwen3")
    return str(path)


def test_bench_prefix_end_to_end(tiny, tmp_path, capsys):
    """2 prefixes of 40 tokens x 3 requests with 5-token suffixes, block size 8: with the cache
    on each 45-token prompt is served its 5 prefix blocks (40 tokens), 240 in all; off, none."""
    out = tmp_path / "prefix.json"
    rc = main(["bench", "prefix", "--model", tiny, "--num-prefixes", "2", "--requests-per-prefix", "3",
               "--prefix-len", "40", "--suffix-len", "5", "--output-len", "4", "--num-iters", "2",
               "--block-size", "8", "--output-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "prefix" and r["num_requests"] == 6 and r["notes"]
    on, off = r["results"]["on"], r["results"]["off"]
    assert on["prefix_caching"] is True and off["prefix_caching"] is False
    assert on["cached_prompt_tokens"] == 240 and off["cached_prompt_tokens"] == 0
    assert all(run["hit_tokens"] == 240 and run["query_tokens"] == 6 * 45 for run in on["first_token_runs"])
    assert on["output_tokens"] == off["output_tokens"] == 6 * 4
    assert len(on["full_runs"]) == 2 and on["wall_ms"] > 0 and off["all_first_tokens_ms"] > 0
    assert "off / on" in capsys.readouterr().out


def test_bench_chunked_end_to_end(tiny, tmp_path):
    out = tmp_path / "chunked.json"
    rc = main(["bench", "chunked", "--model", tiny, "--num-decoders", "3", "--decoder-input-len", "10",
               "--decoder-output-len", "400", "--num-long", "2", "--long-input-len", "150",
               "--long-output-len", "2", "--arrival-interval-ms", "20", "--window-s", "1.0",
               "--max-model-len", "256", "--chunked-budget", "32", "--output-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    chunked, whole = r["results"]["chunked"], r["results"]["unchunked"]
    assert chunked["chunked_prefill"] is True and chunked["max_num_batched_tokens"] == 32
    assert whole["chunked_prefill"] is False and whole["max_num_batched_tokens"] >= 256
    for m in (chunked, whole):
        assert len(m["long_ttft_ms"]) == 2 and all(t > 0 for t in m["long_ttft_ms"])
        assert m["num_gaps"] > 0 and 0 < m["itl_p50_ms"] <= m["itl_p99_ms"] <= m["itl_max_ms"]
