"""Default locations shared by the daemon, daemonctl and the client."""

from __future__ import annotations

import os
from pathlib import Path


def agentkv_home() -> Path:
    """$AGENTKV_HOME, else ~/.local/share/agentkv (store, logs)."""
    env = os.environ.get("AGENTKV_HOME")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "agentkv"


def runtime_dir() -> Path:
    """A 0700 directory for the daemon's ipc socket ($XDG_RUNTIME_DIR/agentkv or
    /tmp/agentkv-<uid>); created on demand, its mode enforced."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "agentkv" if base else Path(f"/tmp/agentkv-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def default_socket() -> str:
    """$AGENTKV_SOCKET, else an ipc socket in the runtime directory."""
    return os.environ.get("AGENTKV_SOCKET") or f"ipc://{runtime_dir() / 'daemon.sock'}"


def default_store() -> Path:
    """$AGENTKV_STORE, else <agentkv_home>/store."""
    env = os.environ.get("AGENTKV_STORE")
    return Path(env).expanduser() if env else agentkv_home() / "store"
