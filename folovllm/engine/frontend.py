"""What LLMEngine and AsyncLLM share: the three parts of one engine and how a step's outputs go
back to the core. They differ only in who steps the core (the caller, or a background thread)."""

from __future__ import annotations

from folovllm.config import EngineConfig
from folovllm.engine.core import EngineCore, EngineCoreOutputs
from folovllm.engine.output_processor import OutputProcessor
from folovllm.engine.parallel_sampling import fan_out
from folovllm.engine.processor import Processor, PromptType
from folovllm.engine.tokenizer import load_tokenizer
from folovllm.outputs import RequestOutput
from folovllm.request import Request, RequestStatus
from folovllm.sampling_params import SamplingParams


class EngineFrontend:
    """Processor (validation, tokenization) + EngineCore + OutputProcessor (detokenization, stop
    strings), built from one resolved config."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model_config
        self.tokenizer = load_tokenizer(config.model_config)
        self.processor = Processor(config.model_config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.engine_core = self._make_engine_core(config)

    def _make_engine_core(self, config: EngineConfig):
        """The core, or something with its add/abort/finish methods (AsyncLLM may put the core
        in a process of its own: engine/core_client.py)."""
        return EngineCore(config)

    def process_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                        arrival_time: float | None = None, stream: bool = True) -> list[Request]:
        """Validate and tokenize a request, register it with the OutputProcessor, and return what
        the caller hands to the core (EngineCore.add_request, each): the request itself, or for
        params.n > 1 its n sequences (engine/parallel_sampling.py), whose outputs come back merged
        under request_id. Bad input raises ValueError before anything is registered. To end the
        request in the core, abort output_processor.core_request_ids([request_id])."""
        request = self.processor.process(request_id, prompt, params, arrival_time, fan_out=True)
        if request.sampling_params.n == 1:
            self.output_processor.add_request(request, stream)
            return [request]
        children = fan_out(request)
        self.output_processor.add_request(request, stream, children)
        return children

    def _process_core_outputs(self, core_outputs: EngineCoreOutputs) -> list[RequestOutput]:
        """One step's RequestOutputs; the requests a stop string ended, or whose processing
        failed, are queued to end in the core too."""
        processed = self.output_processor.process(core_outputs.outputs, core_outputs.first_scheduled)
        self.engine_core.finish_requests(processed.stopped, RequestStatus.FINISHED_STOPPED)
        self.engine_core.finish_requests(processed.failed, RequestStatus.FINISHED_ERROR)
        return processed.outputs
