"""Completions and chat through the real openai client: streamed == not streamed, greedy tokens
and logprobs == the offline LLM's, usage counts, batches of prompts, 64 concurrent streams,
/v1/models, /tokenize and /detokenize."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from server_support import CHAT_TEMPLATE, MODEL_NAME
from folovllm import SamplingParams

PROMPT = "def!quicksort(arr):"


def offline_one(served, prompt, **kw):
    params = SamplingParams(**kw)
    return served.offline.generate([prompt], params, use_tqdm=False)[0]


def streamed_text(stream) -> tuple[str, list, object]:
    text, chunks, usage = "", [], None
    for chunk in stream:
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.text if hasattr(c, "text") else (c.delta.content or "")
    return text, chunks, usage


def test_models(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_completion_greedy_matches_offline_and_stream(served):
    client = served.client()
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    ref = offline_one(served, PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert full.object == "text_completion" and full.model == MODEL_NAME and full.id.startswith("cmpl-")
    choice = full.choices[0]
    assert choice.text == ref.outputs[0].text and choice.finish_reason == "length"
    assert full.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert full.usage.completion_tokens == 8 and full.usage.total_tokens == len(ref.prompt_token_ids) + 8

    text, chunks, usage = streamed_text(client.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert text == choice.text and len(chunks) >= 3
    assert chunks[-1].choices == [] and usage.completion_tokens == 8
    assert chunks[-2].choices[0].finish_reason == "length"
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_seeded_sampling_stream_equals_non_stream(served):
    client = served.client()
    kw = dict(model=MODEL_NAME, prompt="abc", max_tokens=10, temperature=1.0, seed=1234,
              extra_body={"ignore_eos": True, "top_k": 50})
    full = client.completions.create(**kw).choices[0].text
    text, _, _ = streamed_text(client.completions.create(**kw, stream=True))
    assert text == full
    assert full == offline_one(served, "abc", max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True,
                               top_k=50).outputs[0].text


def test_completion_logprobs_shape_and_values(served):
    client = served.client()
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0.0,
                                    logprobs=3, extra_body={"ignore_eos": True})
    ref = offline_one(served, PROMPT, max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3).outputs[0]
    lp = out.choices[0].logprobs
    tok = served.tokenizer
    assert lp.tokens == [tok.decode([t]) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx([ref.logprobs[i][t] for i, t in enumerate(ref.token_ids)], abs=1e-4)
    assert all(len(top) >= 3 for top in lp.top_logprobs)
    for top, ref_top in zip(lp.top_logprobs, ref.logprobs):
        assert top == pytest.approx({tok.decode([t]): v for t, v in ref_top.items()}, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    # The stream carries the same logprobs, a piece at a time.
    streamed = []
    for chunk in client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0.0,
                                           logprobs=3, stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_batch_of_prompts_and_token_ids(served):
    client = served.client()
    prompts = ["abc", "xyz!", "hello"]
    out = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=4, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    refs = served.offline.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                                   use_tqdm=False)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [r.outputs[0].text for r in refs]
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)
    assert out.usage.completion_tokens == 12
    ids = served.tokenizer("abc").input_ids
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=4, temperature=0.0,
                                       echo=True, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == served.tokenizer.decode(ids) + refs[0].outputs[0].text


def chat_messages():
    return [{"role": "system", "content": "be!brief"}, {"role": "user", "content": "hi!there"}]


def test_chat_matches_offline_and_stream(served):
    client = served.client()
    kw = dict(model=MODEL_NAME, messages=chat_messages(), max_completion_tokens=6, temperature=0.0,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    ref = served.offline.chat(chat_messages(), SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                              use_tqdm=False, chat_template=CHAT_TEMPLATE)[0]
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == ref.outputs[0].text
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(ref.prompt_token_ids) and full.usage.completion_tokens == 6

    stream = client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    text, chunks, usage = streamed_text(stream)
    assert text == ref.outputs[0].text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and usage.total_tokens == full.usage.total_tokens


def test_chat_logprobs(served):
    client = served.client()
    out = client.chat.completions.create(model=MODEL_NAME, messages=chat_messages(), max_tokens=4,
                                         temperature=0.0, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    ref = served.offline.chat(chat_messages(), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                              logprobs=2),
                              use_tqdm=False, chat_template=CHAT_TEMPLATE)[0].outputs[0]
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry, tid, ref_lp in zip(content, ref.token_ids, ref.logprobs):
        text = served.tokenizer.decode([tid])
        assert entry.token == text and entry.bytes == list(text.encode())
        assert entry.logprob == pytest.approx(ref_lp[tid], abs=1e-4)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == text  # greedy: the sampled token is the best one


def test_64_concurrent_streams_get_offline_tokens(served):
    import openai

    prompts = [f"p{i}q{'x' * (i % 7)}" for i in range(64)]
    refs = served.offline.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                                   use_tqdm=False)

    async def one(client, prompt):
        text = ""
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0.0,
                                                 stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    async def main():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0,
                                      http_client=openai.DefaultAsyncHttpxClient(
                                          limits=httpx.Limits(max_connections=64))) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    texts = asyncio.run(main())
    assert texts == [r.outputs[0].text for r in refs]


def test_tokenize_and_detokenize(served):
    r = httpx.post(served.url + "/tokenize", json={"prompt": PROMPT}).json()
    ids = served.tokenizer(PROMPT).input_ids
    assert r == {"tokens": ids, "count": len(ids), "max_model_len": served.engine.model_config.max_model_len}
    chat = httpx.post(served.url + "/tokenize", json={"messages": chat_messages()}).json()
    want = served.tokenizer.apply_chat_template(chat_messages(), chat_template=CHAT_TEMPLATE,
                                                add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert chat["tokens"] == list(want)
    back = httpx.post(served.url + "/detokenize", json={"tokens": ids}).json()
    assert back == {"prompt": served.tokenizer.decode(ids)}


def test_token_ids_without_a_tokenizer_match_transformers(served, tiny_models):
    """A model without tokenizer files: token-id prompts only, logprob tokens spelled
    `token_id:N`, and the greedy ids are transformers' own."""
    import torch

    _, hf = tiny_models["llama"]
    client = openai_client(served.ids_url)
    prompts = [[5, 17, 42, 99], [7, 8]]
    out = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6, temperature=0.0, logprobs=0,
                                    extra_body={"ignore_eos": True})
    for choice, prompt in zip(out.choices, prompts):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert choice.logprobs.tokens == [f"token_id:{t}" for t in want]
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 12
    r = httpx.post(served.ids_url + "/v1/completions", json={"prompt": "text", "max_tokens": 2})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]


def openai_client(url):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_return_token_ids_without_a_tokenizer(served, tiny_models):
    """vLLM's return_token_ids: with no tokenizer the text is empty, so the ids are how a client
    (bench serve) sees tokens arrive. Non-streamed and streamed give transformers' greedy ids;
    the prompt's ids come once, with the first chunk."""
    import json

    import torch

    _, hf = tiny_models["llama"]
    prompt = [5, 17, 42, 99]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False, min_new_tokens=7,
                           pad_token_id=0)[0, len(prompt):].tolist()
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 7, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    full = httpx.post(served.ids_url + "/v1/completions", json=body, timeout=30).json()["choices"][0]
    assert full["token_ids"] == want and full["prompt_token_ids"] == prompt
    ids, prompts = [], []
    with httpx.stream("POST", served.ids_url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    ids += c["token_ids"]
                    prompts.append(c.get("prompt_token_ids"))
    assert ids == want
    assert prompts[0] == prompt and all(p is None for p in prompts[1:])
    plain = httpx.post(served.ids_url + "/v1/completions", json={**body, "return_token_ids": False}, timeout=30)
    assert "token_ids" not in plain.json()["choices"][0]


def test_n_completions_per_prompt(served):
    """n = 2 over two prompts: four choices, choice i * n + j being sequence j of prompt i; with a
    seed, sequence j samples what an n = 1 request with seed + j samples offline; streamed
    choices equal the non-streamed ones; usage counts every sequence's tokens."""
    client = served.client()
    prompts = ["abc", "xyz!"]
    kw = dict(model=MODEL_NAME, prompt=prompts, max_tokens=6, temperature=1.0, seed=77, n=2,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert [c.index for c in full.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        for j in range(2):
            want = offline_one(served, prompt, max_tokens=6, temperature=1.0, seed=77 + j, ignore_eos=True)
            assert full.choices[i * 2 + j].text == want.outputs[0].text, (i, j)
    assert full.choices[0].text != full.choices[1].text  # different seeds, different samples
    assert full.usage.completion_tokens == 4 * 6
    streamed = {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in full.choices}


def test_chat_n_greedy_gives_n_copies(served):
    client = served.client()
    kw = dict(model=MODEL_NAME, messages=chat_messages(), max_tokens=5, temperature=0.0, n=3,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    ref = served.offline.chat(chat_messages(), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                              chat_template=CHAT_TEMPLATE, use_tqdm=False)[0].outputs[0].text
    assert [(c.index, c.message.content) for c in full.choices] == [(0, ref), (1, ref), (2, ref)]
    assert full.usage.completion_tokens == 15
    streamed = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert streamed == {0: ref, 1: ref, 2: ref}
