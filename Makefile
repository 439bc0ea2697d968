# `make demo` and `make test` each do all the set-up a fresh machine needs.
PY ?= python3
PROMPT ?= Write a Python function that checks whether a string is a palindrome.

.PHONY: install demo test

install:
	@# The CPU build of torch first: otherwise pip resolves `torch` to the CUDA wheels (several GB).
	@# triton only to run the GPU kernels' tests under its interpreter on CPU; a GPU machine's torch
	@# brings its own.
	$(PY) -m pip install -q torch==2.13.0 triton==3.7.1
	$(PY) -m pip install -q -e ".[test]"

demo: install
	$(PY) -m folovllm generate --chat --prompt "$(PROMPT)" --max-tokens 200

test: install
	$(PY) -m pytest -q
