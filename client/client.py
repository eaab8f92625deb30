"""The Python client of the agentkv daemon. Pure Python (pyzmq + msgpack); never imports MLX.

    from agentkv.client import Client
    with Client("ipc:///run/user/1000/agentkv/daemon.sock") as c:
        r = c.generate("planner", "Hello", max_tokens=64)
        print(r.text, r.usage["cached_tokens"])

A Client is not thread-safe: use one per thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import zmq

from . import paging, session
from .base import ClientBase
from .errors import DaemonUnavailable, InvalidRequest, StaleSession
from .protocol import SUBMIT_DEFAULTS, MessageType
from .session import Event, Reply, Result, Turn

MAX_LATE_STEPS = 64  # timed-out steps whose late replies are still taken in
# Least seconds between step replies: `stream` text in ~20 ms pieces (one round trip per
# token would cost the daemon decode speed at one agent), `generate` only needs the end.
STREAM_INTERVAL_S = 0.02
GENERATE_INTERVAL_S = 1.0


class Client(ClientBase):
    """Talks to one agentkv daemon.

    Args:
        endpoint, timeout, auth_key: where the daemon is, how long to wait for a reply, and
            its auth key (see `ClientBase`).

    Raises:
        DaemonUnavailable: no answer to the handshake within `timeout`.
        ProtocolMismatch: the daemon speaks another major protocol version (or, with an
            auth key, one that does not bind requests to a session).
        AuthMismatch: one side has an auth key and the other none, or the keys differ.
        InvalidRequest: a malformed endpoint, or an auth key under 16 bytes.
    """

    def _open(self, auth_key: bytes | str | Path | None) -> None:
        """Connect and handshake (the constructor's work)."""
        self._proto = session.Session(self.endpoint, auth_key)
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
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def _handshake(self) -> None:
        """`hello`: the daemon's facts, its protocol version checked, and (with a key) the
        session every signed request names."""
        self._proto.accept_hello(self._call(MessageType.HELLO, self._proto.hello_body()))
        self.info = self._proto.info

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
        tools: Sequence[dict] | None = None,
    ) -> int:
        """Queue a turn; returns its request id at once.

        `prompt` (text, or a list of token ids) is appended to the agent's context;
        `messages` is the whole chat, rendered with the model's chat template (the longest
        common token prefix with the agent's context is reused). `stop` is one stop string
        or several. `tools` (with `messages`) go to the chat template; the turn's last
        event then carries the `tool_calls` the model made, when `hello`'s `tool_calling`
        names a parser. The request is checked here first (`protocol.SubmitRequest`).

        Raises:
            InvalidRequest: a bad agent id, input or option (here, or by the daemon).
        """
        body = session.submit_body(
            agent_id,
            prompt,
            messages=messages,
            tools=tools,
            stop=stop,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
        )
        return self._call(MessageType.SUBMIT, body)["uid"]

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
        uid = self.submit(agent_id, prompt, **kwargs)
        turn = Turn(uid, agent_id)
        for event in self._events_of(uid, GENERATE_INTERVAL_S):
            turn.add(event)
            if event.finished:
                return turn.result(event)
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
        uid = self.submit(agent_id, prompt, **kwargs)
        turn = Turn(uid, agent_id)
        for event in self._events_of(uid, interval):
            if event.text:
                yield event.text
            turn.add(event)
            if event.finish_reason == "cancelled":
                raise turn.cancelled(event)

    def cancel(self, uid: int) -> bool:
        """Cancel a request; False if it had already finished."""
        return bool(self._call(MessageType.CANCEL, {"uid": uid})["cancelled"])

    # -- agents and daemon -----------------------------------------------------------------

    def agents(self) -> list[dict]:
        """Every agent the daemon knows (in memory or in its store), fetched page by page."""
        return self._read(paging.agents())

    def inspect(self, agent_id: str) -> dict:
        """One agent in detail, its `token_ids` fetched page by page. Raises UnknownAgent."""
        return self._read(paging.inspect(agent_id))

    def _read(self, reader: paging.Reader):
        """Drive a paged reader (`paging`) to its answer."""
        request = next(reader)
        while True:
            try:
                request = reader.send(self._call(*request))
            except StopIteration as done:
                return done.value

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
        body = session.step_body(timeout, interval)
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
        rid, frames = self._proto.request(kind, body)
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
            reply = self._proto.read(self._sock.recv_multipart())
            if reply is None:
                continue  # not for us / unreadable: keep waiting for our reply
            if reply.rid != rid and not reply.to_all:
                self._keep_late(reply)
                continue
            if reply.error is not None:
                raise reply.error
            return reply.result

    def _keep_late(self, reply: Reply) -> None:
        """A reply to a step that timed out still carries its events: keep them."""
        if reply.rid not in self._late_steps or reply.error is not None:
            return
        self._late_steps.remove(reply.rid)
        self._buffered.extend(reply.events())
