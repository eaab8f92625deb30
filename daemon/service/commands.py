"""The daemon's requests, executed on the engine thread between batch steps.

Each client (ROUTER identity) gets the events of its own requests: token ids and text
deltas as they are generated, and a final event with finish_reason and usage. With a
store, the final event waits until the turn's write-back is on disk (the engine goes on
meanwhile), so a turn a client has seen finish survives a crash of the daemon. A `step`
with nothing to report is parked until something arrives or its timeout passes. A client
that stays silent for `client_ttl` with nothing running is forgotten, with any events it
never collected.

Per-request work stays small, since it delays every running turn: the requests that
only read (`agents`, `inspect`, the store's totals) are in `queries`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agentkv.client import protocol
from agentkv.client.protocol import MessageType, ProtocolError, SubmitRequest

from ..errors import AgentKVError
from .admission import MAX_REPLY_BYTES
from .engine_api import Engine
from .queries import StoreTotals, agents_page, info_dict, inspect_page, is_int

log = logging.getLogger("agentkv.commands")

MAX_STEP_WAIT_S = 30.0
MAX_STEP_INTERVAL_S = 10.0
# How often turns being tokenized on the encoder's thread are checked. Finished turns
# waiting for their write-back are not polled: the store wakes the loop (`on_settled`).
WORK_POLL_S = 0.002
DRAIN_GRACE_S = 2.0  # on shutdown, how long finished turns' events wait for their client
CLIENT_TTL_S = 300.0  # a silent client with nothing running is forgotten after this
EXPIRY_EVERY_S = 1.0
# Replies stay under admission.MAX_REPLY_BYTES: what a client that does not read can make
# the daemon hold is counted in replies of at most that size.
STEP_REPLY_BYTES = MAX_REPLY_BYTES - 64 * 1024  # events one step reply carries at most
# Turns submitted and not finished (queued or running): bounded per client and in total,
# in number and in request bytes (the prompt each holds until it is admitted).
MAX_TURNS_PER_CLIENT = 256
MAX_TURNS = 4096
MAX_TURN_BYTES_PER_CLIENT = 32 * 2**20
MAX_TURN_BYTES = 256 * 2**20


@dataclass(slots=True)
class _Client:
    events: dict[int, dict] = field(default_factory=dict)  # uid -> merged event
    parked: tuple | None = None  # (request id, deadline) of a waiting step
    interval: float = 0.0  # its step's `interval`: least seconds between answers
    answered: float = 0.0  # when its last step was answered (monotonic)
    running: int = 0  # this client's requests not finished yet
    turns: int = 0  # its turns the engine still runs (finished ones may await write-back)
    turn_bytes: int = 0  # their requests' bytes
    seen: float = field(default_factory=time.monotonic)  # its last request


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
        self.client_ttl = client_ttl
        self.cancel_on_shutdown = cancel_on_shutdown
        self.started = time.time()
        self._clients: dict[bytes, _Client] = {}
        self._owner: dict[int, tuple[bytes, str]] = {}  # uid -> (client, agent id)
        self._turn_bytes: dict[int, int] = {}  # uid -> its submit's bytes, while it runs
        self._turn_total = 0
        # (client, uid, agent id, final fields): finished turns waiting to be durable
        self._held: list[tuple[bytes, int, str, dict]] = []
        # uid -> (client, request id): submits answered once their input is tokenized
        self._unanswered: dict[int, tuple[bytes, object]] = {}
        self._closing = False
        self._shutdown_waiters: list[tuple[bytes, object]] = []  # (client, request id)
        # (client, request id, agent id): deletes answered once they are on disk
        self._held_deletes: list[tuple[bytes, object, str]] = []
        self.shutdown_report: dict = {"unsaved": []}
        self._grace_until: float | None = None
        self._next_expiry = time.monotonic() + EXPIRY_EVERY_S
        self._expired = 0
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
        deadlines = [c.parked[1] for c in self._clients.values() if c.parked]
        deadlines += [
            c.answered + c.interval for c in self._clients.values() if c.parked and c.events
        ]
        if self.engine.has_work:  # turns being tokenized
            return WORK_POLL_S
        if not deadlines:
            return 0.5
        return max(0.001, min(0.5, min(deadlines) - time.monotonic()))

    def handle(self, identity: bytes, msg, nbytes: int = 0) -> bool:
        """Run one request (`nbytes`: its size on the wire); returns True if it asked the
        daemon to shut down."""
        rid, body = msg.id, msg.body
        client = self._clients.get(identity)
        if client is not None:
            client.seen = time.monotonic()
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
        if self._held:
            self._release_durable()
        if self._held_deletes:
            self._answer_deletes()
        now = time.monotonic()
        for identity, client in list(self._clients.items()):
            if client.parked and (_due(client, now) or now >= client.parked[1]):
                self._answer_step(identity, client)
        if now >= self._next_expiry:
            self._expire_clients(now)

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
        for uid, (identity, agent_id) in list(self._owner.items()):
            self._forget_turn(uid)
            try:
                self.engine.cancel(uid)  # its "cancelled" event is not routed: no owner
            except Exception:  # the engine may be what is broken
                log.exception("could not cancel request %d", uid)
            self._deliver(identity, uid, agent_id, {"finish_reason": "error", "error": error})
        held, self._held = self._held, []
        for identity, uid, agent_id, final in held:
            self._deliver(
                identity, uid, agent_id, {**final, "finish_reason": "error", "error": error}
            )
        self.answer_parked()

    def answer_parked(self) -> None:
        """Answer every waiting step now (with whatever events there are)."""
        for identity, client in list(self._clients.items()):
            if client.parked:
                self._answer_step(identity, client)

    def drained(self) -> bool:
        """After `begin_shutdown`: True once no turn runs and every client has collected
        its finished turns' events (or `DRAIN_GRACE_S` passed waiting for it to step)."""
        if self.engine.has_work or self._held or self._held_deletes or self._unanswered:
            return False
        undelivered = any(c.events and not c.parked for c in self._clients.values())
        if not undelivered:
            return True
        now = time.monotonic()
        if self._grace_until is None:
            self._grace_until = now + DRAIN_GRACE_S
        return now >= self._grace_until

    def begin_shutdown(self, *, cancel: bool) -> None:
        """Refuse new turns; with cancel, stop the running ones too."""
        self._closing = True
        if cancel:
            for uid in list(self._owner):
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
        self._check_room(identity, nbytes)
        request = SubmitRequest.from_body(body)
        prompt = request.prompt if request.prompt is not None else request.tokens
        options = request.options.as_dict()
        if request.tools is not None:
            options["tools"] = request.tools
        uid = self.engine.submit(request.agent_id, prompt, messages=request.messages, **options)
        agent_id = request.agent_id
        self._owner[uid] = (identity, agent_id)
        client = self._clients.setdefault(identity, _Client())
        client.running += 1
        client.turns += 1
        client.turn_bytes += nbytes
        self._turn_bytes[uid] = nbytes
        self._turn_total += nbytes
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
        if uid in self._owner:
            self._forget_turn(uid)
        client = self._clients.get(identity)
        if client is not None:
            client.running -= 1
            client.events.pop(uid, None)
        self.send(identity, *protocol.error(rid, code, message))

    def _check_room(self, identity: bytes, nbytes: int) -> None:
        """Refuse (`overloaded`) a turn past the bounds on turns not finished yet."""
        client = self._clients.get(identity) or _Client()
        if client.turns >= MAX_TURNS_PER_CLIENT or len(self._owner) >= MAX_TURNS:
            why = f"{client.turns} turns of this client, {len(self._owner)} in all, not finished"
        elif client.turn_bytes + nbytes > MAX_TURN_BYTES_PER_CLIENT:
            why = f"{client.turn_bytes} bytes of this client's turns not finished"
        elif self._turn_total + nbytes > MAX_TURN_BYTES:
            why = f"{self._turn_total} bytes of turns not finished"
        else:
            return
        raise ProtocolError("overloaded", f"daemon overloaded: {why}; retry later")

    def _forget_turn(self, uid: int) -> None:
        """A turn is over (finished, failed or cancelled): it no longer counts."""
        identity, _ = self._owner.pop(uid)
        nbytes = self._turn_bytes.pop(uid, 0)
        self._turn_total -= nbytes
        client = self._clients.get(identity)
        if client is not None:
            client.turns -= 1
            client.turn_bytes -= nbytes

    def _step(self, identity: bytes, rid, h: dict) -> None:
        timeout = _seconds(h, "timeout", 1.0, math.inf)
        interval = _seconds(h, "interval", 0.0, MAX_STEP_INTERVAL_S)
        client = self._clients.get(identity)
        if client is not None and client.parked:  # one outstanding step: the older answers now
            self._answer_step(identity, client)
        client = self._clients.setdefault(identity, _Client())
        now = time.monotonic()
        client.parked = (rid, now + min(timeout, MAX_STEP_WAIT_S))
        client.interval = interval
        if timeout == 0 or _due(client, now):
            self._answer_step(identity, client)
        return None

    def _cancel(self, identity: bytes, rid, h: dict) -> dict:
        uid = h.get("uid")
        owner = self._owner.get(uid) if is_int(uid) else None
        if owner is None or owner[0] != identity:
            if is_int(uid) and self._finished_uncollected(identity, uid):
                return {"cancelled": False}  # it finished first: the race cancel() documents
            raise ProtocolError(
                "unknown_request", f"no running request {protocol.shown(uid)} of this client"
            )
        return {"cancelled": self.engine.cancel(uid)}

    def _finished_uncollected(self, identity: bytes, uid: int) -> bool:
        """The client's turn finished (its final event is held or not yet collected)."""
        client = self._clients.get(identity)
        if client is not None and "finish_reason" in client.events.get(uid, {}):
            return True
        return any(i == identity and u == uid for i, u, _, _ in self._held)

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
        self._held_deletes.append((identity, rid, agent_id))
        self._answer_deletes()
        return None

    def _answer_deletes(self) -> None:
        store = self.engine.store
        waiting = []
        for identity, rid, agent_id in self._held_deletes:
            if not store.is_settled(agent_id):
                waiting.append((identity, rid, agent_id))
                continue
            why = self.engine.finish_delete(agent_id)
            if why is None:
                self.send(identity, *protocol.reply(rid, {"deleted": True, "durable": True}))
            else:
                message = f"agent {agent_id!r} could not be deleted on disk ({why}): kept as it was"
                self.send(identity, *protocol.error(rid, "store_write", message))
        self._held_deletes = waiting

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
        stats["clients"] = len(self._clients)
        stats["expired_clients"] = self._expired
        return {**self.info, "uptime_s": round(time.time() - self.started, 3), **stats}

    # -- events ----------------------------------------------------------------------------

    def _route(self, event) -> None:
        owner = self._owner.get(event.uid)
        if owner is None:
            return
        c = event.completion
        if event.uid in self._unanswered and c is not None and c.finish_reason == "error":
            self._refuse_submit(event.uid, _known(c.error_code), c.error)
            return
        identity = owner[0]
        merged = self._clients[identity].events.setdefault(
            event.uid, _new_event(event.uid, event.agent_id)
        )
        if event.token is not None:
            merged["token_ids"].append(event.token)
        merged["text"] += event.text
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
        self._forget_turn(event.uid)
        self._held.append((identity, event.uid, event.agent_id, final))
        self._release_durable()

    def _release_durable(self) -> None:
        """Hand finished turns to their clients once their agent has nothing left to write.

        A failed write settles too (it is logged and counted by the store): the turn is
        reported, served from memory, and its agent rewritten at its next turn.
        """
        store = self.engine.store
        waiting = []
        for item in self._held:
            identity, uid, agent_id, final = item
            if store is not None and not store.is_settled(agent_id):
                waiting.append(item)
                continue
            final["durable"] = self._is_durable(agent_id)
            self._deliver(identity, uid, agent_id, final)
        self._held = waiting

    def _is_durable(self, agent_id: str) -> bool:
        """True if the agent's latest write landed (its context is on disk as it is now)."""
        store = self.engine.store
        return store is not None and store.unsaved(agent_id, self.engine.spec.fingerprint) is None

    def _deliver(self, identity: bytes, uid: int, agent_id: str, final: dict) -> None:
        """A request's last fields, for its client's next step."""
        client = self._clients.get(identity)
        if client is None:
            return
        merged = client.events.setdefault(uid, _new_event(uid, agent_id))
        merged.update(final)
        client.running -= 1

    def _answer_step(self, identity: bytes, client: _Client) -> None:
        rid, _ = client.parked
        client.parked = None
        client.answered = time.monotonic()
        events = _take_events(client.events)
        self.send(identity, *protocol.reply(rid, {"events": events}))
        if not client.running and not client.events:  # nothing more for it: forget it
            del self._clients[identity]

    def _expire_clients(self, now: float) -> None:
        """Forget clients silent for `client_ttl` with nothing running (gone, or never
        stepping): their uncollected events would otherwise be kept forever."""
        self._next_expiry = now + EXPIRY_EVERY_S
        for identity, c in list(self._clients.items()):
            if c.running or c.parked or now - c.seen < self.client_ttl:
                continue
            del self._clients[identity]
            self._expired += 1
            log.info(
                "forgot client %s: silent for %.0f s, %d finished turn(s) never collected",
                identity.hex(),
                now - c.seen,
                len(c.events),
            )


def _take_events(events: dict[int, dict]) -> list[dict]:
    """Remove and return the oldest events that fit one reply (always at least one); the
    rest wait for the next step."""
    out, size = [], 0
    for uid in list(events):
        ev = events[uid]
        # msgpack: <= 5 bytes per token id, <= 4 per character, a few hundred for the rest
        ids = len(ev["token_ids"]) + len(ev.get("context_token_ids", ()))
        cost = 512 + 5 * ids + 4 * len(ev["text"]) * (3 if "tool_calls" in ev else 1)
        if out and size + cost > STEP_REPLY_BYTES:
            break
        out.append(events.pop(uid))
        size += cost
    return out


def _due(client: _Client, now: float) -> bool:
    """A waiting step has events to return now: its `interval` since the last answer has
    passed, or a turn finished (a finish is never held back)."""
    if not client.events:
        return False
    if now - client.answered >= client.interval:
        return True
    return any("finish_reason" in e for e in client.events.values())


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


def _new_event(uid: int, agent_id: str) -> dict:
    return {"uid": uid, "agent_id": agent_id, "token_ids": [], "text": ""}


def _code(exc: AgentKVError) -> str:
    return _known(getattr(exc, "code", "internal"))


def _known(code) -> str:
    """The error code as the protocol's table knows it: others (a storage or model error's
    own code) are `internal`, the same for direct replies and error events."""
    return code if code in protocol.ERRORS else "internal"
