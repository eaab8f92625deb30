"""The daemon's requests, executed on the engine thread between batch steps.

Each client (ROUTER identity) gets the events of its own requests: token ids and text
deltas as they are generated, and a final event with finish_reason and usage. With a
store, the final event waits until the turn's write-back is on disk (the engine goes on
meanwhile), so a turn a client has seen finish survives a crash of the daemon. A `step`
with nothing to report is parked until something arrives or its timeout passes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agentkv.client import protocol
from agentkv.client.protocol import MessageType, ProtocolError

from .errors import AgentKVError, UnknownAgentError

log = logging.getLogger("agentkv.commands")

MAX_STEP_WAIT_S = 30.0
HELD_POLL_S = 0.002  # how often finished turns waiting for their write-back are checked
DRAIN_GRACE_S = 2.0  # on shutdown, how long finished turns' events wait for their client
SUBMIT_FIELDS = {
    "agent_id",
    "prompt",
    "tokens",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "id",
    "nonce",
    "ts",
}


@dataclass(slots=True)
class _Client:
    events: dict[int, dict] = field(default_factory=dict)  # uid -> merged event
    parked: tuple | None = None  # (request id, deadline) of a waiting step
    running: int = 0  # this client's requests not finished yet


class CommandHandler:
    """Runs requests against the engine and routes its events to clients.

    Args:
        engine: the BlockPoolBatchEngine (owned by this thread).
        send: sends (identity, type, header) back through the I/O thread.
        info: static daemon facts for `stats`.
    """

    def __init__(self, engine, send: Callable, info: dict) -> None:
        self.engine = engine
        self.send = send
        self.info = info
        self.started = time.time()
        self._clients: dict[bytes, _Client] = {}
        self._owner: dict[int, bytes] = {}
        # (client, uid, agent id, final fields): finished turns waiting to be durable
        self._held: list[tuple[bytes, int, str, dict]] = []
        self._closing = False
        self._grace_until: float | None = None
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
        """True while the engine has work."""
        return self.engine.has_work

    def idle_wait(self) -> float:
        """How long the engine thread may block for the next request."""
        deadlines = [c.parked[1] for c in self._clients.values() if c.parked]
        if self._held:
            return HELD_POLL_S
        if not deadlines:
            return 0.5
        return max(0.001, min(0.5, min(deadlines) - time.monotonic()))

    def handle(self, identity: bytes, msg) -> bool:
        """Run one request; returns True if it asked the daemon to shut down."""
        rid = msg.header.get("id")
        try:
            if msg.type is MessageType.SHUTDOWN:
                self.send(identity, *protocol.reply(rid, {"shutting_down": True}))
                self.begin_shutdown(cancel=bool(msg.header.get("cancel")))
                return True
            result = self._handlers[msg.type](identity, msg.header)
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
        if self._held:
            self._release_durable()
        now = time.monotonic()
        for identity, client in list(self._clients.items()):
            if client.parked and (client.events or now >= client.parked[1]):
                self._answer_step(identity, client)

    def drained(self) -> bool:
        """After `begin_shutdown`: True once no turn runs and every client has collected
        its finished turns' events (or `DRAIN_GRACE_S` passed waiting for it to step)."""
        if self.busy or self._held:
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
        """Answer parked steps, then close the engine (flushing the store)."""
        for identity, client in list(self._clients.items()):
            if client.parked:
                self._answer_step(identity, client)
        self.engine.close()

    # -- requests --------------------------------------------------------------------------

    def _submit(self, identity: bytes, h: dict) -> dict:
        if self._closing:
            raise ProtocolError("engine_closed", "the daemon is shutting down")
        unknown = set(h) - SUBMIT_FIELDS
        if unknown:
            raise ProtocolError("invalid_request", f"unknown field(s): {sorted(unknown)}")
        agent_id = protocol.check_agent_id(h.get("agent_id"))
        given = [k for k in ("prompt", "tokens", "messages") if h.get(k) is not None]
        if len(given) != 1:
            raise ProtocolError("invalid_request", "give exactly one of prompt, tokens, messages")
        uid = self.engine.submit(
            agent_id,
            h.get("prompt") if h.get("prompt") is not None else h.get("tokens"),
            max_tokens=h.get("max_tokens", 256),
            messages=h.get("messages"),
            temperature=h.get("temperature", 0.0),
            top_p=h.get("top_p", 1.0),
            top_k=h.get("top_k", 0),
            min_p=h.get("min_p", 0.0),
            seed=h.get("seed"),
            stop=h.get("stop"),
        )
        self._owner[uid] = identity
        self._clients.setdefault(identity, _Client()).running += 1
        return {"uid": uid}

    def _step(self, identity: bytes, h: dict) -> None:
        timeout = h.get("timeout", 1.0)
        if (
            not isinstance(timeout, (int, float))
            or isinstance(timeout, bool)
            or math.isnan(timeout)
            or timeout < 0
        ):
            raise ProtocolError("invalid_request", "timeout must be a number >= 0")
        client = self._clients.get(identity)
        if client is not None and client.parked:  # one outstanding step: the older answers now
            self._answer_step(identity, client)
        client = self._clients.setdefault(identity, _Client())
        client.parked = (h.get("id"), time.monotonic() + min(float(timeout), MAX_STEP_WAIT_S))
        if client.events or timeout == 0:
            self._answer_step(identity, client)
        return None

    def _cancel(self, identity: bytes, h: dict) -> dict:
        uid = h.get("uid")
        if not isinstance(uid, int) or isinstance(uid, bool) or self._owner.get(uid) != identity:
            raise ProtocolError("unknown_request", f"no running request {uid!r} of this client")
        return {"cancelled": self.engine.cancel(uid)}

    def _agents(self, identity: bytes, h: dict) -> dict:
        rows = []
        for agent_id in self.engine.agent_ids():
            try:
                rows.append(self._agent_dict(agent_id))
            except UnknownAgentError:  # listed by the store's index while its delete is queued
                continue
        return {"agents": rows}

    def _inspect(self, identity: bytes, h: dict) -> dict:
        agent_id = protocol.check_agent_id(h.get("agent_id"))
        return self._agent_dict(agent_id, detail=True)

    def _delete(self, identity: bytes, h: dict) -> dict:
        self.engine.delete_agent(protocol.check_agent_id(h.get("agent_id")))
        return {"deleted": True}

    def _fork(self, identity: bytes, h: dict) -> dict:
        src = protocol.check_agent_id(h.get("agent_id"))
        dst = protocol.check_agent_id(h.get("new_agent_id"))
        self.engine.fork_agent(src, dst)
        return self._agent_dict(dst)

    def _stats(self, identity: bytes, h: dict) -> dict:
        stats = self.engine.stats()
        if self.engine.store is not None:
            stats["store"] = self.engine.store.stats()
        return {**self.info, "uptime_s": round(time.time() - self.started, 3), **stats}

    # -- events ----------------------------------------------------------------------------

    def _route(self, event) -> None:
        identity = self._owner.get(event.uid)
        if identity is None:
            return
        merged = self._clients[identity].events.setdefault(
            event.uid, {"uid": event.uid, "agent_id": event.agent_id, "token_ids": [], "text": ""}
        )
        if event.token is not None:
            merged["token_ids"].append(event.token)
        merged["text"] += event.text
        c = event.completion
        if c is None:
            return
        final = {"finish_reason": c.finish_reason, "usage": c.usage.as_dict()}
        if c.error is not None:
            final["error"] = {"code": c.error_code or "internal", "message": c.error}
        del self._owner[event.uid]
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
            client = self._clients[identity]
            merged = client.events.setdefault(
                uid, {"uid": uid, "agent_id": agent_id, "token_ids": [], "text": ""}
            )
            merged.update(final)
            client.running -= 1
        self._held = waiting

    def _answer_step(self, identity: bytes, client: _Client) -> None:
        rid, _ = client.parked
        client.parked = None
        events, client.events = list(client.events.values()), {}
        self.send(identity, *protocol.reply(rid, {"events": events}))
        if not client.running:  # nothing more will come for it: forget it
            del self._clients[identity]

    def _agent_dict(self, agent_id: str, detail: bool = False) -> dict:
        info = self.engine.agent_info(agent_id)
        out = {k: getattr(info, k) for k in info.__slots__}
        if detail:
            out["token_ids"] = self.engine.agent_tokens(agent_id)
        return out


def _code(exc: AgentKVError) -> str:
    code = getattr(exc, "code", "internal")
    return code if code in protocol.ERRORS else "internal"
