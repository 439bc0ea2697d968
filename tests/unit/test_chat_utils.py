"""apply_chat_template gives the tokenizer's own token ids for good messages and a clear error
for bad ones. The tokenizer is a real transformers one, built offline (one token a character)."""

from __future__ import annotations

import pytest

from folovllm.entrypoints.chat_utils import apply_chat_template, validate_messages

TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' and loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'user' %}"
    "{{ raise_exception('two user turns in a row') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% if m.tool_calls %}[call {{ m.tool_calls[0]['function']['name'] }}]{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if think is defined and not think %}!{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'[]_\n":
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # every character is a token
    backend.decoder = decoders.Fuse()  # and decoding joins them back without spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = TEMPLATE
    return tok


def reference(tokenizer, messages, **kwargs) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_the_tokenizers_own_ids(tokenizer, add_generation_prompt):
    ids = apply_chat_template(tokenizer, CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert ids == reference(tokenizer, CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert all(type(t) is int for t in ids) and 0 not in ids  # no unknown characters
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_template_kwargs_and_an_explicit_template(tokenizer):
    msgs = [{"role": "user", "content": "hi"}]
    assert apply_chat_template(tokenizer, msgs, think=False) == reference(
        tokenizer, msgs, add_generation_prompt=True, think=False)
    assert tokenizer.decode(apply_chat_template(tokenizer, msgs, think=False)).endswith("assistant\n!")
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert apply_chat_template(tokenizer, msgs, chat_template=plain) == tokenizer("hi").input_ids


def test_text_parts_are_joined(tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    joined = [{"role": "user", "content": "one\ntwo"}]
    assert apply_chat_template(tokenizer, parts) == reference(tokenizer, joined, add_generation_prompt=True)
    assert parts[0]["content"][0] == {"type": "text", "text": "one"}  # the caller's messages are untouched


def test_assistant_tool_call_may_have_no_content(tokenizer):
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "done"}]
    ids = apply_chat_template(tokenizer, msgs)
    assert ids == reference(tokenizer, msgs, add_generation_prompt=True)
    assert "[call f]" in tokenizer.decode(ids)


def test_validate_messages_returns_copies():
    msgs = [{"role": "developer", "content": "x", "name": "n"}]
    out = validate_messages(msgs)
    assert out == msgs and out[0] is not msgs[0]


@pytest.mark.parametrize("messages, match", [
    ([], "messages is empty"),
    (None, "messages must be a list"),
    ("hello", "messages must be a list.*got str"),
    ({"role": "user", "content": "hi"}, "single dict; wrap it in a list"),
    ([{"role": "user", "content": "a"}, "b"], "message 1 is a str, not a dict"),
    ([[{"role": "user", "content": "a"}]], "message 0 is a list.*several conversations"),
    ([{"role": "user", "content": "a"}, {"content": "b"}],
     r"message 1 has no 'role'; each message needs 'role' \(system, user, assistant, tool, developer\) "
     "and 'content'"),
    ([{"role": "bot", "content": "b"}], "message 0 has role 'bot'; the role must be one of system, user"),
    ([{"role": "user"}], r"message 0 \(user\) has no 'content'"),
    ([{"role": "user", "content": None}], r"message 0 \(user\) has content None.*tool_calls"),
    ([{"role": "assistant", "content": None}], r"message 0 \(assistant\) has content None"),
    ([{"role": "user", "content": 5}], "message 0 content must be a string or a list of text parts, got int"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "message 0 content part 0 is type 'image_url'; only text parts"),
    ([{"role": "user", "content": ["raw"]}], "message 0 content part 0 is a str; only text parts"),
    ([{"role": "user", "content": [{"type": "text"}]}], "message 0 content part 0 needs 'text'"),
])
def test_bad_messages_name_the_message_and_the_fix(tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        validate_messages(messages)
    with pytest.raises(ValueError, match=match):
        apply_chat_template(tokenizer, messages)


def test_template_errors_become_value_errors(tokenizer):
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="chat template rejected the messages: two user turns in a row"):
        apply_chat_template(tokenizer, msgs)


def test_no_tokenizer_or_no_template(tokenizer):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="chat needs a tokenizer, and this model was loaded without one"):
        apply_chat_template(None, msgs)
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    assert not bare.chat_template
    with pytest.raises(ValueError, match="tokenizer has no chat template; pass chat_template="):
        apply_chat_template(bare, msgs)
    assert apply_chat_template(bare, msgs, chat_template=TEMPLATE) == reference(tokenizer, msgs,
                                                                                add_generation_prompt=True)
