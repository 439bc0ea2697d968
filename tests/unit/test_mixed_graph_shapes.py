"""Which mixed-step CUDA graphs are captured, and the request rows each is captured with (pure
functions of the runner; the capture itself and its replays are tested on a GPU in
tests/gpu/test_graph_padding_gpu.py)."""

from __future__ import annotations

from folovllm.worker.model_runner import MIXED_GRAPH_TOKENS, mixed_capture_rows, mixed_graph_shapes


def test_budget_above_max_model_len_is_captured_in_tiers_that_can_hold_it():
    shapes = mixed_graph_shapes(8192, 4096, [16, 256])
    # 6144 and 8192 tokens need two requests of at most 4096: both tiers hold them
    assert {(6144, 16), (6144, 256), (8192, 16), (8192, 256)} <= set(shapes)
    assert max(s for s, _ in shapes) == 8192
    # a size up to max_model_len is captured in every tier
    assert {(4096, 16), (4096, 256), (16, 16), (16, 256)} <= set(shapes)


def test_sizes_no_tier_can_hold_are_left_out():
    # 8 requests of at most 256 tokens hold 2048: nothing larger can be a step
    shapes = mixed_graph_shapes(8192, 256, [8])
    assert max(s for s, _ in shapes) == 2048
    assert [s for s, _ in shapes] == [s for s in MIXED_GRAPH_TOKENS if s <= 2048]
    # a tier of 2 requests holds 512 at most, a tier of 8 up to 2048
    shapes = mixed_graph_shapes(1024, 256, [2, 8])
    assert (512, 2) in shapes and (1024, 2) not in shapes and (1024, 8) in shapes
    # the largest possible step is captured even when it is not one of MIXED_GRAPH_TOKENS
    assert max(s for s, _ in mixed_graph_shapes(8192, 300, [8])) == 2400


def test_capture_rows_fit_max_model_len():
    assert mixed_capture_rows(8192, 4096) == [4096, 4096]
    assert mixed_capture_rows(6144, 4096) == [4096, 2048]
    assert mixed_capture_rows(1000, 4096) == [1000]
    assert mixed_capture_rows(2400, 300) == [300] * 8
