"""The fused Triton sampler on CUDA, at the Qwen vocabulary (151,936 ids) and bf16 logits.

Greedy rows must equal torch.argmax exactly (ties included); random rows must follow
softmax(logits / T) (Pearson chi-square on a 20-token support scattered over the vocabulary),
never pick a -inf logit, reproduce the float64 reference of the documented noise, depend only on
their key, and survive CUDA-graph capture and replay. tests/unit/test_triton_sampler.py runs the
same kernel on the CPU under the Triton interpreter on small vocabularies.
"""

from __future__ import annotations

import os

import pytest
import torch

from sampling_reference import chi2_critical, chi2_statistic, key, reference_sample
from sampling_reference import keys as _keys

from folovllm.sample.metadata import build_sampling_metadata
from folovllm.sampling_params import SamplingParams

CUDA = torch.cuda.is_available()
# The Triton interpreter is chosen when triton is first imported; if another test file already
# turned it on in this process, these cases would crawl through it on the GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
requires_cuda = pytest.mark.skipif(not CUDA or INTERPRETED,
                                   reason="needs CUDA (and TRITON_INTERPRET off: run this file on its own)")

if CUDA and not INTERPRETED:
    # Import triton here only on a GPU machine: on a CPU-only one the interpreter tests must be the
    # first to import it.
    from folovllm.sample import triton_sampler
    from folovllm.sample.sampler import Sampler
    from folovllm.sample.triton_sampler import gumbel_sample

VOCAB = 151936


def keys(n: int, start: int = 0) -> torch.Tensor:
    return _keys(n, 777 + start, "cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch", [1, 7, 256])
def test_greedy_equals_torch_argmax(batch, dtype):
    gen = torch.Generator(device="cuda").manual_seed(batch)
    logits = (torch.randn(batch, VOCAB, generator=gen, device="cuda") * 4).to(dtype)
    # Ties at chunk and tile boundaries, in the last column, +-inf and an all -inf row.
    ties = [[0, 1024, 8191, 8192, VOCAB - 1], [4096, 2047, 151000], [VOCAB - 1, 77]]
    for row, cols in enumerate(ties[:batch]):
        logits[row, cols] = 100.0
    if batch > 3:
        logits[3] = float("-inf")
        logits[4, [90000, 5]] = float("inf")
        logits[5] = logits[5, 0]                  # the whole row ties
    expected = logits.argmax(dim=-1)
    assert torch.equal(gumbel_sample(logits, None, None), expected)
    # Greedy rows among random ones.
    temperature = torch.where(torch.arange(batch, device="cuda") % 2 == 0, 0.0, 0.6)
    got = gumbel_sample(logits, temperature, keys(batch))
    assert torch.equal(got[::2], expected[::2])


@requires_cuda
@pytest.mark.parametrize("temperature", [0.6, 1.3])
def test_small_support_follows_softmax(temperature):
    """20 finite logits scattered over the vocabulary (tile, chunk and row edges), -inf elsewhere,
    8192 rows with their own keys: chi-square against softmax(logits / T) at p = 1e-4."""
    n = 8192
    positions = [0, 3, 255, 256, 1023, 1024, 4095, 8191, 8192, 20000, 50001, 77777, 99999, 120000,
                 131071, 131072, 140000, 151000, 151935, 65536]
    base = torch.linspace(1.5, -2.0, len(positions))
    row = torch.full((VOCAB,), float("-inf"))
    row[positions] = base
    logits = row.to(torch.bfloat16).cuda().expand(n, VOCAB).contiguous()
    got = gumbel_sample(logits, torch.full((n,), temperature, device="cuda"), keys(n)).cpu()
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[positions] = True
    assert allowed[got].all(), "a -inf logit was sampled"
    counts = torch.bincount(got, minlength=VOCAB)[positions].tolist()
    probs = torch.softmax(row[positions].to(torch.bfloat16).double() / temperature, dim=0).tolist()
    stat, df = chi2_statistic(counts, probs)
    assert stat < chi2_critical(df), (stat, df, counts)


@requires_cuda
def test_tokens_match_float64_reference():
    """The compiled kernel draws the documented noise (the interpreter tests check the same), so a
    seeded request gets the same tokens on any GPU and under the interpreter."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    logits = (torch.randn(6, VOCAB, generator=gen, device="cuda") * 2).to(torch.bfloat16)
    key_list = [key(5000 + i) for i in range(4)] + [-1, 2 ** 40 + 3]
    got = gumbel_sample(logits, torch.full((6,), 0.6, device="cuda"),
                        torch.tensor(key_list, device="cuda")).tolist()
    assert got == [reference_sample(logits[i], 0.6, k) for i, k in enumerate(key_list)]


@requires_cuda
def test_small_vocabulary_several_rows_per_program():
    """A small model's vocabulary (rows share a program): greedy exact, random rows as the
    reference."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    logits = torch.randn(64, 320, generator=gen, device="cuda").to(torch.bfloat16)
    assert torch.equal(gumbel_sample(logits, None, None), logits.argmax(-1))
    k = keys(64, start=50)
    got = gumbel_sample(logits, torch.full((64,), 0.8, device="cuda"), k).tolist()
    assert got == [reference_sample(logits[i], 0.8, k[i].item()) for i in range(64)]


@requires_cuda
def test_key_decides_the_row_whatever_the_batch():
    """Four keyed rows over flat logits: the same tokens alone, at batch 7 and at batch 256 (other
    chunk sizes) in other positions, next to random and greedy rows."""
    mine = keys(4, start=9000)
    flat = torch.zeros(VOCAB, dtype=torch.bfloat16, device="cuda")

    def run(layout, n):
        gen = torch.Generator(device="cuda").manual_seed(n)
        logits = torch.randn(n, VOCAB, generator=gen, device="cuda").to(torch.bfloat16)
        temperature = torch.rand(n, generator=gen, device="cuda") + 0.3
        temperature[::3] = 0.0
        k = keys(n, start=100_000 + n)
        for my_key, pos in zip(mine, layout):
            logits[pos], temperature[pos], k[pos] = flat, 1.0, my_key
        got = gumbel_sample(logits, temperature, k)
        return [got[pos].item() for pos in layout]

    alone = [run([0], 1)[0] for _ in range(2)]
    reference = run([3, 0, 6, 1], 7)
    assert alone == [reference[0]] * 2
    assert run([200, 17, 255, 0], 256) == reference
    assert len(set(reference)) == 4


@requires_cuda
def test_cuda_graph_capture_and_replay():
    """The launcher captured once replays with new logits, temperatures and keys copied into the
    captured inputs (grids depend only on shapes) and gives the eager result."""
    n = 32
    logits = torch.randn(n, VOCAB, device="cuda").to(torch.bfloat16)
    temperature = torch.full((n,), 0.6, device="cuda")
    k = keys(n)
    gumbel_sample(logits, temperature, k)            # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = gumbel_sample(logits, temperature, k)
    torch.cuda.current_stream().wait_stream(stream)
    for step in range(3):
        gen = torch.Generator(device="cuda").manual_seed(step)
        new_logits = (torch.randn(n, VOCAB, generator=gen, device="cuda") * 3).to(torch.bfloat16)
        new_temp = torch.rand(n, generator=gen, device="cuda") + 0.2
        new_temp[::4] = 0.0
        new_keys = keys(n, start=1000 * (step + 1))
        logits.copy_(new_logits)
        temperature.copy_(new_temp)
        k.copy_(new_keys)
        out.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, gumbel_sample(new_logits, new_temp, new_keys))


@requires_cuda
def test_sampler_uses_fused_path_on_cuda(monkeypatch):
    calls = []
    original = triton_sampler.gumbel_sample
    monkeypatch.setattr(triton_sampler, "gumbel_sample",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    logits = torch.randn(8, VOCAB, device="cuda").to(torch.bfloat16)

    def md(params):  # as the runner builds it: a generator for each seeded random row
        gens = {i: torch.Generator(device="cuda").manual_seed(p.seed) for i, p in enumerate(params)
                if p.seed is not None and not p.greedy}
        return build_sampling_metadata(params, [0] * len(params), gens, VOCAB, torch.device("cuda"))

    greedy = md([SamplingParams(temperature=0)] * 8)
    assert torch.equal(Sampler()(logits, greedy).sampled_token_ids,
                       Sampler(fused=False)(logits, greedy).sampled_token_ids)
    assert len(calls) == 1
    Sampler()(logits, md([SamplingParams(temperature=0.6)] * 8))
    assert len(calls) == 2
    Sampler()(logits, md([SamplingParams(temperature=0.6, seed=i) for i in range(8)]))  # seeded: torch
    assert len(calls) == 2
    Sampler()(logits, md([SamplingParams(temperature=0.6, top_p=0.9)] * 8))
    assert len(calls) == 2
