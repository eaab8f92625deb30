"""agentkv storage: agents' KV blocks as safetensors files indexed in SQLite.

from agentkv.storage import CacheStore
store = CacheStore("/path/to/store")
"""

from .errors import (
    CorruptFileError,
    IndexDamagedError,
    IndexMissingError,
    StorageError,
    StoreClosedError,
    StoreLockedError,
    StoreWriteError,
    UnknownStoredAgentError,
)
from .rebuild import rebuild_index
from .records import GcReport, RebuildReport, StoredAgent, TurnRecord, VerifyReport
from .store import CacheStore

__all__ = [
    "CacheStore",
    "CorruptFileError",
    "GcReport",
    "IndexDamagedError",
    "IndexMissingError",
    "RebuildReport",
    "StorageError",
    "StoreClosedError",
    "StoreLockedError",
    "StoreWriteError",
    "StoredAgent",
    "TurnRecord",
    "UnknownStoredAgentError",
    "VerifyReport",
    "rebuild_index",
]
