"""The fused Triton sampler (folovllm/sample/triton_sampler.py) and the Sampler's use of it, on the
CPU under the Triton interpreter (TRITON_INTERPRET=1).

Triton decides at import whether its functions are compiled or interpreted, so the variable is set
here before anything imports triton; if triton was already imported compiled in this process
(another test file got there first), the in-process cases skip and one test reruns this file in a
fresh interpreter process instead.

The interpreter runs one program at a time in numpy, at roughly a millisecond per row of a small
vocabulary, so the distribution tests draw a few thousand rows in one call (one draw per row, each
with its own Philox key). tests/gpu/test_triton_sampler_gpu.py covers the full 151,936-token
vocabulary compiled on CUDA.
"""

from __future__ import annotations

import os

import torch  # noqa: E402
from interpret_mode import enter_interpreter, rerun_pytest, in_process_marker, require  # noqa: E402
from sampling_reference import chi2_critical, chi2_statistic, key, reference_sample  # noqa: E402
from sampling_reference import keys as _keys  # noqa: E402

_TRITON_ALREADY_COMPILED = enter_interpreter()

import pytest  # noqa: E402

require("triton")  # a skip without triton; under CI, a failure
import triton  # noqa: E402,F401
import triton.language as tl  # noqa: E402

from folovllm.sample.metadata import build_sampling_metadata  # noqa: E402
from folovllm.sample.sampler import Sampler  # noqa: E402
from folovllm.sampling_params import SamplingParams  # noqa: E402

# w = 1 gives log(0) = -inf on purpose (that token then loses); numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

in_process = in_process_marker(_TRITON_ALREADY_COMPILED)

if not _TRITON_ALREADY_COMPILED:
    from folovllm.sample import triton_sampler  # noqa: E402
    from folovllm.sample.triton_sampler import gumbel_sample  # noqa: E402

    @triton.jit
    def _exponential_of(r_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        r = tl.load(r_ptr + offs).to(tl.uint32, bitcast=True)     # Philox gives uint32 words
        tl.store(out_ptr + offs, triton_sampler._exponential(r))

# Rows per program for the big interpreted calls: the interpreter's cost is per operation, so
# wide programs are much faster there (the default suits a GPU). The result does not depend on it.
FAST = 256
CPU = torch.device("cpu")


def keys(n: int, start: int = 0) -> torch.Tensor:
    return _keys(n, 12345 + start)


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------

@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_torch_argmax_with_ties(dtype):
    """Lowest index among ties, within a program, across the four sub-tiles of a tile, across
    chunks (chunk=1024 on 2,500 columns gives three), with +-inf, and an all -inf row."""
    vocab = 2500
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, vocab, generator=gen).to(dtype)
    logits[0, [7, 300, 1100, 2400]] = 9.0         # ties across sub-tiles and chunks
    logits[1, [2047, 2048]] = 9.0                 # tie straddling a chunk boundary
    logits[2, [1500, 40]] = 9.0                   # the lower index comes later in no order
    logits[3, 2499] = 9.0                         # last column
    logits[4, :] = float("-inf")                  # torch.argmax says 0
    logits[5, [600, 5]] = float("inf")
    logits[6, :] = 1.0                            # everything ties
    logits[7, 256] = logits[7, 0] = 5.0           # lane 0 of sub-tiles 1 and 0
    logits[8, [1900, 1200]] = float("nan")        # torch.argmax takes the first NaN
    expected = logits.argmax(dim=-1)
    assert expected.tolist() == [7, 2047, 40, 2499, 0, 5, 0, 0, 1200]
    for chunk, rows in [(None, None), (1024, 1), (2048, 4)]:
        got = gumbel_sample(logits, None, None, chunk=chunk, rows_per_program=rows)
        assert got.dtype == torch.int64
        assert torch.equal(got, expected), (chunk, rows)
    # Greedy rows inside a random batch (temperature < 1e-5, 0 included) take the same argmax.
    temperature = torch.tensor([0.0, 1e-6, 0.0, 0.5, 0.0, 0.0, 1.0, 0.0, 9e-6])
    got = gumbel_sample(logits, temperature, keys(9))
    greedy = temperature < 1e-5
    assert torch.equal(got[greedy], expected[greedy])


@in_process
def test_samples_follow_softmax_at_each_temperature():
    """Pearson chi-square of the sampled frequencies against softmax(logits / T), 800 rows per
    temperature in a single call (each row its own key), threshold the chi-square quantile at
    p = 1e-4. The keys are fixed, so the outcome is deterministic; a sampler that ignored T, or
    used the wrong sign or noise, lands far above the threshold."""
    base = [1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0]
    vocab, per_temp, temps = 40, 800, [0.3, 0.7, 1.5]
    positions = [3, 11, 17, 20, 26, 33, 39]                  # scattered among -inf columns
    row = torch.full((vocab,), float("-inf"))
    row[positions] = torch.tensor(base)
    n = per_temp * len(temps)
    temperature = torch.tensor(temps).repeat_interleave(per_temp)
    got = gumbel_sample(row.repeat(n, 1), temperature, keys(n), rows_per_program=FAST)
    assert set(got.tolist()) <= set(positions)               # -inf columns never come up
    for i, t in enumerate(temps):
        counts = torch.bincount(got[i * per_temp:(i + 1) * per_temp], minlength=vocab)[positions]
        probs = torch.softmax(torch.tensor(base, dtype=torch.float64) / t, dim=0).tolist()
        stat, df = chi2_statistic(counts.tolist(), probs)
        assert stat < chi2_critical(df), (t, counts.tolist(), [round(p * per_temp, 1) for p in probs])


@in_process
def test_flat_distribution_covers_the_vocabulary():
    """Uniform bf16 logits over 2,100 ids: three tiles (a counter reused across tiles would tie
    ids 1,024 apart), all four Philox words of each counter. Chi-square on 21 bins of 100 ids."""
    n, vocab = 700, 2100
    got = gumbel_sample(torch.zeros(n, vocab, dtype=torch.bfloat16), torch.full((n,), 0.8), keys(n),
                        rows_per_program=FAST)
    counts = torch.bincount(got // 100, minlength=21).tolist()
    stat, df = chi2_statistic(counts, [1 / 21] * 21)
    assert df == 20 and stat < chi2_critical(df), counts


@in_process
def test_tokens_match_a_float64_reference_of_the_noise():
    """The exact token of each row against reference_sample: pins the (key, id) -> noise map, so
    a seeded request keeps its tokens across devices (GPU and interpreter) and code changes.
    Keys include negative ones (their two's complement is the Philox key)."""
    vocab, temperature = 2100, 0.7
    key_list = [key(3000 + i) for i in range(8)] + [-1, 0, 2 ** 40 + 7, -(2 ** 62)]
    logits = torch.randn(len(key_list), vocab, generator=torch.Generator().manual_seed(4))
    got = gumbel_sample(logits, torch.full((len(key_list),), temperature), torch.tensor(key_list))
    assert got.tolist() == [reference_sample(logits[i], temperature, k) for i, k in enumerate(key_list)]


@in_process
def test_minus_inf_and_nan_never_sampled():
    n, vocab = 400, 64
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(n, vocab, generator=gen) * 3
    banned = torch.rand(n, vocab, generator=gen) < 0.7
    banned[:, 0] = False                                     # at least one finite logit per row
    logits[banned] = float("-inf")
    nan = torch.rand(n, vocab, generator=gen) < 0.1
    nan[:, 0] = False
    logits[nan] = float("nan")
    temperature = torch.linspace(0.05, 5.0, n)               # a hot row flattens the finite logits
    got = gumbel_sample(logits, temperature, keys(n), rows_per_program=FAST)
    assert not banned.gather(1, got[:, None]).any()
    assert not nan.gather(1, got[:, None]).any()
    # A single finite logit always wins, however hot; an all -inf row still gives a valid id.
    one = torch.full((50, vocab), float("-inf"))
    one[:, 37] = -1e4
    assert got.new_tensor([37] * 50).equal(gumbel_sample(one, torch.full((50,), 100.0), keys(50)))
    none = gumbel_sample(torch.full((3, vocab), float("-inf")), torch.ones(3), keys(3))
    assert ((none >= 0) & (none < vocab)).all()
    # A NaN seen first by a lane must not shadow the lane's later columns (here 3 + 256, which
    # dominates the row).
    shadow = torch.zeros(20, 600)
    shadow[:, 3], shadow[:, 259] = float("nan"), 50.0
    assert gumbel_sample(shadow, torch.ones(20), keys(20)).tolist() == [259] * 20


@in_process
def test_exponential_noise_is_positive_and_accurate():
    """The 32-bit word -> Exp(1) map: never 0 (a 0 would give the token an infinite score), no
    NaN, and accurate where it matters (small values, which decide the winner) to float rounding.
    The largest words may give inf, which only makes a token lose."""
    words = [0, 1, 2, 3, 100, 2 ** 20, 2 ** 26, 2 ** 27 - 1, 2 ** 27, 2 ** 30, 2 ** 31, 3 * 2 ** 30,
             2 ** 32 - 2 ** 12, 2 ** 32 - 2 ** 9, 2 ** 32 - 129, 2 ** 32 - 1]
    r = torch.tensor(words, dtype=torch.int64).to(torch.int32)     # the words' bit patterns
    out = torch.empty(16)
    _exponential_of[(1,)](r, out, N=16)
    r_u = torch.tensor(words, dtype=torch.float64)
    w = (r_u + 0.5) / 2 ** 32
    exact = -torch.log1p(-w)
    assert (out > 0).all() and not out.isnan().any()
    assert out[:15].isfinite().all()
    # Up to E = 2 (w < 0.87); above it rounding in w shows, but a token then wins with
    # probability < e^-2 of its share anyway, and the very largest words are inf.
    small = exact < 2
    assert small.sum() == 12
    rel = ((out.double()[small] - exact[small]) / exact[small]).abs()
    assert rel.max() < 1e-6, rel


@in_process
def test_a_row_draw_depends_only_on_its_key():
    """Four keyed rows over 2,100 equal logits give the same tokens whatever shares the batch, in
    whatever position, with any chunk size or rows per program; other keys or steps give other
    tokens. (A broken key/counter map would agree by chance with probability 1/2100 per row.)"""
    vocab = 2100
    flat = torch.zeros(vocab)
    mine = keys(4, start=1000)

    def run(layout, n, chunk=None, rows=None):
        """layout: row position of each of my four keys in a batch of n."""
        gen = torch.Generator().manual_seed(n)
        logits = torch.randn(n, vocab, generator=gen)
        temperature = torch.rand(n, generator=gen) + 0.2
        temperature[::3] = 0.0                                # greedy neighbours too
        k = keys(n, start=5000 + n)
        for my_key, pos in zip(mine, layout):
            logits[pos], temperature[pos], k[pos] = flat, 1.0, my_key
        got = gumbel_sample(logits, temperature, k, chunk=chunk, rows_per_program=rows)
        return [got[pos].item() for pos in layout]

    reference = run([0, 1, 2, 3], 4)
    assert run([0], 1) == reference[:1]
    assert run([9, 2, 7, 5], 10) == reference
    assert run([3, 2, 1, 0], 8, rows=8) == reference
    assert run([10, 11, 0, 6], 12, chunk=1024, rows=2) == reference
    assert run([1, 0, 2, 3], 4, chunk=2048, rows=1) == reference
    others = gumbel_sample(flat.repeat(16, 1), torch.ones(16), keys(16, start=2000)).tolist()
    assert len(set(others)) >= 10                              # expected about 15.6 distinct
    steps = [gumbel_sample(flat[None], torch.ones(1), torch.tensor([key(7000 + s)])).item()
             for s in range(12)]
    assert len(set(steps)) >= 8                                # expected about 11.8 distinct


# ---------------------------------------------------------------------------------------------
# Sampler.forward
# ---------------------------------------------------------------------------------------------

def metadata(params, logits, outputs=None):
    """As the runner builds it: a generator for each seeded random row."""
    outputs = outputs or [[] for _ in params]
    generators = {i: torch.Generator().manual_seed(p.seed) for i, p in enumerate(params)
                  if p.seed is not None and not p.greedy}
    return build_sampling_metadata(params, [len(o) for o in outputs], generators, vocab_size=logits.shape[1],
                                   device=CPU, token_ids=lambda: ([[1, 2]] * len(params), outputs))


@pytest.fixture
def launches(monkeypatch):
    """Records every call of the fused launcher (and still runs it)."""
    calls = []
    original = triton_sampler.gumbel_sample

    def recording(logits, temperature, seeds, *args, **kwargs):
        calls.append((logits, temperature, seeds))
        return original(logits, temperature, seeds, *args, **kwargs)

    monkeypatch.setattr(triton_sampler, "gumbel_sample", recording)
    return calls


@in_process
@pytest.mark.parametrize("params,outputs,fused", [
    ([SamplingParams(temperature=0.7)] * 3, None, True),
    ([SamplingParams(temperature=0)] * 3, None, True),                        # all greedy
    ([SamplingParams(temperature=0), SamplingParams()], None, True),          # mixed
    ([SamplingParams(temperature=0), SamplingParams(seed=3)], None, False),   # a seeded random row
    ([SamplingParams(temperature=0, seed=3), SamplingParams()], None, True),  # seeded but greedy
    ([SamplingParams(temperature=0, top_p=0.5), SamplingParams()], None, True),  # filter on a greedy row only
    ([SamplingParams(), SamplingParams(logprobs=2)], None, False),
    ([SamplingParams(temperature=0, logprobs=0)], None, False),
    ([SamplingParams(), SamplingParams(min_tokens=2, stop_token_ids=[3])], [[], [5]], False),
    ([SamplingParams(min_tokens=1, stop_token_ids=[3])], [[5]], True),        # min_tokens reached
    ([SamplingParams(), SamplingParams(temperature=0, repetition_penalty=1.2)], None, False),
    ([SamplingParams(presence_penalty=0.5)], None, False),
    ([SamplingParams(frequency_penalty=0.5)], None, False),
    ([SamplingParams(top_k=5)], None, False),
    ([SamplingParams(top_p=0.9)], None, False),
    ([SamplingParams(min_p=0.1)], None, False),
])
def test_forward_takes_fused_path_exactly_when_it_applies(launches, params, outputs, fused):
    gen = torch.Generator().manual_seed(len(params))
    logits = torch.randn(len(params), 20, generator=gen).to(torch.bfloat16)
    md = metadata(params, logits, outputs)
    out = Sampler(fused=True)(logits, md)
    assert len(launches) == int(fused)
    assert out.sampled_token_ids.shape == (len(params),) and out.sampled_token_ids.dtype == torch.int64
    assert (out.logprobs is None) == (md.max_num_logprobs is None)
    if fused:
        _, temperature, seeds = launches[0]
        assert (temperature is None) == md.all_greedy
    # Off, or by default on a CPU tensor, the fused path is never taken.
    launches.clear()
    Sampler(fused=False)(logits, md)
    Sampler()(logits, md)
    assert not launches


@in_process
def test_forward_greedy_rows_match_torch_path(launches):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 1500, generator=gen).to(torch.bfloat16)
    logits[2, [5, 1400]] = 8.0                                 # a tie across chunks
    params = [SamplingParams(temperature=0.0 if i % 3 else 0.9) for i in range(12)]
    md = metadata(params, logits)
    torch.manual_seed(0)
    fused = Sampler(fused=True)(logits, md).sampled_token_ids
    assert len(launches) == 1
    torch_path = Sampler(fused=False)(logits, md).sampled_token_ids
    greedy = torch.tensor([p.greedy for p in params])
    assert torch.equal(fused[greedy], torch_path[greedy])
    assert torch.equal(fused[greedy], logits.float().argmax(-1)[greedy])
    all_greedy = [SamplingParams(temperature=0)] * 12
    md = metadata(all_greedy, logits)
    assert torch.equal(Sampler(fused=True)(logits, md).sampled_token_ids,
                       Sampler(fused=False)(logits, md).sampled_token_ids)


@in_process
def test_forward_keys_seeded_and_unseeded_rows():
    """A step with a seeded random row keeps the PyTorch path (the request's own generator), so a
    seeded request gives the same tokens alone or in a batch; unseeded rows come from the
    sampler's host generator, which torch.manual_seed makes repeatable."""
    vocab = 300
    logits = torch.zeros(6, vocab)

    def draw(sampler, params, outputs):
        return sampler(logits[:len(params)], metadata(params, logits[:len(params)], outputs)).sampled_token_ids

    torch.manual_seed(0)
    sampler = Sampler(fused=True)
    seeded = SamplingParams(seed=42)
    alone = [draw(sampler, [seeded], None).item() for _ in range(3)]
    crowd = [draw(sampler, [SamplingParams(), SamplingParams(temperature=0), seeded], None)[2].item()
             for _ in range(3)]
    assert alone == crowd and len(set(alone)) == 1        # a fresh generator per call: same draw

    unseeded = [SamplingParams()] * 6
    torch.manual_seed(1)
    first = [draw(Sampler(fused=True), unseeded, None).tolist() for _ in range(2)]
    torch.manual_seed(1)
    s = Sampler(fused=True)
    again = [draw(s, unseeded, None).tolist(), draw(s, unseeded, None).tolist()]
    assert first[0] == first[1] == again[0]                    # repeatable under manual_seed
    assert again[0] != again[1]                                # and fresh each step
    torch.manual_seed(2)
    assert draw(Sampler(fused=True), unseeded, None).tolist() != first[0]   # follows the seed


@in_process
def test_forward_distribution_through_sampler():
    """End to end through Sampler.forward: temperature 0.5 over six tokens, chi-square."""
    base = torch.tensor([0.8, 0.4, 0.0, -0.3, -0.6, -1.0])
    n = 600
    torch.manual_seed(5)
    params = [SamplingParams(temperature=0.5)] * n
    logits = base.repeat(n, 1).to(torch.bfloat16)
    got = Sampler(fused=True)(logits, metadata(params, logits)).sampled_token_ids
    probs = torch.softmax(logits[0].double() / 0.5, dim=0).tolist()
    stat, df = chi2_statistic(torch.bincount(got, minlength=6).tolist(), probs)
    assert stat < chi2_critical(df)


def test_importing_folovllm_does_not_import_triton():
    import subprocess
    import sys
    code = ("import sys, folovllm, folovllm.sample.sampler, folovllm.worker.model_runner; "
            "assert 'triton' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(not _TRITON_ALREADY_COMPILED, reason="the cases above ran in this process")
@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU, tests/gpu/test_triton_sampler_gpu.py runs these cases compiled")
def test_rerun_in_fresh_process():
    rerun_pytest(__file__, dict(os.environ, TRITON_INTERPRET="1"))
