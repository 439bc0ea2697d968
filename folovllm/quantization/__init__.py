"""FoloVLLM's own quantizer: GPTQ (gptq.py) and round-to-nearest (rtn.py) for one linear,
calibration text (calib.py), the layer-by-layer driver (quantize_model.py), the standard GPTQ
checkpoint layout and writer (pack.py) and the `folovllm quantize` command (cli.py). Running a
quantized checkpoint is model_executor/layers/quantization/'s job."""
