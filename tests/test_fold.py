"""``flcore._fold``, the compiled one-pass fold: its arithmetic and the buffers it refuses."""

from __future__ import annotations

import numpy as np
import pytest

_fold = pytest.importorskip("flcore._fold")  # test_aggregation fails if it was not built


def test_scale_add_and_mean_compute_the_weighted_mean_in_float64() -> None:
    x = np.array([1.5, -2.0, 3.25], np.float32)
    y = np.array([0.5, 4.0, -1.0], np.float32)
    total = np.empty(3)
    _fold.scale(total, x, 2.0)
    assert total.tolist() == [3.0, -4.0, 6.5]
    _fold.add(total, y, 3.0)
    assert total.tolist() == [4.5, 8.0, 3.5]
    out = np.empty(3, np.float32)
    _fold.mean(out, total, 5.0)
    assert out.tolist() == [0.8999999761581421, 1.600000023841858, 0.699999988079071]
    assert out.tolist() == (total / 5.0).astype(np.float32).tolist()


def test_a_float32_weight_widens_before_it_is_multiplied() -> None:
    """2**24 + 1 is not a float32: a product taken in float32 would lose the 1."""
    total = np.empty(1)
    _fold.scale(total, np.array([1.0 + 2.0**-23], np.float32), 2.0**24 + 1)
    assert total[0] == (1.0 + 2.0**-23) * (2.0**24 + 1)


def test_empty_buffers_are_fine() -> None:
    _fold.add(np.empty(0), np.empty(0, np.float32), 1.0)


@pytest.mark.parametrize(
    ("total", "x", "error", "message"),
    [
        (
            np.empty(4),
            np.empty(3, np.float32),
            ValueError,
            r"lengths differ \(got 'd' x 4 and 'f' x 3\)",
        ),
        (np.empty(4, np.float32), np.empty(4, np.float32), ValueError, "wrong item formats"),
        (np.empty(4), np.empty(4), ValueError, r"wrong item formats \(got 'd' x 4 and 'd' x 4\)"),
        (bytearray(32), np.empty(4, np.float32), ValueError, "got 'B' x 32"),
        (np.empty(8)[::2], np.empty(4, np.float32), ValueError, "not C-contiguous"),
        (np.empty(4), np.empty(8, np.float32)[::2], ValueError, "not C-contiguous"),
        (np.empty(4).view(np.float64).copy(), object(), TypeError, "bytes-like object"),
    ],
)
def test_bad_buffers_are_refused_with_what_is_wrong(
    total: object, x: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _fold.add(total, x, 1.0)


def test_a_read_only_sum_is_refused_and_left_alone() -> None:
    total = np.zeros(2)
    total.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _fold.scale(total, np.ones(2, np.float32), 1.0)
    assert total.tolist() == [0.0, 0.0]


def test_mean_checks_its_buffers_the_other_way_round() -> None:
    with pytest.raises(ValueError, match="formats 'f' and 'd'"):
        _fold.mean(np.empty(2), np.empty(2), 1.0)
