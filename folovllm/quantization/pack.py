"""The standard GPTQ checkpoint layout (AutoGPTQ / GPTQModel / vLLM read it), and its writer.

With b bits, p = 32 // b codes share one int32, the lowest bits holding the first code:
  <prefix>.qweight  int32 [K // p, N]   W_q[k, n] = (qweight[k // p, n] >> (b * (k % p))) & (2**b - 1)
  <prefix>.qzeros   int32 [G, N // p]   z[g, n]   = (qzeros[g, n // p] >> (b * (n % p))) & (2**b - 1)
  <prefix>.scales   float16 [G, N]
  <prefix>.g_idx    int32 [K]           group of input row k
  W[k, n] = scales[g_idx[k], n] * (W_q[k, n] - z[g_idx[k], n]);  y = x @ W (+ bias)
checkpoint_format "gptq" (v1, the ecosystem's default) stores z - 1 (wrapping modulo 2**b), an
off-by-one inherited from AutoGPTQ that every reader undoes; "gptq_v2" stores z itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from folovllm.quantization.gptq import QuantizedWeight

FORMATS = ("gptq", "gptq_v2")

# Files of the source folder that travel with the weights (those present are copied).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
              "chat_template.json", "generation_config.json")


def _pack_factor(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return 32 // bits


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs codes [R, C] along dim 0 into int32 [R // p, C]."""
    p = _pack_factor(bits)
    R, C = codes.shape
    if R % p:
        raise ValueError(f"cannot pack {R} rows of {bits}-bit codes into int32s ({p} a word)")
    c = codes.to(torch.int64).reshape(R // p, p, C)
    shifts = (bits * torch.arange(p, dtype=torch.int64, device=codes.device))[None, :, None]
    return _to_int32((c << shifts).sum(dim=1))


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [R // p, C] -> int32 codes [R, C]."""
    p = _pack_factor(bits)
    shifts = (bits * torch.arange(p, dtype=torch.int32, device=packed.device))[None, :, None]
    codes = (packed[:, None, :] >> shifts) & (2**bits - 1)
    return codes.reshape(-1, packed.shape[1])


def pack_qweight(q: QuantizedWeight) -> torch.Tensor:
    """Codes [N, K] -> qweight int32 [K // p, N] (packed along the input dim)."""
    return pack_rows(q.qweight.T, q.bits)


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Zero points [G, N] -> qzeros int32 [G, N // p] (packed along the output dim)."""
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS}, got {checkpoint_format!r}")
    z = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        z = (z - 1) % 2**bits
    return pack_rows(z.T, bits).T.contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    z = unpack_rows(qzeros.T.contiguous(), bits).T
    if checkpoint_format == "gptq":
        z = (z + 1) % 2**bits
    return z.contiguous()


def pack_linear(prefix: str, q: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The four checkpoint tensors of one quantized linear."""
    N, K = q.qweight.shape
    p = _pack_factor(q.bits)
    if N % p:
        raise ValueError(f"{prefix}: out_features {N} is not a multiple of {p}, so its zero points "
                         f"cannot be packed at {q.bits} bits")
    return {
        f"{prefix}.qweight": pack_qweight(q).contiguous().cpu(),
        f"{prefix}.qzeros": pack_qzeros(q.zeros, q.bits, checkpoint_format).cpu(),
        f"{prefix}.scales": q.scales.to(torch.float16).contiguous().cpu(),
        f"{prefix}.g_idx": q.g_idx.to(torch.int32).contiguous().cpu(),
    }


def unpack_linear(tensors: dict[str, torch.Tensor], prefix: str, bits: int,
                  checkpoint_format: str = "gptq") -> torch.Tensor:
    """The float32 weight [N, K] (nn.Linear's layout) of a checkpoint's quantized linear."""
    qw = unpack_rows(tensors[f"{prefix}.qweight"], bits)  # [K, N]
    z = unpack_qzeros(tensors[f"{prefix}.qzeros"], bits, checkpoint_format)  # [G, N]
    s = tensors[f"{prefix}.scales"].float()
    g = tensors[f"{prefix}.g_idx"].long()
    return (s[g] * (qw.float() - z[g].float())).T.contiguous()


def quantization_config(*, bits: int, group_size: int, desc_act: bool, sym: bool, damp: float,
                        checkpoint_format: str = "gptq") -> dict:
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format must be one of {FORMATS}, got {checkpoint_format!r}")
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
            "sym": sym, "damp_percent": damp, "checkpoint_format": checkpoint_format,
            "true_sequential": True}


def write_checkpoint(output_dir: str | Path, source_dir: str | Path, *,
                     quantized: dict[str, QuantizedWeight], tensors: dict[str, torch.Tensor],
                     quant_config: dict) -> Path:
    """Writes `output_dir`: model.safetensors with the packed tensors of every linear in
    `quantized` (prefix -> weight; the bias, if any, goes in `tensors` as `<prefix>.bias`) and
    every tensor of `tensors` as it is, config.json = the source's plus quantization_config, and
    the source's tokenizer and generation-config files."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    src = Path(source_dir)
    out.mkdir(parents=True, exist_ok=True)
    fmt = quant_config["checkpoint_format"]
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        state[name] = t.detach().contiguous().cpu()
    for prefix, q in quantized.items():
        if f"{prefix}.weight" in state:
            raise ValueError(f"{prefix}.weight given both quantized and as a plain tensor")
        state.update(pack_linear(prefix, q, fmt))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = dict(quant_config)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in SIDE_FILES:
        if (src / name).is_file() and src.resolve() != out.resolve():
            shutil.copy2(src / name, out / name)
    return out
