"""What `Client` and `AsyncClient` are both given: the daemon's socket, how long to wait for
a reply, and the auth key."""

from __future__ import annotations

from pathlib import Path

from . import session
from .paths import default_socket


class ClientBase:
    """The arguments both clients take; each opens its own connection in `_open`.

    Args:
        endpoint: the daemon's socket (its `--socket`); default: the shared default socket.
        timeout: seconds to wait for any reply before raising DaemonUnavailable.
        auth_key: the daemon's `--auth-key`: the key bytes, or a path to the key file.

    Attributes:
        info: the daemon's `hello` facts once connected (model, versions, limits).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = 30.0,
        auth_key: bytes | str | Path | None = None,
    ) -> None:
        self.endpoint = endpoint or default_socket()
        self.timeout = session.seconds(timeout, "timeout")
        self.info: dict = {}
        self._open(auth_key)

    def _open(self, auth_key: bytes | str | Path | None) -> None:
        """Set up the connection (and, for the blocking client, handshake)."""
        raise NotImplementedError
