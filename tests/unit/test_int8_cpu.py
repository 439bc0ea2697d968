"""quantization="int8": per-output-row symmetric int8 weights, computed with PyTorch's CPU int8
kernel. The method against x @ (q * s)^T built in the test from the same integers and scales, the
rounding against hand-derived values, and the engine against transformers on the dequantized
weights."""

from __future__ import annotations

import pytest
import torch

from folovllm import LLM, SamplingParams
from folovllm.model_executor.layers.quantization.int8 import Int8LinearMethod, quantize_int8_rows


def test_rows_are_rounded_to_127_steps_of_their_largest_weight():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [0.1, 0.2, -0.3]])
    q, s = quantize_int8_rows(w)
    # row 0: step 2/127; 1/(2/127) = 63.5 -> 64 (round half to even), -2 -> -127, 0.5 -> 31.75 -> 32
    assert q[0].tolist() == [64, -127, 32] and s[0].item() == pytest.approx(2 / 127)
    assert q[1].tolist() == [0, 0, 0]  # an all-zero row stays zero (no division by zero)
    assert q[2].tolist() == [42, 85, -127]  # 0.1 / (0.3/127) = 42.33, 0.2 -> 84.67
    assert q.dtype == torch.int8


class _Layer(torch.nn.Module):
    pass


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("m", [1, 5])
def test_linear_method_equals_the_dequantized_matmul(dtype, tol, m):
    gen = torch.Generator().manual_seed(m)
    layer, method = _Layer(), Int8LinearMethod()
    method.create_weights(layer, 96, [48, 32], 96, 80, dtype)
    w = torch.randn(80, 96, generator=gen)
    layer.weight.data.copy_(w.to(dtype))
    method.process_weights_after_loading(layer)
    assert layer.weight_int8.dtype == torch.int8 and layer.weight.numel() == 0  # the float copy is gone
    # The reference from the stored integers and scales, in float64.
    ref_w = layer.weight_int8.double() * layer.weight_scale.double()[:, None]
    loaded = w.to(dtype).double()
    # Half a step of rounding, plus (bfloat16) the scale's own rounding: 127 x 2^-8 of a step.
    bound = layer.weight_scale.double() * (0.5 + (127 / 256 if dtype == torch.bfloat16 else 1e-3))
    assert ((ref_w - loaded).abs() <= bound[:, None] + 1e-6).all()
    x = torch.randn(m, 96, generator=gen)
    bias = torch.randn(80, generator=gen)
    y = method.apply(layer, x.to(dtype), bias.to(dtype)).double()
    ref = x.to(dtype).double() @ ref_w.T + bias.to(dtype).double()
    assert y.shape == (m, 80)
    assert ((y - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_engine_tokens_equal_transformers_on_the_dequantized_weights(tiny_models, arch):
    import copy

    path, hf = tiny_models[arch]
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, torch.nn.Linear):
                q, s = quantize_int8_rows(mod.weight)
                mod.weight.copy_(q.float() * s[:, None])
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    want = [ref.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                         pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    llm = LLM(path, device="cpu", quantization="int8")
    got = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
