"""Model quality measures run with FoloVLLM's own forward: perplexity (`folovllm eval ppl`)."""
