"""Typed errors raised by the engine, the pool and the model loader.

Each error carries a stable ``code`` string; the wire protocol maps these codes to the
client's exceptions, so a code, once published, never changes meaning.
"""

from __future__ import annotations


class AgentKVError(Exception):
    """Base class of every error agentkv raises on purpose."""

    code = "internal"


class InvalidRequestError(AgentKVError, ValueError):
    """The request itself is wrong: empty prompt, bad max_tokens, bad sampling, bad agent id."""

    code = "invalid_request"


class PoolExhaustedError(AgentKVError):
    """The block pool cannot hold what a request needs.

    Attributes:
        need: blocks the request needs.
        free: blocks the pool could give it (free plus reclaimable).
    """

    code = "pool_exhausted"

    def __init__(self, need: int, free: int, detail: str = "") -> None:
        self.need = need
        self.free = free
        msg = f"block pool exhausted: need {need} block(s), {free} free"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class ModelNotFoundError(AgentKVError):
    """The model path or id does not name a loadable model."""

    code = "model_not_found"


class UnsupportedModelError(AgentKVError):
    """The model uses a cache type agentkv cannot split into blocks."""

    code = "unsupported_model"


class CacheReconstructionError(AgentKVError):
    """An agent's cache could not be rebuilt from its blocks."""

    code = "cache_reconstruction"


class UnknownAgentError(AgentKVError, KeyError):
    """No agent with that id exists."""

    code = "unknown_agent"

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown agent"


class AgentExistsError(AgentKVError):
    """An agent with that id exists already."""

    code = "agent_exists"


class EngineClosedError(AgentKVError):
    """The engine was closed; it accepts no more work."""

    code = "engine_closed"


class DistributedError(AgentKVError):
    """The ranks of a distributed daemon cannot work together: a rank was lost, a
    collective timed out, or a rank's replay of rank 0's calls disagreed with it."""


class WorldSizeError(DistributedError, ValueError):
    """The model cannot be split over this many ranks (its attention or KV heads do not
    divide by the world size), or the store was written at another world size."""
