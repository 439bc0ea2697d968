"""quantization="int4" and GPTQ 4-bit checkpoints on PyTorch's CPU int4 kernel. The references are
built here from the stored integers, scales and zeros, read back from the packed bytes by this
file's own decoding of the layouts (folovllm/model_executor/layers/quantization/int4.py's
docstring), in float64."""

from __future__ import annotations

import copy

import pytest
import torch

from folovllm import LLM, SamplingParams
from folovllm.model_executor.layers.quantization import int4
from folovllm.model_executor.layers.quantization.int4 import Int4LinearMethod, quantize_int4_groups


def codes_from_cpu_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Row r of block b = r // 64 is byte (b * k + kk) * 32 + r % 32 of the flat buffer for input
    kk: the low nibble for r % 64 < 32, the high one above."""
    flat = packed.reshape(-1).long()
    r = torch.arange(n).view(n, 1)
    kk = torch.arange(k).view(1, k)
    byte = flat[((r // 64) * k + kk) * 32 + r % 32]
    return torch.where(r % 64 < 32, byte & 15, byte >> 4)


def codes_from_plain_layout(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    out = torch.empty(n, 2 * half, dtype=torch.long)
    out[:, 0::2] = packed.long() & 15
    out[:, 1::2] = packed.long() >> 4
    return out


def reference_weight(codes: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """float64 W[n, k] = (q[n, k] - 8) * scale[k // group, n] + zero[k // group, n]."""
    n, k = codes.shape
    g = torch.arange(k) // group
    scale = sz[g, :n, 0].double().t()
    zero = sz[g, :n, 1].double().t()
    return (codes.double() - 8) * scale + zero


def test_groups_round_to_16_levels_between_their_extremes():
    w = torch.tensor([[0.0, 1.0, 3.0, 2.2, -1.0, -1.0, -1.0, -1.0]])
    q, s, z = quantize_int4_groups(w, 4, torch.float32)
    # group 0: lo 0, hi 3, scale 0.2, zero 0 + 8 * 0.2 = 1.6; q = round((w - 1.6) / 0.2) + 8
    assert s[0, 0].item() == pytest.approx(0.2) and z[0, 0].item() == pytest.approx(1.6)
    assert q[0, :4].tolist() == [0, 5, 15, 11]
    # group 1 is constant: scale 0, every code 8, and the weight is the zero itself
    assert s[1, 0].item() == 0 and z[1, 0].item() == -1.0 and q[0, 4:].tolist() == [8] * 4
    assert s.shape == z.shape == (2, 1) and q.dtype == torch.uint8


def test_group_size_is_the_largest_of_128_64_32_that_divides_the_input():
    assert [int4.pick_group_size(k) for k in (896, 4864, 64, 96, 4096)] == [128, 128, 64, 32, 128]
    with pytest.raises(ValueError, match="multiple of 32, got 40"):
        int4.pick_group_size(40)


class _Layer(torch.nn.Module):
    pass


def _quantized_layer(k, parts, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    layer, method = _Layer(), Int4LinearMethod()
    n = sum(parts)
    method.create_weights(layer, k, parts, k, n, dtype)
    w = torch.randn(n, k, generator=gen)
    layer.weight.data.copy_(w.to(dtype))
    method.process_weights_after_loading(layer)
    return layer, method, w.to(dtype).double(), gen


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("m", [1, 2, 5, 260])  # the kernel for few rows, dequantized for many (DENSE_FROM_ROWS)
@pytest.mark.parametrize("k,parts,group", [(256, [128, 64], 128), (96, [48, 32], 32), (40, [24], 64)])
def test_linear_method_equals_x_times_the_stored_weight(dtype, tol, m, k, parts, group):
    layer, method, loaded, gen = _quantized_layer(k, parts, dtype, seed=m + k)
    n = sum(parts)
    assert layer.weight.numel() == 0 and layer.weight.dtype == dtype  # the float copy is gone
    assert layer.int4_group_size == group and layer.weight_int4.dtype == torch.uint8
    padded_n, padded_k = layer.weight_int4.shape[0], layer.weight_int4.shape[1] * 2
    assert padded_n % 64 == 0 and padded_k % 32 == 0 and padded_k >= k
    ref_w = reference_weight(codes_from_cpu_layout(layer.weight_int4, padded_n, padded_k),
                             layer.weight_scales_zeros, group)[:n, :k]
    # Within half a step of what was loaded, plus the zero's rounding to the dtype.
    step = layer.weight_scales_zeros[:, :n, 0].double().t().repeat_interleave(group, dim=1)[:, :k]
    slack = 1e-6 if dtype == torch.float32 else 2 ** -8 * loaded.abs().max().item() * 2
    assert ((ref_w - loaded).abs() <= step * 0.5 + slack).all()
    x = torch.randn(m, 3, k, generator=gen)[:, 0]  # a non-contiguous input
    bias = torch.randn(n, generator=gen)
    y = method.apply(layer, x.to(dtype), bias.to(dtype)).double()
    ref = x.to(dtype).double() @ ref_w.T + bias.to(dtype).double()
    assert y.shape == (m, n)
    assert ((y - ref).norm() / ref.norm()).item() < tol


def test_off_cpu_the_codes_are_plain_and_dequantized_per_call(monkeypatch):
    monkeypatch.setattr(int4, "uses_cpu_kernel", lambda device: False)
    layer, method, loaded, gen = _quantized_layer(128, [80], torch.float32, seed=3)
    assert not layer.int4_cpu_layout and layer.weight_int4.shape == (80, 64)  # no row padding
    ref_w = reference_weight(codes_from_plain_layout(layer.weight_int4), layer.weight_scales_zeros, 128)
    assert ((ref_w - loaded).abs().max() < layer.weight_scales_zeros[..., 0].max()).item()
    x = torch.randn(4, 128, generator=gen)
    torch.testing.assert_close(method.apply(layer, x).double(), x.double() @ ref_w.T, rtol=1e-5, atol=1e-5)


def test_a_merged_layer_is_quantized_once_its_last_part_is_loaded():
    from folovllm.model_executor.layers.linear import QKVParallelLinear
    from folovllm.model_executor.layers.quantization.int4 import Int4Config

    layer = QKVParallelLinear(64, 16, 4, 2, bias=False, quant_config=Int4Config(), prefix="model.layers.0.qkv_proj")
    w = {s: torch.randn(n, 64) for s, n in (("q", 64), ("k", 32), ("v", 32))}
    layer.weight.weight_loader(layer.weight, w["q"], "q", "q_proj.weight")
    layer.weight.weight_loader(layer.weight, w["k"], "k", "k_proj.weight")
    assert not getattr(layer, "quantized", False) and layer.weight.shape == (128, 64)
    layer.weight.weight_loader(layer.weight, w["v"], "v", "v_proj.weight")
    assert layer.quantized and layer.weight.numel() == 0  # the float weight freed at once
    x = torch.randn(2, 64)
    ref_w = reference_weight(codes_from_cpu_layout(layer.weight_int4, 128, 64), layer.weight_scales_zeros, 64)
    torch.testing.assert_close(layer(x).double(), x.double() @ ref_w.T, rtol=1e-5, atol=1e-5)
    layer.quant_method.process_weights_after_loading(layer)  # after loading: already done, unchanged
    torch.testing.assert_close(layer(x).double(), x.double() @ ref_w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"v_proj\.weight is loaded into model\.layers\.0\.qkv_proj a second time"):
        layer.weight.weight_loader(layer.weight, w["v"], "v", "v_proj.weight")


def _int4_reference(hf):
    """transformers' model with every linear and the LM head (untied from the embedding, which
    keeps its float table as the engine's does) replaced by its int4-dequantized weight."""
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for mod in list(ref.modules()):
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.detach().clone()
                k = w.shape[1]
                group = next(g for g in (128, 64, 32) if k % g == 0)
                q, s, z = quantize_int4_groups(w, group, torch.float32)
                g = torch.arange(k) // group
                mod.weight = torch.nn.Parameter(((q.double() - 8) * s.double()[g].t() + z.double()[g].t()).float())
    return ref


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_engine_tokens_equal_transformers_on_the_dequantized_weights(tiny_models, arch):
    path, hf = tiny_models[arch]
    ref = _int4_reference(hf)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    want = [ref.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                         pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    # float32 activations: the only difference from float32 transformers is the int4 weights.
    llm = LLM(path, device="cpu", quantization="int4", dtype="float32")
    got = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    model = llm.llm_engine.engine_core.executor.driver_worker.model_runner.model
    assert model.lm_head.weight_int4.dtype == torch.uint8  # the LM head (tied for qwen3) is int4 too
    assert model.model.embed_tokens.weight.shape == (hf.config.vocab_size, hf.config.hidden_size)


def test_the_group_size_can_be_chosen_through_a_quantization_config(tiny_models):
    from folovllm.model_executor.layers.quantization.int4 import Int4Config

    path, _ = tiny_models["llama"]
    cfg = {"quant_method": "int4", "group_size": 32}
    llm = LLM(path, device="cpu", hf_overrides={"quantization_config": cfg})
    model = llm.llm_engine.engine_core.executor.driver_worker.model_runner.model
    assert llm.llm_engine.model_config.quantization == "int4"
    assert {m.int4_group_size for m in model.modules() if hasattr(m, "int4_group_size")} == {32}
    assert int4.pick_group_size(896, 64) == 64 and int4.pick_group_size(96, 128) == 32
    with pytest.raises(ValueError, match=r"int4 group_size must be one of \[128, 64, 32\], got 48"):
        Int4Config.from_config({"group_size": 48})


def test_int4_defaults_to_bfloat16_activations_on_cpu(tiny_models):
    from folovllm.config import EngineConfig, ModelConfig

    path, _ = tiny_models["llama"]
    assert EngineConfig(ModelConfig(path, quantization="int4"), device="cpu").model_config.dtype == torch.bfloat16
    assert EngineConfig(ModelConfig(path, quantization="int4", dtype="float32"),
                        device="cpu").model_config.dtype == torch.float32
    assert EngineConfig(ModelConfig(path), device="cpu").model_config.dtype == torch.float32


# ---- GPTQ checkpoints on the int4 kernel -------------------------------------------------------

def _gptq_layer(k, n, group_size, act_order, dtype, g_idx=None, bits=4, seed=0):
    from test_gptq_linear import checkpoint, make_case, quant_config

    from folovllm.model_executor.layers.linear import ReplicatedLinear

    q, z, scales, case_g_idx, w = make_case(k, n, bits, group_size, act_order, False, seed=seed)
    if g_idx is not None:  # a custom group assignment: W from the definition again
        case_g_idx = g_idx.to(torch.int32)
        w = scales.float()[g_idx] * (q - z[g_idx]).float()
    layer = ReplicatedLinear(k, n, bias=False, params_dtype=dtype,
                             quant_config=quant_config(bits, group_size, act_order, False, "gptq"), prefix="x.proj")
    params = dict(layer.named_parameters())
    for name, t in checkpoint(q, z, scales, case_g_idx, bits, "gptq").items():
        params[name].weight_loader(params[name], t, None, name)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, w.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("m", [1, 7, 260])
@pytest.mark.parametrize("group_size,act_order", [(32, False), (32, True), (128, True), (-1, False), (64, False)])
def test_gptq_cpu_path_equals_the_dequantized_matmul(dtype, tol, m, group_size, act_order):
    k, n = 256, 48
    layer, w = _gptq_layer(k, n, group_size, act_order, dtype)
    assert layer.gptq_int4 is not None  # repacked for the kernel
    assert (layer.gptq_int4_perm is not None) == act_order
    # A group of 256 rows (one group of K) runs as is; smaller ones as they are.
    assert layer.gptq_int4_group_size == (256 if group_size == -1 else group_size)
    assert layer.qweight.numel() == (0 if dtype == torch.bfloat16 else k // 8 * n)
    assert any(b is layer.gptq_int4 for b in layer.buffers())  # counted in the model's weight bytes
    x = torch.randn(m, k)
    y = layer(x.to(dtype)).double()
    ref = x.to(dtype).double() @ w
    assert ((y - ref).norm() / ref.norm()).item() < tol


def test_gptq_layers_the_kernel_cannot_take_keep_the_dequantizing_forward():
    k, n = 64, 32
    uneven = torch.tensor([0] * 40 + [1] * 24)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    for layer, w in (_gptq_layer(k, n, 32, True, torch.float32, g_idx=uneven),  # act-order groups of 40 and 24
                     _gptq_layer(k, n, 32, False, torch.float32, bits=8),
                     _gptq_layer(96, n, 48, False, torch.float32)):  # groups of 48: not a multiple of 32
        assert layer.gptq_int4 is None
        x = torch.randn(3, w.shape[0])
        torch.testing.assert_close(layer(x).double(), x.double() @ w, rtol=1e-5, atol=1e-5)
