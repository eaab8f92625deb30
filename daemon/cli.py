"""daemonctl: start, stop and look into the agentkv daemon.

Exit codes follow supervisorctl/LSB: `status` 0 running, 3 not running, 4 unreachable;
2 bad usage; 1 other failures. Starting a running daemon (or one still loading its model)
and stopping a stopped one succeed.

Only `start` (in the daemon process) and the store commands load anything heavy: the
daemon package's MLX parts load on first use, so status/stop/agents/inspect/delete and
--help start in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

from agentkv.client import AuthMismatch, Client, DaemonUnavailable, Unauthorized, protocol
from agentkv.client.errors import AgentKVClientError
from agentkv.client.paths import default_socket, default_store

from .process import (
    LOGFILE,
    DaemonOptions,
    StartError,
    StoreInUseError,
    check_endpoint,
    is_local_endpoint,
    listening,
    pid_alive,
    read_pid,
    read_state,
    run_daemon,
)

EXIT_NOT_RUNNING = 3
EXIT_UNREACHABLE = 4
EXIT_STORE_IN_USE = 75  # a detached child tells `start`: another daemon has the store
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | None) -> int | None:
    """'512MiB', '2G', '1.5GB', '1048576' -> bytes (binary units)."""
    if text is None:
        return None
    m = SIZE_RE.match(str(text))
    if not m:
        raise click.BadParameter(f"not a size: {text!r} (e.g. 512MiB, 2G)")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def common(f):
    """--socket, --store, --json and --timeout, shared by every command."""

    @click.option(
        "--socket",
        "socket_",
        default=None,
        metavar="ENDPOINT",
        help="daemon endpoint (ipc://PATH or tcp://HOST:PORT) [default: $AGENTKV_SOCKET "
        "or an ipc socket in a 0700 runtime dir]",
    )
    @click.option(
        "--store",
        type=click.Path(path_type=Path),
        default=None,
        help="store directory [default: $AGENTKV_STORE or ~/.local/share/agentkv/store]",
    )
    @click.option("--json", "as_json", is_flag=True, help="machine-readable output")
    @click.option(
        "--timeout",
        type=click.FloatRange(min=0),
        default=None,
        help="seconds to wait for the daemon [default: 10; start: 120]",
    )
    @click.option(
        "--auth-key",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="HMAC key file of a daemon started with --auth-key",
    )
    @functools.wraps(f)
    def wrapper(socket_, store, timeout, **kw):
        store = (store or default_store()).expanduser()
        socket_ = socket_ or _store_socket(store) or default_socket()
        default = 120.0 if f.__name__ == "start" else 10.0
        return f(
            socket_=socket_, store=store, timeout=default if timeout is None else timeout, **kw
        )

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Control the agentkv daemon: one process that owns the model, the block pool and the
    store, and serves agents over ZeroMQ."""


@main.command()
@common
@click.option(
    "--model", default=None, help="model dir or Hugging Face id [default: embedded model]"
)
@click.option("--foreground", is_flag=True, help="run in this process (logs also to stderr)")
@click.option("--memory-budget", default="1GiB", show_default=True, help="pool memory (KV blocks)")
@click.option("--disk-budget", default=None, help="store size limit [default: none]")
@click.option(
    "--pool-blocks",
    type=click.IntRange(min=1),
    default=None,
    help="pool size in blocks (instead of --memory-budget)",
)
@click.option("--block-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--cancel-on-shutdown", is_flag=True, help="cancel running turns on stop")
@click.option(
    "--client-ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="forget a client silent this long with nothing running (and its uncollected events)",
)
@click.option("--detached", is_flag=True, hidden=True)  # set by start for its child
def start(
    socket_,
    store,
    as_json,
    timeout,
    auth_key,
    model,
    foreground,
    memory_budget,
    disk_budget,
    pool_blocks,
    block_size,
    cancel_on_shutdown,
    client_ttl,
    detached,
) -> None:
    """Start the daemon (returns once it answers the handshake)."""
    opts = DaemonOptions(
        model=model,
        store=store,
        socket=socket_,
        memory_budget=parse_size(memory_budget),
        disk_budget=parse_size(disk_budget),
        pool_blocks=pool_blocks,
        block_size=block_size,
        auth_key=auth_key,
        cancel_on_shutdown=cancel_on_shutdown,
        client_ttl=client_ttl,
    )
    try:
        check_endpoint(socket_, auth_key)
    except StartError as exc:
        raise click.UsageError(str(exc)) from None
    info = _hello(socket_, auth_key, min(timeout, 2.0))
    if info is not None:
        _already(as_json, info, socket_)
        return
    if foreground:
        _run_foreground(opts, detached=detached)
        return
    other = read_pid(store)
    if other is not None:  # a daemon has the store: still loading its model, most likely
        _await_other(opts, other, timeout, as_json)
        return
    _spawn(opts, timeout, as_json)


@main.command()
@common
@click.option("--cancel", is_flag=True, help="cancel running turns instead of finishing them")
def stop(socket_, store, as_json, timeout, auth_key, cancel) -> None:
    """Stop the daemon: ask it to drain, then SIGTERM, then SIGKILL after the timeout.

    A daemon that does not answer but whose pidfile is in --store gets SIGTERM at once.
    Only a daemon of this machine is ever signalled (its pid in --store's pidfile, or an
    ipc/loopback endpoint whose daemon reports this host); a remote one is only asked.
    """
    info = _hello(socket_, auth_key, min(timeout, 2.0))
    if info is None:
        pid = _pid_for(store, socket_)
        if pid is None:
            _out(as_json, {"running": False}, "agentkv daemon is not running")
            return
        _stopped(as_json, pid, _wait_exit(pid, timeout, asked=False))
        return
    try:
        with Client(socket_, timeout=min(timeout, 5.0), auth_key=auth_key) as c:
            c.shutdown(cancel=cancel)
    except AgentKVClientError:
        pass
    pid = _local_pid(info, store, socket_)
    if pid is None:  # not ours to signal: wait for it to go quiet
        _wait_quiet(socket_, auth_key, timeout, info)
        _stopped(as_json, info.get("pid"), "shutdown", remote=True)
        return
    _stopped(as_json, pid, _wait_exit(pid, timeout, asked=True))


@main.command()
@common
def status(socket_, store, as_json, timeout, auth_key) -> None:
    """Exit 0 if the daemon runs, 3 if not, 4 if its process lives but does not answer."""
    try:
        if listening(socket_) is False:
            raise DaemonUnavailable(f"nothing listens on {socket_}")
        with Client(socket_, timeout=timeout, auth_key=auth_key) as c:
            stats = c.stats()
    except DaemonUnavailable:
        pid = _pid_for(store, socket_)
        if pid is not None:
            _out(
                as_json,
                {"running": True, "reachable": False, "pid": pid},
                f"agentkv daemon (pid {pid}) is not answering on {socket_}",
            )
            sys.exit(EXIT_UNREACHABLE)
        _out(as_json, {"running": False}, "agentkv daemon is not running")
        sys.exit(EXIT_NOT_RUNNING)
    except AuthMismatch as exc:  # it runs; one side has a key the other lacks, or another
        _out(
            as_json,
            {"running": True, "reachable": False, "error": "authentication mismatch"},
            f"agentkv daemon on {socket_}: authentication mismatch ({exc})",
        )
        sys.exit(EXIT_UNREACHABLE)
    except Unauthorized as exc:  # it runs, but will not talk to us
        _out(
            as_json,
            {"running": True, "reachable": False, "error": str(exc)},
            f"agentkv daemon on {socket_} refused us: {exc}",
        )
        sys.exit(EXIT_UNREACHABLE)
    except AgentKVClientError as exc:
        raise click.ClickException(str(exc)) from None
    _out(as_json, {"running": True, **stats}, _status_text(stats))


@main.command()
@common
@click.argument("agent", required=False)
def inspect(socket_, store, as_json, timeout, auth_key, agent) -> None:
    """A table of agents, or one AGENT in detail."""
    with _client(socket_, timeout, auth_key) as c:
        if agent is None:
            rows = _call(c.agents)
            _out(as_json, rows, _table(rows))
        else:
            row = _call(c.inspect, agent)
            _out(as_json, row, _detail(row))


@main.command()
@common
def agents(socket_, store, as_json, timeout, auth_key) -> None:
    """List agent ids (from the store itself when no daemon runs on it)."""
    if _daemon_answers(socket_, store, timeout, auth_key):
        with _client(socket_, timeout, auth_key) as c:
            ids = [r["agent_id"] for r in _call(c.agents)]
    else:
        with _offline_store(store) as cache:
            ids = cache.agent_ids()
    _out(as_json, ids, "\n".join(ids))


@main.command()
@common
@click.argument("agent")
def delete(socket_, store, as_json, timeout, auth_key, agent) -> None:
    """Forget AGENT (memory and store; the store itself when no daemon runs on it)."""
    if _daemon_answers(socket_, store, timeout, auth_key):
        with _client(socket_, timeout, auth_key) as c:
            _call(c.delete, agent)
    else:
        _delete_offline(store, agent)
    _out(as_json, {"deleted": agent}, f"deleted {agent}")


@main.command()
@common
def verify(socket_, store, as_json, timeout, auth_key) -> None:
    """Re-check every checksum in the store (exit 1 if any file is corrupt)."""
    from agentkv.storage.maintenance import verify_store

    report = verify_store(_cache_dir(store), progress=not as_json)
    _out(
        as_json,
        {"checked": report.checked, "bytes": report.bytes_checked, "corrupt": report.corrupt},
        f"checked {report.checked} files ({report.bytes_checked / 2**20:.1f} MiB): "
        f"{len(report.corrupt)} corrupt" + "".join(f"\n  {p}" for p in report.corrupt),
    )
    if report.corrupt:
        sys.exit(1)


@main.command()
@common
@click.option(
    "--dry-run/--no-dry-run",
    default=True,
    show_default=True,
    help="only list what would be removed",
)
@click.option(
    "--keep-model",
    "keep_model",
    metavar="FINGERPRINT",
    default=None,
    help="the model whose agents and caches to keep; every other model's are removed "
    "[default: the model of the daemon serving this store; with none, every model's are kept]",
)
def gc(socket_, store, as_json, timeout, auth_key, dry_run, keep_model) -> None:
    """Remove orphan files, unreferenced blocks and other models' caches."""
    from agentkv.storage import StoreLockedError
    from agentkv.storage.maintenance import collect_garbage

    fingerprint = keep_model or _serving_fingerprint(socket_, store, auth_key, timeout)
    if keep_model is not None:
        _check_model_known(store, keep_model)
    try:
        r = collect_garbage(_cache_dir(store), fingerprint, dry_run=dry_run, progress=not as_json)
    except StoreLockedError as exc:
        raise click.ClickException(str(exc)) from None
    data = {
        "dry_run": r.dry_run,
        "orphan_files": r.orphan_files,
        "unreferenced_blocks": r.unreferenced_blocks,
        "foreign_blocks": r.foreign_blocks,
        "foreign_agents": r.foreign_agents,
        "bytes": r.bytes_freed,
    }
    verb = "would remove" if dry_run else "removed"
    _out(
        as_json,
        data,
        f"{verb}: {len(r.orphan_files)} orphan files, "
        f"{len(r.unreferenced_blocks)} unreferenced blocks, {len(r.foreign_blocks)} blocks and "
        f"{len(r.foreign_agents)} agents of other models ({r.bytes_freed / 2**20:.1f} MiB)",
    )


# -- helpers ---------------------------------------------------------------------------


def _run_foreground(opts: DaemonOptions, *, detached: bool) -> None:
    import logging

    if not detached:  # a detached daemon's stderr is its log file already
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_daemon(opts)
    except StoreInUseError as exc:
        if detached:  # the `start` that spawned us waits for the other daemon instead
            click.echo(f"agentkv: {exc}", err=True)
            sys.exit(EXIT_STORE_IN_USE)
        raise click.ClickException(str(exc)) from None
    except StartError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


def _spawn(opts: DaemonOptions, timeout: float, as_json: bool) -> None:
    """Start a detached daemon and wait for its handshake; on failure show the log's tail."""
    opts.store.mkdir(parents=True, exist_ok=True)
    log_path = opts.store / LOGFILE
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            _child_args(opts),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            other = (
                _other_daemon(opts.store, proc) if proc.returncode == EXIT_STORE_IN_USE else None
            )
            if other is not None:  # another start won the race: wait for that daemon
                _await_other(opts, other, deadline - time.monotonic(), as_json)
                return
            raise click.ClickException(f"daemon exited with {proc.returncode}\n{_tail(log_path)}")
        info = _hello(opts.socket, opts.auth_key, 0.5)
        if info is not None:
            _out(
                as_json,
                {"running": True, "pid": info["pid"], "socket": opts.socket},
                f"agentkv daemon started (pid {info['pid']}) on {opts.socket}",
            )
            return
        time.sleep(0.2)
    proc.kill()
    raise click.ClickException(f"daemon did not answer within {timeout:.0f} s\n{_tail(log_path)}")


def _child_args(opts: DaemonOptions) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "agentkv.daemon.cli",
        "start",
        "--foreground",
        "--detached",
        "--socket",
        opts.socket,
        "--store",
        str(opts.store),
        "--memory-budget",
        str(opts.memory_budget),
        "--block-size",
        str(opts.block_size),
        "--client-ttl",
        str(opts.client_ttl),
    ]
    for flag, value in (
        ("--model", opts.model),
        ("--disk-budget", opts.disk_budget),
        ("--pool-blocks", opts.pool_blocks),
        ("--auth-key", opts.auth_key),
    ):
        if value is not None:
            args += [flag, str(value)]
    if opts.cancel_on_shutdown:
        args.append("--cancel-on-shutdown")
    return args


def _other_daemon(store: Path, proc: subprocess.Popen) -> int | None:
    """The daemon that holds the store our child could not lock (its pidfile follows the
    lock within moments)."""
    for _ in range(50):
        pid = read_pid(store)
        if pid is not None and pid != proc.pid:
            return pid
        time.sleep(0.05)
    return None


def _await_other(opts: DaemonOptions, pid: int, timeout: float, as_json: bool) -> None:
    """Another daemon (pid) has the store: succeed once it answers on our socket."""
    theirs = read_state(opts.store).get("socket")
    if theirs is not None and theirs != opts.socket:
        raise click.ClickException(
            f"a daemon (pid {pid}) runs on store {opts.store} with socket {theirs}"
        )
    deadline = time.monotonic() + max(timeout, 0.0)
    while time.monotonic() < deadline:
        info = _hello(opts.socket, opts.auth_key, 0.5)
        if info is not None:
            _already(as_json, info, opts.socket)
            return
        if not pid_alive(pid):
            tail = _tail(opts.store / LOGFILE)
            raise click.ClickException(f"daemon pid {pid} exited while starting\n{tail}")
        time.sleep(0.2)
    raise click.ClickException(f"daemon pid {pid} did not answer within {timeout:.0f} s")


def _already(as_json: bool, info: dict, endpoint: str) -> None:
    _out(
        as_json,
        {"running": True, "pid": info["pid"], "already": True},
        f"agentkv daemon already running (pid {info['pid']}) on {endpoint}",
    )


def _hello(endpoint: str, key, timeout: float) -> dict | None:
    if listening(endpoint) is False:
        return None
    try:
        with Client(endpoint, timeout=timeout, auth_key=key) as c:
            return c.info
    except DaemonUnavailable:
        return None
    except AgentKVClientError as exc:
        raise click.ClickException(str(exc)) from None


def _client(endpoint: str, timeout: float, key) -> Client:
    try:
        if listening(endpoint) is False:
            raise DaemonUnavailable(endpoint)
        return Client(endpoint, timeout=timeout, auth_key=key)
    except DaemonUnavailable:
        raise click.ClickException(f"agentkv daemon is not running on {endpoint}") from None
    except AgentKVClientError as exc:
        raise click.ClickException(str(exc)) from None


def _call(fn, *args):
    try:
        return fn(*args)
    except AgentKVClientError as exc:
        raise click.ClickException(str(exc)) from None


def _pid_for(store: Path, endpoint: str) -> int | None:
    """A live daemon pid recorded in the store for this endpoint."""
    pid = read_pid(store)
    if pid is None:
        return None
    return pid if read_state(store).get("socket", endpoint) == endpoint else None


def _local_pid(info: dict, store: Path, endpoint: str) -> int | None:
    """The pid from a daemon's `hello`, if that daemon runs on this machine: --store's
    pidfile names it, or the endpoint is ipc/loopback and it reports this host. Else None
    (a tcp daemon elsewhere, or a tunnel to one: its pid means nothing here)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if read_pid(store) == pid:
        return pid
    if is_local_endpoint(endpoint) and info.get("host") == socket.gethostname():
        return pid
    return None


def _wait_quiet(endpoint: str, key, timeout: float, info: dict) -> None:
    """Wait for a daemon we may not signal to stop answering."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _hello(endpoint, key, 0.5) is None:
            return
        time.sleep(0.2)
    raise click.ClickException(
        f"the daemon on {endpoint} (pid {info.get('pid')} on host {info.get('host')!r}) "
        f"was asked to shut down but still answers after {timeout:.0f} s; it is not this "
        "machine's daemon (no pidfile in --store names it), so it was not signalled"
    )


def _wait_exit(pid: int, timeout: float, *, asked: bool) -> str:
    """Wait for a local daemon to exit: `timeout` for the shutdown it was asked for, then
    SIGTERM, then SIGKILL. One that was not asked (it did not answer) gets SIGTERM at once
    and `timeout` to drain."""
    steps = [("shutdown", None, timeout)] if asked else []
    steps += [("SIGTERM", signal.SIGTERM, 10.0 if asked else timeout)]
    steps += [("SIGKILL", signal.SIGKILL, 10.0)]
    for how, sig, wait in steps:
        if sig is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return how
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return how
            time.sleep(0.05)
    raise click.ClickException(f"daemon pid {pid} did not exit")


def _stopped(as_json: bool, pid, how: str, *, remote: bool = False) -> None:
    data = {"running": False, "pid": pid, "stopped_by": how}
    if remote:
        data["remote"] = True
    _out(as_json, data, f"agentkv daemon (pid {pid}) stopped ({how})")


def _store_socket(store: Path) -> str | None:
    """The endpoint of the daemon running on this store (its state file), if one runs: with
    no --socket, commands about a store reach its daemon wherever it listens."""
    if read_pid(store) is None:
        return None
    endpoint = read_state(store).get("socket")
    return endpoint if isinstance(endpoint, str) and endpoint else None


def _daemon_answers(endpoint: str, store: Path, timeout: float, key) -> bool:
    """True if a daemon answers on the endpoint; False if none runs on --store either
    (the store may then be opened directly)."""
    if _hello(endpoint, key, min(timeout, 2.0)) is not None:
        return True
    pid = read_pid(store)
    if pid is not None:
        raise click.ClickException(
            f"agentkv daemon (pid {pid}) has store {store} but does not answer on {endpoint}"
        )
    return False


@contextlib.contextmanager
def _offline_store(store: Path):
    """The store opened directly (its lock taken: refused while a daemon has it)."""
    from agentkv.storage import CacheStore, StorageError

    try:
        cache = CacheStore(_cache_dir(store))
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield cache
    finally:
        cache.close()


def _delete_offline(store: Path, agent: str) -> None:
    from agentkv.storage import StorageError

    try:
        protocol.check_agent_id(agent)
    except protocol.ProtocolError as exc:
        raise click.ClickException(str(exc)) from None
    with _offline_store(store) as cache:
        try:
            fingerprints = _fingerprints_of(cache, agent)
            if not fingerprints:
                raise click.ClickException(f"unknown agent {agent!r}")
            for fp in fingerprints:  # one agent id may be stored for several models
                cache.delete_agent(agent, fp)
            cache.flush()
        except StorageError as exc:
            raise click.ClickException(str(exc)) from None


def _fingerprints_of(cache, agent: str) -> list[str]:
    """The models `agent` is stored for, read through the store's own index opener."""
    from agentkv.storage.schema import open_index

    db = open_index(cache.root / "index.db", read_only=True, immutable=cache.read_only)
    try:
        rows = db.execute(
            "SELECT DISTINCT fingerprint FROM agents WHERE agent_id = ?", (agent,)
        ).fetchall()
    finally:
        db.conn.close()
    return [r[0] for r in rows]


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if done == pid:
            return False
    except ChildProcessError:
        pass
    return pid_alive(pid)


def _cache_dir(store: Path) -> Path:
    path = store / "cache"
    if not (path / "index.db").exists():
        raise click.ClickException(f"no store at {store}")
    return path


def _serving_fingerprint(socket_: str, store: Path, key, timeout: float) -> str | None:
    """The model of the daemon on `socket_`, if it serves this store; else None (gc then
    keeps every model's agents: which model is "current" is the user's to say)."""
    info = _hello(socket_, key, min(timeout, 2.0))
    if not info or not info.get("fingerprint"):
        return None
    served = info.get("store")
    if not isinstance(served, str) or Path(served).resolve() != store.resolve():
        return None  # another store's daemon: its model says nothing about this store
    return info["fingerprint"]


def _check_model_known(store: Path, fingerprint: str) -> None:
    """Refuse a fingerprint the store has never seen (a typo would make every agent
    another model's, to be removed)."""
    import sqlite3

    from agentkv.storage import StorageError
    from agentkv.storage.schema import open_index

    try:
        db = open_index(_cache_dir(store) / "index.db", read_only=True)
        try:
            known = {row[0] for row in db.execute("SELECT fingerprint FROM models")}
            known |= {row[0] for row in db.execute("SELECT DISTINCT fingerprint FROM agents")}
        finally:
            db.conn.close()
    except (sqlite3.Error, StorageError) as exc:
        raise click.ClickException(f"cannot read the store's models: {exc}") from None
    if fingerprint not in known:
        listed = ", ".join(sorted(k for k in known if isinstance(k, str))) or "none"
        raise click.ClickException(f"no model {fingerprint!r} in {store} (its models: {listed})")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _status_text(s: dict) -> str:
    pool = s.get("pool", {})
    store = s.get("store", {})
    return (
        f"agentkv daemon running (pid {s.get('pid')}) on {s.get('socket')}\n"
        f"  model {s.get('model')} ({s.get('model_type')}), fingerprint {s.get('fingerprint')}\n"
        f"  uptime {s.get('uptime_s', 0):.0f} s, {s.get('agents', 0)} agents, "
        f"{s.get('active', 0)} running, {s.get('waiting', 0)} waiting\n"
        f"  pool {pool.get('in_use', 0)}/{pool.get('total', 0)} blocks in use, "
        f"{pool.get('cached', 0)} cached\n"
        f"  store {store.get('blocks', 0)} blocks, {store.get('block_bytes', 0) / 2**20:.1f} MiB; "
        f"restored {s.get('restored_agents', 0)} agents / {s.get('restored_tokens', 0)} tokens"
    )


def _table(rows: list[dict]) -> str:
    head = (
        f"{'agent':<24}{'tokens':>8}{'cached':>8}{'blocks':>8}{'shared':>8}{'on disk':>8}"
        f"  {'last used':<19}  state"
    )
    lines = [head]
    for r in rows:
        state = "busy" if r.get("busy") else ("on disk" if r.get("in_store") else "idle")
        lines.append(
            f"{r['agent_id']:<24}{r['tokens']:>8}{r['cached_tokens']:>8}"
            f"{r['blocks']:>8}{r['shared_blocks']:>8}{r.get('disk_blocks', 0):>8}"
            f"  {_when(r.get('last_used')):<19}  {state}"
        )
    return "\n".join(lines)


_LABELS = {"disk_blocks": "blocks on disk", "last_used": "last used"}


def _detail(row: dict) -> str:
    lines = []
    for k, v in row.items():
        if k in ("token_ids", "token_offset"):
            continue
        lines.append(f"{_LABELS.get(k, k):>14}: {_when(v) if k == 'last_used' else v}")
    return "\n".join(lines)


def _when(ts) -> str:
    """A wall-clock time as local date and time; "-" for never."""
    if not isinstance(ts, (int, float)) or ts <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _out(as_json: bool, data, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


if __name__ == "__main__":
    main()
