"""Exclusive advisory locks (flock): held while the returned file stays open, released
when it is closed or the process exits, however it exits."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

from .errors import StoreLockedError, StoreWriteError


def try_lock(path: Path) -> IO[str] | None:
    """Open (creating if needed) `path` and take an exclusive flock on it without waiting.

    Returns:
        The open file, which holds the lock until it is closed; None if another process
        holds the lock.

    Raises:
        OSError: the file cannot be opened (e.g. permissions).
    """
    f = open(path, "a+")  # noqa: SIM115 - the caller holds it open as the lock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def lock_store(root: Path) -> IO[str]:
    """Hold an exclusive lock on a store for this process's lifetime (one writer only):
    until the returned file is closed.

    Raises:
        StoreLockedError: another process holds it.
        StoreWriteError: the lock file cannot be opened for writing (e.g. permissions).
    """
    try:
        f = try_lock(root / "lock")
    except OSError as exc:
        raise StoreWriteError(f"cannot open store {root} for writing: {exc}") from exc
    if f is None:
        raise StoreLockedError(f"store {root} is in use by another process")
    return f
