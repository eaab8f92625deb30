"""Each client's mailbox on the engine thread: the events of its turns, merged until it
steps; its one waiting (`parked`) step; and what its unfinished turns hold, counted per
client and in total and bounded (past a bound a submit is refused `overloaded`).

A mailbox exists while its client has a turn running, events not collected or a step
waiting, and is forgotten once it has none of these after an answered step, or after
`client_ttl` of silence with nothing running (its uncollected events with it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agentkv.client import protocol
from agentkv.client.protocol import ProtocolError

from .admission import MAX_REPLY_BYTES

log = logging.getLogger("agentkv.commands")  # the command layer's log, as before the split

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


@dataclass(slots=True, frozen=True)
class Turn:
    """Who a running turn belongs to, and the bytes its request holds."""

    identity: bytes
    agent_id: str
    nbytes: int


class Mailboxes:
    """The clients' mailboxes and the turns each owns (see the module docstring).

    Args:
        send: sends (identity, type, header) back through the I/O thread.
        client_ttl: seconds after which a client that sent nothing and has nothing running
            is forgotten.
    """

    def __init__(self, send: Callable, client_ttl: float = CLIENT_TTL_S) -> None:
        self.send = send
        self.client_ttl = client_ttl
        self.expired = 0  # clients forgotten for silence
        self._clients: dict[bytes, _Client] = {}
        self._turns: dict[int, Turn] = {}  # uid -> its owner, while the engine runs it
        self._turn_total = 0
        self._next_expiry = time.monotonic() + EXPIRY_EVERY_S

    def __len__(self) -> int:
        return len(self._clients)

    # -- turns -----------------------------------------------------------------------------

    def owner(self, uid) -> Turn | None:
        """The running turn `uid` (None when it is not running or unknown)."""
        return self._turns.get(uid)

    def running_uids(self) -> list[int]:
        """The turns the engine still runs."""
        return list(self._turns)

    def check_room(self, identity: bytes, nbytes: int) -> None:
        """Refuse (`overloaded`) a turn past the bounds on turns not finished yet."""
        client = self._clients.get(identity) or _Client()
        if client.turns >= MAX_TURNS_PER_CLIENT or len(self._turns) >= MAX_TURNS:
            why = f"{client.turns} turns of this client, {len(self._turns)} in all, not finished"
        elif client.turn_bytes + nbytes > MAX_TURN_BYTES_PER_CLIENT:
            why = f"{client.turn_bytes} bytes of this client's turns not finished"
        elif self._turn_total + nbytes > MAX_TURN_BYTES:
            why = f"{self._turn_total} bytes of turns not finished"
        else:
            return
        raise ProtocolError("overloaded", f"daemon overloaded: {why}; retry later")

    def add_turn(self, identity: bytes, uid: int, agent_id: str, nbytes: int) -> None:
        """A submitted turn: it counts until `forget_turn`, its request until delivered."""
        self._turns[uid] = Turn(identity, agent_id, nbytes)
        client = self._clients.setdefault(identity, _Client())
        client.running += 1
        client.turns += 1
        client.turn_bytes += nbytes
        self._turn_total += nbytes

    def forget_turn(self, uid: int) -> Turn:
        """A turn is over (finished, failed or cancelled): it no longer counts."""
        turn = self._turns.pop(uid)
        self._turn_total -= turn.nbytes
        client = self._clients.get(turn.identity)
        if client is not None:
            client.turns -= 1
            client.turn_bytes -= turn.nbytes
        return turn

    # -- events ----------------------------------------------------------------------------

    def merge(self, identity: bytes, uid: int, agent_id: str, token, text: str) -> None:
        """One generated token (or None) and its text, into the turn's pending event."""
        merged = self._clients[identity].events.setdefault(uid, _new_event(uid, agent_id))
        if token is not None:
            merged["token_ids"].append(token)
        merged["text"] += text

    def deliver(self, identity: bytes, uid: int, agent_id: str, final: dict) -> None:
        """A request's last fields, for its client's next step."""
        client = self._clients.get(identity)
        if client is None:
            return
        merged = client.events.setdefault(uid, _new_event(uid, agent_id))
        merged.update(final)
        client.running -= 1

    def drop(self, identity: bytes, uid: int) -> None:
        """A request that ends with a direct error reply: no event for it."""
        client = self._clients.get(identity)
        if client is not None:
            client.running -= 1
            client.events.pop(uid, None)

    def has_final(self, identity: bytes, uid: int) -> bool:
        """The client's turn `uid` finished and its final event is not collected yet."""
        client = self._clients.get(identity)
        return client is not None and "finish_reason" in client.events.get(uid, {})

    def undelivered(self) -> bool:
        """Some client has events and no step waiting to take them."""
        return any(c.events and not c.parked for c in self._clients.values())

    # -- steps -----------------------------------------------------------------------------

    def touch(self, identity: bytes) -> None:
        """The client sent a request: it is not silent."""
        client = self._clients.get(identity)
        if client is not None:
            client.seen = time.monotonic()

    def park(self, identity: bytes, rid, timeout: float, interval: float) -> None:
        """A `step`: answered when it has events to return (`_due`) or at its deadline;
        a client has one step waiting at most, so an older one is answered now."""
        client = self._clients.get(identity)
        if client is not None and client.parked:
            self._answer(identity, client)
        client = self._clients.setdefault(identity, _Client())
        now = time.monotonic()
        client.parked = (rid, now + timeout)
        client.interval = interval
        if timeout == 0 or _due(client, now):
            self._answer(identity, client)

    def deadlines(self) -> list[float]:
        """When waiting steps are answered at the latest, or may return events next."""
        out = [c.parked[1] for c in self._clients.values() if c.parked]
        out += [c.answered + c.interval for c in self._clients.values() if c.parked and c.events]
        return out

    def answer_due(self) -> None:
        """Answer the steps that can be answered now; forget clients silent too long."""
        now = time.monotonic()
        for identity, client in list(self._clients.items()):
            if client.parked and (_due(client, now) or now >= client.parked[1]):
                self._answer(identity, client)
        if now >= self._next_expiry:
            self._expire(now)

    def answer_all(self) -> None:
        """Answer every waiting step now (with whatever events there are)."""
        for identity, client in list(self._clients.items()):
            if client.parked:
                self._answer(identity, client)

    def _answer(self, identity: bytes, client: _Client) -> None:
        rid, _ = client.parked
        client.parked = None
        client.answered = time.monotonic()
        events = _take_events(client.events)
        self.send(identity, *protocol.reply(rid, {"events": events}))
        if not client.running and not client.events:  # nothing more for it: forget it
            del self._clients[identity]

    def _expire(self, now: float) -> None:
        """Forget clients silent for `client_ttl` with nothing running (gone, or never
        stepping): their uncollected events would otherwise be kept forever."""
        self._next_expiry = now + EXPIRY_EVERY_S
        for identity, c in list(self._clients.items()):
            if c.running or c.parked or now - c.seen < self.client_ttl:
                continue
            del self._clients[identity]
            self.expired += 1
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


def _new_event(uid: int, agent_id: str) -> dict:
    return {"uid": uid, "agent_id": agent_id, "token_ids": [], "text": ""}
