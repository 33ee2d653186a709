"""Tests for flowrl.dynamics.selection.StepSelector."""

import pytest

from flowrl.dynamics import StepSelector


def test_default_is_every_step_but_the_last():
    sel = StepSelector(num_inference_steps=5)
    assert sel.select(0) == [0, 1, 2, 3]
    assert sel.select(123) == [0, 1, 2, 3]


def test_explicit_train_steps_sorted_and_all_by_default():
    sel = StepSelector(10, train_steps=[7, 0, 3])
    assert sel.select(0) == [0, 3, 7]


def test_random_draw_range_size_sorted_and_reproducible():
    sel = StepSelector(10, train_steps=[0, 1, 2, 3, 4, 5], num_train_steps=2, seed=3)
    draws = [sel.select(it) for it in range(50)]
    for d in draws:
        assert len(d) == 2 and d == sorted(d) and len(set(d)) == 2
        assert set(d) <= {0, 1, 2, 3, 4, 5}
    # same (seed, iteration) -> same draw, also on another instance (another process)
    other = StepSelector(10, train_steps=[0, 1, 2, 3, 4, 5], num_train_steps=2, seed=3)
    assert [other.select(it) for it in range(50)] == draws
    # the draw changes across iterations and with the seed
    assert len({tuple(d) for d in draws}) > 5
    reseeded = StepSelector(10, train_steps=[0, 1, 2, 3, 4, 5], num_train_steps=2, seed=4)
    assert [reseeded.select(it) for it in range(50)] != draws
    # every candidate is drawn at some point
    assert set().union(*map(set, draws)) == {0, 1, 2, 3, 4, 5}


def test_progressive_window_moves_and_wraps():
    # N = 6 -> trainable 0..4; window 2 -> starts 0..3; stride 1 every 2 iterations
    sel = StepSelector(6, window_size=2, window_shift_interval=2)
    got = [sel.select(it) for it in range(10)]
    assert got == [[0, 1], [0, 1], [1, 2], [1, 2], [2, 3], [2, 3], [3, 4], [3, 4], [0, 1], [0, 1]]


def test_progressive_window_stride_restarts_at_zero():
    # trainable 0..8, window 3 -> starts 0..6, stride 2 -> 0, 2, 4, 6, 0, ...
    sel = StepSelector(10, window_size=3, window_shift_interval=1, window_stride=2)
    assert [sel.window_start(it) for it in range(6)] == [0, 2, 4, 6, 0, 2]
    assert sel.select(3) == [6, 7, 8]


def test_window_intersects_train_steps_and_draws():
    sel = StepSelector(8, train_steps=[0, 2, 3, 5], window_size=3, window_shift_interval=1)
    assert sel.select(0) == [0, 2]  # window 0..2
    assert sel.select(1) == [2, 3]  # window 1..3
    assert sel.select(3) == [3, 5]  # window 3..5
    drawn = StepSelector(8, window_size=4, window_shift_interval=1, num_train_steps=2, seed=1)
    for it in range(8):
        d = drawn.select(it)
        start = drawn.window_start(it)
        assert len(d) == 2 and set(d) <= set(range(start, start + 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_inference_steps=5, train_steps=[0, 1], num_train_steps=3), "at most 2"),
        (dict(num_inference_steps=5, train_steps=[0, 4]), r"0\.\.3"),
        (dict(num_inference_steps=5, train_steps=[-1]), r"0\.\.3"),
        (dict(num_inference_steps=5, train_steps=[1, 1, 2]), "more than once"),
        (dict(num_inference_steps=5, window_size=0, window_shift_interval=1), r"1\.\.4"),
        (dict(num_inference_steps=5, window_size=5, window_shift_interval=1), r"1\.\.4"),
        (dict(num_inference_steps=5, window_size=2), "window_shift_interval"),
        (dict(num_inference_steps=5, num_train_steps=0), ">= 1"),
        (dict(num_inference_steps=5, train_steps=[]), "empty"),
        (dict(num_inference_steps=1), ">= 2"),
        (dict(num_inference_steps=8, train_steps=[0], window_size=2, window_shift_interval=1), "holds none"),
    ],
)
def test_validation_errors_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepSelector(**kwargs)
