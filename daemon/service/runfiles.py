"""Where a store's daemon keeps its pidfile, state file, lock and log, and how other
processes tell whether that daemon still runs.

The files live in the store directory; a store the daemon cannot write (a read-only file
system, say) keeps them in a private directory under the runtime directory instead, named
after the store's real path, so every process finds them for the same store.

A pid read from a pidfile is trusted only while that process holds the store's daemon lock
(an flock the daemon takes before anything else and holds for its whole life, however it
exits). A daemon killed with -9 leaves its pidfile behind and the lock free; its pid may be
reused by any other process, which must never be signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from agentkv.client.paths import runtime_dir

PIDFILE = "daemon.pid"
STATEFILE = "daemon.json"
LOGFILE = "daemon.log"
LOCKFILE = "daemon.lock"  # flock held by the daemon for its whole life


def store_path(store: str | os.PathLike[str]) -> Path:
    """The store's absolute real path (what daemons report, and what is compared)."""
    return Path(store).expanduser().resolve()


def store_identity(store: Path) -> dict | None:
    """What identifies a store beyond its name: real path, device and inode of its
    directory, and this host. None if the directory does not exist."""
    path = store_path(store)
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"path": str(path), "dev": st.st_dev, "ino": st.st_ino, "host": socket.gethostname()}


def same_store(reported: dict, store: Path) -> bool:
    """True if a daemon's reported facts (`hello`/`stats`: `store`, `store_id`, `host`)
    name this very store: the same real path and directory (device and inode) on the same
    host. A relative path, or another machine's, never matches."""
    mine = store_identity(store)
    theirs = reported.get("store_id")
    if mine is None or not isinstance(theirs, dict):
        return False
    return (
        reported.get("host") == mine["host"]
        and reported.get("store") == mine["path"]
        and theirs.get("dev") == mine["dev"]
        and theirs.get("ino") == mine["ino"]
    )


def writable(store: Path) -> bool:
    """True if the daemon can create its files in the store directory (or create it)."""
    path = store_path(store)
    while not path.exists():  # a store still to be made: its nearest existing parent
        if path.parent == path:
            return False
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def fallback_dir(store: Path) -> Path:
    """The private directory for a store the daemon cannot write (0700, in the runtime
    directory, named by a hash of the store's real path)."""
    digest = hashlib.sha256(str(store_path(store)).encode()).hexdigest()[:16]
    return runtime_dir() / "stores" / digest


def run_dir(store: Path, *, create: bool = False) -> Path:
    """Where the daemon of `store` keeps its files: the store itself when writable."""
    if writable(store):
        return store_path(store)
    path = fallback_dir(store)
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _candidates(store: Path) -> list[Path]:
    """Every place a daemon of `store` may have put its files, the store first."""
    return [store_path(store), fallback_dir(store)]


@dataclass(slots=True)
class Pidfile:
    """A pidfile found for a store, and whether its daemon still runs.

    Attributes:
        dir: the directory holding it.
        pid: the pid it names (None if unreadable).
        live: True only if that process is alive and holds the store's daemon lock.
    """

    dir: Path
    pid: int | None
    live: bool


def find_pidfile(store: Path) -> Pidfile | None:
    """The pidfile of `store`'s daemon, live or stale; None when there is none."""
    found = None
    for d in _candidates(store):
        if not (d / PIDFILE).exists():
            continue
        try:
            pid = int((d / PIDFILE).read_text().strip())
        except (OSError, ValueError):
            pid = None
        live = pid is not None and pid > 0 and holds_lock(pid, d / LOCKFILE)
        if live:
            return Pidfile(d, pid, True)
        found = found or Pidfile(d, pid, False)
    return found


def read_pid(store: Path) -> int | None:
    """The pid of the daemon running on `store`, proven by its lock; else None."""
    found = find_pidfile(store)
    return found.pid if found is not None and found.live else None


def read_state(store: Path) -> dict:
    """The running daemon's recorded facts (socket, pid, ...), or {}."""
    found = find_pidfile(store)
    if found is None or not found.live:
        return {}
    try:
        state = json.loads((found.dir / STATEFILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def remove_stale(store: Path) -> Pidfile | None:
    """Remove a dead daemon's pidfile and state file (its lock is free, so no daemon
    owns them); returns what was removed, None if nothing was stale."""
    found = find_pidfile(store)
    if found is None or found.live or lock_held(found.dir / LOCKFILE):
        return None
    for name in (PIDFILE, STATEFILE):
        with contextlib.suppress(OSError):
            (found.dir / name).unlink()
    return found


def holds_lock(pid: int, lockfile: Path) -> bool:
    """True if process `pid` holds the flock on `lockfile`.

    On Linux, /proc/locks names the holder. Where it cannot be read, a held lock is taken
    as held by the pidfile's process when that process is alive.
    """
    holders = _flock_holders(lockfile)
    if holders is not None:
        return pid in holders and pid_alive(pid)
    return pid_alive(pid) and lock_held(lockfile)


def lock_held(lockfile: Path) -> bool:
    """True if some process holds the flock on `lockfile`."""
    holders = _flock_holders(lockfile)
    if holders is not None:
        return bool(holders)
    # No /proc/locks: a non-blocking shared lock, released at once, tells.
    try:
        fd = os.open(lockfile, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the test lock
    return False


def _flock_holders(lockfile: Path) -> set[int] | None:
    """Pids holding an flock on `lockfile`, from /proc/locks (empty if the file does not
    exist); None where /proc/locks cannot be read."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    try:
        st = os.stat(lockfile)
    except OSError:
        return set()
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 3399 fe:00:2147237 0 EOF"; waiters have "->" first
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == device:
            with contextlib.suppress(ValueError):
                holders.add(int(parts[4]))
    return holders


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie (an exited daemon whose parent has
    not reaped it yet, e.g. under a container init that never reaps). A process is gone
    only when all its threads are: the main thread can be a zombie while others still
    exit, holding the process's files (and the store's lock)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return not Path("/proc/self").exists()  # no procfs (macOS): kill() is all we know
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # that thread is gone
        if stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X"):
            return True
    return False
