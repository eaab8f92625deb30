"""agentkv client: the wire protocol and the Python client (pure Python, never imports mlx).

from agentkv.client import Client          # blocking, one per thread
from agentkv.client import AsyncClient     # asyncio, many concurrent turns per object
"""

from .aio import AsyncClient
from .client import Client, Event, Result
from .errors import (
    AgentExists,
    AgentKVClientError,
    AuthMismatch,
    CacheReconstruction,
    DaemonUnavailable,
    EngineClosed,
    GenerationFailed,
    InvalidRequest,
    MalformedMessage,
    MessageTooLarge,
    ModelNotFound,
    Overloaded,
    PoolExhausted,
    ProtocolMismatch,
    StaleSession,
    StoreWriteFailed,
    TurnCancelled,
    Unauthorized,
    UnknownAgent,
    UnknownRequest,
)
from .protocol import PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "AgentExists",
    "AgentKVClientError",
    "AsyncClient",
    "AuthMismatch",
    "CacheReconstruction",
    "Client",
    "DaemonUnavailable",
    "EngineClosed",
    "Event",
    "GenerationFailed",
    "InvalidRequest",
    "MalformedMessage",
    "MessageTooLarge",
    "ModelNotFound",
    "Overloaded",
    "PoolExhausted",
    "ProtocolMismatch",
    "Result",
    "StaleSession",
    "StoreWriteFailed",
    "TurnCancelled",
    "Unauthorized",
    "UnknownAgent",
    "UnknownRequest",
]
