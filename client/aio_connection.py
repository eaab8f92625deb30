"""`AsyncClient`'s connection: one DEALER socket on pyzmq's asyncio support, a reader task
that hands each reply to the request waiting for it (matched by request id), the `hello`
handshake, and at most MAX_IN_FLIGHT requests at the daemon. The protocol itself is
`session`'s, shared with `Client`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.asyncio

from . import session
from .errors import DaemonUnavailable, InvalidRequest, StaleSession
from .protocol import MessageType
from .session import Event

# Requests other than `step` in flight at once: a daemon admits 8 per client, and the
# stepper may have two steps out (a parked one and the one that makes it answer).
MAX_IN_FLIGHT = 6


class AsyncConnection:
    """Requests and their replies over one socket, for the tasks of one event loop.

    Args:
        endpoint: the daemon's socket.
        timeout: seconds to wait for a reply (unless a call gives its own).
        auth_key: the key bytes or a key file's path (None: no authentication).
        late_events: takes the events of a `step` reply that came after its call timed out.
    """

    def __init__(
        self,
        endpoint: str,
        timeout: float,
        auth_key: bytes | str | Path | None,
        late_events: Callable[[list[Event]], None],
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.proto = session.Session(endpoint, auth_key)
        self._late_events = late_events
        self._sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            raise InvalidRequest(f"bad endpoint {endpoint!r}: {exc}") from None
        self._waiting: dict[int, asyncio.Future] = {}  # request id -> its reply
        self._late_steps: set[int] = set()
        self._hello_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._reader: asyncio.Task | None = None
        self.closed = False

    async def hello(self) -> dict:
        """Say hello once (again after `stale_session`); returns the daemon's facts."""
        async with self._hello_lock:
            if not self.proto.info:
                await self._handshake()
        return self.proto.info

    async def _handshake(self) -> None:
        info = await self._call_once(MessageType.HELLO, self.proto.hello_body(), None)
        self.proto.accept_hello(info)

    async def call(self, kind: MessageType, body: dict, wait: float | None = None):
        """Send one request and return its reply's result; raises its typed error, or
        DaemonUnavailable after `wait` (default: the timeout) without a reply."""
        if not self.proto.info:
            await self.hello()
        try:
            return await self._call_once(kind, body, wait)
        except StaleSession:
            # The daemon restarted and refused the request unrun: hello again, send again.
            async with self._hello_lock:
                await self._handshake()
            return await self._call_once(kind, body, wait)

    async def close(self) -> None:
        """Stop the reader and close the socket; waiting calls raise DaemonUnavailable."""
        self.closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        self._fail_waiting(DaemonUnavailable(f"client of {self.endpoint} closed"))
        self._sock.close(linger=0)

    async def _call_once(self, kind: MessageType, body: dict, wait: float | None):
        if self.closed:
            raise DaemonUnavailable(f"client of {self.endpoint} closed")
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        if kind is MessageType.STEP:
            return await self._exchange(kind, body, wait)
        async with self._slots:  # others wait here, not in the daemon's refusals
            return await self._exchange(kind, body, wait)

    async def _exchange(self, kind: MessageType, body: dict, wait: float | None):
        rid, frames = self.proto.request(kind, body)
        wait = self.timeout if wait is None else wait
        reply = asyncio.get_running_loop().create_future()
        self._waiting[rid] = reply
        try:
            async with asyncio.timeout(wait):
                await self._sock.send_multipart(frames)
                return await reply
        except TimeoutError:
            if kind is MessageType.STEP:
                self._late_steps.add(rid)
            raise DaemonUnavailable(f"no reply from {self.endpoint} within {wait:.1f} s") from None
        finally:
            self._waiting.pop(rid, None)

    async def _read_loop(self) -> None:
        """Hand each reply to the request that waits for it."""
        while True:
            reply = self.proto.read(await self._sock.recv_multipart())
            if reply is None:
                continue
            if reply.to_all:
                self._fail_waiting(reply.error)
                continue
            waiter = self._waiting.pop(reply.rid, None)
            if waiter is None:  # a step that timed out still carries its events
                if reply.rid in self._late_steps:
                    self._late_steps.discard(reply.rid)
                    if reply.error is None:
                        self._late_events(reply.events())
            elif not waiter.done():
                if reply.error is not None:
                    waiter.set_exception(reply.error)
                else:
                    waiter.set_result(reply.result)

    def _fail_waiting(self, exc: BaseException) -> None:
        for rid in list(self._waiting):
            waiter = self._waiting.pop(rid)
            if not waiter.done():
                waiter.set_exception(exc)
