"""The tensor-parallel split of the model (folovllm/model_executor/layers/linear.py,
folovllm/distributed/parallel_state.py).

Each rank's shard is built and loaded in this process under fake_tensor_model_parallel and
compared with slices of the Hugging Face tensors worked out by hand; the last test runs two real
ranks over gloo and checks their logits against transformers, which exercises the all-reduce of
the row-parallel layers and the bias that only one rank may add."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from conftest import TINY, build_biased_model, build_tiny_model
from folovllm.attention.backends.torch_ref import TorchAttentionImpl
from folovllm.attention.layer import Attention
from folovllm.distributed import parallel_state as ps
from folovllm.model_executor.model_loader import get_model

REPO = Path(__file__).resolve().parents[2]
H, KVH, HIDDEN, INTER = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["hidden_size"], \
    TINY["intermediate_size"]

# (tp, rank) -> the checkpoint's heads that rank holds, by hand: 4 query heads and 2 KV heads.
# At tp=4 there are fewer KV heads than ranks, so ranks 0-1 share KV head 0 and ranks 2-3 head 1.
Q_HEADS = {(2, 0): [0, 1], (2, 1): [2, 3], (4, 0): [0], (4, 1): [1], (4, 2): [2], (4, 3): [3]}
KV_HEADS = {(2, 0): [0], (2, 1): [1], (4, 0): [0], (4, 1): [0], (4, 2): [1], (4, 3): [1]}
RANKS = sorted(Q_HEADS)


@pytest.fixture(scope="module")
def models(biased_tiny_models):
    return biased_tiny_models


def model_config(path, **kw):
    """Stands in for the resolved ModelConfig that get_model takes."""
    fields = dict(model=str(path), hf_config=AutoConfig.from_pretrained(path), dtype=torch.float32,
                  quantization=None, hf_quant_config=None, seed=0, load_format="auto")
    fields.update(kw)
    return types.SimpleNamespace(**fields)


def load_rank(path, tp: int, rank: int):
    with ps.fake_tensor_model_parallel(tp, rank):
        return get_model(model_config(path), TorchAttentionImpl, torch.device("cpu"))


def heads(t: torch.Tensor, which: list[int], head_dim: int, dim: int = 0) -> torch.Tensor:
    return torch.cat([t.narrow(dim, h * head_dim, head_dim) for h in which], dim=dim)


def rows(t: torch.Tensor, tp: int, rank: int, dim: int = 0) -> torch.Tensor:
    size = t.shape[dim] // tp
    return t.narrow(dim, rank * size, size)


# ---- the group state ----------------------------------------------------------------------------

@pytest.fixture
def uninitialized(monkeypatch):
    """parallel_state as a fresh process has it (an engine built earlier in this process has
    initialized it at size 1)."""
    monkeypatch.setattr(ps, "_TP", None)
    monkeypatch.setattr(ps, "_WORLD", None)


def test_default_state_is_one_rank_and_collectives_are_identity(uninitialized):
    assert not ps.model_parallel_is_initialized()
    assert (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()) == (1, 0)
    assert ps.get_tp_group().world_size == 1
    x = torch.randn(3, 5)
    assert ps.tensor_model_parallel_all_reduce(x) is x
    assert ps.tensor_model_parallel_all_gather(x) is x
    assert ps.tensor_model_parallel_all_gather(x, dim=0) is x


def test_initialize_at_size_one_needs_no_torch_distributed(uninitialized):
    ps.init_distributed_environment(1, 0)
    ps.initialize_model_parallel(1)
    try:
        assert ps.model_parallel_is_initialized() and not torch.distributed.is_initialized()
        assert ps.get_tensor_model_parallel_world_size() == 1
        x = torch.randn(4)
        assert ps.tensor_model_parallel_all_reduce(x) is x
    finally:
        ps.destroy_distributed_environment()
    assert not ps.model_parallel_is_initialized()
    with pytest.raises(RuntimeError, match="init_distributed_environment"):
        ps.initialize_model_parallel(2)


def test_fake_group_sets_size_and_rank_and_refuses_collectives():
    with ps.fake_tensor_model_parallel(4, 3):
        assert (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()) == (4, 3)
        with pytest.raises(RuntimeError, match="fake_tensor_model_parallel"):
            ps.tensor_model_parallel_all_reduce(torch.ones(2))
        with pytest.raises(RuntimeError, match="fake_tensor_model_parallel"):
            ps.tensor_model_parallel_all_gather(torch.ones(2))
    assert ps.get_tensor_model_parallel_world_size() == 1
    with pytest.raises(ValueError, match="rank"):
        with ps.fake_tensor_model_parallel(2, 2):
            pass


# ---- each rank's shard ----------------------------------------------------------------------

@pytest.mark.parametrize("tp,rank", RANKS)
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_rank_holds_its_slices_of_the_checkpoint(models, arch, tp, rank):
    path, hf = models[arch]
    ref = hf.state_dict()
    model = load_rank(path, tp, rank)
    ours = dict(model.named_parameters())
    head_dim = getattr(hf.config, "head_dim", None) or HIDDEN // H
    q_heads, kv_heads = Q_HEADS[tp, rank], KV_HEADS[tp, rank]
    for i in range(TINY["num_hidden_layers"]):
        hf_l, l = f"model.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q = ref.get(f"{hf_l}self_attn.q_proj.{kind}")
            if q is None:
                assert f"{l}self_attn.qkv_proj.{kind}" not in ours
                continue
            k, v = ref[f"{hf_l}self_attn.k_proj.{kind}"], ref[f"{hf_l}self_attn.v_proj.{kind}"]
            expected = torch.cat([heads(q, q_heads, head_dim), heads(k, kv_heads, head_dim),
                                  heads(v, kv_heads, head_dim)])
            assert torch.equal(ours[f"{l}self_attn.qkv_proj.{kind}"], expected), (kind, i)
        # o_proj takes this rank's heads as input columns; its output (and bias) is whole.
        assert torch.equal(ours[f"{l}self_attn.o_proj.weight"],
                           heads(ref[f"{hf_l}self_attn.o_proj.weight"], q_heads, head_dim, dim=1))
        for kind in ("weight", "bias"):
            gate, up = ref.get(f"{hf_l}mlp.gate_proj.{kind}"), ref.get(f"{hf_l}mlp.up_proj.{kind}")
            if gate is not None:
                assert torch.equal(ours[f"{l}mlp.gate_up_proj.{kind}"],
                                   torch.cat([rows(gate, tp, rank), rows(up, tp, rank)]))
        assert torch.equal(ours[f"{l}mlp.down_proj.weight"], rows(ref[f"{hf_l}mlp.down_proj.weight"], tp, rank, 1))
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            bias = ref.get(f"{hf_l}{proj}.bias")
            assert (bias is None) == (ours.get(f"{l}{proj}.bias") is None)
            if bias is not None:
                assert torch.equal(ours[f"{l}{proj}.bias"], bias)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(ours[f"{l}{norm}.weight"], ref[f"{hf_l}{norm}.weight"])
    # The embedding and the LM head by vocabulary: rows [r*P, (r+1)*P), P = ceil(V / tp), the
    # rows past the vocabulary (last rank) zero.
    for ours_w, key in ((model.model.embed_tokens.weight, "model.embed_tokens.weight"),
                        (model.lm_head.weight, "lm_head.weight")):
        full = ref[key]
        per = -(-full.shape[0] // tp)
        want = torch.zeros(per, full.shape[1], dtype=full.dtype)
        part = full[rank * per:(rank + 1) * per]
        want[:part.shape[0]] = part
        assert torch.equal(ours_w, want), key


@pytest.mark.parametrize("tp,rank", RANKS)
def test_attention_layers_get_this_ranks_head_counts(tiny_models, tp, rank):
    path, hf = tiny_models["qwen3"]
    model = load_rank(path, tp, rank)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(layers) == TINY["num_hidden_layers"]
    # 4 query heads over tp ranks; 2 KV heads split at tp=2, one (replicated) per rank at tp=4.
    expected_kv = {2: 1, 4: 1}[tp]
    for layer in layers:
        assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (H // tp, expected_kv, 32)
        assert (layer.impl.num_heads, layer.impl.num_kv_heads) == (H // tp, expected_kv)
    assert layers[0].layer_name == "model.layers.0.self_attn.attn"


def test_kv_heads_split_when_there_are_more_than_ranks(tmp_path):
    build_tiny_model(tmp_path, "llama", num_attention_heads=8, num_key_value_heads=4)
    for rank in range(2):
        model = load_rank(tmp_path, 2, rank)
        attn = model.model.layers[0].self_attn.attn
        assert (attn.num_heads, attn.num_kv_heads) == (4, 2)


def linear_bytes(model) -> dict[str, int]:
    out = {}
    for name, p in model.named_parameters():
        for proj in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            if f".{proj}." in name:
                out[proj] = out.get(proj, 0) + p.numel() * p.element_size()
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_linears_hold_one_tp_th_of_the_bytes(tiny_models, tp):
    path, hf = tiny_models["llama"]
    whole = linear_bytes(get_model(model_config(path), TorchAttentionImpl, torch.device("cpu")))
    head_dim, layers, f32 = HIDDEN // H, TINY["num_hidden_layers"], 4
    for rank in range(tp):
        shard = linear_bytes(load_rank(path, tp, rank))
        for proj in ("o_proj", "gate_up_proj", "down_proj"):
            assert shard[proj] * tp == whole[proj], proj
        if KVH >= tp:
            assert shard["qkv_proj"] * tp == whole["qkv_proj"]
        else:  # one query head, plus one replicated K and one V head
            assert shard["qkv_proj"] == layers * (H // tp + 2) * head_dim * HIDDEN * f32
    assert sum(whole.values()) == layers * (HIDDEN * (H + 2 * KVH) * head_dim + H * head_dim * HIDDEN
                                            + 3 * HIDDEN * INTER) * f32


def test_indivisible_heads_are_a_clear_error(tiny_models):
    path, _ = tiny_models["llama"]
    with pytest.raises(ValueError,
                       match=r"num_attention_heads \(4\) is not divisible by the tensor-parallel size \(8\)"):
        load_rank(path, 8, 0)
    with pytest.raises(ValueError, match=r"tensor-parallel size \(3\)"):
        load_rank(path, 3, 0)


def test_wrong_shape_names_the_tensor_under_tp(tmp_path):
    """A checkpoint with more heads than config.json must not be silently narrowed to fit."""
    build_tiny_model(tmp_path, "llama")
    cfg = AutoConfig.from_pretrained(tmp_path)
    cfg.num_key_value_heads = 1
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(32, 64\), but the model config implies "
                                         r"\(16, 64\): the weights do not match config.json"):
        load_rank(tmp_path, 2, 1)


# ---- two real ranks over gloo ---------------------------------------------------------------

RANK_SCRIPT = textwrap.dedent("""
    import sys, types
    import torch
    from transformers import AutoConfig
    from folovllm.attention.backends.torch_ref import TorchAttentionImpl
    from folovllm.distributed import parallel_state as ps
    from folovllm.model_executor.model_loader import get_model

    rank, port, out, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    torch.set_num_threads(1)
    ps.init_distributed_environment(2, rank, f"tcp://127.0.0.1:{port}", backend="gloo")
    ps.initialize_model_parallel(2)
    assert (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()) == (2, rank)
    reduced = ps.tensor_model_parallel_all_reduce(torch.full((2, 3), rank + 1.0))
    gathered = ps.tensor_model_parallel_all_gather(torch.full((2, 1), float(rank)), dim=-1)
    result = {"reduced": reduced, "gathered": gathered}
    ids = torch.tensor([5, 17, 99, 3, 250, 7, 64, 31, 12])
    for i, path in enumerate(paths):
        mc = types.SimpleNamespace(model=path, hf_config=AutoConfig.from_pretrained(path), dtype=torch.float32,
                                   quantization=None, hf_quant_config=None, seed=0, load_format="auto")
        model = get_model(mc, TorchAttentionImpl, torch.device("cpu"))
        with torch.inference_mode():
            result[i] = model.compute_logits(model(ids, torch.arange(len(ids)), None))
    torch.save(result, f"{out}/rank{rank}.pt")
    ps.destroy_distributed_environment()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_transformers(tiny_models, tmp_path):
    # qwen3: 2 KV heads split over the ranks, tied embeddings. llama with biases on o_proj and
    # down_proj (row-parallel: only rank 0 may add them) and one KV head, replicated on both ranks.
    llama_path = tmp_path / "llama-bias-1kv"
    llama = build_biased_model(llama_path, "llama", num_key_value_heads=1, attention_bias=True, mlp_bias=True)
    paths = [tiny_models["qwen3"][0], str(llama_path)]
    refs = [tiny_models["qwen3"][1], llama]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(port), str(tmp_path), *paths],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    ids = torch.tensor([[5, 17, 99, 3, 250, 7, 64, 31, 12]])
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(result["reduced"], torch.full((2, 3), 3.0))
        assert torch.equal(result["gathered"], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        for i, ref in enumerate(refs):
            with torch.inference_mode():
                expected = ref(ids).logits[0]
            torch.testing.assert_close(result[i], expected, atol=1e-4, rtol=0)


def test_merged_layer_refuses_a_tensor_for_all_parts_at_once():
    from folovllm.model_executor.layers.linear import MergedColumnParallelLinear

    layer = MergedColumnParallelLinear(8, [4, 4], prefix="model.layers.0.mlp.gate_up_proj")
    with pytest.raises(ValueError, match="every part of the merged layer model.layers.0.mlp.gate_up_proj"):
        layer.weight_loader(layer.weight, torch.zeros(8, 8), None, "model.layers.0.mlp.gate_up_proj.weight")
