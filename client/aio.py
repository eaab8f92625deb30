"""The asyncio client of the agentkv daemon: `Client`'s operations on pyzmq's asyncio
sockets. Pure Python; never imports MLX.

    from agentkv.client import AsyncClient
    async with AsyncClient(endpoint) as c:
        r = await c.generate("planner", "Hello", max_tokens=64)
        async for text in c.stream("coder", "Write a haiku"):
            print(text, end="")

One AsyncClient serves many concurrent turns from the tasks of one event loop: its
connection (`aio_connection`: one DEALER socket, replies matched by request id) carries
the requests, and while turns run a stepper task fetches their events (one `step` in
flight at a time, as the daemon wants) and routes each to its turn's queue by request id.
A daemon holds at most 256 unfinished turns per client: more at once raise Overloaded.
Cancelling a task that awaits `generate` or iterates `stream` (or leaving the `async for`
early) cancels the turn on the daemon. The protocol itself (messages, signing, reading
replies into results and typed errors) is `session`'s, shared with `Client`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from . import paging, session
from .aio_connection import AsyncConnection
from .base import ClientBase
from .client import GENERATE_INTERVAL_S, STREAM_INTERVAL_S
from .errors import AgentKVClientError, DaemonUnavailable, Overloaded
from .protocol import MessageType
from .session import Event, Result, Turn

STEP_WAIT_S = 1.0  # how long one `step` of the stepper may be parked at the daemon
OVERLOADED_PAUSE_S = 0.05  # before stepping again after an `overloaded` refusal


class AsyncClient(ClientBase):
    """Talks to one agentkv daemon from asyncio code; one object serves many tasks.

    Args:
        endpoint, timeout, auth_key: where the daemon is, how long to wait for a reply, and
            its auth key (see `ClientBase`).

    The handshake happens on `async with`, `connect()`, or the first request; its errors
    are `Client`'s (DaemonUnavailable, ProtocolMismatch, AuthMismatch). Every method is a
    coroutine of the loop the client was first used in.

    Raises:
        InvalidRequest: a malformed endpoint, or an auth key under 16 bytes.
    """

    def _open(self, auth_key: bytes | str | Path | None) -> None:
        """Make the connection (no I/O: the handshake waits for the first request)."""
        self._conn = AsyncConnection(self.endpoint, self.timeout, auth_key, self._late)
        self._routes: dict[int, _Route] = {}  # uid -> where its events go
        self._early: dict[int, list[Event]] = {}  # events of uids not routed yet
        self._submitting = 0  # submits sent and not answered: their events may come first
        self._abandoning = 0  # submits of cancelled tasks whose turns are not routed yet
        self._loose: asyncio.Queue[Event] = asyncio.Queue()  # events of `submit`'s turns
        self._stepper: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()  # cancels sent on behalf of cancelled tasks

    async def connect(self) -> AsyncClient:
        """Say hello (once): check the daemon's protocol version and auth; returns self."""
        self.info = await self._conn.hello()
        return self

    # -- turns -----------------------------------------------------------------------------

    async def submit(
        self, agent_id: str, prompt: str | Sequence[int] | None = None, **kwargs
    ) -> int:
        """Queue a turn (arguments as `Client.submit`); returns its request id. Its events
        come from `step`."""
        uid = await self._submit(agent_id, prompt, kwargs)
        self._route(uid, _Route(self._loose, STREAM_INTERVAL_S))
        return uid

    async def step(self, timeout: float = 1.0) -> list[Event]:
        """Events of the turns queued with `submit` since the last step, waiting up to
        `timeout` for one (turns of `generate` and `stream` are theirs alone)."""
        timeout = session.seconds(timeout, "timeout")
        out: list[Event] = []
        with contextlib.suppress(TimeoutError):
            out.append(await asyncio.wait_for(self._loose.get(), timeout))
        while not self._loose.empty():
            out.append(self._loose.get_nowait())
        return out

    async def generate(self, agent_id: str, prompt=None, **kwargs) -> Result:
        """Submit a turn and wait for it to finish (keyword arguments as `Client.submit`).

        A turn cancelled by the daemon is returned with finish_reason "cancelled";
        cancelling the awaiting task cancels the turn on the daemon.

        Raises:
            GenerationFailed: the turn finished with finish_reason "error".
        """
        uid = await self._submit(agent_id, prompt, kwargs)
        turn = Turn(uid, agent_id)
        async with contextlib.aclosing(self._events(uid, GENERATE_INTERVAL_S)) as events:
            async for event in events:
                turn.add(event)
                if event.finished:
                    return turn.result(event)
        raise AssertionError("unreachable")

    async def stream(
        self, agent_id: str, prompt=None, *, interval: float = STREAM_INTERVAL_S, **kwargs
    ) -> AsyncIterator[str]:
        """Submit a turn and yield its text as it is generated (as `Client.stream`).
        Leaving the `async for` early, or cancelling its task, cancels the turn.

        Raises:
            GenerationFailed: the turn finished with finish_reason "error".
            TurnCancelled: the turn was cancelled by someone else (`cancel`, a shutdown).
        """
        turn = None
        events = self.stream_events(agent_id, prompt, interval=interval, **kwargs)
        async with contextlib.aclosing(events):
            async for event in events:
                turn = turn or Turn(event.uid, agent_id)
                if event.text:
                    yield event.text
                turn.add(event)
                if event.finish_reason == "cancelled":
                    raise turn.cancelled(event)

    async def stream_events(
        self, agent_id: str, prompt=None, *, interval: float = STREAM_INTERVAL_S, **kwargs
    ) -> AsyncIterator[Event]:
        """Submit a turn and yield its `Event`s as they come: token ids and text, the last
        one with finish_reason, usage and (for a failed turn) error. Arguments as `stream`;
        leaving early, or cancelling the task, cancels the turn. The submit's refusals
        (InvalidRequest, Overloaded, ...) are raised by the first step of the iteration."""
        uid = await self._submit(agent_id, prompt, kwargs)
        async with contextlib.aclosing(self._events(uid, interval)) as events:
            async for event in events:
                yield event

    async def cancel(self, uid: int) -> bool:
        """Cancel a request; False if it had already finished."""
        return bool((await self._call(MessageType.CANCEL, {"uid": uid}))["cancelled"])

    # -- agents and daemon -----------------------------------------------------------------

    async def agents(self) -> list[dict]:
        """Every agent the daemon knows (in memory or in its store), fetched page by page."""
        return await self._read(paging.agents())

    async def inspect(self, agent_id: str) -> dict:
        """One agent in detail, its `token_ids` fetched page by page. Raises UnknownAgent."""
        return await self._read(paging.inspect(agent_id))

    async def _read(self, reader: paging.Reader):
        """Drive a paged reader (`paging`) to its answer."""
        request = next(reader)
        while True:
            try:
                request = reader.send(await self._call(*request))
            except StopIteration as done:
                return done.value

    async def delete(self, agent_id: str) -> None:
        """Forget an agent (memory and store), as `Client.delete`."""
        await self._call(MessageType.DELETE, {"agent_id": agent_id})

    async def fork(self, agent_id: str, new_agent_id: str) -> dict:
        """Branch an agent's context under a new id (copy-on-write: blocks are shared)."""
        body = {"agent_id": agent_id, "new_agent_id": new_agent_id}
        return await self._call(MessageType.FORK, body)

    async def stats(self) -> dict:
        """Daemon counters, pool and store use."""
        return await self._call(MessageType.STATS, {})

    async def shutdown(self, *, cancel: bool = False, wait: float | None = None) -> dict:
        """Ask the daemon to drain and exit, as `Client.shutdown`."""
        if wait is None:
            return await self._call(MessageType.SHUTDOWN, {"cancel": cancel})
        body = {"cancel": cancel, "wait": True}
        return await self._call(MessageType.SHUTDOWN, body, wait=wait)

    async def close(self) -> None:
        """Stop the stepper and the reader and close the socket; waiting calls and turns
        raise DaemonUnavailable."""
        for task in (self._stepper, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._stepper, *self._tasks):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        await self._conn.close()
        self._fail_turns(DaemonUnavailable(f"client of {self.endpoint} closed"))
        self._early.clear()

    async def __aenter__(self) -> AsyncClient:
        try:
            return await self.connect()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- turns' events ---------------------------------------------------------------------

    async def _submit(self, agent_id: str, prompt, kwargs: dict) -> int:
        body = session.submit_body(agent_id, prompt, **kwargs)
        self._submitting += 1
        self._wake.set()
        call = asyncio.ensure_future(self._call(MessageType.SUBMIT, body))
        try:
            return (await asyncio.shield(call))["uid"]
        except asyncio.CancelledError:
            # Its task was cancelled with the submit on its way: the turn is cancelled as
            # soon as its id is known (its events are dropped meanwhile).
            self._abandoning += 1
            call.add_done_callback(self._abandoned)
            raise
        finally:
            self._submitting -= 1

    def _abandoned(self, call: asyncio.Future) -> None:
        self._abandoning -= 1
        if call.cancelled() or call.exception() is not None:
            return
        uid = call.result()["uid"]
        self._route(uid, _Route(None, STREAM_INTERVAL_S))
        self._spawn(self._cancel_quietly(uid))

    def _route(self, uid: int, route: _Route) -> None:
        """Send `uid`'s events to `route` (those that came first included)."""
        self._routes[uid] = route
        for event in self._early.pop(uid, ()):
            self._deliver(event)
        if not self._unrouted():  # every submit is routed: the rest belong to no turn
            self._early.clear()
        self._wake.set()

    def _unrouted(self) -> bool:
        """Some submit's turn may not be routed yet (its events are then kept)."""
        return bool(self._submitting or self._abandoning)

    async def _events(self, uid: int, interval: float) -> AsyncIterator[Event]:
        """One turn's events; a caller that stops before its end cancels the turn."""
        route = _Route(asyncio.Queue(), session.seconds(interval, "interval"))
        self._route(uid, route)
        finished = False
        try:
            while True:
                event = await route.queue.get()
                finished = event.finished
                yield event
                if finished:
                    return
        finally:
            if not finished:
                route.queue = None  # its events are dropped from now on
                self._spawn(self._cancel_quietly(uid))

    async def _cancel_quietly(self, uid: int) -> None:
        with contextlib.suppress(AgentKVClientError):
            await self.cancel(uid)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _deliver(self, event: Event) -> None:
        route = self._routes.get(event.uid)
        if route is None:
            # Only a turn whose submit is still on its way can lack a route; the events of
            # any other (one that failed here: its steps went unanswered) are dropped.
            if self._unrouted():
                self._early.setdefault(event.uid, []).append(event)
            return
        if event.finished:
            del self._routes[event.uid]
        if route.queue is not None:
            route.queue.put_nowait(event)

    async def _step_loop(self) -> None:
        """Fetch events while turns run, routing each to its turn. One step is in flight,
        except that a turn wanting its events sooner than the parked step's interval
        sends a new one at once (the daemon then answers the older step right away)."""
        while not self._conn.closed:
            if not self._routes and not self._submitting:
                self._wake.clear()
                await self._wake.wait()
                continue
            interval = self._interval()
            step = self._spawn(self._step(interval))
            while not step.done():
                self._wake.clear()
                woken = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait((step, woken), return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if not step.done() and self._interval() < interval:
                    break

    def _interval(self) -> float:
        return min((r.interval for r in self._routes.values()), default=STREAM_INTERVAL_S)

    async def _step(self, interval: float) -> None:
        body = session.step_body(STEP_WAIT_S, interval)
        try:
            reply = await self._call(MessageType.STEP, body, wait=STEP_WAIT_S + self.timeout)
        except Overloaded:
            await asyncio.sleep(OVERLOADED_PAUSE_S)  # refused unrun: step again shortly
            return
        except AgentKVClientError as exc:
            self._fail_turns(exc)
            return
        for raw in reply["events"]:
            self._deliver(Event.from_wire(raw))

    def _fail_turns(self, exc: AgentKVClientError) -> None:
        """The daemon did not answer a step: every turn waiting for events fails."""
        for uid, route in list(self._routes.items()):
            del self._routes[uid]
            if route.queue is not None:
                route.queue.put_nowait(_failed(uid, exc))

    async def _call(self, kind: MessageType, body: dict, wait: float | None = None):
        if self._stepper is None and not self._conn.closed:
            self._stepper = asyncio.get_running_loop().create_task(self._step_loop())
        return await self._conn.call(kind, body, wait)

    def _late(self, events: list[Event]) -> None:
        for event in events:
            self._deliver(event)


class _Route:
    """Where one turn's events go: its queue (None once its caller left) and the least
    seconds between the step replies its caller wants."""

    __slots__ = ("interval", "queue")

    def __init__(self, queue: asyncio.Queue | None, interval: float) -> None:
        self.queue = queue
        self.interval = interval


def _failed(uid: int, exc: AgentKVClientError) -> Event:
    """A turn's last event when its events cannot be fetched any more."""
    error = {"code": exc.code, "message": str(exc)}
    return Event(uid, "", finish_reason="error", error=error)
