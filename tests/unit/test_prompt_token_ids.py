"""Token-id prompts as the processor takes them: plain ints out, with their extremes for the
vocabulary check, and a clear error for anything that is not an integer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from folovllm.engine.processor import _token_ids


def test_integers_come_back_as_plain_ints_with_their_extremes():
    ids, lo, hi = _token_ids([np.int64(7), 3, np.int32(12), 0, torch.tensor(9)])
    assert ids == [7, 3, 12, 0, 9] and all(type(t) is int for t in ids)
    assert (lo, hi) == (0, 12)
    assert _token_ids(list(torch.tensor([4, 1, 6]))) == ([4, 1, 6], 1, 6)   # a tensor's elements
    assert _token_ids((5,)) == ([5], 5, 5)
    # beyond int64: still an int (the vocabulary check rejects it, with its value)
    ids, lo, hi = _token_ids([1 << 70, 2])
    assert ids == [1 << 70, 2] and (lo, hi) == (2, 1 << 70)


@pytest.mark.parametrize("ids, bad", [([7, 0, False], "2 is False"), ([True], "0 is True"), ([4, 2.0], "1 is 2.0"),
                                      ([3, "4"], "1 is '4'"), ([np.float32(1)], "0 is np.float32"),
                                      ([5, torch.tensor(True)], "1 is tensor"), ([np.array(False)], "0 is array"),
                                      ([torch.tensor([5, 6])], "0 is tensor"), ([2, None, 1.5], "1 is None"),
                                      ([7, torch.tensor(2.0)], "1 is tensor")])
def test_non_integers_are_named(ids, bad):
    with pytest.raises(ValueError, match=f"prompt token {bad}"):
        _token_ids(ids)
