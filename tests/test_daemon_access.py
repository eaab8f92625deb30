"""Who may talk to the daemon, and `daemonctl` as users run it.

- The default ipc socket lives in a 0700 directory.
- Over tcp with `--auth-key`: no key or a wrong one is Unauthorized; a replayed, stale,
  tampered or wrongly signed frame is refused; the key holder is served.
- `daemonctl` exit codes against a live daemon, as a subprocess: status 0 running /
  3 not running / 4 unreachable, start when running and stop when stopped succeed; bad
  usage exits 2 (an auth key under 16 bytes, an abstract ipc socket without a key) and
  every command has --help (click's CliRunner).
- `stop` signals only a daemon of this machine: a pid from another host's `hello` is
  never signalled here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from click.testing import CliRunner
from refs import synthetic_turn
from test_daemon_client import Peer

from agentkv.client import Client, Unauthorized, protocol
from agentkv.client.protocol import MAGIC, MessageType
from agentkv.daemon.service.cli import _serving_fingerprint, main
from agentkv.storage import CacheStore

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
    with d.client() as c:
        c.generate("listed", [4, 5, 6], max_tokens=3)
    table = d.ctl("inspect").stdout.splitlines()
    assert "on disk" in table[0] and "last used" in table[0]
    assert table[1].startswith("listed") and time.strftime("%Y-%m-%d") in table[1]
    detail = d.ctl("inspect", "listed").stdout
    assert "blocks on disk:" in detail and "last used:" in detail
    row = json.loads(d.ctl("inspect", "listed", "--json").stdout)
    assert row["disk_blocks"] == 0 and row["last_used"] > 0  # 6 tokens: no full block

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
        Client(d.socket, timeout=5.0, auth_key=b"not-the-key-but-long-enough")
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
        session = _session(sock, key)
        frames = protocol.encode(MessageType.STATS, {"id": 1, "session": session}, key)
        sock.send_multipart(frames)
        first = _reply(sock, key)
        assert first.type is MessageType.REPLY and first.header["result"]["pid"] == d.pid

        sock.send_multipart(frames)  # the same signed frames again
        assert _refusal(sock, signed=True) == "replayed message"

        stale = {"id": 2, "nonce": os.urandom(12).hex(), "ts": time.time() - 3600}
        sock.send_multipart(_signed(MessageType.STATS, {**stale, "session": session}, key))
        assert "replay window" in _refusal(sock, signed=True)

        fresh = protocol.encode(MessageType.STATS, {"id": 3, "session": session}, key)
        tampered = [*fresh[:2], msgpack.packb({"id": 3, "nonce": "x", "ts": time.time()}), fresh[3]]
        sock.send_multipart(tampered)
        assert _refusal(sock) == "bad signature"

        sock.send_multipart(
            protocol.encode(MessageType.STATS, {"id": 4}, b"wrong-key-of-enough-bytes")
        )
        assert _refusal(sock) == "bad signature"
        sock.send_multipart(protocol.encode(MessageType.STATS, {"id": 5}))  # unsigned
        assert _refusal(sock) == "message is not signed"

        sock.send_multipart(protocol.encode(MessageType.STATS, {"id": 6}, key))  # no session
        assert _error(sock, key) == "stale_session"
        sock.send_multipart(protocol.encode(MessageType.STATS, {"id": 7, "session": session}, key))
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
        ["start", "--socket", "ipc://@agentkv-test"],  # abstract: any local user, no key
    ],
    ids=" ".join,
)
def test_bad_usage_exits_2(args, tmp_path):
    where = [] if "--socket" in args else ["--socket", f"ipc://{tmp_path}/d.sock"]
    result = CliRunner().invoke(main, [*args, "--store", str(tmp_path), *where])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "daemon.pid").exists()


@pytest.mark.parametrize("key", [b"", b"\n", b"fifteen-bytes!!"])
def test_start_refuses_a_short_auth_key(key, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_bytes(key)
    result = CliRunner().invoke(
        main,
        ["start", "--socket", f"tcp://127.0.0.1:{_free_port()}", "--auth-key", str(key_file)]
        + ["--store", str(tmp_path)],
    )
    assert result.exit_code == 2, result.output
    assert "at least 16" in result.output
    assert not (tmp_path / "daemon.pid").exists()


def test_offline_delete_in_a_store_whose_path_needs_quoting(tmp_path):
    """No daemon: `delete` opens the store itself, also under a path that a raw SQLite URI
    would misread ('#' and '?'), for every model the agent is stored under."""
    from agentkv.storage import CacheStore
    from agentkv.storage.records import TurnRecord

    store = tmp_path / "odd#dir?x"
    cache = CacheStore(store / "cache")
    for fp in ("a" * 32, "b" * 32):
        cache.save_turn(TurnRecord("gone", fp, [1, 2, 3], 0))
    cache.save_turn(TurnRecord("kept", "a" * 32, [4, 5], 0))
    cache.close()
    sock = f"ipc://{tmp_path}/nobody.sock"
    args = ["--store", str(store), "--socket", sock, "--json"]
    result = CliRunner().invoke(main, ["delete", "gone", *args])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(main, ["delete", "gone", *args]).exit_code == 1  # unknown now
    listed = CliRunner().invoke(main, ["agents", *args])
    assert json.loads(listed.output) == ["kept"]


@pytest.mark.parametrize("same_host", [False, True], ids=["other host", "this host"])
def test_stop_signals_only_a_pid_proven_to_be_the_daemon(same_host, tmp_path):
    """A peer on loopback tcp (a tunnel, say) answers hello with a pid that is alive here.
    Whatever host it reports, that pid holds no store's daemon lock, so it is only asked
    to shut down, never signalled (it used to be SIGTERMed when it reported this host)."""
    bystander = subprocess.Popen(["sleep", "60"])
    host = socket.gethostname() if same_host else "elsewhere.example"

    def answer(kind, h):
        result = {"pid": bystander.pid, "host": host, "version": list(protocol.PROTOCOL_VERSION)}
        return [(0, *protocol.reply(h["id"], result if kind is MessageType.HELLO else {}))]

    peer = Peer(f"tcp://127.0.0.1:{_free_port()}", answer)
    try:
        result = CliRunner().invoke(
            main, ["stop", "--socket", peer.endpoint, "--store", str(tmp_path), "--timeout", "1"]
        )
        assert "shutdown" in peer.seen  # asked either way
        assert result.exit_code == 1 and "not signalled" in result.output, result.output
        assert bystander.poll() is None
    finally:
        peer.close()
        bystander.kill()
        bystander.wait()


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


def _refusal(sock, signed: bool = False) -> str:
    """The message of an `unauthorized` reply: unsigned when the message's signature was
    missing or wrong (anyone can read it), signed when it was good (a replay)."""
    assert sock.poll(10_000), "no reply"
    frames = sock.recv_multipart()
    assert len(frames) == (4 if signed else 3), frames
    msg = protocol.decode(frames[:3])
    assert msg.type is MessageType.ERROR and msg.header["error"]["code"] == "unauthorized"
    return msg.header["error"]["message"]


def _session(sock, key: bytes) -> str:
    """The daemon run's session id, from a signed `hello` (as Client does)."""
    hello = {"id": 0, "version": list(protocol.PROTOCOL_VERSION)}
    sock.send_multipart(protocol.encode(MessageType.HELLO, hello, key))
    return _reply(sock, key).header["result"]["session"]


def _error(sock, key: bytes) -> str:
    msg = _reply(sock, key)
    assert msg.type is MessageType.ERROR, msg
    return msg.header["error"]["code"]


# -- gc decides nothing about models it was not told of ------------------------------------

MODEL_A, MODEL_B = "a" * 32, "b" * 32


def _two_model_store(root: Path) -> Path:
    """A store (no daemon) with agents of two models: alice and carol of A, bob of B."""
    store = CacheStore(root / "cache")
    for agent_id, fingerprint in (("alice", MODEL_A), ("bob", MODEL_B), ("carol", MODEL_A)):
        store.register_model(fingerprint, model_id=fingerprint[0])
        store.save_turn(synthetic_turn(agent_id, fingerprint, blocks=1, tail=2, block_size=16))
    store.close()
    return root


def _agents(root: Path) -> set[tuple[str, str]]:
    db = sqlite3.connect(root / "cache" / "index.db")
    try:
        return set(db.execute("SELECT agent_id, fingerprint FROM agents"))
    finally:
        db.close()


def _gc(root: Path, socket_: str, *extra: str):
    args = ["gc", "--no-dry-run", "--json", "--store", str(root), "--socket", socket_, *extra]
    return CliRunner().invoke(main, args)


def test_gc_with_no_daemon_keeps_every_model_unless_one_is_named(tmp_path):
    """With no daemon to say which model is in use, a real gc removes no model's agents;
    --keep-model names it, and a fingerprint the store never saw is refused."""
    root = _two_model_store(tmp_path / "store")
    everyone = _agents(root)
    none = f"ipc://{tmp_path}/nobody.sock"
    result = _gc(root, none)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["foreign_agents"] == []
    assert _agents(root) == everyone
    result = _gc(root, none, "--keep-model", "c" * 32)  # a typo would be every agent
    assert result.exit_code == 1 and "no model" in result.output
    assert _agents(root) == everyone
    result = _gc(root, none, "--keep-model", MODEL_A)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["foreign_agents"] == [f"bob@{MODEL_B}"]
    assert _agents(root) == {("alice", MODEL_A), ("carol", MODEL_A)}


def test_gc_ignores_a_daemon_that_serves_another_store(default_socket_daemon, tmp_path):
    """The daemon answering on --socket serves another store: its model says nothing of
    this one, whose agents all stay."""
    d, _ = default_socket_daemon
    if not d.alive():
        d.start(socket=False)
    root = _two_model_store(tmp_path / "other")
    everyone = _agents(root)
    result = _gc(root, d.socket)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["foreign_agents"] == []
    assert _agents(root) == everyone
    with d.client() as c:  # its own store: the daemon's model is the one to keep
        assert _serving_fingerprint(d.socket, d.store, None, 2.0) == c.info["fingerprint"]
