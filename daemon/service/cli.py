"""daemonctl: start, stop and look into the agentkv daemon.

Exit codes follow supervisorctl/LSB: `status` 0 running, 3 not running, 4 unreachable;
2 bad usage; 1 other failures. Starting a running daemon (or one still loading its model)
and stopping a stopped one succeed.

Only `start` (in the daemon process) and the store commands load anything heavy: the
daemon package's MLX parts load on first use, so status/stop/agents/inspect/delete and
--help start in a fraction of a second.

Modules: cli (this: the group's entry point, start and status), cli_stop (stop),
cli_store (agents and store commands), cli_common (the group, shared options and
helpers), cli_format (text rendering).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click

from agentkv.client import AuthMismatch, Client, DaemonUnavailable, Unauthorized
from agentkv.client.errors import AgentKVClientError

from . import cli_stop, cli_store  # noqa: F401 - registers their commands on `main`
from .cli_common import (  # noqa: F401 - parse_size, absolute_endpoint: public here
    EXIT_DEAD_PIDFILE,
    EXIT_NOT_RUNNING,
    EXIT_UNREACHABLE,
    _hello,
    _out,
    absolute_endpoint,
    common,
    main,
    parse_size,
)
from .cli_format import _status_text, _unsaved_text
from .cli_store import _serving_fingerprint  # noqa: F401 - tests import it from here
from .process import (
    EXIT_STORE_IN_USE,
    EXIT_USAGE,
    BadOptionError,
    DaemonOptions,
    StartError,
    check_endpoint,
    listening,
    read_key,
    run_daemon,
)
from .runfiles import (
    LOGFILE,
    find_pidfile,
    pid_alive,
    read_pid,
    read_state,
    remove_stale,
    run_dir,
    same_store,
)


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
    "--world-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="ranks on this machine: the model's heads split over them (mx.distributed)",
)
@click.option(
    "--hosts",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="MLX ring hostfile of every rank (this one is rank 0); instead of --world-size",
)
@click.option(
    "--backend",
    type=click.Choice(["ring", "jaccl", "mpi", "any"]),
    default="ring",
    show_default=True,
    help="mx.distributed backend of a distributed daemon (jaccl, mpi: with --hosts)",
)
@click.option(
    "--collective-timeout",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    metavar="SECONDS",
    help="a rank silent this long stops a distributed daemon",
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
    world_size,
    hosts,
    backend,
    collective_timeout,
    http,
    api_key,
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
        world_size=world_size,
        hosts=hosts.resolve() if hosts else None,
        backend=backend,
        collective_timeout=collective_timeout,
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
        _run_foreground(opts)
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


def _run_foreground(opts: DaemonOptions) -> None:
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run_daemon(opts)
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
            [sys.executable, "-m", "agentkv.daemon.service.process", opts.to_json()],
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


def _already(as_json: bool, info: dict, endpoint: str) -> None:
    _out(
        as_json,
        {"running": True, "pid": info["pid"], "already": True},
        f"agentkv daemon already running (pid {info['pid']}) on {endpoint}",
    )


def _usage_line(log_path: Path) -> str:
    """A detached child's usage error: the last "Error:" line of its log."""
    lines = [ln for ln in _tail(log_path).splitlines() if ln.startswith("Error:")]
    return lines[-1].removeprefix("Error:").strip() if lines else _tail(log_path)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


if __name__ == "__main__":
    main()
