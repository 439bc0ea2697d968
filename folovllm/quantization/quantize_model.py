"""Quantize a Hugging Face decoder-only model folder to a GPTQ checkpoint, layer by layer.

The calibration batch goes through the float model up to the first decoder layer. Then for each
decoder layer in turn: its linears are quantized in the order the data flows through them
(q/k/v, then o, then gate/up, then down: "true sequential"), each group's inputs recorded with the
earlier groups of the same layer already quantized; the layer's weights are replaced by their
dequantized values and the layer is run once more, so the next layer is calibrated on what the
quantized model really produces. Only the decoder layers' linears are quantized: embeddings, norms
and the LM head are copied from the source files unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from folovllm.logger import init_logger
from folovllm.quantization import calib, pack
from folovllm.quantization.gptq import GPTQ, QuantizedWeight, check_args
from folovllm.quantization.rtn import rtn_quantize

logger = init_logger(__name__)

METHODS = ("gptq", "rtn")

# The order in which a decoder layer's linears see data; linears of the same tuple share inputs.
SEQUENTIAL = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"),
              ("mlp.down_proj",))


class _Captured(Exception):
    pass


def sequential_groups(layer: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
    """The layer's linears in data-flow order; any linear SEQUENTIAL does not name comes last,
    one group each."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    groups, seen = [], set()
    for names in SEQUENTIAL:
        g = [(n, linears[n]) for n in names if n in linears]
        seen.update(n for n, _ in g)
        if g:
            groups.append(g)
    groups += [[(n, m)] for n, m in linears.items() if n not in seen]
    return groups


def _decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: expected a decoder-only model with model.layers")
    return inner, layers


def _layer_out(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int):
    """Per calibration batch: the hidden states entering decoder layer 0, and for every layer the
    keyword arguments the model passes it (rotary embeddings, attention mask)."""
    _, layers = _decoder(model)
    hidden, kwargs = [], []
    current: list[dict] = []

    def pre_hook(index):
        def hook(module, args, kw):
            if index == 0:
                hidden.append(args[0] if args else kw.pop("hidden_states"))
            kw = {k: v for k, v in kw.items() if k != "hidden_states"}
            current.append(kw)
            if index == len(layers) - 1:
                raise _Captured
        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        for chunk in ids.split(batch_size):
            current = []
            try:
                model(input_ids=chunk.to(model.device), use_cache=False)
            except _Captured:
                pass
            kwargs.append(current)
    finally:
        for h in handles:
            h.remove()
    return hidden, kwargs


def relative_error(weight: torch.Tensor, dequant: torch.Tensor, H: torch.Tensor) -> float:
    """||X (W - W_q)^T||^2 / ||X W^T||^2 over the calibration inputs, through their Hessian."""
    W = weight.double()
    D = W - dequant.double()
    H = H.double()
    den = ((W @ H) * W).sum()
    return float(((D @ H) * D).sum() / den) if den > 0 else 0.0


def _quantize_group(layer, group, hidden, kwargs, index, method, opts, errors, prefix):
    out: dict[str, QuantizedWeight] = {}
    if method == "rtn":
        for name, lin in group:
            out[name] = rtn_quantize(lin.weight, bits=opts["bits"], group_size=opts["group_size"],
                                     sym=opts["sym"])
    else:
        gptqs = {name: GPTQ(lin.in_features, device=lin.weight.device) for name, lin in group}
        handles = [lin.register_forward_hook(lambda m, a, o, g=gptqs[name]: g.add_batch(a[0]))
                   for name, lin in group]
        try:
            for h, kw in zip(hidden, kwargs):
                layer(h, **kw[index])
        finally:
            for h in handles:
                h.remove()
        for name, lin in group:
            out[name] = gptqs[name].quantize(lin.weight, bits=opts["bits"], group_size=opts["group_size"],
                                             sym=opts["sym"], desc_act=opts["desc_act"],
                                             damp=opts["damp"])
            errors[f"{prefix}.{name}"] = relative_error(lin.weight, out[name].dequantize(), gptqs[name].H)
    for name, lin in group:
        lin.weight.data.copy_(out[name].dequantize().to(lin.weight.dtype))
    return out


def quantize_layers(hf: nn.Module, ids: torch.Tensor | None, *, bits: int = 4, group_size: int = 128,
                    sym: bool = True, desc_act: bool = False, damp: float = 0.01, method: str = "gptq",
                    batch_size: int = 8, progress: bool = True
                    ) -> tuple[dict[str, QuantizedWeight], dict[str, float]]:
    """Quantizes every linear of `hf`'s decoder layers in place (their weights become the
    dequantized ones), calibrating on token ids [S, L] (unused by RTN). Returns (prefix ->
    QuantizedWeight, prefix -> relative output error on the calibration data; GPTQ only)."""
    from tqdm.auto import tqdm

    _, layers = _decoder(hf)
    all_groups = [sequential_groups(layer) for layer in layers]
    hidden, kwargs = capture_layer_inputs(hf, ids, batch_size) if method == "gptq" else ([], [])
    quantized: dict[str, QuantizedWeight] = {}
    errors: dict[str, float] = {}
    opts = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, damp=damp)
    bar = tqdm(total=len(layers), desc=f"{method} {bits}-bit", unit="layer", disable=not progress)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            prefix = f"model.layers.{i}"
            for group in all_groups[i]:
                for name, q in _quantize_group(layer, group, hidden, kwargs, i, method, opts, errors,
                                               prefix).items():
                    quantized[f"{prefix}.{name}"] = q
            if method == "gptq":
                hidden = [_layer_out(layer(h, **kw[i])) for h, kw in zip(hidden, kwargs)]
                errs = [e for k, e in errors.items() if k.startswith(prefix + ".")]
                bar.set_postfix(rel_err=f"{sum(errs) / len(errs):.2e}")
            bar.update(1)
    bar.close()
    return quantized, errors


def _source_tensors(model_dir: Path, skip: set[str]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The source files' tensors except those named in `skip`, and the names of all of them."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors files")
    out, names = {}, set()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                names.add(key)
                if key not in skip:
                    out[key] = sf.get_tensor(key)
    return out, names


def quantize_model(model: str | Path, output: str | Path, *, bits: int = 4, group_size: int = 128,
                   desc_act: bool = False, sym: bool = True, damp: float = 0.01,
                   method: str = "gptq", checkpoint_format: str = "gptq", calib_samples: int = 128,
                   calib_seq_len: int = 512, calib_file: str | None = None, calib_random: bool = False,
                   device: str = "cpu", batch_size: int = 8, seed: int = 0,
                   progress: bool = True) -> dict:
    """Quantizes the HF model folder `model` into the GPTQ checkpoint folder `output`. Returns a
    summary: output path, layer and linear counts, seconds, and per linear the relative output
    error on the calibration data (GPTQ only)."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    src = Path(model)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: not a model folder (no config.json there)")
    check_args(bits, -1, 1)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    desc_act = desc_act and method == "gptq"  # RTN has no Hessian to order columns by
    qconfig = pack.quantization_config(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                                       damp=damp, checkpoint_format=checkpoint_format)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if Path(output).resolve() == src.resolve():
        raise ValueError("--output must be a folder other than --model")

    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(device).eval()
    _, layers = _decoder(hf)
    for i, layer in enumerate(layers):
        for group in sequential_groups(layer):
            for name, lin in group:
                check_args(bits, group_size, lin.in_features, f"model.layers.{i}.{name}")
                if lin.out_features % (32 // bits):
                    raise ValueError(f"model.layers.{i}.{name}: out_features {lin.out_features} is not a "
                                     f"multiple of {32 // bits}, which {bits}-bit GPTQ packing needs")

    ids = None
    if method == "gptq":
        tokenizer = None
        if not calib_random:
            try:
                from transformers import AutoTokenizer
                tokenizer = AutoTokenizer.from_pretrained(str(src))
            except (OSError, ValueError, TypeError):
                tokenizer = None
        ids = calib.calibration_ids(tokenizer, calib_samples, calib_seq_len, calib_file=calib_file,
                                    random_vocab=hf.config.vocab_size if calib_random else None, seed=seed)
        logger.info("calibrating on %d samples of %d tokens", ids.shape[0], ids.shape[1])

    quantized, errors = quantize_layers(hf, ids, bits=bits, group_size=group_size, sym=sym,
                                        desc_act=desc_act, damp=damp, method=method,
                                        batch_size=batch_size, progress=progress)

    skip = {f"{p}.weight" for p in quantized}
    tensors, names = _source_tensors(src, skip)
    if skip - names:
        raise ValueError(f"quantized linears not in the source files: {sorted(skip - names)[:3]}")
    pack.write_checkpoint(output, src, quantized=quantized, tensors=tensors, quant_config=qconfig)
    seconds = time.perf_counter() - t0
    logger.info("wrote %s: %d linears in %d layers quantized to %d bits in %.1f s", output,
                len(quantized), len(layers), bits, seconds)
    return {"output": str(output), "num_layers": len(layers), "num_quantized": len(quantized),
            "seconds": seconds, "errors": errors, "quantization_config": qconfig}

