"""The daemon's two loops: socket I/O on the main thread, the engine on its own thread.

The I/O loop owns the ROUTER socket: it decodes and checks every message (size, frames,
signature, replay, session, version, agent ids), answers `hello` and protocol errors
itself, and admits the rest for the engine thread within bounds (see `admission`): what
the daemon holds per client and in total is bounded in bytes and requests, and a request
past a bound is refused with `overloaded` at once, costing the engine nothing. The engine
thread owns MLX, the engine and the pool: between batch steps it runs requests taken
round-robin per client for at most REQUEST_BUDGET_S while turns run (so no client's flood
delays a decoding agent by more than that), keeps each client's events until that client
steps, and sends replies through an inproc socket the I/O loop forwards. A client that does
not read its replies has them dropped once its socket queue is full, and its requests
refused until it reads. A bad message fails that request only. An unexpected error in an
engine step fails the requests in flight and the daemon serves on; if steps keep failing,
the engine is closed (the store flushed) and the daemon exits.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import msgpack
import zmq

from agentkv.client import protocol
from agentkv.client.protocol import MessageType, ProtocolError

from ..errors import AgentKVError
from . import admission
from .admission import FairInbox, Ledger
from .commands import CLIENT_TTL_S, CommandHandler
from .heap import freeze_startup_heap

log = logging.getLogger("agentkv.server")

OUTBOX = "inproc://agentkv-outbox"
MAX_STEP_FAILURES = 3  # unexpected step errors in a row before the engine is given up
# While turns run, requests are taken between steps for at most this long: the most any
# client's requests can add to a decoding agent's inter-token gap.
REQUEST_BUDGET_S = 0.004
IO_BATCH = 32  # messages the I/O loop takes in before it forwards replies again
# After a full batch (a flood) the I/O thread leaves the socket unread for IO_PAUSE_FACTOR
# times as long as the batch took, so it holds the GIL at most a quarter of the time.
IO_PAUSE_FACTOR = 3.0
IO_PAUSE_MAX_S = 0.015
# The I/O thread's nice value (Linux, this thread only): when the box's cores are all busy,
# the engine thread runs first (measured in the 5-minute soak: max gap 5.9x -> 4.7x median).
IO_NICE = 10
# The I/O thread hands the GIL over this often when the engine thread waits for it (the
# default 5 ms would let a flood of refusals slow every decode step).
SWITCH_INTERVAL_S = 0.0005
STALLED = "daemon overloaded: replies to this client are not read; read them, then retry"
AGENT_FIELDS = ("agent_id", "new_agent_id")
CHEAP_TYPES = frozenset((MessageType.STEP, MessageType.CANCEL))  # the inbox's first lane
# The request types whose agent ids the engine reads (others ignore such a field).
AGENT_TYPES = frozenset(
    (MessageType.SUBMIT, MessageType.INSPECT, MessageType.DELETE, MessageType.FORK)
)
_SHUTDOWN = object()


class EngineFailedError(RuntimeError):
    """Engine steps kept failing: the daemon closed the engine and shut down."""


class DaemonServer:
    """Serves one engine over ZeroMQ.

    Args:
        make_engine: builds the engine; called on the engine thread (MLX is thread-local).
        endpoint: where the ROUTER binds (ipc://... or tcp://...).
        info: static facts for `hello` and `stats` (model, fingerprint, pid, ...).
        auth_key: if set, every frame must carry a valid HMAC-SHA256 signature.
        cancel_on_shutdown: cancel in-flight turns on shutdown instead of finishing them.
        client_ttl: seconds before a silent client with nothing running is forgotten.
    """

    def __init__(
        self,
        make_engine: Callable[[], object],
        endpoint: str,
        *,
        info: dict,
        auth_key: bytes | None = None,
        cancel_on_shutdown: bool = False,
        client_ttl: float = CLIENT_TTL_S,
    ) -> None:
        self.endpoint = endpoint
        self.info = info
        self.key = auth_key
        self.cancel_on_shutdown = cancel_on_shutdown
        self.client_ttl = client_ttl
        self._make_engine = make_engine
        self._ctx = zmq.Context()
        self._inbox = FairInbox()
        self._ledger = Ledger()
        # A fresh id per daemon run: signed requests carry it, so a message captured
        # before a restart is refused after it (the replay window is in memory only).
        self.session = os.urandom(16).hex()
        self._stop_requested = False  # set by signal handlers: a plain flag, nothing to lock
        self._engine_done = threading.Event()
        self._engine_ready = threading.Event()
        self._engine_error: BaseException | None = None
        self._replay = protocol.ReplayGuard()
        # What the engine's close reported: agents whose finished turns are not on disk.
        self.shutdown_report: dict = {"unsaved": []}

    def request_shutdown(self) -> None:
        """Ask the daemon to drain and exit; safe to call from a signal handler."""
        self._stop_requested = True

    def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Bind, start the engine thread, and run the I/O loop until shutdown completes."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        router.setsockopt(zmq.MAXMSGSIZE, admission.MAX_FRAME_BYTES)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # EAGAIN instead of a silent drop when a client's queue is full: it is not reading.
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, admission.ROUTER_SNDHWM)
        router.setsockopt(zmq.RCVHWM, admission.ROUTER_RCVHWM)
        outbox = self._ctx.socket(zmq.PULL)
        # No limit at the socket, so the engine's sends never block: what it holds is bounded
        # by admission (one reply per admitted request, each under MAX_REPLY_BYTES).
        outbox.setsockopt(zmq.RCVHWM, 0)
        outbox.bind(OUTBOX)
        engine_thread = threading.Thread(target=self._engine_main, name="agentkv-engine")
        engine_thread.start()
        try:
            self._engine_ready.wait()  # the model loads on the engine thread first
            if self._engine_error is None:
                router.bind(self.endpoint)
                if ready is not None:
                    ready()
                self._io_loop(router, outbox)
        finally:
            self._stop_requested = True
            self._inbox.put_control(_SHUTDOWN)
            engine_thread.join()
            router.close(linger=1000)
            outbox.close(linger=0)
            self._ctx.term()
        if self._engine_error is not None:
            raise self._engine_error

    # -- I/O thread ------------------------------------------------------------------------

    def _io_loop(self, router: zmq.Socket, outbox: zmq.Socket) -> None:
        _lower_priority(IO_NICE)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(outbox, zmq.POLLIN)
        shutdown_sent = False
        while True:
            ready = dict(poller.poll(100))
            if outbox in ready:
                self._forward(outbox, router)
            if router in ready:
                tic = time.monotonic()
                if self._receive(router) == IO_BATCH:
                    # A flood: the engine's steps keep their pace, and the flood backs up
                    # into its senders' own queues (RCVHWM per client).
                    pause = IO_PAUSE_FACTOR * (time.monotonic() - tic)
                    self._pause(outbox, router, min(pause, IO_PAUSE_MAX_S))
            if self._stop_requested and not shutdown_sent:
                self._inbox.put_control(_SHUTDOWN)
                shutdown_sent = True
            if self._engine_done.is_set():
                self._forward(outbox, router)  # last replies (e.g. to `shutdown`)
                return

    def _pause(self, outbox: zmq.Socket, router: zmq.Socket, seconds: float) -> None:
        """Leave the router unread for `seconds`, still forwarding the engine's replies as
        they come (a streaming client's next token must not wait out the pause)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if outbox.poll(left * 1000, zmq.POLLIN):
                self._forward(outbox, router)

    def _forward(self, outbox: zmq.Socket, router: zmq.Socket) -> None:
        """Hand the engine's replies to the socket: [identity, request id, *frames]."""
        while True:
            try:
                frames = outbox.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            identity, rid, body = frames[0], msgpack.unpackb(frames[1]), frames[2:]
            self._ledger.outbox_remove(sum(len(f) for f in body))
            self._ledger.release(identity, rid)
            self._deliver(router, identity, body)

    def _deliver(self, router: zmq.Socket, identity: bytes, frames: list[bytes]) -> None:
        """Hand a reply to the socket; if the client's queue is full it does not read:
        the reply is dropped (counted) and its requests refused until one fits again."""
        msg = [identity, *frames]
        try:
            try:
                router.send_multipart(msg, zmq.NOBLOCK)
            except zmq.Again:
                # The socket learns of a reader's progress through commands it processes
                # only now and then: process them (EVENTS does) and try once more.
                router.getsockopt(zmq.EVENTS)
                router.send_multipart(msg, zmq.NOBLOCK)
        except zmq.Again:
            self._ledger.sent(identity, ok=False)
        except zmq.ZMQError:  # the client went away (EHOSTUNREACH)
            pass
        else:
            self._ledger.sent(identity, ok=True)

    def _receive(self, router: zmq.Socket) -> int:
        """Take in up to IO_BATCH messages; returns how many."""
        for n in range(IO_BATCH):  # bounded, so replies keep flowing under a flood
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return n
            identity, body = frames[0], frames[1:]
            if self._ledger.is_stalled(identity):  # not read anyway: refused unread
                self._ledger.counters["refused"] += 1
                self._send(router, identity, *protocol.error(None, "overloaded", STALLED))
                continue
            try:
                msg = self._check(body)
                self._admit(router, identity, msg, sum(len(f) for f in body))
            except _Refusal as ref:
                # The id of a refused request, so the client can match the error (oversized
                # ones too: the socket drops a peer sending a frame over MAX_FRAME_BYTES).
                rid = protocol.peek_id(body)
                kind, header = protocol.error(rid, ref.error.code, str(ref.error))
                self._send(router, identity, kind, header, signed=ref.signed)
        return IO_BATCH

    def _admit(self, router, identity: bytes, msg, nbytes: int) -> None:
        rid = msg.header.get("id")
        if msg.type is MessageType.HELLO:
            self._hello(router, identity, rid, msg.header)
            return
        if msg.type not in protocol.REQUESTS:
            raise _Refusal(ProtocolError("unknown_type", "not a request"))
        try:
            for name in AGENT_FIELDS if msg.type in AGENT_TYPES else ():
                if name in msg.header:  # refused here, before the engine sees them
                    protocol.check_agent_id(msg.header[name])
            self._ledger.admit(identity, rid, nbytes)
        except ProtocolError as exc:
            raise _Refusal(exc) from None
        self._inbox.put(identity, (msg, nbytes), 0 if msg.type in CHEAP_TYPES else 1)

    def _check(self, body: list[bytes]):
        """Decode and check a message; raises _Refusal. A refusal is signed unless the
        message's own signature was missing or wrong (the sender may lack our key)."""
        try:
            protocol.check_size(body)
            msg = protocol.decode(body, self.key)
        except ProtocolError as exc:
            raise _Refusal(exc, signed=exc.code != "unauthorized") from None
        try:
            if self.key is not None:
                self._replay.check(msg.header)
                if msg.type is not MessageType.HELLO and msg.header.get("session") != self.session:
                    raise ProtocolError(
                        "stale_session",
                        "the request names another daemon run's session: say hello again",
                    )
            rid = msg.header.get("id")
            if not isinstance(rid, (int, str)) or isinstance(rid, bool):
                raise ProtocolError("malformed", "request lacks an integer or string 'id'")
        except ProtocolError as exc:
            raise _Refusal(exc) from None
        return msg

    def _hello(self, router, identity: bytes, rid, header: dict) -> None:
        try:
            version = header.get("version")
            protocol.check_version(version)
            if self.key is not None and tuple(version) < protocol.SESSION_VERSION:
                raise ProtocolError(
                    "protocol_mismatch",
                    f"a daemon with an auth key needs protocol >= "
                    f"{'.'.join(map(str, protocol.SESSION_VERSION))} (requests bound to a "
                    f"session), the client speaks {version[0]}.{version[1]}",
                )
        except ProtocolError as exc:
            self._send(router, identity, *protocol.error(rid, exc.code, str(exc)))
            return
        result = {
            **self.info,
            "version": list(protocol.PROTOCOL_VERSION),
            "session": self.session,
        }
        self._send(router, identity, *protocol.reply(rid, result))

    def _send(self, router, identity: bytes, kind: MessageType, header: dict, signed=True) -> None:
        frames = protocol.encode(kind, header, self.key if signed else None)
        self._deliver(router, identity, frames)

    # -- engine thread ---------------------------------------------------------------------

    def _engine_main(self) -> None:
        outbox = self._ctx.socket(zmq.PUSH)
        outbox.setsockopt(zmq.SNDHWM, 0)  # the engine never blocks (bounded by admission)
        outbox.connect(OUTBOX)
        engine = None
        try:

            def send(identity: bytes, kind: MessageType, header: dict) -> None:
                frames = protocol.encode(kind, header, self.key)
                self._ledger.outbox_add(sum(len(f) for f in frames))
                rid = msgpack.packb(header.get("id"))  # releases the request's admission
                outbox.send_multipart([identity, rid, *frames])

            engine = self._make_engine()
            handler = CommandHandler(
                engine,
                send,
                {**self.info, "admission": self._ledger.counters},
                client_ttl=self.client_ttl,
                cancel_on_shutdown=self.cancel_on_shutdown,
            )
            if engine.store is not None:  # a landed write-back wakes the loop: held turns
                engine.store.on_settled(self._inbox.wake)
            log.info("start-up heap frozen: %d objects", freeze_startup_heap())
            self._engine_ready.set()
            self._engine_loop(handler)
        except AgentKVError as exc:  # a typed refusal (a bad model file, ...): the message says it
            log.error("engine thread failed: %s: %s", type(exc).__name__, exc)
            self._engine_error = exc
        except BaseException as exc:  # surfaced by serve() after the I/O loop stops
            log.exception("engine thread failed")
            self._engine_error = exc
        finally:
            if engine is not None:
                unsaved = _close_engine(engine)
                if unsaved:
                    self.shutdown_report = {"unsaved": unsaved}
            outbox.close(linger=1000)
            self._engine_ready.set()
            self._engine_done.set()

    def _engine_loop(self, handler: CommandHandler) -> None:
        draining = False
        failures = 0
        while True:
            timeout = 0.0 if handler.busy else handler.idle_wait()
            for item in self._take_requests(handler, timeout):
                if item is _SHUTDOWN:
                    draining = True
                    handler.begin_shutdown(cancel=handler.cancel_on_shutdown)
                    continue
                identity, (msg, nbytes) = item
                draining |= handler.handle(identity, msg, nbytes)
            failures = self._guarded_step(handler, failures)
            if draining and handler.drained():
                handler.finish_shutdown()
                self.shutdown_report = handler.shutdown_report
                return

    def _take_requests(self, handler: CommandHandler, timeout: float):
        """Requests round-robin per client, each run as it is taken: first the cheap lane
        (`step`, `cancel`: a streaming client's pace), then the rest; while turns run, each
        lane for at most REQUEST_BUDGET_S (the next step must not wait on a flood)."""
        for lane in range(FairInbox.LANES):
            deadline = time.monotonic() + REQUEST_BUDGET_S
            for n in range(256):
                item = self._inbox.take(timeout if (lane, n) == (0, 0) else 0.0, lane)
                if item is None:
                    break
                yield item
                if handler.busy and time.monotonic() >= deadline:
                    break

    def _guarded_step(self, handler: CommandHandler, failures: int) -> int:
        """One step; an unexpected error fails the requests in flight and serving goes on,
        unless steps keep failing (then EngineFailedError: the engine is closed)."""
        try:
            handler.run_step()
            return 0
        except Exception as exc:
            failures += 1
            log.exception("engine step failed (%d in a row); failing requests in flight", failures)
            handler.fail_all(exc)
            if failures >= MAX_STEP_FAILURES:
                raise EngineFailedError(f"{failures} engine steps failed in a row") from exc
            return failures


def _lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (Linux only: elsewhere a thread id is
    not a valid target of setpriority). Needs no privilege; best effort."""
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except OSError as exc:
        log.warning("could not lower the I/O thread's priority: %s", exc)


class _Refusal(Exception):
    """A message refused by the I/O thread; `signed` unless its signature was the fault."""

    def __init__(self, error: ProtocolError, signed: bool = True) -> None:
        super().__init__(str(error))
        self.error = error
        self.signed = signed


def _close_engine(engine) -> list[dict]:
    """Close the engine (flushing the store) whatever state it is in; returns the agents
    it could not make durable (none if closed already)."""
    try:
        return engine.close() or []
    except Exception:
        log.exception("closing the engine failed; flushing the store alone")
        store = getattr(engine, "store", None)
        if store is not None:
            store.close()
        return []
