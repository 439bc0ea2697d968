"""min_tokens against a hand-rolled transformers reference, synchronous and async scheduling.

The reference decodes greedily with transformers, setting the stop tokens' logits to -inf while
fewer than min_tokens tokens have been generated, and stops at the first stop token after that.
Cases are chosen (from transformers alone) where greedy decoding would emit the stop token early
and, with the mask, emits it exactly at the first step the mask is lifted -- so a mask held one
step too long (async scheduling not counting the token in flight) or lifted too early changes
the tokens. Logprobs are the model's distribution before any masking: each step's are checked
against log_softmax of transformers' logits for the same context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from engine_internals import assert_idle
from folovllm import LLM, SamplingParams

EOS = 2  # conftest.TINY's eos_token_id
MAX_TOKENS = 12
NUM_LOGPROBS = 3


@dataclass
class Case:
    prompt: list[int]
    stop: int              # the stop token: EOS, or a token passed in stop_token_ids
    min_tokens: int
    tokens: list[int]      # the reference output, ending with `stop`
    # [len(tokens), vocab]: log_softmax of transformers' logits at each step of the reference
    logprobs: torch.Tensor = field(repr=False)

    def params(self, min_tokens: int | None = None) -> SamplingParams:
        min_tokens = self.min_tokens if min_tokens is None else min_tokens
        if self.stop == EOS:  # the model's own EOS (from config.json), no stop_token_ids
            return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=min_tokens,
                                  logprobs=NUM_LOGPROBS)
        return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=min_tokens,
                              stop_token_ids=[self.stop], ignore_eos=True, logprobs=NUM_LOGPROBS)


def greedy_with_mask(hf, prompt: list[int], masked: int | None, n: int) -> tuple[list[int], list[int]]:
    """Greedy decoding with token `masked` (if any) never allowed: the tokens, and at each step
    the token the unmasked logits would have picked."""
    ids, out, unmasked = list(prompt), [], []
    with torch.inference_mode():
        for _ in range(n):
            logits = hf(torch.tensor([ids])).logits[0, -1].clone()
            unmasked.append(int(logits.argmax()))
            if masked is not None:
                logits[masked] = float("-inf")
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out, unmasked


def reference_logprobs(hf, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return logits.float().log_softmax(dim=-1)


def find_cases(hf) -> list[Case]:
    """One case that stops on EOS and two on a stop token id, from a fixed stream of random
    prompts. The stop token is one that greedy emits within its first two tokens; min_tokens is
    the first step >= 2 at which, after the masked steps, greedy picks the stop token again. The
    reference output is then the masked tokens of the steps before it, then the stop token."""
    g = torch.Generator().manual_seed(0)
    eos_cases, token_cases = [], []
    for _ in range(20):
        n = int(torch.randint(2, 12, (1,), generator=g))
        prompt = torch.randint(3, 320, (n,), generator=g).tolist()
        free, _ = greedy_with_mask(hf, prompt, None, 2)
        for stop in dict.fromkeys(free):
            masked, unmasked = greedy_with_mask(hf, prompt, stop, 7)
            min_tokens = next((i for i in range(2, 7) if unmasked[i] == stop), None)
            if min_tokens is not None:
                tokens = masked[:min_tokens] + [stop]
                cases = eos_cases if stop == EOS else token_cases
                cases.append(Case(prompt, stop, min_tokens, tokens, reference_logprobs(hf, prompt, tokens)))
        if eos_cases and len(token_cases) >= 2:
            return eos_cases[:1] + token_cases[:2]
    raise AssertionError("no prompt where greedy emits a stop token early: change the search")


@pytest.fixture(scope="module")
def hf(tiny_models):
    return tiny_models["qwen3"][1]


@pytest.fixture(scope="module")
def cases(hf):
    return find_cases(hf)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(tiny_models, request):
    llm = LLM(tiny_models["qwen3"][0], device="cpu", max_model_len=64, block_size=8, max_num_seqs=4,
              max_num_batched_tokens=16, async_scheduling=request.param)
    return llm


def check_logprobs(completion, want: torch.Tensor) -> None:
    """Each step: the sampled token and the top NUM_LOGPROBS of the unmasked distribution."""
    assert len(completion.logprobs) == len(completion.token_ids)
    for step, (tok, got) in enumerate(zip(completion.token_ids, completion.logprobs)):
        top = want[step].topk(NUM_LOGPROBS).indices.tolist()
        assert set(got) == {tok, *top}, f"step {step}"
        for t, lp in got.items():
            assert lp == pytest.approx(float(want[step, t]), abs=2e-4), f"step {step}, token {t}"
    assert completion.cumulative_logprob == pytest.approx(
        sum(float(want[i, t]) for i, t in enumerate(completion.token_ids)), abs=1e-3)


def test_cases_need_the_mask(hf, cases):
    """The chosen cases really depend on min_tokens: without it greedy stops within two tokens,
    and at some masked step the stop token is the model's most likely one."""
    for c in cases:
        free, _ = greedy_with_mask(hf, c.prompt, None, 2)
        assert c.stop in free
        assert any(int(c.logprobs[i].argmax()) == c.stop for i in range(c.min_tokens))
        assert int(c.logprobs[c.min_tokens].argmax()) == c.stop


def test_min_tokens_matches_reference(llm, cases):
    """All cases in one batch, with a request per case without min_tokens, which stops at once."""
    params = [c.params() for c in cases] + [c.params(min_tokens=0) for c in cases]
    prompts = [{"prompt_token_ids": c.prompt} for c in cases] * 2
    outs = llm.generate(prompts, params, use_tqdm=False)
    for c, out in zip(cases, outs[:len(cases)]):
        got = out.outputs[0]
        assert got.token_ids == c.tokens, c
        assert got.finish_reason == "stop"
        assert got.stop_reason == (None if c.stop == EOS else c.stop)
        check_logprobs(got, c.logprobs)
    for c, out in zip(cases, outs[len(cases):]):
        got = out.outputs[0]
        assert got.token_ids[-1] == c.stop and len(got.token_ids) <= 2 and got.finish_reason == "stop"
    assert_idle(llm)


def test_min_tokens_alone(llm, cases):
    """One request at a time: every decode step of an async engine has the previous token in
    flight."""
    for c in cases:
        [out] = llm.generate([{"prompt_token_ids": c.prompt}], c.params(), use_tqdm=False)
        assert out.outputs[0].token_ids == c.tokens
        check_logprobs(out.outputs[0], c.logprobs)
    assert_idle(llm)
