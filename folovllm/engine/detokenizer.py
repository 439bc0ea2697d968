"""Incremental detokenization with stop-string detection, O(window) work per step."""

from __future__ import annotations

import inspect

from folovllm.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"


def _decode_kwargs(tokenizer, params: SamplingParams) -> dict:
    kwargs = {"skip_special_tokens": params.skip_special_tokens}
    try:
        accepted = inspect.signature(tokenizer.decode).parameters
    except (TypeError, ValueError):
        return kwargs
    if "spaces_between_special_tokens" in accepted or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        kwargs["spaces_between_special_tokens"] = params.spaces_between_special_tokens
    return kwargs


class IncrementalDetokenizer:
    """Turns generated token ids into text as they arrive.

    Each step decodes only a short window: ids[prefix_offset:read_offset] was already emitted and
    serves as context (so decoders that depend on neighbours, e.g. leading-space handling, behave
    as in a full decode); ids[prefix_offset:] minus that prefix is the new text. Text ending in an
    incomplete UTF-8 character ("\\ufffd") is held back until a later token completes it.

    Only generated ids are decoded, never the prompt, so that the text equals
    tokenizer.decode(output_ids); prompt_token_ids is accepted for vLLM's signature only.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.output_text = ""
        self._tokenizer = tokenizer if params.detokenize else None
        self._params = params
        self._done = False
        self._num_generated = 0
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        if self._tokenizer is not None:
            # Models pad their vocabulary past the tokenizer's (Qwen); those ids have no text.
            self._num_known_ids = len(tokenizer)
            self._kwargs = _decode_kwargs(tokenizer, params)
        # A stop string may start in earlier text and end in the new text.
        self._stop_lookback = max(map(len, params.stop), default=1) - 1

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string that matched (then output_text is truncated before
        it, or kept including it when params.include_stop_str_in_output), else None."""
        if self._tokenizer is None or self._done:
            return None
        self._num_generated += len(new_token_ids)
        self._ids.extend(t for t in new_token_ids if 0 <= t < self._num_known_ids)
        return self._append(self._new_text(flush=False))

    def finish(self) -> str | None:
        """Emit text still held back as an incomplete character (generation ended mid-character),
        so output_text equals the full decode. Call once when the request ends; returns a stop
        string completed by that text, like update()."""
        if self._tokenizer is None or self._done:
            return None
        stop = self._append(self._new_text(flush=True))
        self._done = True
        return stop

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, **self._kwargs) if ids else ""

    def _new_text(self, flush: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        if len(text) <= len(prefix_text) or (text.endswith(_REPLACEMENT_CHAR) and not flush):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix_text):]

    def _append(self, new_text: str) -> str | None:
        if not new_text:
            return None
        start = max(0, len(self.output_text) - self._stop_lookback)
        self.output_text += new_text
        if self._num_generated <= self._params.min_tokens:
            return None  # as in vLLM: stop strings, like stop tokens, wait for min_tokens
        match = self._earliest_stop(start)
        if match is None:
            return None
        pos, stop = match
        end = pos + len(stop) if self._params.include_stop_str_in_output else pos
        self.output_text = self.output_text[:end]
        self._done = True
        return stop

    def _earliest_stop(self, start: int) -> tuple[int, str] | None:
        best = None
        for stop in self._params.stop:
            pos = self.output_text.find(stop, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best
