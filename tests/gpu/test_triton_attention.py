"""The Triton attention kernels against the PyTorch reference backend, on CUDA.

Every case draws fresh random inputs (its own seed), scatters each request's blocks over a shuffled
block pool, poisons the output with NaN, and compares in bf16 against TorchAttentionImpl run in
float32 on the same inputs: ||out - ref|| / ||ref|| < 1e-2, every real row written, and the KV cache
written exactly where the reference writes it. tests/unit/test_triton_interpret.py runs a tiny
subset on the CPU under the Triton interpreter.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch

from folovllm.attention.backends.abstract import AttentionMetadata
from folovllm.attention.backends.torch_ref import TorchAttentionImpl

CUDA = torch.cuda.is_available()
# The Triton interpreter is chosen when triton is first imported; if another test file already
# turned it on in this process, these cases would crawl through it on the GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
requires_cuda = pytest.mark.skipif(not CUDA or INTERPRETED,
                                   reason="needs CUDA (and TRITON_INTERPRET off: run this file on its own)")

if CUDA and not INTERPRETED:
    # Import triton here only on a GPU machine: on a CPU-only one the interpreter tests must be the
    # first to import it.
    from folovllm.attention.backends.triton_attn import TritonAttentionImpl
    from folovllm.attention.ops.triton_reshape_and_cache import reshape_and_cache
    from folovllm.attention.ops.triton_unified_attention import unified_attention

_seeds = itertools.count(1000)


def make_case(reqs, num_heads, num_kv_heads, head_dim, block_size, dtype, device, pad_rows=0):
    """reqs: [(q_len, seq_len)]. Random cache (the context already cached), random q/k/v for this
    step's rows, each request's blocks drawn from a shuffled pool, pad_rows CUDA-graph padding rows
    with slot -1. Returns query, key, value, kv_cache, metadata."""
    seed = next(_seeds)
    gen = torch.Generator(device=device).manual_seed(seed)   # on the device: 8k-token caches are big
    rng = random.Random(seed)
    nblocks = [-(-s // block_size) for _, s in reqs]
    num_blocks = sum(nblocks) + 4
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    max_blocks = max(nblocks) + 2
    # Unused table entries point at real (other requests') blocks: the kernel must not read them.
    block_table = torch.tensor([[rng.randrange(num_blocks) for _ in range(max_blocks)] for _ in reqs],
                               dtype=torch.int32)
    slots, qsl = [], [0]
    for i, ((q_len, seq_len), nb) in enumerate(zip(reqs, nblocks)):
        ids, pool = pool[:nb], pool[nb:]
        block_table[i, :nb] = torch.tensor(ids, dtype=torch.int32)
        slots += [ids[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
        qsl.append(qsl[-1] + q_len)
    n = qsl[-1]
    rows = n + pad_rows
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)
    kv_cache = randn(2, num_blocks, block_size, num_kv_heads, head_dim)
    query, key, value = randn(rows, num_heads, head_dim), randn(rows, num_kv_heads, head_dim), \
        randn(rows, num_kv_heads, head_dim)
    qsl_cpu = torch.tensor(qsl, dtype=torch.int32)
    seq_lens_cpu = torch.tensor([s for _, s in reqs], dtype=torch.int32)
    md = AttentionMetadata(
        num_actual_tokens=n, num_reqs=len(reqs), max_query_len=max(q for q, _ in reqs),
        max_seq_len=max(s for _, s in reqs), query_start_loc=qsl_cpu.to(device),
        seq_lens=seq_lens_cpu.to(device), block_table=block_table.to(device),
        slot_mapping=torch.tensor(slots + [-1] * pad_rows, dtype=torch.int64, device=device),
        query_start_loc_cpu=qsl_cpu, seq_lens_cpu=seq_lens_cpu)
    return query, key, value, kv_cache, md


def reference(query, key, value, kv_cache, md, num_heads, num_kv_heads, head_dim):
    """TorchAttentionImpl in float32 on upcast inputs: (output, cache after the write)."""
    cache = kv_cache.float()
    ref = TorchAttentionImpl(num_heads, head_dim, head_dim ** -0.5, num_kv_heads).forward(
        query.float(), key.float(), value.float(), cache, md)
    return ref, cache


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def check_case(reqs, num_heads, num_kv_heads, head_dim, block_size, *, path=None, pad_rows=0,
               dtype=torch.bfloat16, device="cuda", tol=1e-2, ops=None):
    """Run reshape_and_cache + unified_attention on one case and compare with the reference.
    ops=(reshape_and_cache, unified_attention) lets the interpreter tests pass their own."""
    write, attend = ops or (reshape_and_cache, unified_attention)
    q, k, v, cache, md = make_case(reqs, num_heads, num_kv_heads, head_dim, block_size, dtype, device, pad_rows)
    ref, ref_cache = reference(q, k, v, cache, md, num_heads, num_kv_heads, head_dim)
    write(k, v, cache, md.slot_mapping)
    # The cache is a copy: exact equality, padding rows (slot -1) included.
    assert torch.equal(cache.float(), ref_cache), "KV cache differs from the reference write"
    out = torch.full_like(q, float("nan"))
    attend(q, cache, out, md.query_start_loc, md.seq_lens, md.block_table, head_dim ** -0.5,
           md.max_query_len, path=path)
    n = md.num_actual_tokens
    assert not out[:n].isnan().any(), "real rows left unwritten (or NaN)"
    err = rel_err(out[:n], ref[:n])
    assert err < tol, f"relative error {err:.3e} >= {tol}"
    return err


HEADS = [(8, 8), (16, 8), (14, 2), (7, 1)]      # GQA ratios 1, 2, 7, 7


def scenario(name, rng):
    """Batches of (q_len, seq_len) for one kind of step."""
    if name == "decode":
        return [(1, s) for s in [1, 2, 17, rng.randint(3, 3000), rng.randint(3, 3000)]]
    if name == "prefill":
        return [(s, s) for s in [1, 3, 64, rng.randint(65, 700)]]
    if name == "chunked":
        return [(q, q + c) for q, c in [(2, 5), (31, 100), (rng.randint(2, 300), rng.randint(1, 1500))]]
    # mixed: decodes, a prompt, a chunk
    return [(1, rng.randint(1, 2000)), (rng.randint(2, 400), rng.randint(2, 400) + 400), (1, 33),
            (rng.randint(2, 300),) * 2, (1, 1)]


@requires_cuda
@pytest.mark.parametrize("kind", ["decode", "prefill", "chunked", "mixed"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}KV{h[1]}")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_vs_reference(kind, block_size, heads, head_dim):
    reqs = scenario(kind, random.Random(next(_seeds)))
    check_case(reqs, *heads, head_dim, block_size)
    if kind == "decode":   # the other decode path on the same kind of batch
        check_case(reqs, *heads, head_dim, block_size, path="decode")


@requires_cuda
@pytest.mark.parametrize("path", ["split", "decode"])
@pytest.mark.parametrize("num_reqs", [1, 3, 64])
def test_long_context_decode(path, num_reqs):
    rng = random.Random(next(_seeds))
    reqs = [(1, 8192)] + [(1, rng.randint(1, 8192)) for _ in range(num_reqs - 1)]
    check_case(reqs, 16, 8, 128, 16, path=path)


@requires_cuda
@pytest.mark.parametrize("heads", [(16, 8), (14, 2)], ids=lambda h: f"H{h[0]}KV{h[1]}")
def test_long_prefill_and_chunk(heads):
    check_case([(4096, 4096)], *heads, 128, 16)
    check_case([(1024, 8192), (1, 5000), (300, 300)], *heads, 128, 16)


@requires_cuda
def test_odd_head_dim():
    """head_dim padded to a power of two (80 -> 128) and masked."""
    check_case([(1, 50), (7, 90), (20, 20)], 4, 2, 80, 16)


@requires_cuda
def test_padding_rows_untouched():
    """Rows past num_actual_tokens carry slot -1: the cache stays as the reference leaves it."""
    check_case([(1, 40), (9, 9)], 16, 8, 128, 16, pad_rows=5)
    check_case([(1, 40), (1, 300)], 16, 8, 128, 16, pad_rows=3)


@requires_cuda
@pytest.mark.parametrize("block_size", [16, 32])
def test_reshape_and_cache_alone(block_size):
    """Every slot of the mapping written with its row, every other cache element untouched."""
    gen = torch.Generator().manual_seed(next(_seeds))
    num_blocks, kvh, d, rows = 37, 8, 128, 300
    cache = torch.randn(2, num_blocks, block_size, kvh, d, generator=gen).bfloat16().cuda()
    before = cache.clone()
    k = torch.randn(rows, kvh, d, generator=gen).bfloat16().cuda()
    v = torch.randn(rows, kvh, d, generator=gen).bfloat16().cuda()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:rows]
    slots[::7] = -1
    reshape_and_cache(k, v, cache, slots.cuda())
    expect = before.clone()
    ok = slots >= 0
    expect[0].view(-1, kvh, d)[slots[ok].cuda()] = k[ok.cuda()]
    expect[1].view(-1, kvh, d)[slots[ok].cuda()] = v[ok.cuda()]
    assert torch.equal(cache, expect)


@requires_cuda
def test_backend_impl_matches_reference():
    for reqs in ([(1, 100), (1, 5), (1, 1000)], [(50, 50), (1, 70), (10, 300)]):
        q, k, v, cache, md = make_case(reqs, 14, 2, 64, 16, torch.bfloat16, "cuda")
        ref, ref_cache = reference(q, k, v, cache, md, 14, 2, 64)
        out = TritonAttentionImpl(14, 64, 64 ** -0.5, 2).forward(q, k, v, cache, md)
        assert torch.equal(cache.float(), ref_cache)
        assert rel_err(out, ref) < 1e-2


@requires_cuda
def test_cuda_graph_replay():
    """A decode step captured once replays correctly with other context lengths and block tables
    written into the same input tensors (the grid and scratch do not depend on them)."""
    num_reqs, h, kvh, d, bs = 4, 16, 8, 128, 16
    impl = TritonAttentionImpl(h, d, d ** -0.5, kvh)
    q, k, v, cache, md = make_case([(1, 8192)] * num_reqs, h, kvh, d, bs, torch.bfloat16, "cuda")
    out = impl.forward(q, k, v, cache, md)     # eager warm-up: compiles, allocates the scratch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = impl.forward(q, k, v, cache, md)
    torch.cuda.current_stream().wait_stream(stream)
    for lens in ([8192, 1, 77, 5000], [16, 300, 2048, 8000]):
        q2, k2, v2, cache2, md2 = make_case([(1, s) for s in lens], h, kvh, d, bs, torch.bfloat16, "cuda")
        ref, _ = reference(q2, k2, v2, cache2, md2, h, kvh, d)
        # Copy the new step into the captured tensors (the new cache fits: it has fewer blocks).
        for dst, src in ((q, q2), (k, k2), (v, v2), (md.seq_lens, md2.seq_lens),
                         (md.slot_mapping, md2.slot_mapping), (md.query_start_loc, md2.query_start_loc)):
            dst.copy_(src)
        md.block_table.zero_()
        md.block_table[:, :md2.block_table.shape[1]] = md2.block_table
        cache[:, :cache2.shape[1]] = cache2
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not out.isnan().any()
        assert rel_err(out, ref) < 1e-2


@requires_cuda
@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda_graphs"])
def test_engine_triton_matches_torch_backend(tiny_models, enforce_eager):
    """End to end on a tiny random Qwen3 (H=4, KVH=2, head_dim 32) in float32: the same greedy
    tokens with either backend, through chunked prefill (64-token steps), mixed steps, and (with
    graphs) padded decode batches replayed from CUDA graphs."""
    from folovllm import LLM, SamplingParams

    path, _ = tiny_models["qwen3"]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    gen = torch.Generator().manual_seed(5)
    prompts = [{"prompt_token_ids": torch.randint(3, 320, (n,), generator=gen).tolist()} for n in (5, 40, 97)]
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(path, device="cuda", dtype="float32", attention_backend=backend, num_gpu_blocks_override=128,
                  max_num_batched_tokens=64, max_num_seqs=8, enforce_eager=enforce_eager or backend == "torch")
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    assert tokens["triton"] == tokens["torch"]
