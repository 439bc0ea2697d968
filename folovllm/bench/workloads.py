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
