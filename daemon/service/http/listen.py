"""The HTTP front's address: HOST:PORT, loopback only unless an API key guards it."""

from __future__ import annotations

from urllib.parse import urlsplit

from ..process import is_local_endpoint


class ListenError(ValueError):
    """A --http address that is malformed, or not loopback without an API key."""


def parse_listen(text: str, keyed: bool) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` (`[::1]:PORT` for IPv6)."""
    try:
        url = urlsplit(f"http://{text}")
        host, port = url.hostname, url.port
    except ValueError as exc:
        raise ListenError(f"bad --http address {text!r}: {exc}") from None
    if not host or not port or url.path or url.query:
        raise ListenError(f"bad --http address {text!r}: use HOST:PORT, e.g. 127.0.0.1:8000")
    if not keyed and not is_local_endpoint(f"tcp://{text}"):
        raise ListenError(f"--http {text} is not a loopback address: it needs --api-key FILE")
    return host, port
