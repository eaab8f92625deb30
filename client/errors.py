"""Client exceptions, one per error code of the protocol's table."""

from __future__ import annotations


class AgentKVClientError(Exception):
    """Base class; `code` is the protocol error code."""

    code = "internal"


class DaemonUnavailable(AgentKVClientError):
    """The daemon did not answer in time (not running, wedged, or unreachable)."""

    code = "unavailable"


class ProtocolMismatch(AgentKVClientError):
    """Client and daemon speak different major protocol versions."""

    code = "protocol_mismatch"


class InvalidRequest(AgentKVClientError, ValueError):
    """The request is wrong (empty prompt, bad max_tokens, invalid agent id, ...)."""

    code = "invalid_request"


class MalformedMessage(AgentKVClientError):
    """The daemon could not decode a message."""

    code = "malformed"


class MessageTooLarge(AgentKVClientError):
    """The request exceeds the protocol's maximum message size."""

    code = "too_large"


class Unauthorized(AgentKVClientError):
    """Missing or wrong HMAC key, or a replayed message."""

    code = "unauthorized"


class AuthMismatch(Unauthorized):
    """Client and daemon disagree about authentication: one has an auth key and the other
    none, or the keys differ."""

    code = "auth_mismatch"


class Overloaded(AgentKVClientError):
    """The daemon holds as much as it will for this client (or for all clients): the
    request was refused before any work was done; retry later."""

    code = "overloaded"


class StaleSession(Unauthorized):
    """A signed request named another daemon run's session (the daemon restarted); the
    client says hello again and retries once."""

    code = "stale_session"


class UnknownAgent(AgentKVClientError, KeyError):
    """No agent with that id."""

    code = "unknown_agent"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.code


class UnknownRequest(AgentKVClientError, KeyError):
    """No request with that id."""

    code = "unknown_request"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.code


class AgentExists(AgentKVClientError):
    """An agent with that id exists already (fork target)."""

    code = "agent_exists"


class PoolExhausted(AgentKVClientError):
    """The daemon's block pool cannot hold what the request needs."""

    code = "pool_exhausted"


class CacheReconstruction(AgentKVClientError):
    """An agent's cache could not be rebuilt."""

    code = "cache_reconstruction"


class ModelNotFound(AgentKVClientError):
    """The daemon could not load its model."""

    code = "model_not_found"


class EngineClosed(AgentKVClientError):
    """The daemon is shutting down."""

    code = "engine_closed"


class StoreWriteFailed(AgentKVClientError):
    """A change (a delete) could not be made durable in the daemon's store: it was not
    made, and the agent is still stored."""

    code = "store_write"


class GenerationFailed(AgentKVClientError):
    """A turn finished with finish_reason "error"."""

    code = "generation_failed"


class TurnCancelled(AgentKVClientError):
    """`Client.stream`: the turn was cancelled (`Client.cancel`, `daemonctl stop --cancel`,
    a delete of its agent) before it finished; the agent's context is as before it.

    Attributes:
        uid: the request id.
        agent_id: its agent.
        text: the text generated (and yielded) before the cancel.
        token_ids: its token ids.
        usage: the turn's usage as the daemon reported it.
    """

    code = "cancelled"

    def __init__(
        self, message: str, *, uid: int, agent_id: str, text: str, token_ids, usage
    ) -> None:
        super().__init__(message)
        self.uid = uid
        self.agent_id = agent_id
        self.text = text
        self.token_ids = list(token_ids)
        self.usage = usage or {}


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        MalformedMessage,
        MessageTooLarge,
        ProtocolMismatch,
        Unauthorized,
        UnknownAgent,
        UnknownRequest,
        AgentExists,
        PoolExhausted,
        CacheReconstruction,
        ModelNotFound,
        EngineClosed,
        StoreWriteFailed,
        Overloaded,
        StaleSession,
    )
}


def error_for(code: str, message: str) -> AgentKVClientError:
    """The exception for an error reply."""
    cls = _BY_CODE.get(code, AgentKVClientError)
    exc = cls(message)
    if cls is AgentKVClientError:
        exc.code = code
    return exc
