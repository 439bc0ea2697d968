"""Kernels of the quantization methods (matmuls that read quantized weights directly)."""
