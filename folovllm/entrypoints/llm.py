"""LLM: the offline class vLLM users know. `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from tqdm.auto import tqdm

from folovllm.engine.arg_utils import EngineArgs
from folovllm.entrypoints.chat_utils import apply_chat_template
from folovllm.engine.core import freeze_startup_heap
from folovllm.engine.llm_engine import LLMEngine
from folovllm.engine.processor import PromptType
from folovllm.outputs import RequestOutput
from folovllm.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs.from_kwargs(model=model, **kwargs))
        # As the engine-core process and the server do: the start-up heap out of the collector's
        # full passes, which otherwise walk it in the middle of a batch (host time before a step).
        self.llm_engine.startup_times["gc_freeze"] = freeze_startup_heap()

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.reset_prefix_cache()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in the order of the prompts, one per prompt (with SamplingParams.n > 1, one
        holding n CompletionOutputs). A single prompt may be passed bare."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else sampling_params
        return self._run_engine(*self.llm_engine.iter_batch(list(prompts), params), use_tqdm)

    def _run_engine(self, ids: list[str], outputs: Generator[RequestOutput, None, None],
                    use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        num_out_tokens = 0
        try:
            for out in outputs:
                if out.finished:
                    final[out.request_id] = out
                    num_out_tokens += sum(len(c.token_ids) for c in out.outputs)
                    bar.update(1)
                    elapsed = bar.format_dict["elapsed"] or 1e-9
                    bar.set_postfix_str(f"output {num_out_tokens / elapsed:.1f} tok/s", refresh=False)
        finally:
            bar.close()
            # close now, not when the generator is collected: a traceback kept by the caller
            # (an interrupted notebook cell, say) would keep the batch running in the engine
            outputs.close()
        return [final[i] for i in ids]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or several, through the
        tokenizer's chat template."""
        # One conversation (a list of message dicts), or several (a list of such lists); anything
        # else goes to the validator as one conversation, for its clear error.
        several = isinstance(messages, list) and messages and all(isinstance(m, list) for m in messages)
        conversations = messages if several else [messages]
        prompts = [{"prompt_token_ids": apply_chat_template(
            self.get_tokenizer(), conv, add_generation_prompt=add_generation_prompt,
            chat_template=chat_template, **template_kwargs)} for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
