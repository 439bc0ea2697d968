"""Turns a SchedulerOutput into one forward pass and the sampled tokens.

The runner keeps its own copy of every request it has seen (InputBatch), so the scheduler only
sends what changed. Each step it flattens the scheduled tokens of all requests into one batch
(input ids, positions, the slot each new K/V goes to, block tables, query offsets, context
lengths), copies it into persistent device buffers, runs the model, and computes logits only for
the last row of each request that samples (a prompt chunk that stops short of the prompt's end
samples nothing).

On a GPU, steps replay CUDA graphs: pure-decode steps by batch size, prefill and mixed steps of a
few requests by token count. The batch is padded to the graph's shape with rows whose slot is -1
(their K/V is never written).

With async scheduling (execute_model(..., non_block=True)) the step returns as soon as its work is
queued: the sampled ids come back through a StepOutput whose get() waits for them. The next step
may already be scheduled by then; its decode rows whose input is a token still in flight take it
straight from the previous step's sampled-ids tensor on the device.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from folovllm.attention.backends.abstract import AttentionMetadata
from folovllm.attention.layer import Attention
from folovllm.config import EngineConfig
from folovllm.core.sched.output import ModelRunnerOutput, SchedulerOutput
from folovllm.sample.metadata import build_sampling_metadata
from folovllm.sample.sampler import Sampler
from folovllm.worker.input_batch import InputBatch, StepInputs



# Prefill and mixed steps replay graphs too, by padded token count up to the step budget and by
# request count in two tiers (a few requests, or up to max_num_seqs: a chunk next to a full batch
# of decodes): eager, their ~310 kernel launches cost several milliseconds of Python (most of a
# short prompt's TTFT, and most of a mixed step's time next to running decodes).
MIXED_GRAPH_TOKENS = [16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
MIXED_GRAPH_MAX_REQS = 16


def mixed_graph_shapes(max_num_tokens: int, max_model_len: int, tiers: list[int]) -> list[tuple[int, int]]:
    """(padded token count, request tier) of the mixed-step graphs: every size of
    MIXED_GRAPH_TOKENS below the largest step a tier can hold (the step budget, or the largest
    tier's requests times max_model_len if that is less), and that largest step, in each tier that
    could hold a step of that many tokens. No request holds more than max_model_len tokens, so a
    size above it needs ceil(size / max_model_len) requests: a tier with fewer never sees such a
    step."""
    cap = min(max_num_tokens, max(tiers) * max_model_len)   # the largest step any tier can hold
    sizes = [s for s in MIXED_GRAPH_TOKENS if s < cap] + [cap]
    return [(s, r) for s in sizes for r in tiers if -(-s // max_model_len) <= r]


def mixed_capture_rows(size: int, max_model_len: int) -> list[int]:
    """The rows of each request a mixed graph of `size` tokens is captured with: as few requests
    as hold them at no more than max_model_len each (positions and block tables stay in range)."""
    return [min(max_model_len, size - start) for start in range(0, size, max_model_len)]


def default_graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, 1025, 32))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class ModelRunner:
    def __init__(self, config: EngineConfig, model: nn.Module, device: torch.device) -> None:
        sc = config.scheduler_config
        max_num_reqs, max_model_len = sc.max_num_seqs, config.model_config.max_model_len
        max_num_tokens = max(sc.max_num_batched_tokens, sc.max_num_seqs)
        self.model = model
        self.device = device
        self.dtype = config.model_config.dtype
        self.block_size = block_size = config.cache_config.block_size
        self.vocab_size = config.model_config.vocab_size
        self.max_num_reqs = max_num_reqs
        self.max_num_tokens = max_num_tokens
        self.sampler = Sampler()
        self.input_batch = InputBatch(max_num_reqs, max_model_len, block_size)
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.use_cuda_graph = not config.enforce_eager and device.type == "cuda" and all(
            getattr(layer.impl, "supports_cuda_graph", False) for layer in self.attn_layers)
        # (pure decode?, padded token count, padded request count, longest context served) -> graph
        self.graphs: dict[tuple[bool, int, int, int], torch.cuda.CUDAGraph] = {}
        self.mixed_graph_reqs = sorted({min(MIXED_GRAPH_MAX_REQS, max_num_reqs), max_num_reqs})
        self.graph_hidden: torch.Tensor | None = None

        # Persistent device buffers: a captured graph reads exactly these addresses. Pinned host
        # twins make the per-step copies asynchronous.
        pin = device.type == "cuda"
        max_blocks = self.input_batch.block_table.shape[1]

        def buffers(shape, dtype, fill=0):
            host = torch.full(shape, fill, dtype=dtype, pin_memory=pin)
            dev = host if device.type == "cpu" else host.to(device)
            return host, host.numpy(), dev

        self._input_ids_cpu, self._input_ids_np, self.input_ids = buffers((max_num_tokens,), torch.int64)
        self._positions_cpu, self._positions_np, self.positions = buffers((max_num_tokens,), torch.int64)
        self._slots_cpu, self._slots_np, self.slot_mapping = buffers((max_num_tokens,), torch.int64, -1)
        self._qsl_cpu, self._qsl_np, self.query_start_loc = buffers((max_num_reqs + 1,), torch.int32)
        self._seq_lens_cpu, self._seq_lens_np, self.seq_lens = buffers((max_num_reqs,), torch.int32)
        self._block_table_cpu, self._block_table_np, self.block_table = buffers((max_num_reqs, max_blocks),
                                                                                torch.int32)
        # Async scheduling: staging for the gather of in-flight input ids (destination token rows,
        # source entries), the last step's sampled ids on the device, the entry of each InputBatch
        # row in it (-1: none), and the steps whose outputs nobody has read yet.
        self._pend_dst_cpu, self._pend_dst_np, self._pend_dst = buffers((max_num_reqs,), torch.int64)
        self._pend_src_cpu, self._pend_src_np, self._pend_src = buffers((max_num_reqs,), torch.int64)
        self._prev_sampled: torch.Tensor | None = None
        self._prev_index = np.full(max_num_reqs, -1, dtype=np.int64)
        self._unread: list[StepOutput] = []

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """One [2, num_blocks, block_size, KVH, D] tensor per layer, bound to its attention layer.
        On a GPU zeroed: its kernels read masked-out slots, and 0 * NaN from stale memory would be
        NaN. On a CPU (the torch backend) left as allocated, so the OS commits pages only as blocks
        are first written (the engine's default cache there is GiBs): that backend reads only
        written slots (a decode row's padding repeats its first slot; a prefill reads its own
        context, all written)."""
        dtype = self.dtype
        for layer in self.attn_layers:
            shape = (2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            if self.device.type == "cpu":
                cache = torch.empty(shape, dtype=dtype)
            else:
                cache = torch.zeros(shape, dtype=dtype, device=self.device)
            layer.kv_cache = cache

    # ---- state -------------------------------------------------------------------------

    def _update_states(self, so: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in so.finished_req_ids:
            batch.remove_request(req_id)
        for req_id in so.preempted_req_ids:
            # Its recompute reads every token from the host: no input may come from a sample
            # still in flight.
            row = batch.req_id_to_index.get(req_id)
            if row is not None:
                self._prev_index[row] = -1
        for new in so.scheduled_new_reqs:
            params = new.sampling_params
            generator = None
            if params.seed is not None and not params.greedy:
                seed = params.seed
                if self.device.type == "cpu":
                    # The CPU generator (mt19937) keeps only the low 32 bits of a seed: fold the
                    # high ones in, so seeds that differ only there still draw differently
                    # (seeds below 2**32 are unchanged).
                    seed = (seed ^ (seed >> 32)) & 0xFFFFFFFF
                generator = torch.Generator(device=self.device).manual_seed(seed)
            batch.add_request(new.req_id, new.prompt_token_ids, params, new.block_ids,
                              new.num_computed_tokens, generator)
        if any(c.resumed_from_preemption for c in so.scheduled_cached_reqs):
            self.read_all_outputs()  # a recompute reads every token of the request from the host
        for cached in so.scheduled_cached_reqs:
            row = batch.req_id_to_index[cached.req_id]
            batch.set_blocks(row, cached.new_block_ids, replace=cached.resumed_from_preemption)
            batch.num_computed_tokens[row] = cached.num_computed_tokens

    # ---- inputs ------------------------------------------------------------------------

    def _graph_key(self, step: StepInputs, num_tokens: int) -> tuple[bool, int, int, int] | None:
        """The captured graph a step replays, if any: pure-decode steps by batch size (and by the
        longest context, where the attention backend launches differently for long ones), other
        steps by token count and request tier."""
        if not self.graphs:
            return None
        decode = step.max_query_len == 1
        r = len(step.seq_lens)
        longest = int(step.seq_lens.max()) if r else 0
        return next((key for key in self._graph_keys
                     if key[0] == decode and key[1] >= num_tokens and key[2] >= r and key[3] >= longest), None)

    def _copy_inputs(self, step: StepInputs, graph_key: tuple[bool, int] | None) -> AttentionMetadata:
        """Stage the step's inputs in the pinned buffers and copy them to the device. A step that
        replays a graph is padded to the graph's shape: extra token rows get slot -1 (nothing is
        written); a decode graph makes each extra row a request with a one-token context, a mixed
        graph gives its extra requests no rows at all."""
        t, r = len(step.input_ids), len(step.seq_lens)
        mb = step.block_table.shape[1]
        self._input_ids_np[:t] = step.input_ids
        self._positions_np[:t] = step.positions
        self._slots_np[:t] = step.slot_mapping
        self._qsl_np[:r + 1] = step.query_start_loc
        self._seq_lens_np[:r] = step.seq_lens
        self._block_table_np[:r, :mb] = step.block_table
        padded, num_reqs = t, r
        if graph_key is not None:
            decode, padded, graph_reqs, _ = graph_key
            self._input_ids_np[t:padded] = 0
            self._positions_np[t:padded] = 0
            self._slots_np[t:padded] = -1
            if decode:
                num_reqs = padded
                self._qsl_np[r + 1:num_reqs + 1] = np.arange(t + 1, padded + 1)
                self._seq_lens_np[r:num_reqs] = 1
            else:
                num_reqs = graph_reqs
                self._qsl_np[r + 1:num_reqs + 1] = t
                self._seq_lens_np[r:num_reqs] = 0
        if self.device.type != "cpu":
            self.input_ids[:padded].copy_(self._input_ids_cpu[:padded], non_blocking=True)
            self.positions[:padded].copy_(self._positions_cpu[:padded], non_blocking=True)
            self.slot_mapping[:padded].copy_(self._slots_cpu[:padded], non_blocking=True)
            self.query_start_loc[:num_reqs + 1].copy_(self._qsl_cpu[:num_reqs + 1], non_blocking=True)
            self.seq_lens[:num_reqs].copy_(self._seq_lens_cpu[:num_reqs], non_blocking=True)
            self.block_table[:r, :mb].copy_(self._block_table_cpu[:r, :mb], non_blocking=True)
        return self._metadata(num_reqs, padded, t, step.max_query_len, int(step.seq_lens.max()))

    def _metadata(self, num_reqs: int, num_tokens: int, num_actual: int, max_query_len: int,
                  max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_actual_tokens=num_actual, num_reqs=num_reqs, max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            query_start_loc=self.query_start_loc[:num_reqs + 1], seq_lens=self.seq_lens[:num_reqs],
            block_table=self.block_table[:num_reqs], slot_mapping=self.slot_mapping[:num_tokens],
            query_start_loc_cpu=self._qsl_cpu[:num_reqs + 1], seq_lens_cpu=self._seq_lens_cpu[:num_reqs])

    # ---- one step ----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, so: SchedulerOutput) -> tuple[torch.Tensor, StepInputs]:
        """Run the model over the step's tokens: hidden states of every scheduled row."""
        self._update_states(so)
        if so.copy_blocks:
            self._copy_blocks(so.copy_blocks)
        step = self.input_batch.prepare(list(so.num_scheduled_tokens), list(so.num_scheduled_tokens.values()))
        t = len(step.input_ids)
        graph_key = self._graph_key(step, t)
        md = self._copy_inputs(step, graph_key)
        if len(step.pending_tokens):
            self._fill_pending_inputs(step)
        if graph_key is not None:
            self.graphs[graph_key].replay()
            return self.graph_hidden[:t], step
        return self.model(self.input_ids[:t], self.positions[:t], md), step

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: each (source, destination) block's K and V, in every layer, queued before
        the forward pass that writes into the destinations (never inside a captured graph)."""
        src = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=self.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=self.device)
        for layer in self.attn_layers:
            layer.kv_cache[:, dst] = layer.kv_cache[:, src]

    def _fill_pending_inputs(self, step: StepInputs) -> None:
        """Input ids that the previous step is still sampling: gather them from its sampled-ids
        tensor into the step's input buffer, on the device (no wait for the host)."""
        src = self._prev_index[step.pending_rows]
        assert self._prev_sampled is not None and (src >= 0).all(), "input token neither known nor in flight"
        k = len(src)
        if self.device.type == "cpu":
            self.input_ids[step.pending_tokens] = self._prev_sampled[torch.from_numpy(src)]
            return
        self._pend_dst_np[:k] = step.pending_tokens
        self._pend_src_np[:k] = src
        dst = self._pend_dst[:k]
        dst.copy_(self._pend_dst_cpu[:k], non_blocking=True)
        self._pend_src[:k].copy_(self._pend_src_cpu[:k], non_blocking=True)
        self.input_ids.index_copy_(0, dst, self._prev_sampled.index_select(0, self._pend_src[:k]))

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput, non_block: bool = False) -> "ModelRunnerOutput | StepOutput":
        """Run one step. Returns its output, or with non_block=True a StepOutput whose result()
        waits for it (the GPU work is queued; nothing has synchronised yet)."""
        self._record_arrived()
        if so.total_num_scheduled_tokens == 0:
            self.read_all_outputs()  # nothing runs now: nothing to overlap with
            self._update_states(so)
            out = StepOutput.ready(ModelRunnerOutput([], []))
        else:
            hidden, step = self.forward(so)
            t = len(step.input_ids)
            out = StepOutput(list(so.num_scheduled_tokens), self.input_batch.num_removals)
            if len(step.sampling_rows):
                if len(step.logits_indices) == t:  # every row samples (pure decode): no gather
                    logits = self.model.compute_logits(hidden)
                else:
                    idx = torch.from_numpy(step.logits_indices).to(self.device, non_blocking=True)
                    logits = self.model.compute_logits(hidden[idx])
                self._sample(logits, step, out)
            self._unread.append(out)
        if non_block:
            return out
        self.read_all_outputs()
        return out.result()

    def _sample(self, logits: torch.Tensor, step: StepInputs, out: "StepOutput") -> None:
        batch = self.input_batch
        rows = step.req_indices[step.sampling_rows]
        params = [batch.sampling_params[r] for r in rows]
        num_output = (batch.num_tokens[rows] + batch.num_pending[rows] - batch.num_prompt_tokens[rows]).tolist()
        generators = {i: batch.generators[r] for i, r in enumerate(rows) if r in batch.generators}

        def token_ids():
            self.read_all_outputs()  # penalties need every earlier token on the host
            pairs = [batch.prompt_and_output_ids(r) for r in rows]
            return [p for p, _ in pairs], [o for _, o in pairs]

        md = build_sampling_metadata(params, num_output, generators, self.vocab_size, self.device, token_ids)
        sampled = self.sampler(logits, md)
        # The next step's rows that decode from these tokens read them here, on the device.
        self._prev_index[self._prev_index >= 0] = -1
        self._prev_index[rows] = np.arange(len(rows))
        self._prev_sampled = sampled.sampled_token_ids
        batch.num_pending[rows] += 1
        out.set_sampled(rows, step.sampling_rows, params, sampled, batch.row_generation[rows].copy())

    def read_all_outputs(self) -> None:
        """Wait for every step still in flight and record its tokens (in step order)."""
        while self._unread:
            self._record(self._unread[0])

    def _record_arrived(self) -> None:
        """Record the tokens of every step but the newest, oldest first (by now the engine has
        read them, so they have arrived). The newest stays pending even if its tokens are back:
        the next step's inputs take them on the device, the same path whatever the device's
        timing, so a CPU run exercises what a GPU run does."""
        while len(self._unread) > 1:
            self._record(self._unread[0])

    def _record(self, out: StepOutput) -> None:
        """Append a step's sampled tokens to the InputBatch rows of their requests (unless a
        request left meanwhile: its row may hold another one by now)."""
        assert out is self._unread[0], "steps are recorded in order"
        self._unread.pop(0)
        if out._sampled is None:
            return
        rows, generations, ids_np = out.sampled_rows()
        batch = self.input_batch
        if batch.num_removals != out.removals:
            keep = batch.row_generation[rows] == generations
            rows, ids_np = rows[keep], ids_np[keep]
        batch.append_tokens(rows, ids_np, pending=True)

    # ---- start-up ----------------------------------------------------------------------

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_sampled: int) -> None:
        """A forward pass as large as any step can be, before the KV cache exists, so the memory
        profile sees peak activations."""
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        # Positions stay inside the rotary table even when the token budget exceeds max_model_len.
        positions = torch.arange(num_tokens, device=self.device) % self.input_batch.max_model_len
        hidden = self.model(input_ids, positions, None)
        self.model.compute_logits(hidden[:num_sampled])

    @torch.inference_mode()
    def warm_up_sampler(self) -> bool:
        """Compile the fused sampler's kernel variants now (GPU only), rather than in the first
        steps that need them. Returns whether there was anything to do."""
        if self.device.type != "cuda" or self.sampler.fused is False:
            return False
        from folovllm.sample import triton_sampler
        triton_sampler.warm_up(self.vocab_size, self.max_num_reqs, self.device, self.model.lm_head.weight.dtype)
        return True

    @torch.inference_mode()
    def capture_cuda_graphs(self, batch_sizes: list[int]) -> float:
        """Capture the model's forward for pure-decode batches of each size, and for prefill or
        mixed steps by padded token count (up to the step's token budget) in each request tier.
        Returns the seconds spent."""
        if not self.use_cuda_graph:
            return 0.0
        t0 = time.perf_counter()
        max_len = self.input_batch.max_model_len
        impl = self.attn_layers[0].impl
        keys = [(True, s, s, bound) for s in batch_sizes if s <= min(self.max_num_reqs, self.max_num_tokens)
                for bound in impl.decode_graph_bounds(s, max_len, self.device)]
        keys += [(False, s, r, max_len)
                 for s, r in mixed_graph_shapes(self.max_num_tokens, max_len, self.mixed_graph_reqs)]
        keys.sort(key=lambda k: k[1:], reverse=True)  # largest first: later graphs reuse its memory
        pool = torch.cuda.graph_pool_handle()
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(-1)  # capture writes nothing to the cache
        self.block_table.zero_()
        for decode, size, num_reqs, bound in keys:
            if decode:  # `size` requests of one query row and a one-token context each
                max_q = 1
                self.query_start_loc.copy_(torch.arange(self.max_num_reqs + 1, dtype=torch.int32,
                                                        device=self.device))
                self.seq_lens.fill_(1)
                # the graph serves contexts up to `bound`: attention picks its launch for that
                max_seq = bound
            else:  # the rows in as few requests as hold them (mixed_capture_rows); the others empty
                rows = mixed_capture_rows(size, max_len)
                max_q = max_seq = max(rows)
                self.query_start_loc.fill_(size)
                self.query_start_loc[:len(rows) + 1] = torch.tensor(np.cumsum([0] + rows), dtype=torch.int32)
                self.seq_lens.zero_()
                self.seq_lens[:len(rows)] = torch.tensor(rows, dtype=torch.int32)
            md = self._metadata(num_reqs, size, size, max_q, max_seq)
            out = self.model(self.input_ids[:size], self.positions[:size], md)  # compile and warm up
            if self.graph_hidden is None:
                # Every graph writes its hidden states here, so a replay's result has a fixed home.
                self.graph_hidden = torch.empty((size, out.shape[-1]), dtype=out.dtype, device=self.device)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(self.input_ids[:size], self.positions[:size], md)
                self.graph_hidden[:size].copy_(out)
            self.graphs[(decode, size, num_reqs, bound)] = graph
        self._graph_keys = sorted(self.graphs, key=lambda k: k[1:])
        torch.cuda.synchronize()
        return time.perf_counter() - t0


class StepOutput:
    """One step's result, ready once the device has finished it. The sampled ids (and logprobs)
    are copied to pinned host memory behind the step's work and an event marks their arrival.
    result() waits for that event and returns the ModelRunnerOutput (idempotent); it changes
    nothing in the runner, so the engine may call it from anywhere. The runner itself records
    the tokens in its InputBatch (ModelRunner._record) once they have arrived."""

    def __init__(self, req_ids: list[str], removals: int = 0) -> None:
        self.req_ids = req_ids
        self.removals = removals  # InputBatch.num_removals when the step was sampled
        self._sampled = None
        self._generations: np.ndarray | None = None  # of the sampled rows, when sampled
        self._result: ModelRunnerOutput | None = None

    @classmethod
    def ready(cls, result: ModelRunnerOutput) -> "StepOutput":
        out = cls(result.req_ids)
        out._result = result
        return out

    def set_sampled(self, rows: np.ndarray, sampling_rows: np.ndarray, params: list, sampled,
                    generations: np.ndarray) -> None:
        self._generations = generations
        cuda = sampled.sampled_token_ids.is_cuda
        host = [None if t is None else t.to("cpu", non_blocking=True)
                for t in (sampled.sampled_token_ids, sampled.logprob_token_ids, sampled.logprobs)]
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._sampled = (rows, sampling_rows, params, host, event)

    def sampled_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(InputBatch rows, their generations, sampled ids) once arrived; for the runner's
        records."""
        self.result()
        rows, _, _, (ids, _, _), _ = self._sampled
        return rows, self._generations, ids.numpy()

    def result(self) -> ModelRunnerOutput:
        if self._result is not None:
            return self._result
        sampled: list[list[int]] = [[] for _ in self.req_ids]
        logprobs = None
        if self._sampled is not None:
            rows, sampling_rows, params, (ids, lp_ids, lp_vals), event = self._sampled
            if event is not None:
                event.synchronize()   # the one host sync of the step
            for i, tok in zip(sampling_rows.tolist(), ids.tolist()):
                sampled[i] = [tok]
            if lp_ids is not None:
                logprobs = [None] * len(sampled)
                lp_ids, lp_vals = lp_ids.tolist(), lp_vals.tolist()
                for j, (i, p) in enumerate(zip(sampling_rows.tolist(), params)):
                    if p.logprobs is not None:
                        logprobs[i] = [dict(zip(lp_ids[j][:p.logprobs + 1], lp_vals[j][:p.logprobs + 1]))]
        self._result = ModelRunnerOutput(req_ids=self.req_ids, sampled_token_ids=sampled, logprobs=logprobs)
        return self._result
