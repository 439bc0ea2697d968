"""The CPU decode path: rotary factors once per step, decode attention over slot-gathered K/V that
never reads an unwritten cache slot (the cache is not zeroed on CPU), the embedding table of a
GGUF file looked up in the file, loading without extra copies, and the tokenizer's build inputs
released."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from folovllm import LLM, SamplingParams
from folovllm.attention.backends.abstract import AttentionMetadata
from folovllm.attention.backends.torch_ref import TorchAttentionImpl

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _runner(llm):
    return llm.llm_engine.engine_core.executor.driver_worker.model_runner


# ---- rotary -------------------------------------------------------------------------------


def test_rotate_neox_is_rotary_embedding_bit_for_bit():
    from transformers import Qwen2Config

    from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding
    from folovllm.model_executor.models.llama import neox_factors, rotate_neox

    config = Qwen2Config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=1e6)
    rope = RotaryEmbedding(config, 64, 4096, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 4096, (37,), generator=g)
    factors = neox_factors(rope.cos_sin_cache, positions)
    for dtype in (torch.bfloat16, torch.float32):
        q = (torch.randn(37, 4 * 64, generator=g) * 3).to(dtype)
        k = (torch.randn(37, 2 * 64, generator=g) * 3).to(dtype)
        want_q, want_k = rope(positions, q, k)
        assert torch.equal(rotate_neox(q.view(37, 4, 64), *factors), want_q.view(37, 4, 64))
        assert torch.equal(rotate_neox(k.view(37, 2, 64), *factors), want_k.view(37, 2, 64))


ROPE_VARIANTS = {
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128),  # scales cos/sin too
    "linear": dict(rope_type="linear", factor=2.0),
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rotate_neox_follows_scaled_rope_tables(variant):
    """Rope scaling changes only the cos/sin table the fast path reads (frequencies, and yarn's
    attention factor folded into cos and sin), so it stays equal to RotaryEmbedding."""
    from transformers import LlamaConfig

    from folovllm.model_executor.layers.rotary_embedding import RotaryEmbedding
    from folovllm.model_executor.models.llama import neox_factors, rotate_neox

    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling=ROPE_VARIANTS[variant])
    rope = RotaryEmbedding(config, 32, 512, torch.bfloat16)
    default = RotaryEmbedding(LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=512),
                              32, 512, torch.bfloat16)
    assert not torch.equal(rope.cos_sin_cache, default.cos_sin_cache)  # the scaling is in effect
    g = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 512, (19,), generator=g)
    q, k = torch.randn(19, 4 * 32, generator=g), torch.randn(19, 2 * 32, generator=g)
    want_q, want_k = rope(positions, q, k)
    factors = neox_factors(rope.cos_sin_cache, positions)
    assert torch.equal(rotate_neox(q.view(19, 4, 32), *factors), want_q.view(19, 4, 32))
    assert torch.equal(rotate_neox(k.view(19, 2, 32), *factors), want_k.view(19, 2, 32))


@pytest.mark.parametrize("variant", ["llama3", "yarn"])
def test_a_scaled_rope_model_gives_transformers_tokens(tiny_models, tmp_path, variant):
    """The whole CPU path (rotary factors once per step, q and k rotated as one tensor) on a
    Llama with scaled rope, prompts past the original context of the scaling."""
    from conftest import build_tiny_model

    hf = build_tiny_model(tmp_path, "llama", rope_scaling=ROPE_VARIANTS[variant])
    llm = LLM(str(tmp_path), device="cpu", max_num_seqs=4)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (150, 7)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref


# ---- attention over the paged cache -------------------------------------------------------

H, KVH, D, BS = 4, 2, 16, 4


def _metadata(q_lens, seq_lens, block_table, slots) -> AttentionMetadata:
    qsl = torch.tensor([0, *np.cumsum(q_lens)], dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    return AttentionMetadata(num_actual_tokens=int(sum(q_lens)), num_reqs=len(q_lens), max_query_len=max(q_lens),
                             max_seq_len=max(seq_lens), query_start_loc=qsl, seq_lens=sl,
                             block_table=torch.tensor(block_table, dtype=torch.int32),
                             slot_mapping=torch.tensor(slots, dtype=torch.int64),
                             query_start_loc_cpu=qsl.clone(), seq_lens_cpu=sl.clone())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_attend_to_their_own_context_and_never_read_unwritten_slots(dtype):
    """Three decode rows of different context lengths and a prefill chunk, over blocks in no
    particular order; every slot no request has written holds NaN, so an output that read one
    (even masked: softmax weight 0 times NaN) would be NaN."""
    g = torch.Generator().manual_seed(0)
    num_blocks = 16
    cache = torch.full((2, num_blocks, BS, KVH, D), float("nan"), dtype=dtype)
    # request -> its blocks, context length after this step, query rows this step
    reqs = [([5, 2, 9], 11, 1), ([3], 2, 1), ([12, 0], 6, 3), ([7, 14, 1, 8], 13, 1)]
    max_blocks = 4
    table = [blocks + [15] * (max_blocks - len(blocks)) for blocks, _, _ in reqs]  # 15: stale, unwritten
    impl = TorchAttentionImpl(H, D, D ** -0.5, KVH)
    # The context before this step, written by earlier steps.
    ks = [torch.randn(n, KVH, D, generator=g).to(dtype) for _, n, _ in reqs]
    vs = [torch.randn(n, KVH, D, generator=g).to(dtype) for _, n, _ in reqs]
    slots, q_lens = [], []
    for (blocks, n, q), k, v in zip(reqs, ks, vs):
        for pos in range(n):
            slot = blocks[pos // BS] * BS + pos % BS
            if pos < n - q:
                cache[0].view(-1, KVH, D)[slot] = k[pos]
                cache[1].view(-1, KVH, D)[slot] = v[pos]
            else:
                slots.append(slot)
        q_lens.append(q)
    md = _metadata(q_lens, [n for _, n, _ in reqs], table, slots)
    query = torch.randn(sum(q_lens), H, D, generator=g).to(dtype)
    new_k = torch.cat([k[n - q:] for (_, n, q), k in zip(reqs, ks)])
    new_v = torch.cat([v[n - q:] for (_, n, q), v in zip(reqs, vs)])
    out = impl.forward(query, new_k, new_v, cache, md)

    assert not out.isnan().any()
    start = 0
    for (_, n, q), k, v in zip(reqs, ks, vs):
        qq = query[start:start + q].double().transpose(0, 1)                       # [H, q, D]
        kk = k.double().transpose(0, 1).repeat_interleave(H // KVH, dim=0)          # [H, n, D]
        vv = v.double().transpose(0, 1).repeat_interleave(H // KVH, dim=0)
        mask = torch.arange(n)[None, :] <= torch.arange(n - q, n)[:, None]
        want = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=D ** -0.5).transpose(0, 1)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[start:start + q].double(), want, atol=tol, rtol=tol)
        start += q


def test_the_cpu_cache_is_not_zeroed_and_nan_in_unwritten_slots_changes_no_token(tiny_models):
    """The engine's tokens for a batch of mixed lengths (decode rows padded to the longest) are
    the same when every cache slot starts as NaN."""
    path, _ = tiny_models["qwen2"]
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (3, 17, 40, 5, 1)]
    # No prefix caching: the second run must compute every slot it reads itself.
    llm = LLM(path, device="cpu", max_num_seqs=8, dtype="bfloat16", enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    for layer in _runner(llm).attn_layers:
        layer.kv_cache.fill_(float("nan"))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want


# ---- a GGUF file's embedding table --------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    from test_gguf_loader import _tiny, _write_gguf

    folder = tmp_path_factory.mktemp("gguf-rows")
    files = {}
    for qtype in (QT.F32, QT.BF16, QT.Q8_0):
        path = folder / f"untied-{qtype.name}.gguf"
        _write_gguf(_tiny("qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
                    "qwen2", path, qtype, tokenizer=True)
        files[qtype.name] = str(path)
    tied = folder / "tied.gguf"
    _write_gguf(_tiny("qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                "qwen2", tied, QT.Q8_0, tokenizer=True)
    files["tied"] = str(tied)
    return files


@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_rows_from_the_file_equal_the_loaded_table(gguf_files, qtype, dtype):
    from folovllm.model_executor.model_loader.gguf_loader import GGUFEmbeddingRows, iterate_gguf_weights

    path = gguf_files[qtype]
    table = dict(iterate_gguf_weights(path, dtype))["model.embed_tokens.weight"]  # what loading holds
    rows = GGUFEmbeddingRows(path, "model.embed_tokens.weight", dtype, cache_rows=6)
    ids = torch.tensor([[3, 7, 3, 95], [0, 12, 12, 50]])  # 6 distinct: they fill the cache
    for _ in range(2):  # the second time from the cache
        got = rows(ids)
        assert got.shape == (2, 4, table.shape[1]) and got.dtype == dtype
        assert torch.equal(got, table[ids])
    assert sorted(rows._slot_of) == [0, 3, 7, 12, 50, 95]
    assert torch.equal(rows(torch.tensor([1, 2])), table[[1, 2]])  # evicts the two used longest ago
    assert sorted(rows._slot_of) == [0, 1, 2, 12, 50, 95]
    assert torch.equal(rows(ids), table[ids])
    many = torch.arange(20)  # more distinct rows than the cache holds
    assert torch.equal(rows(many), table[many])
    with pytest.raises(IndexError):
        rows(torch.tensor([96]))


def test_a_gguf_model_on_cpu_looks_its_embeddings_up_in_the_file(gguf_files):
    from folovllm.model_executor.model_loader import gguf_loader

    prompts = [{"prompt_token_ids": p} for p in ([5, 6, 7, 8], [9, 10, 11, 12, 13, 14])]
    llm = LLM(gguf_files["Q8_0"], device="cpu")
    model = _runner(llm).model
    assert isinstance(model.model.embedding_rows, gguf_loader.GGUFEmbeddingRows)
    assert model.model.embed_tokens.weight.numel() == 0  # the table is not held
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]

    # The same model with the table in memory gives the same tokens.
    rows = model.model.embedding_rows
    model.model.embed_tokens.weight.data = rows.read_rows(list(range(rows.num_rows)))
    model.model.embedding_rows = None
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == got

    # A tied model's head is built from the table: it keeps it.
    tied = _runner(LLM(gguf_files["tied"], device="cpu")).model
    assert tied.model.embedding_rows is None and tied.model.embed_tokens.weight.numel() > 0


def test_skipped_gguf_tensors_are_not_read(gguf_files, monkeypatch):
    from folovllm.model_executor.model_loader import gguf_loader

    read = []
    real = gguf_loader._read_dequantized
    monkeypatch.setattr(gguf_loader, "_read_dequantized", lambda fd, t, dtype: read.append(t.name) or real(fd, t, dtype))
    names = [n for n, _ in gguf_loader.iterate_gguf_weights(gguf_files["F32"], skip=frozenset(["model.embed_tokens.weight"]))]
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" in names
    assert "token_embd.weight" not in read and "output.weight" in read


# ---- loading --------------------------------------------------------------------------------


def test_a_whole_weight_is_quantized_from_the_loaded_tensor_not_a_copy(monkeypatch):
    from folovllm.model_executor.layers.linear import QKVParallelLinear, ReplicatedLinear
    from folovllm.model_executor.layers.quantization.int8 import Int8Config, Int8LinearMethod

    seen = []
    real = Int8LinearMethod.quantize
    monkeypatch.setattr(Int8LinearMethod, "quantize",
                        lambda self, layer: seen.append(layer.weight.data_ptr()) or real(self, layer))
    layer = ReplicatedLinear(64, 32, params_dtype=torch.bfloat16, quant_config=Int8Config(), prefix="x")
    w = torch.randn(32, 64).to(torch.bfloat16)
    layer.weight.weight_loader(layer.weight, w)
    assert seen == [w.data_ptr()] and layer.weight.numel() == 0
    y = layer(torch.randn(3, 64).to(torch.bfloat16))
    assert y.shape == (3, 32)

    # A merged layer's parts are copied into place as before.
    seen.clear()
    qkv = QKVParallelLinear(64, 16, 4, 2, params_dtype=torch.bfloat16, quant_config=Int8Config(), prefix="qkv")
    merged = qkv.weight.data_ptr()
    for shard, rows in (("q", 64), ("k", 32), ("v", 32)):
        qkv.weight.weight_loader(qkv.weight, torch.randn(rows, 64).to(torch.bfloat16), shard)
    assert seen == [merged]


# ---- the tokenizer --------------------------------------------------------------------------


def test_the_tokenizer_drops_the_python_vocabulary_it_was_built_from(gguf_files):
    from folovllm.config import ModelConfig
    from folovllm.engine.tokenizer import load_tokenizer
    from folovllm.model_executor.model_loader.gguf_loader import load_gguf_tokenizer

    path = gguf_files["F32"]
    fresh = load_gguf_tokenizer(path)
    assert hasattr(fresh, "_vocab") and hasattr(fresh, "_merges")
    tok = load_tokenizer(ModelConfig(path))
    assert type(tok) is type(fresh) and not hasattr(tok, "_vocab") and not hasattr(tok, "_merges")
    text = "ab ab<|im_end|>cab"
    assert tok.encode(text) == fresh.encode(text)
    ids = fresh.encode(text)
    assert tok.decode(ids) == fresh.decode(ids) and len(tok) == len(fresh)
    assert tok.eos_token == fresh.eos_token


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embedding_rows_of_the_real_model_equal_its_loaded_table(dtype):
    """The real file's table is Q5_0 (the tiny files above are F32, BF16 and Q8_0)."""
    from folovllm.assets import fetch_default_model
    from folovllm.model_executor.model_loader.gguf_loader import (GGUFEmbeddingRows, _hf_name, _open,
                                                                  iterate_gguf_weights)

    path = str(fetch_default_model())
    name = "model.embed_tokens.weight"
    others = frozenset(_hf_name(t.name) for t in _open(path).tensors) - {name}
    [(_, table)] = list(iterate_gguf_weights(path, dtype, skip=others))
    rows = GGUFEmbeddingRows(path, name, dtype, cache_rows=64)
    assert rows.qtype.name == "Q5_0" and (rows.num_rows, rows.dim) == tuple(table.shape)
    ids = torch.tensor([0, 1, 151935, 75000, 13, 151643, 1000, 13])
    assert torch.equal(rows(ids), table[ids])
    every = torch.arange(0, rows.num_rows, 97)  # more than the cache: read straight from the file
    assert torch.equal(rows(every), table[every])


def test_the_embedding_table_stays_in_memory_where_the_file_cannot_serve_it():
    """Only a GGUF model on CPU, on one rank, with an LM head that does not read the table."""
    from types import SimpleNamespace

    from torch import nn

    from folovllm.model_executor.model_loader import EMBEDDING_WEIGHT, embedding_from_file

    def model(tp_size=1, tied=False):
        embed = SimpleNamespace(weight=nn.Parameter(torch.empty(4, 2)), tp_size=tp_size)
        head = SimpleNamespace(weight=embed.weight if tied else nn.Parameter(torch.empty(4, 2)))
        return SimpleNamespace(model=SimpleNamespace(embed_tokens=embed, embedding_rows=None), lm_head=head)

    gguf = SimpleNamespace(load_format="auto", model="m.gguf")
    cpu = torch.device("cpu")
    assert embedding_from_file(model(), gguf, cpu) == EMBEDDING_WEIGHT
    assert embedding_from_file(model(tp_size=2), gguf, cpu) is None
    assert embedding_from_file(model(tied=True), gguf, cpu) is None
    assert embedding_from_file(model(), gguf, torch.device("meta")) is None
    assert embedding_from_file(model(), SimpleNamespace(load_format="auto", model="folder"), cpu) is None
