"""The workloads of BENCHMARKS.md as token ids: no tokenizer is needed, and a seed fixes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Ids below 10,000 are in every vocabulary the project runs (and are ordinary tokens, not specials).
TOKEN_ID_LIMIT = 10_000


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def throughput_workload(num_prompts: int = 256, input_len_range: tuple[int, int] = (100, 1024),
                        output_len_range: tuple[int, int] = (100, 1024), seed: int = 0,
                        token_id_limit: int = TOKEN_ID_LIMIT) -> list[BenchRequest]:
    """`num_prompts` requests with input and output lengths uniform on the inclusive ranges and
    prompt ids uniform on [0, token_id_limit). Each request draws its lengths and ids in turn from
    one generator, so the first N requests are the same whatever num_prompts is: a smaller run is
    a prefix of the full workload."""
    (in_lo, in_hi), (out_lo, out_hi) = input_len_range, output_len_range
    if not (1 <= in_lo <= in_hi and 1 <= out_lo <= out_hi):
        raise ValueError(f"length ranges must be 1 <= lo <= hi, got {input_len_range} and {output_len_range}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_prompts):
        in_len = int(rng.integers(in_lo, in_hi, endpoint=True))
        out_len = int(rng.integers(out_lo, out_hi, endpoint=True))
        ids = rng.integers(0, token_id_limit, size=in_len).tolist()
        out.append(BenchRequest(ids, out_len))
    return out


def random_prompts(batch_size: int, prompt_len: int, rng: np.random.Generator,
                   token_id_limit: int = TOKEN_ID_LIMIT) -> list[list[int]]:
    """A batch of random prompts of one length (the latency workload)."""
    return rng.integers(0, token_id_limit, size=(batch_size, prompt_len)).tolist()


def prefix_workload(num_prefixes: int = 4, requests_per_prefix: int = 16, prefix_len: int = 2048,
                    suffix_len: int = 128, seed: int = 0,
                    token_id_limit: int = TOKEN_ID_LIMIT) -> tuple[list[list[int]], list[list[int]]]:
    """(prefixes, prompts): `num_prefixes` random prefixes, then for each in turn
    `requests_per_prefix` prompts of that prefix followed by a random suffix of its own."""
    if min(num_prefixes, requests_per_prefix, prefix_len) < 1 or suffix_len < 0:
        raise ValueError("the prefix workload needs at least one prefix, one request per prefix and one "
                         f"prefix token, and a suffix length >= 0; got {num_prefixes}, {requests_per_prefix}, "
                         f"{prefix_len}, {suffix_len}")
    rng = np.random.default_rng(seed)
    prefixes = rng.integers(0, token_id_limit, size=(num_prefixes, prefix_len)).tolist()
    prompts = [prefix + rng.integers(0, token_id_limit, size=suffix_len).tolist()
               for prefix in prefixes for _ in range(requests_per_prefix)]
    return prefixes, prompts


def chunked_workload(num_decoders: int = 64, decoder_input_len: int = 512, num_long: int = 4,
                     long_input_len: int = 8192, seed: int = 0,
                     token_id_limit: int = TOKEN_ID_LIMIT) -> tuple[list[list[int]], list[list[int]]]:
    """(decoder prompts, long prompts) of the chunked workload, random ids."""
    if min(num_decoders, decoder_input_len, num_long, long_input_len) < 1:
        raise ValueError("the chunked workload needs at least one decoder and one long request, each of at least "
                         f"one token; got {num_decoders} x {decoder_input_len} and {num_long} x {long_input_len}")
    rng = np.random.default_rng(seed)
    return (rng.integers(0, token_id_limit, size=(num_decoders, decoder_input_len)).tolist(),
            rng.integers(0, token_id_limit, size=(num_long, long_input_len)).tolist())


def parse_range(text: str) -> tuple[int, int]:
    """'100,1024' -> (100, 1024); a single number is a fixed length."""
    parts = [int(p) for p in text.replace(":", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise ValueError(f"a length range is LO,HI with 1 <= LO <= HI, got {text!r}")
    return parts[0], parts[1]


BENCH_MODEL = "benchmarks/configs/qwen3-0.6b"


def default_bench_model() -> str:
    """The bench config relative to the working directory (the repo root), else to the checkout
    this package lives in."""
    if Path(BENCH_MODEL).exists():
        return BENCH_MODEL
    return str(Path(__file__).resolve().parents[2] / BENCH_MODEL)
