"""The agentkv wire protocol, shared by the daemon and the client. Pure Python, no MLX.

Transport: ZeroMQ. The daemon binds a ROUTER socket, clients connect DEALER sockets.
A message is a list of frames:

    [MAGIC, type, header]                 without authentication
    [MAGIC, type, header, signature]      with --auth-key: HMAC-SHA256 over all other frames

`type` is one ASCII word (see `MessageType`); `header` is a msgpack map holding the
envelope (`ENVELOPE_FIELDS`) and the body (the request's own fields) side by side. Every
request header carries `id` (the client's request id, echoed in the reply); authenticated
headers also carry `nonce` and `ts` so a captured message cannot be replayed, and (every
request but `hello`) the `session` the daemon's `hello` reply gave: a random id per daemon
run, so a message captured before a restart is refused after it (the replay window itself
is kept in memory only). `request_header` builds a header from the two, `Message.body`
takes the body back out. A `submit` body is a `SubmitRequest` (`submit.py`: its fields,
defaults, limits and checks, written once for the client, the daemon and the engine).
Replies have type `reply` (header: `id`, `ok: true`, `result`) or `error` (header: `id`,
`ok: false`, `error: {code, message}`), the codes from `ERRORS` (`checks.py`, with
`ProtocolError` and the checks every request's fields share). Both modules' names are
re-exported here: this module is the one a peer imports.

The protocol version (`PROTOCOL_VERSION`) is separate from the package version; the
`hello` handshake refuses a different major version. A minor version only adds optional
fields, which older peers ignore.

Replies stay under MAX_MESSAGE_BYTES: `agents` is paged (`after`, `limit` in; `next` out),
`inspect` pages its `token_ids` (`token_offset`, `token_limit`), and `step` returns at most
a message's worth of events (the rest come with the next step).

1.1: `agents` and `inspect` paging, usage `prefill_ms`, inspect `disk_blocks` and
`last_used`, stats `clients`.
1.2: `step` takes `interval` (seconds, 0-10): the daemon answers that client's steps at
most once per interval, except that a finished turn is answered at once.
1.3: `hello` returns `session`; with an auth key every other request must carry it
(a daemon with a key refuses the hello of a client older than 1.3, a 1.3 client refuses a
keyed daemon whose hello gives no session). Error codes `overloaded` (the daemon holds
as much as it will for this client, or for all: retry later) and `stale_session` (the
request names an earlier daemon run's session: say hello again). `unauthorized` replies
are signed when the message's signature was good (replayed, stale, wrong session) and
unsigned when it was missing or wrong, so a client can tell a key mismatch from a replay.
1.4: `submit` takes `tools` (with `messages`: handed to the chat template); `hello` and
`stats` give `tool_calling` (None, or the model's tool-call markers and parser); a turn
with tools whose output holds tool calls ends with `tool_calls` and `content` (the text
less the calls).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import operator
import os
import time
from dataclasses import dataclass

import msgpack

# Re-exported: the error codes and shared checks, and the submit schema, are part of the
# protocol's names (`from agentkv.client.protocol import SubmitRequest`).
from .checks import (  # noqa: F401
    AGENT_ID_RE,
    ERRORS,
    MAX_TOKENS_PER_MESSAGE,
    ProtocolError,
    check_agent_id,
    shown,
)
from .submit import (  # noqa: F401
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOOLS,
    SUBMIT_DEFAULTS,
    SUBMIT_FIELDS,
    TURN_INPUTS,
    SubmitRequest,
    TurnOptions,
    check_sampling,
    check_tools,
)

PROTOCOL_VERSION = (1, 4)
SESSION_VERSION = (1, 3)  # the first version whose signed requests carry `session`
MAGIC = b"AKV1"
MAX_MESSAGE_BYTES = 8 * 2**20  # larger requests are refused with `too_large`
# Every request but `submit` fits in this (agent ids are <= 128 characters): a larger one is
# refused by size, before its fields are looked at.
MAX_SMALL_REQUEST_BYTES = 64 * 1024
PEEK_BYTES = 1024  # at most what peek_id decodes: the id's own bytes
PEEK_ITEMS = 256  # header items peek_id steps over before giving up
MAX_AGENTS_PER_PAGE = 128  # rows of one `agents` reply (its `limit` at most)
MIN_KEY_BYTES = 16  # shorter HMAC keys are refused (an empty file would mean no secret)
REPLAY_WINDOW_S = 60.0


class MessageType(str, enum.Enum):
    """Request and reply types."""

    HELLO = "hello"
    SUBMIT = "submit"
    STEP = "step"
    CANCEL = "cancel"
    AGENTS = "agents"
    INSPECT = "inspect"
    DELETE = "delete"
    FORK = "fork"
    STATS = "stats"
    SHUTDOWN = "shutdown"
    REPLY = "reply"
    ERROR = "error"


REQUESTS = frozenset(t for t in MessageType if t not in (MessageType.REPLY, MessageType.ERROR))

# The envelope: fields any request's header may carry that belong to the protocol, not to
# the request: `id` (echoed in the reply), `session` (the daemon run a signed request is
# for), `nonce` and `ts` (added by signing). The rest of the header is the body, the
# request's own fields. On the wire both share one msgpack map (as in 1.0).
ENVELOPE_FIELDS = frozenset({"id", "session", "nonce", "ts"})


@dataclass(slots=True)
class Message:
    """A decoded message: its type and its header as on the wire (envelope and body)."""

    type: MessageType
    header: dict

    @property
    def id(self):
        """The request id of the envelope (None when missing)."""
        return self.header.get("id")

    @property
    def body(self) -> dict:
        """The request's own fields: the header without the envelope's."""
        return {k: v for k, v in self.header.items() if k not in ENVELOPE_FIELDS}


@dataclass(slots=True)
class TurnOutcome:
    """What every finished turn reports, in the engine (`Completion`) and on the wire
    (`Result`): the one definition of these fields.

    Attributes:
        uid: the turn's id (what `submit` returned).
        agent_id: whose turn it was.
        text: the generated text (an EOS token is not rendered).
        token_ids: the generated ids, without a final EOS (as `mlx_lm.generate` yields).
        finish_reason: "stop" (EOS or a stop string), "length" (max_tokens), "cancelled"
            or, in the engine, "error".
    """

    uid: int
    agent_id: str
    text: str
    token_ids: list[int]
    finish_reason: str


def request_header(request_id, body: dict, session: str | None = None) -> dict:
    """A request's header: its envelope (`id`, and `session` when given; signing adds
    `nonce` and `ts`) around its body.

    Raises:
        ValueError: the body names an envelope field.
    """
    clash = ENVELOPE_FIELDS.intersection(body)
    if clash:
        raise ValueError(f"envelope field(s) {sorted(clash)} in a request body")
    header = {**body, "id": request_id}
    if session is not None:
        header["session"] = session
    return header


def encode(kind: MessageType, header: dict, key: bytes | None = None) -> list[bytes]:
    """Frames for one message (signed when a key is given)."""
    if key is not None:
        header = {**header, "nonce": os.urandom(12).hex(), "ts": time.time()}
    body = msgpack.packb(header, use_bin_type=True, default=_integer)
    frames = [MAGIC, kind.value.encode(), body]
    if key is not None:
        frames.append(sign(key, frames))
    return frames


def _integer(obj: object) -> int:
    """msgpack's fallback: integer-like objects (numpy's ints) travel as ints."""
    if hasattr(obj, "__index__") and not isinstance(obj, (bool, float)):
        return operator.index(obj)
    raise TypeError(f"cannot send a {type(obj).__name__}")


def decode(frames: list[bytes], key: bytes | None = None) -> Message:
    """Parse and check a message's frames.

    Raises:
        ProtocolError: malformed, oversized, unknown type or bad signature.
    """
    if sum(len(f) for f in frames) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message exceeds {MAX_MESSAGE_BYTES} bytes")
    want = 4 if key is not None else 3
    if len(frames) != want or frames[0] != MAGIC:
        if key is not None and len(frames) == 3 and frames[0] == MAGIC:
            raise ProtocolError("unauthorized", "message is not signed")
        if key is None and len(frames) == 4 and frames[0] == MAGIC:
            raise ProtocolError("unauthorized", "message is signed, but there is no auth key here")
        raise ProtocolError("malformed", f"expected {want} frames starting with {MAGIC!r}")
    if key is not None and not hmac.compare_digest(frames[3], sign(key, frames[:3])):
        raise ProtocolError("unauthorized", "bad signature")
    try:
        kind = MessageType(frames[1].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("unknown_type", f"unknown message type {frames[1][:32]!r}") from exc
    try:
        header = msgpack.unpackb(
            frames[2], raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("malformed", f"header is not msgpack: {type(exc).__name__}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "header is not a map")
    return Message(kind, header)


def sign(key: bytes, frames: list[bytes]) -> bytes:
    """HMAC-SHA256 over every frame, each length-prefixed so frames cannot be re-split."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for f in frames:
        mac.update(len(f).to_bytes(8, "little"))
        mac.update(f)
    return mac.digest()


class ReplayGuard:
    """Rejects signed messages that are too old, from the future, or seen before."""

    def __init__(self, window_s: float = REPLAY_WINDOW_S) -> None:
        self.window_s = window_s
        self._seen: dict[str, float] = {}

    def check(self, header: dict) -> None:
        """Raise ProtocolError("unauthorized") for a stale or repeated message."""
        nonce, ts = header.get("nonce"), header.get("ts")
        ok_ts = isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts)
        if not isinstance(nonce, str) or not ok_ts:
            raise ProtocolError("unauthorized", "signed message lacks nonce or ts")
        now = time.time()
        if abs(now - ts) > self.window_s:
            raise ProtocolError("unauthorized", "message timestamp outside the replay window")
        if nonce in self._seen:
            raise ProtocolError("unauthorized", "replayed message")
        self._seen[nonce] = ts
        if len(self._seen) > 100_000:
            self._seen = {n: t for n, t in self._seen.items() if now - t <= self.window_s}


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read an HMAC key file (surrounding whitespace stripped).

    Raises:
        ProtocolError: invalid_request when the key is shorter than MIN_KEY_BYTES.
        OSError: the file cannot be read.
    """
    with open(os.path.expanduser(path), "rb") as f:
        key = f.read().strip()
    check_key(key, str(path))
    return key


def check_key(key: bytes, where: str = "auth key") -> bytes:
    """Refuse an HMAC key under MIN_KEY_BYTES: an empty or tiny key is no secret."""
    if len(key) < MIN_KEY_BYTES:
        raise ProtocolError(
            "invalid_request",
            f"{where}: the auth key has {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > KEYFILE`)",
        )
    return key


def check_size(frames: list[bytes]) -> None:
    """Refuse by size alone, before decoding: over MAX_MESSAGE_BYTES, or a request other
    than `submit` over MAX_SMALL_REQUEST_BYTES (nothing legitimate is that big)."""
    size = sum(len(f) for f in frames)
    if size > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"message exceeds {MAX_MESSAGE_BYTES} bytes")
    if size > MAX_SMALL_REQUEST_BYTES and len(frames) > 1 and frames[1] != b"submit":
        raise ProtocolError(
            "too_large",
            f"a {frames[1][:16]!r} request is limited to {MAX_SMALL_REQUEST_BYTES} bytes",
        )


def peek_id(frames: list[bytes]):
    """Best effort: the request id in a message's header without checking anything else
    (an oversized or unsigned message's id, so its error can still be matched). Other
    fields are stepped over by their length headers, never read or copied: the cost of a
    refusal does not grow with the message."""
    if len(frames) < 3 or frames[0] != MAGIC:
        return None
    data = memoryview(frames[2])
    try:
        count, pos = _container(data, 0, _MAPS)
        for _ in range(min(count, PEEK_ITEMS)):
            if data[pos : pos + 3] == b"\xa2id":  # the fixstr "id"
                unpacker = msgpack.Unpacker(raw=False, max_buffer_size=PEEK_BYTES)
                unpacker.feed(data[pos + 3 : pos + 3 + PEEK_BYTES])
                rid = unpacker.unpack()
                return rid if isinstance(rid, (int, str)) and not isinstance(rid, bool) else None
            pos = _skip(data, _skip(data, pos, [PEEK_ITEMS]), [PEEK_ITEMS])
    except (IndexError, ValueError, msgpack.OutOfData, msgpack.UnpackException):
        return None  # garbage, or an id not where a peek can find it cheaply
    return None


# msgpack type byte -> (bytes of its length field, bytes before the payload, item multiplier)
_SIZED = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}  # bin, str
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}  # ext: length, then a type byte
_FIXED = {0xC0: 1, 0xC2: 1, 0xC3: 1, 0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}
_FIXED |= {0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}
_MAPS = (0x80, 0xDE, 0xDF, 2)
_ARRAYS = (0x90, 0xDC, 0xDD, 1)


def _container(data: memoryview, pos: int, kind: tuple) -> tuple[int, int]:
    """(items, position of the first) of a map or array at `pos`; ValueError if not one."""
    fix, b16, b32, per = kind
    t = data[pos]
    if fix <= t <= fix + 0x0F:
        return (t & 0x0F) * per, pos + 1
    width = 2 if t == b16 else 4 if t == b32 else 0
    if not width:
        raise ValueError("not a container")
    return int.from_bytes(data[pos + 1 : pos + 1 + width], "big") * per, pos + 1 + width


def _skip(data: memoryview, pos: int, budget: list[int]) -> int:
    """The position after the msgpack value at `pos`: strings and binaries are stepped over
    by their length; containers item by item, at most `budget` items in all."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError("too many items to peek through")
    t = data[pos]
    if t <= 0x7F or t >= 0xE0:
        return pos + 1
    if 0xA0 <= t <= 0xBF:
        return pos + 1 + (t & 0x1F)
    if t in _FIXED:
        return pos + _FIXED[t]
    for table, extra in ((_SIZED, 0), (_EXT, 1)):
        if t in table:
            w = table[t]
            return pos + 1 + w + extra + int.from_bytes(data[pos + 1 : pos + 1 + w], "big")
    kind = _MAPS if t in (0xDE, 0xDF) or 0x80 <= t <= 0x8F else _ARRAYS
    count, pos = _container(data, pos, kind)
    for _ in range(count):
        pos = _skip(data, pos, budget)
    return pos


def reply(request_id, result) -> tuple[MessageType, dict]:
    """A success reply's type and header."""
    return MessageType.REPLY, {"id": request_id, "ok": True, "result": result}


def error(request_id, code: str, message: str) -> tuple[MessageType, dict]:
    """An error reply's type and header."""
    return MessageType.ERROR, {
        "id": request_id,
        "ok": False,
        "error": {"code": code, "message": message},
    }


def check_version(version) -> None:
    """Refuse a peer whose protocol major version differs from ours."""
    if (
        not isinstance(version, (list, tuple))
        or len(version) != 2
        or not all(isinstance(v, int) for v in version)
    ):
        raise ProtocolError("malformed", f"bad protocol version {shown(version)}")
    if version[0] != PROTOCOL_VERSION[0]:
        raise ProtocolError(
            "protocol_mismatch",
            f"daemon speaks protocol {PROTOCOL_VERSION[0]}.x, client {version[0]}.{version[1]}",
        )
