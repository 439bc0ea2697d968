"""Standard GPTQ checkpoints (qweight, qzeros, scales, g_idx + quantization_config) load and run.

The checkpoint is written here from a tiny float model: each decoder linear is quantized with
round-to-nearest over per-group min-max ranges and packed from the format's definition. The
reference is transformers running the same model with every quantized weight replaced by its
dequantized value, so FoloVLLM's greedy tokens must equal transformers' exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from folovllm import LLM, SamplingParams

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [[5, 17, 99, 3, 250, 7, 64, 31, 12, 200, 41], [9, 8, 7]]


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """p = 32 // bits values per int32 along dim, value i of a word at bits [b*i, b*(i+1))."""
    p = 32 // bits
    v = (values.to(torch.int64) & ((1 << bits) - 1)).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, p) << (bits * torch.arange(p))
    word = v.sum(-1)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.movedim(-1, dim).contiguous()


def group_index(K: int, group_size: int, act_order: bool, gen: torch.Generator) -> torch.Tensor:
    gs = K if group_size == -1 else group_size
    if not act_order:
        return torch.arange(K) // gs
    # Rows visited in a random order and grouped in that order, what desc_act leaves.
    perm = torch.randperm(K, generator=gen)
    g_idx = torch.empty(K, dtype=torch.long)
    g_idx[perm] = torch.arange(K) // gs
    return g_idx


def rtn(weight: torch.Tensor, bits: int, g_idx: torch.Tensor, sym: bool):
    """weight [N, K] -> (q [K, N], z [G, N], scales fp16 [G, N], g_idx [K], dequantized [N, K])."""
    w = weight.t().float()
    K, N = w.shape
    maxq = (1 << bits) - 1
    G = int(g_idx.max()) + 1
    q = torch.empty(K, N, dtype=torch.long)
    z = torch.empty(G, N, dtype=torch.long)
    scales = torch.empty(G, N, dtype=torch.float16)
    for g in range(G):
        rows = g_idx == g
        wg = w[rows]
        if sym:
            scale = (2 * wg.abs().amax(0) / maxq).clamp(min=1e-5).half()
            zero = torch.full((N,), (maxq + 1) // 2)
        else:
            lo, hi = wg.amin(0).clamp(max=0), wg.amax(0).clamp(min=0)
            scale = ((hi - lo) / maxq).clamp(min=1e-5).half()
            zero = torch.round(-lo / scale.float()).long().clamp(0, maxq)
        q[rows] = (torch.round(wg / scale.float()) + zero).long().clamp(0, maxq)
        z[g], scales[g] = zero, scale
    deq = scales.float()[g_idx] * (q - z[g_idx]).float()
    return q, z, scales, g_idx.to(torch.int32), deq.t().contiguous()


def write_gptq(src: str, dst: Path, bits=4, group_size=32, act_order=False, sym=True, fmt="gptq",
               extra: dict | None = None, drop: str | None = None, config_overrides: dict | None = None):
    """The GPTQ checkpoint of the float model at src, and the dequantized state dict."""
    dst.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors, dequantized, orders = {}, {}, {}
    for name, t in load_file(f"{src}/model.safetensors").items():
        parts = name.split(".")
        if not (name.endswith(".weight") and parts[-2] in PROJS):
            tensors[name] = t
            continue
        # Projections of one input (q/k/v, gate/up) share its act-order, as GPTQ's Hessian order.
        key = (parts[2], {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(parts[-2], parts[-2]))
        if key not in orders:
            orders[key] = group_index(t.shape[1], group_size, act_order, gen)
        q, z, scales, g_idx, deq = rtn(t, bits, orders[key], sym)
        prefix = name[:-len(".weight")]
        tensors[f"{prefix}.qweight"] = pack(q, bits, 0)
        tensors[f"{prefix}.qzeros"] = pack(z - 1 if fmt == "gptq" else z, bits, 1)
        tensors[f"{prefix}.scales"] = scales
        tensors[f"{prefix}.g_idx"] = g_idx
        dequantized[name] = deq
    tensors.update(extra or {})
    tensors.pop(drop, None)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(Path(src, "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                     "desc_act": act_order, "sym": sym, "checkpoint_format": fmt,
                                     **(config_overrides or {})}
    (dst / "config.json").write_text(json.dumps(config))
    return dst, dequantized


def hf_reference(hf, dequantized: dict):
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in dequantized:
                p.copy_(dequantized[name])
    return ref


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def folovllm_greedy(path, n: int = 10) -> list[list[int]]:
    llm = LLM(model=str(path), device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


CASES = [  # bits, group_size, desc_act, sym, checkpoint_format
    (4, 32, False, True, "gptq"),
    (4, 32, True, False, "gptq"),
    (8, -1, False, False, "gptq_v2"),
    (4, 32, True, True, "gptq_v2"),
]


@pytest.mark.parametrize("bits,group_size,act_order,sym,fmt", CASES,
                         ids=["4b-g32-v1-sym", "4b-g32-actorder-v1-asym", "8b-g-1-v2-asym", "4b-g32-actorder-v2"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_gptq_checkpoint_gives_the_dequantized_models_tokens(tiny_models, tmp_path, arch, bits, group_size,
                                                             act_order, sym, fmt):
    src, hf = tiny_models[arch]
    path, deq = write_gptq(src, tmp_path / "gptq", bits, group_size, act_order, sym, fmt)
    ref = hf_reference(hf, deq)
    expected = [hf_greedy(ref, p, 10) for p in PROMPTS]
    # The quantization is real: the plain model's tokens are not the reference's.
    assert expected != [hf_greedy(hf, p, 10) for p in PROMPTS] or bits == 8
    assert folovllm_greedy(path) == expected


def test_logits_match_the_dequantized_model(tiny_models, tmp_path):
    from folovllm.attention.backends.torch_ref import TorchAttentionImpl
    from folovllm.config import EngineConfig, ModelConfig
    from folovllm.model_executor.layers.quantization.gptq import GPTQLinearMethod
    from folovllm.model_executor.model_loader import get_model

    src, hf = tiny_models["llama"]
    path, deq = write_gptq(src, tmp_path / "gptq", act_order=True, sym=False)
    mc = EngineConfig(ModelConfig(str(path)), device="cpu").model_config
    model = get_model(mc, TorchAttentionImpl, torch.device("cpu"))
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.quant_method, GPTQLinearMethod)
    assert model.lm_head.quant_method is None
    ids = PROMPTS[0]
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), None))
        theirs = hf_reference(hf, deq)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_stray_zero_bias_is_skipped(tiny_models, tmp_path):
    """Some exporters write a zero bias for every linear; llama's are built without one."""
    src, hf = tiny_models["llama"]
    zeros = {f"model.layers.{i}.{m}.{p}.bias": torch.zeros(n) for i in range(2)
             for m, p, n in (("self_attn", "q_proj", 64), ("self_attn", "k_proj", 32), ("self_attn", "o_proj", 64),
                             ("mlp", "gate_proj", 128), ("mlp", "down_proj", 64))}
    path, deq = write_gptq(src, tmp_path / "gptq", extra=zeros)
    assert folovllm_greedy(path) == [hf_greedy(hf_reference(hf, deq), p, 10) for p in PROMPTS]
    bad, _ = write_gptq(src, tmp_path / "bad", extra={"model.layers.0.self_attn.q_proj.bias": torch.ones(64)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias.*has no place"):
        LLM(model=str(bad), device="cpu")


@pytest.mark.parametrize("overrides,match", [
    ({"bits": 3}, r"bits=3 is not supported"),
    ({"group_size": 48}, r"GPTQ layer model\.layers\.0\.self_attn\.qkv_proj: its input size per partition \(64\) "
                         r"is not divisible by group_size \(48\)"),
    ({"checkpoint_format": "awq"}, r"checkpoint_format 'awq' is not supported"),
])
def test_bad_quantization_config_is_a_clear_error(tiny_models, tmp_path, overrides, match):
    src, _ = tiny_models["llama"]
    path, _ = write_gptq(src, tmp_path / "gptq")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(overrides)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        LLM(model=str(path), device="cpu")


def test_missing_gptq_tensor_is_named(tiny_models, tmp_path):
    src, _ = tiny_models["llama"]
    path, _ = write_gptq(src, tmp_path / "gptq", drop="model.layers.1.mlp.up_proj.qzeros")
    with pytest.raises(ValueError, match=r"lacks 1 weight.*model\.layers\.1\.mlp\.gate_up_proj\.qzeros#1"):
        LLM(model=str(path), device="cpu")


def test_dummy_weights_run(tiny_models, tmp_path):
    src, _ = tiny_models["qwen3"]
    path, _ = write_gptq(src, tmp_path / "gptq")
    llm = LLM(model=str(path), device="cpu", load_format="dummy")
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(temperature=0.0, max_tokens=4,
                                                                          ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("act_order", [False, True], ids=["g32", "g32-actorder"])
def test_gptq_checkpoint_under_tensor_parallelism(tiny_models, tmp_path, act_order):
    """Two gloo ranks, each loading its shard of the GPTQ tensors (row-parallel layers whole
    groups of scales/zeros): the dequantized model's greedy tokens, as with one rank."""
    src, hf = tiny_models["llama"]
    path, deq = write_gptq(src, tmp_path / "gptq", 4, 32, act_order, False, "gptq")
    ref = hf_reference(hf, deq)
    expected = [hf_greedy(ref, p, 10) for p in PROMPTS]
    llm = LLM(model=str(path), device="cpu", tensor_parallel_size=2)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    finally:
        llm.llm_engine.shutdown()
