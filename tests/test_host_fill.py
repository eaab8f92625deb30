"""new_filled_buffer: an MLX array written once by the host through mx.load, unzeroed."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from agentkv.daemon.host_fill import HUGE_PAGE, _FillStream, new_filled_buffer


def pattern(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.uint64) * 2654435761 % 251).astype(np.uint8)


@pytest.mark.parametrize("nbytes", [1, 4099, 3 * HUGE_PAGE + 17])
def test_the_array_holds_exactly_what_fill_wrote(nbytes):
    seen = []

    def fill(view: np.ndarray) -> None:
        seen.append(view.nbytes)
        view[:] = pattern(nbytes)

    got = new_filled_buffer(nbytes, fill)
    assert got.dtype == mx.uint8 and got.shape == (nbytes,)
    assert np.array_equal(np.array(got), pattern(nbytes))
    assert seen == [nbytes]  # one call, over the whole array


def test_views_of_the_buffer_share_its_bytes():
    """Typed views of slices (what restore makes of it) read the bytes fill wrote."""
    values = np.arange(64, dtype=np.float32)

    def fill(view: np.ndarray) -> None:
        view[:] = 0
        view[128:384] = values.view(np.uint8)

    blob = new_filled_buffer(512, fill)
    floats = blob[128:384].view(mx.float32).reshape(1, 4, 16, 1)
    assert np.array_equal(np.array(floats).reshape(-1), values)


def test_an_error_in_fill_is_raised_as_itself():
    def fill(view: np.ndarray) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        new_filled_buffer(1024, fill)


def test_a_loader_reading_in_pieces_gets_the_same_bytes():
    """If MLX read the tensor in pieces, the stream stages fill's bytes once and copies."""
    n = 10_000
    calls = []

    def fill(view: np.ndarray) -> None:
        calls.append(view.nbytes)
        view[:] = pattern(n)

    stream = _FillStream(n, fill)
    size = stream.seek(0, 2)
    head = size - n
    stream.seek(head)
    out = bytearray()
    while stream.tell() < size:
        piece = bytearray(3000)
        got = stream.readinto(memoryview(piece))
        out += piece[:got]
    assert bytes(out) == pattern(n).tobytes()
    assert calls == [n] and stream.filled


def test_nbytes_must_be_positive():
    with pytest.raises(ValueError):
        new_filled_buffer(0, lambda view: None)
