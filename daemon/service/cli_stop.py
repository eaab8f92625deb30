"""daemonctl stop: ask the daemon to drain, then signal it, but only while its pid provably
is this store's daemon (it holds the store's daemon lock)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import click

from agentkv.client import Client
from agentkv.client.errors import AgentKVClientError

from .cli_common import _hello, _out, common, main
from .cli_format import _unsaved_text
from .process import is_local_endpoint
from .runfiles import LOCKFILE, find_pidfile, holds_lock, pid_alive, read_pid, remove_stale


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


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if done == pid:
            return False
    except ChildProcessError:
        pass
    return pid_alive(pid)
