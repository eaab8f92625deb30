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


class IndexMissingError(StorageError):
    """The store's index is gone (missing, empty, or not a database) while its blocks/ or
    agents/ directories hold files: opening it as a new store would orphan them all."""

    code = "index_missing"

    def __init__(self, root: Path | str, what: str) -> None:
        self.root = Path(root)
        super().__init__(
            f"store {root}: {what}, but the store holds cache files; refusing to start an "
            f"empty index over them. Rebuild it from the files: "
            f"daemonctl rebuild-index --store {_store_arg(self.root)}"
        )


class IndexDamagedError(StorageError):
    """The index is a database, but SQLite finds it damaged (a garbled page or header)."""

    code = "index_damaged"

    def __init__(self, root: Path | str, what: str) -> None:
        self.root = Path(root)
        self.what = what
        super().__init__(
            f"index of store {root} is damaged ({what}); see `daemonctl verify`, and "
            f"rebuild it from the files: daemonctl rebuild-index --store {_store_arg(self.root)}"
        )


def _store_arg(root: Path) -> str:
    """What daemonctl's --store names for a store's cache directory (its parent)."""
    return str(root.parent if root.name == "cache" else root)


class UnknownStoredAgentError(StorageError, KeyError):
    """No such agent in the store (neither indexed nor queued) for that model."""

    code = "unknown_agent"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
