"""Typed storage errors. Pure Python (no MLX), shared by the store and the engine."""

from __future__ import annotations

from pathlib import Path


class StorageError(Exception):
    """Base class of the store's errors."""

    code = "storage"


class CorruptFileError(StorageError):
    """A cache file is missing, truncated, malformed or fails its checksum."""

    code = "corrupt_file"

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class StoreWriteError(StorageError):
    """A write to the store failed (disk full, read-only, ...); memory state is intact."""

    code = "store_write"


class StoreClosedError(StorageError):
    """The store was closed."""

    code = "store_closed"


class StoreLockedError(StorageError):
    """Another process (a running daemon) has the store open."""

    code = "store_locked"
