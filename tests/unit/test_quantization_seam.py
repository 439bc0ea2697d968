"""The quantization seam (folovllm/model_executor/layers/quantization/): a method registered by
name creates a layer's parameters in its own layout, the layers load checkpoint tensors into
them by their layout attributes, and process_weights_after_loading runs once all are in.

Two test-only methods stand in for GPTQ, exactly (no rounding), so a model loaded through them
must compute what the plain model computes:
  test_transposed  the weight stored as [in, out] (input_dim=0, output_dim=1), as GPTQ's qweight;
  test_packed      two float32 values bit-packed into one int64 along the input or the output
                   dim (packed_dim, packed_factor=2), as GPTQ packs eight int4 into an int32
                   along the input (qweight) or the output (qzeros); it unpacks after loading.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig


from folovllm.attention.backends.torch_ref import TorchAttentionImpl
from folovllm.distributed import parallel_state as ps
from folovllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from folovllm.model_executor.layers.quantization import (
    QUANTIZATION_METHODS, LinearMethodBase, QuantizationConfig, get_quantization_config_cls,
    register_quantization_config)
from folovllm.model_executor.model_loader import get_model, initialize_dummy_weights, numpy_backed
from folovllm.model_executor.utils import set_weight_attrs

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- the two test-only methods -----------------------------------------------------------------

class TransposedLinearMethod(LinearMethodBase):
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        w = nn.Parameter(torch.empty(input_size_per_partition, sum(output_partition_sizes), dtype=params_dtype),
                         requires_grad=False)
        set_weight_attrs(w, {"input_dim": 0, "output_dim": 1, **extra_weight_attrs})
        layer.register_parameter("weight_t", w)
        layer.processed = 0

    def apply(self, layer, x, bias=None):
        if layer.processed != 1:
            raise RuntimeError(f"{layer.prefix}: process_weights_after_loading ran {layer.processed} times")
        out = x @ layer.weight_t
        return out if bias is None else out + bias

    def process_weights_after_loading(self, layer):
        layer.processed += 1


def pack(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Pairs of float32 along dim as the two halves of one int64."""
    if dim == 1:
        return w.contiguous().view(torch.int64)
    return w.t().contiguous().view(torch.int64).t().contiguous()


def unpack(q: torch.Tensor, dim: int) -> torch.Tensor:
    if dim == 1:
        return q.contiguous().view(torch.float32)
    return q.t().contiguous().view(torch.float32).t().contiguous()


class PackedLinearMethod(LinearMethodBase):
    def __init__(self, packed_dim: int) -> None:
        self.packed_dim = packed_dim  # 1: along the input, 0: along the output

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        shape = [sum(output_partition_sizes), input_size_per_partition]
        shape[self.packed_dim] //= 2
        q = nn.Parameter(torch.empty(shape, dtype=torch.int64), requires_grad=False)
        dim = self.packed_dim

        def init_dummy(param, generator, low, high):
            unpacked = list(param.shape)
            unpacked[dim] *= 2
            param.data.copy_(pack(torch.empty(unpacked).uniform_(low, high, generator=generator), dim))

        set_weight_attrs(q, {"input_dim": 1, "output_dim": 0, "packed_dim": dim, "packed_factor": 2,
                             "init_dummy": init_dummy, **extra_weight_attrs})
        layer.register_parameter("qweight", q)

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.unpacked, bias)  # AttributeError unless processed

    def process_weights_after_loading(self, layer):
        layer.unpacked = unpack(layer.qweight.data, self.packed_dim)


class _TestConfig(QuantizationConfig):
    def __init__(self, settings: dict) -> None:
        self.settings = settings
        self.prefixes: list[tuple[str, str]] = []  # (prefix, layer class) of every layer asked about

    @classmethod
    def from_config(cls, config):
        return cls(dict(config))

    @classmethod
    def get_supported_act_dtypes(cls):
        return [torch.float32]

    def get_quant_method(self, layer, prefix):
        self.prefixes.append((prefix, type(layer).__name__))
        if not isinstance(layer, LinearBase) or any(s in prefix for s in self.settings.get("skip", [])):
            return None
        return self.method()


class TransposedConfig(_TestConfig):
    @classmethod
    def get_name(cls):
        return "test_transposed"

    def method(self):
        return TransposedLinearMethod()


class PackedConfig(_TestConfig):
    @classmethod
    def get_name(cls):
        return "test_packed"

    def method(self):
        return PackedLinearMethod({"input": 1, "output": 0}[self.settings["packed_along"]])


@pytest.fixture(scope="module", autouse=True)
def test_methods():
    """Registered for this module only, so no other test sees them among the supported methods."""
    for cls in (TransposedConfig, PackedConfig):
        register_quantization_config(cls.get_name())(cls)
    yield
    for cls in (TransposedConfig, PackedConfig):
        QUANTIZATION_METHODS.pop(cls.get_name())


# ---- checkpoints in those layouts ----------------------------------------------------------------

def quantized_name_and_tensor(method: str, settings: dict, name: str, t: torch.Tensor):
    if not (name.endswith(".weight") and name.split(".")[-2] in PROJS) \
            or any(s in name for s in settings.get("skip", [])):
        return name, t
    if method == "test_transposed":
        return name[:-len("weight")] + "weight_t", t.t().contiguous()
    dim = {"input": 1, "output": 0}[settings["packed_along"]]
    return name[:-len("weight")] + "qweight", pack(t, dim)


def write_quantized(src: str, dst: Path, method: str, settings: dict, drop: str | None = None,
                    transform=None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in load_file(f"{src}/model.safetensors").items():
        qname, qt = quantized_name_and_tensor(method, settings, name, t)
        if transform is not None:
            qt = transform(qname, qt)
        if qname != drop:
            tensors[qname] = qt
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(Path(src, "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, **settings}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def models(biased_tiny_models):
    return biased_tiny_models


def model_config(path, **kw):
    """Stands in for the resolved ModelConfig that get_model takes."""
    hf_config = AutoConfig.from_pretrained(path)
    hf_quant = getattr(hf_config, "quantization_config", None)
    fields = dict(model=str(path), hf_config=hf_config, dtype=torch.float32,
                  quantization=hf_quant["quant_method"] if hf_quant else None, hf_quant_config=hf_quant,
                  seed=0, load_format="auto")
    fields.update(kw)
    return types.SimpleNamespace(**fields)


def load(path, **kw):
    return get_model(model_config(path, **kw), TorchAttentionImpl, torch.device("cpu"))


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), None))


def greedy(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(logits(model, ids)[-1].argmax()))
    return ids[-n:]


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


METHODS = [("test_transposed", {}), ("test_packed", {"packed_along": "input"}),
           ("test_packed", {"packed_along": "output"})]
METHOD_IDS = ["transposed", "packed-input", "packed-output"]
PROMPT = [5, 17, 99, 3, 250, 7, 64, 31, 12, 200, 41]


# ---- tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,settings", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_quantized_layout_computes_what_the_plain_model_does(models, tmp_path, arch, method, settings):
    path, hf = models[arch]
    qpath = write_quantized(path, tmp_path / "q", method, settings)
    plain, quant = load(path), load(qpath)
    linears = [m for m in quant.modules() if isinstance(m, LinearBase)]
    assert len(linears) == 4 * hf.config.num_hidden_layers
    assert all(type(m.quant_method).__name__ != "UnquantizedLinearMethod" for m in linears)
    assert not any(hasattr(m, "weight") for m in linears)
    if method == "test_transposed":
        assert all(m.processed == 1 for m in linears)  # process_weights_after_loading ran, once
    ours = logits(quant, PROMPT)
    torch.testing.assert_close(ours, logits(plain, PROMPT), atol=1e-5, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(ours, hf(torch.tensor([PROMPT])).logits[0], atol=1e-4, rtol=0)
    assert greedy(quant, PROMPT, 8) == greedy(plain, PROMPT, 8) == hf_greedy(hf, PROMPT, 8)


def test_layers_are_asked_by_their_dotted_prefix(tiny_models, tmp_path):
    path, _ = tiny_models["llama"]
    qpath = write_quantized(path, tmp_path / "q", "test_transposed", {"skip": ["layers.1.mlp"]})
    model = load(qpath)
    asked = model.quant_config.prefixes
    expected = [(f"model.layers.{i}.{p}", cls) for i in range(2) for p, cls in (
        ("self_attn.qkv_proj", "QKVParallelLinear"), ("self_attn.o_proj", "RowParallelLinear"),
        ("mlp.gate_up_proj", "MergedColumnParallelLinear"), ("mlp.down_proj", "RowParallelLinear"))]
    assert asked == expected + [("lm_head", "ParallelLMHead")]
    # A method may decline a layer: layer 1's MLP stays a plain weight, and loads as one.
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp.gate_up_proj.quant_method, UnquantizedLinearMethod) and hasattr(mlp.down_proj, "weight")
    assert isinstance(model.model.layers[0].mlp.gate_up_proj.quant_method, TransposedLinearMethod)
    torch.testing.assert_close(logits(model, PROMPT), logits(load(path), PROMPT), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,settings", METHODS, ids=METHOD_IDS)
@pytest.mark.parametrize("tp", [2, 4])
def test_quantized_layouts_shard_like_the_plain_weight(models, tmp_path, method, settings, tp):
    """Under tensor parallelism each rank's quantized params hold the same numbers as that
    rank's plain weight: the loader narrowed along output_dim/input_dim (in packed units where
    that is the packed dim), and put q/k/v and gate/up at their packed offsets."""
    path, _ = models["llama"]
    qpath = write_quantized(path, tmp_path / "q", method, settings)
    for rank in range(tp):
        with ps.fake_tensor_model_parallel(tp, rank):
            plain, quant = load(path), load(qpath)
        plain_linears = {n: m for n, m in plain.named_modules() if isinstance(m, LinearBase)}
        for name, layer in quant.named_modules():
            if not isinstance(layer, LinearBase):
                continue
            ref = plain_linears[name]
            got = layer.weight_t.t() if method == "test_transposed" else layer.unpacked
            assert torch.equal(got, ref.weight), (name, rank)
            if ref.bias is not None:
                assert torch.equal(layer.bias, ref.bias)


def test_missing_quantized_weight_is_named(tiny_models, tmp_path):
    """The expected names come from the params the method created, not from '.weight'."""
    path, _ = tiny_models["llama"]
    qpath = write_quantized(path, tmp_path / "q", "test_packed", {"packed_along": "output"},
                            drop="model.layers.1.mlp.up_proj.qweight")
    with pytest.raises(ValueError, match=r"lacks 1 weight.*model\.layers\.1\.mlp\.gate_up_proj\.qweight#1"):
        load(qpath)


def test_wrong_quantized_shape_is_a_clear_error(tiny_models, tmp_path):
    path, _ = tiny_models["llama"]
    qpath = write_quantized(path, tmp_path / "q2", "test_transposed", {}, transform=lambda name, t: (
        t.t().contiguous() if name == "model.layers.0.self_attn.k_proj.weight_t" else t))
    with pytest.raises(ValueError, match=r"checkpoint tensor model\.layers\.0\.self_attn\.k_proj\.weight_t has "
                                         r"shape \(32, 64\), but the model config implies \(64, 32\)"):
        load(qpath)


def test_unknown_method_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match=r"quantization method 'nope' is not supported; supported methods: "
                                         r".*test_packed, test_transposed"):
        get_quantization_config_cls("nope")
    assert get_quantization_config_cls("TEST_Packed") is PackedConfig
    path, _ = tiny_models["llama"]
    with pytest.raises(ValueError, match="'nope' is not supported"):
        load(path, quantization="nope", hf_quant_config={"quant_method": "nope"})


def test_unsupported_dtype_is_a_clear_error(tiny_models, tmp_path):
    path, _ = tiny_models["llama"]
    qpath = write_quantized(path, tmp_path / "q", "test_transposed", {})
    with pytest.raises(ValueError, match=r"'test_transposed' runs with dtype \['float32'\], not float16"):
        load(qpath, dtype=torch.float16)


def test_registry_refuses_what_is_not_a_config():
    with pytest.raises(TypeError):
        register_quantization_config("test_bad")(object)
    with pytest.raises(ValueError, match="already registered"):
        register_quantization_config("test_packed")(TransposedConfig)
    assert "test_bad" not in QUANTIZATION_METHODS


def test_dummy_weights(tiny_models, tmp_path):
    """Plain params: one generator over the parameters in order, uniform, norms left at 1 (the
    benchmarks' figures depend on these exact values). A quant method's own init_dummy fills
    its packed params; process_weights_after_loading still runs."""
    path, _ = tiny_models["qwen3"]
    model = load(path, load_format="dummy", seed=3)
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p))
        else:
            assert torch.equal(p, torch.empty(p.shape).uniform_(-1e-3, 1e-3, generator=gen)), name
    qpath = write_quantized(path, tmp_path / "q", "test_packed", {"packed_along": "output"})
    quant = load(qpath, load_format="dummy", seed=3)
    for m in quant.modules():
        if isinstance(m, LinearBase):
            assert m.unpacked.abs().max() <= 1e-3 and m.unpacked.abs().min() > 0
    assert torch.isfinite(logits(quant, PROMPT)).all()


def test_replacing_param_data_keeps_layout_attributes():
    """get_model moves big CPU params to numpy memory by assigning .data; the loader needs the
    attributes afterwards."""
    from folovllm.model_executor.layers.linear import QKVParallelLinear

    layer = QKVParallelLinear(64, 16, 4, 2, bias=True)
    w = layer.weight
    w.data = numpy_backed(tuple(w.shape), w.dtype)
    assert layer.weight is w and (w.input_dim, w.output_dim) == (1, 0)
    assert w.weight_loader == layer.weight_loader
    initialize_dummy_weights(layer, seed=0)
    full = torch.randn(64, 64)
    layer.weight_loader(w, full, "q")
    assert torch.equal(w[:64], full)


def _engine_config_has_quantization() -> bool:
    import dataclasses

    from folovllm.config import ModelConfig
    return {"quantization", "hf_quant_config"} <= {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.mark.skipif(not _engine_config_has_quantization(), reason="ModelConfig does not resolve quantization yet")
@pytest.mark.parametrize("method,settings", METHODS[1:2], ids=METHOD_IDS[1:2])
def test_llm_end_to_end(models, tmp_path, method, settings):
    from folovllm import LLM, SamplingParams

    path, hf = models["llama"]
    qpath = write_quantized(path, tmp_path / "q", method, settings)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[:4]}]
    quant = LLM(str(qpath)).generate(prompts, params, use_tqdm=False)
    plain = LLM(path).generate(prompts, params, use_tqdm=False)
    for q, p, prompt in zip(quant, plain, prompts):
        assert q.outputs[0].token_ids == p.outputs[0].token_ids == hf_greedy(hf, prompt["prompt_token_ids"], 10)
    with pytest.raises(ValueError, match="not supported"):
        LLM(path, quantization="nope")
