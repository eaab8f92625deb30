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


class UnknownStoredAgentError(StorageError, KeyError):
    """No such agent in the store (neither indexed nor queued) for that model."""

    code = "unknown_agent"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
