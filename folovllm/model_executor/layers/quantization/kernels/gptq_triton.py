"""y = x @ W for GPTQ weights (2-, 4- or 8-bit integers packed in int32), dequantized inside the
matmul loop: the full-precision W is never written to memory.

Layout (the GPTQ checkpoint's, with p = 32 // bits values per int32):

    qweight  int32 [K // p, N]   W_q[k, n] = (qweight[k // p, n] >> (bits * (k % p))) & (2**bits - 1)
    qzeros   int32 [G, N // p]   z[g, n]   = (qzeros[g, n // p] >> (bits * (n % p))) & (2**bits - 1)
                                 (real zeros: a checkpoint's v1 "zero minus one" is converted before)
    scales   [G, N]              float16 or x's dtype
    g_idx    int [K] or None     the group of row k; None means k // group_size (group_size -1: one group)

    W[k, n] = scales[g, n] * (W_q[k, n] - z[g, n])

The kernel tiles the output in BLOCK_M x BLOCK_N tiles; each program walks its K range in BLOCK_K
steps, loads the packed rows of its tile, unpacks them with shifts and masks, and multiplies on the
tensor cores with a float32 accumulator. Unpacking either loads each int32 once and spreads its p
values over p rows with a broadcast shift and a reshape (the default: its pipelined loads need
2.5-3.5x less shared memory in an sm_90 compile), or (unpack_reshape=False) loads int32 row k // p
for every row k, so each int32 is fetched p times from cache.

The scale and zero come in one of three ways (GROUP_MODE):

  0  the group is constant over a K tile (no g_idx and BLOCK_K divides group_size, or one group):
     one [BLOCK_N] row of scales and zeros per tile; the tile's integer differences W_q - z (exact
     in fp16/bf16) go through the dot, and its [BLOCK_M, BLOCK_N] result is scaled once.
  1  no g_idx but a group size that no usable BLOCK_K divides: the group k // group_size per row.
  2  a general g_idx (act-order checkpoints): the group of every row of the tile is loaded and the
     scales and zeros are gathered per element before the dot.

Few output tiles (decode: M <= 16 rows, one row of tiles) would leave most of the GPU idle, so the
K dimension is also split over a third grid axis (split-K): each slice writes a float32 partial
[SPLIT_K, M, N] and the partials are summed (deterministic, unlike atomic adds).

M is a runtime argument that the kernel is not specialised on (do_not_specialize), and the
compile-time block sizes come from a few buckets of M, so a decode step with 1..16 rows reuses one
compiled kernel per layer shape; the grid depends only on the shapes (CUDA-graph capturable).

Act-order checkpoints can be re-laid out once after loading (gptq_prepare): when every group
holds exactly group_size rows (as GPTQ writes them), the rows of qweight are sorted by group and
the matmul reads x's columns through the permutation instead (x[:, perm[k]] meets row k), which
turns GROUP_MODE 2 into the faster GROUP_MODE 0. gptq_matmul also takes the original layout
unchanged (with its g_idx), so preparing is optional.

gptq_dequantize is the plain PyTorch form of the same arithmetic (a reference, and a fallback).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

SUPPORTED_BITS = (2, 4, 8)
# split-K is considered for up to this many rows; above it there are enough output tiles.
SPLIT_K_MAX_ROWS = 64
MAX_SPLIT_K = 16


@triton.jit(do_not_specialize=["M"])
def _gptq_matmul_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, perm_ptr, out_ptr,
                        M, N, K, group_size, k_per_split,
                        stride_xm, stride_qk, stride_zg, stride_sg, stride_os, stride_om,
                        BITS: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_PERM: tl.constexpr,
                        UNPACK_RESHAPE: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # the zero of column n sits in int32 column n // PACK, at bit BITS * (n % PACK)
    z_cols = offs_n // PACK
    z_shift = (offs_n % PACK) * BITS
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        if HAS_PERM:
            x_cols = tl.load(perm_ptr + offs_k, mask=k_mask, other=0)
        else:
            x_cols = offs_k
        x = tl.load(x_rows + x_cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)

        # the tile's integer weights W_q [BLOCK_K, BLOCK_N]
        if UNPACK_RESHAPE:
            # each packed int32 loaded once, then spread over its PACK rows
            offs_kp = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
            packed = tl.load(qw_ptr + offs_kp.to(tl.int64)[:, None] * stride_qk + offs_n[None, :],
                             mask=(offs_kp < k_end // PACK)[:, None] & n_mask[None, :], other=0)
            shifts = tl.arange(0, PACK) * BITS
            q = (packed[:, None, :] >> shifts[None, :, None]) & MASK
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))
        else:
            # row k reads int32 row k // PACK (the PACK rows sharing it hit the same cache line)
            packed = tl.load(qw_ptr + (offs_k // PACK).to(tl.int64)[:, None] * stride_qk + offs_n[None, :],
                             mask=k_mask[:, None] & n_mask[None, :], other=0)
            q = (packed >> ((offs_k % PACK) * BITS)[:, None]) & MASK

        if GROUP_MODE == 0:
            g = k0 // group_size
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            zp = tl.load(qz_ptr + g * stride_zg + z_cols, mask=n_mask, other=0)
            z = (zp >> z_shift) & MASK
            w = (q - z[None, :]).to(x.dtype)  # small integers: exact in fp16 / bf16
            acc += tl.dot(x, w, input_precision=DOT_PREC) * s[None, :]
        else:
            if GROUP_MODE == 1:
                g = offs_k // group_size
            else:
                g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
            kn_mask = k_mask[:, None] & n_mask[None, :]
            g_rows = g.to(tl.int64)[:, None]
            s = tl.load(s_ptr + g_rows * stride_sg + offs_n[None, :], mask=kn_mask, other=0.0).to(tl.float32)
            zp = tl.load(qz_ptr + g_rows * stride_zg + z_cols[None, :], mask=kn_mask, other=0)
            z = (zp >> z_shift[None, :]) & MASK
            w = ((q - z).to(tl.float32) * s).to(x.dtype)
            acc = tl.dot(x, w, acc, input_precision=DOT_PREC)

    out = out_ptr + pid_k.to(tl.int64) * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@dataclasses.dataclass(frozen=True)
class GPTQKernelConfig:
    """Compile-time tile sizes and launch options of one gptq_matmul call."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    unpack_reshape: bool = True


def default_config(m: int, n: int, k: int) -> GPTQKernelConfig:
    """Tiles by buckets of M (so that the compiled kernel does not change with every M). Starting
    points, not yet tuned on a GPU: narrow tiles with deep K steps for decode (memory bound: many
    programs, split-K adds more), square tiles for prefill (compute bound)."""
    if m <= 16:
        return GPTQKernelConfig(16, 64, 128, num_warps=4, num_stages=4)
    if m <= 32:
        return GPTQKernelConfig(32, 64, 128, num_warps=4, num_stages=4)
    if m <= 64:
        return GPTQKernelConfig(64, 64, 64, num_warps=4, num_stages=4)
    return GPTQKernelConfig(128, 128, 64, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100/H200; only shapes the split on machines without CUDA (the interpreter)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _effective_group_size(group_size: int | None, k: int) -> int:
    if group_size is None or group_size == -1 or group_size >= k:
        return k
    assert group_size > 0, f"group_size must be positive or -1, got {group_size}"
    return group_size


def _choose_block_k(block_k: int, k: int, pack: int, group_size: int, has_g_idx: bool) -> tuple[int, int]:
    """(BLOCK_K, GROUP_MODE). BLOCK_K is a power of two >= 16 (tl.dot) and a multiple of the
    packing factor, no wider than K needs; halved until it divides the group size when that
    gives the per-tile-constant group path."""
    bk = max(16, pack, min(block_k, _next_pow2(k)))
    if has_g_idx:
        return bk, 2
    if group_size >= k:
        return bk, 0
    b = bk
    while b >= max(16, pack):
        if group_size % b == 0:
            return b, 0
        b //= 2
    return bk, 1


def _choose_split_k(split_k: int | None, m: int, tiles: int, k_tiles: int, device: torch.device) -> int:
    if split_k is None:
        target = 2 * _num_sms(device)
        split = 1
        if m <= SPLIT_K_MAX_ROWS and tiles < target:
            split = min(MAX_SPLIT_K, triton.cdiv(target, tiles))
    else:
        split = int(split_k)
        assert split >= 1, f"split_k must be >= 1, got {split_k}"
    return max(1, min(split, k_tiles))


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, bits: int, group_size: int, *, split_k: int | None = None,
                perm: torch.Tensor | None = None, config: GPTQKernelConfig | None = None) -> torch.Tensor:
    """x [..., K] (fp16 / bf16 / fp32) @ the GPTQ weight [K, N] -> [..., N] in x's dtype,
    accumulated in float32. split_k: the number of K slices (None: enough to fill the GPU when
    there are few output tiles; 1: off). perm (from gptq_prepare): weight row k meets x's column
    perm[k]. config overrides the tile sizes (tuning)."""
    assert bits in SUPPORTED_BITS, f"bits must be one of {SUPPORTED_BITS}, got {bits}"
    pack = 32 // bits
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n = qweight.shape[1]
    assert qweight.dtype == torch.int32 and qzeros.dtype == torch.int32
    assert qweight.shape[0] * pack == k, f"qweight {tuple(qweight.shape)} does not pack K={k} at {bits} bits"
    assert qzeros.shape[1] * pack == n, f"qzeros {tuple(qzeros.shape)} does not pack N={n} at {bits} bits"
    assert scales.shape == (qzeros.shape[0], n), f"scales {tuple(scales.shape)} vs qzeros {tuple(qzeros.shape)}"
    qweight = qweight if qweight.stride(1) == 1 else qweight.contiguous()
    qzeros = qzeros if qzeros.stride(1) == 1 else qzeros.contiguous()
    scales = scales if scales.stride(1) == 1 else scales.contiguous()
    if g_idx is not None:
        assert g_idx.shape == (k,), f"g_idx {tuple(g_idx.shape)} for K={k}"
        g_idx = g_idx.contiguous()
    if perm is not None:
        assert perm.shape == (k,), f"perm {tuple(perm.shape)} for K={k}"
        perm = perm.contiguous()
    gs = _effective_group_size(group_size, k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*shape[:-1], n)
    if k == 0:
        return out.zero_().view(*shape[:-1], n)

    cfg = config or default_config(m, n, k)
    block_k, group_mode = _choose_block_k(cfg.block_k, k, pack, gs, g_idx is not None)
    tiles_n, tiles_m = triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m)
    k_tiles = triton.cdiv(k, block_k)
    split = _choose_split_k(split_k, m, tiles_n * tiles_m, k_tiles, x.device)
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty slices
    dest = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _gptq_matmul_kernel[(tiles_n, tiles_m, split)](
        x2, qweight, qzeros, scales, qweight if g_idx is None else g_idx, qweight if perm is None else perm, dest,
        m, n, k, gs, tiles_per_split * block_k,
        x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0),
        dest.stride(0) if split > 1 else 0, dest.stride(-2),
        BITS=bits, GROUP_MODE=group_mode, HAS_PERM=perm is not None, UNPACK_RESHAPE=cfg.unpack_reshape,
        DOT_PREC="ieee" if x.dtype == torch.float32 else None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        out.copy_(dest.sum(dim=0))
    return out.view(*shape[:-1], n)


# --- reference and re-layout ---------------------------------------------------------------------

def unpack_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K // p, N] packed along K -> int32 [K, N] of values in [0, 2**bits)."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=qweight.device, dtype=torch.int32) * bits
    q = (qweight[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return q.reshape(-1, qweight.shape[1])


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of unpack_rows: int [K, N] of values in [0, 2**bits) -> int32 [K // p, N]."""
    pack = 32 // bits
    k, n = q.shape
    assert k % pack == 0
    shifts = torch.arange(pack, device=q.device, dtype=torch.int64) * bits
    v = (q.to(torch.int64).reshape(k // pack, pack, n) << shifts[None, :, None]).sum(dim=1)
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)  # two's complement


def unpack_cols(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [G, N // p] packed along N -> int32 [G, N]."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=qzeros.device, dtype=torch.int32) * bits
    z = (qzeros[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return z.reshape(qzeros.shape[0], -1)


def _group_index(g_idx: torch.Tensor | None, k: int, group_size: int, device) -> torch.Tensor:
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    return torch.arange(k, device=device) // _effective_group_size(group_size, k)


def gptq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor | None, bits: int, group_size: int,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense W [K, N] = scales[g, n] * (W_q[k, n] - z[g, n]), computed in float32 and returned in
    `dtype` (default: scales' dtype)."""
    q = unpack_rows(qweight, bits)
    z = unpack_cols(qzeros, bits)
    g = _group_index(g_idx, q.shape[0], group_size, q.device)
    w = (q - z[g]).to(torch.float32) * scales[g].to(torch.float32)
    return w.to(dtype or scales.dtype)


@dataclasses.dataclass
class GPTQWeights:
    """A GPTQ weight in the layout gptq_matmul reads fastest (see gptq_prepare)."""
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    perm: torch.Tensor | None
    bits: int
    group_size: int

    def matmul(self, x: torch.Tensor, *, split_k: int | None = None,
               config: GPTQKernelConfig | None = None) -> torch.Tensor:
        return gptq_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size,
                           split_k=split_k, perm=self.perm, config=config)


def gptq_prepare(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, bits: int, group_size: int) -> GPTQWeights:
    """Once, after loading: drop a g_idx that is just k // group_size (checkpoints without act-order
    often carry one), and for act-order, sort the rows of qweight by group when that makes the
    groups consecutive runs of group_size rows (the matmul then gathers x's columns by `perm`, and
    scales/zeros are read once per K tile). Any other g_idx is kept as it is."""
    k = qweight.shape[0] * (32 // bits)
    gs = _effective_group_size(group_size, k)
    keep = GPTQWeights(qweight, qzeros, scales, g_idx, None, bits, group_size)
    if g_idx is None:
        return keep
    plain = torch.arange(k, device=g_idx.device) // gs
    g = g_idx.to(torch.long)
    if torch.equal(g, plain):
        return dataclasses.replace(keep, g_idx=None)
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], plain):
        return keep
    q = unpack_rows(qweight, bits)[perm.to(qweight.device)]
    return GPTQWeights(pack_rows(q, bits), qzeros, scales, None, perm.to(device=qweight.device, dtype=torch.int32),
                       bits, group_size)
