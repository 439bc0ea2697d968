"""GPTQ checkpoints through the engine on a GPU: the Triton kernels (GEMV for one row, the swap
kernel up to SWAP_MAX_ROWS rows, dequantize-then-cuBLAS above), captured in CUDA graphs, against
transformers running the same model with every quantized weight replaced by its dequantized
value (float32). The checkpoint is written by tests/integration/test_gptq_load.py's writer, from
the format's definition."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import CountedKernel

from folovllm import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N_NEW = 16


def _writer():
    path = Path(__file__).parents[1] / "integration" / "test_gptq_load.py"
    spec = importlib.util.spec_from_file_location("gptq_checkpoint_writer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from conftest import build_tiny_model
    path = tmp_path_factory.mktemp("gptq-gpu-qwen3")
    # hidden 256 and intermediate 512: two groups of 128 per input, as the 128-row K tiles need
    build_tiny_model(path, "qwen3", vocab_size=2048, hidden_size=256, intermediate_size=512,
                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                     max_position_embeddings=4096, initializer_range=0.05)
    return str(path)


@pytest.mark.parametrize("act_order,sym,fmt", [(False, True, "gptq"), (True, False, "gptq_v2")],
                         ids=["g128", "g128-actorder-asym"])
def test_gptq_engine_on_gpu_agrees_with_the_dequantized_model(float_model, tmp_path, monkeypatch, act_order,
                                                              sym, fmt):
    from transformers import AutoModelForCausalLM

    from folovllm.model_executor.layers.quantization.kernels import gptq_triton as gq

    w = _writer()
    path, deq = w.write_gptq(float_model, tmp_path / "gptq", 4, 128, act_order, sym, fmt)
    hf = AutoModelForCausalLM.from_pretrained(float_model, dtype=torch.float32).eval()
    ref_model = w.hf_reference(hf, deq).cuda()
    kernels = {name: CountedKernel(getattr(gq, name)) for name in ("_gptq_gemv_kernel", "_gptq_swap_kernel")}
    for name, counted in kernels.items():
        monkeypatch.setattr(gq, name, counted)

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 2048, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 200, (40,), generator=g)]
    llm = LLM(str(path), device="cuda", dtype="bfloat16", max_model_len=1024, num_gpu_blocks_override=512)
    params = SamplingParams(temperature=0.0, max_tokens=N_NEW, ignore_eos=True)
    agree = total = 0
    for batch in (prompts[:1], prompts[1:9], prompts):  # decode steps of 1, 8 and 40 rows
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        for prompt, out in zip(batch, outs):
            toks = out.outputs[0].token_ids
            seq = torch.tensor([prompt + toks], device="cuda")
            with torch.inference_mode():  # teacher-forced: the reference's top-1 at every position
                ref = ref_model(seq).logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(toks, ref))
            total += len(toks)
    assert agree / total >= 0.95, f"top-1 agreement {agree}/{total}"
    assert all(k.launches > 0 for k in kernels.values()), {n: k.launches for n, k in kernels.items()}
