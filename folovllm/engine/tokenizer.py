"""The model's tokenizer and its EOS ids, as transformers would use them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from folovllm.config import ModelConfig
from folovllm.logger import init_logger

logger = init_logger(__name__)


def load_tokenizer(mc: ModelConfig):
    """transformers' tokenizer for the model (or the one a GGUF file carries). A folder with no
    tokenizer files gives None: the engine then runs on token ids."""
    from transformers import AutoTokenizer

    if mc.skip_tokenizer_init:
        return None
    path = mc.tokenizer or mc.model
    if path.endswith(".gguf"):
        from folovllm.model_executor.model_loader.gguf_loader import load_gguf_tokenizer
        return release_build_inputs(load_gguf_tokenizer(path))
    if mc.tokenizer is None and not _has_tokenizer_files(Path(path)):
        logger.warning("%s has no tokenizer files: prompts must be token ids", path)
        return None
    return release_build_inputs(AutoTokenizer.from_pretrained(path, trust_remote_code=mc.trust_remote_code))


# transformers tokenizer classes that read their Python vocabulary and merges (`_vocab`, `_merges`)
# only in __init__, to build the Rust tokenizer that does all the work afterwards.
_BUILD_ONLY_ATTRS = {"Qwen2Tokenizer": ("_vocab", "_merges"), "LlamaTokenizer": ("_vocab", "_merges")}


def release_build_inputs(tokenizer):
    """Drop the Python copies of the vocabulary and merges a tokenizer was built from: for Qwen's
    151k tokens they held ~65 MB of the process's memory for nothing."""
    for name in _BUILD_ONLY_ATTRS.get(type(tokenizer).__name__, ()):
        tokenizer.__dict__.pop(name, None)
    return tokenizer


def _has_tokenizer_files(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any((folder / n).exists() for n in names)


def eos_token_ids(mc: ModelConfig, tokenizer) -> set[int]:
    """EOS ids as transformers' generate would use them: generation_config.json first, then the
    model config, then the tokenizer."""
    ids: Any = None
    gen = Path(mc.model) / "generation_config.json"
    if gen.is_file():
        ids = json.loads(gen.read_text()).get("eos_token_id")
    if ids is None:
        ids = getattr(mc.hf_config, "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {ids} if isinstance(ids, int) else set(ids)
