"""Each bad request gets its status and an OpenAI error body that says what was wrong, and the
server keeps answering afterwards."""

from __future__ import annotations

import httpx
import openai
import pytest

from server_support import KEY, MAX_BODY, MODEL_NAME


def post(url, body=None, content=None, headers=None, path="/v1/completions"):
    return httpx.post(url + path, json=body, content=content, headers=headers, timeout=30)


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def still_answers(served):
    r = post(served.url, {"model": MODEL_NAME, "prompt": "ab", "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "ab", "max_tokens": "lots"}, "max_tokens", "integer"),
    ({"prompt": "ab", "temperature": "hot"}, "temperature", "number"),
    ({"prompt": 12}, "prompt", ""),
    ({"prompt": "ab", "stop": 5}, "stop", ""),
    ({"prompt": "ab", "temperature": -1}, "temperature", "must be >= 0"),
    ({"prompt": "ab", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "ab", "n": 0}, "n", "SamplingParams.n must be >= 1"),
    ({"prompt": "ab", "n": 2, "best_of": 3}, "best_of", "SamplingParams.best_of must be None or equal to n"),
    ({"prompt": "ab", "logprobs": 50}, "logprobs", "[0, 20]"),
    ({"prompt": []}, "prompt", "empty"),
    ({}, "prompt", "Field required"),
])
def test_bad_parameters_are_400(served, body, param, words):
    err = error_of(post(served.url, body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param or err["param"].startswith(param + "."), err
    assert words in err["message"] and param in err["message"]


def test_bad_chat_is_400(served):
    err = error_of(post(served.url, {"messages": [{"role": "wizard", "content": "x"}]},
                        path="/v1/chat/completions"), 400)
    assert "role" in err["message"] and "wizard" in err["message"]
    err = error_of(post(served.url, {"messages": "hi"}, path="/v1/chat/completions"), 400)
    assert err["param"] == "messages"
    err = error_of(post(served.url, {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
                        path="/v1/chat/completions"), 400)
    assert err["param"] == "top_logprobs"


def test_prompt_too_long_names_the_numbers(served):
    max_len = served.engine.model_config.max_model_len
    ids = served.tokenizer("a" * (max_len + 5)).input_ids
    for stream in (False, True):
        err = error_of(post(served.url, {"prompt": "a" * (max_len + 5), "stream": stream}), 400)
        assert f"{len(ids)} tokens" in err["message"] and f"max_model_len is {max_len}" in err["message"]
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        served.client().completions.create(model=MODEL_NAME, prompt="a" * (max_len + 5))
    still_answers(served)


def test_unknown_model_is_404(served):
    err = error_of(post(served.url, {"model": "gpt-9", "prompt": "ab"}), 404)
    assert "gpt-9" in err["message"] and err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "a"}])
    still_answers(served)


def test_api_key(served):
    body = {"model": MODEL_NAME, "prompt": "ab", "max_tokens": 2}
    assert error_of(post(served.key_url, body), 401)["type"] == "authentication_error"
    error_of(post(served.key_url, body, headers={"Authorization": "Bearer wrong"}), 401)
    error_of(post(served.key_url, body, headers={"Authorization": KEY}), 401)
    assert httpx.get(served.key_url + "/v1/models").status_code == 401
    ok = post(served.key_url, body, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.key_url + "/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=served.key_url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=MODEL_NAME, prompt="ab", max_tokens=2).choices[0].text
    # Health and metrics stay open.
    assert httpx.get(served.key_url + "/health").status_code == 200
    assert httpx.get(served.key_url + "/metrics").status_code == 200


def test_body_too_large_is_413(served):
    big = {"prompt": "a" * (MAX_BODY + 10)}
    err = error_of(post(served.url, big), 413)
    assert str(MAX_BODY) in err["message"]

    def chunks():  # no Content-Length: the size is counted as the body arrives
        for _ in range(MAX_BODY // 1000 + 2):
            yield b" " * 1000

    r = httpx.post(served.url + "/v1/completions", content=chunks(), timeout=30)
    assert "content-length" not in r.request.headers
    error_of(r, 413)
    still_answers(served)


def test_malformed_json_and_bad_utf8_are_400(served):
    headers = {"Content-Type": "application/json"}
    err = error_of(post(served.url, content=b'{"prompt": "ab",', headers=headers), 400)
    assert "not valid JSON" in err["message"]
    err = error_of(post(served.url, content=b'{"prompt": "\xff\xfe"}', headers=headers), 400)
    assert "UTF-8" in err["message"]
    err = error_of(post(served.url, content=b'[1, 2]', headers=headers), 400)
    assert "JSON object" in err["message"]
    err = error_of(post(served.url, content=b'{"tokens": "x"}', headers=headers, path="/detokenize"), 400)
    assert "tokens" in err["message"]
    still_answers(served)
