import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from folovllm.engine.detokenizer import IncrementalDetokenizer
from folovllm.sampling_params import SamplingParams

CORPUS = ["Hello world, the quick brown fox jumps over the lazy dog.",
          "你好，世界！今天天气很好。我们去公园散步吧。",
          "Emoji time: 😀🎉👍🏽 and café naïve résumé",
          "混合 text 与 emoji 🚀🚀 mixed together, 数字 12345."]


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE trained offline: with 400 ids many multi-byte characters are split
    across tokens, which is what incremental decoding must get right."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_end|>"])


class StrictTokenizer:
    """Records decode window sizes and, like slow/sentencepiece tokenizers, fails on unknown ids."""

    def __init__(self, tokenizer):
        self.tokenizer, self.window_sizes = tokenizer, []

    def __len__(self):
        return len(self.tokenizer)

    def decode(self, token_ids, **kwargs):
        if any(t >= len(self.tokenizer) for t in token_ids):
            raise IndexError("unknown token id")
        self.window_sizes.append(len(token_ids))
        return self.tokenizer.decode(token_ids, **kwargs)


def run(tokenizer, ids, chunk=1, **params):
    detok = IncrementalDetokenizer(tokenizer, [5, 6, 7], SamplingParams(**params))
    for i in range(0, len(ids), chunk):
        stop = detok.update(ids[i:i + chunk])
        if stop is not None:
            return detok.output_text, stop
    return detok.output_text, detok.finish()


def test_splits_multibyte_characters(tokenizer):
    # Precondition for the tests below to mean anything.
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode("😀🎉 你好")]
    assert any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_sequences_match_full_decode(tokenizer, skip_special_tokens):
    rng = random.Random(0)
    known = len(tokenizer)
    for _ in range(300):
        ids = [rng.randrange(known + 20) for _ in range(rng.randrange(1, 40))]  # some unknown ids
        detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=skip_special_tokens))
        i, previous = 0, ""
        while i < len(ids):
            step = rng.randrange(1, 4)
            assert detok.update(ids[i:i + step]) is None
            assert detok.output_text.startswith(previous)  # streamed text is never rewritten
            previous, i = detok.output_text, i + step
        assert detok.finish() is None
        expected = tokenizer.decode([t for t in ids if t < known], skip_special_tokens=skip_special_tokens)
        assert detok.output_text == expected


def test_valid_text_streams_without_replacement_chars_in_small_windows(tokenizer):
    text = " ".join(CORPUS * 4)
    ids = tokenizer.encode(text)
    spy = StrictTokenizer(tokenizer)
    detok = IncrementalDetokenizer(spy, [], SamplingParams())
    for t in ids:
        detok.update([t])
        assert "\ufffd" not in detok.output_text
        assert text.startswith(detok.output_text)
    assert detok.output_text == text  # nothing held back at the end of complete text
    assert max(spy.window_sizes) <= 8 < len(ids)


def test_stop_string_truncates(tokenizer):
    ids = tokenizer.encode("Hello world, the quick brown fox jumps")
    assert run(tokenizer, ids, stop=["quick"]) == ("Hello world, the ", "quick")
    assert run(tokenizer, ids, stop=["quick"], include_stop_str_in_output=True) == (
        "Hello world, the quick", "quick")


def test_stop_string_split_across_tokens(tokenizer):
    ids = tokenizer.encode("Hello world, the quick brown fox jumps")
    stop = "k bro"
    assert not any(stop in tokenizer.decode([t]) for t in ids)  # really spans tokens
    assert run(tokenizer, ids, stop=[stop]) == ("Hello world, the quic", stop)


def test_earliest_stop_string_wins(tokenizer):
    ids = tokenizer.encode("Hello world, the quick brown fox jumps")
    for chunk in (1, len(ids)):  # one token at a time, or all text arriving in one update
        assert run(tokenizer, ids, chunk=chunk, stop=["fox", "quick", "brown"]) == ("Hello world, the ", "quick")


def test_multibyte_stop_string(tokenizer):
    ids = tokenizer.encode("你好，世界！今天天气很好。我们去公园散步吧。")
    assert run(tokenizer, ids, stop=["。"]) == ("你好，世界！今天天气很好", "。")
    assert run(tokenizer, ids, stop=["天气很", "世界"], include_stop_str_in_output=True) == ("你好，世界", "世界")


def test_no_updates_after_stop(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["fox"]))
    assert detok.update(tokenizer.encode("the brown fox")) == "fox"
    assert detok.update(tokenizer.encode(" jumps")) is None
    assert detok.finish() is None
    assert detok.output_text == "the brown "


def test_unknown_ids_decode_to_nothing(tokenizer):
    detok = IncrementalDetokenizer(StrictTokenizer(tokenizer), [], SamplingParams())
    assert detok.update([len(tokenizer), len(tokenizer) + 100]) is None
    assert detok.output_text == ""
    detok.update(tokenizer.encode("hi") + [len(tokenizer) + 7])
    assert detok.output_text == "hi"


def test_special_tokens(tokenizer):
    ids = tokenizer.encode("Hello") + [tokenizer.eos_token_id]
    assert run(tokenizer, ids)[0] == "Hello"
    assert run(tokenizer, ids, skip_special_tokens=False)[0] == "Hello<|endoftext|>"


def test_no_tokenizer_or_no_detokenize(tokenizer):
    for detok in (IncrementalDetokenizer(None, [1], SamplingParams(stop=["a"])),
                  IncrementalDetokenizer(tokenizer, [1], SamplingParams(detokenize=False, stop=["a"]))):
        assert detok.update([1, 2, 3, 10**9]) is None
        assert detok.finish() is None
        assert detok.output_text == ""


def test_stop_strings_wait_for_min_tokens(tokenizer):
    """A stop string inside the first min_tokens tokens does not stop the request (as in vLLM);
    a later one does, and the text is cut right before it."""
    text = "ab ab ab ab ab ab"
    ids = tokenizer.encode(text)
    assert run(tokenizer, ids, stop=["ab"]) == ("", "ab")
    k = 3
    first_k = tokenizer.decode(ids[:k])
    assert "ab" in first_k  # the first match lies inside the min_tokens tokens
    out, stop = run(tokenizer, ids, stop=["ab"], min_tokens=k, max_tokens=50)
    assert stop == "ab" and out and text.startswith(out) and text[len(out):].startswith("ab")
    assert len(out) + len("ab") > len(first_k)  # the match ends after the first k tokens' text
    assert run(tokenizer, ids, stop=["ab"], min_tokens=len(ids), max_tokens=50) == (text, None)
