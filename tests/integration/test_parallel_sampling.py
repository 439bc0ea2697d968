"""Parallel sampling (SamplingParams(n=N)) end to end, against the same engine at n = 1: greedy
gives N copies of the n = 1 tokens; with a seed, sequence i draws what an n = 1 request with seed
+ i draws, run after run; one RequestOutput carries the N completions (streamed or final); the
prompt is computed once; stop strings, aborts and preemption act per sequence; and every block is
free at the end. Block size 8."""

from __future__ import annotations

import random

import pytest

from folovllm import LLM, LLMEngine, SamplingParams

from engine_internals import assert_idle, block_ref_counts, recording_schedules, scheduler_of

# Lengths 19, 16 (whole blocks), 5 (one partial block), 1, and 30 (chunked at budget 7).
PROMPTS = [list(range(40, 59)), list(range(60, 76)), [7, 8, 9, 10, 11], [300], list(range(100, 130))]


def make(path, **kw) -> LLM:
    kw = dict(dict(block_size=8, max_num_seqs=8, max_model_len=64), **kw)
    return LLM(path, device="cpu", **kw)


def generate(llm: LLM, params: SamplingParams, prompts=PROMPTS):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def greedy(n: int = 1, max_tokens: int = 7) -> SamplingParams:
    return SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_models):
    """n = 1, prefix caching off: what every sequence is held to."""
    return make(tiny_models["qwen3"][0], enable_prefix_caching=False)


@pytest.mark.parametrize("caching", [True, False], ids=["cache", "nocache"])
@pytest.mark.parametrize("budget", [7, 64])
def test_greedy_n_gives_n_copies_of_the_n1_tokens(tiny_models, reference, caching, budget):
    expect = [o.outputs[0].token_ids for o in generate(reference, greedy())]
    llm = make(tiny_models["qwen3"][0], enable_prefix_caching=caching, max_num_batched_tokens=budget)
    outs = generate(llm, greedy(n=3))
    for out, want, prompt in zip(outs, expect, PROMPTS):
        assert out.finished and out.prompt_token_ids == prompt
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert [c.token_ids for c in out.outputs] == [want] * 3
        assert [c.finish_reason for c in out.outputs] == ["length"] * 3
    assert_idle(llm)
    assert all(n == 0 for n in block_ref_counts(llm))


def test_async_scheduling_and_the_engine_api(tiny_models, reference):
    """Planning step N+1 while step N runs: a sibling starts on blocks whose prompt was scheduled
    a step before. LLMEngine.generate and generate_batch return one output per prompt."""
    expect = [o.outputs[0].token_ids for o in generate(reference, greedy())]
    engine = make(tiny_models["qwen3"][0], async_scheduling=True, max_num_batched_tokens=16).llm_engine
    assert engine.async_scheduling
    outs = engine.generate_batch([{"prompt_token_ids": p} for p in PROMPTS], greedy(n=2))
    assert [[c.token_ids for c in o.outputs] for o in outs.values()] == [[want] * 2 for want in expect]
    one = engine.generate({"prompt_token_ids": PROMPTS[0]}, greedy(n=4))
    assert [c.token_ids for c in one.outputs] == [expect[0]] * 4
    assert_idle(engine)


def test_the_prompt_is_computed_once(tiny_models):
    """Rows computed for a request of P prompt tokens, n = 3, M tokens each: P for the prompt, 1
    for each other sequence (its last prompt token, on its own copy of the last block), and
    M - 1 decode rows per sequence. Prefix caching off, so nothing else is saved; room for all
    15 sequences at once."""
    llm = make(tiny_models["qwen3"][0], enable_prefix_caching=False, max_num_seqs=16)
    with recording_schedules(llm) as schedules:
        generate(llm, greedy(n=3))
    assert sum(so.total_num_scheduled_tokens for so in schedules) == \
        sum(len(p) + 2 + 3 * (7 - 1) for p in PROMPTS)
    assert sum(len(so.copy_blocks) for so in schedules) == 2 * len(PROMPTS)


def test_seeded_sequences_reproduce_and_follow_seed_plus_i(tiny_models, reference):
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=11, max_tokens=8, ignore_eos=True)
    llm = make(tiny_models["qwen3"][0])
    first = generate(llm, params)
    again = generate(llm, params)
    for a, b in zip(first, again):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    for i in range(3):
        single = SamplingParams(temperature=1.0, top_p=0.9, seed=11 + i, max_tokens=8, ignore_eos=True)
        assert [o.outputs[0].token_ids for o in generate(reference, single)] == \
            [o.outputs[i].token_ids for o in first]
    # Three seeds, three different samples (over 5 prompts x 8 tokens from 320 ids).
    assert all(len({tuple(c.token_ids) for c in o.outputs}) > 1 for o in first)
    assert_idle(llm)


def test_one_output_per_step_merges_the_sequences(tiny_models, reference):
    engine = make(tiny_models["qwen3"][0]).llm_engine
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    engine.add_request("s", {"prompt_token_ids": PROMPTS[0]}, params, stream=True)
    engine.add_request("f", {"prompt_token_ids": PROMPTS[1]}, params, stream=False)
    streamed, final = [], []
    while engine.has_unfinished_requests():
        outs = engine.step()
        assert len([o for o in outs if o.request_id == "s"]) <= 1
        streamed += [o for o in outs if o.request_id == "s"]
        final += [o for o in outs if o.request_id == "f"]
    assert [o.finished for o in streamed] == [False] * (len(streamed) - 1) + [True]
    assert all([c.index for c in o.outputs] == [0, 1] for o in streamed)
    counts = [[len(c.token_ids) for c in o.outputs] for o in streamed]
    assert counts == sorted(counts) and counts[-1] == [6, 6]
    assert len(final) == 1 and final[0].finished and [len(c.token_ids) for c in final[0].outputs] == [6, 6]
    for out, prompt in ((streamed[-1], PROMPTS[0]), (final[0], PROMPTS[1])):
        for i, c in enumerate(out.outputs):
            single = SamplingParams(temperature=1.0, seed=3 + i, max_tokens=6, ignore_eos=True)
            assert c.token_ids == generate(reference, single, [prompt])[0].outputs[0].token_ids
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert_idle(engine)


def test_num_cached_tokens_is_the_prompts(tiny_models):
    llm = make(tiny_models["qwen3"][0])
    assert [o.num_cached_tokens for o in generate(llm, greedy(n=3))] == [0] * len(PROMPTS)
    assert [o.num_cached_tokens for o in generate(llm, greedy(n=3))] == [(len(p) - 1) // 8 * 8 for p in PROMPTS]


def test_stop_strings_end_each_sequence_on_its_own(tiny_models_with_tokenizer):
    """Sequence i stops where an n = 1 request with seed 5 + i and the same stop string stops.
    The stop string is a character sequence 0 writes (so sequence 0 stops on it, early)."""
    path = tiny_models_with_tokenizer["qwen3"][0]
    llm, ref = make(path), make(path, enable_prefix_caching=False)
    prompt = "hello world"

    def sampled(n, seed, stop=None):
        return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True, stop=stop)

    stop = ref.generate(prompt, sampled(1, 5), use_tqdm=False)[0].outputs[0].text[3]
    [out] = llm.generate(prompt, sampled(2, 5, stop), use_tqdm=False)
    for i, c in enumerate(out.outputs):
        [want] = ref.generate(prompt, sampled(1, 5 + i, stop), use_tqdm=False)[0].outputs
        assert (c.text, c.token_ids, c.finish_reason, c.stop_reason) == \
            (want.text, want.token_ids, want.finish_reason, want.stop_reason)
    assert out.outputs[0].finish_reason == "stop" and len(out.outputs[0].token_ids) <= 4
    assert_idle(llm)


def test_aborting_the_request_ends_every_sequence(tiny_models):
    engine = make(tiny_models["qwen3"][0]).llm_engine
    engine.add_request("a", {"prompt_token_ids": PROMPTS[0]}, greedy(n=3, max_tokens=40), stream=True)
    for _ in range(3):
        engine.step()
    assert len(scheduler_of(engine).running) == 3
    engine.abort_request("a")
    assert not engine.has_unfinished_requests()
    assert_idle(engine)
    # A consumer that stops early aborts the whole request too.
    engine.add_request("b", {"prompt_token_ids": PROMPTS[1]}, greedy(n=2, max_tokens=40), stream=True)
    stream = engine.iter_outputs(["b"])
    next(stream)
    stream.close()
    assert_idle(engine)


def test_preemption_recomputes_a_sequence_on_its_own(tiny_models, reference):
    """8 blocks of 8 tokens: n = 3 requests of the 19- and 30-token prompts cannot all grow to 40
    tokens at once, so sequences are preempted and recomputed alone."""
    prompts = [PROMPTS[0], PROMPTS[4]]
    expect = [o.outputs[0].token_ids for o in generate(reference, greedy(max_tokens=10), prompts)]
    for caching in (True, False):
        llm = make(tiny_models["qwen3"][0], num_gpu_blocks_override=8, max_num_batched_tokens=16,
                   enable_prefix_caching=caching)
        outs = generate(llm, greedy(n=3, max_tokens=10), prompts)
        assert [[c.token_ids for c in o.outputs] for o in outs] == [[want] * 3 for want in expect]
        assert scheduler_of(llm).num_preemptions > 0
        assert_idle(llm)


def test_random_submissions_aborts_and_preemptions_leak_nothing(tiny_models, reference):
    """Requests of n = 1, 2 or 3 (prompts sharing prefixes) arrive while others run, some are
    aborted, the pool preempts; every request that was not aborted gets n copies of its n = 1
    greedy tokens, and the pool is whole at the end."""
    rng = random.Random(0)
    engine = make(tiny_models["qwen3"][0], num_gpu_blocks_override=9, max_num_batched_tokens=24).llm_engine
    base = list(range(150, 182))
    submitted: dict[str, tuple[list[int], int, int]] = {}
    aborted: set[str] = set()
    finals = {}
    for t in range(120):
        if t < 60 and rng.random() < 0.3:
            prompt = base[:rng.randint(1, 24)] + [rng.randrange(3, 320) for _ in range(rng.randint(0, 8))]
            n, m = rng.choice([1, 2, 3]), rng.randint(1, 12)
            rid = engine.add_request(f"r{t}", {"prompt_token_ids": prompt}, greedy(n=n, max_tokens=m), stream=False)
            submitted[rid] = (prompt, n, m)
        if rng.random() < 0.05 and set(submitted) - aborted - set(finals):
            rid = rng.choice(sorted(set(submitted) - aborted - set(finals)))
            engine.abort_request(rid)
            aborted.add(rid)
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert scheduler_of(engine).num_preemptions > 0 and len(submitted) > 10
    for rid, (prompt, n, m) in submitted.items():
        if rid in aborted:
            continue
        [want] = generate(reference, greedy(max_tokens=m), [prompt])
        assert [c.token_ids for c in finals[rid].outputs] == [want.outputs[0].token_ids] * n, rid
    assert_idle(engine)


def test_best_of_and_bad_n_are_clear_errors(tiny_models):
    with pytest.raises(ValueError, match=r"best_of must be None or equal to n \(2\)"):
        SamplingParams(n=2, best_of=4)
    SamplingParams(n=3, best_of=3)
    with pytest.raises(ValueError, match="SamplingParams.n must be >= 1, got 0"):
        SamplingParams(n=0)
    engine = LLMEngine(make(tiny_models["qwen3"][0]).llm_engine.config)
    # The processor alone runs one sequence per request: n > 1 needs the fan-out of
    # EngineFrontend.process_request, and is refused elsewhere rather than run as one sequence.
    with pytest.raises(ValueError, match="SamplingParams.n must be 1 here, got 2: this entry point runs one sequence"):
        engine.processor.process("x", [5, 6], SamplingParams(n=2))
