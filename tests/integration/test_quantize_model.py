"""The quantizer end to end on tiny random models: what the writer saves dequantizes (by the
format's definition, unpacked here by hand) to exactly the weights the quantizer chose, the
GPTQ model's logits stay close to the float model's and closer than round-to-nearest's, and
`folovllm quantize` writes the standard layout or fails with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_biased_model, build_tiny_model, build_tiny_tokenizer
from gptq_reference import hand_dequant
from folovllm.entrypoints.cli import main
from folovllm.quantization import calib, pack
from folovllm.quantization.quantize_model import quantize_layers, quantize_model

QUANTIZED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def correlate_embeddings(model, path, seed=3):
    """Random embeddings are independent features, on which GPTQ has nothing to exploit; mix
    them so that hidden features correlate, as in a trained model."""
    gen = torch.Generator().manual_seed(seed)
    H = model.config.hidden_size
    A = torch.randn(H, H, generator=gen) * torch.logspace(0, -2, H)[:, None]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.randn(model.config.vocab_size, H, generator=gen) @ A)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant-src-qwen3")
    model = correlate_embeddings(build_tiny_model(path, "qwen3"), path)
    build_tiny_tokenizer().save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def llama_bias(tmp_path_factory):
    """Llama with a random bias on every projection (the writer must carry them)."""
    path = tmp_path_factory.mktemp("quant-src-llama")
    model = build_biased_model(path, "llama", attention_bias=True, mlp_bias=True)
    return str(path), correlate_embeddings(model, path)


def load_dequantized(src: str, out: str, bits: int, fmt: str):
    """The source model with every quantized linear replaced by the test's own dequantization of
    the saved tensors."""
    from transformers import AutoModelForCausalLM

    tensors = load_file(str(Path(out) / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if f"{name}.qweight" in tensors:
                mod.weight.copy_(hand_dequant(tensors, name, bits, fmt))
                n += 1
    assert n == 7 * model.config.num_hidden_layers
    return model


def test_saved_tensors_dequantize_to_the_quantizers_weights(qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    src, _ = qwen3
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = calib.random_samples(320, 8, 32, seed=1)
    for fmt, desc_act, sym in (("gptq", True, False), ("gptq_v2", False, True)):
        quantized, errors = quantize_layers(hf, ids, bits=4, group_size=32, desc_act=desc_act, sym=sym,
                                            progress=False)
        assert sorted(quantized) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in QUANTIZED)
        assert all(0 < e < 0.1 for e in errors.values()), errors
        cfg = pack.quantization_config(bits=4, group_size=32, desc_act=desc_act, sym=sym, damp=0.01,
                                       checkpoint_format=fmt)
        out = tmp_path / fmt
        pack.write_checkpoint(out, src, quantized=quantized, tensors={}, quant_config=cfg)
        saved = load_file(str(out / "model.safetensors"))
        modules = dict(hf.named_modules())
        for prefix in quantized:
            # the weight the quantizer left in the model (what the next layer was calibrated on)
            assert torch.equal(hand_dequant(saved, prefix, 4, fmt), modules[prefix].weight)


def test_each_linear_is_calibrated_on_the_quantized_model(qwen3):
    """True sequential: a linear's inputs depend only on what comes before it, so every linear
    must have been quantized from the inputs it sees in the finished quantized model (earlier
    linears of its layer and every earlier layer quantized). Redo GPTQ from those inputs: the
    same codes come out."""
    from transformers import AutoModelForCausalLM

    from folovllm.quantization.gptq import GPTQ

    src, _ = qwen3
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    original = {n: m.weight.detach().clone() for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = calib.random_samples(320, 8, 32, seed=2)
    quantized, _ = quantize_layers(hf, ids, bits=4, group_size=32, sym=False, progress=False)
    gptqs = {p: GPTQ(hf.get_submodule(p).in_features) for p in quantized}
    handles = [hf.get_submodule(p).register_forward_hook(lambda m, a, o, g=g: g.add_batch(a[0]))
               for p, g in gptqs.items()]
    with torch.no_grad():
        hf(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    for prefix, q in quantized.items():
        redo = gptqs[prefix].quantize(original[prefix], bits=4, group_size=32, sym=False)
        same = (redo.qweight == q.qweight).float().mean().item()
        assert same > 0.995, (prefix, same)


def relative_logit_error(model, ref_logits, ids) -> float:
    with torch.no_grad():
        out = model(ids).logits
    return float((out - ref_logits).norm() / ref_logits.norm())


@pytest.mark.parametrize("arch", ["qwen3", "llama_bias"])
def test_gptq_logits_close_and_closer_than_rtn(arch, request, tmp_path):
    src, model = request.getfixturevalue(arch)
    ids = calib.random_samples(320, 4, 64, seed=123)  # not the calibration ids (seed 0)
    with torch.no_grad():
        ref = model(ids).logits
    err = {}
    for method in ("gptq", "rtn"):
        out = tmp_path / method
        quantize_model(src, out, bits=4, group_size=32, method=method, sym=False, calib_random=True,
                       calib_samples=16, calib_seq_len=64, progress=False)
        err[method] = relative_logit_error(load_dequantized(src, str(out), 4, "gptq"), ref, ids)
    print(f"{arch}: relative logit error GPTQ {err['gptq']:.3f}, RTN {err['rtn']:.3f}")
    assert err["gptq"] < 0.25
    assert err["gptq"] < 0.85 * err["rtn"], err


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["quantize", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("bits,fmt,flags", [(4, "gptq", []), (8, "gptq_v2", ["--desc-act", "--no-sym"])])
def test_cli_writes_the_standard_layout(bits, fmt, flags, llama_bias, capsys, tmp_path):
    src, model = llama_bias
    out = tmp_path / "out"
    rc, stdout, _ = run_cli(capsys, "--model", src, "--output", str(out), "--bits", str(bits),
                            "--group-size", "32", "--checkpoint-format", fmt, "--calib-random",
                            "--calib-samples", "4", "--calib-seq-len", "32", "--no-progress", *flags)
    assert rc == 0
    summary = json.loads(stdout)
    assert summary["num_quantized"] == 14 and summary["max_relative_output_error"] < 0.1

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": bool(flags), "sym": not flags,
        "damp_percent": 0.01, "checkpoint_format": fmt, "true_sequential": True}
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "generation_config.json").is_file()

    t = load_file(str(out / "model.safetensors"))
    src_t = load_file(str(Path(src) / "model.safetensors"))
    p = 32 // bits
    for i in range(2):
        for name in QUANTIZED:
            prefix = f"model.layers.{i}.{name}"
            lin = model.get_submodule(prefix)
            K, N, G = lin.in_features, lin.out_features, lin.in_features // 32
            assert f"{prefix}.weight" not in t
            assert t[f"{prefix}.qweight"].shape == (K // p, N) and t[f"{prefix}.qweight"].dtype == torch.int32
            assert t[f"{prefix}.qzeros"].shape == (G, N // p) and t[f"{prefix}.qzeros"].dtype == torch.int32
            assert t[f"{prefix}.scales"].shape == (G, N) and t[f"{prefix}.scales"].dtype == torch.float16
            assert t[f"{prefix}.g_idx"].shape == (K,) and t[f"{prefix}.g_idx"].dtype == torch.int32
            g_idx = t[f"{prefix}.g_idx"].long()
            if flags:  # act-order: every group still holds group_size rows, in another order
                assert torch.equal(torch.bincount(g_idx, minlength=G), torch.full((G,), 32))
            else:
                assert torch.equal(g_idx, torch.arange(K) // 32)
            assert torch.equal(t[f"{prefix}.bias"], src_t[f"{prefix}.bias"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.1.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"):
        assert torch.equal(t[name], src_t[name])
    assert set(t) == {k for k in src_t if not any(k == f"model.layers.{i}.{n}.weight" for i in range(2)
                                                  for n in QUANTIZED)} | {
        f"model.layers.{i}.{n}.{s}" for i in range(2) for n in QUANTIZED
        for s in ("qweight", "qzeros", "scales", "g_idx")}


def test_cli_without_bias_and_with_a_calibration_file(qwen3, capsys, tmp_path):
    src, _ = qwen3
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "--model", src, "--output", str(out), "--group-size", "-1",
                         "--calib-file", str(text), "--calib-samples", "4", "--calib-seq-len", "64",
                         "--no-progress")
    assert rc == 0, err
    t = load_file(str(out / "model.safetensors"))
    assert not [k for k in t if k.endswith(".bias")]
    assert "lm_head.weight" not in t  # tied to the embeddings, as in the source
    assert t["model.layers.0.mlp.down_proj.scales"].shape == (1, 64)
    assert torch.all(t["model.layers.0.mlp.down_proj.g_idx"] == 0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (Path(src) / name).read_bytes()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == -1


@pytest.mark.parametrize("args,message", [
    (["--bits", "3"], "bits must be 4 or 8"),
    (["--group-size", "48"],
     "group_size 48 does not divide the input size 64 of model.layers.0.self_attn.q_proj"),
    (["--method", "rtn", "--group-size", "0"], "group_size must be positive or -1"),
])
def test_cli_bad_arguments(args, message, llama_bias, capsys, tmp_path):
    src, _ = llama_bias
    rc, _, err = run_cli(capsys, "--model", src, "--output", str(tmp_path / "out"), "--calib-random",
                         "--no-progress", *args)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_cli_missing_model(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert rc == 2 and "not a model folder" in err


def test_quantized_model_generates_and_serves_on_cpu(qwen3, tmp_path):
    """End to end: `folovllm quantize` (GPTQ, act-order, v1 zeros), then the folder through LLM
    and through the OpenAI server. Greedy tokens equal transformers' on the test's own
    dequantization of the saved tensors."""
    from starlette.testclient import TestClient

    from folovllm import LLM, SamplingParams
    from folovllm.engine.arg_utils import EngineArgs
    from folovllm.engine.async_llm import AsyncLLM
    from folovllm.entrypoints.openai.api_server import build_app

    src, _ = qwen3
    out = tmp_path / "gptq"
    assert main(["quantize", "--model", src, "--output", str(out), "--bits", "4", "--group-size", "32",
                 "--desc-act", "--calib-random", "--calib-samples", "8", "--calib-seq-len", "32",
                 "--no-progress"]) == 0
    ref = load_dequantized(src, str(out), 4, "gptq")
    prompt = [5, 17, 42, 99, 7]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                            pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(str(out), device="cpu")
    got = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert got == want

    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(out), device="cpu"), engine_core="thread")
    try:
        with TestClient(build_app(engine, "gptq")) as client:
            r = client.post("/v1/completions", json={"model": "gptq", "prompt": prompt, "max_tokens": 8,
                                                     "temperature": 0.0, "ignore_eos": True,
                                                     "return_token_ids": True})
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want
    finally:
        engine.shutdown()
