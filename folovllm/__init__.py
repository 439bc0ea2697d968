"""FoloVLLM: a compact LLM inference engine laid out like vLLM v1."""

from folovllm.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from folovllm.engine.arg_utils import EngineArgs
from folovllm.engine.llm_engine import LLMEngine
from folovllm.entrypoints.llm import LLM
from folovllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from folovllm.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM", "LLMEngine", "SamplingParams", "ModelConfig", "CacheConfig", "SchedulerConfig",
    "ParallelConfig", "EngineConfig", "EngineArgs", "RequestOutput", "CompletionOutput",
    "RequestMetrics",
]
