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
@pytest.mark.parametrize("m", [1, 5, 40])  # the kernel for few rows, dequantized for many
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


@pytest.mark.parametrize("m", [7, 8, 20])
def test_wide_layers_from_a_few_rows_are_multiplied_by_chunks(monkeypatch, m):
    """A layer at least CHUNKED_MIN_OUTPUTS wide (an LM head), from CHUNKED_FROM_ROWS rows up to the
    dense path's rows, goes through dense_by_chunks (chunks of CHUNK_ROWS outputs, the last one
    shorter here): x @ (q * s)^T as the kernel gives it, within bfloat16 rounding."""
    import folovllm.model_executor.layers.quantization.int8 as int8

    monkeypatch.setattr(int8, "CHUNKED_MIN_OUTPUTS", 64)
    monkeypatch.setattr(int8, "CHUNK_ROWS", 48)   # 80 outputs: a chunk of 48 and one of 32
    calls = []
    real = int8.dense_by_chunks
    monkeypatch.setattr(int8, "dense_by_chunks", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(30 + m)
    layer, method = _Layer(), Int8LinearMethod()
    method.create_weights(layer, 96, [80], 96, 80, torch.bfloat16)
    layer.weight.data.copy_(torch.randn(80, 96, generator=gen).bfloat16())
    method.process_weights_after_loading(layer)
    x = torch.randn(m, 96, generator=gen).bfloat16()
    y = method.apply(layer, x)
    assert len(calls) == (1 if m >= int8.CHUNKED_FROM_ROWS else 0)
    ref = x.double() @ (layer.weight_int8.double() * layer.weight_scale.double()[:, None]).T
    assert y.dtype == torch.bfloat16 and y.shape == (m, 80)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    kernel = torch.ops.aten._weight_int8pack_mm(x, layer.weight_int8, layer.weight_scale)
    assert ((y.double() - kernel.double()).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("m", [1, 5, 40])
def test_float32_rows_meet_the_kernel_in_its_kernel_dtype(m):
    """kernel_dtype=bfloat16 (dtype "auto" on a CPU without bfloat16 instructions): float32 rows
    up to the kernel's limit go through it as bfloat16 and come back float32, its exact result;
    from DENSE_FROM_ROWS[bfloat16] rows on, the float32 dense path, exact as ever."""
    gen = torch.Generator().manual_seed(10 + m)
    layer, method = _Layer(), Int8LinearMethod(kernel_dtype=torch.bfloat16)
    method.create_weights(layer, 96, [80], 96, 80, torch.float32)
    layer.weight.data.copy_(torch.randn(80, 96, generator=gen))
    method.process_weights_after_loading(layer)
    x = torch.randn(m, 96, generator=gen)
    y = method.apply(layer, x)
    assert y.dtype == torch.float32 and y.shape == (m, 80)
    ref_w = layer.weight_int8.double() * layer.weight_scale.double()[:, None]
    if m < 32:
        kernel = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), layer.weight_int8,
                                                    layer.weight_scale.to(torch.bfloat16))
        assert torch.equal(y, kernel.float())
        ref = x.to(torch.bfloat16).double() @ ref_w.T
        assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-2
    else:
        ref = x.double() @ ref_w.T
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_auto_on_a_cpu_without_bfloat16_instructions_is_float32_with_bfloat16_kernels(tiny_gguf, no_bf16_cpu):
    """Such a CPU computes bfloat16 by conversion: with int8 weights the model runs float32 and
    only the int8 kernel (fast with bfloat16 inputs alone) gets bfloat16 rows. A dtype the user
    names is kept, with float32 rows into the kernel as float32."""
    from folovllm.config import EngineConfig, ModelConfig

    path, hf = tiny_gguf

    def resolved(**kw):
        mc = EngineConfig(ModelConfig(path, **kw), device="cpu").model_config
        return mc.quantization, mc.dtype, mc.cpu_kernel_dtype

    assert resolved() == ("int8", torch.float32, torch.bfloat16)
    assert resolved(quantization="int4") == ("int4", torch.bfloat16, None)  # its decode is faster so
    assert resolved(dtype="float32") == ("int8", torch.float32, None)
    assert resolved(dtype="bfloat16") == ("int8", torch.bfloat16, None)
    assert resolved(quantization="none") == (None, torch.float32, None)
    llm = LLM(path, device="cpu")
    model = llm.llm_engine.engine_core.executor.driver_worker.model_runner.model
    down = model.model.layers[0].mlp.down_proj
    assert down.quant_method.kernel_dtype == torch.bfloat16 and model.lm_head.quant_method.kernel_dtype == torch.bfloat16
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], SamplingParams(temperature=0.0, max_tokens=6,
                                                                              ignore_eos=True), use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 6


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
    # float32 activations, so the only difference from float32 transformers is the int8 weights
    # (dtype "auto" would be bfloat16 with int8 on CPU).
    llm = LLM(path, device="cpu", quantization="int8", dtype="float32")
    got = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want


# ---- a GGUF file on CPU defaults to int8 -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path, transformers model read from that file): a tiny Qwen2 GGUF written as llama.cpp's
    converter would (tests/unit/test_gguf_loader.py's writer)."""
    import transformers
    from test_gguf_loader import _tiny, _write_gguf

    folder = tmp_path_factory.mktemp("tiny-gguf")
    path = folder / "tiny-qwen2.gguf"
    _write_gguf(_tiny("qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
                "qwen2", path, tokenizer=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    return str(path), hf


def test_gguf_on_cpu_resolves_to_int8_with_bfloat16_unless_asked_otherwise(tiny_gguf, tiny_models):
    from folovllm.config import EngineConfig, ModelConfig

    path, _ = tiny_gguf

    def resolved(**kw):
        mc = EngineConfig(ModelConfig(path, **kw), device="cpu").model_config
        return mc.quantization, mc.dtype

    assert resolved() == ("int8", torch.bfloat16)
    assert resolved(dtype="float32") == ("int8", torch.float32)  # a dtype the user chose stays
    assert resolved(quantization="none") == (None, torch.float32)  # today's float32
    assert resolved(quantization="NONE") == (None, torch.float32)
    assert resolved(quantization="int4") == ("int4", torch.bfloat16)
    # Off CPU a GGUF keeps float weights; the same ModelConfig resolves again for each device.
    mc = ModelConfig(path)
    assert mc.resolve_quantization(torch.device("cuda")) is None
    assert mc.resolve_quantization(torch.device("cpu")) == "int8"
    assert mc.resolve_quantization(torch.device("cuda")) is None
    # An HF folder on CPU stays float32 unless asked.
    assert EngineConfig(ModelConfig(tiny_models["llama"][0]), device="cpu").model_config.quantization is None


def test_quantization_none_gives_the_float32_tokens_and_the_default_is_int8(tiny_gguf):
    path, hf = tiny_gguf
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    want = [hf.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                        pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    plain = LLM(path, device="cpu", quantization="none")
    assert [o.outputs[0].token_ids for o in plain.generate(inputs, params, use_tqdm=False)] == want
    model = plain.llm_engine.engine_core.executor.driver_worker.model_runner.model
    assert model.lm_head.weight.dtype == torch.float32 and not hasattr(model.lm_head, "weight_int8")

    default = LLM(path, device="cpu")
    model = default.llm_engine.engine_core.executor.driver_worker.model_runner.model
    assert model.lm_head.weight_int8.dtype == torch.int8
    assert model.model.layers[0].mlp.down_proj.weight_int8.dtype == torch.int8
    assert default.llm_engine.model_config.dtype == torch.bfloat16
    outs = default.generate(inputs, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8]


def _loader_log(*llm_kwargs: dict) -> list[str]:
    """The model loader's log messages while LLMs are built with each of llm_kwargs."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("folovllm.model_executor.model_loader")
    logger.addHandler(handler)
    try:
        for kw in llm_kwargs:
            LLM(**kw)
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records]


def test_the_chosen_format_and_its_memory_are_logged(tiny_gguf):
    path, _ = tiny_gguf
    lines = [m for m in _loader_log(dict(model=path, device="cpu"), dict(model=path, device="cpu", quantization="none"))
             if m.startswith("weights:")]
    assert len(lines) == 2
    assert "int8 weights" in lines[0] and "default for a GGUF file on CPU" in lines[0]
    assert "bfloat16 activations" in lines[0] and "MB in memory" in lines[0]
    assert lines[1].startswith("weights: float32 (unquantized)")


def test_the_log_says_when_float32_rows_meet_the_kernels_in_bfloat16(tiny_gguf, no_bf16_cpu):
    path, _ = tiny_gguf
    messages = _loader_log(dict(model=path, device="cpu"))
    lines = [m for m in messages if m.startswith("weights:")]
    assert len(lines) == 1 and "float32 activations (bfloat16 into the kernels)" in lines[0], lines
    assert not any("slow CPU path" in m for m in messages)


def test_cli_takes_int8_int4_and_none(tiny_gguf, capsys):
    from folovllm.entrypoints.cli import build_parser, main

    path, _ = tiny_gguf
    for name in ("int8", "int4", "none"):
        assert build_parser().parse_args(["generate", "--quantization", name]).quantization == name
    assert main(["generate", "--model", path, "--prompt", "ab", "--max-tokens", "3", "--quantization", "int4",
                 "--ignore-eos", "--max-model-len", "64"]) == 0
    assert "3 tokens" in capsys.readouterr().err
    assert main(["generate", "--model", path, "--prompt", "ab", "--quantization", "int3"]) == 2
    err = capsys.readouterr().err
    assert "quantization method 'int3' is not supported" in err and "int4" in err and "none" in err


def test_quantization_none_on_a_quantized_checkpoint_is_a_clear_error(tiny_models, tmp_path):
    import json
    import shutil

    from folovllm.config import ModelConfig

    folder = tmp_path / "gptq"
    shutil.copytree(tiny_models["llama"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quantization='none' was asked for.*'gptq'-quantized weights.*leave "
                                         r"quantization unset"):
        ModelConfig(str(folder), quantization="none")
    with pytest.raises(ValueError, match=r"ModelConfig\.quantization must be a method name"):
        ModelConfig(tiny_models["llama"][0], quantization=4)


def test_gguf_weights_come_in_the_model_dtype_when_narrower(tiny_gguf):
    from folovllm.model_executor.model_loader.gguf_loader import iterate_gguf_weights

    path, _ = tiny_gguf
    wide = dict(iterate_gguf_weights(path))
    narrow = dict(iterate_gguf_weights(path, torch.bfloat16))
    assert narrow.keys() == wide.keys()
    for name, t in narrow.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, wide[name].to(torch.bfloat16)), name
