"""The Python client of the agentkv daemon. Pure Python (pyzmq + msgpack); never imports MLX.

    from agentkv.client import Client
    with Client("ipc:///run/user/1000/agentkv/daemon.sock") as c:
        r = c.generate("planner", "Hello", max_tokens=64)
        print(r.text, r.usage["cached_tokens"])

A Client is not thread-safe: use one per thread.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from . import protocol
from .errors import DaemonUnavailable, GenerationFailed, MessageTooLarge, error_for
from .paths import default_socket
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
    """

    uid: int
    agent_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    error: dict | None = None

    @property
    def finished(self) -> bool:
        """True on a request's last event."""
        return self.finish_reason is not None


@dataclass(slots=True)
class Result:
    """A finished turn."""

    uid: int
    agent_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict


class Client:
    """Talks to one agentkv daemon.

    Args:
        endpoint: the daemon's socket (its `--socket`); default: the shared default socket.
        timeout: seconds to wait for any reply before raising DaemonUnavailable.
        auth_key: the daemon's `--auth-key`: the key bytes, or a path to the key file.

    Raises:
        DaemonUnavailable: no answer to the handshake within `timeout`.
        ProtocolMismatch: the daemon speaks another major protocol version.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = 30.0,
        auth_key: bytes | str | Path | None = None,
    ) -> None:
        self.endpoint = endpoint or default_socket()
        self.timeout = timeout
        self._key = _load_key(auth_key)
        self._ids = itertools.count(1)
        self._buffered: deque[Event] = deque()
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)
        try:
            self.info = self._call(MessageType.HELLO, {"version": list(protocol.PROTOCOL_VERSION)})
            protocol.check_version(self.info.get("version"))
        except protocol.ProtocolError as exc:
            self.close()
            raise error_for(exc.code, str(exc)) from None
        except BaseException:
            self.close()
            raise

    # -- turns -----------------------------------------------------------------------------

    def submit(
        self,
        agent_id: str,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Sequence[dict] | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> int:
        """Queue a turn; returns its request id at once.

        `prompt` (text, or a list of token ids) is appended to the agent's context;
        `messages` is the whole chat, rendered with the model's chat template (the longest
        common token prefix with the agent's context is reused).
        """
        body: dict = {
            "agent_id": agent_id,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "seed": seed,
        }
        if isinstance(prompt, str):
            body["prompt"] = prompt
        elif prompt is not None:
            body["tokens"] = list(prompt)
        if messages is not None:
            body["messages"] = list(messages)
        if stop:
            body["stop"] = list(stop)
        return self._call(MessageType.SUBMIT, body)["uid"]

    def step(self, timeout: float = 1.0) -> list[Event]:
        """Events of this client's requests since its last step, waiting up to `timeout`."""
        if self._buffered:
            out = list(self._buffered)
            self._buffered.clear()
            return out
        result = self._call(MessageType.STEP, {"timeout": timeout}, wait=timeout + self.timeout)
        return [Event(**e) for e in result["events"]]

    def generate(self, agent_id: str, prompt=None, **kwargs) -> Result:
        """Submit a turn and wait for it to finish.

        Raises:
            GenerationFailed: the turn finished with finish_reason "error".
        """
        parts: list[str] = []
        tokens: list[int] = []
        for event in self._events_of(self.submit(agent_id, prompt, **kwargs)):
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
                )
        raise AssertionError("unreachable")

    def stream(self, agent_id: str, prompt=None, **kwargs) -> Iterator[str]:
        """Submit a turn and yield its text as it is generated."""
        for event in self._events_of(self.submit(agent_id, prompt, **kwargs)):
            if event.text:
                yield event.text
            if event.finished and event.finish_reason == "error":
                err = event.error or {}
                raise GenerationFailed(f"{err.get('code')}: {err.get('message')}")

    def cancel(self, uid: int) -> bool:
        """Cancel a request; False if it had already finished."""
        return bool(self._call(MessageType.CANCEL, {"uid": uid})["cancelled"])

    # -- agents and daemon -----------------------------------------------------------------

    def agents(self) -> list[dict]:
        """Every agent the daemon knows (in memory or in its store)."""
        return self._call(MessageType.AGENTS, {})["agents"]

    def inspect(self, agent_id: str) -> dict:
        """One agent in detail. Raises UnknownAgent."""
        return self._call(MessageType.INSPECT, {"agent_id": agent_id})

    def delete(self, agent_id: str) -> None:
        """Forget an agent (memory and store). Raises UnknownAgent."""
        self._call(MessageType.DELETE, {"agent_id": agent_id})

    def fork(self, agent_id: str, new_agent_id: str) -> dict:
        """Branch an agent's context under a new id (copy-on-write: blocks are shared)."""
        return self._call(MessageType.FORK, {"agent_id": agent_id, "new_agent_id": new_agent_id})

    def stats(self) -> dict:
        """Daemon counters, pool and store use."""
        return self._call(MessageType.STATS, {})

    def shutdown(self, *, cancel: bool = False) -> None:
        """Ask the daemon to drain and exit (in-flight turns finish unless cancel=True)."""
        self._call(MessageType.SHUTDOWN, {"cancel": cancel})

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _events_of(self, uid: int) -> Iterator[Event]:
        """This request's events; others' are kept for the next `step`."""
        while True:
            result = self._call(MessageType.STEP, {"timeout": 1.0}, wait=1.0 + self.timeout)
            for raw in result["events"]:
                event = Event(**raw)
                if event.uid != uid:
                    self._buffered.append(event)
                    continue
                yield event
                if event.finished:
                    return

    def _call(self, kind: MessageType, body: dict, wait: float | None = None):
        rid = next(self._ids)
        frames = protocol.encode(kind, {**body, "id": rid}, self._key)
        size = sum(len(f) for f in frames)
        if size > protocol.MAX_MESSAGE_BYTES:  # the daemon would refuse it anyway
            raise MessageTooLarge(
                f"request of {size} bytes exceeds {protocol.MAX_MESSAGE_BYTES} bytes"
            )
        self._sock.send_multipart(frames)
        wait = self.timeout if wait is None else wait
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise DaemonUnavailable(f"no reply from {self.endpoint} within {wait:.1f} s")
            frames = self._sock.recv_multipart()
            try:
                msg = protocol.decode(frames, self._key)
            except protocol.ProtocolError:
                _raise_if_refused(frames, rid)
                continue  # not for us / unreadable: keep waiting for our reply
            if msg.header.get("id") != rid:
                continue  # a late reply to a request that timed out
            if msg.type is MessageType.ERROR:
                err = msg.header.get("error") or {}
                raise error_for(str(err.get("code")), str(err.get("message")))
            return msg.header.get("result")


def _raise_if_refused(frames: list[bytes], rid: int) -> None:
    """The daemon sends `unauthorized` unsigned (we may lack its key): only that is trusted."""
    try:
        msg = protocol.decode(frames[:3])
    except protocol.ProtocolError:
        return
    err = msg.header.get("error") or {}
    refused = msg.type is MessageType.ERROR and err.get("code") == "unauthorized"
    if refused and msg.header.get("id") in (rid, None):
        raise error_for("unauthorized", str(err.get("message")))


def _load_key(key: bytes | str | Path | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return Path(key).expanduser().read_bytes().strip()
