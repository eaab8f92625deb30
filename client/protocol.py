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
takes the body back out. A `submit` body is a `SubmitRequest`: its fields, defaults,
limits and checks are written once, here, for the client, the daemon and the engine.
Replies have type
`reply` (header: `id`, `ok: true`, `result`) or `error` (header: `id`, `ok: false`,
`error: {code, message}`), the codes from `ERRORS`.

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

import contextlib
import enum
import hashlib
import hmac
import math
import operator
import os
import re
import reprlib
import time
from dataclasses import dataclass
from typing import NoReturn

import msgpack

PROTOCOL_VERSION = (1, 4)
SESSION_VERSION = (1, 3)  # the first version whose signed requests carry `session`
MAGIC = b"AKV1"
MAX_MESSAGE_BYTES = 8 * 2**20  # larger requests are refused with `too_large`
# Token ids one message carries at most (a submit's `tokens`, an inspect page): msgpack
# takes <= 5 bytes per id, so a full page stays well under MAX_MESSAGE_BYTES.
MAX_TOKENS_PER_MESSAGE = 1 << 20
# Every request but `submit` fits in this (agent ids are <= 128 characters): a larger one is
# refused by size, before its fields are looked at.
MAX_SMALL_REQUEST_BYTES = 64 * 1024
PEEK_BYTES = 1024  # at most what peek_id decodes: the id's own bytes
PEEK_ITEMS = 256  # header items peek_id steps over before giving up
_SHORT_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 48
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = 4
MAX_AGENTS_PER_PAGE = 128  # rows of one `agents` reply (its `limit` at most)
MIN_KEY_BYTES = 16  # shorter HMAC keys are refused (an empty file would mean no secret)
REPLAY_WINDOW_S = 60.0
AGENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")  # whole string: fullmatch


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


# -- submit: one turn's request ----------------------------------------------------------
# The one place a turn's defaults, limits and checks are written: the client builds its
# `submit` from SubmitRequest, the daemon's command layer reads it back from the wire, and
# the engine checks its own `submit` arguments with TurnOptions.

TURN_INPUTS = ("prompt", "tokens", "messages")  # a submit gives exactly one of these
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
MAX_TOOLS = 128  # tools of one submit (each a JSON-schema dict; the size is the message's)


def check_sampling(temperature, top_p, top_k, min_p, seed) -> None:
    """Sampling parameters' ranges (see TurnOptions).

    Raises:
        ProtocolError: invalid_request, naming the first bad one.
    """
    _check_number("temperature", temperature, 0.0)
    _check_number("top_p", top_p, 0.0, 1.0, lo_open=True)
    _check_number("min_p", min_p, 0.0, 1.0, hi_open=True)
    if not _is_int(top_k) or top_k < 0:
        _invalid(f"top_k must be an integer >= 0, got {shown(top_k)}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        _invalid(f"seed must be an integer in [0, 2**63), got {shown(seed)}")


def _check_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):  # one string is one stop string, not its characters
        stop = [stop]
    ok = isinstance(stop, (list, tuple)) and len(stop) <= MAX_STOP_STRINGS
    if not ok or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        _invalid(
            f"stop must be up to {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} chars"
        )
    return tuple(stop)


def _check_number(name, value, lo, hi=math.inf, lo_open=False, hi_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open else "]"
        _invalid(f"{name} must be a number in {lo_b}{lo}, {hi}{hi_b}, got {shown(value)}")


def _int_like(value):
    """numpy's integers as ints (they travel as ints); anything else unchanged."""
    if not isinstance(value, (int, bool, float)) and hasattr(value, "__index__"):
        try:
            return operator.index(value)
        except TypeError:
            return value
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(message: str) -> NoReturn:
    raise ProtocolError("invalid_request", message)


@dataclass(slots=True, frozen=True)
class TurnOptions:
    """How a turn generates, checked and normalized: integer-likes (numpy's) become ints,
    one stop string becomes a 1-tuple. The defaults are every layer's defaults.

    Attributes:
        max_tokens: tokens to generate at most (> 0).
        temperature: >= 0; 0 means greedy (argmax).
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        min_p: drop tokens below min_p times the top probability, in [0, 1); 0 disables it.
        seed: fixes the turn's random stream, in [0, 2**63); None draws a fresh one.
        stop: up to MAX_STOP_STRINGS non-empty strings (of <= MAX_STOP_CHARS characters)
            that end the turn when generated.

    Raises:
        ProtocolError: invalid_request, naming the first bad field.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_tokens", "top_k", "seed"):
            object.__setattr__(self, name, _int_like(getattr(self, name)))
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            _invalid(f"max_tokens must be an integer > 0, got {shown(self.max_tokens)}")
        check_sampling(self.temperature, self.top_p, self.top_k, self.min_p, self.seed)
        object.__setattr__(self, "stop", _check_stop(self.stop))

    def as_dict(self) -> dict:
        """The options by name (stop as a list, as on the wire)."""
        out = {name: getattr(self, name) for name in self.__slots__}
        out["stop"] = list(self.stop)
        return out


SUBMIT_DEFAULTS = TurnOptions()
_OPTION_FIELDS = frozenset(TurnOptions.__slots__)
SUBMIT_FIELDS = frozenset({"agent_id", *TURN_INPUTS, *_OPTION_FIELDS, "tools"})  # a body


@dataclass(slots=True, frozen=True)
class SubmitRequest:
    """A `submit` request's body: one turn of one agent.

    Exactly one input: `prompt` (text appended to the agent's context), `tokens` (token
    ids appended to it) or `messages` (the whole chat as {role, content} dicts, rendered
    with the model's chat template). `tools` (up to MAX_TOOLS dicts, e.g. OpenAI's
    function schemas) go with `messages`, to the chat template. What only the model can
    judge (token ids in its vocabulary, a chat template, text that encodes to nothing,
    whether its template takes tools) is the engine's to check.

    Raises:
        ProtocolError: invalid_request, naming the first bad field.
    """

    agent_id: str
    prompt: str | None = None
    tokens: list[int] | None = None
    messages: list[dict] | None = None
    options: TurnOptions = SUBMIT_DEFAULTS
    tools: list[dict] | None = None

    def __post_init__(self) -> None:
        check_agent_id(self.agent_id)
        given = [k for k in TURN_INPUTS if getattr(self, k) is not None]
        if len(given) != 1:
            _invalid("give exactly one of prompt, tokens, messages")
        if self.prompt is not None and not isinstance(self.prompt, str):
            _invalid("prompt must be a string (token ids: `tokens`)")
        for kind in ("tokens", "messages"):
            if getattr(self, kind) is not None and not isinstance(getattr(self, kind), list):
                _invalid(f"{kind} must be a list")
        if self.tokens is not None and len(self.tokens) > MAX_TOKENS_PER_MESSAGE:
            _invalid(f"at most {MAX_TOKENS_PER_MESSAGE} token ids per request")
        if self.tools is not None:
            check_tools(self.tools, chat=self.messages is not None)

    @classmethod
    def for_turn(
        cls, agent_id: str, prompt=None, *, messages=None, tools=None, **options
    ) -> SubmitRequest:
        """A request from `submit`-style arguments: `prompt` as text or token ids (any
        iterable of ints), `messages` and `tools` any sequences of dicts, options by name."""
        tokens = None
        if prompt is not None and not isinstance(prompt, str):
            try:
                tokens = list(prompt)
            except TypeError:
                _invalid(f"prompt must be text or token ids, got {type(prompt).__name__}")
            prompt = None
        if messages is not None and not isinstance(messages, (str, bytes, dict)):
            with contextlib.suppress(TypeError):  # not iterable: refused as not a list
                messages = list(messages)
        if tools is not None and not isinstance(tools, (str, bytes, dict)):
            with contextlib.suppress(TypeError):
                tools = list(tools)
        return cls(agent_id, prompt, tokens, messages, TurnOptions(**options), tools)

    @classmethod
    def from_body(cls, body: dict) -> SubmitRequest:
        """A request from a decoded body; an unknown field is refused, and an input given
        as None counts as not given."""
        unknown = set(body) - SUBMIT_FIELDS
        if unknown:
            _invalid(f"unknown field(s): {sorted(map(str, unknown))}")
        options = {k: v for k, v in body.items() if k in _OPTION_FIELDS}
        inputs = {k: body.get(k) for k in TURN_INPUTS}
        options = TurnOptions(**options)
        return cls(body.get("agent_id"), **inputs, options=options, tools=body.get("tools"))

    def to_body(self) -> dict:
        """The wire body: agent id, the one input given, and every option (`stop` only
        when there is one)."""
        body = {"agent_id": self.agent_id, **self.options.as_dict()}
        if not self.options.stop:
            del body["stop"]
        for kind in TURN_INPUTS:
            if getattr(self, kind) is not None:
                body[kind] = getattr(self, kind)
        if self.tools is not None:
            body["tools"] = self.tools
        return body


def check_tools(tools: object, *, chat: bool) -> list[dict]:
    """A submit's `tools`: a list of at most MAX_TOOLS dicts, given with `messages`.

    Raises:
        ProtocolError: invalid_request.
    """
    if not chat:
        _invalid("tools go with messages (the chat template renders them)")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        _invalid(f"tools must be a list of dicts (JSON schemas), got {shown(tools)}")
    if len(tools) > MAX_TOOLS:
        _invalid(f"at most {MAX_TOOLS} tools per request, got {len(tools)}")
    return tools
