"""The protocol's error codes (`ERRORS`), the `ProtocolError` that carries one, and the
checks on peer-supplied values that every request shares: `shown` (a bounded repr for
error messages) and `check_agent_id`. Pure Python; `protocol` re-exports all of it.
"""

from __future__ import annotations

import re
import reprlib

# Token ids one message carries at most (a submit's `tokens`, an inspect page): msgpack
# takes <= 5 bytes per id, so a full page stays well under MAX_MESSAGE_BYTES.
MAX_TOKENS_PER_MESSAGE = 1 << 20
AGENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")  # whole string: fullmatch
_SHORT_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 48
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = 4

# code -> what it means; the client maps each code to an exception class.
ERRORS = {
    "invalid_request": "the request is wrong: bad field, empty prompt, bad max_tokens, ...",
    "malformed": "the message could not be decoded",
    "too_large": "the message exceeds MAX_MESSAGE_BYTES",
    "unknown_type": "no such message type",
    "protocol_mismatch": "client and daemon speak different major protocol versions",
    "unauthorized": "missing or wrong signature, or a replayed message",
    "unknown_agent": "no agent with that id",
    "unknown_request": "no request with that id (finished, cancelled or never submitted)",
    "agent_exists": "an agent with that id exists already",
    "pool_exhausted": "the block pool cannot hold what the request needs",
    "cache_reconstruction": "an agent's cache could not be rebuilt",
    "model_not_found": "the model could not be loaded",
    "engine_closed": "the daemon is shutting down",
    "store_write": "a change could not be written to the store (disk full, read-only): not made",
    "overloaded": "the daemon holds as much as it will for this client (or in total): retry",
    "stale_session": "the request names another daemon run's session: say hello again",
    "internal": "an unexpected error in the daemon",
}


class ProtocolError(Exception):
    """A message that breaks the protocol; `code` is one of ERRORS."""

    def __init__(self, code: str, message: str) -> None:
        assert code in ERRORS, code
        self.code = code
        super().__init__(message)


def shown(value: object, limit: int = 64) -> str:
    """A peer-supplied value for an error message: a repr whose cost and size are bounded
    (reprlib cuts long strings and containers: a 2 MB field must not cost a 2 MB repr and a
    2 MB error reply)."""
    if isinstance(value, int) and value.bit_length() > 64:  # repr is quadratic in digits
        return f"<int of {value.bit_length()} bits>"
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def check_agent_id(agent_id) -> str:
    """Validate an agent id at the boundary: 1-128 chars of A-Z a-z 0-9 . _ : @ + -,
    starting with a letter or digit."""
    if not isinstance(agent_id, str) or not AGENT_ID_RE.fullmatch(agent_id):
        raise ProtocolError(
            "invalid_request",
            f"invalid agent id {shown(agent_id)}: 1-128 characters from A-Z a-z 0-9 . _ : @ + -, "
            "starting with a letter or digit",
        )
    return agent_id
