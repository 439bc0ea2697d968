"""The runner's persistent copy of every running request, as rows of numpy arrays.

Building a step's inputs is then a handful of vectorized gathers over the scheduled rows rather
than a Python loop over requests: at 256 concurrent requests a per-request loop costs milliseconds
per step, as much as the GPU work of a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from folovllm.sampling_params import SamplingParams


@dataclass
class StepInputs:
    """One step's flattened inputs, on the host."""
    input_ids: np.ndarray        # [T] int64
    positions: np.ndarray        # [T] int64
    slot_mapping: np.ndarray     # [T] int64
    query_start_loc: np.ndarray  # [R + 1] int32
    seq_lens: np.ndarray         # [R] int32
    block_table: np.ndarray      # [R, max_blocks] int32
    logits_indices: np.ndarray   # rows whose logits are sampled
    sampling_rows: np.ndarray    # batch rows (request indices in the step) that sample
    req_indices: np.ndarray      # [R] the requests' rows in the InputBatch
    max_query_len: int
    # Token rows whose input id is a token still being sampled by the previous step (async
    # scheduling), and the InputBatch row each belongs to.
    pending_tokens: np.ndarray
    pending_rows: np.ndarray


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, block_size: int) -> None:
        self.block_size = block_size
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        # Tokens sampled by steps in flight and not yet in token_ids (async scheduling).
        self.num_pending = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.req_id_to_index: dict[str, int] = {}
        self.num_removals = 0   # rows freed so far: unchanged means every row has its owner still
        # Bumped each time a row takes a new request: a token sampled for a row's earlier owner
        # (even one with the same request id) is recognised by its generation.
        self.row_generation = np.zeros(max_num_reqs, dtype=np.int64)
        self.free_rows = list(range(max_num_reqs - 1, -1, -1))
        self.sampling_params: list[SamplingParams | None] = [None] * max_num_reqs
        self.generators: dict[int, torch.Generator] = {}

    def add_request(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    block_ids: list[int], num_computed_tokens: int, generator: torch.Generator | None) -> None:
        row = self.free_rows.pop()
        self.req_id_to_index[req_id] = row
        self.row_generation[row] += 1
        n = len(prompt_token_ids)
        self.token_ids[row, :n] = prompt_token_ids
        self.num_tokens[row] = self.num_prompt_tokens[row] = n
        self.num_computed_tokens[row] = num_computed_tokens
        self.num_pending[row] = 0
        self.num_blocks[row] = 0
        self.set_blocks(row, block_ids, replace=True)
        self.sampling_params[row] = params
        if generator is not None:
            self.generators[row] = generator

    def remove_request(self, req_id: str) -> None:
        row = self.req_id_to_index.pop(req_id, None)
        if row is None:
            return
        self.num_removals += 1
        self.sampling_params[row] = None
        self.generators.pop(row, None)
        self.free_rows.append(row)

    def set_blocks(self, row: int, block_ids: list[int], replace: bool) -> None:
        start = 0 if replace else int(self.num_blocks[row])
        self.block_table[row, start:start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def prepare(self, req_ids: list[str], num_scheduled: list[int]) -> StepInputs:
        bs = self.block_size
        idx = np.fromiter((self.req_id_to_index[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        n = np.asarray(num_scheduled, dtype=np.int64)
        cu = np.cumsum(n)
        total = int(cu[-1])
        start = self.num_computed_tokens[idx]
        rows = np.repeat(idx, n)
        positions = np.repeat(start - (cu - n), n) + np.arange(total)
        end = start + n
        self.num_computed_tokens[idx] = end
        known = self.num_tokens[idx]
        samples = end == known + self.num_pending[idx]
        # Positions past the known tokens take the previous step's samples (on the device).
        pending_tokens = np.nonzero(positions >= np.repeat(known, n))[0]
        max_blocks = int(self.num_blocks[idx].max())
        query_start_loc = np.zeros(len(idx) + 1, dtype=np.int32)
        query_start_loc[1:] = cu
        return StepInputs(
            input_ids=self.token_ids[rows, positions],
            positions=positions,
            slot_mapping=self.block_table[rows, positions // bs].astype(np.int64) * bs + positions % bs,
            query_start_loc=query_start_loc,
            seq_lens=end.astype(np.int32),
            block_table=self.block_table[idx, :max_blocks],
            logits_indices=cu[samples] - 1,
            sampling_rows=np.nonzero(samples)[0],
            req_indices=idx,
            max_query_len=int(n.max()),
            pending_tokens=pending_tokens,
            pending_rows=rows[pending_tokens],
        )

    def append_tokens(self, rows: np.ndarray, token_ids: np.ndarray, pending: bool = False) -> None:
        """Record one sampled token per row; pending=True when each was counted in num_pending
        (sampled by a step whose output is only now back)."""
        self.token_ids[rows, self.num_tokens[rows]] = token_ids
        self.num_tokens[rows] += 1
        if pending:
            self.num_pending[rows] -= 1

    def prompt_and_output_ids(self, row: int) -> tuple[list[int], list[int]]:
        p, n = int(self.num_prompt_tokens[row]), int(self.num_tokens[row])
        return self.token_ids[row, :p].tolist(), self.token_ids[row, p:n].tolist()
