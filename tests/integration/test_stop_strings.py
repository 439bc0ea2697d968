"""Stop strings through the whole engine, on a tiny model that has a tokenizer (one character per
id, see conftest.build_tiny_tokenizer).

The reference is transformers' greedy continuation decoded with the same tokenizer: a stop string
is cut out of that text, so the expected truncated text, the token at which the engine must stop,
and the finish and stop reasons all follow by hand. A request that a stop string ends must also
leave the scheduler: once generate returns, every KV block is free and the runner holds nothing.
"""

from __future__ import annotations

import pytest
import torch

from engine_internals import assert_all_blocks_free, assert_idle
from folovllm import LLM, SamplingParams

MAX_TOKENS = 16
NON_STOP_TOKENS = 10
PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48], [200, 13]]


@pytest.fixture(scope="module")
def model(tiny_models_with_tokenizer):
    return tiny_models_with_tokenizer["qwen3"]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(model, request):
    llm = LLM(model[0], device="cpu", max_model_len=64, block_size=8, max_num_seqs=4,
              async_scheduling=request.param)
    return llm


def hf_greedy(hf, prompt: list[int], n: int = MAX_TOKENS) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def expected_stop(tokenizer, ids: list[int], stop: str, include: bool):
    """(token ids, text) the engine must return when `stop` ends the greedy continuation `ids`:
    the tokens up to the one whose text completes the first occurrence of `stop`, and the text
    before it (with it, if include)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    pos = text.find(stop)
    assert pos != -1
    end = next(i for i in range(len(ids)) if stop in tokenizer.decode(ids[:i + 1], skip_special_tokens=True))
    return ids[:end + 1], text[:pos + len(stop)] if include else text[:pos]


def stop_string_of(tokenizer, ids: list[int], start: int = 4, length: int = 2) -> str:
    """A stop string taken from the middle of the continuation's text."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert len(text) >= start + length, text
    return text[start:start + length]


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


def test_tokenizer_is_loaded_and_round_trips(llm, model):
    tokenizer = llm.get_tokenizer()
    assert tokenizer is not None and len(tokenizer) == 320
    assert tokenizer.decode(list(range(3, 13))) == model[2].decode(list(range(3, 13))) == "!\"#$%&'()*"
    # A text prompt goes through the same tokenizer: one id per character.
    [out] = llm.generate(["abc"], greedy(), use_tqdm=False)
    assert out.prompt_token_ids == model[2]("abc").input_ids and len(out.prompt_token_ids) == 3
    ref = hf_greedy(model[1], out.prompt_token_ids)
    assert out.outputs[0].token_ids == ref
    assert out.outputs[0].text == model[2].decode(ref, skip_special_tokens=True)
    assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("include", [False, True], ids=["exclude_stop", "include_stop"])
def test_stop_string_alone(llm, model, include):
    _, hf, tokenizer = model
    prompt = PROMPTS[0]
    ref = hf_greedy(hf, prompt)
    stop = stop_string_of(tokenizer, ref)
    want_ids, want_text = expected_stop(tokenizer, ref, stop, include)
    assert len(want_ids) < MAX_TOKENS  # the stop string, not the length, ends it

    [out] = llm.generate([{"prompt_token_ids": prompt}],
                         greedy(stop=[stop], include_stop_str_in_output=include), use_tqdm=False)
    c = out.outputs[0]
    assert out.finished
    assert (c.text, c.token_ids, c.finish_reason, c.stop_reason) == (want_text, want_ids, "stop", stop)
    assert_all_blocks_free(llm)  # at once: the stop string finished the request in the scheduler
    assert_idle(llm)


@pytest.mark.parametrize("include", [False, True], ids=["exclude_stop", "include_stop"])
def test_stop_strings_in_a_batch_with_requests_that_do_not_stop(llm, model, include):
    """Requests 0 and 2 stop on a string (request 2 on the earlier of two); request 1 runs to
    its max_tokens alongside them and gets exactly transformers' tokens. It finishes last, but
    well before the other two could reach MAX_TOKENS: a stopped request that stayed scheduled
    would still hold its blocks when generate returns."""
    _, hf, tokenizer = model
    refs = [hf_greedy(hf, p) for p in PROMPTS]
    refs[1] = refs[1][:NON_STOP_TOKENS]
    stop0 = stop_string_of(tokenizer, refs[0], start=3)
    text2 = tokenizer.decode(refs[2], skip_special_tokens=True)
    late2, early2 = text2[6:7], text2[2:4]
    assert text2.find(late2) > text2.find(early2) + len(early2) - 1  # early2 completes first
    params = [greedy(stop=[stop0], include_stop_str_in_output=include),
              SamplingParams(temperature=0.0, max_tokens=NON_STOP_TOKENS, ignore_eos=True),
              greedy(stop=[late2, early2], include_stop_str_in_output=include)]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)

    for i, stop in ((0, stop0), (2, early2)):
        want_ids, want_text = expected_stop(tokenizer, refs[i], stop, include)
        assert len(want_ids) < NON_STOP_TOKENS
        c = outs[i].outputs[0]
        assert (c.text, c.token_ids, c.finish_reason, c.stop_reason) == (want_text, want_ids, "stop", stop), i
    c = outs[1].outputs[0]
    assert c.token_ids == refs[1] and c.finish_reason == "length" and c.stop_reason is None
    assert c.text == tokenizer.decode(refs[1], skip_special_tokens=True)
    assert_all_blocks_free(llm)
    assert_idle(llm)
