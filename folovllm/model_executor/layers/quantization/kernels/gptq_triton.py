"""y = x @ W for GPTQ weights (2-, 4- or 8-bit integers packed in int32): up to DEQUANT_MIN_ROWS
rows the weight is dequantized inside the matmul loop and the full-precision W is never written to
memory; for more rows it is dequantized once into a scratch buffer for cuBLAS.

Layout (the GPTQ checkpoint's, with p = 32 // bits values per int32):

    qweight  int32 [K // p, N]   W_q[k, n] = (qweight[k // p, n] >> (bits * (k % p))) & (2**bits - 1)
    qzeros   int32 [G, N // p]   z[g, n]   = (qzeros[g, n // p] >> (bits * (n % p))) & (2**bits - 1)
                                 (real zeros: a checkpoint's v1 "zero minus one" is converted before)
    scales   [G, N]              float16 or x's dtype
    g_idx    int [K] or None     the group of row k; None means k // group_size (group_size -1: one group)

    W[k, n] = scales[g, n] * (W_q[k, n] - z[g, n])

Four kernels, chosen by the number of rows M (default_config):

  gemv     (M = 1): CUDA cores, one program row per row of x. Each program loads packed
           [BLOCK_K / p, BLOCK_N] tiles (the next one's load issued before this one's arithmetic)
           and reads each bit field as a float by placing it in a float's mantissa (a shift and
           one LOP3 per weight, one shift per two fields up to 4 bits; _gptq_gemv_kernel); every
           K tile lies inside one group, so the zero and the scale apply to the tile's sums.
  swap     (M up to SWAP_MAX_ROWS, fp16/bf16 activations): tensor cores with the operands
           swapped, out^T = W^T x^T, so that the weight tile fills the MMA's rows and the few x
           rows are its narrow side; a bit field becomes a 16-bit float by an OR into the bits of
           1024 (fp16) or 128 (bf16), and each K tile's zero and scale apply to its result
           (_gptq_swap_kernel).
  dot      (layers swap cannot take, up to DEQUANT_MIN_ROWS): tensor cores, [BLOCK_M, BLOCK_N]
           output tiles with a float32 accumulator, the weight dequantized tile by tile inside
           the K loop. The default
           unpacking ("nibble") dots each bit field's rows against the x columns they meet, p
           dots of BLOCK_K / p rows, so the unpacked tile is never reshaped; "reshape" spreads
           each int32 over its p rows with a broadcast shift and a reshape, "gather" loads int32
           row k // p for every row k.
  dequant  (more rows): the weight dequantized once into a scratch buffer, then one cuBLAS matmul.

Integers become floats without a conversion instruction: OR-ing q into the bits of the float
2**23 gives 2**23 + q exactly, and subtracting 2**23 + z leaves q - z (MAGIC_BITS).

The scale and zero come in one of three ways (GROUP_MODE, dot kernel):

  0  the group is constant over a K tile (no g_idx and BLOCK_K divides group_size, or one group):
     one [BLOCK_N] row of scales and zeros per tile; the tile's integer differences W_q - z (exact
     in fp16/bf16) go through the dot, and its [BLOCK_M, BLOCK_N] result is scaled once.
  1  no g_idx but a group size that no usable BLOCK_K divides: the group k // group_size per row.
  2  a general g_idx (act-order checkpoints): the group of every row of the tile is loaded and the
     scales and zeros are gathered per element before the dot.

Few output tiles (decode: one row of tiles) would leave most of the GPU idle, so the K dimension
is also split over a third grid axis (split-K): each slice writes a float32 partial, and the
slice of a tile that finishes last (a counter per tile) adds the partials in slice order and
writes the output: deterministic, and no second kernel.

M is a runtime argument that the kernels are not specialised on (do_not_specialize), and the
compile-time block sizes come from a few buckets of M, so the decode steps of a bucket reuse one
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
# Up to this many rows the GEMV kernel (no tensor cores) runs; from DEQUANT_MIN_ROWS on, the
# weight is dequantized into a scratch buffer once and the product goes to cuBLAS.
GEMV_MAX_ROWS = 1
GEMV_PROGRAMS_PER_SM = 2
GEMV_MAX_SPLIT_K = 64
DEQUANT_MIN_ROWS = 32
# Up to this many rows of 16-bit activations, the swap kernel (see default_config).
SWAP_MAX_ROWS = 64
UNPACKINGS = ("gather", "reshape", "nibble")

# float32 2**23: OR-ing a small non-negative integer q into its bit pattern gives the float
# 2**23 + q exactly, so q - z = bits_as_float(q | MAGIC_BITS) - (2**23 + z) costs an OR and a
# subtraction, not an integer-to-float conversion (a quarter-rate instruction on recent GPUs).
MAGIC_BITS: tl.constexpr = tl.constexpr(0x4B000000)
MAGIC_F32: tl.constexpr = tl.constexpr(8388608.0)


@triton.jit
def _tile_scale_zero(s_ptr, qz_ptr, g, offs_n, z_cols, z_shift, n_mask, stride_sg, stride_zg, MASK: tl.constexpr):
    """Group g's scales [BLOCK_N] (float32) and 2**23 + zeros [BLOCK_N] (see MAGIC_BITS)."""
    s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    zp = tl.load(qz_ptr + g * stride_zg + z_cols, mask=n_mask, other=0)
    return s, ((zp >> z_shift) & MASK).to(tl.float32) + MAGIC_F32


@triton.jit
def _row_scale_zero(s_ptr, qz_ptr, g, offs_n, z_cols, z_shift, kn_mask, stride_sg, stride_zg, MASK: tl.constexpr):
    """The same per weight row: g [rows] -> scales and 2**23 + zeros, each [rows, BLOCK_N]."""
    g_rows = g.to(tl.int64)[:, None]
    s = tl.load(s_ptr + g_rows * stride_sg + offs_n[None, :], mask=kn_mask, other=0.0).to(tl.float32)
    zp = tl.load(qz_ptr + g_rows * stride_zg + z_cols[None, :], mask=kn_mask, other=0)
    return s, ((zp >> z_shift[None, :]) & MASK).to(tl.float32) + MAGIC_F32


@triton.jit
def _store_result(acc, out_ptr, part_ptr, lock_ptr, offs_m, offs_n, mask, M, N, stride_om, tile, pid_k,
                  num_splits, SPLIT_K: tl.constexpr):
    """Write one output tile. With split-K, each slice stores its float32 partial; the slice that
    finishes last (a per-tile counter) adds all partials in slice order (deterministic), writes
    the output and resets the counter for the next call: one kernel, no separate reduction."""
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    if not SPLIT_K:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        mn = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        size = M.to(tl.int64) * N
        tl.store(part_ptr + pid_k * size + mn, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        done = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if done == num_splits - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(num_splits):
                total += tl.load(part_ptr + s * size + mn, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0)


@triton.jit(do_not_specialize=["M"])
def _gptq_matmul_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, perm_ptr, out_ptr, part_ptr, lock_ptr,
                        M, N, K, group_size, k_per_split,
                        stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
                        BITS: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_PERM: tl.constexpr,
                        UNPACK: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT_K: tl.constexpr,  # split > 1?
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tensor-core tiles: [BLOCK_M, BLOCK_K] of x times the dequantized [BLOCK_K, BLOCK_N]."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BLOCK_KP: tl.constexpr = BLOCK_K // PACK
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
        if UNPACK == 2:
            # nibble j of packed row r is weight row r * PACK + j: PACK dots of BLOCK_KP rows,
            # each against the x columns of those rows (no reshape of the unpacked tile)
            offs_kp = k0 // PACK + tl.arange(0, BLOCK_KP)
            kp_mask = offs_kp < k_end // PACK
            packed = tl.load(qw_ptr + offs_kp.to(tl.int64)[:, None] * stride_qk + offs_n[None, :],
                             mask=kp_mask[:, None] & n_mask[None, :], other=0)
            if GROUP_MODE == 0:
                s, zf = _tile_scale_zero(s_ptr, qz_ptr, k0 // group_size, offs_n, z_cols, z_shift, n_mask,
                                         stride_sg, stride_zg, MASK)
                tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(PACK):
                rows = offs_kp * PACK + j
                if HAS_PERM:
                    cols = tl.load(perm_ptr + rows, mask=kp_mask, other=0)
                else:
                    cols = rows
                xj = tl.load(x_rows + cols[None, :], mask=m_mask[:, None] & kp_mask[None, :], other=0.0)
                qf = (((packed >> (j * BITS)) & MASK) | MAGIC_BITS).to(tl.float32, bitcast=True)
                if GROUP_MODE == 0:
                    w = (qf - zf[None, :]).to(xj.dtype)  # small integers: exact in fp16 / bf16
                    tile = tl.dot(xj, w, tile, input_precision=DOT_PREC)
                else:
                    if GROUP_MODE == 1:
                        gr = rows // group_size
                    else:
                        gr = tl.load(g_ptr + rows, mask=kp_mask, other=0)
                    s, zf = _row_scale_zero(s_ptr, qz_ptr, gr, offs_n, z_cols, z_shift,
                                            kp_mask[:, None] & n_mask[None, :], stride_sg, stride_zg, MASK)
                    w = ((qf - zf) * s).to(xj.dtype)
                    acc = tl.dot(xj, w, acc, input_precision=DOT_PREC)
            if GROUP_MODE == 0:
                acc += tile * s[None, :]
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            if HAS_PERM:
                x_cols = tl.load(perm_ptr + offs_k, mask=k_mask, other=0)
            else:
                x_cols = offs_k
            x = tl.load(x_rows + x_cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            # the tile's integer weights W_q [BLOCK_K, BLOCK_N]
            if UNPACK == 1:
                # each packed int32 loaded once, then spread over its PACK rows
                offs_kp = k0 // PACK + tl.arange(0, BLOCK_KP)
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
            qf = (q | MAGIC_BITS).to(tl.float32, bitcast=True)
            if GROUP_MODE == 0:
                s, zf = _tile_scale_zero(s_ptr, qz_ptr, k0 // group_size, offs_n, z_cols, z_shift, n_mask,
                                         stride_sg, stride_zg, MASK)
                w = (qf - zf[None, :]).to(x.dtype)
                acc += tl.dot(x, w, input_precision=DOT_PREC) * s[None, :]
            else:
                if GROUP_MODE == 1:
                    g = offs_k // group_size
                else:
                    g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
                s, zf = _row_scale_zero(s_ptr, qz_ptr, g, offs_n, z_cols, z_shift, k_mask[:, None] & n_mask[None, :],
                                        stride_sg, stride_zg, MASK)
                w = ((qf - zf) * s).to(x.dtype)
                acc = tl.dot(x, w, acc, input_precision=DOT_PREC)

    _store_result(acc, out_ptr, part_ptr, lock_ptr, offs_m, offs_n, m_mask[:, None] & n_mask[None, :],
                  M, N, stride_om, pid_m * tl.num_programs(0) + pid_n, pid_k, tl.num_programs(2), SPLIT_K)


@triton.jit
def _shift(packed, SH: tl.constexpr):
    """packed << SH, or >> -SH for a negative SH (the sign bits an arithmetic shift brings in
    land above the field windows, which the masks clear)."""
    if SH >= 0:
        return packed << SH
    return packed >> (-SH)


@triton.jit(do_not_specialize=["M"])
def _gptq_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, perm_ptr, out_ptr, part_ptr, lock_ptr,
                      M, N, K, group_size, k_per_split, field_hi, field_lo,
                      stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
                      BITS: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row of x (program axis 1) times a [K, BLOCK_N] slab of the weight, on the CUDA cores.

    Each packed [BLOCK_KP, BLOCK_N] tile is loaded once (the next tile's load is issued before
    this tile's arithmetic), and its bit fields become floats without a conversion or a
    subtraction per weight: a field q shifted to the top of a float's mantissa and OR-ed with the
    bits of 1.0 is the float 1 + q / 2**BITS exactly (a shift and one LOP3). Up to 4 bits, one
    shift serves two neighbouring fields: the upper lands in that top window, the lower one
    window below, as 1 + q / 2**(2 BITS), and its x is multiplied by 2**BITS, so both products
    carry x * q / 2**BITS. A tile's rows lie in one group (the launcher makes sure), so with
    a = sum of the products, X' = sum of their constant parts (x, or 2**BITS x) and X = sum x:

        sum x * s * (q - z) = s * 2**BITS * (a - X') - s * z * X

    the tile's a summed over its rows, then a few operations per output column. field_hi /
    field_lo are the two windows' masks, passed at run time: as registers they let the AND and
    the OR fuse into one LOP3 (an instruction takes only one immediate)."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BLOCK_KP: tl.constexpr = BLOCK_K // PACK
    HI: tl.constexpr = 23 - BITS           # the top window's lowest bit
    LO: tl.constexpr = 23 - 2 * BITS       # the one below (pairs, BITS <= 4)
    PAIRS: tl.constexpr = BITS <= 4
    ONE_BITS: tl.constexpr = 0x3F800000    # float32 1.0
    SCALE: tl.constexpr = float(1 << BITS)
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    z_cols = offs_n // PACK
    z_shift = (offs_n % PACK) * BITS
    x_row = x_ptr + row.to(tl.int64) * stride_xm

    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    kp_end = k_end // PACK
    # (pointers are rebuilt from scalars each iteration: a loop-carried pointer tensor would hide
    # its contiguity along N from the compiler, and with it the vector loads)
    offs_kp = k_start // PACK + tl.arange(0, BLOCK_KP)
    packed = tl.load(qw_ptr + offs_kp.to(tl.int64)[:, None] * stride_qk + offs_n[None, :],
                     mask=(offs_kp < kp_end)[:, None] & n_mask[None, :], other=0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_kp = k0 // PACK + tl.arange(0, BLOCK_KP)
        kp_mask = offs_kp < kp_end
        nxt = offs_kp + BLOCK_KP
        packed_next = tl.load(qw_ptr + nxt.to(tl.int64)[:, None] * stride_qk + offs_n[None, :],
                              mask=(nxt < kp_end)[:, None] & n_mask[None, :], other=0)
        g = k0 // group_size
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = ((tl.load(qz_ptr + g * stride_zg + z_cols, mask=n_mask, other=0) >> z_shift) & MASK).to(tl.float32)
        a = tl.zeros((BLOCK_KP, BLOCK_N), dtype=tl.float32)
        x_hi = tl.zeros((BLOCK_KP,), dtype=tl.float32)  # sum of the x that meet the top window
        x_lo = tl.zeros((BLOCK_KP,), dtype=tl.float32)  # and of those that meet the lower one
        for j in tl.static_range(PACK):
            rows = offs_kp * PACK + j
            if HAS_PERM:
                cols = tl.load(perm_ptr + rows, mask=kp_mask, other=0)
            else:
                cols = rows
            xj = tl.load(x_row + cols, mask=kp_mask, other=0.0).to(tl.float32)
            if PAIRS and j % 2 == 0:
                f = _shift(packed, LO - BITS * j)  # field j to the low window, j + 1 to the top
                x_lo += xj
                w = ((f & field_lo) | ONE_BITS).to(tl.float32, bitcast=True)  # 1 + q / 2**(2 BITS)
                a += (xj * SCALE)[:, None] * w
            else:
                if not PAIRS:
                    f = _shift(packed, HI - BITS * j)
                x_hi += xj
                w = ((f & field_hi) | ONE_BITS).to(tl.float32, bitcast=True)  # 1 + q / 2**BITS
                a += xj[:, None] * w
        # the tile's rows, summed (inside each thread when a thread holds whole columns)
        x_sum = tl.sum(x_hi + x_lo, axis=0)
        x_const = tl.sum(x_hi + x_lo * SCALE, axis=0)
        acc += s * SCALE * (tl.sum(a, axis=0) - x_const) - s * z * x_sum
        packed = packed_next
    offs_m = row + tl.arange(0, 1)
    _store_result(acc[None, :], out_ptr, part_ptr, lock_ptr, offs_m, offs_n,
                  (offs_m < M)[:, None] & n_mask[None, :], M, N, stride_om,
                  row * tl.num_programs(0) + pid_n, pid_k, tl.num_programs(2), SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _gptq_swap_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, perm_ptr, out_ptr, part_ptr, lock_ptr,
                      M, N, K, group_size, k_per_split,
                      stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
                      BITS: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT_K: tl.constexpr,
                      MAGIC_HALF: tl.constexpr, MAGIC_VALUE: tl.constexpr, UNPACK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Few rows on tensor cores with the operands swapped: out^T [BLOCK_N, BLOCK_M] = W^T x^T, so
    the weight tile is the dot's first operand (its BLOCK_N output columns fill the MMA's rows,
    which a handful of x rows would leave mostly empty) and x^T, a few KB, is the second.

    A bit field becomes a 16-bit float in two integer operations: q OR-ed into the bits of
    MAGIC_VALUE (1024 in fp16, 128 in bf16, where consecutive integers are exactly representable)
    is MAGIC_VALUE + q, truncated to 16 bits and reinterpreted, no conversion. Each tile lies
    inside one group, so with X = the sum of the tile's x per row,

        sum x * s * (q - z) = s * (sum x * (MAGIC_VALUE + q) - (MAGIC_VALUE + z) * X)

    as in the GEMV kernel: the zero and the scale apply to the tile's [BLOCK_N, BLOCK_M] result."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BLOCK_KP: tl.constexpr = BLOCK_K // PACK
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    z_cols = offs_n // PACK
    z_shift = (offs_n % PACK) * BITS
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm

    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    kp_end = k_end // PACK
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_kp = k0 // PACK + tl.arange(0, BLOCK_KP)
        kp_mask = offs_kp < kp_end
        # [BLOCK_N, BLOCK_KP]: the packed tile read transposed (contiguous along N)
        packed = tl.load(qw_ptr + offs_kp.to(tl.int64)[None, :] * stride_qk + offs_n[:, None],
                         mask=n_mask[:, None] & kp_mask[None, :], other=0)
        g = k0 // group_size
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = ((tl.load(qz_ptr + g * stride_zg + z_cols, mask=n_mask, other=0) >> z_shift) & MASK).to(tl.float32)
        if UNPACK == 1:
            # one dot per tile: each int32 spread over its PACK rows in place (k = kp * PACK + j)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_end
            if HAS_PERM:
                cols = tl.load(perm_ptr + offs_k, mask=k_mask, other=0)
            else:
                cols = offs_k
            xt = tl.load(x_cols + cols[:, None], mask=k_mask[:, None] & m_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
            shifts = tl.arange(0, PACK) * BITS
            q = (packed[:, :, None] >> shifts[None, None, :]) & MASK
            w = tl.reshape(q | MAGIC_HALF, (BLOCK_N, BLOCK_K)).to(tl.int16).to(xt.dtype, bitcast=True)
            tile = tl.dot(w, xt)
            x_sum = tl.sum(xt.to(tl.float32), axis=0)
        else:
            # PACK dots, one per bit field, each against the x rows of that field
            tile = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for j in tl.static_range(PACK):
                rows = offs_kp * PACK + j
                if HAS_PERM:
                    cols = tl.load(perm_ptr + rows, mask=kp_mask, other=0)
                else:
                    cols = rows
                xj = tl.load(x_cols + cols[:, None], mask=kp_mask[:, None] & m_mask[None, :], other=0.0)  # [BLOCK_KP, BLOCK_M]
                w = (((packed >> (j * BITS)) & MASK) | MAGIC_HALF).to(tl.int16).to(xj.dtype, bitcast=True)
                tile = tl.dot(w, xj, tile)
                x_sum += tl.sum(xj.to(tl.float32), axis=0)
        acc += s[:, None] * (tile - (z + MAGIC_VALUE)[:, None] * x_sum[None, :])
    _store_result(tl.trans(acc), out_ptr, part_ptr, lock_ptr, offs_m, offs_n, m_mask[:, None] & n_mask[None, :],
                  M, N, stride_om, pid_m * tl.num_programs(0) + pid_n, pid_k, tl.num_programs(2), SPLIT_K)


@triton.jit
def _gptq_dequant_kernel(qw_ptr, qz_ptr, s_ptr, g_ptr, w_ptr, N, K, group_size,
                         stride_qk, stride_zg, stride_sg, stride_wk,
                         BITS: tl.constexpr, HAS_G_IDX: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, ONE_GROUP: tl.constexpr):
    """W [K, N] in w's dtype = scales * (W_q - z), one packed [BLOCK_KP, BLOCK_N] tile a program.
    ONE_GROUP: the tile's BLOCK_KP * PACK rows lie in one group (no g_idx, the group size a
    multiple of them), so one scale and zero row serves every bit field."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    offs_kp = tl.program_id(0) * BLOCK_KP + tl.arange(0, BLOCK_KP)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kn_mask = (offs_kp < K // PACK)[:, None] & (offs_n < N)[None, :]
    z_cols = offs_n // PACK
    z_shift = (offs_n % PACK) * BITS
    packed = tl.load(qw_ptr + offs_kp.to(tl.int64)[:, None] * stride_qk + offs_n[None, :], mask=kn_mask, other=0)
    if ONE_GROUP:
        g0 = tl.program_id(0) * BLOCK_KP * PACK // group_size
        s_t, zf_t = _tile_scale_zero(s_ptr, qz_ptr, g0, offs_n, z_cols, z_shift, offs_n < N, stride_sg,
                                     stride_zg, MASK)
    for j in tl.static_range(PACK):
        rows = offs_kp * PACK + j
        if ONE_GROUP:
            s = s_t[None, :]
            zf = zf_t[None, :]
        else:
            if HAS_G_IDX:
                g = tl.load(g_ptr + rows, mask=offs_kp < K // PACK, other=0)
            else:
                g = rows // group_size
            s, zf = _row_scale_zero(s_ptr, qz_ptr, g, offs_n, z_cols, z_shift, kn_mask, stride_sg, stride_zg,
                                    MASK)
        qf = (((packed >> (j * BITS)) & MASK) | MAGIC_BITS).to(tl.float32, bitcast=True)
        w = (qf - zf) * s
        tl.store(w_ptr + rows.to(tl.int64)[:, None] * stride_wk + offs_n[None, :],
                 w.to(w_ptr.dtype.element_ty), mask=kn_mask)


@dataclasses.dataclass(frozen=True)
class GPTQKernelConfig:
    """Compile-time tile sizes and launch options of one gptq_matmul call. kind: "dot" (tensor
    cores), "gemv" (CUDA cores, one program row per row of x, for up to block_m rows) or
    "dequant" (dequantize, then cuBLAS). unpack (dot only): how a packed tile becomes weight rows,
    one of UNPACKINGS."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    unpack: str = "nibble"
    kind: str = "dot"


def default_config(m: int, n: int, k: int, swap: bool = True) -> GPTQKernelConfig:
    """Tiles by buckets of M (so that the compiled kernel does not change with every M), from
    sweeps on an H200 at Qwen3-8B's projections (benchmarks/bench_gptq_gemm.py --sweep): the GEMV
    kernel for one row (the dot tiles were no faster there, and the GEMV kernel's cost grows with
    every extra row), the swap kernel up to SWAP_MAX_ROWS rows, and dequantize-then-cuBLAS above
    (it beat every fused tile at 256 and 512 rows by 1.7-3x). swap=False: the layer is one the swap
    kernel cannot take (see _swap_applies), and the general tensor-core kernel runs up to
    DEQUANT_MIN_ROWS instead."""
    if m <= GEMV_MAX_ROWS:
        # 1 row, H200: wide-output layers (gate_up, N 24576) best with 1024 x 32 tiles (26.0 us),
        # the others with 256 x 128 (qkv 10.6, o 9.0 us); down's best (512 x 64, 17.3 us) is
        # within a few percent of 256 x 128.
        if n >= 16384:
            return GPTQKernelConfig(GEMV_MAX_ROWS, 1024, 32, num_warps=4, num_stages=1, kind="gemv")
        return GPTQKernelConfig(GEMV_MAX_ROWS, 256, 128, num_warps=4, num_stages=1, kind="gemv")
    if swap and m <= 16:
        # 4 and 16 rows, H200 (2026-12-03): qkv 17.1 / 18.9 us, o 13.8 / 15.2, gate_up 51.1 / 53.2,
        # down 28.5 / 30.8 (the dot kernel: 17.8 / 21.6, 13.2 / 15.8, 49.1 / 56.3, 31.1 / 37.9)
        if n >= 16384:
            return GPTQKernelConfig(16, 128, 128, num_warps=4, num_stages=4, kind="swap")
        return GPTQKernelConfig(16, 256, 128, num_warps=8, num_stages=3, kind="swap")
    if swap and m <= SWAP_MAX_ROWS:
        # 64 rows: qkv 33.1 us, o 26.5, gate_up 114.5, down 75.4 (dequantize + cuBLAS: 41.6,
        # 28.0, 151.6, 85.3); the long-K down projection best with one dot per bit field
        if k >= 8192:
            return GPTQKernelConfig(64, 256, 128, num_warps=8, num_stages=3, kind="swap")
        return GPTQKernelConfig(64, 128, 128, num_warps=4, num_stages=3, unpack="reshape", kind="swap")
    if swap:
        # dequantize, H200 (2026-12-04): a layer's four projections 134.6 us with 128 x 128 tiles
        # reading one scale row per tile (147.8 with 64 x 128; 191.1 with a scale row per weight row)
        return GPTQKernelConfig(0, 128, 128, kind="dequant")
    if m <= 16:
        return GPTQKernelConfig(16, 128, 256, num_warps=4, num_stages=3)
    if m < DEQUANT_MIN_ROWS:
        return GPTQKernelConfig(32, 128, 256, num_warps=4, num_stages=3)
    return GPTQKernelConfig(0, 128, 128, kind="dequant")


def _swap_applies(dtype: torch.dtype, bits: int, group_size: int, k: int, has_g_idx: bool) -> bool:
    """Whether the swap kernel takes a layer: 16-bit activations that its bit trick serves
    (_swap_magic), no per-row groups (act-order checkpoints run on it once gptq_prepare has sorted
    their rows), and K tiles of 16 packed rows inside one group."""
    if _swap_magic(dtype, bits) is None or has_g_idx:
        return False
    rows = 16 * (32 // bits)
    return group_size >= k or group_size % rows == 0


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100/H200; only shapes the split on machines without CUDA (the interpreter)


_locks: dict[torch.device, torch.Tensor] = {}
_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
MAX_SPLIT_TILES = 1 << 16


def _lock_buffer(device: torch.device) -> torch.Tensor:
    """Per-tile counters of the split-K reduction: zero between calls (the last slice of a tile
    resets its counter), allocated once per device."""
    if device not in _locks:
        _locks[device] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return _locks[device]


def _dequant_scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """One buffer per device and dtype for the dequantized weight of the largest layer seen
    (layers run one after another on one stream, so they share it)."""
    key = (device, dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        buf = _scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _swap_magic(dtype: torch.dtype, bits: int) -> tuple[int, float] | None:
    """(bits, value) of the 16-bit float whose low mantissa bits a bit field is OR-ed into by the
    swap kernel: 1024 in fp16 (integers exact up to 2048: any field), 128 in bf16 (exact up to 256:
    fields of up to 7 bits). None where the kernel cannot take the activations."""
    if dtype == torch.float16:
        return 0x6400, 1024.0
    if dtype == torch.bfloat16 and bits <= 7:
        return 0x4300, 128.0
    return None


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _effective_group_size(group_size: int | None, k: int) -> int:
    if group_size is None or group_size == -1 or group_size >= k:
        return k
    assert group_size > 0, f"group_size must be positive or -1, got {group_size}"
    return group_size


def _choose_block_k(block_k: int, k: int, pack: int, group_size: int, has_g_idx: bool,
                    min_rows: int = 16) -> tuple[int, int]:
    """(BLOCK_K, GROUP_MODE). BLOCK_K is a power of two of at least min_rows rows and one packed
    row, no wider than K needs; halved until it divides the group size when that gives the
    per-tile-constant group path."""
    floor = max(min_rows, pack)
    bk = max(floor, min(block_k, _next_pow2(k)))
    if has_g_idx:
        return bk, 2
    if group_size >= k:
        return bk, 0
    b = bk
    while b >= floor:
        if group_size % b == 0:
            return b, 0
        b //= 2
    return bk, 1


def _choose_split_k(split_k: int | None, m: int, tiles: int, k_tiles: int, device: torch.device,
                    programs_per_sm: int = 2, max_split: int = MAX_SPLIT_K) -> int:
    if split_k is None:
        target = programs_per_sm * _num_sms(device)
        split = 1
        if m <= SPLIT_K_MAX_ROWS and tiles < target:
            split = min(max_split, triton.cdiv(target, tiles))
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
    perm[k]. config overrides the kernel choice and tile sizes (tuning)."""
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

    cfg = config or default_config(m, n, k, _swap_applies(x.dtype, bits, gs, k, g_idx is not None))
    assert cfg.kind in ("dot", "gemv", "swap", "dequant"), f"unknown kernel kind {cfg.kind!r}"
    assert cfg.unpack in UNPACKINGS, f"unpack must be one of {UNPACKINGS}, got {cfg.unpack!r}"
    if cfg.kind == "dequant":
        w = _dequant_scratch(x.device, x.dtype, k * n)[:k * n].view(k, n)
        _dequantize_into(w, qweight, qzeros, scales, g_idx, bits, gs, cfg)
        xs = x2 if perm is None else x2[:, perm.long()]
        torch.matmul(xs, w, out=out)
        return out.view(*shape[:-1], n)

    gemv = cfg.kind == "gemv" and m <= cfg.block_m and g_idx is None
    if gemv:
        block_k, group_mode = _choose_block_k(cfg.block_k, k, pack, gs, False, min_rows=pack)
        gemv = group_mode == 0  # every K tile inside one group
    magic = _swap_magic(x.dtype, bits)
    swap = cfg.kind == "swap" and g_idx is None and magic is not None
    if swap:
        block_m = max(16, cfg.block_m)
        block_k, group_mode = _choose_block_k(cfg.block_k, k, pack, gs, False, min_rows=16 * pack)
        swap = group_mode == 0  # every K tile inside one group
    if not gemv and not swap:  # the general tensor-core kernel (also where swap cannot take the layer)
        unpack = UNPACKINGS.index(cfg.unpack if cfg.kind == "dot" else "nibble")
        block_m = max(16, cfg.block_m)
        # nibble unpacking dots BLOCK_K // pack rows at a time: at least 16 (tl.dot's minimum)
        block_k, group_mode = _choose_block_k(cfg.block_k, k, pack, gs, g_idx is not None,
                                              min_rows=16 * pack if unpack == 2 else 16)
        if config is None and group_mode != 0:
            # a group per row (groups narrower than the nibble tiles' 16 packed rows, as g32 at 4
            # bits, or an act-order g_idx that no sort makes consecutive): the nibble tiles load a
            # [rows, BLOCK_N] scale and zero per bit field, which at the default tiles asked for
            # 244-435 KB of shared memory on an H200 (228 KB there); the reshape unpacking loads
            # them once per shallower tile, whole groups per tile where the group size allows
            block_k, group_mode = _choose_block_k(64, k, pack, gs, g_idx is not None, min_rows=16)
            unpack = UNPACKINGS.index("reshape")
    tiles_n, tiles_m = triton.cdiv(n, cfg.block_n), (m if gemv else triton.cdiv(m, block_m))
    k_tiles = triton.cdiv(k, block_k)
    if gemv:  # short programs: more of them in flight per SM hide the loads' latency
        split = _choose_split_k(split_k, m, tiles_n * tiles_m, k_tiles, x.device,
                                GEMV_PROGRAMS_PER_SM, GEMV_MAX_SPLIT_K)
    else:
        split = _choose_split_k(split_k, m, tiles_n * tiles_m, k_tiles, x.device)
    if tiles_n * tiles_m > MAX_SPLIT_TILES:
        split = 1
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty slices
    part = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    locks = out if split == 1 else _lock_buffer(x.device)
    common = dict(BITS=bits, HAS_PERM=perm is not None, SPLIT_K=split > 1, BLOCK_N=cfg.block_n,
                  BLOCK_K=block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    perm_arg = qweight if perm is None else perm
    if gemv:
        _gptq_gemv_kernel[(tiles_n, m, split)](
            x2, qweight, qzeros, scales, perm_arg, out, part, locks,
            m, n, k, gs, tiles_per_split * block_k, ((1 << bits) - 1) << (23 - bits),
            ((1 << bits) - 1) << (23 - 2 * bits),
            x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0), **common)
    elif swap:
        _gptq_swap_kernel[(tiles_n, tiles_m, split)](
            x2, qweight, qzeros, scales, perm_arg, out, part, locks,
            m, n, k, gs, tiles_per_split * block_k,
            x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
            MAGIC_HALF=magic[0], MAGIC_VALUE=magic[1], UNPACK=int(cfg.unpack == "reshape"), BLOCK_M=block_m,
            **common)
    else:
        _gptq_matmul_kernel[(tiles_n, tiles_m, split)](
            x2, qweight, qzeros, scales, qweight if g_idx is None else g_idx, perm_arg, out, part, locks,
            m, n, k, gs, tiles_per_split * block_k,
            x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
            GROUP_MODE=group_mode, UNPACK=unpack, BLOCK_M=block_m,
            DOT_PREC="ieee" if x.dtype == torch.float32 else None, **common)
    return out.view(*shape[:-1], n)


def _dequantize_into(w: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     g_idx: torch.Tensor | None, bits: int, group_size: int, cfg: GPTQKernelConfig) -> None:
    k, n = w.shape
    block_kp = max(1, cfg.block_k // (32 // bits))
    grid = (triton.cdiv(k // (32 // bits), block_kp), triton.cdiv(n, cfg.block_n))
    _gptq_dequant_kernel[grid](qweight, qzeros, scales, qweight if g_idx is None else g_idx, w, n, k, group_size,
                               qweight.stride(0), qzeros.stride(0), scales.stride(0), w.stride(0),
                               BITS=bits, HAS_G_IDX=g_idx is not None, BLOCK_N=cfg.block_n,
                               BLOCK_KP=block_kp,
                               ONE_GROUP=g_idx is None and group_size % (block_kp * (32 // bits)) == 0,
                               num_warps=cfg.num_warps)


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
