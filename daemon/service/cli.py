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
import dataclasses
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
    BadOptionError,
    DaemonOptions,
    StartError,
    StoreInUseError,
    check_endpoint,
    is_local_endpoint,
    listening,
    read_key,
    run_daemon,
)
from .runfiles import (
    LOCKFILE,
    LOGFILE,
    find_pidfile,
    holds_lock,
    pid_alive,
    read_pid,
    read_state,
    remove_stale,
    run_dir,
    same_store,
    store_path,
)

EXIT_DEAD_PIDFILE = 1  # LSB: program is dead and a pidfile exists
EXIT_NOT_RUNNING = 3
EXIT_UNREACHABLE = 4
EXIT_USAGE = 2
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
        store = store_path(store or default_store())
        socket_ = absolute_endpoint(socket_ or _store_socket(store) or default_socket())
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
@click.option(
    "--http",
    default=None,
    metavar="HOST:PORT",
    help="also serve the OpenAI and Anthropic HTTP APIs here (loopback unless --api-key)",
)
@click.option(
    "--api-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="file holding the HTTP API key (Bearer token), >= 16 bytes",
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
    http,
    api_key,
    detached,
) -> None:
    """Start the daemon (returns once it answers the handshake)."""
    opts = DaemonOptions(
        model=_model_arg(model),
        store=store,
        socket=socket_,
        memory_budget=parse_size(memory_budget),
        disk_budget=parse_size(disk_budget),
        pool_blocks=pool_blocks,
        block_size=block_size,
        auth_key=auth_key,
        cancel_on_shutdown=cancel_on_shutdown,
        client_ttl=client_ttl,
        http=http,
        api_key=api_key,
    )
    try:
        check_endpoint(socket_, auth_key)
        _check_http(http, api_key)
    except StartError as exc:
        raise click.UsageError(str(exc)) from None
    info = _hello(socket_, auth_key, min(timeout, 2.0))
    if info is not None:
        _check_serves(info, opts)
        _already(as_json, info, socket_)
        return
    if foreground:
        _run_foreground(opts, detached=detached)
        return
    stale = remove_stale(store)  # a daemon killed with -9 left its pidfile
    if stale is not None:
        click.echo(f"agentkv: removed the stale pidfile of pid {stale.pid}", err=True)
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

    Exits 1 if the daemon could not make every finished turn durable (disk full, ...),
    naming the agents behind and by how many tokens. A daemon that does not answer is
    signalled at once, but only while it provably is this store's daemon: its pid holds
    the store's daemon lock. A stale pidfile (a daemon killed with -9) is removed, never
    acted on. A daemon elsewhere (tcp) is only asked.
    """
    info = _hello(socket_, auth_key, min(timeout, 2.0))
    if info is None:
        _stop_unanswering(store, timeout, as_json)
        return
    lock = _daemon_lock(info, store)  # proven before it starts shutting down
    pid = _local_pid(info, lock, store, socket_)
    reply = None
    try:
        with Client(socket_, timeout=min(timeout, 5.0), auth_key=auth_key) as c:
            reply = c.shutdown(cancel=cancel, wait=max(timeout, 1.0))
    except AgentKVClientError:
        pass  # no report in time: signals follow
    if pid is None:  # not ours to signal: wait for it to go quiet
        _wait_quiet(socket_, auth_key, timeout, info)
        _stopped(as_json, info.get("pid"), "shutdown", reply, remote=True)
        return
    how = _wait_exit(pid, lock, 10.0 if reply is not None else 0.0, asked=True)
    _stopped(as_json, pid, how, reply)


def _stop_unanswering(store: Path, timeout: float, as_json: bool) -> None:
    """Stop for a daemon that does not answer: signal it if its pidfile is live (its pid
    holds the store's lock); remove a stale pidfile."""
    found = find_pidfile(store)
    if found is None:
        _out(as_json, {"running": False}, "agentkv daemon is not running")
        return
    if not found.live:
        remove_stale(store)
        _out(
            as_json,
            {"running": False, "stale_pid": found.pid},
            f"agentkv daemon is not running (removed the stale pidfile of pid {found.pid})",
        )
        return
    _stopped(as_json, found.pid, _wait_exit(found.pid, found.dir / LOCKFILE, timeout))


@main.command()
@common
def status(socket_, store, as_json, timeout, auth_key) -> None:
    """Exit 0 if the daemon runs, 3 if not, 1 if it died leaving its pidfile (LSB), 4 if
    it runs (holds the store's lock) but does not answer."""
    try:
        if listening(socket_) is False:
            raise DaemonUnavailable(f"nothing listens on {socket_}")
        with Client(socket_, timeout=timeout, auth_key=auth_key) as c:
            stats = c.stats()
    except DaemonUnavailable:
        _status_unanswering(store, socket_, as_json)
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


def _status_unanswering(store: Path, endpoint: str, as_json: bool) -> None:
    found = find_pidfile(store)
    if found is not None and found.live and read_state(store).get("socket") != endpoint:
        found = None  # the store's daemon serves another endpoint: nothing runs on this one
    if found is not None and found.live:
        _out(
            as_json,
            {"running": True, "reachable": False, "pid": found.pid},
            f"agentkv daemon (pid {found.pid}) is not answering on {endpoint}",
        )
        sys.exit(EXIT_UNREACHABLE)
    if found is not None:
        _out(
            as_json,
            {"running": False, "stale_pid": found.pid, "pidfile": str(found.dir)},
            f"agentkv daemon is dead, but its pidfile (pid {found.pid}) is left in "
            f"{found.dir}; `daemonctl start` removes it",
        )
        sys.exit(EXIT_DEAD_PIDFILE)
    _out(as_json, {"running": False}, "agentkv daemon is not running")
    sys.exit(EXIT_NOT_RUNNING)


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
    """Check the index (SQLite's integrity check) and every file's checksum (exit 1 if the
    index is damaged or any file is corrupt)."""
    from agentkv.storage import StorageError
    from agentkv.storage.maintenance import verify_store

    try:
        report = verify_store(_cache_dir(store, index_ok=False), progress=_progress(as_json))
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    if report.index_error is not None:
        _out(as_json, _verify_data(report), _index_damage_line(store, report))
        sys.exit(1)
    _out(
        as_json,
        _verify_data(report),
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
    from agentkv.storage import StorageError
    from agentkv.storage.maintenance import collect_garbage

    fingerprint = keep_model or _serving_fingerprint(socket_, store, auth_key, timeout)
    if keep_model is not None:
        _check_model_known(store, keep_model)
    try:
        r = collect_garbage(
            _cache_dir(store), fingerprint, dry_run=dry_run, progress=_progress(as_json)
        )
    except StorageError as exc:  # locked, or an index gone or damaged: nothing removed
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


@main.command("rebuild-index")
@common
@click.option("--dry-run", is_flag=True, help="only report what the new index would hold")
@click.option("--force", is_flag=True, help="rebuild even a sound index (loses pins)")
def rebuild_index(socket_, store, as_json, timeout, auth_key, dry_run, force) -> None:
    """Rebuild the store's index from its block and state files (a lost or damaged
    index.db); refused while a daemon has the store. Agents whose files hold no token
    list (written by an older agentkv) are reported lost."""
    from agentkv.storage import StorageError
    from agentkv.storage import rebuild_index as rebuild

    path = store / "cache"
    if not path.is_dir():
        raise click.ClickException(f"no store at {store}")
    try:
        r = rebuild(path, dry_run=dry_run, force=force, progress=_progress(as_json))
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    _out(as_json, dataclasses.asdict(r), _rebuild_text(r))


# -- helpers ---------------------------------------------------------------------------


def _run_foreground(opts: DaemonOptions, *, detached: bool) -> None:
    import logging

    if not detached:  # a detached daemon's stderr is its log file already
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run_daemon(opts)
    except StoreInUseError as exc:
        if detached:  # the `start` that spawned us waits for the other daemon instead
            click.echo(f"agentkv: {exc}", err=True)
            sys.exit(EXIT_STORE_IN_USE)
        raise click.ClickException(str(exc)) from None
    except BadOptionError as exc:
        raise click.UsageError(str(exc)) from None
    except StartError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    if report.get("unsaved"):  # supervisors (systemd, ...) see the exit status
        click.echo(_unsaved_text(report["unsaved"]), err=True)
        sys.exit(1)


def _spawn(opts: DaemonOptions, timeout: float, as_json: bool) -> None:
    """Start a detached daemon and wait for its handshake; on failure show the log's tail."""
    try:
        opts.store.mkdir(parents=True, exist_ok=True)
        log_path = run_dir(opts.store, create=True) / LOGFILE
        log = open(log_path, "ab")  # noqa: SIM115 - closed below, once the child has it
    except OSError as exc:
        raise click.ClickException(f"cannot prepare store {opts.store}: {exc}") from None
    with log:
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
            if proc.returncode == EXIT_USAGE:  # a bad option the child found: its last line
                raise click.UsageError(_usage_line(log_path))
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
        "agentkv.daemon.service.cli",
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
        ("--http", opts.http),
        ("--api-key", opts.api_key),
    ):
        if value is not None:
            args += [flag, str(value)]
    if opts.cancel_on_shutdown:
        args.append("--cancel-on-shutdown")
    return args


def _check_http(http: str | None, api_key: Path | None) -> None:
    """--http: a HOST:PORT, loopback unless an API key (a readable key file) guards it."""
    from .http.listen import ListenError, parse_listen

    if api_key is not None:
        if http is None:
            raise StartError("--api-key is the HTTP front's key: give --http HOST:PORT too")
        read_key(api_key)
    if http is not None:
        try:
            parse_listen(http, api_key is not None)
        except ListenError as exc:
            raise StartError(str(exc)) from None


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
            _check_serves(info, opts)
            _already(as_json, info, opts.socket)
            return
        if not pid_alive(pid):
            tail = _tail(run_dir(opts.store) / LOGFILE)
            raise click.ClickException(f"daemon pid {pid} exited while starting\n{tail}")
        time.sleep(0.2)
    raise click.ClickException(f"daemon pid {pid} did not answer within {timeout:.0f} s")


def _check_serves(info: dict, opts: DaemonOptions) -> None:
    """The daemon answering on our socket must serve the store we start (the same
    directory, on this host) and, when --model is given, that model; else start fails
    rather than report someone else's daemon as ours."""
    theirs = f"store {info.get('store')!r} with model {info.get('model')!r}"
    if not same_store(info, opts.store):
        raise click.ClickException(
            f"{opts.socket} is served by another daemon (pid {info.get('pid')}) on {theirs}, "
            f"not store {str(opts.store)!r}: stop it, or start this store on another --socket"
        )
    if opts.model is not None and info.get("model") != opts.model:
        raise click.ClickException(
            f"{opts.socket} is served by a daemon (pid {info.get('pid')}) on this store with "
            f"model {info.get('model')!r}, not {opts.model!r}: stop it first to change models"
        )


def _model_arg(model: str | None) -> str | None:
    """--model as the daemon reports it: an existing path made absolute (its real path),
    a Hugging Face id as given."""
    if model is None:
        return None
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def absolute_endpoint(endpoint: str) -> str:
    """An ipc endpoint with a relative path made absolute (the daemon reports it, and
    other processes started elsewhere must reach the same socket); others unchanged."""
    if endpoint.startswith("ipc://") and not endpoint[6:].startswith(("/", "@")):
        return "ipc://" + os.path.abspath(endpoint[6:])
    return endpoint


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


def _daemon_lock(info: dict, store: Path) -> Path | None:
    """The daemon lock file that proves the pid of a daemon's `hello` is that daemon:
    its reported run directory's, or --store's when the pidfile there names it."""
    run = info.get("run_dir")
    if isinstance(run, str) and run:
        return Path(run) / LOCKFILE
    found = find_pidfile(store)
    if found is not None and found.live and found.pid == info.get("pid"):
        return found.dir / LOCKFILE
    return None


def _local_pid(info: dict, lock: Path | None, store: Path, endpoint: str) -> int | None:
    """The pid from a daemon's `hello`, if that daemon runs on this machine: it holds
    `lock` (`_daemon_lock`), and --store's pidfile names it, or the endpoint is
    ipc/loopback and it reports this host. Else None (a tcp daemon elsewhere, or a
    tunnel to one: its pid means nothing here)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if lock is None or not holds_lock(pid, lock):  # not provably that daemon
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
        f"was asked to shut down but still answers after {timeout:.0f} s; it is not provably "
        "this machine's daemon (its pid holds no store's daemon lock here), so it was not "
        "signalled"
    )


def _wait_exit(pid: int, lock: Path, wait: float, *, asked: bool = False) -> str:
    """Wait `wait` seconds for a local daemon to exit, then SIGTERM (10 s more when it was
    asked to shut down already, else `wait`), then SIGKILL. A signal goes out only while
    `pid` still holds the store's daemon lock: once it does not, the daemon is gone and
    the pid may be anyone's."""
    steps = [("shutdown", None, wait)] if asked else []
    steps += [("SIGTERM", signal.SIGTERM, 10.0 if asked else wait)]
    steps += [("SIGKILL", signal.SIGKILL, 10.0)]
    for how, sig, seconds in steps:
        if sig is not None:
            if not _owns(pid, lock):
                return _gone(pid, how)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return how
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not _owns(pid, lock):
                return _gone(pid, how)
            time.sleep(0.05)
    raise click.ClickException(f"daemon pid {pid} did not exit")


def _gone(pid: int, how: str, wait: float = 5.0) -> str:
    """The daemon released its lock, so it is exiting: give its process a moment to end
    (never a signal: without the lock the pid proves nothing)."""
    deadline = time.monotonic() + wait
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return how


def _owns(pid: int, lock: Path) -> bool:
    """True while `pid` lives (reaped if it is our child) and holds the daemon lock."""
    return _alive(pid) and holds_lock(pid, lock)


def _stopped(as_json: bool, pid, how: str, reply: dict | None = None, *, remote=False) -> None:
    """Report a stop; exit 1 when the daemon said some finished turns are not durable."""
    data = {"running": False, "pid": pid, "stopped_by": how}
    if remote:
        data["remote"] = True
    unsaved = (reply or {}).get("unsaved") or []
    if reply is not None and reply.get("stopped"):
        data["unsaved"] = unsaved
    text = f"agentkv daemon (pid {pid}) stopped ({how})"
    if unsaved:
        text += "\n" + _unsaved_text(unsaved)
    _out(as_json, data, text)
    if unsaved:
        sys.exit(1)


def _unsaved_text(unsaved: list[dict]) -> str:
    lines = [f"{len(unsaved)} agent(s) not durable: their latest turns are not on disk"]
    lines += [
        f"  {r.get('agent_id')}: {r.get('behind_tokens')} token(s) behind ({r.get('error')})"
        for r in unsaved
    ]
    return "\n".join(lines)


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
    except StorageError as exc:  # e.g. a damaged index met by a lookup: one line
        raise click.ClickException(str(exc)) from None
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


def _cache_dir(store: Path, *, index_ok: bool = True) -> Path:
    """The store's cache directory. Refused: no store there, or (unless not `index_ok`:
    the caller reports it) one whose index is gone beside its cache files."""
    from agentkv.storage import IndexMissingError
    from agentkv.storage.schema import check_index_present

    path = store / "cache"
    if not (path / "index.db").exists() and not (path / "blocks").is_dir():
        raise click.ClickException(f"no store at {store}")
    try:
        check_index_present(path)
    except IndexMissingError as exc:
        if index_ok:
            raise click.ClickException(str(exc)) from None
    return path


def _serving_fingerprint(socket_: str, store: Path, key, timeout: float) -> str | None:
    """The model of the daemon on `socket_`, if it serves this store; else None (gc then
    keeps every model's agents: which model is "current" is the user's to say)."""
    info = _hello(socket_, key, min(timeout, 2.0))
    if not info or not info.get("fingerprint"):
        return None
    if not same_store(info, store):
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


def _usage_line(log_path: Path) -> str:
    """A detached child's usage error: the last "Error:" line of its log."""
    lines = [ln for ln in _tail(log_path).splitlines() if ln.startswith("Error:")]
    return lines[-1].removeprefix("Error:").strip() if lines else _tail(log_path)


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
        + _durability_text(s)
        + _index_error_line(store)
        + (f"\n  http {s['http']}" if s.get("http") else "")
    )


def _durability_text(s: dict) -> str:
    """Write errors and agents whose latest turns are not on disk, if any."""
    errors = s.get("store", {}).get("write_errors", 0)
    unsaved = s.get("unsaved") or []
    if not errors and not unsaved:
        return ""
    text = f"\n  store write errors: {errors}"
    return text + ("\n  " + _unsaved_text(unsaved).replace("\n", "\n  ") if unsaved else "")


def _table(rows: list[dict]) -> str:
    head = (
        f"{'agent':<24}{'tokens':>8}{'cached':>8}{'blocks':>8}{'shared':>8}{'on disk':>8}"
        f"  {'last used':<19}  state"
    )
    lines = [head]
    for r in rows:
        state = r.get("state") or _old_state(r)
        lines.append(
            f"{r['agent_id']:<24}{r['tokens']:>8}{r['cached_tokens']:>8}"
            f"{r['blocks']:>8}{r['shared_blocks']:>8}{r.get('disk_blocks', 0):>8}"
            f"  {_when(r.get('last_used')):<19}  {state}"
        )
    return "\n".join(lines)


def _old_state(row: dict) -> str:
    """The state column for a daemon that does not report `state`."""
    if row.get("busy"):
        return "running"
    if row.get("cached_tokens"):
        return "in memory"
    return "on disk" if row.get("in_store") else "no cache"


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


def _progress(as_json: bool) -> bool:
    """Progress bars only for a person watching: on a terminal, and never with --json."""
    return not as_json and sys.stderr.isatty()


def _index_error_line(store_stats: dict) -> str:
    """The status text's line for an index the daemon cannot read ("" when it can)."""
    error = store_stats.get("index_error")
    return f"\n  index damaged: {error}" if error else ""


def _verify_data(report) -> dict:
    return {
        "checked": report.checked,
        "bytes": report.bytes_checked,
        "corrupt": report.corrupt,
        "index_error": report.index_error,
        "affected_agents": report.affected_agents,
    }


def _index_damage_line(store: Path, report) -> str:
    """verify's one line for an index that is gone or damaged, with the way out."""
    agents = report.affected_agents
    affected = (
        f"{len(agents)} agent(s) affected: {', '.join(agents[:10])}"
        + (", ..." if len(agents) > 10 else "")
        if agents
        else "no agent's rows found unreadable"
    )
    return (
        f"index damaged: {report.index_error}; {affected}; "
        f"rebuild it from the files: daemonctl rebuild-index --store {store}"
    )


def _rebuild_text(r) -> str:
    verb = "would rebuild" if r.dry_run else "rebuilt"
    lines = [
        f"{verb} the index: {len(r.agents)} agents ({r.restored_tokens} tokens), "
        f"{r.blocks} blocks, {len(r.models)} model(s)"
    ]
    if r.old_index:
        lines.append(f"old index kept as {r.old_index}")
    for title, items in (
        ("agents with less cache (recomputed on use)", r.cut_agents),
        ("agents lost (their context cannot be recovered)", r.lost_agents),
        ("files left aside (bad or not the store's; gc removes them)", r.bad_files),
    ):
        if items:
            lines.append(f"{title}: {len(items)}")
            lines += [f"  {item}" for item in items]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
