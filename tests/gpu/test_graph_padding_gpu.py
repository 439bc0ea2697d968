"""CUDA-graph padding on a GPU: decode batches of 3, 5 and 7 requests replay the graphs captured
for 4, 8 and 8 (max_num_seqs 8), so every decode step carries padding requests.

A padding request of a decode graph is one query row with a one-token context (slot -1, so
nothing is written). Given a zero-length context instead, its query would sit at position -1 of
its request: query rows must be the last q_len positions of a seq_len-token context, so
seq_len >= q_len for every request the kernel sees. The Triton kernel happens to survive that (an
empty context gives a zero output rather than 0/0 -- its running max starts at a finite -1e30 and
it divides by max(l, 1)), so the real rows' tokens would not change; what the test checks at
every replay is that contract on the metadata the graph reads, that the whole padded output
(graph_hidden, padding rows included) is finite, and that the real rows give what the eager
engine gives.

Run on the GPU machine:  python3 -m pytest -q tests/gpu/test_graph_padding_gpu.py
"""

from __future__ import annotations

import os

import pytest
import torch

from engine_internals import recording_graph_replays, runner_of
from folovllm import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="needs CUDA (and TRITON_INTERPRET off: run this file on its own)")]

MAX_NUM_SEQS = 8          # decode graphs for 1, 2, 4 and 8 requests
PADDED = {3: 4, 5: 8, 7: 8}
MAX_TOKENS = 10


def make(path: str, enforce_eager: bool) -> LLM:
    # float32: the graph and eager paths then agree to the last bit on a random model's tokens.
    return LLM(path, device="cuda", dtype="float32", attention_backend="triton", max_model_len=256,
               num_gpu_blocks_override=256, max_num_seqs=MAX_NUM_SEQS, enforce_eager=enforce_eager)


@pytest.fixture(scope="module")
def engines(tiny_models):
    path = tiny_models["qwen3"][0]
    graphs, eager = make(path, False), make(path, True)
    captured = runner_of(graphs).graphs
    assert {s for decode, s, *_ in captured if decode} == {1, 2, 4, 8}, sorted(captured)
    assert not runner_of(eager).graphs
    return graphs, eager


def prompts(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(n)
    lengths = torch.randint(3, 70, (n,), generator=gen).tolist()
    return [{"prompt_token_ids": torch.randint(3, 320, (k,), generator=gen).tolist()} for k in lengths]


def check_replay(r: dict) -> None:
    decode, size, *_ = r["key"]
    qsl, seq_lens = r["query_start_loc"], r["seq_lens"]
    assert r["finite"], f"NaN or inf in the padded graph output of {r['key']}"
    q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
    assert all(q >= 0 for q in q_lens), r
    # Each request's query rows are the last q_len positions of its context.
    bad = [(i, q, s) for i, (q, s) in enumerate(zip(q_lens, seq_lens)) if s < q]
    assert not bad, f"graph {r['key']}: requests (row, q_len, seq_len) with seq_len < q_len: {bad}"
    if decode:  # every request, padding included, one query row and at least a one-token context
        assert qsl[-1] == size and all(q == 1 for q in q_lens) and min(seq_lens) >= 1, r


@pytest.mark.parametrize("batch", sorted(PADDED))
def test_padded_decode_graphs_match_eager(engines, batch):
    graphs, eager = engines
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    with recording_graph_replays(graphs) as replays:
        got = graphs.generate(prompts(batch), params, use_tqdm=False)
    want = eager.generate(prompts(batch), params, use_tqdm=False)

    padded_decodes = [r for r in replays if r["key"][:2] == (True, PADDED[batch])]
    # All requests prefill in the first step, then decode together until the last step.
    assert len(padded_decodes) >= MAX_TOKENS - 2, [r["key"] for r in replays]
    for r in replays:
        check_replay(r)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for tok, lg, lw in zip(g.outputs[0].token_ids, g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert lg[tok] == pytest.approx(lw[tok], abs=1e-3)


def test_long_context_decode_graphs_match_eager(tiny_models, tmp_path):
    """A decode batch big enough for one program per (request, KV head) to fill the GPU replays
    the plain-decode graph while every context is short, and the split-context graph once one
    context passes DECODE_SPLIT_MIN_LEN; tokens equal the eager engine's in both."""
    import json
    import shutil

    from folovllm.attention.ops.triton_unified_attention import DECODE_SPLIT_MIN_LEN

    src = tiny_models["qwen3"][0]
    path = tmp_path / "long"
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    max_len = 2 * DECODE_SPLIT_MIN_LEN
    cfg["max_position_embeddings"] = max_len
    (path / "config.json").write_text(json.dumps(cfg))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = -(-2 * sms // cfg["num_key_value_heads"])  # enough requests for the plain-decode path
    gen = torch.Generator().manual_seed(5)
    reqs = [{"prompt_token_ids": torch.randint(3, 320, (DECODE_SPLIT_MIN_LEN - 2,), generator=gen).tolist()}]
    reqs += [{"prompt_token_ids": torch.randint(3, 320, (8,), generator=gen).tolist()} for _ in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def engine(eager: bool) -> LLM:
        return LLM(str(path), device="cuda", dtype="float32", attention_backend="triton", max_model_len=max_len,
                   num_gpu_blocks_override=2048, max_num_seqs=n + 8, enforce_eager=eager)

    graphs = engine(False)
    bounds = {k[3] for k in runner_of(graphs).graphs if k[0] and k[1] >= n + 1}
    assert bounds == {DECODE_SPLIT_MIN_LEN, max_len}, bounds
    with recording_graph_replays(graphs) as replays:
        got = graphs.generate(reqs, params, use_tqdm=False)
    used = {r["key"][3] for r in replays if r["key"][0]}
    assert used == {DECODE_SPLIT_MIN_LEN, max_len}, used  # the long prompt crosses the bound while decoding
    del graphs
    want = engine(True).generate(reqs, params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids


def test_mixed_graphs_above_max_model_len_match_eager(tiny_models):
    """A step budget above max_model_len: the mixed-step graphs of more than max_model_len tokens
    are captured (as several requests) and replayed by a step of several prompts, whose tokens
    equal the eager engine's."""
    path = tiny_models["qwen3"][0]
    max_len, budget = 256, 1024

    def engine(eager: bool) -> LLM:
        return LLM(path, device="cuda", dtype="float32", attention_backend="triton", max_model_len=max_len,
                   max_num_batched_tokens=budget, num_gpu_blocks_override=512, max_num_seqs=MAX_NUM_SEQS,
                   enforce_eager=eager)

    graphs = engine(False)
    mixed_sizes = {k[1] for k in runner_of(graphs).graphs if not k[0]}
    assert {512, budget} <= mixed_sizes, sorted(mixed_sizes)   # above max_model_len
    gen = torch.Generator().manual_seed(11)
    reqs = [{"prompt_token_ids": torch.randint(3, 320, (k,), generator=gen).tolist()}
            for k in (200, 180, 150, 220, 90, 170)]          # 1,010 tokens: one step of the budget
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with recording_graph_replays(graphs) as replays:
        got = graphs.generate(reqs, params, use_tqdm=False)
    big = [r for r in replays if not r["key"][0] and r["key"][1] > max_len]
    assert big and big[0]["query_start_loc"][-1] > max_len, [r["key"] for r in replays]
    for r in replays:
        check_replay(r)
    del graphs
    want = engine(True).generate(reqs, params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
