"""Shared fixtures: tiny random Hugging Face models saved to a temporary folder (with or without a
tokenizer), and two guards: under CI a missing test dependency fails rather than skips, and only
tests marked `slow` may fetch the real GGUF model."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from interpret_mode import in_ci

# The OpenAI server's fixtures (tests/server/), kept in a module of their own name.
pytest_plugins = ["server_support"]

# Two cores: let torch use both, and keep tokenizers from spawning more.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


class CountedKernel:
    """Stands in for a Triton kernel in a module (monkeypatch.setattr): counts its launches
    (kernel[grid](...)) and passes each one on, so a test can tell which kernel a call took."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def tiny_config(arch: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    kwargs = dict(TINY)
    if arch == "qwen3":
        cls = Qwen3Config
        kwargs.update(head_dim=32, tie_word_embeddings=True)
    elif arch == "qwen2":
        cls = Qwen2Config
        kwargs.update(tie_word_embeddings=False)
    elif arch == "llama":
        cls = LlamaConfig
        kwargs.update(tie_word_embeddings=False)
    else:
        raise ValueError(arch)
    kwargs.update(overrides)
    return cls(**kwargs)


def build_tiny_model(path, arch: str, seed: int = 0, **overrides):
    """A random model of the given architecture saved as config.json + model.safetensors."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (folder, HF reference model), built once per test session."""
    out = {}
    for arch in ("qwen3", "qwen2", "llama"):
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        out[arch] = (str(path), build_tiny_model(path, arch))
    return out


# ---- a tokenizer for the tiny models ---------------------------------------------------------

# ids 0, 1, 2 are TINY's pad, bos and eos; every other id is one printable, non-space character,
# so decoded text is the ids' characters in order and a stop string can be matched by hand.
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def build_biased_model(path, arch: str, **overrides):
    """build_tiny_model with random biases (transformers initializes them to zero, which would
    hide a bias loaded into the wrong slice, dropped, or added on every tensor-parallel rank)."""
    model = build_tiny_model(path, arch, **overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def biased_tiny_models(tiny_models, tmp_path_factory):
    """arch -> (folder, HF model): qwen3 (q/k norm, tied embeddings), qwen2 (bias on q/k/v) and
    llama with a bias on every projection (o_proj and down_proj are row-parallel), all biases
    random."""
    out = {"qwen3": tiny_models["qwen3"]}
    for arch, kw in (("qwen2", {}), ("llama", dict(attention_bias=True, mlp_bias=True))):
        path = tmp_path_factory.mktemp(f"biased-{arch}")
        out[arch] = (str(path), build_biased_model(path, arch, **kw))
    return out


def build_tiny_tokenizer():
    """A transformers fast tokenizer for the tiny vocabulary (320 ids), built offline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    num_chars = TINY["vocab_size"] - len(TINY_SPECIAL_TOKENS)
    chars = [c for c in map(chr, range(0x21, 0x181)) if c.isprintable() and not c.isspace()]
    assert len(chars) == num_chars
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS + tuple(chars))}
    # BPE without merges: each character of the text is looked up on its own.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()  # join the characters without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", clean_up_tokenization_spaces=False)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        TINY["pad_token_id"], TINY["bos_token_id"], TINY["eos_token_id"])
    assert len(tokenizer) == TINY["vocab_size"]
    return tokenizer


@pytest.fixture(scope="session")
def tiny_models_with_tokenizer(tiny_models, tmp_path_factory):
    """arch -> (folder, HF reference model, tokenizer): tiny_models' weights in a folder of their
    own that also holds the tokenizer's files, so the engine loads it (tiny_models' folders keep
    having none: tests rely on that to run on token ids)."""
    tokenizer = build_tiny_tokenizer()
    out = {}
    for arch, (src, model) in tiny_models.items():
        path = tmp_path_factory.mktemp(f"tiny-{arch}-tokenizer")
        shutil.copytree(src, path, dirs_exist_ok=True)
        tokenizer.save_pretrained(path)
        out[arch] = (str(path), model, tokenizer)
    return out


# ---- CI: a missing test dependency is a failure -------------------------------------------------

@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A test file that pytest.importorskip()s a missing module skips on a developer's machine;
    under CI (which installs every test dependency) it fails, so a broken install cannot pass by
    skipping. tests/interpret_mode.require does the same explicitly."""
    report = yield
    if report.skipped and in_ci() and "could not import" in str(report.longrepr):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"CI=true, so a missing test dependency fails: {reason}"
    return report


# ---- the real model only in `slow` tests ----------------------------------------------------------

_current_test = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _current_test
    _current_test = item
    try:
        return (yield)
    finally:
        _current_test = None


@pytest.fixture(scope="session", autouse=True)
def _real_model_only_in_slow_tests():
    """`pytest -m "not slow"` must never download the real model: fetching it from a test not
    marked slow fails at once. (Fetches with monkeypatched PIECES, as tests/unit/test_assets.py
    does, are fakes and pass through.)"""
    from folovllm import assets

    real_fetch, real_pieces = assets.fetch_default_model, getattr(assets, "PIECES", None)

    def fetch_default_model(progress: bool = True):
        fake = getattr(assets, "PIECES", None) is not real_pieces
        if not fake and not (_current_test and _current_test.get_closest_marker("slow")):
            pytest.fail(f"{_current_test.nodeid if _current_test else 'a test'} loads the real model "
                        f"({assets.DEFAULT_MODEL}): mark it @pytest.mark.slow", pytrace=False)
        return real_fetch(progress)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(assets, "fetch_default_model", fetch_default_model)
        yield


@pytest.fixture(autouse=True)
def _cpu_bf16_pinned(request, monkeypatch):
    """The CPU's bfloat16 instructions decide dtype "auto" for int8/int4 weights on CPU
    (ModelConfig.resolve_dtype): every test sees a CPU that has them, whatever machine runs it,
    except one that asks for `no_bf16_cpu`."""
    monkeypatch.setattr("folovllm.config.cpu_has_native_bf16", lambda: "no_bf16_cpu" not in request.fixturenames)


@pytest.fixture
def no_bf16_cpu():
    """A CPU without bfloat16 instructions, for dtype "auto" (see _cpu_bf16_pinned)."""
