"""What the daemon holds for its clients, bounded: admission on the I/O thread, and the
engine thread's inbox served round-robin per client.

Every request the I/O thread accepts is counted against its client (ROUTER identity)
until the reply to it has been handed to the socket: at most PEER_MAX_PENDING requests
and PEER_MAX_BYTES bytes per client, TOTAL_MAX_BYTES for all, and replies waiting in the
engine's outbox at most OUTBOX_MAX_BYTES. A request past a bound is refused at once with
`overloaded` (nothing queued, no engine work). Replies handed to the socket are bounded by
the socket's per-client queue (ROUTER_SNDHWM messages, each under MAX_REPLY_BYTES): when
it is full the client is not reading, its replies are dropped (counted) and its requests
refused until a reply fits again. At most MAX_PEERS clients have requests in flight.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from agentkv.client import protocol
from agentkv.client.protocol import ProtocolError

MAX_PEERS = 256  # clients with requests in flight (or replies dropped) at once
PEER_MAX_PENDING = 8  # requests in flight per client (a Client has one, plus a step)
PEER_MAX_BYTES = protocol.MAX_MESSAGE_BYTES + 2**20  # request bytes in flight per client
TOTAL_MAX_BYTES = 64 * 2**20  # request bytes in flight, all clients
OUTBOX_MAX_BYTES = 64 * 2**20  # replies made by the engine, not yet handed to the socket
MAX_REPLY_BYTES = 2**20  # the engine's replies stay under this (pages, step events)
ROUTER_SNDHWM = 16  # replies queued per client in the socket before it counts as stalled
ROUTER_RCVHWM = 8  # messages queued per client in the socket before it stops reading it
# A frame larger than this makes the socket drop that connection (ZeroMQ's MAXMSGSIZE is
# per frame); a little over MAX_MESSAGE_BYTES, so a slightly oversized request still gets
# its `too_large` reply.
MAX_FRAME_BYTES = protocol.MAX_MESSAGE_BYTES + 64 * 1024


@dataclass(slots=True)
class Peer:
    """One client's requests in flight and whether it reads its replies."""

    pending: dict = field(default_factory=dict)  # request id -> request bytes
    nbytes: int = 0
    stalled: bool = False  # a reply to it did not fit its socket queue
    dropped: int = 0  # replies dropped since it stalled
    seen: float = field(default_factory=time.monotonic)


class Ledger:
    """Admission bookkeeping; owned by the I/O thread (only `outbox_bytes` is shared)."""

    def __init__(self) -> None:
        self.peers: dict[bytes, Peer] = {}
        self.total_bytes = 0
        self._outbox_lock = threading.Lock()
        self._outbox_bytes = 0
        # Live counters, read by `stats` on the engine thread (fixed keys: safe to read).
        self.counters = {"refused": 0, "dropped_replies": 0, "clients_in_flight": 0}

    def admit(self, identity: bytes, rid, nbytes: int) -> None:
        """Count a request in, or raise ProtocolError (`overloaded`, or `invalid_request`
        for a request id already in flight) without keeping anything."""
        peer = self.peers.get(identity)
        if peer is None:  # kept only once admitted: a refused newcomer leaves nothing
            if len(self.peers) >= MAX_PEERS and not self._evict_one():
                self._refuse(f"{MAX_PEERS} clients have requests in flight")
            peer = Peer()
        peer.seen = time.monotonic()
        if peer.stalled:
            self._refuse(f"replies to this client are not read ({peer.dropped} dropped)")
        if rid in peer.pending:
            raise ProtocolError(
                "invalid_request", f"request id {protocol.shown(rid)} is still in flight"
            )
        if len(peer.pending) >= PEER_MAX_PENDING:
            self._refuse(f"this client has {PEER_MAX_PENDING} requests in flight")
        if peer.nbytes + nbytes > PEER_MAX_BYTES:
            self._refuse(f"this client has {peer.nbytes} bytes of requests in flight")
        if self.total_bytes + nbytes > TOTAL_MAX_BYTES:
            self._refuse(f"{self.total_bytes} bytes of requests in flight")
        if self._outbox_bytes > OUTBOX_MAX_BYTES:
            self._refuse(f"{self._outbox_bytes} bytes of replies not yet sent")
        peer.pending[rid] = nbytes
        peer.nbytes += nbytes
        self.total_bytes += nbytes
        if self.peers.setdefault(identity, peer) is peer:
            self.counters["clients_in_flight"] = len(self.peers)

    def release(self, identity: bytes, rid) -> None:
        """The reply to `rid` left the engine: its request no longer counts."""
        peer = self.peers.get(identity)
        nbytes = peer.pending.pop(rid, None) if peer is not None else None
        if nbytes is None:
            return
        peer.nbytes -= nbytes
        self.total_bytes -= nbytes
        self._forget_if_idle(identity, peer)

    def sent(self, identity: bytes, ok: bool) -> None:
        """A reply to `identity` was handed to the socket (ok) or dropped: its queue is
        full (stalled until a reply fits again)."""
        peer = self.peers.get(identity)
        if ok:
            if peer is not None and peer.stalled:
                peer.stalled, peer.dropped = False, 0
                self._forget_if_idle(identity, peer)
            return
        self.counters["dropped_replies"] += 1
        if peer is None:
            if len(self.peers) >= MAX_PEERS and not self._evict_one():
                return
            peer = self.peers[identity] = Peer()
        peer.stalled = True
        peer.dropped += 1
        self.counters["clients_in_flight"] = len(self.peers)

    def is_stalled(self, identity: bytes) -> bool:
        """True while replies to this client do not fit its socket queue."""
        peer = self.peers.get(identity)
        return peer is not None and peer.stalled

    def outbox_add(self, nbytes: int) -> None:
        """The engine thread queued a reply of `nbytes` (thread-safe)."""
        with self._outbox_lock:
            self._outbox_bytes += nbytes

    def outbox_remove(self, nbytes: int) -> None:
        """The I/O thread took a reply of `nbytes` off the outbox (thread-safe)."""
        with self._outbox_lock:
            self._outbox_bytes -= nbytes

    def _evict_one(self) -> bool:
        """Forget the stalled client with nothing in flight seen longest ago, if any."""
        idle = [(p.seen, i) for i, p in self.peers.items() if not p.pending]
        if not idle:
            return False
        del self.peers[min(idle)[1]]
        return True

    def _forget_if_idle(self, identity: bytes, peer: Peer) -> None:
        if not peer.pending and not peer.stalled:
            del self.peers[identity]
            self.counters["clients_in_flight"] = len(self.peers)

    def _refuse(self, why: str) -> None:
        self.counters["refused"] += 1
        raise ProtocolError("overloaded", f"daemon overloaded: {why}; retry later")


class FairInbox:
    """Requests for the engine thread: one queue per client and lane, served round-robin,
    so a client's flood waits behind its own requests only. Lane 0 is for the cheap
    requests a streaming client's pace depends on (`step`, `cancel`), lane 1 for the rest;
    control items (the shutdown sentinel) come before both. `wake` ends a `take`'s wait
    with nothing taken (the store landed a write: held turns may be released)."""

    LANES = 2

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._lanes: list[OrderedDict[bytes, deque]] = [OrderedDict() for _ in range(self.LANES)]
        self._control: deque = deque()
        self._woken = False  # a wake not yet seen by a take: the next one does not wait

    def put(self, identity: bytes, item, lane: int = 1) -> None:
        """Queue a client's request (I/O thread)."""
        queues = self._lanes[lane]
        with self._cond:
            q = queues.get(identity)
            if q is None:
                q = queues[identity] = deque()
            q.append(item)
            self._cond.notify()

    def put_control(self, item) -> None:
        """Queue a control item (the shutdown sentinel), served before any request."""
        with self._cond:
            self._control.append(item)
            self._cond.notify()

    def wake(self) -> None:
        """End the current (or next) `take`'s wait, from any thread."""
        with self._cond:
            self._woken = True
            self._cond.notify()

    def take(self, timeout: float, lane: int):
        """The next item of `lane` (or a control item): (identity, request) of the next
        client in turn; None if nothing came within `timeout` seconds (for any lane), or
        on a `wake`."""
        with self._cond:
            if timeout > 0 and not (self._woken or self._control or any(self._lanes)):
                self._cond.wait(timeout)
            self._woken = False
            if self._control:
                return self._control.popleft()
            queues = self._lanes[lane]
            if not queues:
                return None
            identity, q = next(iter(queues.items()))
            item = q.popleft()
            if q:
                queues.move_to_end(identity)
            else:
                del queues[identity]
            return identity, item
