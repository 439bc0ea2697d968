"""GPTQLinearMethod (folovllm/model_executor/layers/quantization/gptq.py) against the format's
definition: random integer weights, zeros and scales, packed here bit by bit from the spec,
must give y = x @ (scales[g_idx] * (q - z[g_idx])) + bias."""

from __future__ import annotations

import pytest
import torch

from folovllm.model_executor.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from folovllm.model_executor.layers.quantization import get_quantization_config_cls
from folovllm.model_executor.layers.quantization.gptq import GPTQConfig, GPTQLinearMethod


def pack_spec(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Field i of word j along `dim` holds values[j * p + i] at bits [b*i, b*(i+1)), as the
    format says; done with Python ints, one value at a time."""
    p = 32 // bits
    v = values.tolist() if dim == 1 else values.t().tolist()
    rows = []
    for row in v:
        words = []
        for j in range(len(row) // p):
            word = 0
            for i in range(p):
                word |= (row[j * p + i] & ((1 << bits) - 1)) << (bits * i)
            words.append(word - (1 << 32) if word >= 1 << 31 else word)
        rows.append(words)
    out = torch.tensor(rows, dtype=torch.int32)
    return out if dim == 1 else out.t().contiguous()


def make_case(K, N, bits, group_size, act_order, sym, seed=0):
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    G = 1 if group_size == -1 else K // group_size
    gs = K if group_size == -1 else group_size
    q = torch.randint(0, maxq + 1, (K, N), generator=gen)
    if sym:
        z = torch.full((G, N), (maxq + 1) // 2)
    else:
        z = torch.randint(0, maxq + 1, (G, N), generator=gen)
        z[0, :4] = 0  # a zero of 0 wraps to 2**b - 1 in v1
        z[-1, -4:] = maxq
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).half()
    g_idx = torch.arange(K) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    w = scales.float()[g_idx] * (q - z[g_idx]).float()
    return q, z, scales, g_idx.to(torch.int32), w


def checkpoint(q, z, scales, g_idx, bits, fmt):
    stored_z = (z - 1) if fmt == "gptq" else z  # v1 stores z - 1, wrapped by the packer's mask
    return {"qweight": pack_spec(q, bits, dim=0), "qzeros": pack_spec(stored_z, bits, dim=1),
            "scales": scales, "g_idx": g_idx}


def quant_config(bits, group_size, act_order, sym, fmt):
    return get_quantization_config_cls("gptq").from_config(
        {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
         "checkpoint_format": fmt})


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_apply_matches_the_definition(bits, fmt, group_size, act_order, sym):
    K, N = 128, 48
    q, z, scales, g_idx, w = make_case(K, N, bits, group_size, act_order, sym)
    layer = ReplicatedLinear(K, N, bias=True, quant_config=quant_config(bits, group_size, act_order, sym, fmt),
                             prefix="model.layers.0.mlp.down_proj")
    assert isinstance(layer.quant_method, GPTQLinearMethod)
    params = dict(layer.named_parameters())
    bias = torch.randn(N)
    for name, t in {**checkpoint(q, z, scales, g_idx, bits, fmt), "bias": bias}.items():
        params[name].weight_loader(params[name], t, None, name)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, 5, K)
    torch.testing.assert_close(layer(x), x @ w + bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), x @ w + bias, atol=1e-5, rtol=1e-5)  # the zeros converted once
    # After loading, qzeros holds the real zeros (v2), whatever the checkpoint stored.
    assert torch.equal(layer.qzeros, pack_spec(z, bits, dim=1))


@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_rows_sorted_by_group_for_the_gpu_kernels(bits):
    """Off CPU an act-order layer's rows are sorted by group once after loading (the GPU kernels
    then read one scale row per K tile): qweight holds the rows in the sorted order, the forward
    reads x's columns through gptq_perm and still gives x @ W; a g_idx whose groups are not runs of
    group_size rows once sorted is left as it is. (Run here on a CPU layer, calling the step the
    loader takes off CPU.)"""
    from folovllm.model_executor.layers.quantization import gptq

    K, N = 128, 48
    q, z, scales, g_idx, w = make_case(K, N, bits, 32, True, False)

    def loaded(g):
        layer = ReplicatedLinear(K, N, quant_config=quant_config(bits, 32, True, False, "gptq_v2"), prefix="x")
        params = dict(layer.named_parameters())
        for name, t in checkpoint(q, z, scales, g, bits, "gptq_v2").items():
            params[name].weight_loader(params[name], t, None, name)
        layer.quant_method.process_weights_after_loading(layer)
        layer.gptq_int4 = None  # the dequantizing forward, as a GPU without the Triton kernel runs
        return layer

    layer = loaded(g_idx)
    gptq._sort_act_order_rows(layer, bits)
    perm = torch.argsort(g_idx.long(), stable=True)
    assert layer.gptq_g_idx is None and torch.equal(layer.gptq_perm.long(), perm)
    assert torch.equal(layer.qweight, pack_spec(q[perm], bits, dim=0))
    assert layer.gptq_group_size == 32
    x = torch.randn(3, K)
    torch.testing.assert_close(layer(x), x @ w, atol=1e-5, rtol=1e-5)

    uneven = g_idx.clone()
    uneven[:3] = 0  # group 0 now holds more than 32 rows
    layer = loaded(uneven)
    before = layer.qweight.clone()
    gptq._sort_act_order_rows(layer, bits)
    assert layer.gptq_perm is None and layer.gptq_g_idx is not None and torch.equal(layer.qweight, before)


def test_merged_parts_and_row_parallel_load_at_their_offsets():
    """gate/up parts load into one layer at plain offsets of qweight/scales and packed offsets
    of qzeros; each part's g_idx is the layer's."""
    K, N, bits = 64, 32, 4
    cfg = quant_config(bits, 32, False, False, "gptq")
    layer = MergedColumnParallelLinear(K, [N, N], quant_config=cfg, prefix="mlp.gate_up_proj")
    ws = []
    params = dict(layer.named_parameters())
    for shard in (0, 1):
        q, z, scales, g_idx, w = make_case(K, N, bits, 32, False, False, seed=shard)
        ws.append(w)
        for name, t in checkpoint(q, z, scales, g_idx, bits, "gptq").items():
            layer.weight_loader(params[name], t, shard, name)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(4, K)
    torch.testing.assert_close(layer(x), x @ torch.cat(ws, dim=1), atol=1e-5, rtol=1e-5)

    # One input, one act-order: parts that disagree on g_idx are refused.
    bad = MergedColumnParallelLinear(K, [N, N], quant_config=quant_config(bits, 32, True, False, "gptq"),
                                     prefix="mlp.gate_up_proj")
    bad.g_idx.weight_loader(bad.g_idx, torch.arange(K, dtype=torch.int32) // 32, 0, "mlp.gate_proj.g_idx")
    with pytest.raises(ValueError, match=r"mlp\.up_proj\.g_idx differs from mlp\.gate_proj\.g_idx"):
        bad.g_idx.weight_loader(bad.g_idx, torch.arange(K, dtype=torch.int32).flip(0) // 32, 1, "mlp.up_proj.g_idx")

    row = RowParallelLinear(K, N, quant_config=cfg, prefix="mlp.down_proj")
    q, z, scales, g_idx, w = make_case(K, N, bits, 32, False, False, seed=5)
    params = dict(row.named_parameters())
    for name, t in checkpoint(q, z, scales, g_idx, bits, "gptq").items():
        row.weight_loader(params[name], t, None, name)
    row.quant_method.process_weights_after_loading(row)
    torch.testing.assert_close(row(x), x @ w, atol=1e-5, rtol=1e-5)


def test_row_parallel_rank_holds_whole_groups():
    """Designed for tp > 1: a row-parallel rank takes its rows of qweight/g_idx and, without
    act-order, its groups of scales/qzeros; with act-order every group."""
    from folovllm.distributed import parallel_state as ps

    K, N, bits = 128, 32, 4
    for act_order in (False, True):
        q, z, scales, g_idx, w = make_case(K, N, bits, 32, act_order, False, seed=2)
        ckpt = checkpoint(q, z, scales, g_idx, bits, "gptq_v2")
        x = torch.randn(3, K)
        total = 0
        for rank in range(2):
            with ps.fake_tensor_model_parallel(2, rank):
                layer = RowParallelLinear(K, N, quant_config=quant_config(bits, 32, act_order, False, "gptq_v2"),
                                          prefix="mlp.down_proj")
            params = dict(layer.named_parameters())
            for name, t in ckpt.items():
                layer.weight_loader(params[name], t, None, name)
            layer.quant_method.process_weights_after_loading(layer)
            assert layer.scales.shape[0] == (4 if act_order else 2)
            total = total + layer.quant_method.apply(layer, x.chunk(2, dim=-1)[rank])
        torch.testing.assert_close(total, x @ w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings,match", [
    ({"bits": 3, "group_size": 32}, r"bits=3 is not supported.*4 or 8"),
    ({"bits": 4, "group_size": 32, "checkpoint_format": "marlin"}, r"checkpoint_format 'marlin' is not supported"),
    ({"bits": 4, "group_size": 0}, r"group_size must be -1"),
    ({"group_size": 32}, r"none of \['bits'"),
])
def test_bad_configs_are_clear_errors(settings, match):
    with pytest.raises(ValueError, match=match):
        GPTQConfig.from_config({"quant_method": "gptq", **settings})


def test_layer_sizes_that_do_not_fit_are_named():
    cfg = quant_config(4, 48, False, True, "gptq")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*input size per partition \(128\) "
                                         r"is not divisible by group_size \(48\)"):
        ReplicatedLinear(128, 64, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match=r"x\.proj.*\(36\) is not divisible by the pack factor \(8"):
        ReplicatedLinear(36, 64, quant_config=quant_config(4, -1, False, True, "gptq"), prefix="x.proj")
    with pytest.raises(ValueError, match=r"output part of 10 features.*pack factor \(4\)"):
        ReplicatedLinear(64, 10, quant_config=quant_config(8, -1, False, True, "gptq"), prefix="x.proj")


def test_embedding_and_lm_head_stay_unquantized():
    from folovllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    cfg = quant_config(4, 32, False, True, "gptq")
    head = ParallelLMHead(100, 64, torch.float32, cfg, "lm_head")
    assert head.quant_method is None and head.weight.shape == (100, 64)
    assert cfg.get_quant_method(VocabParallelEmbedding(100, 64), "model.embed_tokens") is None


_KERNEL_CHECK = """
import sys, torch
sys.path.insert(0, {here!r})
from test_gptq_linear import make_case, checkpoint, quant_config
from folovllm.model_executor.layers.linear import ReplicatedLinear
from folovllm.model_executor.layers.quantization import gptq
from folovllm.model_executor.layers.quantization.kernels.gptq_triton import gptq_matmul
for bits, gs, act, fmt in [(4, 32, False, "gptq"), (4, 32, True, "gptq"), (8, -1, False, "gptq_v2")]:
    q, z, s, g, w = make_case(128, 64, bits, gs, act, False)
    layer = ReplicatedLinear(128, 64, quant_config=quant_config(bits, gs, act, False, fmt), prefix="x")
    params = dict(layer.named_parameters())
    for n, t in checkpoint(q, z, s, g, bits, fmt).items():
        params[n].weight_loader(params[n], t, None, n)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(4, 128)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    on = lambda t: None if t is None else t.to(dev)
    y = gptq_matmul(x.to(dev), on(layer.qweight), on(layer.qzeros), on(layer.scales), on(layer.gptq_g_idx), bits,
                    layer.gptq_group_size)
    torch.testing.assert_close(y.cpu(), x @ w, atol=1e-4, rtol=1e-4)
    if act:  # the layout off CPU: rows sorted by group, x read through the permutation
        gptq._sort_act_order_rows(layer, bits)
        assert layer.gptq_g_idx is None and layer.gptq_perm is not None
        y = gptq_matmul(x.to(dev), on(layer.qweight), on(layer.qzeros), on(layer.scales), None, bits,
                        layer.gptq_group_size, perm=on(layer.gptq_perm))
        torch.testing.assert_close(y.cpu(), x @ w, atol=1e-4, rtol=1e-4)
"""


def test_the_gpu_kernel_takes_the_loaded_layout():
    """What apply hands the Triton kernel on a GPU (v2 zeros, the g_idx or None, the group size)
    gives the definition's product; run in a fresh process, compiled on a GPU, else through
    Triton's interpreter."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec(
            "folovllm.model_executor.layers.quantization.kernels.gptq_triton") is None:
        pytest.skip("triton or the GPTQ Triton kernel is not installed")
    code = _KERNEL_CHECK.format(here=str(Path(__file__).parent))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
