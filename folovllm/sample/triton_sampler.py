"""Fused sampling for the common case: temperature (or greedy) and nothing else, in one read.

The PyTorch path of `Sampler` makes a chain of full-size float32 passes over the logits (cast,
divide by temperature, softmax, exponential noise, clamp, divide, argmax). For 256 rows of a
151,936-token vocabulary that is about 2 GB of memory traffic per step. Here the bf16 logits are
read once, and each row's token comes out of the Gumbel-max trick:

    token = argmax_v  logits[v] / T + g_v,      g_v = -log(E_v),  E_v ~ Exp(1)

which picks v with probability softmax(logits / T)[v]. It is the same distribution as the
PyTorch path's exponential race (argmax p_v / E_v = argmax logits[v]/T - log E_v, since
p_v = exp(logits[v]/T) / Z). Rows with temperature < _GREEDY_EPS take the plain argmax, with
ties going to the lowest index as in torch.argmax.

Noise. E_v = -log(1 - w_v) with w_v uniform, from Philox4x32-10 keyed by the row's 64-bit seed
(triton.language.randint4x). One Philox call gives four 32-bit words: id v takes word
(v % _TILE) // (_TILE / 4) of counter (_TILE / 4) * (v // _TILE) + v % (_TILE / 4). The noise
of a row therefore depends only on its seed and the vocabulary id, never on the batch, the
row's position in it or the work split below; _TILE is fixed for that reason. Written as
-log(1 - w), the small exponentials (the ones that win) come from small w, where a float keeps
full relative precision, and a series replaces log(1 - w) there so that no E rounds to 0. w is
(r + 1/2) / 2^32 for a 32-bit word r, never 0; it may round to 1 (E = inf), which only makes
that token lose. A -inf logit scores -inf and a NaN score counts as -inf: neither can be sampled.

Work split. A [row blocks, vocabulary chunks] grid: each program scans `chunk` columns of its
rows (one row, unless the vocabulary is small) and writes each row's best (score, index) to a
small [n, chunks] float32/int32 workspace; a second one-program-per-row kernel reduces it. Two
launches, no host sync, and grids and chunk sizes depend only on the tensor shapes, so a call can
be captured in a CUDA graph. Splitting the vocabulary lets a batch of one still spread over the
GPU.

`folovllm.sample.sampler` imports this module only when the fused path is taken, so
`import folovllm` needs no triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns per inner step. It also fixes which Philox word each vocabulary id draws, so changing it
# changes every seeded request's tokens: keep it constant, independent of shapes.
_TILE = 1024
# Chunk sizes the launcher picks from (multiples of _TILE), largest first.
_CHUNKS = (8192, 4096, 2048, 1024)
# Enough programs to fill a large GPU several times over (an H100 has 132 SMs).
_TARGET_PROGRAMS = 1024
# In the kernels, index 2147483647 (int32 max) means "no column seen yet".


@triton.jit
def _exponential(r):
    """32-bit random words -> Exp(1) variates, -log(1 - w) with w = (r + 1/2) / 2^32 in (0, 1].
    For w < 1/32 the series w + w^2/2 + ... + w^5/5 (relative error < 1e-8) replaces the log,
    which would lose the small values to rounding in 1 - w (and give exactly 0 below 2^-25)."""
    w = r.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    series = w * (1.0 + w * (0.5 + w * (0.3333333333 + w * (0.25 + w * 0.2))))
    return tl.where(w < 0.03125, series, -tl.log(1.0 - w))


@triton.jit
def _take(score, cols, valid, best, best_idx):
    """Fold one block of candidates into the running best of each (row, lane). A lane sees its
    columns in increasing order, so a strict `>` keeps the lowest index among equal scores; the
    first valid column always replaces the "nothing yet" entry, so an all -inf row still yields a
    real index."""
    take = valid & ((score > best) | (best_idx == 2147483647))
    return tl.where(take, score, best), tl.where(take, cols, best_idx)


@triton.jit
def _score(row_ptrs, cols, vocab, row_mask, r, temp, greedy, ALL_GREEDY: tl.constexpr):
    """Scores of one [rows, TILE/4] block: the logit for greedy rows, logit / T + Gumbel noise
    for the others. Returns (score, valid)."""
    valid = row_mask & (cols < vocab)
    x = tl.load(row_ptrs + cols, mask=valid, other=float("-inf")).to(tl.float32)
    # Greedy: NaN ranks with +inf (torch.argmax returns a NaN's index; here the first NaN or +inf).
    plain = tl.where(x == x, x, float("inf"))
    if ALL_GREEDY:
        score = plain
    else:
        noisy = x / temp - tl.log(_exponential(r))
        # A NaN logit (or inf - inf) must never be sampled.
        noisy = tl.where(noisy == noisy, noisy, float("-inf"))
        score = tl.where(greedy, plain, noisy)
    return score, valid


# num_rows changes from step to step: not specialising on it (Triton would compile separate
# variants for 1, multiples of 16 and the rest) keeps compilation out of the serving loop.
@triton.jit(do_not_specialize=["num_rows"])
def _sample_chunks_kernel(logits_ptr, temp_ptr, seed_ptr, best_val_ptr, best_idx_ptr,
                          num_rows, stride_row, vocab, num_chunks, greedy_eps,
                          ALL_GREEDY: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr,
                          BLOCK_ROWS: tl.constexpr):
    """Program (row block, chunk): the best (score, index) of each of BLOCK_ROWS rows over
    columns [chunk * CHUNK, + CHUNK).

    Each tile of TILE columns is four sub-tiles of TILE/4: Philox counter base/4 + lane gives the
    four words for columns base + m * TILE/4 + lane (m = 0..3), keyed by the row's seed. The
    (seed, id) -> word map depends on TILE alone, not on CHUNK or BLOCK_ROWS."""
    Q: tl.constexpr = TILE // 4
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    chunk = tl.program_id(1)
    row_mask = (rows < num_rows)[:, None]
    lane = tl.arange(0, Q)[None, :]
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
    start = chunk * CHUNK
    best = tl.full([BLOCK_ROWS, Q], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK_ROWS, Q], 2147483647, tl.int32)
    if ALL_GREEDY:
        for t in range(0, CHUNK, TILE):
            for m in tl.static_range(4):
                cols = start + t + m * Q + lane
                score, valid = _score(row_ptrs, cols, vocab, row_mask, 0, 1.0, True, True)
                best, best_idx = _take(score, cols, valid, best, best_idx)
    else:
        temp = tl.load(temp_ptr + rows, mask=rows < num_rows, other=1.0)[:, None]
        greedy = temp < greedy_eps
        temp = tl.where(greedy, 1.0, temp)          # keeps the unused noisy score finite
        seed = tl.load(seed_ptr + rows, mask=rows < num_rows, other=0)[:, None]
        for t in range(0, CHUNK, TILE):
            base = start + t
            r0, r1, r2, r3 = tl.randint4x(seed, base // 4 + lane)
            score, valid = _score(row_ptrs, base + lane, vocab, row_mask, r0, temp, greedy, False)
            best, best_idx = _take(score, base + lane, valid, best, best_idx)
            score, valid = _score(row_ptrs, base + Q + lane, vocab, row_mask, r1, temp, greedy, False)
            best, best_idx = _take(score, base + Q + lane, valid, best, best_idx)
            score, valid = _score(row_ptrs, base + 2 * Q + lane, vocab, row_mask, r2, temp, greedy, False)
            best, best_idx = _take(score, base + 2 * Q + lane, valid, best, best_idx)
            score, valid = _score(row_ptrs, base + 3 * Q + lane, vocab, row_mask, r3, temp, greedy, False)
            best, best_idx = _take(score, base + 3 * Q + lane, valid, best, best_idx)
    top = tl.max(best, axis=1)
    idx = tl.min(tl.where(best == top[:, None], best_idx, 2147483647), axis=1)
    out = rows.to(tl.int64) * num_chunks + chunk
    tl.store(best_val_ptr + out, top, mask=rows < num_rows)
    tl.store(best_idx_ptr + out, idx, mask=rows < num_rows)


@triton.jit
def _reduce_chunks_kernel(best_val_ptr, best_idx_ptr, out_ptr, num_chunks, BLOCK: tl.constexpr):
    """One program per row: the best chunk, the lowest index among equal scores (chunks hold
    increasing column ranges, so this keeps torch.argmax's tie rule)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < num_chunks
    base = row.to(tl.int64) * num_chunks
    val = tl.load(best_val_ptr + base + offs, mask=mask, other=float("-inf"))
    idx = tl.load(best_idx_ptr + base + offs, mask=mask, other=2147483647)
    top = tl.max(val, axis=0)
    tok = tl.min(tl.where(mask & (val == top), idx, 2147483647), axis=0)
    tl.store(out_ptr + row, tok.to(tl.int64))


def choose_chunk(num_rows: int, vocab: int) -> int:
    """Columns per program: the largest chunk that still gives about _TARGET_PROGRAMS programs
    (batch 256 -> 8192, i.e. 19 chunks of a 151,936 vocabulary; batch 1 -> 1024, i.e. 149), and
    no wider than the vocabulary needs."""
    needed = triton.cdiv(vocab, _TILE) * _TILE
    for chunk in _CHUNKS:
        if num_rows * triton.cdiv(vocab, chunk) >= _TARGET_PROGRAMS:
            return min(chunk, needed)
    return _CHUNKS[-1]


def choose_rows_per_program(num_rows: int, vocab: int) -> int:
    """One row per program for real vocabularies; small ones (test models) share a program
    between several rows instead of leaving most of a tile masked."""
    if vocab >= _TILE:
        return 1
    return min(triton.next_power_of_2(num_rows), 8)


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor | None, seeds: torch.Tensor | None,
                  greedy_eps: float = 1e-5, chunk: int | None = None,
                  rows_per_program: int | None = None) -> torch.Tensor:
    """Sample one token per row of `logits` [n, V] (bf16, fp16 or fp32, unit column stride).

    temperature: [n] float32 on the logits' device; rows below `greedy_eps` take the argmax.
        None means every row is greedy (then `seeds` is not read).
    seeds: [n] int64, the Philox key of each row.
    chunk: columns per program (a multiple of _TILE); rows_per_program: a power of two. Both are
        chosen from the shapes by default, and neither changes the result.
    Returns [n] int64 token ids. Two kernel launches, no host sync."""
    assert logits.dim() == 2, logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n, vocab = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    all_greedy = temperature is None
    if not all_greedy:
        assert temperature.dtype == torch.float32 and temperature.shape == (n,), temperature.shape
        assert seeds is not None and seeds.dtype == torch.int64 and seeds.shape == (n,), seeds
    chunk = chunk or choose_chunk(n, vocab)
    assert chunk % _TILE == 0, chunk
    block_rows = rows_per_program or choose_rows_per_program(n, vocab)
    num_chunks = triton.cdiv(vocab, chunk)
    best_val = torch.empty(n, num_chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(n, num_chunks, dtype=torch.int32, device=logits.device)
    _sample_chunks_kernel[(triton.cdiv(n, block_rows), num_chunks)](
        logits, logits if all_greedy else temperature, logits if all_greedy else seeds,
        best_val, best_idx, n, logits.stride(0), vocab, num_chunks, greedy_eps,
        ALL_GREEDY=all_greedy, CHUNK=chunk, TILE=_TILE, BLOCK_ROWS=block_rows,
        num_warps=4 if block_rows == 1 else 8)
    _reduce_chunks_kernel[(n,)](best_val, best_idx, out, num_chunks,
                                BLOCK=max(16, triton.next_power_of_2(num_chunks)), num_warps=1)
    return out


def warm_up(vocab: int, max_rows: int, device: torch.device, dtype: torch.dtype) -> None:
    """Compile every kernel variant gumbel_sample can pick for up to max_rows rows of this
    vocabulary (one per chunk size, greedy and random), so that no step of a running engine waits
    for the compiler."""
    seen = set()
    for n in range(1, max_rows + 1):
        config = (choose_chunk(n, vocab), choose_rows_per_program(n, vocab))
        if config in seen:
            continue
        seen.add(config)
        logits = torch.zeros(n, vocab, dtype=dtype, device=device)
        gumbel_sample(logits, None, None)
        gumbel_sample(logits, torch.ones(n, device=device), torch.zeros(n, dtype=torch.int64, device=device))
