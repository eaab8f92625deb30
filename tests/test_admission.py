"""The daemon's admission bookkeeping and fair inbox as plain structures (no model, no
sockets): every bound refuses with `overloaded` and keeps nothing; a client's flood waits
behind its own requests only."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest

from agentkv.client import protocol
from agentkv.client.protocol import MAGIC, ProtocolError
from agentkv.daemon.service import admission
from agentkv.daemon.service.admission import FairInbox, Ledger


def _refused(fn, *args) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    return info.value.code


def test_a_client_has_a_bounded_number_of_requests_in_flight():
    ledger = Ledger()
    for rid in range(admission.PEER_MAX_PENDING):
        ledger.admit(b"a", rid, 100)
    assert _refused(ledger.admit, b"a", 99, 100) == "overloaded"
    ledger.admit(b"b", 1, 100)  # another client is not affected
    ledger.release(b"a", 0)
    ledger.admit(b"a", 99, 100)  # a reply went out: room again
    assert _refused(ledger.admit, b"a", 5, 100) == "invalid_request"  # still in flight


def test_bytes_in_flight_are_bounded_per_client_and_in_total():
    ledger = Ledger()
    ledger.admit(b"a", 1, admission.PEER_MAX_BYTES)
    assert _refused(ledger.admit, b"a", 2, 1) == "overloaded"
    big = protocol.MAX_MESSAGE_BYTES
    clients = [bytes([i]) for i in range(admission.TOTAL_MAX_BYTES // big + 1)]
    refused = 0
    for c in clients:
        try:
            ledger.admit(b"x" + c, 1, big)
        except ProtocolError:
            refused += 1
    assert refused >= 1 and ledger.total_bytes <= admission.TOTAL_MAX_BYTES
    for c in clients:
        ledger.release(b"x" + c, 1)
    ledger.release(b"a", 1)
    assert ledger.total_bytes == 0 and ledger.peers == {}  # nothing kept once answered


def test_a_client_that_does_not_read_is_refused_until_a_reply_fits():
    ledger = Ledger()
    ledger.admit(b"a", 1, 10)
    ledger.release(b"a", 1)
    ledger.sent(b"a", ok=False)  # its queue was full: dropped
    assert ledger.is_stalled(b"a") and ledger.counters["dropped_replies"] == 1
    assert _refused(ledger.admit, b"a", 2, 10) == "overloaded"
    ledger.sent(b"a", ok=True)  # a reply fitted: it reads again
    assert not ledger.is_stalled(b"a") and ledger.peers == {}
    ledger.admit(b"a", 2, 10)


def test_the_number_of_clients_in_flight_is_bounded(monkeypatch):
    monkeypatch.setattr(admission, "MAX_PEERS", 3)
    ledger = Ledger()
    for c in (b"a", b"b", b"c"):
        ledger.admit(c, 1, 10)
    assert _refused(ledger.admit, b"d", 1, 10) == "overloaded"
    assert set(ledger.peers) == {b"a", b"b", b"c"}  # the refused newcomer left nothing
    ledger.release(b"a", 1)
    ledger.admit(b"d", 1, 10)


def test_the_inbox_serves_clients_round_robin_and_steps_first():
    inbox = FairInbox()
    for i in range(100):
        inbox.put(b"flood", ("stats", i))
    inbox.put(b"calm", ("stats", 0))
    inbox.put(b"calm", ("step", 0), lane=0)
    assert inbox.take(0.0, 0) == (b"calm", ("step", 0))
    assert inbox.take(0.0, 0) is None
    first = [inbox.take(0.0, 1)[0] for _ in range(2)]
    assert first == [b"flood", b"calm"]  # one flood request, then the other client's
    inbox.put_control("shutdown")
    assert inbox.take(0.0, 1) == "shutdown"


def test_peek_id_skips_large_fields():
    header = msgpack.packb({"agent_id": "x" * (2 * 2**20), 7: 1, "id": 77})
    assert protocol.peek_id([MAGIC, b"stats", header]) == 77
    first = msgpack.packb({"id": "r5", "agent_id": "x" * (2 * 2**20)})
    assert protocol.peek_id([MAGIC, b"stats", first]) == "r5"
    nested = msgpack.packb({"a": [1.5, None, {"b": b"z" * 70_000}], "e": -(2**40), "id": 9})
    assert protocol.peek_id([MAGIC, b"stats", nested]) == 9
    assert protocol.peek_id([MAGIC, b"stats", msgpack.packb({"id": True})]) is None
    assert protocol.peek_id([MAGIC, b"stats", b"\x91" * 5000]) is None


def test_requests_other_than_submit_are_refused_over_64_kib():
    small = [MAGIC, b"stats", b"x" * (protocol.MAX_SMALL_REQUEST_BYTES + 1)]
    assert _refused(protocol.check_size, small) == "too_large"
    protocol.check_size([MAGIC, b"submit", b"x" * (protocol.MAX_SMALL_REQUEST_BYTES + 1)])


def test_peer_values_in_error_messages_are_bounded():
    """What a peer sent shows in an error message cut short, whatever its size or type."""
    huge = [
        "x" * 2_000_000,
        b"\x00" * 2_000_000,
        list(range(100_000)),
        {"role": "b" * 1_000_000},
        10**5000,
    ]
    for value in huge:
        assert len(protocol.shown(value)) <= 80, type(value)
    assert protocol.shown("agent-7") == "'agent-7'"
    assert protocol.shown(42) == "42"
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.check_agent_id("y" * 2_000_000)
    assert len(str(err.value)) < 300


def test_a_wake_ends_the_inbox_wait_and_is_never_lost():
    """`wake` (a store write landed) ends a waiting `take` with nothing taken; a wake that
    comes before the take makes that take not wait at all."""
    inbox = FairInbox()
    inbox.wake()
    tic = time.monotonic()
    assert inbox.take(30.0, 0) is None  # woken before it waited
    waker = threading.Timer(0.2, inbox.wake)
    waker.start()
    assert inbox.take(30.0, 0) is None
    assert time.monotonic() - tic < 20.0  # far from the 2 x 30 s of two full waits
    waker.join()
    inbox.put(b"c", "request", 0)
    assert inbox.take(30.0, 0) == (b"c", "request")
