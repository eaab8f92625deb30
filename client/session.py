"""The client side of the protocol without I/O, shared by `Client` and `AsyncClient`.

`Session` holds what one connection knows (request ids, the auth key, the daemon's `hello`
facts and session id): it builds signed request frames and reads reply frames into a
`Reply` (a result, or the typed error of `errors`). `Turn` folds one request's events into
a `Result`, or the error a stream raises. The sockets, waiting and timeouts stay with each
client (blocking pyzmq for `Client`, asyncio for `AsyncClient`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import protocol
from .errors import (
    AgentKVClientError,
    AuthMismatch,
    DaemonUnavailable,
    GenerationFailed,
    InvalidRequest,
    MessageTooLarge,
    ProtocolMismatch,
    TurnCancelled,
    error_for,
)
from .protocol import MessageType


@dataclass(slots=True)
class Event:
    """What happened to one request since the caller's last step.

    Attributes:
        uid: the request id `submit` returned.
        agent_id: its agent.
        token_ids: tokens generated since the last event.
        text: their text (streaming detokenizer deltas).
        finish_reason: set on the last event: "stop", "length", "cancelled" or "error".
        usage: set on the last event: token counts and timings.
        error: {code, message} when finish_reason is "error".
        durable: set on the last event when the daemon has a store: True once the turn
            (the agent's whole context) is on disk, so it survives a crash; False when
            the write failed (disk full, ...): the turn is served from memory and
            written again at the agent's next turn or at shutdown.
        context_token_ids: set on the last event: the generated ids exactly as appended to
            the agent's context (see `Result`); None from a daemon that does not send them.
        tool_calls: set on the last event of a turn given `tools` whose text holds tool
            calls the model's tool parser read: each {"name", "arguments"}; else None.
        content: with tool_calls, the turn's text less the calls.
    """

    uid: int
    agent_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: dict | None = None
    durable: bool | None = None
    context_token_ids: list[int] | None = None
    tool_calls: list[dict] | None = None
    content: str | None = None

    @property
    def finished(self) -> bool:
        """True on a request's last event."""
        return self.finish_reason is not None

    @classmethod
    def from_wire(cls, raw: dict) -> Event:
        """An event from a `step` reply; fields a later minor protocol version adds are
        ignored."""
        return cls(**{k: v for k, v in raw.items() if k in _EVENT_FIELDS})


_EVENT_FIELDS = frozenset(f.name for f in fields(Event))


@dataclass(slots=True)
class Result(protocol.TurnOutcome):
    """A finished turn: `TurnOutcome`'s fields (a cancelled turn's `generate` returns it with
    what it generated; `stream` raises TurnCancelled), and:

    Attributes:
        usage: token counts and timings.
        context_token_ids: the generated ids exactly as appended to the agent's context: a
            final EOS included when the turn ended on one (a model may have several EOS
            ids), [] for a cancelled turn (its context did not change). The agent's
            context is its context before the turn plus these. None from an older daemon.
        durable: as in `Event`: True once the turn is on disk, False if its write failed.
        tool_calls: as in `Event`: the calls a turn given `tools` made, else None.
        content: with tool_calls, the text less the calls.
    """

    usage: dict
    context_token_ids: list[int] | None = None
    durable: bool | None = None
    tool_calls: list[dict] | None = None
    content: str | None = None


@dataclass(slots=True)
class Reply:
    """One reply read off the socket.

    Attributes:
        rid: the request id it answers (None when the daemon could not tell).
        result: the reply's result (None for an error).
        error: the typed error to raise for it, if it is one.
        to_all: the error concerns every waiting request, whatever its id (the two sides
            disagree about authentication, and the daemon could not read the id).
    """

    rid: object
    result: object = None
    error: AgentKVClientError | None = None
    to_all: bool = False

    def events(self) -> list[Event]:
        """The events of a `step` reply."""
        return [Event.from_wire(e) for e in (self.result or {}).get("events") or []]


class Session:
    """One connection's protocol state: request ids, signing, the `hello` facts.

    Args:
        endpoint: the daemon's socket, for error messages.
        auth_key: the key bytes or a key file's path (None: no authentication).

    Raises:
        InvalidRequest: an auth key under 16 bytes, or a key file that cannot be read.
    """

    def __init__(self, endpoint: str, auth_key: bytes | str | Path | None) -> None:
        self.endpoint = endpoint
        self.key = load_key(auth_key)
        self.info: dict = {}
        self.session: str | None = None
        self._ids = itertools.count(1)

    # -- requests --------------------------------------------------------------------------

    def request(self, kind: MessageType, body: dict) -> tuple[int, list[bytes]]:
        """A request's id and its frames, signed and bound to the session when keyed.

        Raises:
            InvalidRequest: a field that cannot travel (not msgpack-able).
            MessageTooLarge: over the protocol's size limit (the daemon would refuse it).
        """
        rid = next(self._ids)
        session = self.session if self.key is not None and kind is not MessageType.HELLO else None
        try:
            header = protocol.request_header(rid, body, session)
            frames = protocol.encode(kind, header, self.key)
        except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError included
            raise InvalidRequest(f"cannot send this request: {exc}") from None
        size = sum(len(f) for f in frames)
        if size > protocol.MAX_MESSAGE_BYTES:
            raise MessageTooLarge(
                f"request of {size} bytes exceeds {protocol.MAX_MESSAGE_BYTES} bytes"
            )
        return rid, frames

    @staticmethod
    def hello_body() -> dict:
        """The `hello` request's body."""
        return {"version": list(protocol.PROTOCOL_VERSION)}

    def accept_hello(self, info: dict) -> None:
        """Check the daemon's `hello` reply and keep its facts and session id.

        Raises:
            ProtocolMismatch: another major version, or a keyed daemon without sessions.
        """
        try:
            protocol.check_version(info.get("version"))
        except protocol.ProtocolError as exc:
            raise error_for(exc.code, str(exc)) from None
        session = info.get("session")
        if self.key is not None and not isinstance(session, str):
            raise ProtocolMismatch(
                "the daemon does not bind signed requests to a session (protocol < 1.3): "
                "a captured request could be replayed after its restart; upgrade the daemon"
            )
        self.info, self.session = info, session

    # -- replies ---------------------------------------------------------------------------

    def read(self, frames: list[bytes]) -> Reply | None:
        """A reply from its frames; None for a message that answers nothing of ours."""
        try:
            msg = protocol.decode(frames, self.key)
        except protocol.ProtocolError as exc:
            return self._unreadable(exc, frames)
        rid = msg.header.get("id")
        if msg.type is not MessageType.ERROR:
            return Reply(rid, msg.header.get("result"))
        err = msg.header.get("error") or {}
        code, message = str(err.get("code")), str(err.get("message"))
        if code == "unauthorized" and self.key is None:
            return Reply(
                rid,
                error=AuthMismatch(
                    f"authentication mismatch: the daemon wants an auth key "
                    f"and this client has none ({message})"
                ),
            )
        return Reply(rid, error=error_for(code, message))

    def _unreadable(self, exc: protocol.ProtocolError, frames: list[bytes]) -> Reply | None:
        """Our reply over the size limit, or a reply that fails the signature check: the
        two sides disagree about authentication (a daemon sends `unauthorized` unsigned
        when our signature was missing or wrong). Only a refusal is believed unsigned."""
        if exc.code == "too_large":
            rid = protocol.peek_id(frames)
            if rid is not None:
                size = sum(len(f) for f in frames)
                return Reply(
                    rid,
                    error=MessageTooLarge(
                        f"reply of {size} bytes exceeds {protocol.MAX_MESSAGE_BYTES} bytes"
                    ),
                )
        try:
            msg = protocol.decode(frames[:3])
        except protocol.ProtocolError:
            return None
        rid = msg.header.get("id")
        err = msg.header.get("error") or {}
        if self.key is not None and len(frames) == 3:
            why = err.get("message") if msg.type is MessageType.ERROR else "an unsigned reply"
            problem = f"the daemon does not accept this client's key ({why})"
        elif self.key is None and len(frames) == 4:
            problem = "the daemon signs its replies (it has an auth key) and this client has none"
        else:
            return None
        return Reply(
            rid, error=AuthMismatch(f"authentication mismatch: {problem}"), to_all=rid is None
        )


def submit_body(
    agent_id: str,
    prompt: str | Sequence[int] | None = None,
    *,
    messages: Sequence[dict] | None = None,
    **options,
) -> dict:
    """A `submit` request's body from `Client.submit`'s arguments (`prompt` text or token
    ids, or `messages`, and the options by name: `TurnOptions`' fields, whose defaults are
    the protocol's), checked by the protocol's `SubmitRequest`.

    Raises:
        InvalidRequest: a bad agent id, input or option.
    """
    try:
        request = protocol.SubmitRequest.for_turn(agent_id, prompt, messages=messages, **options)
    except protocol.ProtocolError as exc:
        raise InvalidRequest(str(exc)) from None
    return request.to_body()


def step_body(timeout: float, interval: float = 0.0) -> dict:
    """A `step` request's body (`interval` only when asked: a 1.0 daemon ignores it)."""
    body = {"timeout": seconds(timeout, "timeout")}
    if interval:
        body["interval"] = interval
    return body


class Turn:
    """One turn's events folded together, as `generate` returns it or `stream` ends it."""

    __slots__ = ("agent_id", "parts", "tokens", "uid")

    def __init__(self, uid: int, agent_id: str) -> None:
        self.uid = uid
        self.agent_id = agent_id
        self.parts: list[str] = []
        self.tokens: list[int] = []

    def add(self, event: Event) -> None:
        """Take in one event of this turn; raises GenerationFailed on a failed turn
        (DaemonUnavailable when the client could not fetch its events)."""
        self.parts.append(event.text)
        self.tokens += event.token_ids
        if event.finish_reason == "error":
            err = event.error or {}
            if err.get("code") == DaemonUnavailable.code:  # AsyncClient: its steps failed
                raise DaemonUnavailable(str(err.get("message")))
            raise GenerationFailed(f"{err.get('code')}: {err.get('message')}")

    def result(self, last: Event) -> Result:
        """The finished turn, given its last event."""
        return Result(
            last.uid,
            self.agent_id,
            "".join(self.parts),
            self.tokens,
            last.finish_reason,
            last.usage or {},
            last.context_token_ids,
            durable=last.durable,
            tool_calls=last.tool_calls,
            content=last.content,
        )

    def cancelled(self, last: Event) -> TurnCancelled:
        """What a stream raises for a turn that was cancelled."""
        return TurnCancelled(
            f"turn {last.uid} of agent {self.agent_id!r} was cancelled",
            uid=last.uid,
            agent_id=self.agent_id,
            text="".join(self.parts),
            token_ids=self.tokens,
            usage=last.usage,
        )


def load_key(key: bytes | str | Path | None) -> bytes | None:
    """An auth key from its bytes or its file; None for none."""
    if key is None:
        return None
    try:
        return protocol.check_key(key) if isinstance(key, bytes) else protocol.load_key(key)
    except protocol.ProtocolError as exc:
        raise InvalidRequest(str(exc)) from None


def seconds(value: object, what: str) -> float:
    """A wait in seconds: a finite number >= 0 (an infinite one cannot be a socket timeout)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)
