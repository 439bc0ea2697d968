"""The skinny Triton matmul (folovllm/model_executor/layers/skinny_gemm.py) against a float32
matmul of the same inputs, and the linear layer's choice of it.

Here the kernel runs on the CPU under the Triton interpreter in float16 and float32 (the
interpreter's bf16 tl.dot is wrong, so bf16 is checked on the GPU only). On a machine with CUDA,
test_compiled_on_cuda reruns the file with the compiled kernel in bf16 and checks that
UnquantizedLinearMethod (linear.py) dispatches to it exactly for small bf16 batches with K <= SKINNY_MAX_K.
"""

from __future__ import annotations

import itertools
import os

import torch
from interpret_mode import enter_interpreter, rerun_pytest, in_process_marker, require

_ON_CUDA = os.environ.get("FOLOVLLM_SKINNY_CUDA") == "1"
_TRITON_ALREADY_COMPILED = enter_interpreter(compiled=_ON_CUDA)

import pytest  # noqa: E402

require("triton")  # a skip without triton; under CI, a failure

in_process = in_process_marker(_TRITON_ALREADY_COMPILED)
if not _TRITON_ALREADY_COMPILED:
    from folovllm.model_executor.layers import linear  # noqa: E402
    from folovllm.model_executor.layers.skinny_gemm import MAX_ROWS, skinny_gemm  # noqa: E402

DEVICE = "cuda" if _ON_CUDA else "cpu"
DTYPES = [torch.bfloat16] if _ON_CUDA else [torch.float16, torch.float32]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
_seeds = itertools.count(1)


def randn(*shape, dtype):
    gen = torch.Generator().manual_seed(next(_seeds))
    return (torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float().cpu() - ref).abs().max() / ref.abs().max()).item()


CASES = [  # (rows, N, K, bias): K a multiple of the tile and not, N a multiple of the strip and not
    (1, 64, 256, False), (3, 40, 300, True), (16, 96, 512, False), (7, 17, 100, True), (2, 2100, 64, False),
]


@in_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,k,bias", CASES)
def test_skinny_gemm_matches_matmul(dtype, rows, n, k, bias):
    x, w = randn(rows, k, dtype=dtype), randn(n, k, dtype=dtype)
    b = randn(n, dtype=dtype) if bias else None
    ref = torch.nn.functional.linear(x.float().cpu(), w.float().cpu(), None if b is None else b.float().cpu())
    out = skinny_gemm(x, w, b)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


@in_process
def test_skinny_gemm_keeps_leading_dims_and_strided_rows():
    dtype = DTYPES[0]
    big = randn(4, 2, 200, dtype=dtype)
    x = big[:, 0, :128]                        # rows with a stride of 400, not 128
    w = randn(48, 128, dtype=dtype)
    ref = x.float().cpu() @ w.float().cpu().T
    assert rel_err(skinny_gemm(x, w), ref) < TOL[dtype]
    x3 = randn(2, 3, 128, dtype=dtype)
    out = skinny_gemm(x3, w)
    assert out.shape == (2, 3, 48)
    assert rel_err(out, x3.float().cpu() @ w.float().cpu().T) < TOL[dtype]


@in_process
def test_skinny_gemm_rejects_too_many_rows():
    with pytest.raises(AssertionError):
        skinny_gemm(randn(MAX_ROWS + 1, 64, dtype=DTYPES[0]), randn(32, 64, dtype=DTYPES[0]))


@pytest.mark.skipif(not _ON_CUDA, reason="checks the CUDA dispatch of the linear layers")
def test_linear_dispatch_on_cuda(monkeypatch):
    """A linear layer uses the skinny kernel for <= 16 rows of bf16 with K <= SKINNY_MAX_K, cuBLAS
    otherwise, and both give the same numbers."""
    import folovllm.model_executor.layers.skinny_gemm as sg
    calls = []
    real = sg.skinny_gemm
    monkeypatch.setattr(sg, "skinny_gemm", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    for k, rows, expect in [(1024, 1, True), (1024, 16, True), (1024, 17, False), (3072, 4, False)]:
        layer = linear.MergedColumnParallelLinear(k, [256, 128], bias=True, params_dtype=torch.bfloat16).to(DEVICE)
        layer.weight.data.normal_(0, k ** -0.5)
        layer.bias.data.normal_()
        x = randn(rows, k, dtype=torch.bfloat16)
        calls.clear()
        out = layer(x)
        assert bool(calls) == expect, (k, rows)
        ref = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert rel_err(out, ref.cpu()) < 1e-2


# --- reruns in fresh processes -------------------------------------------------------------------

def _rerun(env: dict, select: str) -> None:
    rerun_pytest(__file__, env, select)


@pytest.mark.skipif(not _TRITON_ALREADY_COMPILED or torch.cuda.is_available(),
                    reason="the cases above ran in this process, or the GPU runs them compiled")
def test_rerun_in_fresh_process():
    _rerun(dict(os.environ, TRITON_INTERPRET="1"), "not test_compiled_on_cuda")


@pytest.mark.skipif(_ON_CUDA or not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_on_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _rerun(dict(env, FOLOVLLM_SKINNY_CUDA="1"), "not test_compiled_on_cuda and not test_rerun")
