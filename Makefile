# `make demo` and `make test` each do all the set-up a fresh machine needs.
PY ?= python3
PROMPT ?= Write a Python function that checks whether a string is a palindrome.

.PHONY: install demo test bench-cpu

install:
	@# The CPU build of torch first: otherwise pip resolves `torch` to the CUDA wheels (several GB).
	@# triton only to run the GPU kernels' tests under its interpreter on CPU; a GPU machine's torch
	@# brings its own.
	$(PY) -m pip install -q torch==2.13.0 triton==3.7.1
	$(PY) -m pip install -q -e ".[test]"

# On a CPU the GGUF model runs with int8 weights and bfloat16 activations by default (docs/cpu.md);
# QUANT=int4 reads half the bytes again, QUANT=none is float32.
QUANT ?=
QUANT_FLAG = $(if $(QUANT),--quantization $(QUANT),)

demo: install
	$(PY) -m folovllm generate --chat --prompt "$(PROMPT)" --max-tokens 200 $(QUANT_FLAG)

bench-cpu: install
	$(PY) -m folovllm bench cpu $(QUANT_FLAG)

test: install
	$(PY) -m pytest -q
