"""new_unzeroed: an MLX array allocated through mx.load, not zeroed, filled by the host."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from agentkv.daemon.engine.host_fill import HUGE_PAGE, _UnzeroedStream, host_view, new_unzeroed


def pattern(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.uint64) * 2654435761 % 251).astype(np.uint8)


@pytest.mark.parametrize("nbytes", [1, 4099, 3 * HUGE_PAGE + 17])
def test_the_array_holds_what_the_host_wrote(nbytes):
    got = new_unzeroed(nbytes)
    assert got.dtype == mx.uint8 and got.shape == (nbytes,)
    host_view(got)[:] = pattern(nbytes)
    assert np.array_equal(np.array(got), pattern(nbytes))
    assert int((got.astype(mx.uint32)).sum().item()) == int(pattern(nbytes).sum())


def test_typed_views_of_slices_share_its_bytes():
    """What restore makes of it: float32 views of slices, written after they were made,
    read the host's bytes, and share the allocation (no copy)."""
    blob = new_unzeroed(1024)
    floats = blob[128:384].view(mx.float32).reshape(1, 4, 16, 1)
    mx.eval(floats)
    values = np.arange(64, dtype=np.float32)
    host_view(blob)[128:384] = values.view(np.uint8)
    assert np.array_equal(np.array(floats).reshape(-1), values)
    assert host_view(floats).ctypes.data == host_view(blob).ctypes.data + 128


def test_the_stream_never_writes_the_data():
    """The loader's reads of the tensor return its length and leave the bytes alone, in
    one piece or several."""
    stream = _UnzeroedStream(10_000)
    size = stream.seek(0, 2)
    stream.seek(size - 10_000)
    piece = bytearray(b"\xab" * 3000)
    while stream.tell() < size:
        got = stream.readinto(memoryview(piece))
        assert got == min(3000, size - stream.tell() + got)
    assert piece == bytearray(b"\xab" * 3000)
    assert stream.readinto(memoryview(piece)) == 0  # past the end


def test_nbytes_must_be_positive():
    with pytest.raises(ValueError):
        new_unzeroed(0)
