import math

import pytest
import torch
from scipy.stats import chisquare

from folovllm.sample.metadata import build_sampling_metadata
from folovllm.sample.sampler import Sampler, apply_penalties
from folovllm.sampling_params import SamplingParams

CPU = torch.device("cpu")


def metadata(params, logits, prompts=None, outputs=None, generators=None):
    n = len(params)
    prompts = prompts or [[] for _ in range(n)]
    outputs = outputs or [[] for _ in range(n)]
    return build_sampling_metadata(params, [len(o) for o in outputs], generators or {},
                                   vocab_size=logits.shape[1], device=CPU,
                                   token_ids=lambda: (prompts, outputs))


def sample(params, logits, **kw):
    return Sampler()(logits, metadata(params, logits, **kw))


def logits_from_probs(probs):
    return torch.tensor([[math.log(p) for p in probs]])


def test_greedy_is_argmax_and_all_greedy_metadata_is_empty():
    torch.manual_seed(0)
    logits = torch.randn(8, 50).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0) for _ in range(8)]
    md = metadata(params, logits)
    assert md.all_greedy and md.temperature is None and md.top_p is None and md.top_k is None
    assert md.min_p is None and md.no_penalties and md.prompt_token_ids is None
    out = Sampler()(logits, md)
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.sampled_token_ids.tolist() == logits.float().argmax(-1).tolist()
    assert out.logprobs is None and out.logprob_token_ids is None


def test_filters_never_emit_masked_tokens():
    # Tokens in shuffled positions; probabilities chosen so each filter's kept set is clear-cut.
    probs = [0.05, 0.3, 0.1, 0.4, 0.15]          # ranks: 3 > 1 > 4 > 2 > 0
    logits_row = logits_from_probs(probs)
    cases = [  # (params, allowed token ids derived by hand)
        (SamplingParams(top_k=2), {3, 1}),
        (SamplingParams(top_p=0.75), {3, 1, 4}),  # 0.4 + 0.3 = 0.7 < 0.75 <= 0.85
        (SamplingParams(top_p=0.1), {3}),         # top token alone already reaches 0.1
        (SamplingParams(min_p=0.3), {3, 1, 4}),   # threshold 0.3 * 0.4 = 0.12
        (SamplingParams(top_k=3, top_p=0.8), {3, 1}),  # top-k renormalises: 0.4/0.85 + 0.3/0.85 >= 0.8
        (SamplingParams(), {0, 1, 2, 3, 4}),
    ]
    reps = 400
    params = [p for p, _ in cases for _ in range(reps)]
    torch.manual_seed(0)
    sampled = sample(params, logits_row.repeat(len(params), 1)).sampled_token_ids
    for i, (_, allowed) in enumerate(cases):
        assert set(sampled[i * reps:(i + 1) * reps].tolist()) == allowed, i


def test_top_k_larger_than_vocab_and_zero_are_no_ops():
    logits = torch.zeros(1000, 4)
    params = [SamplingParams(top_k=10 if i % 2 else 0) for i in range(1000)]
    torch.manual_seed(0)
    assert set(sample(params, logits).sampled_token_ids.tolist()) == {0, 1, 2, 3}


def test_seeded_rows_are_reproducible_across_batch_compositions():
    vocab, steps = 1000, 12
    torch.manual_seed(0)
    target = torch.randn(vocab) * 0.5
    other = torch.randn(vocab)

    def run(layout, seeds):
        """layout: which rows hold the seeded request; returns its tokens per seeded row."""
        gens = {row: torch.Generator().manual_seed(seeds[row]) for row in layout}
        params = [SamplingParams(temperature=0.9, top_p=0.95, seed=seeds.get(i)) if i in layout
                  else SamplingParams(temperature=1.3 if i % 2 else 0.0) for i in range(len(layout) + 3)]
        logits = torch.stack([target if i in layout else other for i in range(len(params))])
        tokens = {row: [] for row in layout}
        for step in range(steps):
            torch.manual_seed(100 + step)  # the default generator must not matter
            out = sample(params, logits, generators=gens).sampled_token_ids
            for row in layout:
                tokens[row].append(out[row].item())
        return tokens

    a = run([0], {0: 7})
    b = run([2, 4], {2: 7, 4: 8})
    assert a[0] == b[2]
    assert b[2] != b[4]


def test_temperature_sampling_follows_softmax():
    logits = [1.0, 0.5, 0.0, -0.5, -1.5]
    temperature, draws = 0.7, 20000
    weights = [math.exp(x / temperature) for x in logits]
    expected = [w / sum(weights) * draws for w in weights]
    params = [SamplingParams(temperature=temperature)] * draws
    torch.manual_seed(0)
    sampled = sample(params, torch.tensor([logits]).repeat(draws, 1)).sampled_token_ids
    observed = torch.bincount(sampled, minlength=len(logits)).tolist()
    assert chisquare(observed, expected).pvalue > 1e-3


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0],
                           [2.0, -1.0, 0.5, 3.0, -2.0]])
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams()]
    md = metadata(params, logits, prompts=[[0, 4], [1, 2, 3]], outputs=[[2, 2, 3], [0]])
    assert md.prompt_token_ids.tolist() == [[0, 4, 5], [1, 2, 3]]  # padded with vocab size
    outputs = torch.tensor([[2, 2, 3], [0, 5, 5]])
    got = apply_penalties(logits, md.prompt_token_ids, outputs, md.presence_penalties,
                          md.frequency_penalties, md.repetition_penalties)
    # token 0: prompt, 2/2 | 1: unseen | 2: output x2, 0.5/2 - 2*0.5 - 0.25
    # token 3: output x1, 3/2 - 0.5 - 0.25 | 4: prompt, negative so -2*2
    assert got[0].tolist() == [1.0, -1.0, -1.0, 0.75, -4.0]
    assert got[1].tolist() == logits[1].tolist()


@pytest.mark.parametrize("params,logits,prompt,output,expected", [
    # repetition over the prompt, positive logit divided: 2.0/1.1 < 1.9
    (SamplingParams(temperature=0, repetition_penalty=1.1), [2.0, 1.9], [0], [], 1),
    # repetition, negative logit multiplied: -1.0*1.1 < -1.05 (dividing would keep token 0)
    (SamplingParams(temperature=0, repetition_penalty=1.1), [-1.0, -1.05], [0], [], 1),
    # presence over output only: 2.0 - 0.2 < 1.9
    (SamplingParams(temperature=0, presence_penalty=0.2), [2.0, 1.9], [], [0], 1),
    # presence ignores the prompt
    (SamplingParams(temperature=0, presence_penalty=0.2), [2.0, 1.9], [0], [], 0),
    # frequency scales with the count: 2.0 - 2*0.2 < 1.7 (a presence-like 2.0 - 0.2 would not)
    (SamplingParams(temperature=0, frequency_penalty=0.2), [2.0, 1.0, 1.7], [], [0, 0], 2),
])
def test_penalties_change_greedy_choice(params, logits, prompt, output, expected):
    logits = torch.tensor([logits])
    assert sample([params], logits, prompts=[prompt], outputs=[output]).sampled_token_ids.item() == expected


def test_min_tokens_blocks_stop_ids():
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[2])
    params.update_from_generation_config({0})
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0]])
    assert sample([params], logits, outputs=[[1]]).sampled_token_ids.item() == 3
    assert sample([params], logits, outputs=[[1, 1, 1]]).sampled_token_ids.item() == 0

    random = SamplingParams(min_tokens=2, stop_token_ids=[0, 2])
    n = 500
    torch.manual_seed(0)
    sampled = sample([random] * n, logits.repeat(n, 1), outputs=[[]] * n).sampled_token_ids
    assert set(sampled.tolist()) == {1, 3}


def test_logprobs_are_raw_and_lead_with_sampled_token():
    torch.manual_seed(0)
    logits = torch.randn(4, 30).to(torch.bfloat16)
    params = [SamplingParams(logprobs=3, temperature=0.5, presence_penalty=1.0),
              SamplingParams(logprobs=1, temperature=0),
              SamplingParams(temperature=0, repetition_penalty=1.5),
              SamplingParams(logprobs=0, top_k=5)]
    out = sample(params, logits, prompts=[[1, 2], [3], [4, 5, 6], []], outputs=[[7], [], [8], [9]])
    ref = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprob_token_ids.shape == (4, 4) and out.logprobs.dtype == torch.float32
    assert out.logprob_token_ids[:, 0].tolist() == out.sampled_token_ids.tolist()
    for row in range(4):
        ids = out.logprob_token_ids[row].tolist()
        expected = [ref[row, ids[0]].item()] + sorted(ref[row].tolist(), reverse=True)[:3]
        assert out.logprobs[row].tolist() == pytest.approx(expected, abs=1e-6)
        assert ids[1:] == ref[row].argsort(descending=True)[:3].tolist()


def test_mixed_greedy_and_random_batch():
    torch.manual_seed(0)
    row = torch.randn(1, 8) * 0.3
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, top_k=6) for i in range(400)]
    md = metadata(params, row.repeat(400, 1))
    assert not md.all_greedy and not md.all_random
    sampled = Sampler()(row.repeat(400, 1), md).sampled_token_ids
    assert set(sampled[1::2].tolist()) == {row.argmax().item()}
    assert len(set(sampled[0::2].tolist())) == 6  # the top-k filter, but not the argmax


def test_input_logits_untouched():
    logits = torch.randn(2, 10)
    before = logits.clone()
    params = [SamplingParams(temperature=0, repetition_penalty=1.3, min_tokens=2, stop_token_ids=[1]),
              SamplingParams(top_p=0.5, min_p=0.1, top_k=3, logprobs=2)]
    sample(params, logits, prompts=[[0, 3], [2]], outputs=[[4], [5]])
    assert torch.equal(logits, before)
