"""Streaming and final-only outputs carry the same tokens and text; stop strings end a request in
either mode."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from folovllm.core.sched.scheduler import EngineCoreOutput
from folovllm.engine.output_processor import OutputProcessor
from folovllm.request import Request
from folovllm.sampling_params import SamplingParams

WORDS = ["hello", "world", "stop", "here", "again", "!"]


def word_tokenizer():
    vocab = {w: i for i, w in enumerate(WORDS)} | {"[UNK]": len(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def run(stream: bool, params: SamplingParams, tokens: list[int]):
    proc = OutputProcessor(word_tokenizer())
    proc.add_request(Request("r", [0], params), stream=stream)
    seen, stopped = [], []
    for i, t in enumerate(tokens):
        last = i == len(tokens) - 1
        result = proc.process([EngineCoreOutput("r", [t], finish_reason="length" if last else None)])
        outs = result.outputs
        seen += outs
        stopped += result.stopped
        if outs and outs[-1].finished:
            break
    return seen, stopped


def test_final_only_gives_one_output_equal_to_the_last_streamed_one():
    params = SamplingParams(max_tokens=4)
    streamed, _ = run(True, params, [0, 1, 4, 1])
    final, _ = run(False, params, [0, 1, 4, 1])
    assert len(streamed) == 4 and len(final) == 1
    assert final[0].finished and final[0].outputs[0].token_ids == [0, 1, 4, 1]
    assert final[0].outputs[0].text == streamed[-1].outputs[0].text == "hello world again world"


def test_stop_string_ends_request_in_both_modes():
    for stream in (True, False):
        outs, stopped = run(stream, SamplingParams(max_tokens=10, stop=["stop"]), [0, 1, 2, 3, 4])
        assert stopped == ["r"], stream
        last = outs[-1]
        assert last.finished and last.outputs[0].finish_reason == "stop"
        assert last.outputs[0].stop_reason == "stop"
        assert last.outputs[0].text == "hello world "
        assert last.outputs[0].token_ids == [0, 1, 2]
