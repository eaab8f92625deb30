"""The daemonctl click group and what its commands share: the common options
(--socket, --store, --json, --timeout, --auth-key), exit codes, reaching the daemon
(`_hello`, `_client`, `_call`) and printing a result as text or JSON."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path

import click

from agentkv.client import Client, DaemonUnavailable
from agentkv.client.errors import AgentKVClientError
from agentkv.client.paths import default_socket, default_store

from .process import listening
from .runfiles import read_pid, read_state, store_path

EXIT_DEAD_PIDFILE = 1  # LSB: program is dead and a pidfile exists
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


def absolute_endpoint(endpoint: str) -> str:
    """An ipc endpoint with a relative path made absolute (the daemon reports it, and
    other processes started elsewhere must reach the same socket); others unchanged."""
    if endpoint.startswith("ipc://") and not endpoint[6:].startswith(("/", "@")):
        return "ipc://" + os.path.abspath(endpoint[6:])
    return endpoint


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


def _store_socket(store: Path) -> str | None:
    """The endpoint of the daemon running on this store (its state file), if one runs: with
    no --socket, commands about a store reach its daemon wherever it listens."""
    if read_pid(store) is None:
        return None
    endpoint = read_state(store).get("socket")
    return endpoint if isinstance(endpoint, str) and endpoint else None


def _out(as_json: bool, data, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


def _progress(as_json: bool) -> bool:
    """Progress bars only for a person watching: on a terminal, and never with --json."""
    return not as_json and sys.stderr.isatty()
