"""The Triton attention kernels on the CPU, through the Triton interpreter (TRITON_INTERPRET=1).

Triton decides at import whether its functions (its own tl.* helpers included) are compiled or
interpreted, so the variable is set here before anything imports triton. If triton was already
imported compiled in this process (another test file got there first), the in-process cases skip
and one test reruns this file in a fresh interpreter process instead.

Tiny shapes only (a few tokens, contexts <= 64): the interpreter runs each program in numpy.
tests/gpu/test_triton_attention.py covers the full matrix on CUDA.
"""

from __future__ import annotations

import os

import torch  # noqa: E402
from interpret_mode import enter_interpreter, rerun_pytest, in_process_marker, require  # noqa: E402

_TRITON_ALREADY_COMPILED = enter_interpreter()

import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

require("triton")  # a skip without triton; under CI, a failure

from folovllm.attention.backends.abstract import AttentionMetadata  # noqa: E402
from folovllm.attention.backends.torch_ref import TorchAttentionImpl  # noqa: E402

in_process = in_process_marker(_TRITON_ALREADY_COMPILED)

if not _TRITON_ALREADY_COMPILED:
    from folovllm.attention.backends.triton_attn import TritonAttentionImpl  # noqa: E402
    from folovllm.attention.ops.triton_reshape_and_cache import reshape_and_cache  # noqa: E402
    from folovllm.attention.ops.triton_unified_attention import unified_attention  # noqa: E402


def make_case(reqs, num_heads, num_kv_heads, head_dim, block_size, seed, pad_rows=0):
    """reqs: [(q_len, seq_len)] -> float32 CPU query, key, value, kv_cache, metadata, with each
    request's blocks drawn from a shuffled pool and pad_rows padding rows (slot -1)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    nblocks = [-(-s // block_size) for _, s in reqs]
    num_blocks = sum(nblocks) + 3
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    block_table = torch.tensor([[rng.randrange(num_blocks)] * (max(nblocks) + 1) for _ in reqs], dtype=torch.int32)
    slots, qsl = [], [0]
    for i, ((q_len, seq_len), nb) in enumerate(zip(reqs, nblocks)):
        ids, pool = pool[:nb], pool[nb:]
        block_table[i, :nb] = torch.tensor(ids, dtype=torch.int32)
        slots += [ids[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
        qsl.append(qsl[-1] + q_len)
    rows = qsl[-1] + pad_rows
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(rows, num_heads, head_dim, generator=gen)
    k = torch.randn(rows, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(rows, num_kv_heads, head_dim, generator=gen)
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    seq_lens = torch.tensor([s for _, s in reqs], dtype=torch.int32)
    md = AttentionMetadata(
        num_actual_tokens=qsl[-1], num_reqs=len(reqs), max_query_len=max(q for q, _ in reqs),
        max_seq_len=max(s for _, s in reqs), query_start_loc=qsl_t, seq_lens=seq_lens,
        block_table=block_table, slot_mapping=torch.tensor(slots + [-1] * pad_rows, dtype=torch.int64),
        query_start_loc_cpu=qsl_t, seq_lens_cpu=seq_lens)
    return q, k, v, kv_cache, md


CASES = {
    # name: (reqs, H, KVH, D, block_size, path, pad_rows)
    "decode_split": ([(1, 1), (1, 17), (1, 64)], 4, 2, 64, 16, None, 0),
    "decode_plain": ([(1, 1), (1, 17), (1, 64)], 4, 2, 64, 16, "decode", 0),
    "decode_gqa7_bs32": ([(1, 40), (1, 33)], 7, 1, 64, 32, None, 0),
    "prefill": ([(5, 5), (1, 1), (20, 20)], 4, 4, 64, 16, None, 0),
    "prefill_gqa7": ([(12, 12), (3, 3)], 14, 2, 64, 16, None, 0),
    "chunked": ([(3, 40), (9, 25)], 4, 2, 64, 32, None, 0),
    "mixed_padded": ([(1, 50), (6, 6), (4, 30), (1, 2)], 4, 2, 64, 16, None, 3),
    "decode_padded": ([(1, 20), (1, 64)], 4, 2, 64, 16, None, 2),
    "head_dim_128": ([(1, 30), (5, 21)], 2, 1, 128, 16, None, 0),
    "head_dim_80": ([(1, 30), (5, 21)], 2, 1, 80, 16, None, 0),
}


@in_process
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_reference(name):
    reqs, h, kvh, d, bs, path, pad = CASES[name]
    q, k, v, cache, md = make_case(reqs, h, kvh, d, bs, seed=zlib.crc32(name.encode()), pad_rows=pad)
    ref_cache = cache.clone()
    ref = TorchAttentionImpl(h, d, d ** -0.5, kvh).forward(q, k, v, ref_cache, md)
    reshape_and_cache(k, v, cache, md.slot_mapping)
    assert torch.equal(cache, ref_cache)          # padding rows (slot -1) wrote nothing
    out = torch.full_like(q, float("nan"))
    unified_attention(q, cache, out, md.query_start_loc, md.seq_lens, md.block_table, d ** -0.5,
                      md.max_query_len, path=path)
    n = md.num_actual_tokens
    assert not out[:n].isnan().any()
    err = ((out[:n] - ref[:n]).norm() / ref[:n].norm()).item()
    assert err < 1e-4, err                        # float32 throughout in the interpreter


@in_process
def test_large_decode_batch_splits_a_long_context():
    """A decode batch with enough (request, KV head) programs to fill the GPU takes the plain
    decode path, unless the longest context may exceed DECODE_SPLIT_MIN_LEN: then every context
    is split so that one long request is not a straggler. The split batch (one context just past
    the threshold among 33 short ones) matches the reference."""
    from folovllm.attention.ops import triton_unified_attention as ua
    cpu = torch.device("cpu")
    assert ua.choose_config(34, 8, 1, cpu)[0] == "decode"
    assert ua.choose_config(34, 8, 1, cpu, max_seq_len=ua.DECODE_SPLIT_MIN_LEN)[0] == "decode"
    path, cfg = ua.choose_config(34, 8, 1, cpu, max_seq_len=2 * ua.DECODE_SPLIT_MIN_LEN + 1)
    assert path == "split" and cfg.num_segments == 4  # segments of at most about the threshold
    assert ua.choose_config(34, 8, 1, cpu, max_seq_len=40960)[1].num_segments == ua.DECODE_MAX_SEGMENTS
    reqs = [(1, ua.DECODE_SPLIT_MIN_LEN + 50)] + [(1, 3 + i) for i in range(33)]
    q, k, v, cache, md = make_case(reqs, 8, 8, 16, 16, seed=11)
    assert ua.choose_config(34, 8, 1, cpu, md.max_seq_len)[0] == "split"
    ref_cache = cache.clone()
    ref = TorchAttentionImpl(8, 16, 0.25, 8).forward(q, k, v, ref_cache, md)
    out = TritonAttentionImpl(8, 16, 0.25, 8).forward(q, k, v, cache, md)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    # CUDA graphs: a large batch gets a plain-decode graph and a split one when contexts may be
    # long; a small batch splits by count whatever the contexts, so one graph serves it.
    impl = TritonAttentionImpl(8, 16, 0.25, 8)
    assert impl.decode_graph_bounds(34, 10240, cpu) == [ua.DECODE_SPLIT_MIN_LEN, 10240]
    assert impl.decode_graph_bounds(34, ua.DECODE_SPLIT_MIN_LEN, cpu) == [ua.DECODE_SPLIT_MIN_LEN]
    assert impl.decode_graph_bounds(2, 10240, cpu) == [10240]


@in_process
@pytest.mark.parametrize("real", [2, 5])
def test_runner_style_padding(real):
    """How the model runner pads a decode batch for a CUDA graph: extra requests with one query
    row, a one-token context and slot -1. Real rows match, the cache is written only for them."""
    reqs = [(1, 10 + 13 * i) for i in range(real)] + [(1, 1)] * 3
    q, k, v, cache, md = make_case(reqs, 4, 2, 64, 16, seed=real)
    md.slot_mapping[real:] = -1
    md.num_actual_tokens = real
    ref_cache = cache.clone()
    ref = TorchAttentionImpl(4, 64, 0.125, 2).forward(q, k, v, ref_cache, md)
    out = TritonAttentionImpl(4, 64, 0.125, 2).forward(q, k, v, cache, md)
    assert torch.equal(cache, ref_cache)
    assert ((out[:real] - ref[:real]).norm() / ref[:real].norm()).item() < 1e-4


@in_process
def test_reshape_and_cache_alone():
    gen = torch.Generator().manual_seed(7)
    cache = torch.randn(2, 5, 16, 2, 64, generator=gen)
    k, v = torch.randn(9, 2, 64, generator=gen), torch.randn(9, 2, 64, generator=gen)
    slots = torch.tensor([3, -1, 79, 16, 0, -1, 40, 41, 15])
    expect = cache.clone()
    ok = slots >= 0
    expect[0].view(-1, 2, 64)[slots[ok]] = k[ok]
    expect[1].view(-1, 2, 64)[slots[ok]] = v[ok]
    reshape_and_cache(k, v, cache, slots)
    assert torch.equal(cache, expect)


@in_process
def test_backend_impl():
    q, k, v, cache, md = make_case([(1, 33), (7, 7)], 4, 2, 64, 16, seed=3)
    ref_cache = cache.clone()
    ref = TorchAttentionImpl(4, 64, 0.125, 2).forward(q, k, v, ref_cache, md)
    out = TritonAttentionImpl(4, 64, 0.125, 2).forward(q, k, v, cache, md)
    assert torch.equal(cache, ref_cache)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.skipif(not _TRITON_ALREADY_COMPILED, reason="the cases above ran in this process")
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU, tests/gpu/test_triton_attention.py runs these cases compiled")
def test_rerun_in_fresh_process():
    rerun_pytest(__file__, dict(os.environ, TRITON_INTERPRET="1"))
