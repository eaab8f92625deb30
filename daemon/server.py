"""The daemon's two loops: socket I/O on the main thread, the engine on its own thread.

The I/O loop owns the ROUTER socket: it decodes and checks every message (size, frames,
signature, replay, version), answers `hello` and protocol errors itself, and queues the
rest for the engine thread. The engine thread owns MLX, the engine and the pool: it runs
commands between batch steps, keeps each client's events until that client steps, and
sends replies through an inproc socket the I/O loop forwards (unbounded: the engine
thread never waits for the I/O thread). No client can stall the engine; a bad message
fails that request only. An unexpected error in an engine step fails the requests in
flight and the daemon serves on; if steps keep failing, the engine is closed (the store
flushed) and the daemon exits.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable

import zmq

from agentkv.client import protocol
from agentkv.client.protocol import MessageType, ProtocolError

from .commands import CLIENT_TTL_S, CommandHandler
from .errors import AgentKVError

log = logging.getLogger("agentkv.server")

OUTBOX = "inproc://agentkv-outbox"
MAX_STEP_FAILURES = 3  # unexpected step errors in a row before the engine is given up
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
        self._inbox: queue.Queue = queue.Queue()
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
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        router.setsockopt(zmq.MAXMSGSIZE, 4 * protocol.MAX_MESSAGE_BYTES)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        outbox = self._ctx.socket(zmq.PULL)
        outbox.setsockopt(zmq.RCVHWM, 0)  # 0: no limit, so the engine's sends never block
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
            self._inbox.put(_SHUTDOWN)
            engine_thread.join()
            router.close(linger=1000)
            outbox.close(linger=0)
            self._ctx.term()
        if self._engine_error is not None:
            raise self._engine_error

    # -- I/O thread ------------------------------------------------------------------------

    def _io_loop(self, router: zmq.Socket, outbox: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(outbox, zmq.POLLIN)
        shutdown_sent = False
        while True:
            ready = dict(poller.poll(100))
            if outbox in ready:
                self._forward(outbox, router)
            if router in ready:
                self._receive(router)
            if self._stop_requested and not shutdown_sent:
                self._inbox.put(_SHUTDOWN)
                shutdown_sent = True
            if self._engine_done.is_set():
                self._forward(outbox, router)  # last replies (e.g. to `shutdown`)
                return

    def _forward(self, outbox: zmq.Socket, router: zmq.Socket) -> None:
        while True:
            try:
                frames = outbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            with contextlib.suppress(zmq.ZMQError):  # the client went away
                router.send_multipart(frames, zmq.NOBLOCK)

    def _receive(self, router: zmq.Socket) -> None:
        for _ in range(256):  # bounded, so replies keep flowing under a flood
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, body = frames[0], frames[1:]
            try:
                msg = self._check(body)
            except ProtocolError as exc:
                # Unsigned when unauthorized: a client with no key or a wrong one can read it.
                signed = exc.code != "unauthorized"
                # The id of a refused request, so the client can match the error (oversized
                # ones too: the socket bounds what arrives at 4x the protocol's limit).
                rid = protocol.peek_id(body)
                self._send(
                    router, identity, *protocol.error(rid, exc.code, str(exc)), signed=signed
                )
                continue
            rid = msg.header.get("id")
            if msg.type is MessageType.HELLO:
                self._hello(router, identity, rid, msg.header)
            elif msg.type not in protocol.REQUESTS:
                self._send(router, identity, *protocol.error(rid, "unknown_type", "not a request"))
            else:
                self._inbox.put((identity, msg))

    def _check(self, body: list[bytes]):
        msg = protocol.decode(body, self.key)
        if self.key is not None:
            self._replay.check(msg.header)
        rid = msg.header.get("id")
        if not isinstance(rid, (int, str)) or isinstance(rid, bool):
            raise ProtocolError("malformed", "request lacks an integer or string 'id'")
        return msg

    def _hello(self, router, identity: bytes, rid, header: dict) -> None:
        try:
            protocol.check_version(header.get("version"))
        except ProtocolError as exc:
            self._send(router, identity, *protocol.error(rid, exc.code, str(exc)))
            return
        result = {**self.info, "version": list(protocol.PROTOCOL_VERSION)}
        self._send(router, identity, *protocol.reply(rid, result))

    def _send(self, router, identity: bytes, kind: MessageType, header: dict, signed=True) -> None:
        frames = protocol.encode(kind, header, self.key if signed else None)
        with contextlib.suppress(zmq.ZMQError):  # the client went away
            router.send_multipart([identity, *frames], zmq.NOBLOCK)

    # -- engine thread ---------------------------------------------------------------------

    def _engine_main(self) -> None:
        outbox = self._ctx.socket(zmq.PUSH)
        outbox.setsockopt(zmq.SNDHWM, 0)  # unbounded: replies queue, the engine never blocks
        outbox.connect(OUTBOX)
        engine = None
        try:

            def send(identity: bytes, kind: MessageType, header: dict) -> None:
                outbox.send_multipart([identity, *protocol.encode(kind, header, self.key)])

            engine = self._make_engine()
            handler = CommandHandler(
                engine,
                send,
                self.info,
                client_ttl=self.client_ttl,
                cancel_on_shutdown=self.cancel_on_shutdown,
            )
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
            for item in self._drain(timeout):
                if item is _SHUTDOWN:
                    draining = True
                    handler.begin_shutdown(cancel=handler.cancel_on_shutdown)
                    continue
                identity, msg = item
                draining |= handler.handle(identity, msg)
            failures = self._guarded_step(handler, failures)
            if draining and handler.drained():
                handler.finish_shutdown()
                self.shutdown_report = handler.shutdown_report
                return

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

    def _drain(self, timeout: float) -> list:
        items = []
        try:
            items.append(
                self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
            )
        except queue.Empty:
            return items
        while len(items) < 256:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return items


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
