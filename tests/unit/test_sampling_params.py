"""SamplingParams rejects a bad value of any field up front, naming the field."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from folovllm.sample.metadata import build_sampling_metadata
from folovllm.sample.sampler import Sampler
from folovllm.sampling_params import SamplingParams

NAN, INF = float("nan"), float("inf")

BAD = {
    "n": [0, -1, "1", 1.0, True, None],
    "best_of": [2, 0, "1", 1.5, True],
    "seed": ["abc", 1.5, 2**64, 2**70, -1, True, np.float64(3.0)],
    "max_tokens": ["5", 0, -1, 5.0, True],
    "min_tokens": ["1", -1, 1.5, None, True],
    "top_k": ["3", 2.5, -3, None, True],
    "logprobs": ["2", 1.5, 21, -1, True],
    "temperature": ["1", NAN, INF, -1.0, True, None],
    "top_p": [NAN, 0.0, 1.5, "0.9", None],
    "min_p": [NAN, -0.1, 2.0, "0"],
    "presence_penalty": [NAN, -INF, 3.0, "0"],
    "frequency_penalty": [NAN, -3, None, False],
    "repetition_penalty": [NAN, INF, 0.0, -1.0, "1"],
    "stop": [5, [""], ["ok", 3], {"a": 1}, b"x"],
    "stop_token_ids": ["12", 5, [1.5], [-1], [True], [None]],
    "ignore_eos": [1, "yes", None],
    "detokenize": [0, "True"],
    "skip_special_tokens": ["False", None],
    "spaces_between_special_tokens": [None, 1],
    "include_stop_str_in_output": [1, np.bool_(True)],
}


@pytest.mark.parametrize("name, value", [(k, v) for k, vs in BAD.items() for v in vs],
                         ids=lambda x: repr(x)[:20])
def test_bad_value_names_the_field(name, value):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{name} .*, got "):
        SamplingParams(**{name: value})


def test_messages_say_the_rule():
    with pytest.raises(ValueError, match=r"seed must be None or an int in \[0, 2\*\*64\), got 'abc'"):
        SamplingParams(seed="abc")
    with pytest.raises(ValueError, match="max_tokens must be an int or None, got '5'"):
        SamplingParams(max_tokens="5")
    with pytest.raises(ValueError, match="temperature must be a finite number, got nan"):
        SamplingParams(temperature=NAN)
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(3\), got 9"):
        SamplingParams(min_tokens=9, max_tokens=3)
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match=r"best_of must be None or equal to n \(2\).*not supported.*got 3"):
        SamplingParams(n=2, best_of=3)


@pytest.mark.parametrize("kwargs", [
    dict(n=2), dict(n=np.int64(3), best_of=3), dict(best_of=1),
    dict(seed=0), dict(seed=2**64 - 1), dict(seed=np.int64(7)), dict(seed=np.uint64(2**64 - 1)),
    dict(max_tokens=None), dict(max_tokens=1), dict(max_tokens=np.int32(5), min_tokens=np.int64(5)),
    dict(temperature=0), dict(temperature=np.float32(0.5)), dict(top_p=1), dict(min_p=1.0),
    dict(top_k=-1), dict(top_k=np.int64(40)), dict(logprobs=0), dict(logprobs=20),
    dict(presence_penalty=-2, frequency_penalty=2.0, repetition_penalty=1e-3),
    dict(stop="x"), dict(stop=("a", "b")), dict(stop_token_ids=(np.int64(3), 4)), dict(stop_token_ids=None),
], ids=lambda kw: ",".join(kw))
def test_valid_edge_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_values_are_normalised_to_python_types():
    p = SamplingParams(seed=np.int64(7), max_tokens=np.int32(5), top_k=-1, temperature=0,
                       stop="end", stop_token_ids=(np.int64(3),))
    assert type(p.seed) is int and p.seed == 7
    assert type(p.max_tokens) is int and p.top_k == 0
    q = SamplingParams(n=np.int64(1), top_k=np.int64(40), min_tokens=np.int32(2), logprobs=np.int8(3))
    assert all(type(v) is int for v in (q.n, q.top_k, q.min_tokens, q.logprobs))
    assert type(p.temperature) is float and p.greedy
    assert p.stop == ["end"] and p.stop_token_ids == [3] and type(p.stop_token_ids[0]) is int
    assert p.all_stop_token_ids == {3}


def test_verify_catches_a_field_reassigned_after_construction():
    p = SamplingParams(seed=1)
    p.seed = "abc"
    with pytest.raises(ValueError, match="SamplingParams.seed"):
        copy.copy(p).verify()


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1])
def test_extreme_seeds_drive_the_sampler(seed):
    """The model runner seeds a torch.Generator with SamplingParams.seed; the whole range must
    work there and give the same tokens twice."""
    params = [SamplingParams(temperature=1.0, seed=seed)] * 2
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))

    def draw():
        generators = {i: torch.Generator().manual_seed(p.seed) for i, p in enumerate(params)}
        md = build_sampling_metadata(params, [0, 0], generators, vocab_size=64, device=torch.device("cpu"))
        return Sampler(fused=False)(logits, md).sampled_token_ids.tolist()

    first = draw()
    assert first == draw()
    assert all(0 <= t < 64 for t in first)
