"""The client on its own, against real ZeroMQ peers that are not agentkv daemons (a ROUTER
socket in the test answers as the test says), and what importing it loads.

- A daemon of another major protocol version is refused with ProtocolMismatch.
- A reply over the protocol's size limit is a MessageTooLarge, not a timeout.
- Event fields a later minor version adds are ignored.
- A step reply that arrives after its call timed out keeps its events for the next step.
- A malformed endpoint or a short auth key is InvalidRequest; nothing listening is
  DaemonUnavailable.
- `import agentkv.client` and `import agentkv.daemon.service.cli` load no MLX.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from agentkv.client import (
    Client,
    DaemonUnavailable,
    InvalidRequest,
    MessageTooLarge,
    ProtocolMismatch,
    protocol,
)
from agentkv.client.protocol import MessageType

HELLO = {"pid": 1, "host": "peer", "socket": "", "model": "none"}


class Peer:
    """A ROUTER socket on a thread that answers each request with `answer(type, header)`:
    a list of (delay seconds, reply type, reply header) to send back."""

    def __init__(self, endpoint: str, answer: Callable) -> None:
        self.endpoint = endpoint
        self.answer = answer
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            identity, *frames = self._sock.recv_multipart()
            msg = protocol.decode(frames)
            self.seen.append(msg.type.value)
            for delay, kind, header in self.answer(msg.type, msg.header):
                time.sleep(delay)
                self._sock.send_multipart([identity, *protocol.encode(kind, header)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close(linger=0)


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Callable[[Callable], Peer]]:
    made: list[Peer] = []

    def make(answer: Callable) -> Peer:
        made.append(Peer(f"ipc://{tmp_path}/peer.sock", answer))
        return made[-1]

    yield make
    for p in made:
        p.close()


def _hello(kind: MessageType, h: dict, version=protocol.PROTOCOL_VERSION):
    assert kind is MessageType.HELLO
    return [(0, *protocol.reply(h["id"], {**HELLO, "version": list(version)}))]


def test_a_daemon_of_another_major_version_is_refused(peer):
    p = peer(lambda kind, h: _hello(kind, h, version=(2, 0)))
    with pytest.raises(ProtocolMismatch):
        Client(p.endpoint, timeout=5.0)
    assert p.seen == ["hello"]


def test_an_oversized_reply_is_message_too_large(peer):
    """A reply the client cannot decode (over MAX_MESSAGE_BYTES) names the problem at once
    instead of ending as a timeout."""

    def answer(kind, h):
        if kind is MessageType.HELLO:
            return _hello(kind, h)
        huge = {"agent_id": "big", "token_ids": [7] * (protocol.MAX_MESSAGE_BYTES + 16)}
        return [(0, *protocol.reply(h["id"], huge))]

    p = peer(answer)
    with Client(p.endpoint, timeout=30.0) as c:
        tic = time.monotonic()
        with pytest.raises(MessageTooLarge):
            c.inspect("big")
        assert time.monotonic() - tic < 10.0


def test_unknown_event_fields_are_ignored(peer):
    """A daemon of a later minor version may add event fields; this client ignores them."""

    def answer(kind, h):
        if kind is MessageType.HELLO:
            return _hello(kind, h, version=(1, 99))
        event = {"uid": 3, "agent_id": "a", "token_ids": [5], "text": "x", "new_field": [1]}
        return [(0, *protocol.reply(h["id"], {"events": [event], "also_new": True}))]

    with Client(peer(answer).endpoint, timeout=5.0) as c:
        (event,) = c.step(timeout=0.0)
    assert (event.uid, event.agent_id, event.token_ids, event.text) == (3, "a", [5], "x")


def test_a_late_step_reply_keeps_its_events(peer):
    """The daemon hands events over when it answers a step; if that answer comes after the
    client gave up on it, the events come out of the next step, in order, none lost."""
    steps = []

    def answer(kind, h):
        if kind is MessageType.HELLO:
            return _hello(kind, h)
        steps.append(h["id"])
        if len(steps) == 1:  # answered after the client's timeout
            final = {"uid": 1, "agent_id": "a", "token_ids": [9], "text": "!"}
            final.update(finish_reason="stop", usage={"generated_tokens": 2})
            first = {"uid": 1, "agent_id": "a", "token_ids": [8], "text": "?"}
            return [(1.5, *protocol.reply(h["id"], {"events": [first, final]}))]
        return [(0, *protocol.reply(h["id"], {"events": []}))]

    with Client(peer(answer).endpoint, timeout=0.5) as c:
        with pytest.raises(DaemonUnavailable):
            c.step(timeout=0.0)
        time.sleep(1.5)
        events = c.step(timeout=0.0)
    assert [e.token_ids for e in events] == [[8], [9]]
    assert events[-1].finish_reason == "stop" and events[-1].usage == {"generated_tokens": 2}


@pytest.mark.parametrize("endpoint", ["nonsense", "tcp://", "ipc://", "udp://127.0.0.1:1"])
def test_a_malformed_endpoint_is_invalid_request(endpoint):
    with pytest.raises(InvalidRequest):
        Client(endpoint, timeout=1.0)


def test_nothing_listening_is_daemon_unavailable(tmp_path):
    tic = time.monotonic()
    with pytest.raises(DaemonUnavailable):
        Client(f"ipc://{tmp_path}/nobody.sock", timeout=0.5)
    assert time.monotonic() - tic < 5.0


@pytest.mark.parametrize("key", [b"", b"short", b"x" * 15])
def test_a_short_auth_key_is_refused(key, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(key + b"\n")
    for given in (key, key_file):
        with pytest.raises(InvalidRequest, match="at least 16"):
            Client(f"ipc://{tmp_path}/d.sock", timeout=0.5, auth_key=given)


@pytest.mark.parametrize(
    "module", ["agentkv.client", "agentkv.daemon.service.cli", "agentkv.daemon.service.process"]
)
def test_importing_loads_no_mlx(module):
    """The client never needs MLX; daemonctl's commands that only talk to a daemon (and
    --help) must not pay for loading it either, nor the service layer (the daemon process,
    its server and command layer), which loads the engine only when it builds one."""
    code = (
        f"import sys, {module}\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('mlx', 'mlx_lm', 'transformers', 'torch')]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
