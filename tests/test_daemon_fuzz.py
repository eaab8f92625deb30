"""Hostile input over a raw ZeroMQ DEALER: the daemon answers every malformed message with
an error (echoing the request id when it could read one), stays up, and serves a valid
request afterwards.

CI sends 5,000 seeded frames; more with ``AGENTKV_FUZZ_FRAMES=N`` (``AGENTKV_FULL=1``: 50,000).
"""

from __future__ import annotations

import itertools
import math
import os

import msgpack
import numpy as np
import pytest
import zmq
import zmq.utils.monitor
from refs import FULL

from agentkv.client import protocol
from agentkv.client.protocol import MAGIC, MAX_MESSAGE_BYTES

FRAMES = int(os.environ.get("AGENTKV_FUZZ_FRAMES", 50_000 if FULL else 5_000))
NO_ID = object()  # a message whose id the daemon cannot read

# Per request type: a valid header, and bad values for its fields (NO_FIELD: left out).
NO_FIELD = object()
BAD_AGENT_IDS = [NO_FIELD, None, 5, "", "-x", "a b", "a/b", "x" * 200, ["a"], b"raw", {"a": 1}]
VALID = {
    "submit": {"agent_id": "fuzz-agent", "tokens": [5, 6, 7], "max_tokens": 2},
    "inspect": {"agent_id": "fuzz-agent"},
    "delete": {"agent_id": "fuzz-agent"},
    "fork": {"agent_id": "fuzz-agent", "new_agent_id": "fuzz-fork"},
    "cancel": {"uid": 0},
    "step": {"timeout": 0.0},
    "hello": {"version": list(protocol.PROTOCOL_VERSION)},
}
BAD = {
    "submit": {
        "agent_id": BAD_AGENT_IDS,
        "tokens": [[], ["a"], [-1], [10**9], [1.5], [True], "text", 7, {"t": 1}, [[1]]],
        "prompt": ["", 9, [None], {"p": 1}],
        "max_tokens": [0, -1, "8", 1.5, True, None, 2**40, [4]],
        "temperature": [-1.0, "hot", math.nan, math.inf, [0.5]],
        "top_p": [0.0, 1.5, -0.2, "x", math.nan],
        "top_k": [-1, 1.5, "k", True],
        "min_p": [1.0, -0.1, "p", math.inf],
        "seed": [-1, 2**64 - 1, "s", 1.5, [1]],
        "stop": [5, [5], [None], {"s": 1}, [""]],
        "messages": [[], "chat", [5], [{"role": 1, "content": "x"}], [{"role": "user"}]],
        "bogus_field": [1, "x"],
    },
    "inspect": {"agent_id": [*BAD_AGENT_IDS, "unknown-agent"]},
    "delete": {"agent_id": [*BAD_AGENT_IDS, "unknown-agent"]},
    "fork": {
        "agent_id": [*BAD_AGENT_IDS, "unknown-agent"],
        "new_agent_id": [*BAD_AGENT_IDS, "fuzz-agent"],  # the source itself: exists already
    },
    "cancel": {"uid": [NO_FIELD, None, "0", -5, 10**12, True, 1.5, [0]]},
    "step": {"timeout": [-1, -0.5, "soon", math.nan, [1], True, None]},
    "hello": {"version": [NO_FIELD, None, "1.0", [2, 0], [0, 9], [1], [1, 0, 0], ["1", "0"]]},
}
BAD_IDS = [NO_FIELD, None, 1.5, True, [1], {"a": 1}, b"raw"]
TYPES = [*BAD, "agents", "stats", "shutdown"]
_checks = itertools.count()


@pytest.fixture(scope="module")
def daemon(daemon_factory):
    d = daemon_factory(args=("--block-size", "16", "--pool-blocks", "64"))
    d.start()
    with d.client() as c:  # the agent the valid-looking headers name
        c.generate("fuzz-agent", [3, 4, 5, 6], max_tokens=4)
    return d


@pytest.fixture
def dealer(daemon):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.socket)
    yield sock
    sock.close(linger=0)


def test_fuzzed_frames_each_get_an_error_and_the_daemon_serves_on(daemon, dealer):
    """Random bytes, wrong frame counts, bad magic, unknown types, bad msgpack, headers that
    are not maps, bad or missing ids, and every request type with wrong field types: each
    gets an error reply with a code from the table; none is an internal error."""
    rng = np.random.default_rng(0)
    codes: dict[str, int] = {}
    inputs: dict[str, int] = {}  # submits with one of prompt/tokens/messages, by which
    for i in range(FRAMES):
        frames, rid = _fuzz_frames(rng, i)
        dealer.send_multipart(frames)
        reply = _reply(dealer, timeout=5.0)
        assert reply is not None, f"no reply to {frames!r}"
        assert reply.type is protocol.MessageType.ERROR, (frames, reply.header)
        code = reply.header["error"]["code"]
        assert code in protocol.ERRORS and code != "internal", (frames, reply.header)
        if rid is not NO_ID:
            assert reply.header["id"] == rid, (frames, reply.header)
        given = _one_input(frames)
        if given is not None:  # its own checks ran, not the "exactly one" rule
            assert "exactly one" not in reply.header["error"]["message"], (frames, reply.header)
            inputs[given] = inputs.get(given, 0) + 1
        codes[code] = codes.get(code, 0) + 1
    # The mix reached every layer: framing, decoding, the I/O thread and the engine thread.
    for code in ("malformed", "unknown_type", "invalid_request", "unknown_agent"):
        assert codes.get(code, 0) > 0, codes
    assert min(inputs.get(k, 0) for k in ("prompt", "tokens", "messages")) >= FRAMES // 500, inputs
    print("error codes:", codes, "single-input submits:", inputs)
    _assert_serves(daemon)
    assert "Traceback" not in daemon.log()


def test_oversized_messages_are_refused_with_their_id(daemon, dealer):
    """Over MAX_MESSAGE_BYTES: `too_large`, with the request id when the header has one."""
    header = msgpack.packb({"id": 77, "agent_id": "big", "prompt": "x" * (MAX_MESSAGE_BYTES + 1)})
    for frames, rid in (
        ([MAGIC, b"submit", header], 77),
        ([MAGIC, b"stats", msgpack.packb({"id": 78}), b"\0" * MAX_MESSAGE_BYTES], 78),
        ([os.urandom(MAX_MESSAGE_BYTES + 10)], None),
    ):
        dealer.send_multipart(frames)
        reply = _reply(dealer, timeout=10.0)
        assert reply is not None and reply.header["error"]["code"] == "too_large"
        assert reply.header["id"] == rid
    _assert_serves(daemon)


def test_a_message_over_the_socket_limit_drops_that_peer_only(daemon):
    """Beyond what the socket accepts at all (a frame a little over the protocol's limit)
    the daemon cannot answer: it drops that connection and serves everyone else."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, -1)  # once dropped, stay dropped
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    sock.connect(daemon.socket)
    try:
        assert _next_event(monitor, 10.0) == zmq.EVENT_CONNECTED
        sock.send_multipart([MAGIC, b"stats", b"\0" * (4 * MAX_MESSAGE_BYTES + 1)])
        assert _next_event(monitor, 10.0) == zmq.EVENT_DISCONNECTED  # the daemon hung up
        with pytest.raises(zmq.Again):  # no connection left to send a request on
            sock.send_multipart([MAGIC, b"stats", msgpack.packb({"id": 1})], zmq.NOBLOCK)
        _assert_serves(daemon)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


def test_a_flood_without_reading_replies_does_not_stall_others(daemon):
    """A client that sends thousands of requests and never reads: others are served."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.socket)
    try:
        for i in range(3000):
            sock.send_multipart([MAGIC, b"stats", msgpack.packb({"id": i})])
        _assert_serves(daemon)
    finally:
        sock.close(linger=0)


# -- helpers ---------------------------------------------------------------------------


def _assert_serves(daemon) -> None:
    """The same daemon process answers a valid request."""
    assert daemon.alive()
    with daemon.client(timeout=10.0) as c:
        assert c.stats()["pid"] == daemon.pid
        agent = f"after-{next(_checks)}"
        r = c.generate(agent, [7, 8, 9], max_tokens=3)
        assert r.finish_reason in ("length", "stop") and r.usage["prompt_tokens"] == 3
        assert c.inspect(agent)["token_ids"][:3] == [7, 8, 9]


def _next_event(monitor, timeout: float) -> int | None:
    """The next socket-monitor event's code, or None if none came in time."""
    if not monitor.poll(int(timeout * 1000)):
        return None
    return zmq.utils.monitor.recv_monitor_message(monitor)["event"]


def _one_input(frames: list[bytes]) -> str | None:
    """Which of prompt, tokens and messages a submit gives, if exactly one."""
    if len(frames) != 3 or frames[:2] != [MAGIC, b"submit"]:
        return None
    header = msgpack.unpackb(frames[2])
    given = [k for k in ("prompt", "tokens", "messages") if header.get(k) is not None]
    return given[0] if len(given) == 1 else None


def _reply(sock, timeout: float):
    if not sock.poll(int(timeout * 1000)):
        return None
    return protocol.decode(sock.recv_multipart())


def _fuzz_frames(rng: np.random.Generator, i: int) -> tuple[list[bytes], object]:
    """One malformed message and the id the daemon should echo (NO_ID if unreadable)."""
    kind = i % 8
    if kind == 0:  # random frames
        n = int(rng.integers(1, 6))
        return [rng.bytes(int(rng.integers(0, 64))) for _ in range(n)], NO_ID
    if kind == 1:  # bad magic, or the right magic with a wrong frame count
        header = msgpack.packb({"id": i})
        frames = [_pick(rng, [b"AKV2", b"", b"akv1", MAGIC]), b"stats", header]
        if frames[0] == MAGIC:
            frames = frames[: int(rng.integers(1, 3))] + [b"extra"] * int(rng.integers(0, 2) * 2)
        return frames, NO_ID
    if kind == 2:  # unknown, reply-only or non-ASCII types
        mtype = _pick(rng, [b"", b"submitt", b"reply", b"error", b"\xff\xfe", b"STATS", b"x" * 300])
        return [MAGIC, mtype, msgpack.packb({"id": i})], i
    if kind == 3:  # a header that is not msgpack, not a map, or deeply nested
        header = _pick(
            rng,
            [
                rng.bytes(int(rng.integers(1, 40))),
                msgpack.packb([i, "list"]),
                msgpack.packb(i),
                msgpack.packb({1: "int key"}),
                b"\x91" * 5000 + b"\x00",  # nested arrays, 5000 deep
                b"\xdd\xff\xff\xff\xff",  # an array claiming 4 G items
            ],
        )
        return [MAGIC, b"stats", header], NO_ID
    if kind == 4:  # a bad or missing id
        mtype = _pick(rng, TYPES)
        bad = _pick(rng, BAD_IDS)
        header = {} if bad is NO_FIELD else {"id": bad}
        return [MAGIC, mtype.encode(), msgpack.packb(header)], NO_ID
    return _bad_fields(rng, i)  # kinds 5-7: the request types with wrong field values


def _bad_fields(rng: np.random.Generator, i: int) -> tuple[list[bytes], object]:
    mtype = _pick(rng, list(BAD))
    header = dict(VALID[mtype])
    fields = list(BAD[mtype])
    chosen = [fields[k] for k in rng.permutation(len(fields))[: int(rng.integers(1, 4))]]
    for name in chosen:
        value = _pick(rng, BAD[mtype][name])
        if value is NO_FIELD:
            header.pop(name, None)
        else:
            header[name] = value
    if mtype == "submit" and rng.random() < 0.3:  # two of prompt/tokens/messages: ambiguous
        header.setdefault("prompt", "hello")
    elif mtype == "submit" and "tokens" not in chosen and {"prompt", "messages"} & set(chosen):
        # A bad prompt or messages alone, so their own validation is reached (the valid
        # header's tokens would make every such case "give exactly one of ...").
        header.pop("tokens")
        if {"prompt", "messages"} <= set(chosen):
            header.pop(_pick(rng, ["prompt", "messages"]))
    return [MAGIC, mtype.encode(), msgpack.packb({**header, "id": i})], i


def _pick(rng: np.random.Generator, items: list):
    """One item, as it is (numpy's choice would turn bytes into trailing-NUL-stripped arrays)."""
    return items[int(rng.integers(len(items)))]
