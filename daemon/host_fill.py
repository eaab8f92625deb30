"""A new MLX buffer whose bytes the host writes once, without zeroing it first.

MLX has no uninitialized allocation: `mx.zeros` writes every byte, which costs as much as
the restore's own copy (and page-faults fresh memory twice). `mx.load` of a file-like
object is the public path that allocates an array and hands its memory to the object's
`readinto`, so `new_filled_buffer` serves MLX a one-tensor safetensors stream whose data
`fill` writes straight into the new array. Should a loader ask for the data in pieces,
the stream stages it in host memory once and copies each piece: slower, still exact.
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
from collections.abc import Callable

import mlx.core as mx
import numpy as np

_NAME = "data"


def new_filled_buffer(nbytes: int, fill: Callable[[np.ndarray], None]) -> mx.array:
    """An evaluated uint8 MLX array of `nbytes`, its contents written by `fill(view)`.

    `fill` gets a writable numpy uint8 view of the array's memory and must write all of
    it; an exception it raises is raised here once the load has returned.
    """
    if nbytes <= 0:
        raise ValueError("nbytes must be positive")
    stream = _FillStream(nbytes, fill)
    array = mx.load(stream, format="safetensors")[_NAME]
    if stream.error is not None:
        raise stream.error
    if not stream.filled:
        raise RuntimeError("mx.load returned before the buffer was filled")
    return array


class _FillStream:
    """Just enough of a binary file for MLX's safetensors loader (`readinto`, `seek`,
    `tell`, `closed`): a header naming one uint8 tensor, then `fill`'s bytes."""

    closed = False

    def __init__(self, nbytes: int, fill: Callable[[np.ndarray], None]) -> None:
        entry = {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}
        raw = json.dumps({_NAME: entry}).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as writers do
        self._head = struct.pack("<Q", len(raw)) + raw
        self._size = len(self._head) + nbytes
        self._fill = fill
        self._staged: np.ndarray | None = None
        self._pos = 0
        self.error: BaseException | None = None
        self.filled = False

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, view) -> int:
        out = np.frombuffer(view, dtype=np.uint8)
        start, n = self._pos, len(out)
        head = len(self._head)
        if start < head:  # the length prefix and the JSON header
            k = min(n, head - start)
            out[:k] = np.frombuffer(self._head, np.uint8, k, start)
            self._pos += k
            return k
        offset = start - head
        n = max(0, min(n, self._size - start))
        if n == 0:
            return 0
        if offset == 0 and n == self._size - head:
            _advise_huge_pages(out[:n])
            self._run_fill(out[:n])  # the whole tensor at once: straight into MLX memory
        else:
            out[:n] = self._staged_bytes()[offset : offset + n]
        self._pos += n
        return n

    def _staged_bytes(self) -> np.ndarray:
        if self._staged is None:
            self._staged = np.empty(self._size - len(self._head), np.uint8)
            self._run_fill(self._staged)
        return self._staged

    def _run_fill(self, out: np.ndarray) -> None:
        try:
            self._fill(out)
            self.filled = True
        except BaseException as exc:  # raised by new_filled_buffer, not through MLX
            self.error = exc


HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux


def _advise_huge_pages(out: np.ndarray) -> None:
    """Ask Linux for transparent huge pages on the buffer's whole 2 MiB pages: fresh memory
    then faults in 512x fewer, larger pieces while it is filled. Advice only: ignored
    where unsupported, or when THP is off."""
    if sys.platform != "linux" or out.nbytes < 2 * HUGE_PAGE or _libc() is None:
        return
    addr = out.ctypes.data
    start = addr + (-addr % HUGE_PAGE)
    stop = (addr + out.nbytes) // HUGE_PAGE * HUGE_PAGE
    if stop > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_HUGEPAGE)


def _libc():
    global _LIBC
    if _LIBC is False:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _LIBC = None
    return _LIBC


_LIBC = False
