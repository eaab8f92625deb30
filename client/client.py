"""The Python client of the agentkv daemon. Pure Python (pyzmq + msgpack); never imports MLX.

    from agentkv.client import Client
    with Client("ipc:///run/user/1000/agentkv/daemon.sock") as c:
        r = c.generate("planner", "Hello", max_tokens=64)
        print(r.text, r.usage["cached_tokens"])

A Client is not thread-safe: use one per thread.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import zmq

from . import protocol
from .errors import (
    AuthMismatch,
    DaemonUnavailable,
    GenerationFailed,
    InvalidRequest,
    MessageTooLarge,
    ProtocolMismatch,
    StaleSession,
    TurnCancelled,
    error_for,
)
from .paths import default_socket
from .protocol import SUBMIT_DEFAULTS, MessageType

MAX_LATE_STEPS = 64  # timed-out steps whose late replies are still taken in
# Least seconds between step replies: `stream` text in ~20 ms pieces (one round trip per
# token would cost the daemon decode speed at one agent), `generate` only needs the end.
STREAM_INTERVAL_S = 0.02
GENERATE_INTERVAL_S = 1.0


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
class Result:
    """A finished turn.

    Attributes:
        uid: the request id.
        agent_id: its agent.
        text: the generated text.
        token_ids: the generated ids, without a final EOS (as `mlx_lm.generate` yields).
        finish_reason: "stop" (EOS or a stop string), "length" or "cancelled" (`generate`
            returns a cancelled turn, with what it generated; `stream` raises TurnCancelled).
        usage: token counts and timings.
        context_token_ids: the generated ids exactly as appended to the agent's context: a
            final EOS included when the turn ended on one (a model may have several EOS
            ids), [] for a cancelled turn (its context did not change). The agent's
            context is its context before the turn plus these. None from an older daemon.
        durable: as in `Event`: True once the turn is on disk, False if its write failed.
    """

    uid: int
    agent_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict
    context_token_ids: list[int] | None = None
    durable: bool | None = None


class Client:
    """Talks to one agentkv daemon.

    Args:
        endpoint: the daemon's socket (its `--socket`); default: the shared default socket.
        timeout: seconds to wait for any reply before raising DaemonUnavailable.
        auth_key: the daemon's `--auth-key`: the key bytes, or a path to the key file.

    Raises:
        DaemonUnavailable: no answer to the handshake within `timeout`.
        ProtocolMismatch: the daemon speaks another major protocol version (or, with an
            auth key, one that does not bind requests to a session).
        AuthMismatch: one side has an auth key and the other none, or the keys differ.
        InvalidRequest: a malformed endpoint, or an auth key under 16 bytes.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = 30.0,
        auth_key: bytes | str | Path | None = None,
    ) -> None:
        self.endpoint = endpoint or default_socket()
        self.timeout = _seconds(timeout, "timeout")
        self._key = _load_key(auth_key)
        self._ids = itertools.count(1)
        self._buffered: deque[Event] = deque()
        # Steps that timed out: the daemon has handed their events over already, so a late
        # reply to one is kept for the next step instead of dropped.
        self._late_steps: deque[int] = deque(maxlen=MAX_LATE_STEPS)
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise InvalidRequest(f"bad endpoint {self.endpoint!r}: {exc}") from None
        self._session: str | None = None
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def _handshake(self) -> None:
        """`hello`: the daemon's facts, its protocol version checked, and (with a key) the
        session every signed request names."""
        info = self._call(MessageType.HELLO, {"version": list(protocol.PROTOCOL_VERSION)})
        try:
            protocol.check_version(info.get("version"))
        except protocol.ProtocolError as exc:
            raise error_for(exc.code, str(exc)) from None
        session = info.get("session")
        if self._key is not None and not isinstance(session, str):
            raise ProtocolMismatch(
                "the daemon does not bind signed requests to a session (protocol < 1.3): "
                "a captured request could be replayed after its restart; upgrade the daemon"
            )
        self.info, self._session = info, session

    # -- turns -----------------------------------------------------------------------------

    def submit(
        self,
        agent_id: str,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Sequence[dict] | None = None,
        max_tokens: int = SUBMIT_DEFAULTS.max_tokens,
        temperature: float = SUBMIT_DEFAULTS.temperature,
        top_p: float = SUBMIT_DEFAULTS.top_p,
        top_k: int = SUBMIT_DEFAULTS.top_k,
        min_p: float = SUBMIT_DEFAULTS.min_p,
        seed: int | None = SUBMIT_DEFAULTS.seed,
        stop: str | Sequence[str] | None = None,
    ) -> int:
        """Queue a turn; returns its request id at once.

        `prompt` (text, or a list of token ids) is appended to the agent's context;
        `messages` is the whole chat, rendered with the model's chat template (the longest
        common token prefix with the agent's context is reused). `stop` is one stop string
        or several. The request is checked here first (`protocol.SubmitRequest`).

        Raises:
            InvalidRequest: a bad agent id, input or option (here, or by the daemon).
        """
        try:
            request = protocol.SubmitRequest.for_turn(
                agent_id,
                prompt,
                messages=messages,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                seed=seed,
                stop=stop,
            )
        except protocol.ProtocolError as exc:
            raise InvalidRequest(str(exc)) from None
        return self._call(MessageType.SUBMIT, request.to_body())["uid"]

    def step(self, timeout: float = 1.0, interval: float = 0.0) -> list[Event]:
        """Events of this client's requests since its last step, waiting up to `timeout`.

        With `interval` (seconds), the daemon answers at most once per interval (a finished
        turn is never held back), returning the tokens of several steps in one reply: fewer
        round trips for a client that does not need each token the moment it exists.
        """
        if not self._buffered:
            self._step_call(timeout, interval)
        out = list(self._buffered)
        self._buffered.clear()
        return out

    def generate(self, agent_id: str, prompt=None, **kwargs) -> Result:
        """Submit a turn and wait for it to finish (keyword arguments as `submit`).

        A cancelled turn is returned, not raised: its finish_reason is "cancelled".

        Raises:
            GenerationFailed: the turn finished with finish_reason "error".
        """
        parts: list[str] = []
        tokens: list[int] = []
        uid = self.submit(agent_id, prompt, **kwargs)
        for event in self._events_of(uid, GENERATE_INTERVAL_S):
            parts.append(event.text)
            tokens += event.token_ids
            if event.finished:
                if event.finish_reason == "error":
                    err = event.error or {}
                    raise GenerationFailed(f"{err.get('code')}: {err.get('message')}")
                return Result(
                    event.uid,
                    agent_id,
                    "".join(parts),
                    tokens,
                    event.finish_reason,
                    event.usage or {},
                    event.context_token_ids,
                    durable=event.durable,
                )
        raise AssertionError("unreachable")

    def stream(
        self, agent_id: str, prompt=None, *, interval: float = STREAM_INTERVAL_S, **kwargs
    ) -> Iterator[str]:
        """Submit a turn and yield its text as it is generated (keyword arguments as
        `submit`). Text comes at most every `interval` seconds (see `step`); 0 yields each
        token's text as soon as it exists.

        Raises:
            GenerationFailed: the turn finished with finish_reason "error".
            TurnCancelled: the turn was cancelled (it carries the text yielded so far), so
                a cancelled stream never looks like one that ended normally.
        """
        parts: list[str] = []
        tokens: list[int] = []
        for event in self._events_of(self.submit(agent_id, prompt, **kwargs), interval):
            parts.append(event.text)
            tokens += event.token_ids
            if event.text:
                yield event.text
            if event.finished and event.finish_reason == "error":
                err = event.error or {}
                raise GenerationFailed(f"{err.get('code')}: {err.get('message')}")
            if event.finished and event.finish_reason == "cancelled":
                raise TurnCancelled(
                    f"turn {event.uid} of agent {agent_id!r} was cancelled",
                    uid=event.uid,
                    agent_id=agent_id,
                    text="".join(parts),
                    token_ids=tokens,
                    usage=event.usage,
                )

    def cancel(self, uid: int) -> bool:
        """Cancel a request; False if it had already finished."""
        return bool(self._call(MessageType.CANCEL, {"uid": uid})["cancelled"])

    # -- agents and daemon -----------------------------------------------------------------

    def agents(self) -> list[dict]:
        """Every agent the daemon knows (in memory or in its store), fetched page by page."""
        rows: list[dict] = []
        after = None
        while True:
            page = self._call(MessageType.AGENTS, {} if after is None else {"after": after})
            rows += page["agents"]
            after = page.get("next")
            if not after:
                return rows

    def inspect(self, agent_id: str) -> dict:
        """One agent in detail, its `token_ids` fetched page by page. Raises UnknownAgent."""
        for _ in range(8):  # a turn that commits between pages: start again
            info = self._call(MessageType.INSPECT, {"agent_id": agent_id})
            tokens = info.get("token_ids")
            while tokens is not None and len(tokens) < info.get("tokens", 0):
                page = self._call(
                    MessageType.INSPECT, {"agent_id": agent_id, "token_offset": len(tokens)}
                )
                if (page["tokens"], page.get("last_used")) != (
                    info["tokens"],
                    info.get("last_used"),
                ):
                    break
                tokens += page["token_ids"]
            else:
                return info
        raise DaemonUnavailable(f"agent {agent_id!r} kept changing while it was read")

    def delete(self, agent_id: str) -> None:
        """Forget an agent (memory and store); returns once the delete is on disk.

        Raises:
            UnknownAgent: no such agent.
            StoreWriteFailed: the delete could not be written (disk full, read-only
                store): the agent is still stored and comes back after a restart.
        """
        self._call(MessageType.DELETE, {"agent_id": agent_id})

    def fork(self, agent_id: str, new_agent_id: str) -> dict:
        """Branch an agent's context under a new id (copy-on-write: blocks are shared)."""
        return self._call(MessageType.FORK, {"agent_id": agent_id, "new_agent_id": new_agent_id})

    def stats(self) -> dict:
        """Daemon counters, pool and store use."""
        return self._call(MessageType.STATS, {})

    def shutdown(self, *, cancel: bool = False, wait: float | None = None) -> dict:
        """Ask the daemon to drain and exit (in-flight turns finish unless cancel=True).

        Args:
            cancel: cancel running turns instead of letting them finish.
            wait: if given, wait up to this many seconds for the daemon to finish draining
                and closing its store; the reply then holds `unsaved`, one row per agent
                whose finished turns could not be made durable (`agent_id`,
                `behind_tokens`, `error`): empty when everything is on disk.

        Returns:
            The daemon's reply (`shutting_down`; with `wait`, `stopped` and `unsaved`).

        Raises:
            DaemonUnavailable: no reply within `wait` (or the client's timeout).
        """
        if wait is None:
            return self._call(MessageType.SHUTDOWN, {"cancel": cancel})
        return self._call(MessageType.SHUTDOWN, {"cancel": cancel, "wait": True}, wait=wait)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _events_of(self, uid: int, interval: float) -> Iterator[Event]:
        """This request's events; others' are kept for the next `step`."""
        while True:
            mine = self._take_buffered(uid)
            if not mine:
                self._step_call(1.0, interval)
                mine = self._take_buffered(uid)
            for event in mine:
                yield event
                if event.finished:
                    return

    def _step_call(self, timeout: float, interval: float = 0.0) -> None:
        body = {"timeout": _seconds(timeout, "timeout")}
        if interval:  # only when asked: a 1.0 daemon ignores it anyway
            body["interval"] = interval
        result = self._call(MessageType.STEP, body, wait=timeout + self.timeout)
        self._buffered.extend(Event.from_wire(e) for e in result["events"])

    def _take_buffered(self, uid: int) -> list[Event]:
        mine = [e for e in self._buffered if e.uid == uid]
        if mine:
            self._buffered = deque(e for e in self._buffered if e.uid != uid)
        return mine

    def _call(self, kind: MessageType, body: dict, wait: float | None = None):
        try:
            return self._call_once(kind, body, wait)
        except StaleSession:
            if kind is MessageType.HELLO:
                raise
            # The daemon restarted: it refused the request without running it, so saying
            # hello again and sending it once more is safe.
            self._handshake()
            return self._call_once(kind, body, wait)

    def _call_once(self, kind: MessageType, body: dict, wait: float | None):
        rid = next(self._ids)
        session = self._session if self._key is not None and kind is not MessageType.HELLO else None
        try:
            header = protocol.request_header(rid, body, session)
            frames = protocol.encode(kind, header, self._key)
        except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError included
            raise InvalidRequest(f"cannot send this request: {exc}") from None
        size = sum(len(f) for f in frames)
        if size > protocol.MAX_MESSAGE_BYTES:  # the daemon would refuse it anyway
            raise MessageTooLarge(
                f"request of {size} bytes exceeds {protocol.MAX_MESSAGE_BYTES} bytes"
            )
        wait = self.timeout if wait is None else wait
        deadline = time.monotonic() + wait
        self._send(frames, wait)
        try:
            return self._await(rid, deadline, wait)
        except DaemonUnavailable:
            if kind is MessageType.STEP:
                self._late_steps.append(rid)
            raise

    def _send(self, frames: list[bytes], wait: float) -> None:
        """Send, waiting at most `wait` for room (the socket's queue fills when the daemon
        is gone or not reading)."""
        try:
            self._sock.setsockopt(zmq.SNDTIMEO, max(1, int(wait * 1000)))
            self._sock.send_multipart(frames)
        except zmq.Again:
            raise DaemonUnavailable(
                f"could not send to {self.endpoint} within {wait:.1f} s"
            ) from None
        except zmq.ZMQError as exc:
            raise DaemonUnavailable(f"cannot send to {self.endpoint}: {exc}") from None

    def _await(self, rid: int, deadline: float, wait: float):
        """The reply to request `rid`; late replies to timed-out steps are kept."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise DaemonUnavailable(f"no reply from {self.endpoint} within {wait:.1f} s")
            frames = self._sock.recv_multipart()
            try:
                msg = protocol.decode(frames, self._key)
            except protocol.ProtocolError as exc:
                _raise_if_unreadable(exc, frames, rid)
                _raise_if_mismatched(frames, rid, self._key is not None)
                continue  # not for us / unreadable: keep waiting for our reply
            if msg.header.get("id") != rid:
                self._keep_late(msg)
                continue
            if msg.type is MessageType.ERROR:
                err = msg.header.get("error") or {}
                code, message = str(err.get("code")), str(err.get("message"))
                if code == "unauthorized" and self._key is None:
                    raise AuthMismatch(
                        f"authentication mismatch: the daemon wants an auth key "
                        f"and this client has none ({message})"
                    )
                raise error_for(code, message)
            return msg.header.get("result")

    def _keep_late(self, msg: protocol.Message) -> None:
        """A reply to a step that timed out still carries its events: keep them."""
        rid = msg.header.get("id")
        if rid not in self._late_steps or msg.type is not MessageType.REPLY:
            return
        self._late_steps.remove(rid)
        events = (msg.header.get("result") or {}).get("events") or []
        self._buffered.extend(Event.from_wire(e) for e in events)


def _raise_if_unreadable(exc: protocol.ProtocolError, frames: list[bytes], rid: int) -> None:
    """Our reply, but over the size limit: say so instead of timing out."""
    if exc.code == "too_large" and protocol.peek_id(frames) == rid:
        size = sum(len(f) for f in frames)
        raise MessageTooLarge(
            f"reply of {size} bytes exceeds {protocol.MAX_MESSAGE_BYTES} bytes"
        ) from None


def _raise_if_mismatched(frames: list[bytes], rid: int, keyed: bool) -> None:
    """A reply to us that fails the signature check means the two sides disagree about
    authentication (a daemon sends `unauthorized` unsigned when our signature was missing
    or wrong): say so at once instead of timing out. Only a refusal is believed unsigned."""
    try:
        msg = protocol.decode(frames[:3])
    except protocol.ProtocolError:
        return
    if msg.header.get("id") not in (rid, None):
        return
    err = msg.header.get("error") or {}
    if keyed and len(frames) == 3:
        why = err.get("message") if msg.type is MessageType.ERROR else "an unsigned reply"
        raise AuthMismatch(
            f"authentication mismatch: the daemon does not accept this client's key ({why})"
        )
    if not keyed and len(frames) == 4:
        raise AuthMismatch(
            "authentication mismatch: the daemon signs its replies (it has an auth key) "
            "and this client has none"
        )


def _load_key(key: bytes | str | Path | None) -> bytes | None:
    if key is None:
        return None
    try:
        return protocol.check_key(key) if isinstance(key, bytes) else protocol.load_key(key)
    except protocol.ProtocolError as exc:
        raise InvalidRequest(str(exc)) from None


def _seconds(value: object, what: str) -> float:
    """A wait in seconds: a finite number >= 0 (an infinite one cannot be a socket timeout)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)
