"""agentkv storage: agents' KV blocks as safetensors files indexed in SQLite.

from agentkv.storage import CacheStore
store = CacheStore("/path/to/store")
"""

from .errors import (
    CorruptFileError,
    StorageError,
    StoreClosedError,
    StoreLockedError,
    StoreWriteError,
    UnknownStoredAgentError,
)
from .records import GcReport, StoredAgent, TurnRecord, VerifyReport
from .store import CacheStore

__all__ = [
    "CacheStore",
    "CorruptFileError",
    "GcReport",
    "StorageError",
    "StoreClosedError",
    "StoreLockedError",
    "StoreWriteError",
    "StoredAgent",
    "TurnRecord",
    "UnknownStoredAgentError",
    "VerifyReport",
]
