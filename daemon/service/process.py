"""The daemon process: options, pidfile, logging, the model and the server, run in the
foreground. `daemonctl start --foreground` runs it in its own process; plain `start` runs
it in a detached child, `python -m agentkv.daemon.service.process OPTIONS_JSON`: the
options travel as `DaemonOptions.to_json()`, whole, and are never parsed as flags again.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlparse

from agentkv.client import protocol
from agentkv.client.paths import default_socket, default_store

from .runfiles import (
    LOCKFILE,
    LOGFILE,
    PIDFILE,
    STATEFILE,
    pid_alive,
    read_pid,
    read_state,
    run_dir,
    store_identity,
    store_path,
)

__all__ = [
    "EXIT_STORE_IN_USE",
    "EXIT_USAGE",
    "LOGFILE",
    "DaemonOptions",
    "StartError",
    "StoreInUseError",
    "pid_alive",
    "read_pid",
    "read_state",
    "run_daemon",
]

log = logging.getLogger("agentkv.daemon")

EXIT_USAGE = 2  # the detached daemon's exit status for an option that cannot work
EXIT_STORE_IN_USE = 75  # ... and for a store another daemon holds (start waits for that one)
_PATH_OPTIONS = ("store", "auth_key", "hosts", "api_key")  # DaemonOptions fields that are paths


@dataclass(slots=True)
class DaemonOptions:
    """What `daemonctl start` passes to the daemon."""

    model: str | None = None
    store: Path = field(default_factory=default_store)
    socket: str = field(default_factory=default_socket)
    memory_budget: int = 1 << 30
    disk_budget: int | None = None
    pool_blocks: int | None = None
    block_size: int = 256
    auth_key: Path | None = None
    cancel_on_shutdown: bool = False
    prefill_step_size: int = 512
    client_ttl: float = 300.0
    world_size: int = 1  # ranks on this machine (mx.distributed tensor parallelism)
    hosts: Path | None = None  # or an MLX ring hostfile naming every rank
    backend: str = "ring"  # the mx.distributed backend of a distributed daemon
    collective_timeout: float = 120.0  # a rank lost this long stops the daemon
    http: str | None = None  # HOST:PORT of the HTTP front (daemon/service/http), if any
    api_key: Path | None = None  # the HTTP front's API key file

    def to_json(self) -> str:
        """Every option as one JSON object (paths as strings)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _PATH_OPTIONS:
            if data[name] is not None:
                data[name] = str(data[name])
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> DaemonOptions:
        """The options `to_json` wrote.

        Raises:
            ValueError: not such a JSON object (bad JSON, unknown or missing-typed fields).
        """
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not set(data) <= known:
            raise ValueError(f"not daemon options: {text[:200]!r}")
        for name in _PATH_OPTIONS:
            if data.get(name) is not None:
                data[name] = Path(data[name])
        return cls(**data)


class StartError(Exception):
    """The daemon cannot start with these options (bad endpoint, store in use, ...)."""


def _check_pool_fits(opts: DaemonOptions, bytes_per_block: int) -> None:
    """Refuse a pool (--pool-blocks or --memory-budget) that holds no block of this model
    (BadOptionError), or that is larger than the machine's memory (StartError): it could
    never be filled, and its bookkeeping alone would exhaust memory."""
    if opts.pool_blocks:
        asked, what = opts.pool_blocks * bytes_per_block, f"--pool-blocks {opts.pool_blocks}"
    else:
        asked, what = opts.memory_budget, f"--memory-budget {opts.memory_budget}"
    if bytes_per_block > 0 and asked < bytes_per_block:
        raise BadOptionError(
            f"{what} holds no KV block of this model: one block takes "
            f"{bytes_per_block} bytes ({bytes_per_block / 2**20:.2f} MiB); give at least that"
        )
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not known here: no check
        return
    if asked > memory:
        raise StartError(
            f"{what} asks for {asked / 2**30:.1f} GiB of KV cache, more than this machine's "
            f"{memory / 2**30:.1f} GiB of memory"
        )


class BadOptionError(StartError):
    """An option's value cannot work with this model (a pool that holds no block, ...):
    a usage error."""


class StoreInUseError(StartError):
    """Another daemon holds the store's lock (running, or still loading its model)."""


def check_endpoint(endpoint: str, auth_key: Path | None) -> None:
    """ipc:// paths and loopback tcp are fine; any other address needs an auth key, and so
    does an abstract-namespace ipc socket (`ipc://@name`: no file, so no 0700 directory
    keeps other local users out). An auth key must hold MIN_KEY_BYTES or more."""
    if auth_key is not None:
        read_key(auth_key)
    url = urlparse(endpoint)
    if url.scheme == "ipc":
        if endpoint[len("ipc://") :].startswith("@") and auth_key is None:
            raise StartError(
                f"{endpoint} is an abstract socket any local user can connect to: "
                "it needs --auth-key FILE (or use an ipc path, kept in a 0700 directory)"
            )
        return
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise StartError(f"unsupported endpoint {endpoint!r}: use ipc://PATH or tcp://HOST:PORT")
    if not _is_loopback(url.hostname) and auth_key is None:
        raise StartError(f"{endpoint} is not a loopback address: it needs --auth-key FILE")


def read_key(path: Path) -> bytes:
    """The auth key file's bytes. Raises StartError if unreadable or too short."""
    try:
        return protocol.load_key(path)
    except OSError as exc:
        raise StartError(f"cannot read the auth key {path}: {exc.strerror}") from None
    except protocol.ProtocolError as exc:
        raise StartError(str(exc)) from None


def is_local_endpoint(endpoint: str) -> bool:
    """True for ipc:// and loopback tcp: whatever answers there runs on this machine
    (unless a tunnel forwards it, which is why callers also compare host names)."""
    url = urlparse(endpoint)
    if url.scheme == "ipc":
        return True
    return url.scheme == "tcp" and bool(url.hostname) and _is_loopback(url.hostname)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listening(endpoint: str, timeout: float = 0.5) -> bool | None:
    """Whether anything accepts connections at an endpoint: True, False (nothing there:
    no socket file, or the connection is refused), or None when it cannot tell.

    A plain connect, so `status`, `stop` and `start` need not wait a ZeroMQ timeout to
    learn that no daemon runs.
    """
    url = urlparse(endpoint)
    if url.scheme == "ipc":
        path = endpoint[len("ipc://") :]
        if path.startswith("@"):  # abstract namespace: no file to look at
            return None
        if not os.path.exists(path):
            return False
        family, address = socket.AF_UNIX, path
    elif url.scheme == "tcp" and url.hostname and url.port:
        family = socket.AF_INET6 if ":" in url.hostname else socket.AF_INET
        address = (url.hostname, url.port)
    else:
        return None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return None
    return True


def run_daemon(opts: DaemonOptions) -> dict:
    """Run the daemon until SIGTERM, SIGINT or a shutdown request; returns after draining.

    Returns:
        The shutdown report: `unsaved` lists agents whose latest turns could not be made
        durable (agent id, tokens behind, why); empty when everything is on disk.

    Raises:
        StartError: bad endpoint or key, something listens there already, or another
            daemon has the store.
    """
    check_endpoint(opts.socket, opts.auth_key)
    if listening(opts.socket):  # binding an ipc path would take it from the other daemon
        raise StartError(f"another process is listening on {opts.socket}")
    opts.store = store_path(opts.store)
    try:
        opts.store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartError(f"cannot create store {opts.store}: {exc.strerror}") from None
    run = run_dir(opts.store, create=True)
    lock = _lock_store(opts.store, run)  # before anything else: one daemon per store
    try:
        from .ranks import check_start

        check_start(opts)  # the world size fits the model and the store
        return _serve(opts, run)
    finally:
        lock.close()  # releases the flock


def _serve(opts: DaemonOptions, run: Path) -> dict:
    from .server import DaemonServer

    _prepare_ipc(opts.socket)
    _setup_logging(run)
    if run != opts.store:
        log.warning("store %s is not writable: pidfile, lock and log are in %s", opts.store, run)
    key = read_key(opts.auth_key) if opts.auth_key else None
    info = {
        "pid": os.getpid(),
        "socket": opts.socket,
        "store": str(opts.store),
        "store_id": {k: v for k, v in (store_identity(opts.store) or {}).items() if k != "path"},
        "run_dir": str(run),
        "started": time.time(),
        "host": socket.gethostname(),
    }
    front = _http_front(opts, run, info)
    _claim_pidfile(run, info)
    try:
        server = DaemonServer(
            _engine_factory(opts, info),
            opts.socket,
            info=info,
            auth_key=key,
            cancel_on_shutdown=opts.cancel_on_shutdown,
            client_ttl=opts.client_ttl,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.request_shutdown())
        server.serve(ready=lambda: _ready(opts, front))
        _log_report(server.shutdown_report)
        return server.shutdown_report
    finally:
        if front is not None:
            front.stop()
        _release_pidfile(run)


def _http_front(opts: DaemonOptions, run: Path, info: dict):
    """The HTTP front of `--http`, not started yet (None without --http)."""
    if opts.http is None:
        return None
    from .http.listen import ListenError
    from .http.supervisor import HttpFront

    try:
        front = HttpFront(opts.http, opts.socket, opts.auth_key, opts.api_key, run / LOGFILE)
    except ListenError as exc:
        raise BadOptionError(str(exc)) from None
    info["http"] = f"http://{opts.http}"
    return front


def _ready(opts: DaemonOptions, front) -> None:
    """The socket is bound: start the HTTP front (it connects as one more client)."""
    if front is not None:
        front.start()
    log.info("serving on %s (pid %d)", opts.socket, os.getpid())


def _log_report(report: dict) -> None:
    unsaved = report.get("unsaved") or []
    if not unsaved:
        log.info("stopped: every finished turn is on disk")
        return
    for row in unsaved:
        log.error(
            "agent %r is %d token(s) behind on disk: %s",
            row["agent_id"],
            row["behind_tokens"],
            row["error"],
        )
    log.error("stopped with %d agent(s) not durable", len(unsaved))


def _make_engine(opts: DaemonOptions, info: dict, make_store=None):
    """Runs on the engine thread: load the model, build spec, pool, store and engine.

    `make_store(root, disk_budget=...)` builds the store (default: CacheStore); tests pass
    a CacheStore subclass that injects faults.
    """
    from agentkv.storage import CacheStore

    from ..engine import ModelCacheSpec
    from ..engine.assemble import assemble_engine
    from ..engine.fingerprint import model_fingerprint
    from ..engine.model_factory import default_model_dir, ensure_default_model, load_model

    tic = time.perf_counter()
    model, tokenizer = load_model(opts.model or ensure_default_model())
    path = _model_dir(opts.model) or default_model_dir()
    fingerprint = model_fingerprint(path) if path and path.exists() else None
    spec = ModelCacheSpec.from_model(model, block_size=opts.block_size, fingerprint=fingerprint)
    _check_pool_fits(opts, spec.bytes_per_token * opts.block_size)
    store = (make_store or CacheStore)(opts.store / "cache", disk_budget=opts.disk_budget)
    engine = assemble_engine(model, tokenizer, spec, opts, store, opts.model or "default")
    pool = engine.pool
    info.update(serving_info(opts, spec, pool, tic), tool_calling=engine.tool_calling)
    log.info(
        "model %s (%s) loaded in %.1f s; pool %d blocks",
        info["model"],
        spec.model_type,
        info["load_s"],
        pool.total_blocks,
    )
    return engine


def _engine_factory(opts: DaemonOptions, info: dict):
    """The engine thread's factory: one process, or rank 0 of a distributed group."""
    if opts.world_size > 1 or opts.hosts:
        from .ranks import rank_zero_engine

        return lambda: rank_zero_engine(opts, info)
    return lambda: _make_engine(opts, info)


def _model_dir(name: str | None) -> Path | None:
    if name is None:
        return None
    path = Path(name).expanduser()
    if path.exists():  # a model directory or a GGUF file (fingerprinted as such)
        return path
    try:  # a Hugging Face id already in the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        return None


def _prepare_ipc(endpoint: str) -> None:
    url = urlparse(endpoint)
    if url.scheme == "ipc":
        path = Path(endpoint[len("ipc://") :])
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)


def _setup_logging(run: Path) -> None:
    """Log to the run directory's daemon.log (to stderr alone if it cannot be opened)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    try:
        handler = logging.FileHandler(run / LOGFILE)
    except OSError as exc:
        if not root.handlers:
            logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log.warning("cannot write the log file %s: %s; logging to stderr", run / LOGFILE, exc)
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


def _lock_store(store: Path, run: Path):
    """Take the store's daemon lock (flock, released when the process exits, however it
    exits); two daemons starting at once on one store cannot both get it.

    Raises:
        StoreInUseError: another daemon holds it (running, or still loading its model).
    """
    from agentkv.storage.locks import try_lock

    try:
        f = try_lock(run / LOCKFILE)  # held open for the daemon's life
    except OSError as exc:
        raise StartError(f"cannot take the daemon lock {run / LOCKFILE}: {exc.strerror}") from None
    if f is None:
        pid = read_pid(store)
        who = f"a daemon (pid {pid})" if pid else "another daemon"
        raise StoreInUseError(f"{who} is already running on store {store}")
    return f


def _claim_pidfile(run: Path, info: dict) -> None:
    """Write the pidfile and state file (fsynced); the caller holds the store's lock."""
    for name, text in ((PIDFILE, f"{os.getpid()}\n"), (STATEFILE, json.dumps(info))):
        tmp = run / f".{name}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, run / name)


def _release_pidfile(run: Path) -> None:
    """Remove the pidfile only if it is still ours."""
    try:
        if int((run / PIDFILE).read_text().strip()) == os.getpid():
            (run / PIDFILE).unlink()
            (run / STATEFILE).unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """The detached daemon `daemonctl start` spawns: `python -m agentkv.daemon.service.process
    OPTIONS_JSON` (`DaemonOptions.to_json()`). Its stderr is the daemon's log, where a
    failure is one `Error: ...` line.

    Returns:
        The exit status: 0 stopped with every finished turn on disk; 1 failed, or stopped
        with agents not durable; EXIT_USAGE bad options; EXIT_STORE_IN_USE the store is
        another daemon's.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise ValueError("usage: python -m agentkv.daemon.service.process OPTIONS_JSON")
        opts = DaemonOptions.from_json(args[0])
    except (ValueError, TypeError) as exc:
        return _fail(f"Error: {exc}", EXIT_USAGE)
    try:
        report = run_daemon(opts)
    except StoreInUseError as exc:
        return _fail(f"agentkv: {exc}", EXIT_STORE_IN_USE)
    except BadOptionError as exc:
        return _fail(f"Error: {exc}", EXIT_USAGE)
    except StartError as exc:
        return _fail(f"Error: {exc}", 1)
    except Exception as exc:
        return _fail(f"Error: {type(exc).__name__}: {exc}", 1)
    if report.get("unsaved"):  # supervisors (systemd, ...) see the exit status
        from .cli_format import _unsaved_text

        return _fail(_unsaved_text(report["unsaved"]), 1)
    return 0


def _fail(message: str, status: int) -> int:
    print(message, file=sys.stderr, flush=True)
    return status


def serving_info(opts: DaemonOptions, spec, pool, since: float) -> dict:
    """What `hello` and `stats` say about the model and pool being served."""
    return {
        "model": opts.model or "default",
        "model_type": spec.model_type,
        "fingerprint": spec.fingerprint,
        "block_size": pool.block_size,
        "pool_blocks": pool.total_blocks,
        "load_s": round(time.perf_counter() - since, 3),
    }


if __name__ == "__main__":  # run the package's copy of this module, not a second one
    from agentkv.daemon.service.process import main as _main

    sys.exit(_main())
