"""`folovllm eval ppl` (folovllm/eval/): perplexity over sliding windows equals exp(mean NLL)
computed here with transformers on the same weights, over windows built here the way the
Hugging Face perplexity guide builds them (labels of already-scored tokens set to -100)."""

from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from folovllm.entrypoints.cli import main
from folovllm.eval.perplexity import sliding_windows

sys.path.insert(0, str(Path(__file__).parent))
from test_gptq_load import hf_reference, write_gptq  # noqa: E402

TEXT = "".join(chr(0x21 + (i * 37 + i // 7) % 90) for i in range(300))


def hf_perplexity(model, ids: list[int], window: int, stride: int, max_windows: int | None = None):
    ids_t = torch.tensor([ids])
    nll_sum, n_tokens, prev_end, n = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        input_ids = ids_t[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        num_loss_tokens = int((target[:, 1:] != -100).sum())  # labels shift left by one inside
        nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end, n = end, n + 1
        if end == len(ids) or n == max_windows:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def run_cli(capsys, path, text_file, *extra) -> tuple[float, int]:
    rc = main(["eval", "ppl", "--model", str(path), "--text", str(text_file), "--device", "cpu", *extra])
    out = capsys.readouterr().out
    assert rc == 0, out
    m = re.search(r"perplexity ([\d.]+) over (\d+) tokens", out)
    assert m, out
    return float(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("window,stride,max_windows", [(64, 24, None), (64, 64, None), (48, 16, 3)])
def test_perplexity_equals_transformers(tiny_models_with_tokenizer, tmp_path, capsys, arch, window, stride,
                                        max_windows):
    from folovllm.attention.backends.torch_ref import TorchAttentionImpl
    from folovllm.config import EngineConfig, ModelConfig
    from folovllm.eval.perplexity import perplexity
    from folovllm.model_executor.model_loader import get_model

    path, hf, tokenizer = tiny_models_with_tokenizer[arch]
    ids = tokenizer(TEXT)["input_ids"]
    expected, expected_tokens = hf_perplexity(hf, ids, window, stride, max_windows)
    mc = EngineConfig(ModelConfig(path), device="cpu").model_config
    result = perplexity(get_model(mc, TorchAttentionImpl, torch.device("cpu")), ids, window, stride, max_windows)
    assert result.num_tokens == expected_tokens
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    extra = ["--window", str(window), "--stride", str(stride)]
    extra += ["--max-windows", str(max_windows)] if max_windows else []
    ppl, tokens = run_cli(capsys, path, text_file, *extra)
    assert tokens == expected_tokens and ppl == pytest.approx(expected, rel=1e-4)


def test_perplexity_of_a_gptq_checkpoint(tiny_models_with_tokenizer, tmp_path, capsys):
    path, hf, _ = tiny_models_with_tokenizer["llama"]
    qpath, deq = write_gptq(path, tmp_path / "gptq", act_order=True, sym=False)
    for f in Path(path).glob("tokenizer*"):
        shutil.copy(f, qpath / f.name)
    for f in Path(path).glob("special_tokens_map.json"):
        shutil.copy(f, qpath / f.name)
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    ppl, tokens = run_cli(capsys, qpath, text_file, "--window", "64", "--stride", "32")
    ids = AutoTokenizer.from_pretrained(path)(TEXT)["input_ids"]
    expected, n = hf_perplexity(hf_reference(hf, deq), ids, 64, 32)
    assert tokens == n == len(ids) - 1 and ppl == pytest.approx(expected, rel=1e-4)
    assert ppl != pytest.approx(hf_perplexity(hf, ids, 64, 32)[0], rel=1e-3)  # the quantization is seen


def test_default_text_is_the_held_out_half(tiny_models_with_tokenizer, monkeypatch, capsys):
    calib = pytest.importorskip("folovllm.quantization.calib")
    path, hf, tokenizer = tiny_models_with_tokenizer["llama"]
    monkeypatch.setattr(calib, "eval_text", lambda directory=None: TEXT)
    rc = main(["eval", "ppl", "--model", path, "--device", "cpu", "--window", "64", "--stride", "32"])
    assert rc == 0
    expected, n = hf_perplexity(hf, tokenizer(TEXT)["input_ids"], 64, 32)
    m = re.search(r"perplexity ([\d.]+) over (\d+) tokens", capsys.readouterr().out)
    assert int(m.group(2)) == n and float(m.group(1)) == pytest.approx(expected, rel=1e-4)

    def unavailable(directory=None):
        raise FileNotFoundError("no exllamav2 wheel")
    monkeypatch.setattr(calib, "eval_text", unavailable)
    assert main(["eval", "ppl", "--model", path, "--device", "cpu"]) == 2
    assert "pass --text FILE" in capsys.readouterr().err


def test_windows_score_every_token_once():
    for n, window, stride in [(300, 64, 24), (64, 64, 32), (10, 4, 1), (2, 2, 1), (130, 64, 64)]:
        spans = sliding_windows(n, window, stride)
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert all(end - begin <= window and begin < first for begin, end, first in spans)
        if stride < window:
            assert scored == list(range(1, n))
        else:  # disjoint windows: each window's first token has no context, as in the guide
            assert scored == [t for t in range(1, n) if t % window]
    assert len(sliding_windows(300, 64, 24, max_windows=2)) == 2


@pytest.mark.parametrize("args,match", [
    (["--window", "1"], "window >= 2"),
    (["--window", "64", "--stride", "2000"], "stride <= window"),
    (["--window", "64", "--max-windows", "0"], "max_windows must be >= 1"),
    (["--window", "4096", "--stride", "512"], "longer than max_model_len"),
])
def test_bad_arguments_are_clear_errors(tiny_models_with_tokenizer, tmp_path, capsys, args, match):
    path, _, _ = tiny_models_with_tokenizer["llama"]
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    rc = main(["eval", "ppl", "--model", path, "--text", str(text_file), "--device", "cpu", *args])
    assert rc == 2 and match in capsys.readouterr().err
