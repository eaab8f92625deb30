"""Who may talk to the daemon, and `daemonctl` as users run it.

- The default ipc socket lives in a 0700 directory.
- Over tcp with `--auth-key`: no key or a wrong one is Unauthorized; a replayed, stale,
  tampered or wrongly signed frame is refused; the key holder is served.
- `daemonctl` exit codes against a live daemon, as a subprocess: status 0 running /
  3 not running / 4 unreachable, start when running and stop when stopped succeed; bad
  usage exits 2 and every command has --help (click's CliRunner).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from click.testing import CliRunner

from agentkv.client import Client, Unauthorized, protocol
from agentkv.client.protocol import MAGIC, MessageType
from agentkv.daemon.cli import main

ARGS = ("--block-size", "16", "--pool-blocks", "32")


@pytest.fixture(scope="module")
def keyed(daemon_factory):
    """A daemon on loopback tcp with an HMAC key; returns (daemon, key file, key bytes)."""
    key_dir = Path(tempfile.mkdtemp(prefix="akvkey", dir="/tmp"))
    key_file = key_dir / "key"
    key = os.urandom(32).hex().encode()
    key_file.write_bytes(key)
    key_file.chmod(0o600)
    d = daemon_factory(socket=f"tcp://127.0.0.1:{_free_port()}", args=ARGS)
    d.start("--auth-key", str(key_file))
    yield d, key_file, key
    d.kill()
    key_file.unlink()
    key_dir.rmdir()


@pytest.fixture(scope="module")
def default_socket_daemon(daemon_factory):
    """A daemon started without --socket: the default ipc socket in $XDG_RUNTIME_DIR/agentkv."""
    runtime = Path(tempfile.mkdtemp(prefix="akvrun", dir="/tmp"))
    env = {"XDG_RUNTIME_DIR": str(runtime), "AGENTKV_SOCKET": ""}
    d = daemon_factory(socket=f"ipc://{runtime}/agentkv/daemon.sock", args=ARGS, env=env)
    yield d, runtime
    d.kill()
    shutil.rmtree(runtime, ignore_errors=True)


def test_default_ipc_socket_is_in_a_0700_directory(default_socket_daemon):
    d, runtime = default_socket_daemon
    d.start(socket=False)
    sock_dir = runtime / "agentkv"
    assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o700
    assert stat.S_ISSOCK((sock_dir / "daemon.sock").stat().st_mode)
    with d.client() as c:  # the daemon on the default socket is the one we started
        assert c.stats()["pid"] == d.pid


def test_daemonctl_exit_codes(default_socket_daemon):
    """status/start/stop/inspect/delete/verify/gc exit codes, run as `daemonctl` processes."""
    d, _ = default_socket_daemon
    if not d.alive():
        d.start(socket=False)
    assert d.ctl("status").returncode == 0
    again = d.ctl("start", "--model", str(d.model_dir), "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["already"] is True
    status = d.ctl("status", "--json")
    assert status.returncode == 0
    facts = json.loads(status.stdout)
    assert facts["running"] is True and facts["pid"] == d.pid
    assert facts["fingerprint"] and facts["pool"]["total"] == 32 and "store" in facts
    assert d.ctl("delete", "nobody-here").returncode == 1  # a typed error, not a crash
    assert d.ctl("inspect", "nobody-here").returncode == 1

    os.kill(d.pid, signal.SIGSTOP)  # alive, but it cannot answer
    try:
        assert d.ctl("status", "--timeout", "1").returncode == 4
    finally:
        os.kill(d.pid, signal.SIGCONT)

    stopped = d.ctl("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not d.alive()
    assert d.ctl("status").returncode == 3
    assert d.ctl("stop").returncode == 0  # stopping a stopped daemon succeeds
    assert d.ctl("verify").returncode == 0
    assert d.ctl("gc", "--json").returncode == 0


def test_status_of_nothing_is_3_at_once(tmp_path):
    """No daemon at that socket: 3, without waiting for the handshake timeout."""
    tic = time.monotonic()
    result = CliRunner().invoke(
        main, ["status", "--socket", f"ipc://{tmp_path}/none.sock", "--store", str(tmp_path)]
    )
    assert result.exit_code == 3, result.output
    assert time.monotonic() - tic < 5.0


def test_tcp_without_or_with_a_wrong_key_is_unauthorized(keyed):
    d, key_file, _ = keyed
    with pytest.raises(Unauthorized):
        Client(d.socket, timeout=5.0)
    with pytest.raises(Unauthorized):
        Client(d.socket, timeout=5.0, auth_key=b"not-the-key")
    with Client(d.socket, timeout=10.0, auth_key=key_file) as c:
        r = c.generate("keyholder", [5, 6, 7], max_tokens=3)
        assert r.finish_reason in ("length", "stop")
    refused = d.ctl("status")
    assert refused.returncode == 4, refused.stdout + refused.stderr  # running, refuses us
    assert d.ctl("status", "--auth-key", str(key_file)).returncode == 0


def test_replayed_stale_tampered_or_missigned_frames_are_refused(keyed):
    d, _, key = keyed
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(d.socket)
    try:
        frames = protocol.encode(MessageType.STATS, {"id": 1}, key)
        sock.send_multipart(frames)
        first = _reply(sock, key)
        assert first.type is MessageType.REPLY and first.header["result"]["pid"] == d.pid

        sock.send_multipart(frames)  # the same signed frames again
        assert _refusal(sock) == "replayed message"

        stale = {"id": 2, "nonce": os.urandom(12).hex(), "ts": time.time() - 3600}
        sock.send_multipart(_signed(MessageType.STATS, stale, key))
        assert "replay window" in _refusal(sock)

        fresh = protocol.encode(MessageType.STATS, {"id": 3}, key)
        tampered = [*fresh[:2], msgpack.packb({"id": 3, "nonce": "x", "ts": time.time()}), fresh[3]]
        sock.send_multipart(tampered)
        assert _refusal(sock) == "bad signature"

        sock.send_multipart(protocol.encode(MessageType.STATS, {"id": 4}, b"wrong-key"))
        assert _refusal(sock) == "bad signature"
        sock.send_multipart(protocol.encode(MessageType.STATS, {"id": 5}))  # unsigned
        assert _refusal(sock) == "message is not signed"

        sock.send_multipart(protocol.encode(MessageType.STATS, {"id": 6}, key))
        assert _reply(sock, key).header["result"]["pid"] == d.pid  # still served
    finally:
        sock.close(linger=0)


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:") and "--socket" in result.output
    assert "--store" in result.output and "--json" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["delete"],  # missing AGENT
        ["status", "--no-such-option"],
        ["status", "--timeout", "-1"],
        ["start", "--pool-blocks", "0"],
        ["start", "--memory-budget", "lots"],
        ["start", "--socket", "tcp://0.0.0.0:5999"],  # not loopback, and no --auth-key
        ["start", "--socket", "udp://127.0.0.1:5999"],
        ["stop", "--auth-key", "/nonexistent/key"],
    ],
    ids=" ".join,
)
def test_bad_usage_exits_2(args, tmp_path):
    where = [] if "--socket" in args else ["--socket", f"ipc://{tmp_path}/d.sock"]
    result = CliRunner().invoke(main, [*args, "--store", str(tmp_path), *where])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "daemon.pid").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signed(kind: MessageType, header: dict, key: bytes) -> list[bytes]:
    frames = [MAGIC, kind.value.encode(), msgpack.packb(header)]
    return [*frames, protocol.sign(key, frames)]


def _reply(sock, key: bytes) -> protocol.Message:
    assert sock.poll(10_000), "no reply"
    return protocol.decode(sock.recv_multipart(), key)


def _refusal(sock) -> str:
    """The message of an `unauthorized` reply (sent unsigned, so anyone can read it)."""
    assert sock.poll(10_000), "no reply"
    msg = protocol.decode(sock.recv_multipart())
    assert msg.type is MessageType.ERROR and msg.header["error"]["code"] == "unauthorized"
    return msg.header["error"]["message"]
