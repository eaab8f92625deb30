"""A new MLX buffer that is not zeroed first, for the host to fill: MLX's `np.empty`.

MLX has no uninitialized allocation: `mx.zeros` writes every byte, which costs as much as
the restore's own copy (and page-faults fresh memory twice). `mx.load` of a file-like
object is the public path that allocates an array and hands its memory to the object's
`readinto`. `new_unzeroed` serves MLX a one-tensor safetensors stream whose `readinto`
leaves the data as it is: the array comes back evaluated, its bytes undefined, and the
caller writes them through a numpy view before any MLX operation reads them. Nothing runs
on MLX's thread but that call (and a huge-page advice on Linux).
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys

import mlx.core as mx
import numpy as np

_NAME = "data"
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux


def new_unzeroed(nbytes: int) -> mx.array:
    """An evaluated uint8 MLX array of `nbytes` whose contents are undefined.

    Write every byte that will be read (through `host_view`) before using it in MLX.
    """
    if nbytes <= 0:
        raise ValueError("nbytes must be positive")
    stream = _UnzeroedStream(nbytes)
    array = mx.load(stream, format="safetensors")[_NAME]
    if array.shape != (nbytes,) or array.dtype != mx.uint8:
        raise RuntimeError(f"mx.load returned {array.dtype}{array.shape}")
    return array


def host_view(array: mx.array) -> np.ndarray:
    """A writable numpy view of an evaluated MLX array's memory."""
    view = np.array(array, copy=False)
    if not view.flags.writeable:
        raise ValueError("MLX buffer is not writable from the host")
    return view


class _UnzeroedStream:
    """Just enough of a binary file for MLX's safetensors loader (`readinto`, `seek`,
    `tell`, `closed`): a header naming one uint8 tensor, whose data it never writes."""

    closed = False

    def __init__(self, nbytes: int) -> None:
        entry = {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}
        raw = json.dumps({_NAME: entry}).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as writers do
        self._head = struct.pack("<Q", len(raw)) + raw
        self._size = len(self._head) + nbytes
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, view) -> int:
        start, n = self._pos, len(view)
        head = len(self._head)
        if start < head:  # the length prefix and the JSON header
            k = min(n, head - start)
            view[:k] = self._head[start : start + k]
            self._pos += k
            return k
        n = max(0, min(n, self._size - start))
        if n and start == head:
            _advise_huge_pages(view, n)  # before anything touches the new pages
        self._pos += n
        return n  # the tensor's bytes: left for the caller to write


def _advise_huge_pages(view, nbytes: int) -> None:
    """Ask Linux for transparent huge pages on the buffer's whole 2 MiB pages: fresh memory
    then faults in 512x fewer, larger pieces when it is written. Advice only: ignored where
    unsupported, or when THP is off."""
    libc = _libc()
    if libc is None or nbytes < 2 * HUGE_PAGE:
        return
    addr = np.frombuffer(view, np.uint8, 1).ctypes.data
    start = addr + (-addr % HUGE_PAGE)
    stop = (addr + nbytes) // HUGE_PAGE * HUGE_PAGE
    if stop > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_HUGEPAGE)


def _libc():
    global _LIBC
    if _LIBC is False:
        _LIBC = None
        if sys.platform == "linux":
            try:
                _LIBC = ctypes.CDLL(None, use_errno=True)
                _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            except (OSError, AttributeError):
                _LIBC = None
    return _LIBC


_LIBC = False
