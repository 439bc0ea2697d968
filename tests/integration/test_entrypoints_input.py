"""The entry points take their input the documented way: `folovllm generate` reads a piped prompt
from stdin, and LLM.chat rejects a malformed conversation with a clear error before anything runs
(a good one is answered with the tokens of its template's rendering)."""

from __future__ import annotations

import io

import pytest
import torch

from folovllm import LLM, SamplingParams
from folovllm.entrypoints.cli import main

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


class Piped(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_generate_reads_a_piped_prompt(tiny_models_with_tokenizer, monkeypatch, capsys):
    path, hf, tokenizer = tiny_models_with_tokenizer["qwen3"]
    monkeypatch.setattr("sys.stdin", Piped("abc"))
    assert main(["generate", "--model", path, "--device", "cpu", "--max-tokens", "4", "--ignore-eos",
                 "--echo"]) == 0
    out = capsys.readouterr().out
    ids = tokenizer("abc").input_ids
    expect = hf.generate(torch.tensor([ids]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    # --echo writes the prompt, then the completion: the prompt came from stdin.
    assert out == "abc" + tokenizer.decode(expect) + "\n"


def test_chat_rejects_a_bad_conversation_and_answers_a_good_one(tiny_models_with_tokenizer):
    path, _, tokenizer = tiny_models_with_tokenizer["qwen2"]
    llm = LLM(path, device="cpu", max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with pytest.raises(ValueError, match="message 1 has no 'role'"):
        llm.chat([{"role": "user", "content": "a"}, {"content": "b"}], params, chat_template=TEMPLATE)
    with pytest.raises(ValueError, match="message 0 .*role 'wizard'"):
        llm.chat([{"role": "wizard", "content": "a"}], params, chat_template=TEMPLATE)
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat([{"role": "user", "content": "a"}], params)
    assert not llm.llm_engine.has_unfinished_requests()
    [out] = llm.chat([{"role": "user", "content": "hi"}], params, chat_template=TEMPLATE, use_tqdm=False)
    assert out.prompt_token_ids == tokenizer("<user>hi").input_ids
    assert len(out.outputs[0].token_ids) == 3


def test_chat_with_a_bare_message_dict_says_how_to_fix_it(tiny_models_with_tokenizer):
    path, _, _ = tiny_models_with_tokenizer["qwen2"]
    llm = LLM(path, device="cpu", max_model_len=128)
    with pytest.raises(ValueError, match="wrap it in a list"):
        llm.chat({"role": "user", "content": "a"}, chat_template=TEMPLATE)
    with pytest.raises(ValueError):
        llm.chat([], chat_template=TEMPLATE)
