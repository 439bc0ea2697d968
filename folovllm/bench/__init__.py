"""Benchmarks of BENCHMARKS.md: throughput and latency workloads, the transformers peer, and the
physical floor of each run. The command line is `folovllm bench throughput|latency`."""
