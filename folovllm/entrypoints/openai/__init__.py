"""The OpenAI-compatible server (`folovllm serve`): api_server.py and the modules beside it."""

# Requests with larger bodies are refused with 413 (--max-request-body-bytes).
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
