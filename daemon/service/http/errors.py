"""HTTP errors: the status and error body each API expects, and the mapping from the
daemon's typed errors."""

from __future__ import annotations

from agentkv.client import errors as client_errors

# status -> (OpenAI error type, Anthropic error type)
TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    404: ("not_found_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("service_unavailable", "overloaded_error"),
}

# the daemon's error -> (HTTP status, OpenAI code)
_BY_ERROR: tuple[tuple[type, int, str], ...] = (
    (client_errors.AuthMismatch, 503, "daemon_auth_mismatch"),
    (client_errors.StaleSession, 503, "daemon_restarted"),
    (client_errors.InvalidRequest, 400, "invalid_request"),
    (client_errors.UnknownAgent, 404, "unknown_agent"),
    (client_errors.UnknownRequest, 404, "unknown_request"),
    (client_errors.MessageTooLarge, 413, "request_too_large"),
    (client_errors.PoolExhausted, 400, "context_length_exceeded"),
    (client_errors.Overloaded, 429, "overloaded"),
    (client_errors.DaemonUnavailable, 503, "daemon_unavailable"),
    (client_errors.EngineClosed, 503, "engine_closed"),
    (client_errors.TurnCancelled, 503, "turn_cancelled"),
)


class ApiError(Exception):
    """A request that fails with an HTTP status and an error body.

    Args:
        status: the HTTP status (a key of TYPES).
        message: what went wrong, for the caller.
        param: the request field at fault, if one is.
        code: a machine-readable code (OpenAI's `error.code`).
    """

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def openai(self) -> dict:
        """OpenAI's error body."""
        kind = TYPES.get(self.status, TYPES[500])[0]
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def anthropic(self) -> dict:
        """Anthropic's error body."""
        kind = TYPES.get(self.status, TYPES[500])[1]
        return {"type": "error", "error": {"type": kind, "message": self.message}}


def from_client_error(exc: client_errors.AgentKVClientError) -> ApiError:
    """The HTTP error for an error of the daemon (or of the connection to it)."""
    for cls, status, code in _BY_ERROR:
        if isinstance(exc, cls):
            return ApiError(status, str(exc), code=code)
    if isinstance(exc, client_errors.GenerationFailed):
        return ApiError(500, f"generation failed: {exc}", code="generation_failed")
    return ApiError(500, f"{exc.code}: {exc}", code=exc.code)
