"""daemonctl: start, stop and look into the agentkv daemon.

Exit codes follow supervisorctl/LSB: `status` 0 running, 3 not running, 4 unreachable;
2 bad usage; 1 other failures. Starting a running daemon and stopping a stopped one
succeed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from agentkv.client import Client, DaemonUnavailable, Unauthorized
from agentkv.client.errors import AgentKVClientError
from agentkv.client.paths import default_socket, default_store

from .process import (
    LOGFILE,
    DaemonOptions,
    StartError,
    listening,
    pid_alive,
    read_pid,
    read_state,
    run_daemon,
)

EXIT_NOT_RUNNING = 3
EXIT_UNREACHABLE = 4
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
        socket_ = socket_ or default_socket()
        store = (store or default_store()).expanduser()
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
    )
    try:
        from .process import check_endpoint

        check_endpoint(socket_, auth_key)
    except StartError as exc:
        raise click.UsageError(str(exc)) from None
    info = _hello(socket_, auth_key, min(timeout, 2.0))
    if info is not None:
        _out(
            as_json,
            {"running": True, "pid": info["pid"], "already": True},
            f"agentkv daemon already running (pid {info['pid']}) on {socket_}",
        )
        return
    if foreground:
        _run_foreground(opts, log_to_stderr=not detached)
        return
    _spawn(opts, timeout, as_json)


@main.command()
@common
@click.option("--cancel", is_flag=True, help="cancel running turns instead of finishing them")
def stop(socket_, store, as_json, timeout, auth_key, cancel) -> None:
    """Stop the daemon: ask it to drain, then SIGTERM, then SIGKILL after the timeout."""
    info = _hello(socket_, auth_key, min(timeout, 2.0))
    pid = info["pid"] if info else _pid_for(store, socket_)
    if pid is None:
        _out(as_json, {"running": False}, "agentkv daemon is not running")
        return
    if info is not None:
        try:
            with Client(socket_, timeout=min(timeout, 5.0), auth_key=auth_key) as c:
                c.shutdown(cancel=cancel)
        except AgentKVClientError:
            pass
    how = _wait_exit(pid, timeout)
    _out(
        as_json,
        {"running": False, "pid": pid, "stopped_by": how},
        f"agentkv daemon (pid {pid}) stopped ({how})",
    )


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
            rows = c.agents()
            _out(as_json, rows, _table(rows))
        else:
            row = _call(c.inspect, agent)
            text = "\n".join(f"{k:>14}: {v}" for k, v in row.items() if k != "token_ids")
            _out(as_json, row, text)


@main.command()
@common
def agents(socket_, store, as_json, timeout, auth_key) -> None:
    """List agent ids."""
    with _client(socket_, timeout, auth_key) as c:
        rows = c.agents()
    _out(as_json, [r["agent_id"] for r in rows], "\n".join(r["agent_id"] for r in rows))


@main.command()
@common
@click.argument("agent")
def delete(socket_, store, as_json, timeout, auth_key, agent) -> None:
    """Forget AGENT (memory and store)."""
    with _client(socket_, timeout, auth_key) as c:
        _call(c.delete, agent)
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
def gc(socket_, store, as_json, timeout, auth_key, dry_run) -> None:
    """Remove orphan files, unreferenced blocks and other models' caches."""
    from agentkv.storage import StoreLockedError
    from agentkv.storage.maintenance import collect_garbage

    info = _hello(socket_, auth_key, min(timeout, 2.0))
    fingerprint = info.get("fingerprint") if info else _last_fingerprint(store)
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


def _run_foreground(opts: DaemonOptions, *, log_to_stderr: bool) -> None:
    import logging

    if log_to_stderr:  # a detached daemon's stderr is its log file already
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_daemon(opts)
    except StartError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


def _spawn(opts: DaemonOptions, timeout: float, as_json: bool) -> None:
    """Start a detached daemon and wait for its handshake; on failure show the log's tail."""
    opts.store.mkdir(parents=True, exist_ok=True)
    log_path = opts.store / LOGFILE
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
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
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


def _wait_exit(pid: int, timeout: float) -> str:
    for how, sig, wait in (
        ("shutdown", None, timeout),
        ("SIGTERM", signal.SIGTERM, 10.0),
        ("SIGKILL", signal.SIGKILL, 10.0),
    ):
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


def _last_fingerprint(store: Path) -> str | None:
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{_cache_dir(store) / 'index.db'}?mode=ro", uri=True)
        row = db.execute("SELECT fingerprint FROM models ORDER BY created DESC LIMIT 1").fetchone()
        db.close()
        return row[0] if row else None
    except (sqlite3.Error, click.ClickException):
        return None


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
    head = f"{'agent':<24}{'tokens':>8}{'cached':>8}{'blocks':>8}{'shared':>8}  state"
    lines = [head]
    for r in rows:
        state = "busy" if r.get("busy") else ("on disk" if r.get("in_store") else "idle")
        lines.append(
            f"{r['agent_id']:<24}{r['tokens']:>8}{r['cached_tokens']:>8}"
            f"{r['blocks']:>8}{r['shared_blocks']:>8}  {state}"
        )
    return "\n".join(lines)


def _out(as_json: bool, data, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


if __name__ == "__main__":
    main()
