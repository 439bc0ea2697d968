"""Paged attention for any mix of prefill, chunked-prefill and decode rows (FlashAttention-2 style).

Layout: query [T, H, D]; the paged cache is kv_cache[0] (K) and kv_cache[1] (V), each
[num_blocks, block_size, KVH, D]; request i owns query rows query_start_loc[i]:query_start_loc[i+1],
which are the last q_len positions of its seq_lens[i]-token context.

One program owns a tile of BLOCK_M query rows that all share one KV head: BLOCK_Q consecutive
query positions x the G = H // KVH query heads of that KV head (row r = position r // G, head
r % G). Each K/V tile is then loaded once for all G heads and fed to tl.dot as a [BLOCK_M, D] x
[D, BLOCK_N] product. The program walks the request's KV positions in tiles of BLOCK_N, looking up
the physical block of every position in the block table, and keeps an online softmax (running max
m, running sum l, unnormalised accumulator) in fp32. Tiles that every row may fully see run without
masks; only the tiles crossing the causal diagonal (or the end of the context) are masked.

Three launch shapes, all with grids fixed by tensor shapes (CUDA-graph safe; loop bounds come from
seq_lens read in the kernel):
  * general  (max_query_len > 1): grid (T // BLOCK_Q + num_reqs, KVH). Request i's q-tiles start at
    program query_start_loc[i] // BLOCK_Q + i, an upper bound that never lets two requests share a
    tile; each program finds its request by binary search and exits if it has no rows.
  * mixed    (max_query_len > 1, several requests): the decode launch for the one-row requests,
    then the general launch for the others, each kernel skipping the other's requests (ROWS).
  * decode   (max_query_len == 1): grid (num_reqs, KVH), one program per request and KV head.
  * split    (decode with fewer than 2 (request, KV head) programs per SM): grid (num_reqs, KVH,
    NUM_SEGMENTS); each program covers 1/NUM_SEGMENTS of the context and writes its (m, l, acc)
    to preallocated scratch, and _reduce_segments_kernel merges them (flash-decoding).
The choice between them reads only max_query_len and the shapes, so it is fixed for a pure-decode
batch of a given size (what a CUDA graph captures).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Finite "minus infinity" for the running max: exp2(NEG_BIG - NEG_BIG) is 1, not NaN, so a row
# that has seen no key yet (an empty split segment, a padding request) stays NaN-free.
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, bt_row, start, end, seq_len, q_pos,
                  offs_n, offs_d, qk_scale, stride_kb, stride_ks, stride_vb, stride_vs,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update over KV positions [start, end) in tiles of BLOCK_N (start is a
    multiple of BLOCK_N). MASKED=False promises every position is < seq_len and visible to every
    row, so the loop carries no masks."""
    d_ok = offs_d < HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        if MASKED:
            kv_ok = pos < seq_len
            blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=kv_ok, other=0)
        else:
            blk = tl.load(bt_row + pos // BLOCK_SIZE)
        blk = blk.to(tl.int64)  # block * stride can pass 2^31 elements on a large cache
        k_off = blk * stride_kb + (pos % BLOCK_SIZE) * stride_ks
        v_off = blk * stride_vb + (pos % BLOCK_SIZE) * stride_vs
        if MASKED:
            k = tl.load(k_ptr + k_off[None, :] + offs_d[:, None],
                        mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptr + k_off[None, :] + offs_d[:, None])
        else:
            k = tl.load(k_ptr + k_off[None, :] + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            s = tl.where((pos[None, :] <= q_pos[:, None]) & kv_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :],
                        mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :])
        else:
            v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# num_reqs changes from step to step (eager prefill and mixed steps): no specialisation on it,
# so a new batch size never means a new compilation.
@triton.jit(do_not_specialize=["num_reqs"])
def _unified_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr, num_reqs, num_heads, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DECODE: tl.constexpr, NUM_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROWS: tl.constexpr = 0,  # 0: every request; 1: only one-row (decode) requests; 2: all others
):
    # Reversed so the last q-tiles of a prompt, which see the most keys, start first and the short
    # ones fill in behind them (fewer idle SMs at the tail of a causal prefill).
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    seg = tl.program_id(2)

    if DECODE:
        req = pid
        q_block = 0
    else:
        # Largest request whose first q-tile program (qsl[i] // BLOCK_Q + i) is <= pid.
        lo = pid * 0   # a tensor, not a Python int, so the loop-carried type is fixed
        hi = num_reqs - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
                lo = mid
            else:
                hi = mid - 1
        req = lo
        q_block = pid - (tl.load(qsl_ptr + req) // BLOCK_Q + req)

    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    if q_block * BLOCK_Q >= q_len:   # past this request's rows (or a zero-length padding request)
        return
    if ROWS == 1:
        if q_len != 1:
            return
    if ROWS == 2:
        if q_len == 1:
            return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_start = seq_len - q_len      # position of the request's first query row

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_idx = q_block * BLOCK_Q + offs_m // G          # query row within the request
    head = kv_head * G + offs_m % G
    row_ok = (offs_m < BLOCK_Q * G) & (q_idx < q_len)
    q_pos = ctx_start + q_idx
    d_ok = offs_d < HEAD_DIM

    q_rows = q_start + q_idx
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Causal KV range of this tile: keys [0, kv_end) are seen by its last row; keys [0, full_end)
    # are seen by its first row, hence by all rows, and need no mask.
    kv_end = ctx_start + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len)
    full_end = (ctx_start + q_block * BLOCK_Q + 1) // BLOCK_N * BLOCK_N
    lo_n = 0
    hi_n = kv_end
    if NUM_SEGMENTS > 1:
        tiles_per_seg = tl.cdiv(tl.cdiv(kv_end, BLOCK_N), NUM_SEGMENTS)
        lo_n = seg * tiles_per_seg * BLOCK_N
        hi_n = tl.minimum(lo_n + tiles_per_seg * BLOCK_N, kv_end)
    full_end = tl.maximum(tl.minimum(full_end, hi_n), lo_n)

    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, bt_row, lo_n, full_end, seq_len,
                                  q_pos, offs_n, offs_d, qk_scale, stride_kb, stride_ks, stride_vb,
                                  stride_vs, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_base, v_base, bt_row, full_end, hi_n, seq_len,
                                  q_pos, offs_n, offs_d, qk_scale, stride_kb, stride_ks, stride_vb,
                                  stride_vs, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION)

    if NUM_SEGMENTS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # Scratch [num_reqs, H, NUM_SEGMENTS, (BLOCK_D | 2)]; every segment writes, even an empty
        # one (m = NEG_BIG, l = 0), so the reduce never reads a stale value.
        part = (req * num_heads + head) * NUM_SEGMENTS + seg
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _reduce_segments_kernel(out_ptr, part_acc_ptr, part_ml_ptr, qsl_ptr, num_heads, stride_ot, stride_oh,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                            NUM_SEGMENTS: tl.constexpr):
    """Merge the split segments of one (request, head): rescale each segment's (l, acc) to the
    global max and normalise once."""
    req = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(qsl_ptr + req)
    if tl.load(qsl_ptr + req + 1) == row:   # zero-length padding request
        return
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, BLOCK_D)
    part = (req * num_heads + head) * NUM_SEGMENTS + offs_s
    m = tl.load(part_ml_ptr + part * 2)
    l = tl.load(part_ml_ptr + part * 2 + 1)
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :])
    w = tl.exp2(m - tl.max(m, 0))
    denom = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# ---- launch ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and launch parameters of one path. block_m rows = query positions x G heads."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    num_segments: int = 1


# Why these tiles (H200 measurements in docs/attention.md):
#  decode: one query position, so block_m is G rounded up to tl.dot's minimum of 16 rows; 64-key
#    tiles (4 blocks of 16) with 2 warps and a 3-deep cp.async pipeline: small programs, many per
#    SM, many loads in flight -- what streaming HBM needs (98% of copy bandwidth at 256 x 1024;
#    32- and 128-key tiles were 5-7% slower).
#  prefill: 64 rows x 64 keys, 4 warps (one warpgroup of wgmma), 2 stages: 6% faster than 3 stages
#    at 2k tokens and 10% at 8k; 128-row tiles were 12-20% slower (fewer programs, worse causal
#    tail) and waste more work on the decode rows of a mixed batch.
#  split: the decode tile; the segment count brings the program count up to ~4 per SM.
DECODE_CONFIG = AttentionConfig(block_m=16, block_n=64, num_warps=2, num_stages=3)
PREFILL_CONFIG = AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
MAX_SEGMENTS = 64
# Large decode batches: contexts longer than this are split (at most DECODE_MAX_SEGMENTS ways).
# At 2048, 64 decoders of 2.2k-token contexts (uniform: no straggler) took ~1 ms a step longer
# split 8 ways than plain (H200, docs/chunked_prefill.md), so contexts up to 4096 stay plain.
DECODE_SPLIT_MIN_LEN = 4096
DECODE_MAX_SEGMENTS = 8

_num_sms_cache: dict[int, int] = {}
_scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_outgrown: list[tuple[torch.Tensor, torch.Tensor]] = []


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: pretend an H100 so the path choice matches the GPU's
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _num_sms_cache:
        _num_sms_cache[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _num_sms_cache[idx]


def _split_scratch(num_reqs: int, num_heads: int, num_segments: int, block_d: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial (acc) and (m, l) buffers, views of one allocation per (heads, segments, head size)
    that grows to the largest batch seen, so a captured graph reuses them. Layers run one after
    another on one stream, so all layers share them. An outgrown buffer is kept, not freed: a
    graph captured earlier may still read it."""
    key = (device, num_heads, num_segments, block_d)
    bufs = _scratch.get(key)
    if bufs is None or bufs[0].shape[0] < num_reqs:
        if bufs is not None:
            _outgrown.append(bufs)
        bufs = _scratch[key] = (
            torch.empty(num_reqs, num_heads, num_segments, block_d, dtype=torch.float32, device=device),
            torch.empty(num_reqs, num_heads, num_segments, 2, dtype=torch.float32, device=device))
    return bufs[0][:num_reqs], bufs[1][:num_reqs]


def choose_config(num_reqs: int, num_kv_heads: int, max_query_len: int,
                  device: torch.device, max_seq_len: int | None = None) -> tuple[str, AttentionConfig]:
    """The launch path and tiles. Reads only max_query_len, the shapes and max_seq_len (the
    longest context the batch may hold: a captured graph passes max_model_len), so for a
    pure-decode batch of a given size the answer is always the same (a captured CUDA graph stays
    valid).

    A batch with a prompt row runs "mixed" (the decode tiles for its one-row requests, the
    prefill tiles for the rest) when it has several requests, "general" when it has one.

    A decode batch with at least two (request, KV head) programs per SM streams the cache well
    on its own, unless one context is much longer than the rest: one program per context would
    leave that one running long after the others (a straggler). So when max_seq_len exceeds
    DECODE_SPLIT_MIN_LEN, contexts are split into enough segments (up to DECODE_MAX_SEGMENTS) that
    none is longer than about DECODE_SPLIT_MIN_LEN. A smaller batch splits each context into the
    largest power of two of segments (2 to MAX_SEGMENTS) that keeps programs <= 4 per SM. On an
    H200 (KVH = 8, contexts 1k-8k) this picked the fastest of {plain, split S, split 2S} in every
    measured batch size but one (32 requests at 1k context: 4% slower than plain decode); see
    docs/attention.md."""
    if max_query_len > 1:
        return ("mixed" if num_reqs > 1 else "general"), PREFILL_CONFIG
    programs, sms = num_reqs * num_kv_heads, _num_sms(device)
    if programs >= 2 * sms:
        if max_seq_len is None or max_seq_len <= DECODE_SPLIT_MIN_LEN:
            return "decode", DECODE_CONFIG
        segments = min(DECODE_MAX_SEGMENTS, triton.next_power_of_2(triton.cdiv(max_seq_len, DECODE_SPLIT_MIN_LEN)))
        return "split", replace(DECODE_CONFIG, num_segments=segments)
    segments = 1 << (4 * sms // programs).bit_length() - 1      # largest power of two <= 4 sms / programs
    return "split", replace(DECODE_CONFIG, num_segments=min(MAX_SEGMENTS, max(segments, 2)))


def unified_attention(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_table: torch.Tensor, scale: float, max_query_len: int,
                      path: str | None = None, config: AttentionConfig | None = None,
                      max_seq_len: int | None = None, _rows: int = 0) -> torch.Tensor:
    """out[rows of request i] = causal softmax(q k^T * scale) v over request i's paged context.

    query/out [T, H, D]; kv_cache [2, num_blocks, block_size, KVH, D]; query_start_loc
    [num_reqs + 1] int32; seq_lens [num_reqs] int32; block_table [num_reqs, max_blocks] int32.
    Rows past query_start_loc[-1] are not written. path/config override choose_config (for
    benchmarks and tests); path 'decode'/'split' need every request to have one query row.
    max_seq_len: an upper bound on seq_lens (None: unknown), which lets a large decode batch
    split long contexts (choose_config).
    """
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_reqs = seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out
    assert num_heads % num_kv_heads == 0
    assert query.stride(2) == 1 and out.stride(2) == 1 and kv_cache.stride(4) == 1
    g = num_heads // num_kv_heads
    if path is None or config is None:
        chosen_path, chosen_config = choose_config(num_reqs, num_kv_heads, max_query_len, query.device,
                                                   max_seq_len)
        if path == "split" and chosen_path != "split":   # forced split of a large batch
            chosen_config = replace(DECODE_CONFIG, num_segments=16)
        path, config = path or chosen_path, config or chosen_config
    assert path != "split" or config.num_segments > 1
    if path == "mixed":
        # Two launches over the same batch, each skipping the other's requests (read on the
        # device, so a captured graph serves any mix): one-row requests on the decode tiles
        # (BLOCK_M 16), the rest on the prefill tiles. On the general path alone a decode row
        # takes a 64-row tile of which G rows are real; 64 decodes next to a prompt chunk cost
        # ~1 ms of a ~10 ms step that way (Qwen3-0.6B, H200).
        unified_attention(query, kv_cache, out, query_start_loc, seq_lens, block_table, scale, 1,
                          path="decode", config=DECODE_CONFIG, max_seq_len=max_seq_len, _rows=1)
        return unified_attention(query, kv_cache, out, query_start_loc, seq_lens, block_table, scale,
                                 max_query_len, path="general", config=config, max_seq_len=max_seq_len, _rows=2)
    decode = path in ("decode", "split")
    num_segments = config.num_segments if path == "split" else 1
    block_m = max(config.block_m, triton.next_power_of_2(g), 16)
    block_q = 1 if decode else block_m // g
    block_d = max(triton.next_power_of_2(head_dim), 16)

    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if num_segments > 1:
        part_acc, part_ml = _split_scratch(num_reqs, num_heads, num_segments, block_d, query.device)
        grid = (num_reqs, num_kv_heads, num_segments)
    else:
        part_acc = part_ml = out  # unused
        grid = (num_reqs if decode else num_tokens // block_q + num_reqs, num_kv_heads, 1)

    _unified_attention_kernel[grid](
        query, k_cache, v_cache, out, part_acc, part_ml,
        query_start_loc, seq_lens, block_table, num_reqs, num_heads, scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        G=g, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=config.block_n, DECODE=decode,
        NUM_SEGMENTS=num_segments, ROWS=_rows,
        # A float32 cache asks for float32 results: full-precision products, not TF32.
        DOT_PRECISION="ieee" if kv_cache.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if num_segments > 1:
        _reduce_segments_kernel[(num_reqs, num_heads)](
            out, part_acc, part_ml, query_start_loc, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SEGMENTS=num_segments,
            num_warps=4)
    return out
