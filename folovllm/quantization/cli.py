"""`folovllm quantize`: a Hugging Face model folder in, a GPTQ checkpoint folder out."""

from __future__ import annotations

import argparse
import json


def cmd_quantize(ns: argparse.Namespace) -> int:
    from folovllm.quantization.quantize_model import quantize_model

    summary = quantize_model(
        ns.model, ns.output, bits=ns.bits, group_size=ns.group_size, desc_act=ns.desc_act, sym=ns.sym,
        damp=ns.damp, method=ns.method, checkpoint_format=ns.checkpoint_format,
        calib_samples=ns.calib_samples, calib_seq_len=ns.calib_seq_len, calib_file=ns.calib_file,
        calib_random=ns.calib_random, device=ns.device, seed=ns.seed, progress=not ns.no_progress)
    errors = summary.pop("errors")
    if errors:
        summary["mean_relative_output_error"] = sum(errors.values()) / len(errors)
        summary["max_relative_output_error"] = max(errors.values())
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a model folder to a GPTQ checkpoint (own GPTQ, or RTN)",
        description="GPTQ (Frantar et al., 2022) or round-to-nearest quantization of every linear in "
                    "the decoder layers; writes the standard GPTQ layout (qweight, qzeros, scales, "
                    "g_idx) and quantization_config into config.json.")
    p.add_argument("--model", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--output", required=True, help="folder to write the quantized checkpoint to")
    p.add_argument("--bits", type=int, default=4, help="4 or 8 (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=128,
                   help="input columns per scale/zero group; -1 = one group (default: %(default)s)")
    p.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by descending "
                   "Hessian diagonal (GPTQ only)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                   help="symmetric quantization, zero point 2**(bits-1) (default: on)")
    p.add_argument("--damp", type=float, default=0.01,
                   help="dampening, as a fraction of the Hessian's mean diagonal (default: %(default)s)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq",
                   help="gptq (v1) stores zero points minus one, as AutoGPTQ does (default: %(default)s)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--calib-file", default=None, help="a local text file to calibrate on (instead of "
                   "the first half of exllamav2's Wikipedia sample)")
    p.add_argument("--calib-random", action="store_true", help="random token ids (dummy models)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)
