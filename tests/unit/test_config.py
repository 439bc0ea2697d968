"""One resolved configuration: the model's facts are read once when ModelConfig is built, the
device-dependent ones when EngineConfig is, and EngineArgs / the command line are derived from the
config dataclasses instead of repeating them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from folovllm.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from folovllm.config import cpu_has_native_bf16 as _cpu_has_native_bf16  # bound before the autouse pin
from folovllm.engine.arg_utils import EngineArgs
from folovllm.entrypoints.cli import build_parser

CONFIGS = [ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig]


def init_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def test_engine_args_are_the_configs_fields_with_their_defaults():
    args = init_fields(EngineArgs)
    expected = {}
    for cls in CONFIGS:
        expected.update(init_fields(cls))
    expected.update({k: f for k, f in init_fields(EngineConfig).items() if not k.endswith("_config")})
    assert sorted(args) == sorted(expected)
    for name, f in expected.items():
        assert args[name].default == f.default, name


def test_cli_has_a_flag_per_engine_arg_with_its_default(tiny_models):
    ns = build_parser().parse_args(["generate", "--prompt", "x"])
    for name, f in init_fields(EngineArgs).items():
        if name in ("model", "hf_overrides"):
            continue
        assert hasattr(ns, name), name
        assert getattr(ns, name) == f.default, name
    ns = build_parser().parse_args(["generate", "--model", tiny_models["qwen3"][0], "--max-model-len", "77",
                                    "--no-enable-chunked-prefill", "--max-num-batched-tokens", "100", "--max-num-seqs", "8",
                                    "--load-format", "dummy", "--cpu-kv-cache-space-gib", "0.5"])
    from folovllm.engine.arg_utils import from_cli_args
    config = from_cli_args(ns).create_engine_config()
    assert config.model_config.max_model_len == 77 and config.model_config.load_format == "dummy"
    assert config.scheduler_config.enable_chunked_prefill is False
    assert config.scheduler_config.max_num_batched_tokens == 100
    assert config.cache_config.cpu_kv_cache_space_gib == 0.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--load-format", "pickle"])


def test_cpu_kv_cache_space_has_one_default(monkeypatch):
    monkeypatch.delenv("FOLOVLLM_CPU_KVCACHE_SPACE", raising=False)
    assert CacheConfig().cpu_kv_cache_space_gib == 4.0
    assert EngineArgs(model="m").cpu_kv_cache_space_gib is None  # resolved by CacheConfig alone
    monkeypatch.setenv("FOLOVLLM_CPU_KVCACHE_SPACE", "2.5")
    assert CacheConfig().cpu_kv_cache_space_gib == 2.5
    assert CacheConfig(cpu_kv_cache_space_gib=1.0).cpu_kv_cache_space_gib == 1.0
    monkeypatch.setenv("FOLOVLLM_CPU_KVCACHE_SPACE", "lots")
    with pytest.raises(ValueError, match="FOLOVLLM_CPU_KVCACHE_SPACE must be a number"):
        CacheConfig()


def test_model_config_resolves_the_model_once(tiny_models):
    path, hf = tiny_models["llama"]
    mc = ModelConfig(path)
    assert mc.hf_config.num_hidden_layers == hf.config.num_hidden_layers
    assert mc.max_model_len == hf.config.max_position_embeddings == 512
    assert mc.vocab_size == 320 and mc.quantization is None
    assert ModelConfig(path, max_model_len=100).max_model_len == 100
    with pytest.raises(ValueError, match=r"max_model_len \(9999\) is larger than the model's max_position_embeddings \(512\)"):
        ModelConfig(path, max_model_len=9999)
    with pytest.raises(ValueError, match="does not exist"):
        ModelConfig(str(path) + "-missing")


def test_engine_config_resolves_device_facts(tiny_models):
    path, _ = tiny_models["qwen3"]
    config = EngineConfig(ModelConfig(path, max_model_len=256), device="cpu",
                          scheduler_config=SchedulerConfig(enable_chunked_prefill=False))
    assert config.model_config.dtype == torch.float32          # 'auto' on CPU
    assert config.scheduler_config.async_scheduling is False    # None -> off on CPU
    assert config.scheduler_config.max_num_batched_tokens == 8192  # max(8192, max_model_len)
    assert config.scheduler_config.max_model_len == 256
    assert EngineConfig(ModelConfig(path, dtype="bfloat16"), device="cpu").model_config.dtype == torch.bfloat16


def test_unknown_quantization_method_is_a_clear_error(tiny_models, tmp_path):
    import shutil
    path, _ = tiny_models["qwen2"]
    folder = tmp_path / "q"
    shutil.copytree(path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bogus-4bit", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bogus-4bit"):
        ModelConfig(str(folder))
    with pytest.raises(ValueError, match="bogus-4bit"):
        ModelConfig(path, quantization="bogus-4bit")


def test_tensor_parallel_size_reaches_the_executor_choice(tiny_models):
    from folovllm.executor import get_executor_class
    from folovllm.executor.multiproc import MultiprocExecutor
    from folovllm.executor.uniproc import UniprocExecutor

    path, _ = tiny_models["qwen3"]
    one = EngineConfig(ModelConfig(path), device="cpu")
    assert get_executor_class(one) is UniprocExecutor
    two = EngineConfig(ModelConfig(path), device="cpu", parallel_config=ParallelConfig(tensor_parallel_size=2))
    assert get_executor_class(two) is MultiprocExecutor
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
        ParallelConfig(tensor_parallel_size=0)


def test_a_config_is_resolved_again_from_what_was_asked(tiny_models):
    """Resolution works on each engine's own copies: the caller's configs keep what they asked
    for, and a replaced EngineConfig is resolved anew (not from the first one's results)."""
    path, _ = tiny_models["qwen3"]
    mc = ModelConfig(path)
    sc = SchedulerConfig(enable_chunked_prefill=False)
    first = EngineConfig(mc, scheduler_config=sc, device="cpu")
    assert first.model_config.dtype == torch.float32 and first.scheduler_config.async_scheduling is False
    assert mc.dtype == "auto" and sc.async_scheduling is None and sc.max_num_batched_tokens is None
    again = dataclasses.replace(first, scheduler_config=SchedulerConfig(async_scheduling=True))
    assert again.scheduler_config.async_scheduling is True
    assert again.scheduler_config.max_num_batched_tokens == 8192
    longer = EngineConfig(ModelConfig(path, max_model_len=512), device="cpu", scheduler_config=sc)
    assert longer.scheduler_config.max_num_batched_tokens == 8192  # max(8192, 512), not first's
    bf16 = EngineConfig(ModelConfig(path, dtype="bfloat16"), device="cpu")
    assert dataclasses.replace(bf16).model_config.dtype == torch.bfloat16


def test_an_infinite_cpu_kv_cache_is_refused(monkeypatch):
    monkeypatch.setenv("FOLOVLLM_CPU_KVCACHE_SPACE", "inf")
    with pytest.raises(ValueError, match="must be a finite number of GiB"):
        CacheConfig()


def test_cpu_bfloat16_instructions_are_read_from_the_flags_line(tmp_path):
    cpu_has_native_bf16 = _cpu_has_native_bf16  # the function itself: every test sees folovllm.config's pinned

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_has_native_bf16(str(info)) is False
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16(str(info)) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16(str(info)) is True
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is True  # unreadable: keep bfloat16
