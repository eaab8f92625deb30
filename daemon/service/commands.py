"""The daemon's requests, executed on the engine thread between batch steps.

Each client (ROUTER identity) gets the events of its own requests: token ids and text
deltas as they are generated, and a final event with finish_reason and usage. With a
store, the final event waits until the turn's write-back is on disk (the engine goes on
meanwhile; `holds`), so a turn a client has seen finish survives a crash of the daemon. A
`step` with nothing to report is parked until something arrives or its timeout passes. A
client that stays silent for `client_ttl` with nothing running is forgotten, with any
events it never collected (each client's events, step and bounds: `mailboxes`).

Per-request work stays small, since it delays every running turn: the requests that
only read (`agents`, `inspect`, the store's totals) are in `queries`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from agentkv.client import protocol
from agentkv.client.protocol import MessageType, ProtocolError, SubmitRequest

from ..errors import AgentKVError
from .engine_api import Engine
from .holds import DurabilityHolds
from .mailboxes import (  # noqa: F401  (the bounds, importable from here as before)
    CLIENT_TTL_S,
    MAX_TURN_BYTES,
    MAX_TURN_BYTES_PER_CLIENT,
    MAX_TURNS,
    MAX_TURNS_PER_CLIENT,
    STEP_REPLY_BYTES,
    Mailboxes,
)
from .queries import StoreTotals, agents_page, info_dict, inspect_page, is_int

log = logging.getLogger("agentkv.commands")

MAX_STEP_WAIT_S = 30.0
MAX_STEP_INTERVAL_S = 10.0
# How often turns being tokenized on the encoder's thread are checked. Finished turns
# waiting for their write-back are not polled: the store wakes the loop (`on_settled`).
WORK_POLL_S = 0.002
DRAIN_GRACE_S = 2.0  # on shutdown, how long finished turns' events wait for their client


class CommandHandler:
    """Runs requests against the engine and routes its events to clients.

    Args:
        engine: the engine (owned by this thread): a BlockPoolBatchEngine, or anything
            implementing `engine_api.Engine`.
        send: sends (identity, type, header) back through the I/O thread.
        info: static daemon facts for `stats`.
        client_ttl: seconds after which a client that sent nothing and has nothing running
            is forgotten, with any finished turns' events it never collected.
        cancel_on_shutdown: every shutdown cancels running turns, whether or not the
            `shutdown` request asks for it.
    """

    def __init__(
        self,
        engine: Engine,
        send: Callable,
        info: dict,
        *,
        client_ttl: float = CLIENT_TTL_S,
        cancel_on_shutdown: bool = False,
    ) -> None:
        self.engine = engine
        self.send = send
        self.info = info
        self.cancel_on_shutdown = cancel_on_shutdown
        self.started = time.time()
        self._mail = Mailboxes(send, client_ttl)
        self._holds = DurabilityHolds(engine, self._mail, send)
        # uid -> (client, request id): submits answered once their input is tokenized
        self._unanswered: dict[int, tuple[bytes, object]] = {}
        self._closing = False
        self._shutdown_waiters: list[tuple[bytes, object]] = []  # (client, request id)
        self.shutdown_report: dict = {"unsaved": []}
        self._grace_until: float | None = None
        self._store_totals = StoreTotals()
        self._handlers = {
            MessageType.SUBMIT: self._submit,
            MessageType.STEP: self._step,
            MessageType.CANCEL: self._cancel,
            MessageType.AGENTS: self._agents,
            MessageType.INSPECT: self._inspect,
            MessageType.DELETE: self._delete,
            MessageType.FORK: self._fork,
            MessageType.STATS: self._stats,
        }

    @property
    def busy(self) -> bool:
        """True while an engine step could make progress now (turns only being tokenized
        on the encoder's thread do not count: the loop then waits, polling them)."""
        return self.engine.can_step

    def idle_wait(self) -> float:
        """How long the engine thread may block for the next request."""
        deadlines = self._mail.deadlines()
        if self.engine.has_work:  # turns being tokenized
            return WORK_POLL_S
        if not deadlines:
            return 0.5
        return max(0.001, min(0.5, min(deadlines) - time.monotonic()))

    def handle(self, identity: bytes, msg, nbytes: int = 0) -> bool:
        """Run one request (`nbytes`: its size on the wire); returns True if it asked the
        daemon to shut down."""
        rid, body = msg.id, msg.body
        self._mail.touch(identity)
        try:
            if msg.type is MessageType.SHUTDOWN:
                if body.get("wait") is True:  # answered once the store is closed
                    self._shutdown_waiters.append((identity, rid))
                else:
                    self.send(identity, *protocol.reply(rid, {"shutting_down": True}))
                cancel = self.cancel_on_shutdown or bool(body.get("cancel"))
                self.begin_shutdown(cancel=cancel)
                return True
            if msg.type is MessageType.SUBMIT:
                result = self._submit(identity, rid, body, nbytes)
            else:
                result = self._handlers[msg.type](identity, rid, body)
        except ProtocolError as exc:
            self.send(identity, *protocol.error(rid, exc.code, str(exc)))
        except AgentKVError as exc:
            self.send(identity, *protocol.error(rid, _code(exc), str(exc)))
        except Exception as exc:  # a bad request fails alone, never the loop
            log.exception("request %r failed", msg.type)
            self.send(identity, *protocol.error(rid, "internal", f"{type(exc).__name__}: {exc}"))
        else:
            if result is not None:
                self.send(identity, *protocol.reply(rid, result))
        return False

    def run_step(self) -> None:
        """One engine step, its events routed; then answer steps that can be answered."""
        if self.engine.has_work:
            for event in self.engine.step_once():
                self._route(event)
        if self._unanswered:
            self._answer_submits()
        self._holds.release()
        self._mail.answer_due()

    def fail_all(self, exc: BaseException) -> None:
        """After an unexpected error in a step: end every request in flight, and every
        finished one not yet known to be durable, with an `internal` error event (what
        became of them is unknown), and answer the steps waiting for them."""
        error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
        for uid in list(self._unanswered):  # their submits get the error, not an event
            self._refuse_submit(uid, "internal", error["message"])
            try:
                self.engine.cancel(uid)  # no owner now: its "cancelled" event is not routed
            except Exception:
                log.exception("could not cancel request %d", uid)
        for uid in self._mail.running_uids():
            turn = self._mail.forget_turn(uid)
            try:
                self.engine.cancel(uid)  # its "cancelled" event is not routed: no owner
            except Exception:  # the engine may be what is broken
                log.exception("could not cancel request %d", uid)
            failed = {"finish_reason": "error", "error": error}
            self._mail.deliver(turn.identity, uid, turn.agent_id, failed)
        self._holds.fail_turns(error)
        self.answer_parked()

    def answer_parked(self) -> None:
        """Answer every waiting step now (with whatever events there are)."""
        self._mail.answer_all()

    def drained(self) -> bool:
        """After `begin_shutdown`: True once no turn runs and every client has collected
        its finished turns' events (or `DRAIN_GRACE_S` passed waiting for it to step)."""
        if self.engine.has_work or self._holds or self._unanswered:
            return False
        if not self._mail.undelivered():
            return True
        now = time.monotonic()
        if self._grace_until is None:
            self._grace_until = now + DRAIN_GRACE_S
        return now >= self._grace_until

    def begin_shutdown(self, *, cancel: bool) -> None:
        """Refuse new turns; with cancel, stop the running ones too."""
        self._closing = True
        if cancel:
            for uid in self._mail.running_uids():
                self.engine.cancel(uid)

    def finish_shutdown(self) -> None:
        """Answer parked steps, close the engine (flushing the store), then answer the
        shutdown requests that wait for the outcome: which agents are not durable."""
        self.answer_parked()
        unsaved = self.engine.close() or []
        self.shutdown_report = {"unsaved": unsaved}
        for identity, rid in self._shutdown_waiters:
            result = {"shutting_down": True, "stopped": True, "unsaved": unsaved}
            self.send(identity, *protocol.reply(rid, result))
        self._shutdown_waiters = []

    # -- requests --------------------------------------------------------------------------

    def _submit(self, identity: bytes, rid, body: dict, nbytes: int = 0) -> dict | None:
        """Queue a turn (checked by the protocol's SubmitRequest, then by the engine)."""
        if self._closing:
            raise ProtocolError("engine_closed", "the daemon is shutting down")
        self._mail.check_room(identity, nbytes)
        request = SubmitRequest.from_body(body)
        prompt = request.prompt if request.prompt is not None else request.tokens
        options = request.options.as_dict()
        if request.tools is not None:
            options["tools"] = request.tools
        uid = self.engine.submit(request.agent_id, prompt, messages=request.messages, **options)
        self._mail.add_turn(identity, uid, request.agent_id, nbytes)
        if self.engine.is_encoding(uid):  # tokenized off this thread: answered when done
            self._unanswered[uid] = (identity, rid)
            return None
        return {"uid": uid}

    def _answer_submits(self) -> None:
        """Answer submits whose input is tokenized now (a failed one was answered with its
        error when its completion was routed)."""
        for uid, (identity, rid) in list(self._unanswered.items()):
            if not self.engine.is_encoding(uid):
                del self._unanswered[uid]
                self.send(identity, *protocol.reply(rid, {"uid": uid}))

    def _refuse_submit(self, uid: int, code: str, message: str) -> None:
        """A submit not answered yet fails: its error goes to the submit, not an event."""
        identity, rid = self._unanswered.pop(uid)
        if self._mail.owner(uid) is not None:
            self._mail.forget_turn(uid)
        self._mail.drop(identity, uid)
        self.send(identity, *protocol.error(rid, code, message))

    def _step(self, identity: bytes, rid, h: dict) -> None:
        timeout = _seconds(h, "timeout", 1.0, math.inf)
        interval = _seconds(h, "interval", 0.0, MAX_STEP_INTERVAL_S)
        self._mail.park(identity, rid, min(timeout, MAX_STEP_WAIT_S), interval)
        return None

    def _cancel(self, identity: bytes, rid, h: dict) -> dict:
        uid = h.get("uid")
        owner = self._mail.owner(uid) if is_int(uid) else None
        if owner is None or owner.identity != identity:
            if is_int(uid) and self._finished_uncollected(identity, uid):
                return {"cancelled": False}  # it finished first: the race cancel() documents
            raise ProtocolError(
                "unknown_request", f"no running request {protocol.shown(uid)} of this client"
            )
        return {"cancelled": self.engine.cancel(uid)}

    def _finished_uncollected(self, identity: bytes, uid: int) -> bool:
        """The client's turn finished (its final event is held or not yet collected)."""
        if self._mail.has_final(identity, uid):
            return True
        return self._holds.holds_turn(identity, uid)

    def _agents(self, identity: bytes, rid, h: dict) -> dict:
        return agents_page(self.engine, h)

    def _inspect(self, identity: bytes, rid, h: dict) -> dict:
        return inspect_page(self.engine, h)

    def _delete(self, identity: bytes, rid, h: dict) -> dict | None:
        """Forget an agent; with a store, answered once the delete is on disk (or failed:
        then an error, and the agent is still stored)."""
        agent_id = protocol.check_agent_id(h.get("agent_id"))
        self.engine.delete_agent(agent_id)
        self._store_totals.invalidate()  # the store's totals change once the delete lands
        if self.engine.store is None:
            return {"deleted": True, "durable": False}
        self._holds.hold_delete(identity, rid, agent_id)
        return None

    def _fork(self, identity: bytes, rid, h: dict) -> dict:
        src = protocol.check_agent_id(h.get("agent_id"))
        dst = protocol.check_agent_id(h.get("new_agent_id"))
        self.engine.fork_agent(src, dst)
        return info_dict(self.engine.agent_info(dst))

    def _stats(self, identity: bytes, rid, h: dict) -> dict:
        stats = self.engine.stats()
        if self.engine.store is not None:
            stats["store"] = self._store_totals.read(self.engine.store)
            stats["unsaved"] = self.engine.unsaved_report()
        stats["clients"] = len(self._mail)
        stats["expired_clients"] = self._mail.expired
        return {**self.info, "uptime_s": round(time.time() - self.started, 3), **stats}

    # -- events ----------------------------------------------------------------------------

    def _route(self, event) -> None:
        owner = self._mail.owner(event.uid)
        if owner is None:
            return
        c = event.completion
        if event.uid in self._unanswered and c is not None and c.finish_reason == "error":
            self._refuse_submit(event.uid, _known(c.error_code), c.error)
            return
        identity = owner.identity
        self._mail.merge(identity, event.uid, event.agent_id, event.token, event.text)
        if c is None:
            return
        final = {
            "finish_reason": c.finish_reason,
            "usage": c.usage.as_dict(),
            "context_token_ids": c.context_token_ids,
        }
        if c.error is not None:
            final["error"] = {"code": _known(c.error_code), "message": c.error}
        if c.tool_calls is not None:
            final.update(tool_calls=c.tool_calls, content=c.content)
        self._mail.forget_turn(event.uid)
        self._holds.hold_turn(identity, event.uid, event.agent_id, final)


def _seconds(h: dict, name: str, default: float, most: float) -> float:
    value = h.get(name, default)
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or math.isnan(value)
        or not 0 <= value <= most
    ):
        bounds = ">= 0" if math.isinf(most) else f"in [0, {most:g}]"
        raise ProtocolError("invalid_request", f"{name} must be a number (seconds) {bounds}")
    return float(value)


def _code(exc: AgentKVError) -> str:
    return _known(getattr(exc, "code", "internal"))


def _known(code) -> str:
    """The error code as the protocol's table knows it: others (a storage or model error's
    own code) are `internal`, the same for direct replies and error events."""
    return code if code in protocol.ERRORS else "internal"
