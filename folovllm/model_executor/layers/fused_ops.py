"""Fused Triton kernels for the elementwise work around the matmuls of a decoder layer.

In PyTorch each of these is a chain of small kernels (RMSNorm in float32 alone is a cast, pow,
mean, add, rsqrt, two muls and a cast); at batch size 1 a decode step is dominated by their
launches. Here each is one launch. Every kernel reproduces the PyTorch path of its layer, including
where that path rounds to the input dtype, so the two agree to float32 rounding:

  rms_norm / fused_add_rms_norm   layernorm.RMSNorm (x + residual in the input dtype, normalised in
                                  float32, cast back, then times the weight)
  silu_and_mul                    activation.SiluAndMul (silu rounded to the input dtype, then times
                                  the up half)
  qk_norm_rope                    LlamaAttention's optional per-head q/k RMSNorm (Qwen3) followed by
                                  rotary_embedding.RotaryEmbedding (neox halves, float32 table)

The layers import this module only for CUDA tensors, so `import folovllm` needs no triton. Grids
depend only on tensor shapes: every launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _num_warps(block: int) -> int:
    # About 256 elements per warp (8 per thread) keeps a row's registers small at any width.
    return max(1, min(16, block // 256))


# ---------------------------------------------------------------------------------------------
# RMSNorm, optionally after adding the residual
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                     stride_x, stride_res, stride_out, stride_res_out, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row. The whole row is loaded before anything is stored, so out/res_out may
    alias x/residual (the in-place variant)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        # Rounded to the input dtype, as `x + residual` is: that sum is both the new residual
        # and what gets normalised.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    # Cast back to the input dtype before the weight, as Hugging Face does.
    h = (h * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> a 2D view [rows, N] with unit column stride (a copy only if none exists)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(1) == 1 else t.contiguous()


def _launch_rms_norm(x, residual, weight, out, res_out, eps):
    n = x.shape[1]
    block = triton.next_power_of_2(n)
    assert block <= 65536, "rows wider than 65536 would need a looped kernel"
    if x.shape[0] == 0:
        return
    res = residual if residual is not None else x
    res_out = res_out if res_out is not None else x
    _rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, res_out, x.stride(0), res.stride(0), out.stride(0), res_out.stride(0),
        n, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., N] into a new tensor (x is left alone: callers keep
    it as the residual)."""
    shape = x.shape
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch_rms_norm(x2, None, weight, out, None, eps)
    return out.view(shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) in one kernel, written in place: x receives the
    output and residual the new residual (when their layouts allow; use the returned tensors)."""
    assert x.shape == residual.shape and x.dtype == residual.dtype
    shape = x.shape
    x2, r2 = _rows(x), _rows(residual)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    # In place needs the output in x's dtype; a float32 weight on bf16 input yields float32.
    out = x2 if out_dtype == x.dtype else torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    _launch_rms_norm(x2, r2, weight, out, r2, eps)
    return out.view(shape), r2.view(shape)


# ---------------------------------------------------------------------------------------------
# SiLU(gate) * up
# ---------------------------------------------------------------------------------------------

@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr):
    """Grid (rows, column blocks): out[:, j] = silu(x[:, j]) * x[:, n_cols + j]."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    # F.silu rounds to the input dtype before the product does.
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (gate, up) -> silu(gate) * up [..., I]."""
    shape = x.shape
    x2 = _rows(x)
    n = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if out.numel() == 0:
        return out.view(*shape[:-1], n)
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
        x2, out, x2.stride(0), out.stride(0), n, BLOCK=block, num_warps=_num_warps(block))
    return out.view(*shape[:-1], n)


# ---------------------------------------------------------------------------------------------
# Per-head q/k RMSNorm (optional) + neox rotary
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rope_heads(src_ptr, dst_ptr, stride_h, num_heads, w_ptr, cos, sin, eps,
                HAS_NORM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_HALF: tl.constexpr):
    """The heads of one token, [num_heads, 2 * HALF] at stride_h: optional per-head RMSNorm, then
    neox rotary (each head as its two halves x1, x2, the pairs rotary mixes). Everything is loaded
    before the stores, so dst may alias src. Returns the rotated halves (in the output dtype)."""
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (offs_h < num_heads) & (offs < HALF)
    src = src_ptr + offs_h * stride_h + offs
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        # RMSNorm of each whole head, rounded to the input dtype before and after the weight
        # (the PyTorch path hands rotary a tensor in the input dtype).
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + offs, mask=offs < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)
        dt = src_ptr.dtype.element_ty
        x1 = (w1 * (x1 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    o1 = (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty)
    o2 = (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty)
    dst = dst_ptr + offs_h * stride_h + offs
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)
    return o1, o2


@triton.jit(do_not_specialize=["num_slots"])   # the step's token count: no recompiles per size
def _qk_norm_rope_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_out_ptr, pos_ptr, cache_ptr, qw_ptr, kw_ptr,
                         k_cache_ptr, v_cache_ptr, slot_ptr,
                         stride_q, stride_k, stride_v, stride_q_out, stride_k_out, stride_cache,
                         stride_cs, stride_ch, num_slots, num_q_heads, num_kv_heads, eps,
                         HAS_NORM: tl.constexpr, WRITE_CACHE: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    """Grid (tokens, 2): program (t, 0) does all q heads of token t, program (t, 1) all its k heads,
    each as one [heads, half] tile (a few wide loads rather than one small program per head). With
    WRITE_CACHE the k program also stores the rotated k and the untouched v at the token's cache
    slot (the attention backend's cache write, folded in); slot -1, or a row past num_slots, is not
    written."""
    tok = tl.program_id(0).to(tl.int64)
    cs = cache_ptr + tl.load(pos_ptr + tok).to(tl.int64) * stride_cache
    offs = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cs + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    if tl.program_id(1) == 0:
        _rope_heads(q_ptr + tok * stride_q, q_out_ptr + tok * stride_q_out, 2 * HALF, num_q_heads, qw_ptr,
                    cos, sin, eps, HAS_NORM, HALF, BLOCK_HQ, BLOCK_HALF)
        return
    k1, k2 = _rope_heads(k_ptr + tok * stride_k, k_out_ptr + tok * stride_k_out, 2 * HALF, num_kv_heads,
                         kw_ptr, cos, sin, eps, HAS_NORM, HALF, BLOCK_HK, BLOCK_HALF)
    if WRITE_CACHE:
        slot = tl.load(slot_ptr + tok, mask=tok < num_slots, other=-1).to(tl.int64)
        if slot >= 0:
            offs_h = tl.arange(0, BLOCK_HK)[:, None]
            mask = (offs_h < num_kv_heads) & (offs < HALF)
            # int64 slot: num_blocks * block_size * KVH * D can pass 2^31 on a large cache.
            dst = slot * stride_cs + offs_h * stride_ch + offs
            tl.store(k_cache_ptr + dst, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_cache_ptr + dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            src = v_ptr + tok * stride_v + offs_h * (2 * HALF) + offs
            tl.store(v_cache_ptr + dst, tl.load(src, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + dst + HALF, tl.load(src + HALF, mask=mask).to(v_cache_ptr.dtype.element_ty),
                     mask=mask)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-6, inplace: bool = True, v: torch.Tensor | None = None,
                 kv_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H*D], k [T, KVH*D] (rows may be strided, e.g. column slices of the fused qkv
    output), positions [T], cos_sin_cache [max_pos, D] = cat(cos, sin) -> (q, k) after the
    optional per-head RMSNorm (both weights or neither, each [D]) and neox rotary, in one launch.
    In place by default (the returned tensors are q and k); inplace=False leaves them alone and
    returns new contiguous tensors.

    With v [T, KVH*D], kv_cache [2, num_blocks, block_size, KVH, D] and slot_mapping [<= T] int64,
    the same launch also writes each row's rotated k and its v to kv_cache at slot_mapping[row]
    (what the attention backend's cache write does): slot -1, and rows past len(slot_mapping), are
    skipped, so CUDA-graph padding writes nothing."""
    head_dim = cos_sin_cache.shape[1]
    assert head_dim % 2 == 0 and q.shape[1] % head_dim == 0 and k.shape[1] % head_dim == 0
    assert q.dtype == k.dtype and q.stride(1) == 1 and k.stride(1) == 1 and cos_sin_cache.stride(1) == 1
    assert q.shape[0] == k.shape[0] == positions.shape[0]
    has_norm = q_norm_weight is not None
    assert has_norm == (k_norm_weight is not None)
    if has_norm:
        # The kernel rounds the normed head to q's dtype, which is the PyTorch result only when
        # the weight has q's dtype (the model builds them so).
        assert q_norm_weight.dtype == k_norm_weight.dtype == q.dtype
    write_cache = kv_cache is not None
    assert write_cache == (v is not None) == (slot_mapping is not None)
    q_out, k_out = (q, k) if inplace else (torch.empty_like(q, memory_format=torch.contiguous_format),
                                           torch.empty_like(k, memory_format=torch.contiguous_format))
    num_q_heads, num_kv_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
    if q.shape[0] == 0:
        return q_out, k_out
    if write_cache:
        assert v.shape == k.shape and v.stride(1) == 1
        assert kv_cache.shape[3:] == (num_kv_heads, head_dim) and kv_cache.stride(4) == 1
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        # A slot indexes the flattened (block, offset) pair: it needs those two dims to be dense.
        assert k_cache.stride(1) * k_cache.shape[1] == k_cache.stride(0)
        cache_args = (k_cache, v_cache, slot_mapping, v.stride(0))
        cache_strides = (k_cache.stride(1), k_cache.stride(2), slot_mapping.shape[0])
    else:
        cache_args = (q, q, positions, 0)   # placeholders: never touched without WRITE_CACHE
        cache_strides = (0, 0, 0)
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    w_q = q_norm_weight if has_norm else q  # placeholders: never read without HAS_NORM
    w_k = k_norm_weight if has_norm else k
    block_hq = triton.next_power_of_2(num_q_heads)
    _qk_norm_rope_kernel[(q.shape[0], 2)](
        q, k, v if write_cache else k, q_out, k_out, positions, cos_sin_cache, w_q, w_k, *cache_args[:3],
        q.stride(0), k.stride(0), cache_args[3], q_out.stride(0), k_out.stride(0), cos_sin_cache.stride(0),
        *cache_strides, num_q_heads, num_kv_heads, eps,
        HAS_NORM=has_norm, WRITE_CACHE=write_cache, HALF=half, BLOCK_HALF=block_half,
        BLOCK_HQ=block_hq, BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        num_warps=max(1, min(4, block_hq * block_half // 256)))
    return q_out, k_out
