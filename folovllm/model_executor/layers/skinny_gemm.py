"""y = x W^T (+ b) for a few rows of x: the matmuls of small decode batches.

At batch 1-16 a decoder layer's matmuls only stream their weights, so the floor is the weight
bytes over memory bandwidth (Qwen3-0.6B's gate/up matrix, 12.6 MB, is ~3 us on an H200). The
cuBLAS kernels chosen for these shapes tile the output coarsely and launch too few blocks to keep
enough loads in flight: they reached a quarter to a half of the bandwidth (benchmarks/
bench_skinny_gemm.py). Here each program owns a narrow strip of output columns (BLOCK_N rows of W),
walks the whole K dimension once, and multiplies the up-to-16 rows of x against it on the tensor
cores (x is padded to 16 rows, which costs nothing: the loads of the padding are masked). Many
narrow strips mean many programs and many loads in flight, which is what a memory-bound matmul
needs.

Used for CUDA bf16/fp16 tensors with at most MAX_ROWS rows (linear.py decides); the grid depends only on the
shapes, so the call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def default_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an [N, K] weight: the best of a sweep on an
    H200 (benchmarks/bench_skinny_gemm.py --sweep). Narrow outputs take 16-column strips, so that
    even N = 1024 gives 64 programs; wide ones 32-column strips with a deeper pipeline."""
    if n <= 2048:
        return 16, 256, 4, 3
    return 32, 128, 4, 5


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [..., K] with at most MAX_ROWS rows, weight [N, K] (row-major), bias [N] -> [..., N] in
    x's dtype, accumulated in float32."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and weight.stride(1) == 1
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*shape[:-1], n)
    block_n, block_k, warps, stages = config or default_config(n, k)
    _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
        x2, weight, weight if bias is None else bias, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_warps=warps, num_stages=stages)
    return out.view(*shape[:-1], n)
