"""The GPTQ Triton matmul (folovllm/model_executor/layers/quantization/kernels/gptq_triton.py)
against x @ W in float64, with W built here from the format's definition:

    W_q[k, n] = (qweight[k // p, n] >> (bits * (k % p))) & mask        p = 32 // bits
    z[g, n]   = (qzeros[g, n // p] >> (bits * (n % p))) & mask
    W[k, n]   = scales[g, n] * (W_q[k, n] - z[g, n])                   g = g_idx[k] or k // group_size

The weights are random integers packed by the packer below (written from that definition, not
the module's). The kernel runs under the Triton interpreter on the CPU in float32 and float16 (the
interpreter's bf16 tl.dot is wrong, so bf16 is checked on the GPU only: on a machine with CUDA,
test_compiled_on_cuda reruns the file with the compiled kernel).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import torch
from conftest import CountedKernel
from interpret_mode import enter_interpreter, in_process_marker, require, rerun_pytest

_ON_CUDA = os.environ.get("FOLOVLLM_GPTQ_CUDA") == "1"
_TRITON_ALREADY_COMPILED = enter_interpreter(compiled=_ON_CUDA)

import pytest  # noqa: E402

require("triton")  # a skip without triton; under CI, a failure

in_process = in_process_marker(_TRITON_ALREADY_COMPILED)
if not _TRITON_ALREADY_COMPILED:
    from folovllm.model_executor.layers.quantization.kernels import gptq_triton as gq  # noqa: E402

DEVICE = "cuda" if _ON_CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if _ON_CUDA else [torch.float32, torch.float16]
# max |y - ref| / max |ref|: fp32 is float32 accumulation only; fp16/bf16 add the rounding of the
# dequantized weight (act-order path) and of the output
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
_seeds = itertools.count(1)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(next(_seeds))


# --- the format, from its definition -------------------------------------------------------------

def pack_along_k(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int [K, N] in [0, 2**bits) -> int32 [K // p, N]: value k goes to row k // p, bits
    bits*(k % p) .. bits*(k % p) + bits - 1 (two's complement for the top bit)."""
    p = 32 // bits
    k, n = q.shape
    out = torch.zeros(k // p, n, dtype=torch.int64)
    for kk in range(k):
        out[kk // p] |= q[kk].to(torch.int64) << (bits * (kk % p))
    return torch.where(out >= 2 ** 31, out - 2 ** 32, out).to(torch.int32)


def pack_along_n(z: torch.Tensor, bits: int) -> torch.Tensor:
    """int [G, N] -> int32 [G, N // p]: value n goes to column n // p at bits*(n % p)."""
    return pack_along_k(z.T.contiguous(), bits).T.contiguous()


def groups_of(g_idx: torch.Tensor | None, k: int, group_size: int) -> torch.Tensor:
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(k) // (k if group_size == -1 else group_size)


def make_weight(k: int, n: int, bits: int, group_size: int, g_idx_kind: str = "none",
                scale_dtype: torch.dtype = torch.float16):
    """Random integer weights, zeros and scales. g_idx_kind: "none", "actorder" (a shuffled
    k // group_size: every group keeps group_size rows, in random positions), "random" (any group
    per row), "plain" (exactly k // group_size)."""
    g = gen()
    n_groups = 1 if group_size == -1 else -(-k // group_size)
    q = torch.randint(0, 2 ** bits, (k, n), generator=g, dtype=torch.int32)
    z = torch.randint(0, 2 ** bits, (n_groups, n), generator=g, dtype=torch.int32)
    scales = (torch.rand(n_groups, n, generator=g) * 0.02 + 0.002).to(scale_dtype)
    plain = torch.arange(k) // (k if group_size == -1 else group_size)
    g_idx = {"none": None, "plain": plain, "actorder": plain[torch.randperm(k, generator=g)],
             "random": torch.randint(0, n_groups, (k,), generator=g)}[g_idx_kind]
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32)
    grp = groups_of(g_idx, k, group_size)
    w = scales.double()[grp] * (q.double() - z.double()[grp])  # [K, N], exact in float64
    packed = dict(qweight=pack_along_k(q, bits), qzeros=pack_along_n(z, bits), scales=scales, g_idx=g_idx)
    return {key: (v.to(DEVICE) if v is not None else None) for key, v in packed.items()}, w


def randx(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(m, k, generator=gen()).to(dtype).to(DEVICE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).abs().max() / ref.abs().max()).item()


def check(x, packed, w, bits, group_size, **kw):
    ref = x.double().cpu() @ w
    out = gq.gptq_matmul(x, packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits,
                         group_size, **kw)
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    assert not out.isnan().any()
    err = rel_err(out, ref)
    assert err < TOL[x.dtype], err
    return out


# --- the matmul ----------------------------------------------------------------------------------

@in_process
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [1, None], ids=["nosplit", "autosplit"])
@pytest.mark.parametrize("g_idx_kind", ["none", "actorder"])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n", [32, 96])
@pytest.mark.parametrize("k", [64, 256])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_matches_float64_reference(m, k, n, bits, group_size, g_idx_kind, split_k, dtype):
    packed, w = make_weight(k, n, bits, group_size, g_idx_kind)
    check(randx(m, k, dtype), packed, w, bits, group_size, split_k=split_k)


@in_process
@pytest.mark.parametrize("kind", ["dot", "gemv"])
@pytest.mark.parametrize("split_k", [1, 3, 64])
@pytest.mark.parametrize("g_idx_kind", ["none", "actorder"])
def test_explicit_split_k(split_k, g_idx_kind, kind):
    """Explicit slice counts: uneven (3 slices of 16 K tiles), and more than there are K tiles;
    groups of two K tiles each. The slices' partials are summed by the last slice to finish, so a
    second call (the counters must be back at zero) gives the same result."""
    packed, w = make_weight(512, 64, 4, 64, g_idx_kind)
    cfg = gq.GPTQKernelConfig(16, 32, 32, unpack="reshape", kind=kind)
    x = randx(2, 512, DTYPES[0])
    first = check(x, packed, w, 4, 64, split_k=split_k, config=cfg)
    again = check(x, packed, w, 4, 64, split_k=split_k, config=cfg)
    assert torch.equal(first, again)


@in_process
@pytest.mark.parametrize("unpack", ["gather", "reshape", "nibble"])
@pytest.mark.parametrize("bits,group_size,g_idx_kind", [(4, 32, "none"), (8, 64, "actorder"), (2, -1, "none"),
                                                        (2, 64, "random"), (4, 128, "none")])
def test_every_unpacking(unpack, bits, group_size, g_idx_kind):
    """The three ways of unpacking a tile for the tensor cores (one load per row; one per int32
    spread by a reshape; one per int32, its bit fields dotted one at a time with the x columns they
    meet); 2-bit weights (16 per int32) as well."""
    packed, w = make_weight(256, 64, bits, group_size, g_idx_kind)
    for dtype in DTYPES:
        cfg = gq.GPTQKernelConfig(16, 32, 64, unpack=unpack)
        check(randx(5, 256, dtype), packed, w, bits, group_size, config=cfg, split_k=2)


@in_process
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64), (2, -1), (4, 128)])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_gemv_kernel(m, bits, group_size):
    """The CUDA-core kernel for a few rows (one program row each), with and without an act-order
    permutation of x's columns (gptq_prepare's layout): its fields read as floats in two mantissa
    windows (up to 4 bits) or one (8 bits), and a tile's zero and scale applied to its sums."""
    packed, w = make_weight(256, 96, bits, group_size)
    for dtype in DTYPES:
        cfg = gq.GPTQKernelConfig(4, 32, 64, kind="gemv")
        check(randx(m, 256, dtype), packed, w, bits, group_size, config=cfg, split_k=2)
    packed, w = make_weight(256, 32, bits, group_size, "actorder" if group_size != -1 else "none")
    prepared = gq.gptq_prepare(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits,
                               group_size)
    x = randx(m, 256, DTYPES[0])
    ref = x.double().cpu() @ w
    out = prepared.matmul(x, config=gq.GPTQKernelConfig(4, 32, 64, kind="gemv"))
    assert rel_err(out, ref) < TOL[x.dtype]


HALF_DTYPES = [d for d in DTYPES if d != torch.float32]  # the swap kernel's activations


@in_process
@pytest.mark.parametrize("unpack", ["nibble", "reshape"])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, -1), (8, 64), (2, 256)])
@pytest.mark.parametrize("m", [2, 19])
def test_swap_kernel(m, bits, group_size, unpack, monkeypatch):
    """The tensor-core kernel with the weight as the dot's first operand: each bit field OR-ed
    into a 16-bit float's mantissa, the tile's zero and scale applied to its sums; one dot per bit
    field or one per tile; split-K; act-order rows sorted by gptq_prepare (x read through perm)."""
    counted = CountedKernel(gq._gptq_swap_kernel)
    monkeypatch.setattr(gq, "_gptq_swap_kernel", counted)
    cfg = gq.GPTQKernelConfig(16, 32, 128, unpack=unpack, kind="swap")
    packed, w = make_weight(512, 96, bits, group_size)
    dtypes = [d for d in HALF_DTYPES if gq._swap_magic(d, bits)]  # 8 bits: fp16 only
    for dtype in dtypes:
        for split in (1, 3):
            check(randx(m, 512, dtype), packed, w, bits, group_size, config=cfg, split_k=split)
    assert counted.launches == 2 * len(dtypes)
    if group_size != -1:
        packed, w = make_weight(512, 32, bits, group_size, "actorder")
        prepared = gq.gptq_prepare(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits,
                                   group_size)
        assert prepared.perm is not None
        x = randx(m, 512, dtypes[0])
        assert rel_err(prepared.matmul(x, config=cfg), x.double().cpu() @ w) < TOL[x.dtype]
        assert counted.launches == 2 * len(dtypes) + 1


@in_process
def test_swap_kernel_by_default_where_it_applies(monkeypatch):
    """2 to SWAP_MAX_ROWS rows of fp16/bf16 go to the swap kernel; float32 activations, 8-bit
    weights with bf16 (128 + q is exact in bf16 for q < 128 only), groups narrower than its 16
    packed rows and an unsorted g_idx go to the general tensor-core kernel instead."""
    assert gq._swap_applies(torch.float16, 8, 128, 4096, False)
    assert gq._swap_applies(torch.bfloat16, 4, 128, 4096, False)
    assert gq._swap_applies(torch.bfloat16, 4, 4096, 4096, False)  # one group
    assert not gq._swap_applies(torch.bfloat16, 8, 128, 4096, False)
    assert not gq._swap_applies(torch.float32, 4, 128, 4096, False)
    assert not gq._swap_applies(torch.float16, 4, 64, 4096, False)    # 4 bits: tiles of 128 rows
    assert not gq._swap_applies(torch.float16, 4, 128, 4096, True)
    swap, dot = CountedKernel(gq._gptq_swap_kernel), CountedKernel(gq._gptq_matmul_kernel)
    monkeypatch.setattr(gq, "_gptq_swap_kernel", swap)
    monkeypatch.setattr(gq, "_gptq_matmul_kernel", dot)
    packed, w = make_weight(256, 64, 4, 128)
    check(randx(5, 256, torch.float16), packed, w, 4, 128)
    assert (swap.launches, dot.launches) == (1, 0)
    check(randx(5, 256, DTYPES[0]), packed, w, 4, 128)   # float32 on CPU, bf16 on a GPU (swapped too)
    assert (swap.launches, dot.launches) == ((2, 0) if DTYPES[0] != torch.float32 else (1, 1))
    packed, w = make_weight(256, 64, 4, 32)
    check(randx(5, 256, torch.float16), packed, w, 4, 32)
    assert dot.launches == (1 if DTYPES[0] != torch.float32 else 2)


@in_process
@pytest.mark.parametrize("g_idx_kind", ["none", "actorder", "random"])
def test_dequantize_then_matmul(g_idx_kind):
    """The large-batch path: the weight dequantized into a scratch buffer by the Triton kernel,
    then one dense matmul (with gptq_prepare's permutation of x's columns where it applies)."""
    packed, w = make_weight(256, 96, 4, 32, g_idx_kind)
    cfg = gq.GPTQKernelConfig(0, 32, 64, kind="dequant")
    for dtype in DTYPES:
        check(randx(7, 256, dtype), packed, w, 4, 32, config=cfg)
    prepared = gq.gptq_prepare(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 4, 32)
    x = randx(7, 256, DTYPES[0])
    assert rel_err(prepared.matmul(x, config=cfg), x.double().cpu() @ w) < TOL[x.dtype]


@in_process
@pytest.mark.parametrize("block_k", [64, 128, 32], ids=["tile_is_group", "tile_spans_groups", "group_spans_tiles"])
def test_dequantize_tiles_and_groups(block_k):
    """The dequantize kernel with several groups of 64 rows: a tile of exactly one group and a
    tile inside one (one scale and zero row per tile), and a tile across two groups (a row each)."""
    packed, w = make_weight(256, 96, 4, 64, "none")
    cfg = gq.GPTQKernelConfig(0, 32, block_k, kind="dequant")
    for dtype in DTYPES:
        check(randx(5, 256, dtype), packed, w, 4, 64, config=cfg)


@in_process
@pytest.mark.parametrize("bits", [4, 8])
def test_unbalanced_g_idx_and_ragged_groups(bits):
    """A g_idx with any group per row (gathered per element), and a group size that no BLOCK_K
    divides (the group per row from k // group_size), with K not a multiple of 16."""
    packed, w = make_weight(256, 96, bits, 32, "random")
    check(randx(3, 256, DTYPES[0]), packed, w, bits, 32)
    packed, w = make_weight(120, 32, bits, 40, "none")
    for dtype in DTYPES:
        check(randx(4, 120, dtype), packed, w, bits, 40, split_k=1)
        check(randx(4, 120, dtype), packed, w, bits, 40, split_k=2)


@in_process
def test_prefill_sized_batch():
    """More rows than one tile of the largest M bucket (128), K a few tiles deep."""
    packed, w = make_weight(128, 64, 4, 32, "actorder")
    check(randx(130, 128, DTYPES[0]), packed, w, 4, 32)
    packed, w = make_weight(128, 64, 4, 32, "none")
    check(randx(130, 128, DTYPES[1]), packed, w, 4, 32)


@in_process
def test_scales_in_x_dtype_and_float32_x_with_half_scales():
    packed, w = make_weight(64, 32, 4, 32, "none", scale_dtype=torch.float32)
    check(randx(2, 64, torch.float32), packed, w, 4, 32)
    packed, w = make_weight(64, 32, 4, 32, "none", scale_dtype=DTYPES[1])
    check(randx(2, 64, DTYPES[1]), packed, w, 4, 32)


@in_process
def test_leading_dims_strided_rows_and_empty():
    packed, w = make_weight(64, 32, 4, 32, "none")
    dtype = DTYPES[0]
    big = randx(6, 200, dtype)
    x = big[:, 10:74]  # rows with a stride of 200, not 64
    ref = x.double().cpu() @ w
    out = gq.gptq_matmul(x, packed["qweight"], packed["qzeros"], packed["scales"], None, 4, 32)
    assert rel_err(out, ref) < TOL[dtype]
    x3 = randx(6, 64, dtype).view(2, 3, 64)
    out = gq.gptq_matmul(x3, packed["qweight"], packed["qzeros"], packed["scales"], None, 4, 32)
    assert out.shape == (2, 3, 32)
    assert rel_err(out.reshape(6, 32), x3.reshape(6, 64).double().cpu() @ w) < TOL[dtype]
    empty = gq.gptq_matmul(x3[:0], packed["qweight"], packed["qzeros"], packed["scales"], None, 4, 32)
    assert empty.shape == (0, 3, 32)


@in_process
def test_rejects_mismatched_shapes():
    packed, _ = make_weight(64, 32, 4, 32, "none")
    with pytest.raises(AssertionError):  # K = 64 does not match qweight's 8 rows of 8 values
        gq.gptq_matmul(randx(1, 128, DTYPES[0]), packed["qweight"], packed["qzeros"], packed["scales"], None, 4, 32)
    with pytest.raises(AssertionError):  # 8-bit reading of 4-bit packing
        gq.gptq_matmul(randx(1, 64, DTYPES[0]), packed["qweight"], packed["qzeros"], packed["scales"], None, 8, 32)


# Qwen3-8B's projections (in K, out N), as benchmarks/bench_gptq_gemm.py runs them
QWEN3_8B_SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 24576), "down": (12288, 4096)}


@pytest.mark.skipif(not _ON_CUDA, reason="Qwen3-8B's shapes, compiled on a GPU only (test_compiled_on_cuda runs "
                                         "them; under the interpreter they would take hours)")
@pytest.mark.parametrize("act_order", [False, True], ids=["g128", "actorder"])
@pytest.mark.parametrize("shape", list(QWEN3_8B_SHAPES))
def test_qwen3_8b_shapes_from_1_to_256_rows(shape, act_order):
    """4-bit g128 at Qwen3-8B's projections, 1 to 256 rows of bf16 (the GEMV kernel, the swap
    kernel, dequantize-then-cuBLAS), as the engine lays a checkpoint out (gptq_prepare: act-order
    rows sorted) and, for act-order, as the checkpoint stores it (the per-row group path)."""
    k, n = QWEN3_8B_SHAPES[shape]
    packed, w = make_weight(k, n, 4, 128, "actorder" if act_order else "none")
    w = w.to(DEVICE)  # float64, exact
    layouts = {"prepared": gq.gptq_prepare(packed["qweight"], packed["qzeros"], packed["scales"],
                                           packed["g_idx"], 4, 128)}
    if act_order:
        assert layouts["prepared"].perm is not None
        layouts["stored"] = gq.GPTQWeights(packed["qweight"], packed["qzeros"], packed["scales"],
                                           packed["g_idx"], None, 4, 128)
    for m in (1, 2, 4, 16, 33, 64, 65, 256):
        x = randx(m, k, torch.bfloat16)
        ref = x.double() @ w
        for name, weights in layouts.items():
            out = weights.matmul(x)
            assert out.shape == (m, n) and out.dtype == torch.bfloat16
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < TOL[torch.bfloat16], (shape, name, m, err)


# --- the reference dequantizer and the re-layout -------------------------------------------------

@pytest.mark.parametrize("bits,group_size,g_idx_kind", [(4, 32, "none"), (4, 32, "actorder"), (8, -1, "none"),
                                                        (8, 64, "random"), (2, 32, "actorder")])
def test_dequantize_is_exact(bits, group_size, g_idx_kind):
    if _TRITON_ALREADY_COMPILED:
        from folovllm.model_executor.layers.quantization.kernels import gptq_triton as mod
    else:
        mod = gq
    packed, w = make_weight(128, 64, bits, group_size, g_idx_kind)
    got = mod.gptq_dequantize(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits,
                              group_size, dtype=torch.float32)
    assert torch.equal(got.cpu(), w.float())  # fp16 scale x small integer is exact in float32


@in_process
@pytest.mark.parametrize("bits", [4, 8])
def test_prepare_sorts_act_order_rows(bits):
    """gptq_prepare turns a balanced act-order g_idx into sorted rows plus a permutation of x's
    columns (the per-tile group path), drops a plain g_idx, keeps an unbalanced one; the product
    is the same in every case."""
    x = randx(3, 256, DTYPES[0])
    for kind, expect_perm, expect_g_idx in [("actorder", True, False), ("plain", False, False),
                                            ("random", False, True), ("none", False, False)]:
        packed, w = make_weight(256, 64, bits, 32, kind)
        prepared = gq.gptq_prepare(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, 32)
        assert (prepared.perm is not None) == expect_perm, kind
        assert (prepared.g_idx is not None) == expect_g_idx, kind
        ref = x.double().cpu() @ w
        for split_k in (1, None):
            assert rel_err(prepared.matmul(x, split_k=split_k), ref) < TOL[x.dtype], (kind, split_k)
        dense = gq.gptq_dequantize(prepared.qweight, prepared.qzeros, prepared.scales, prepared.g_idx, bits, 32,
                                   dtype=torch.float32).double().cpu()
        if prepared.perm is not None:
            assert torch.equal(dense, w[prepared.perm.long().cpu()])


# --- launch choices ------------------------------------------------------------------------------

@in_process
def test_decode_batches_share_one_compiled_kernel():
    """Every M of a decode step above the GEMV rows (5..16) gets the same compile-time
    configuration and grid shape for a layer, M up to GEMV_MAX_ROWS goes to the GEMV kernel, and
    big M turns split-K off; M itself is a runtime argument that the compiled kernels are not
    specialised on (test_compiles_for_hopper_without_a_gpu)."""
    cpu = torch.device("cpu")
    for m in range(1, gq.GEMV_MAX_ROWS + 1):
        assert gq.default_config(m, 4096, 4096).kind == "gemv"
    assert gq.default_config(gq.SWAP_MAX_ROWS + 1, 4096, 4096).kind == "dequant"
    assert gq.default_config(gq.DEQUANT_MIN_ROWS, 4096, 4096, swap=False).kind == "dequant"
    for n, k in [(6144, 4096), (4096, 12288), (32, 64), (24576, 4096)]:
        for swap, rows in [(True, range(gq.GEMV_MAX_ROWS + 1, 17)), (True, range(17, gq.SWAP_MAX_ROWS + 1)),
                           (False, range(gq.GEMV_MAX_ROWS + 1, 17))]:
            configs = {gq.default_config(m, n, k, swap) for m in rows}
            assert len(configs) == 1
            cfg = configs.pop()
            assert cfg.kind == ("swap" if swap else "dot")
            min_rows = 16 * 8 if swap or cfg.unpack == "nibble" else 16
            assert gq._choose_block_k(cfg.block_k, k, 8, 128 if k > 128 else k, False, min_rows)[1] == 0  # per-tile groups
            splits = {gq._choose_split_k(None, m, -(-n // cfg.block_n), -(-k // cfg.block_k), cpu) for m in rows}
            assert len(splits) == 1
    assert gq._choose_split_k(None, 1, 64, 32, cpu) > 1   # one row of 64 tiles: split K
    assert gq._choose_split_k(None, 2048, 512, 64, cpu) == 1
    assert gq._choose_split_k(8, 1, 64, 4, cpu) == 4       # never more slices than K tiles


_COMPILE_FOR_SM90 = """
import dataclasses
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from folovllm.model_executor.layers.quantization.kernels import gptq_triton as g
names = ["x_ptr", "qw_ptr", "qz_ptr", "s_ptr", "g_ptr", "perm_ptr", "out_ptr", "part_ptr", "lock_ptr", "M", "N",
         "K", "group_size", "k_per_split", "stride_xm", "stride_qk", "stride_zg", "stride_sg", "stride_om"]
ptrs = ["*bf16", "*i32", "*i32", "*fp16", "*i32", "*i32", "*bf16", "*fp32", "*i32"]

def build(fn, names, types, consts, cfg):
    sig = dict(zip(names, types))
    sig.update(dict.fromkeys(consts, "constexpr"))
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert k.asm["cubin"] and k.metadata.shared < 200 * 1024, k.metadata.shared

for m, mode, perm, unpack, split in [(16, 0, True, 2, True), (16, 2, False, 0, False), (20, 0, False, 1, False),
                                     (20, 2, False, 2, True)]:
    cfg = g.default_config(m, 4096, 4096)
    if unpack != 2:  # the row-wise unpackings take shallower K tiles (their shared memory grows with it)
        cfg = dataclasses.replace(cfg, block_k=64)
    build(g._gptq_matmul_kernel, names, ptrs + ["i32"] * 10,
          dict(BITS=4, GROUP_MODE=mode, HAS_PERM=perm, UNPACK=unpack, DOT_PREC=None, SPLIT_K=split,
               BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), cfg)
for bits, mode in [(4, 1), (8, 1), (8, 2)]:  # the default tiles of a group per row (gptq_matmul)
    cfg = dataclasses.replace(g.default_config(16, 4096, 4096, swap=False), block_k=64)
    build(g._gptq_matmul_kernel, names, ptrs + ["i32"] * 10,
          dict(BITS=bits, GROUP_MODE=mode, HAS_PERM=False, UNPACK=1, DOT_PREC=None, SPLIT_K=True,
               BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), cfg)
swap_names = [nm for nm in names if nm != "g_ptr"]
for m, perm, unpack, split in [(16, True, "nibble", True), (64, False, "reshape", False), (64, False, "nibble", True)]:
    cfg = dataclasses.replace(g.default_config(m, 4096, 4096), unpack=unpack)
    assert cfg.kind == "swap"
    build(g._gptq_swap_kernel, swap_names, [p for i, p in enumerate(ptrs) if i != 4] + ["i32"] * 10,
          dict(BITS=4, HAS_PERM=perm, SPLIT_K=split, MAGIC_HALF=0x4300, MAGIC_VALUE=128.0,
               UNPACK=int(unpack == "reshape"), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), cfg)
gemv_names = [nm for nm in names if nm != "g_ptr"]
gemv_names[gemv_names.index("k_per_split") + 1:gemv_names.index("k_per_split") + 1] = ["field_hi", "field_lo"]
for bits, perm, split in [(4, False, True), (8, True, False)]:
    cfg = g.default_config(1, 4096, 4096)
    build(g._gptq_gemv_kernel, gemv_names, [p for i, p in enumerate(ptrs) if i != 4] + ["i32"] * 12,
          dict(BITS=bits, HAS_PERM=perm, SPLIT_K=split, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), cfg)
cfg = g.default_config(g.DEQUANT_MIN_ROWS, 4096, 4096)
build(g._gptq_dequant_kernel, ["qw_ptr", "qz_ptr", "s_ptr", "g_ptr", "w_ptr", "N", "K", "group_size", "stride_qk",
                               "stride_zg", "stride_sg", "stride_wk"], ["*i32", "*i32", "*fp16", "*i32", "*bf16"] + ["i32"] * 7,
      dict(BITS=4, HAS_G_IDX=False, BLOCK_N=cfg.block_n, BLOCK_KP=cfg.block_k // 8, ONE_GROUP=True), cfg)
for fn in (g._gptq_matmul_kernel, g._gptq_gemv_kernel, g._gptq_swap_kernel):
    assert [p.name for p in fn.params if p.do_not_specialize] == ["M"]
print("compiled")
"""


def test_compiles_for_hopper_without_a_gpu():
    """The kernels go through Triton's whole NVIDIA pipeline (to a cubin for sm_90) for the decode
    tiles, both group paths, every unpacking, split-K, the swap kernel's tiles of 16 and 64 rows
    (both unpackings), and the dequantize kernel of large batches:
    no GPU is needed to compile.
    And the compiled kernels do not specialise on M (no new compile for every decode batch size)."""
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("compiled"), r.stderr[-3000:]


# --- reruns in fresh processes -------------------------------------------------------------------

def _rerun(env: dict, select: str) -> None:
    rerun_pytest(__file__, env, select)


@pytest.mark.skipif(not _TRITON_ALREADY_COMPILED or torch.cuda.is_available(),
                    reason="the cases above ran in this process, or the GPU runs them compiled")
def test_rerun_in_fresh_process():
    _rerun(dict(os.environ, TRITON_INTERPRET="1"), "not test_compiled_on_cuda")


@pytest.mark.skipif(_ON_CUDA or not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_on_cuda():
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    _rerun(dict(env, FOLOVLLM_GPTQ_CUDA="1"), "not test_compiled_on_cuda and not test_rerun")
