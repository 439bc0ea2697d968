"""Load GGUF checkpoints (llama.cpp format) as Hugging Face-named float32 tensors.

Config and tokenizer come from transformers' GGUF support. Weights are
dequantized here one tensor at a time, so peak memory stays near the largest
tensor rather than a whole float32 state dict.

The header is parsed by a small scanner instead of gguf.GGUFReader: the reader
builds a numpy object per vocabulary string (~7 s and ~450 MB for a 150k-token
vocab), while we only need scalar metadata and tensor locations.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# llama.cpp's converter permutes q/k rows only for llama-family models (its
# rope pairs adjacent dims there); qwen2/qwen3 keep the HF rotate_half layout.
_PERMUTED_ARCHS = ("llama",)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors that hold no HF parameter (llama3 rope scaling factors live in the config).
_SKIPPED = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # HF order (GGUF stores dims fastest-first)
    qtype: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class _GGUF:
    path: str
    arch: str
    metadata: dict  # scalar key/values only; arrays (vocab, merges) are skipped
    tensors: list[_Tensor]


# GGUF value type id -> struct format of a scalar (8 = string, 9 = array).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _scan(buf, size: int) -> tuple[dict, list[_Tensor]]:
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string() -> str:
        nonlocal pos
        n = take("Q")
        if pos + n > size:
            raise ValueError("string runs past the end of the file")
        pos += n
        return bytes(buf[pos - n : pos]).decode("utf-8")

    def skip_array():
        nonlocal pos
        elem, count = take("I"), take("Q")
        if elem == 8:
            for _ in range(count):
                n = take("Q")  # not `pos += take(...)`: that would read pos before take() moves it
                pos += n
                if pos > size:
                    raise ValueError("array runs past the end of the file")
        elif elem == 9:
            for _ in range(count):
                skip_array()
        else:
            pos += struct.calcsize(_SCALAR[elem]) * count

    magic, version, n_tensors, n_kv = take("4sIQQ")
    if magic != b"GGUF":
        raise ValueError(f"bad magic {magic!r}")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    meta = {}
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        if vtype == 8:
            meta[key] = string()
        elif vtype == 9:
            skip_array()
        else:
            meta[key] = take(_SCALAR[vtype])
    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), take("I")
        dims = [take("Q") for _ in range(n_dims)]
        infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(take("I")), take("Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = -(-pos // align) * align
    tensors = []
    for name, shape, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        if data_start + offset + nbytes > size:
            raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
        tensors.append(_Tensor(name, shape, qtype, data_start + offset, nbytes))
    return meta, tensors


def _open(path: str) -> _GGUF:
    """Parse and validate a GGUF header; clear errors for missing/corrupt/unsupported files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ValueError("empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                meta, tensors = _scan(buf, size)
        arch = meta["general.architecture"]
    except Exception as e:  # bad bytes surface as struct/Unicode/Key/Value errors
        raise ValueError(
            f"{path} is corrupt, truncated or not a GGUF file ({type(e).__name__}: {e}). "
            "Delete it so it is fetched or converted again."
        ) from e
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return _GGUF(path, arch, meta, tensors)


def _split(path: str) -> tuple[str, str]:
    path = os.path.abspath(os.fspath(path))
    return os.path.dirname(path), os.path.basename(path)


def _sidecar(path: str) -> tuple[str, dict]:
    """transformers needs ~10 s to build a config and ~16 s to build a tokenizer from a GGUF
    file's metadata, so both are saved once in HF format beside the file, stamped with the file's
    size and mtime, and read from there afterwards."""
    directory, name = _split(path)
    st = os.stat(path)
    return os.path.join(directory, f".{name}.hf"), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sidecar_valid(folder: str, stamp: dict, kind: str) -> bool:
    try:
        with open(os.path.join(folder, f"{kind}.stamp.json")) as f:
            return json.load(f) == stamp
    except (OSError, ValueError):
        return False


def _save_sidecar(obj, folder: str, stamp: dict, kind: str) -> None:
    try:
        obj.save_pretrained(folder)
        with open(os.path.join(folder, f"{kind}.stamp.json"), "w") as f:
            json.dump(stamp, f)
    except OSError:
        pass  # a read-only folder only costs start-up time


def _load_via_sidecar(path: str, kind: str, auto_cls, fix):
    """`auto_cls` (AutoConfig or AutoTokenizer) built from the GGUF file once, corrected by
    `fix(obj, gguf)`, then read back from the sidecar folder while the file is unchanged."""
    g = _open(path)
    folder, stamp = _sidecar(path)
    if _sidecar_valid(folder, stamp, kind):
        return auto_cls.from_pretrained(folder)
    directory, name = _split(path)
    obj = auto_cls.from_pretrained(directory, gguf_file=name)
    fix(obj, g)
    _save_sidecar(obj, folder, stamp, kind)
    return obj


def _fix_config(config, g: _GGUF) -> None:
    # transformers maps attention.key_length to head_dim only for some archs, and
    # Qwen3 checkpoints have head_dim != hidden_size / num_heads.
    key_length = g.metadata.get(f"{g.arch}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length)


def _fix_tokenizer(tok, g: _GGUF) -> None:
    # transformers keeps the tokenizer class's default EOS (Qwen2: <|endoftext|>)
    # instead of the file's (Qwen instruct: <|im_end|>), so chats would never stop.
    eos_id = g.metadata.get("tokenizer.ggml.eos_token_id")
    if eos_id is not None and tok.eos_token_id != eos_id:
        tok.eos_token = tok.convert_ids_to_tokens(int(eos_id))


def load_gguf_config(path: str) -> transformers.PretrainedConfig:
    return _load_via_sidecar(path, "config", transformers.AutoConfig, _fix_config)


def load_gguf_tokenizer(path: str):
    return _load_via_sidecar(path, "tokenizer", transformers.AutoTokenizer, _fix_tokenizer)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _SKIPPED:
        return None
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # Inverse of llama.cpp's LlamaModel.permute, which interleaved the two halves
    # of each head's rows (HF rotate_half layout) into adjacent pairs.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iterate_gguf_weights(path: str, dtype: torch.dtype = torch.float32,
                         skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, tensor in HF shape) for every weight, in `dtype` (float32 by
    default; the model's dtype when that is narrower, so that the tensor a loader is copying and
    the next one being dequantized take half the memory). Names in `skip` are not read.

    The file and its tensor names are checked here, before the first tensor
    is asked for, so a bad file fails before any weight is loaded.
    """
    g = _open(path)
    try:
        names = [_hf_name(t.name) for t in g.tensors]
    except ValueError as e:
        raise ValueError(f"{g.path}: {e}; expected a plain {g.arch} checkpoint") from e
    return _iterate(g, [None if n in skip else n for n in names], dtype)


class GGUFEmbeddingRows:
    """An embedding table that stays in the GGUF file: a lookup reads its tokens' rows (in the
    file's quantized blocks) and dequantizes them, exactly as loading the whole table would (the
    same dequantize, the same rounding to `dtype`). The table of Qwen2.5-0.5B is 0.27 GB in
    bfloat16, a third of the int8 model's memory, while a decode step reads one row of it.

    Dequantizing costs ~0.14 ms a call whatever the number of rows (numpy), so the last
    `cache_rows` rows looked up are kept, dequantized, least recently used out first. They live
    in one tensor allocated up front: a small allocation per cached row, made in every step and
    kept, would split the memory a step's large temporaries (the logits) free for the next step,
    and the heap would grow step after step."""

    def __init__(self, path: str, name: str, dtype: torch.dtype, cache_rows: int = 4096) -> None:
        g = _open(path)
        t = next((t for t in g.tensors if _hf_name(t.name) == name), None)
        if t is None or len(t.shape) != 2:
            raise ValueError(f"{path} holds no 2-D tensor {name}")
        self.path, self.qtype, self.offset = g.path, t.qtype, t.offset
        self.num_rows, self.dim = t.shape
        self.row_bytes = t.nbytes // self.num_rows
        self.dtype = dtype
        self.cache_rows = cache_rows
        self._rows = torch.empty(cache_rows, self.dim, dtype=dtype)
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # token id -> its row in _rows
        self._free_slots = list(range(cache_rows))
        self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def read_rows(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), dim] in dtype, from the file."""
        raw = b"".join(os.pread(self._fd, self.row_bytes, self.offset + i * self.row_bytes) for i in ids)
        values = dequantize(np.frombuffer(raw, np.uint8).reshape(len(ids), self.row_bytes), self.qtype)
        return torch.from_numpy(values if values.flags.writeable else values.copy()).to(self.dtype)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1).tolist()
        if ids and not 0 <= min(ids) <= max(ids) < self.num_rows:
            raise IndexError(f"token id out of range [0, {self.num_rows})")
        unique = list(dict.fromkeys(ids))
        if len(unique) > self.cache_rows:  # more than the cache holds: straight from the file
            return self.read_rows(ids).view(*input_ids.shape, self.dim)
        slot_of = self._slot_of
        missing = []
        for i in unique:
            if i in slot_of:
                slot_of.move_to_end(i)
            else:
                missing.append(i)
        if missing:
            while len(self._free_slots) < len(missing):  # the least recently used, none of these
                self._free_slots.append(slot_of.popitem(last=False)[1])
            slots = [self._free_slots.pop() for _ in missing]
            self._rows[slots] = self.read_rows(missing)
            slot_of.update(zip(missing, slots))
        index = torch.tensor([slot_of[i] for i in ids], dtype=torch.int64)
        return self._rows.index_select(0, index).view(*input_ids.shape, self.dim)


def _iterate(g: _GGUF, names: list[str | None], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    n_head = int(g.metadata[f"{g.arch}.attention.head_count"])
    n_kv_head = int(g.metadata.get(f"{g.arch}.attention.head_count_kv", n_head))
    with open(g.path, "rb") as f:
        for t, name in zip(g.tensors, names):
            if name is None:
                continue
            w = _read_dequantized(f.fileno(), t, dtype)
            if g.arch in _PERMUTED_ARCHS:
                if ".q_proj." in name:
                    w = _unpermute(w, n_head)
                elif ".k_proj." in name:
                    w = _unpermute(w, n_kv_head)
            yield name, w
            del w  # don't pin the last tensor while the next one is built


# Bytes of the file dequantized at a time. dequantize() makes several temporaries the size of its
# input in float32: measured on Qwen2.5-0.5B's Q5_0 embedding table (0.27 GB in bfloat16), 16 MiB
# chunks added 208 MB to the peak and took 1.71 s, 1 MiB chunks 4 MB and 0.66 s (they stay in cache).
_CHUNK_BYTES = 1 << 20


def _read_dequantized(fd: int, t: _Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Read and dequantize a few rows at a time into the output: dequantize() makes
    # several temporaries the size of its input in float32, and a file read (not a
    # memmap) keeps the file's pages out of this process's resident memory.
    if dtype == torch.float32:
        out = torch.from_numpy(np.empty(t.shape, np.float32))
    else:
        out = torch.empty(t.shape, dtype=dtype)
    rows = out.view(-1, t.shape[-1])
    row_bytes = t.nbytes // len(rows)
    step = max(1, _CHUNK_BYTES // row_bytes)
    for i in range(0, len(rows), step):
        n = min(step, len(rows) - i)
        raw = os.pread(fd, n * row_bytes, t.offset + i * row_bytes)
        values = dequantize(np.frombuffer(raw, np.uint8).reshape(n, row_bytes), t.qtype)
        # An F32/F16 tensor comes back as a read-only view of the bytes read.
        rows[i : i + n] = torch.from_numpy(values if values.flags.writeable else values.copy())
    return out
