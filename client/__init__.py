"""agentkv client: the wire protocol and the Python client (pure Python, never imports mlx).

from agentkv.client import Client
"""

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
