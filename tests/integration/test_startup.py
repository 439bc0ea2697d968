"""Start-up says what it is doing, with times, at INFO; and the command line reads its prompt from
standard input when --prompt is absent and stdin is not a terminal."""

from __future__ import annotations

import io
import logging
import re

import pytest

from folovllm import LLM
from folovllm.entrypoints import cli


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def test_start_up_logs_each_phase_with_its_time(tiny_models):
    handler = Records()
    logger = logging.getLogger("folovllm")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        LLM(tiny_models["qwen2"][0], device="cpu", cpu_kv_cache_space_gib=0.01)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    info = [m for lvl, m in handler.lines if lvl == logging.INFO]
    assert any(m.startswith("loading weights of") for m in info), info
    assert any(re.fullmatch(r"weights loaded in \d+\.\d\d s", m) for m in info), info
    assert any(re.match(r"KV cache: \d+ blocks of 16 tokens", m) for m in info), info
    ready = [m for m in info if m.startswith("engine ready in")]
    assert len(ready) == 1 and re.match(r"engine ready in \d+\.\d s: \d+ KV blocks", ready[0]), info


class FakeStdin(io.StringIO):
    def __init__(self, text: str, tty: bool) -> None:
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_prompt_comes_from_stdin_unless_it_is_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", FakeStdin("def add(a, b):\n", tty=False))
    assert cli.prompts_from_stdin() == ["def add(a, b):\n"]
    monkeypatch.setattr("sys.stdin", FakeStdin("", tty=True))
    assert cli.prompts_from_stdin() == [cli.DEFAULT_PROMPT]
    assert "no --prompt given" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", FakeStdin("  \n", tty=False))
    with pytest.raises(ValueError, match="standard input is empty"):
        cli.prompts_from_stdin()
