"""The memory-profiling forward pass (no KV cache yet, attn_metadata None) on a GPU: its attention
must cost what a real prefill costs, O(T) memory, not a [H, T, T] score matrix, and be right."""

from __future__ import annotations

import pytest
import torch

from folovllm.attention.backends.torch_ref import TorchAttentionImpl
from folovllm.attention.layer import Attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("heads, kv_heads", [(16, 8), (14, 2), (8, 8)])
def test_profile_attention_holds_no_score_matrix(heads, kv_heads):
    t, d = 16384, 128
    layer = Attention(heads, d, d ** -0.5, kv_heads, TorchAttentionImpl)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(t, heads * d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(t, kv_heads * d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(t, kv_heads * d, device="cuda", dtype=torch.bfloat16, generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = layer(q, k, v, None)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # One bf16 score matrix alone would be heads * t * t * 2 bytes (8 GiB at 16 heads); the inputs
    # repeated to all heads and the output are a few times t * heads * d * 2 bytes (64 MiB).
    assert extra < 8 * t * heads * d * 2, f"{extra / 2**20:.0f} MiB for the profile's attention"

    # Right, too: the first and last rows against a float32 reference over the same heads.
    rows = torch.tensor([0, 1, t // 2, t - 1], device="cuda")
    qh = q.view(t, heads, d)[rows].float()                                   # [R, H, D]
    kh = k.view(t, kv_heads, d).float().repeat_interleave(heads // kv_heads, dim=1)
    vh = v.view(t, kv_heads, d).float().repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("rhd,thd->rht", qh, kh) * d ** -0.5
    scores = scores.masked_fill(torch.arange(t, device="cuda")[None, None, :] > rows[:, None, None], float("-inf"))
    want = torch.einsum("rht,thd->rhd", scores.softmax(-1), vh)
    got = out.view(t, heads, d)[rows].float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2
