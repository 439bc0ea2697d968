"""The fused Triton kernels (folovllm/model_executor/layers/fused_ops.py) against the PyTorch path
of their layers, which is the reference.

Every case draws fresh random inputs (its own seed). float32 must match the PyTorch path to
max|out - ref| / max|ref| < 1e-5; bf16 is compared with the PyTorch path run in float32 on the same
(upcast) inputs and must be within bf16 rounding, < 1e-2.

In this process the kernels run on the CPU under the Triton interpreter. Triton decides at import
whether its functions are compiled or interpreted, so TRITON_INTERPRET is set before anything
imports triton; if triton was already imported compiled (another test file got there first), the
in-process cases skip and test_rerun_in_fresh_process reruns this file in a fresh interpreter.
On a machine with CUDA, test_compiled_on_cuda reruns the file with the compiled kernels on the GPU
(FOLOVLLM_FUSED_OPS_CUDA=1), where the cases also check that the layers dispatch to the kernels.
"""

from __future__ import annotations

import os

import torch  # noqa: E402
from interpret_mode import enter_interpreter, rerun_pytest, in_process_marker, require  # noqa: E402

_ON_CUDA = os.environ.get("FOLOVLLM_FUSED_OPS_CUDA") == "1"
_TRITON_ALREADY_COMPILED = enter_interpreter(compiled=_ON_CUDA)

import itertools  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402

require("triton")  # a skip without triton; under CI, a failure

from folovllm.model_executor.layers.activation import SiluAndMul  # noqa: E402
from folovllm.model_executor.layers.layernorm import RMSNorm  # noqa: E402
from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding  # noqa: E402

in_process = in_process_marker(_TRITON_ALREADY_COMPILED)
if not _TRITON_ALREADY_COMPILED:
    from folovllm.model_executor.layers import fused_ops  # noqa: E402

DEVICE = "cuda" if _ON_CUDA else "cpu"


@pytest.fixture(scope="module", autouse=True)
def bf16_rounds_to_nearest():
    """The interpreter's float32 -> bf16 cast truncates, where GPUs (and PyTorch) round to nearest
    even; with truncation bf16 results sit up to two ulps low. Route that one conversion through
    PyTorch so the bf16 cases check what the GPU computes."""
    try:
        from triton.runtime import interpreter as interp
        original = interp._convert_float
    except (ImportError, AttributeError):   # another triton: its bf16 cases may then fail
        original = None
    if _ON_CUDA or original is None:
        yield
        return
    import numpy as np
    import triton.language as tl

    def convert(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return original(data, src, dst, rounding_mode)

    interp._convert_float = convert
    yield
    interp._convert_float = original

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
EPS = 1e-6
_seeds = itertools.count(1)


def randn(*shape, dtype, scale=1.0):
    """Fresh random values per call, made on the CPU (same numbers on any device)."""
    gen = torch.Generator().manual_seed(next(_seeds))
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def f32(t: torch.Tensor) -> torch.Tensor:
    """The reference's copy of an input: CPU float32 (exact for bf16 values)."""
    return t.detach().float().cpu()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float().cpu() - ref).abs().max() / ref.abs().max()).item()


def torch_rms_norm(x, weight, residual=None):
    """layernorm.RMSNorm's PyTorch path (CPU tensors)."""
    norm = RMSNorm(x.shape[-1], EPS, weight.dtype)
    norm.weight.data.copy_(weight)
    return norm(x) if residual is None else norm(x, residual)


@in_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 1024), (3, 200), (2, 4096)])
def test_rms_norm(dtype, tokens, hidden):
    x, w = randn(tokens, hidden, dtype=dtype, scale=3.0), randn(hidden, dtype=dtype)
    x_before = x.clone()
    out = fused_ops.rms_norm(x, w, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(x, x_before)            # x is the caller's residual: left alone
    assert rel_err(out, torch_rms_norm(f32(x), f32(w))) < TOL[dtype]


@in_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,strided", [(1, 64, False), (7, 1024, False), (4, 96, True)])
def test_fused_add_rms_norm(dtype, tokens, hidden, strided):
    if strided:  # rows of a wider buffer: the kernel takes row strides, no copy
        x = randn(tokens, 2 * hidden, dtype=dtype)[:, :hidden]
        res = randn(tokens, 3 * hidden, dtype=dtype)[:, hidden:2 * hidden]
    else:
        x, res = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype)
    w = randn(hidden, dtype=dtype)
    ref_out, ref_res = torch_rms_norm(f32(x), f32(w), f32(res))
    # The new residual is `x + residual` in the input dtype, rounded exactly as PyTorch rounds it.
    _, same_dtype_res = torch_rms_norm(x.cpu(), w.cpu(), res.cpu())
    x_ptr, res_ptr = x.data_ptr(), res.data_ptr()
    out, new_res = fused_ops.fused_add_rms_norm(x, res, w, EPS)
    assert out.data_ptr() == x_ptr and new_res.data_ptr() == res_ptr   # in place
    assert out.dtype == new_res.dtype == dtype
    assert torch.equal(new_res.cpu(), same_dtype_res)
    assert rel_err(new_res, ref_res) < TOL[dtype]
    assert rel_err(out, ref_out) < TOL[dtype]


@in_process
def test_rms_norm_float32_weight_on_bf16():
    """A float32 weight makes PyTorch's output float32: then the output cannot go in place."""
    x, res = randn(3, 64, dtype=torch.bfloat16), randn(3, 64, dtype=torch.bfloat16)
    w = randn(64, dtype=torch.float32)
    ref_out, ref_res = torch_rms_norm(x.cpu(), w.cpu(), res.cpu())
    out, new_res = fused_ops.fused_add_rms_norm(x, res, w, EPS)
    assert out.dtype == torch.float32 and new_res.dtype == torch.bfloat16
    assert torch.equal(new_res.cpu(), ref_res)
    assert rel_err(out, ref_out.float()) < 1e-5


@in_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 64), (6, 1500)])  # 1500: two column blocks, masked
def test_silu_and_mul(dtype, tokens, inter):
    x = randn(tokens, 2 * inter, dtype=dtype, scale=3.0)
    out = fused_ops.silu_and_mul(x)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    assert rel_err(out, SiluAndMul()(f32(x))) < TOL[dtype]


def make_rope(head_dim: int, max_pos: int = 4096) -> RotaryEmbedding:
    return RotaryEmbedding(types.SimpleNamespace(rope_theta=1e6), head_dim, max_pos, torch.float32)


def torch_qk_norm_rope(q, k, positions, rope, q_w, k_w):
    """LlamaAttention's PyTorch path (CPU tensors): per-head RMSNorm (if weights), then rotary."""
    d = rope.head_dim
    if q_w is not None:
        q = torch_rms_norm(q.reshape(-1, d), q_w).view(q.shape)
        k = torch_rms_norm(k.reshape(-1, d), k_w).view(k.shape)
    return rope(positions, q, k)


QK_CASES = [  # (tokens, head_dim, norm, q/k as column slices of one qkv buffer)
    (1, 128, True, True), (5, 128, True, True), (3, 64, True, True), (1, 64, False, True),
    (4, 128, False, True), (3, 64, True, False), (33, 128, True, True),
    (2, 80, True, True),   # 80: halves of 40, masked
]


@in_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,head_dim,norm,sliced", QK_CASES)
def test_qk_norm_rope(dtype, tokens, head_dim, norm, sliced):
    heads, kv_heads = 4, 2
    qs, ks = heads * head_dim, kv_heads * head_dim
    if sliced:
        qkv = randn(tokens, qs + 2 * ks, dtype=dtype, scale=2.0)
        q, k, v = qkv.split([qs, ks, ks], dim=-1)
        v_before = v.clone()
    else:
        q, k = randn(tokens, qs, dtype=dtype, scale=2.0), randn(tokens, ks, dtype=dtype, scale=2.0)
    gen = torch.Generator().manual_seed(next(_seeds))
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(DEVICE)
    q_w = randn(head_dim, dtype=dtype) if norm else None
    k_w = randn(head_dim, dtype=dtype) if norm else None
    rope = make_rope(head_dim)
    ref_q, ref_k = torch_qk_norm_rope(f32(q), f32(k), positions.cpu(), rope,
                                      f32(q_w) if norm else None, f32(k_w) if norm else None)
    q_ptr = q.data_ptr()
    out_q, out_k = fused_ops.qk_norm_rope(q, k, positions, rope.cos_sin_cache.to(DEVICE), q_w, k_w, EPS)
    assert out_q.data_ptr() == q_ptr and out_q.dtype == dtype            # in place
    assert rel_err(out_q, ref_q) < TOL[dtype]
    assert rel_err(out_k, ref_k) < TOL[dtype]
    if sliced:
        assert torch.equal(v, v_before)                                  # v's columns untouched


@in_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,norm", [(128, True), (64, False), (80, True)])
def test_qk_norm_rope_writes_cache(dtype, head_dim, norm):
    """With v, a cache and slots, the same launch stores the rotated k and the untouched v at each
    row's slot (as reshape_and_cache would); slot -1 rows and rows past the slot list write
    nothing, and nothing else in the cache changes."""
    tokens, heads, kv_heads, block_size, num_blocks = 6, 4, 2, 4, 5
    qs, ks = heads * head_dim, kv_heads * head_dim
    qkv = randn(tokens, qs + 2 * ks, dtype=dtype, scale=2.0)
    q, k, v = qkv.split([qs, ks, ks], dim=-1)
    v_before = v.clone()
    positions = torch.tensor([3, 0, 9, 4095, 17, 2]).to(DEVICE)
    q_w = randn(head_dim, dtype=dtype) if norm else None
    k_w = randn(head_dim, dtype=dtype) if norm else None
    rope = make_rope(head_dim)
    ref_q, ref_k = torch_qk_norm_rope(f32(q), f32(k), positions.cpu(), rope,
                                      f32(q_w) if norm else None, f32(k_w) if norm else None)
    cache = randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    cache_before = cache.clone()
    slots = torch.tensor([7, -1, 0, 19, 12], dtype=torch.int64).to(DEVICE)   # row 5: past the list
    out_q, out_k = fused_ops.qk_norm_rope(q, k, positions, rope.cos_sin_cache.to(DEVICE), q_w, k_w, EPS,
                                          v=v, kv_cache=cache, slot_mapping=slots)
    assert rel_err(out_q, ref_q) < TOL[dtype] and rel_err(out_k, ref_k) < TOL[dtype]
    flat = cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    expect = cache_before.clone().view(2, num_blocks * block_size, kv_heads, head_dim)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expect[0, slot] = out_k[row].view(kv_heads, head_dim)
            expect[1, slot] = v_before[row].view(kv_heads, head_dim)
    assert torch.equal(flat, expect)
    assert torch.equal(v, v_before)


@in_process
def test_qk_norm_rope_out_of_place():
    q, k = randn(3, 2 * 64, dtype=torch.float32), randn(3, 64, dtype=torch.float32)
    positions = torch.tensor([0, 7, 4095]).to(DEVICE)
    q_before, k_before = q.clone(), k.clone()
    rope = make_rope(64)
    out_q, out_k = fused_ops.qk_norm_rope(q, k, positions, rope.cos_sin_cache.to(DEVICE), inplace=False)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
    ref_q, ref_k = rope(positions.cpu(), q.cpu(), k.cpu())
    assert rel_err(out_q, ref_q) < 1e-5 and rel_err(out_k, ref_k) < 1e-5


# --- CUDA only: the layers dispatch to the kernels and agree with their CPU (PyTorch) path -------

on_cuda = pytest.mark.skipif(not _ON_CUDA, reason="checks the CUDA dispatch of the layers")


@on_cuda
def test_layers_dispatch_on_cuda():
    x, res, w = (randn(*shape, dtype=torch.float32) for shape in [(5, 256), (5, 256), (256,)])
    norm = RMSNorm(256, EPS).to(DEVICE)
    norm.weight.data.copy_(w)
    ref = torch_rms_norm(x.cpu(), w.cpu())
    assert rel_err(norm(x), ref) < 1e-5
    ref_out, ref_res = torch_rms_norm(x.cpu(), w.cpu(), res.cpu())
    out, new_res = norm(x, res)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(new_res, ref_res) < 1e-5
    g = randn(5, 512, dtype=torch.float32)
    assert rel_err(SiluAndMul()(g), SiluAndMul()(g.cpu())) < 1e-5
    rope = make_rope(64)
    q, k = randn(5, 256, dtype=torch.float32), randn(5, 128, dtype=torch.float32)
    positions = torch.arange(5).to(DEVICE)
    ref_q, ref_k = rope(positions.cpu(), q.cpu(), k.cpu())
    out_q, out_k = rope.to(DEVICE)(positions, q, k)
    assert rel_err(out_q, ref_q) < 1e-5 and rel_err(out_k, ref_k) < 1e-5


@on_cuda
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_model_on_cuda_matches_cpu(arch):
    """A tiny Qwen3 (q/k norm) and Llama through LlamaModel: the CUDA path (fused kernels, in-place
    residuals) against the CPU path, attention over the batch as one causal sequence."""
    from transformers import LlamaConfig, Qwen3Config

    from folovllm.attention.backends.torch_ref import TorchAttentionImpl
    from folovllm.model_executor.models.llama import LlamaForCausalLM
    from folovllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    common = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
    if arch == "qwen3":
        config, cls = Qwen3Config(head_dim=128, **common), Qwen3ForCausalLM
    else:
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(config, TorchAttentionImpl, torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    ids = torch.randint(0, 320, (9,))
    positions = torch.arange(9)
    with torch.no_grad():
        ref = model(ids, positions, None)
        out = model.to(DEVICE)(ids.to(DEVICE), positions.to(DEVICE), None)
    assert rel_err(out, ref) < 1e-4


# --- reruns in fresh processes -------------------------------------------------------------------

def _rerun(env: dict, select: str) -> None:
    rerun_pytest(__file__, env, select)


@pytest.mark.skipif(not _TRITON_ALREADY_COMPILED, reason="the cases above ran in this process")
def test_rerun_in_fresh_process():
    _rerun(dict(os.environ, TRITON_INTERPRET="1"), "not test_compiled_on_cuda")


@pytest.mark.skipif(_ON_CUDA or not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_on_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _rerun(dict(env, FOLOVLLM_FUSED_OPS_CUDA="1"), "not test_compiled_on_cuda and not test_rerun")
