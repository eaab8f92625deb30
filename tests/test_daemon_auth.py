"""Authentication across daemon runs and between mismatched peers, with real daemons.

- A signed request captured before a restart is refused after it (it names the earlier
  run's session), and its agent is untouched; a Client that lived across the restart says
  hello again by itself and is served; a client older than protocol 1.3 is refused.
- A client with a key and a daemon without one, the reverse, or two different keys: the
  client gets AuthMismatch at once (not DaemonUnavailable after its timeout), and
  `daemonctl status` says "authentication mismatch" and exits 4.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
import zmq

from agentkv.client import AuthMismatch, Client, protocol
from agentkv.client.protocol import MessageType

ARGS = ("--block-size", "16", "--pool-blocks", "32")
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def key_file():
    key_dir = Path(tempfile.mkdtemp(prefix="akvkey", dir="/tmp"))
    path = key_dir / "key"
    path.write_bytes(os.urandom(32).hex().encode())
    path.chmod(0o600)
    yield path
    path.unlink()
    key_dir.rmdir()


def test_a_frame_captured_before_a_restart_is_refused_after_it(daemon_factory, key_file):
    key = protocol.load_key(key_file)
    d = daemon_factory(args=ARGS)
    d.start("--auth-key", str(key_file))
    survivor = d.client(auth_key=key_file)  # lives across the restart
    with d.client(auth_key=key_file) as c:
        c.generate("victim", PROMPT, max_tokens=3)
        # The bytes a Client sends for `delete victim`, as an eavesdropper records them.
        captured = protocol.encode(
            MessageType.DELETE,
            {"agent_id": "victim", "session": c.info["session"], "id": 1},
            key,
        )
    reply = _send_raw(d.socket, captured, key)
    assert reply.type is MessageType.REPLY and reply.header["result"]["deleted"] is True

    assert d.ctl("stop", "--auth-key", str(key_file)).returncode == 0
    assert d.wait_exit(10)
    d.start("--auth-key", str(key_file))
    with d.client(auth_key=key_file) as c:
        c.generate("victim", PROMPT, max_tokens=3)  # re-created
        refused = _send_raw(d.socket, captured, key)  # replayed well inside the window
        assert refused.type is MessageType.ERROR
        assert refused.header["error"]["code"] == "stale_session"
        assert c.inspect("victim")["token_ids"][:4] == PROMPT  # still there
    assert survivor.stats()["pid"] == d.pid  # hello again after `stale_session`, served
    survivor.close()
    # A client older than 1.3 would sign no session: refused at its hello.
    old_hello = protocol.encode(MessageType.HELLO, {"id": 1, "version": [1, 2]}, key)
    refused = _send_raw(d.socket, old_hello, key)
    assert refused.header["error"]["code"] == "protocol_mismatch", refused.header


@pytest.mark.parametrize(
    ("daemon_key", "client_key"), [(True, False), (False, True), (True, "other")]
)
def test_an_auth_mismatch_is_said_at_once(daemon_factory, key_file, daemon_key, client_key):
    other = key_file.with_name("other")
    other.write_bytes(os.urandom(32).hex().encode())
    d = daemon_factory(args=ARGS)
    d.start(*(("--auth-key", str(key_file)) if daemon_key else ()))
    given = {True: key_file, False: None, "other": other}[client_key]
    try:
        tic = time.monotonic()
        with pytest.raises(AuthMismatch, match="authentication mismatch"):
            Client(d.socket, timeout=20.0, auth_key=given)
        assert time.monotonic() - tic < 5.0  # an answer, not the 20 s timeout
        status = d.ctl("status", *(("--auth-key", str(given)) if given else ()))
        assert status.returncode == 4, status.stdout + status.stderr
        assert "authentication mismatch" in status.stdout
    finally:
        d.kill()
        other.unlink()


def _send_raw(endpoint: str, frames: list[bytes], key: bytes) -> protocol.Message:
    """Send recorded frames from a fresh raw DEALER; the signed reply."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(10_000), "no reply"
        return protocol.decode(sock.recv_multipart(), key)
    finally:
        sock.close(linger=0)
