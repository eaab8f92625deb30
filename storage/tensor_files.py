"""Safetensors files written crash-safely and read back with their checksum verified.

The format is plain safetensors (8-byte header length, JSON header, raw tensor bytes), so
any safetensors reader opens these files. It is written here rather than through a
framework so that bfloat16 keeps its real dtype tag without importing MLX in the writer
thread, and so that header and tensors go out in one `writev`.

A write is: temp file in the target directory, write, fsync, rename over the target, fsync
the directory. A crash at any point leaves the old file or the new one, never a torn one
(at worst an orphan temp file, which `gc` removes).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from .errors import CorruptFileError

# safetensors dtype tag -> numpy dtype used for the raw bytes (bfloat16 travels as uint16)
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# MLX dtype names -> safetensors tags
TAGS = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}
MAX_HEADER = 16 * 2**20
HEADER_GUESS = 8192  # bytes read first: a block file's header fits (a few KB)
IOV_MAX = 1024  # buffers per preadv call (the Linux limit)


@dataclass(slots=True, frozen=True)
class HostTensor:
    """A tensor as host bytes: `data` holds the raw elements (bfloat16 as uint16)."""

    dtype: str  # MLX dtype name, e.g. "bfloat16"
    data: np.ndarray


@dataclass(slots=True, frozen=True)
class WrittenFile:
    """What a write produced."""

    path: Path
    nbytes: int
    checksum: str


@dataclass(slots=True, frozen=True)
class FileDest:
    """Where one file's tensors go, worked out by the caller (see `file_dest`).

    A caller reading many files of one layout (a restore's block files) builds `entries`
    once and only slices new runs per file.

    Attributes:
        entries: the header's tensor entries exactly as the file must hold them, metadata
            aside: name -> {"dtype": tag, "shape": [...], "data_offsets": [start, end]}.
        runs: writable, contiguous byte views that together take all of the file's data,
            in file order.
    """

    entries: dict
    runs: list[memoryview]


class FileOps:
    """The few file-system calls the store makes; tests subclass it to inject faults."""

    def open_new(self, path: Path) -> int:
        """Create a new file for writing (fails if it exists)."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def writev(self, fd: int, buffers: list) -> int:
        """Write buffers in order; returns bytes written."""
        return os.writev(fd, buffers)

    def fsync(self, fd: int) -> None:
        """Flush a file to stable storage."""
        os.fsync(fd)

    def replace(self, src: Path, dst: Path) -> None:
        """Atomically rename src over dst."""
        os.replace(src, dst)

    def fsync_dir(self, path: Path) -> None:
        """Make a directory entry change durable."""
        fsync_path(path)

    def is_read_only(self, path: Path) -> bool:
        """True if `path` is on a file system mounted read-only."""
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def checksum_of(buffers) -> str:
    """xxh3-64 over buffers in order (fast enough to check every restore: ~10 GB/s)."""
    h = xxhash.xxh3_64()
    for b in buffers:
        h.update(b)
    return "xxh3_64:" + h.hexdigest()


CHECKSUM_PLACEHOLDER = "xxh3_64:" + "0" * 16


def write_tensor_file(
    path: Path,
    tensors: Mapping[str, HostTensor],
    metadata: Mapping[str, str],
    ops: FileOps | None = None,
) -> WrittenFile:
    """Write tensors to `path` atomically; the checksum of their bytes goes in the metadata.

    Raises:
        OSError: e.g. ENOSPC or EROFS; the target is untouched and the temp file removed.
    """
    ops = ops or FileOps()
    buffers = [_contiguous_bytes(t.data) for t in tensors.values()]
    # The checksum covers the header too (with a same-width placeholder for itself), so an
    # edited dtype tag, shape or metadata value is caught like a flipped tensor byte.
    sizes = [len(b) for b in buffers]
    blank = _header(tensors, {**metadata, "checksum": CHECKSUM_PLACEHOLDER}, sizes)
    checksum = checksum_of([blank, *buffers])
    header = blank.replace(CHECKSUM_PLACEHOLDER.encode(), checksum.encode(), 1)
    # Unique per write: a temp file left by a crash must not block a later writer that got
    # the same pid (a daemon restarted as pid 1 in a container).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = ops.open_new(tmp)
    try:
        try:
            _write_all(ops, fd, [header, *buffers])
            ops.fsync(fd)
        finally:
            os.close(fd)
        ops.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    ops.fsync_dir(path.parent)
    return WrittenFile(path, len(header) + sum(len(b) for b in buffers), checksum)


def read_tensor_file(
    path: Path, *, verify: bool = True, size: int | None = None
) -> tuple[dict[str, str], dict[str, HostTensor]]:
    """Read a file written by `write_tensor_file`: its metadata and tensors (host arrays).

    Nothing past the header is read unless the file's size is the one its header
    describes (and `size`, when given: what the index recorded), so a huge or sparse file
    planted in the store is refused, never loaded.

    Raises:
        CorruptFileError: missing, unreadable, truncated, malformed, of another size, or
            checksum mismatch.
    """
    fd, total = _open_regular(path, follow=True)
    try:
        if size is not None and total != size:
            raise CorruptFileError(path, f"{total} bytes, the index recorded {size}")
        head = _pread_header(path, fd, total)
        header = _parse_header(path, head[8:])
        held, described = total - len(head), _data_bytes(path, header)
        if held != described:
            raise CorruptFileError(path, f"holds {held} data bytes, header says {described}")
        data = _pread_exact(path, fd, held, len(head))
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    finally:
        os.close(fd)
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict):
        raise CorruptFileError(path, "metadata is not a map")
    if verify:
        want = meta.get("checksum")
        if not isinstance(want, str) or len(want) != len(CHECKSUM_PLACEHOLDER):
            raise CorruptFileError(path, "no checksum")
        got = checksum_of([head.replace(want.encode(), CHECKSUM_PLACEHOLDER.encode(), 1), data])
        if got != want:
            raise CorruptFileError(path, f"checksum mismatch ({got} != {want})")
    tensors = {name: _tensor(path, name, info, data) for name, info in header.items()}
    return dict(meta), tensors


def read_tensor_meta(path: Path) -> dict[str, str]:
    """A file's metadata from its header alone (nothing verified: a name to report, not
    data to trust).

    Raises:
        CorruptFileError: missing, not a regular file, or its header is malformed.
    """
    fd, total = _open_regular(path, follow=False)
    try:
        header = _parse_header(path, _pread_header(path, fd, total)[8:])
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    finally:
        os.close(fd)
    meta = header.get("__metadata__") or {}
    return dict(meta) if isinstance(meta, dict) else {}


def _data_bytes(path: Path, header: dict) -> int:
    """How many data bytes the header's tensors span (the largest end offset)."""
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError, OverflowError) as exc:
            raise CorruptFileError(path, f"bad tensor {name!r}: {exc}") from exc
    return end


def _pread_exact(path: Path, fd: int, n: int, offset: int) -> memoryview:
    """n bytes of the file from `offset`."""
    view = memoryview(bytearray(n))
    _preadv_all(path, fd, [view], offset)
    return view


def read_tensor_file_into(path: Path, dests: Mapping[str, HostTensor] | FileDest) -> dict[str, str]:
    """Read a file's tensors straight into caller-owned arrays; returns its metadata.

    `dests` names every tensor the file must hold, in the file's order, each with the
    dtype and shape it must have; `data` may be a strided view (e.g. rows of a larger
    buffer). Or it is a FileDest saying the same. The bytes go from the file into those
    views with scatter reads (one copy) and the checksum is computed over them afterwards,
    so nothing is staged. On error the views hold garbage.

    Raises:
        CorruptFileError: missing, a symlink, unreadable, truncated, malformed, not the
            expected tensors, or checksum mismatch.
    """
    dest = dests if isinstance(dests, FileDest) else file_dest(dests)
    # A store's file is never a link: one that is (planted) is refused, not followed.
    fd, size = _open_regular(path, follow=False)
    try:
        head = _pread_header(path, fd, size)
        header = _parse_header(path, head[8:])
        meta = header.pop("__metadata__", {}) or {}
        if header != dest.entries:
            raise CorruptFileError(path, "tensors are not the expected ones")
        expected = sum(map(len, dest.runs))
        if size - len(head) != expected:
            held = size - len(head)
            raise CorruptFileError(path, f"holds {held} data bytes, header says {expected}")
        _preadv_all(path, fd, dest.runs, len(head))
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    finally:
        os.close(fd)
    want = meta.get("checksum") if isinstance(meta, dict) else None
    if not isinstance(want, str) or len(want) != len(CHECKSUM_PLACEHOLDER):
        raise CorruptFileError(path, "no checksum")
    blank = head.replace(want.encode(), CHECKSUM_PLACEHOLDER.encode(), 1)
    got = checksum_of([blank, *dest.runs])
    if got != want:
        raise CorruptFileError(path, f"checksum mismatch ({got} != {want})")
    return dict(meta)


def _open_regular(path: Path, *, follow: bool) -> tuple[int, int]:
    """A read-only descriptor of `path` and its size; `path` must be a regular file (a
    symlink to one only if `follow`). Opened non-blocking: a named pipe planted where a
    file should be would otherwise wait for a writer forever; it is refused like a
    directory or a device.

    Raises:
        CorruptFileError: missing, a refused link, not a regular file, or unopenable.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    try:
        info = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise _unreadable(path, exc) from exc
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CorruptFileError(path, "not a regular file")
    return fd, info.st_size


def _unreadable(path: Path, exc: OSError) -> CorruptFileError:
    """An OS error reading a store file, as the error the store handles (that part of the
    cache is recomputed, the file moved aside): gone, a link or a directory where the file
    should be, a disk read error, no permission."""
    if isinstance(exc, FileNotFoundError):
        return CorruptFileError(path, "missing")
    if exc.errno == errno.ELOOP:
        return CorruptFileError(path, "is a symlink")
    return CorruptFileError(path, f"unreadable ({exc.strerror or exc})")


def tensor_entries(tensors: Iterable[tuple[str, str, Sequence[int], int]]) -> dict:
    """A header's tensor entries, as `write_tensor_file` writes them, for tensors stored
    back to back in this order: (name, MLX dtype name, shape, bytes) each."""
    entries: dict = {}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        entries[name] = {
            "dtype": TAGS[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    return entries


def file_dest(dests: Mapping[str, HostTensor]) -> FileDest:
    """The FileDest of named arrays that are to hold a file's tensors, in its order."""
    entries = tensor_entries((n, t.dtype, t.data.shape, t.data.nbytes) for n, t in dests.items())
    return FileDest(entries, [run for t in dests.values() for run in _writable_chunks(t.data)])


def _pread_header(path: Path, fd: int, size: int) -> bytes:
    """The 8-byte length and the JSON header."""
    if size < 8:
        raise CorruptFileError(path, f"truncated ({size} bytes)")
    head = os.pread(fd, min(size, HEADER_GUESS), 0)  # usually the whole header at once
    if len(head) < 8:
        raise CorruptFileError(path, "truncated header")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER or 8 + n > size:
        raise CorruptFileError(path, "truncated or bad header length")
    if len(head) < 8 + n:
        head += os.pread(fd, 8 + n - len(head), len(head))
    if len(head) < 8 + n:
        raise CorruptFileError(path, "truncated header")
    return head[: 8 + n]


def _parse_header(path: Path, text: bytes) -> dict:
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the stack
        raise CorruptFileError(path, "header is not JSON (or nested too deep)") from exc
    if not isinstance(header, dict):
        raise CorruptFileError(path, "header is not an object")
    return header


def _writable_chunks(a: np.ndarray) -> list[memoryview]:
    """`a`'s memory as contiguous byte views in C order (one per run of contiguous rows)."""
    if a.size == 0:
        return []
    # The longest trailing run of dimensions that is contiguous within `a`.
    k, step = a.ndim, a.itemsize
    while k > 0 and (a.shape[k - 1] == 1 or a.strides[k - 1] == step):
        step *= a.shape[k - 1]
        k -= 1
    return [memoryview(run).cast("B") for run in _subarrays(a, k)]


def _subarrays(a: np.ndarray, k: int):
    """The subarrays of `a` over its first k dimensions, in C order (views, never copies:
    iterating an array yields views)."""
    if k == 0:
        yield a
        return
    for sub in a:
        yield from _subarrays(sub, k - 1)


def _preadv_all(path: Path, fd: int, chunks: list[memoryview], offset: int) -> None:
    """Fill every chunk from the file, in order, starting at `offset`."""
    pending = [c for c in chunks if len(c)]
    while pending:
        batch = pending[:IOV_MAX]
        n = os.preadv(fd, batch, offset)
        if n <= 0:
            raise CorruptFileError(path, "truncated (short read)")
        offset += n
        if len(batch) == len(pending) and n == sum(map(len, batch)):
            return  # the usual case: one call filled them all
        while n and pending:  # drop what was filled; a short read leaves a partial chunk
            if n >= len(pending[0]):
                n -= len(pending.pop(0))
            else:
                pending[0], n = pending[0][n:], 0


def _contiguous_bytes(a: np.ndarray) -> memoryview:
    # A flat uint8 view, not memoryview.cast: cast refuses shapes with a zero (empty tensors).
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _header(tensors: Mapping[str, HostTensor], metadata: Mapping[str, str], sizes) -> bytes:
    entries: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    entries |= tensor_entries(
        (name, t.dtype, t.data.shape, size)
        for (name, t), size in zip(tensors.items(), sizes, strict=True)
    )
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep tensor data 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def _write_all(ops: FileOps, fd: int, buffers: list) -> None:
    total = sum(len(b) for b in buffers)
    done = ops.writev(fd, buffers)
    if done == total:
        return
    # A short write (huge files): finish the rest buffer by buffer.
    flat = b"".join(bytes(b) for b in buffers)[done:]
    while flat:
        n = ops.writev(fd, [flat])
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        flat = flat[n:]


def _tensor(path: Path, name: str, info, data: memoryview) -> HostTensor:
    try:
        tag, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        dtype = np.dtype(DTYPES[tag])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not 0 <= start <= end <= len(data) or end - start != count * dtype.itemsize:
            raise ValueError("offsets do not match shape")
        array = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise CorruptFileError(path, f"bad tensor {name!r}: {exc}") from exc
    mlx_name = next(k for k, v in TAGS.items() if v == tag)
    return HostTensor(mlx_name, array)


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to stable storage (both open read-only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
