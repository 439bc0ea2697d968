"""GGUF loader vs. transformers' own GGUF loading, on tiny random models.

The test writes its own GGUF files (as llama.cpp's converter would) so it needs
no network; transformers reading the same file is the independent reference.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT

from folovllm.model_executor.model_loader import gguf_loader
from folovllm.model_executor.model_loader.gguf_loader import (
    SUPPORTED_ARCHITECTURES,
    iterate_gguf_weights,
    load_gguf_config,
    load_gguf_tokenizer,
)

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
# A tiny byte-level BPE vocabulary, padded to the model's vocab size like llama.cpp does.
TOKENS = ["a", "b", "c", "Ġ", "ab", "Ġab", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["a b", "Ġ ab"]


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # Same as llama.cpp convert_hf_to_gguf.py LlamaModel.permute.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model: transformers.PreTrainedModel, arch: str, path, qtype=QT.F32, tokenizer=False):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if tokenizer:
        tokens = TOKENS + [f"<pad{i}>" for i in range(cfg.vocab_size - len(TOKENS))]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges(MERGES)
        w.add_eos_token_id(TOKENS.index("<|im_end|>"))
        w.add_pad_token_id(TOKENS.index("<|endoftext|>"))
        w.add_chat_template(CHAT_TEMPLATE)

    name_map = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{name_map.get_name(base)}.{suffix}"
        data = t.float().numpy()
        if arch == "llama" and base.endswith("q_proj"):
            data = _llama_permute(data, cfg.num_attention_heads)
        elif arch == "llama" and base.endswith("k_proj"):
            data = _llama_permute(data, cfg.num_key_value_heads)
        if qtype != QT.F32 and data.ndim == 2:  # llama.cpp keeps 1-D norms/biases in F32
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny(arch: str, **kw) -> transformers.PreTrainedModel:
    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=12345.0,
    )
    cls_cfg = {
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
        "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
    }[arch]
    torch.manual_seed(0)
    model = cls_cfg[0](cls_cfg[1](**{**common, **kw})).eval()
    with torch.no_grad():  # random norms/biases, so a mixed-up name cannot pass by luck
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_()
    return model


CASES = {
    "qwen2-tied-f32": ("qwen2", QT.F32, dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-untied-bf16": ("qwen2", QT.BF16, dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-untied-f32": ("llama", QT.F32, dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-untied-q8_0": ("llama", QT.Q8_0, dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)),
    # transformers' qwen3 GGUF config ignores attention.key_length, so the reference
    # only works with Qwen3Config's default head_dim of 128.
    "qwen3-tied-q8_0": ("qwen3", QT.Q8_0, dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128, tie_word_embeddings=True)),
}


def _rope_theta(cfg):
    return cfg.rope_parameters["rope_theta"]


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case, tmp_path, monkeypatch):
    arch, qtype, kw = CASES[case]
    # Tiny tensors fit one read; shrink the chunk so the multi-chunk path runs too.
    monkeypatch.setattr(gguf_loader, "_CHUNK_BYTES", 1000)
    model = _tiny(arch, **kw)
    path = tmp_path / f"{case}.gguf"
    _write_gguf(model, arch, path, qtype, tokenizer=(arch == "qwen2"))

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ref_sd = ref.state_dict()
    orig_sd = model.state_dict()
    ours = dict(iterate_gguf_weights(str(path)))

    expected = set(orig_sd) - ({"lm_head.weight"} if kw["tie_word_embeddings"] else set())
    assert set(ours) == expected
    for name, t in ours.items():
        assert t.dtype == torch.float32 and t.shape == orig_sd[name].shape, name
        torch.testing.assert_close(t, ref_sd[name], rtol=0, atol=0, msg=name)
        if qtype == QT.F32:
            torch.testing.assert_close(t, orig_sd[name], rtol=0, atol=0, msg=name)
        else:  # BF16 / Q8_0 blocks: error within one 8-bit step of the largest value
            bound = orig_sd[name].abs().max().item() / 127 + 1e-6
            assert (t - orig_sd[name]).abs().max().item() <= bound, name

    cfg, want = load_gguf_config(str(path)), model.config
    assert cfg.model_type == arch
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(cfg, key) == getattr(want, key), key
    assert cfg.rms_norm_eps == pytest.approx(want.rms_norm_eps)
    assert _rope_theta(cfg) == pytest.approx(_rope_theta(want))
    if arch == "qwen3":
        assert cfg.head_dim == want.head_dim

    if arch == "qwen2":
        tok = load_gguf_tokenizer(str(path))
        assert tok.encode("ab ab", add_special_tokens=False) == [4, 5]
        assert tok.decode([4, 5]) == "ab ab"
        assert tok.chat_template == CHAT_TEMPLATE
        assert tok.eos_token == "<|im_end|>"  # the file's EOS, not the class default


def test_qwen3_head_dim_from_key_length(tmp_path):
    # Qwen3 checkpoints have head_dim != hidden_size / num_heads; the config must
    # take it from the GGUF metadata rather than Qwen3Config's default.
    model = _tiny("qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
    path = tmp_path / "q3.gguf"
    _write_gguf(model, "qwen3", path)
    assert load_gguf_config(str(path)).head_dim == 32
    orig_sd = model.state_dict()
    for name, t in iterate_gguf_weights(str(path)):
        torch.testing.assert_close(t, orig_sd[name], rtol=0, atol=0, msg=name)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    for fn in (load_gguf_config, load_gguf_tokenizer, iterate_gguf_weights):
        with pytest.raises(FileNotFoundError, match="nope.gguf"):
            fn(str(missing))


def test_corrupt_and_truncated(tmp_path):
    good = tmp_path / "good.gguf"
    _write_gguf(_tiny("qwen2", num_attention_heads=4, num_key_value_heads=2), "qwen2", good)
    data = good.read_bytes()
    bad = {
        "empty.gguf": b"",
        "text.gguf": b"<html>not a model</html>" * 10,
        "trunc_header.gguf": data[:200],
        "trunc_tensors.gguf": data[: len(data) - 1000],
    }
    for name, content in bad.items():
        p = tmp_path / name
        p.write_bytes(content)
        for fn in (load_gguf_config, iterate_gguf_weights):
            with pytest.raises(ValueError, match=rf"{name}.*corrupt.*Delete it"):
                fn(str(p))


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="gpt2.*supported: " + ", ".join(SUPPORTED_ARCHITECTURES)):
        iterate_gguf_weights(str(path))


def test_unexpected_tensor(tmp_path):
    path = tmp_path / "extra.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_head_count(2)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), np.float32))
    w.add_tensor("blk.0.mystery.weight", np.zeros((8, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="extra.gguf.*blk.0.mystery.weight"):
        iterate_gguf_weights(str(path))
