"""Turns a SchedulerOutput into one forward pass and the sampled tokens.

The runner keeps its own copy of every request it has seen (token ids, block ids, progress), so
the scheduler only sends what changed. Each step it flattens the scheduled tokens of all requests
into one batch: input ids, positions, the slot each new K/V goes to, block tables, query offsets
and context lengths. Logits are computed only for the last row of requests that sample this step
(a prompt chunk that does not reach the end of the prompt samples nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from folovllm.attention.backends.abstract import AttentionMetadata
from folovllm.core.sched.output import ModelRunnerOutput, SchedulerOutput
from folovllm.sample.metadata import build_sampling_metadata
from folovllm.sample.sampler import Sampler
from folovllm.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]          # prompt + generated so far
    num_prompt_tokens: int
    sampling_params: SamplingParams
    generator: torch.Generator | None
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor
    req_ids: list[str]
    sampling_req_ids: list[str]


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, block_size: int, vocab_size: int) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []

    def initialize_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> None:
        """One [2, num_blocks, block_size, KVH, D] tensor per layer, bound to its attention layer.
        Zeroed: masked-out slots are still read, and 0 * NaN from stale memory would be NaN."""
        from folovllm.attention.layer import Attention

        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_caches = []
        for layer in layers:
            cache = torch.zeros(2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim,
                                dtype=dtype, device=self.device)
            layer.kv_cache = cache
            self.kv_caches.append(cache)

    # ---- state -------------------------------------------------------------------------

    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in so.scheduled_new_reqs:
            params = new.sampling_params
            generator = None
            if params.seed is not None and not params.greedy:
                generator = torch.Generator(device=self.device).manual_seed(params.seed)
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.prompt_token_ids), len(new.prompt_token_ids), params,
                generator, list(new.block_ids), new.num_computed_tokens)
        for cached in so.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            if cached.resumed_from_preemption:
                state.block_ids = list(cached.new_block_ids)
            else:
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # ---- inputs ------------------------------------------------------------------------

    def _prepare_inputs(self, so: SchedulerOutput) -> BatchInputs:
        bs = self.block_size
        req_ids = list(so.num_scheduled_tokens)
        num_reqs = len(req_ids)
        ids, pos, slots = [], [], []
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
        seq_lens = np.zeros(num_reqs, dtype=np.int32)
        max_blocks = max(len(self.requests[r].block_ids) for r in req_ids)
        block_table = np.zeros((num_reqs, max_blocks), dtype=np.int32)
        logits_indices, sampling_req_ids = [], []
        for i, req_id in enumerate(req_ids):
            state = self.requests[req_id]
            n = so.num_scheduled_tokens[req_id]
            start = state.num_computed_tokens
            end = start + n
            positions = np.arange(start, end)
            block_ids = np.asarray(state.block_ids, dtype=np.int64)
            ids.append(np.asarray(state.token_ids[start:end], dtype=np.int64))
            pos.append(positions)
            slots.append(block_ids[positions // bs] * bs + positions % bs)
            block_table[i, :len(block_ids)] = block_ids
            query_start_loc[i + 1] = query_start_loc[i] + n
            seq_lens[i] = end
            state.num_computed_tokens = end
            if end == len(state.token_ids):
                logits_indices.append(query_start_loc[i + 1] - 1)
                sampling_req_ids.append(req_id)

        dev = self.device
        qsl_cpu = torch.from_numpy(query_start_loc)
        seq_lens_cpu = torch.from_numpy(seq_lens)
        md = AttentionMetadata(
            num_actual_tokens=int(query_start_loc[-1]),
            num_reqs=num_reqs,
            max_query_len=int(np.diff(query_start_loc).max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc=qsl_cpu.to(dev, non_blocking=True),
            seq_lens=seq_lens_cpu.to(dev, non_blocking=True),
            block_table=torch.from_numpy(block_table).to(dev, non_blocking=True),
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev, non_blocking=True),
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=seq_lens_cpu,
        )
        return BatchInputs(
            input_ids=torch.from_numpy(np.concatenate(ids)).to(dev, non_blocking=True),
            positions=torch.from_numpy(np.concatenate(pos)).to(dev, non_blocking=True),
            attn_metadata=md,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64).to(dev, non_blocking=True),
            req_ids=req_ids,
            sampling_req_ids=sampling_req_ids,
        )

    # ---- one step ----------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput([], [])
        batch = self._prepare_inputs(so)
        hidden = self.model(batch.input_ids, batch.positions, batch.attn_metadata)
        sampled: dict[str, list[int]] = {}
        req_logprobs: dict[str, list[dict[int, float]]] = {}
        if batch.sampling_req_ids:
            logits = self.model.compute_logits(hidden[batch.logits_indices])
            sampled, req_logprobs = self._sample(logits, batch.sampling_req_ids)
        want_logprobs = any(self.requests[r].sampling_params.logprobs is not None for r in batch.req_ids)
        return ModelRunnerOutput(
            req_ids=batch.req_ids,
            sampled_token_ids=[sampled.get(r, []) for r in batch.req_ids],
            logprobs=[req_logprobs.get(r) for r in batch.req_ids] if want_logprobs else None,
        )

    def _sample(self, logits: torch.Tensor, req_ids: list[str]):
        states = [self.requests[r] for r in req_ids]
        md = build_sampling_metadata(
            [s.sampling_params for s in states],
            [s.token_ids[:s.num_prompt_tokens] for s in states],
            [s.token_ids[s.num_prompt_tokens:] for s in states],
            {i: s.generator for i, s in enumerate(states) if s.generator is not None},
            self.vocab_size, self.device)
        out = self.sampler(logits, md)
        token_ids = out.sampled_token_ids.tolist()  # the one host sync of the step
        sampled, logprobs = {}, {}
        if out.logprobs is not None:
            lp_ids, lp_vals = out.logprob_token_ids.tolist(), out.logprobs.tolist()
        for i, (state, token_id) in enumerate(zip(states, token_ids)):
            state.token_ids.append(token_id)
            sampled[state.req_id] = [token_id]
            n = state.sampling_params.logprobs
            if n is not None and out.logprobs is not None:
                logprobs[state.req_id] = [dict(zip(lp_ids[i][:n + 1], lp_vals[i][:n + 1]))]
        return sampled, logprobs

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_sampled: int) -> None:
        """A forward pass as large as any step can be, before the KV cache exists, so the memory
        profile sees peak activations."""
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.arange(num_tokens, device=self.device)
        hidden = self.model(input_ids, positions, None)
        self.model.compute_logits(hidden[:num_sampled])
