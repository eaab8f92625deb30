"""A daemon over several ranks (mx.distributed tensor parallelism): the checks at start,
the local ranks' hostfile and processes, rank 0's engine and the followers' main.

`daemonctl start --world-size N` runs rank 0 (the daemon: sockets, scheduling, index)
and starts ranks 1..N-1 on this machine itself, as `mlx.launch` would (MLX_RANK and
MLX_HOSTFILE, a free port per rank). With `--hosts HOSTFILE` (MLX's ring hostfile: one
list of "ip:port" per rank; or, for `--backend jaccl`, mlx.launch's hostfile) rank 0 runs
here and every other rank is started on its own machine with
`python -m agentkv.daemon.service.ranks --rank R --hosts HOSTFILE ...`.
No MLX import at module level.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from .heap import freeze_startup_heap
from .process import BadOptionError, StartError, _check_pool_fits, serving_info
from .runfiles import run_dir

log = logging.getLogger("agentkv.distributed")

WORLD_FILE = "world.json"  # STORE/world.json: the world size the store was written at
HOSTFILE = "hostfile.json"  # the local ranks' ring hostfile, in the run directory


class WorldSizeMismatchError(StartError):
    """The store holds per-rank caches of another world size: they are never mixed."""


class BackendUnavailableError(StartError):
    """The mx.distributed backend asked for is not in this mlx build."""


def world_size(opts) -> int:
    """The number of ranks: the hostfile's, else `--world-size`."""
    if getattr(opts, "hosts", None):
        return len(read_hostfile(Path(opts.hosts)))
    return getattr(opts, "world_size", 1) or 1


def read_hostfile(path: Path) -> list:
    """The ranks of a hostfile: MLX's ring hostfile (a JSON list, per rank, of "ip:port"
    strings), or mlx.launch's (a JSON object whose "hosts" lists, per rank, an object
    with "ips" and, for JACCL, "rdma"): one entry per rank."""
    try:
        hosts = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadOptionError(f"cannot read the hostfile {path}: {exc}") from None
    if isinstance(hosts, dict):
        hosts = hosts.get("hosts")
        ok = isinstance(hosts, list) and all(isinstance(h, dict) for h in hosts)
    else:
        ok = isinstance(hosts, list) and all(
            isinstance(h, list) and h and all(isinstance(a, str) for a in h) for h in hosts
        )
    if not ok or len(hosts) < 2:
        raise BadOptionError(
            f'{path}: expected a list per rank of "ip:port" strings (or mlx.launch\'s '
            '{"hosts": [...]}), 2 ranks or more'
        )
    return hosts


def check_backend(opts, n: int) -> None:
    """The backend is in this mlx build and fits the ranks' layout.

    Raises:
        BackendUnavailableError: not in this mlx build (the message names those that are).
        BadOptionError: a backend for a daemon of one rank, JACCL or MPI without --hosts,
            or a hostfile of the other backend's format.
    """
    backend = getattr(opts, "backend", "ring")
    if n == 1:
        if backend != "ring":
            raise BadOptionError(f"--backend {backend} needs --world-size N or --hosts FILE")
        return
    from ..engine.distributed.build import available_backends

    have = available_backends()
    if backend != "any" and backend not in have:
        raise BackendUnavailableError(
            f"the mx.distributed backend {backend!r} is not available in this mlx build; "
            f"available here: {', '.join(have) or 'none'}"
        )
    if backend in ("jaccl", "mpi") and not opts.hosts:
        raise BadOptionError(f"--backend {backend} needs --hosts FILE (local ranks use ring)")
    ring_file = not opts.hosts or isinstance(read_hostfile(Path(opts.hosts))[0], list)
    if backend == "ring" and not ring_file:
        raise BadOptionError('--backend ring needs a ring hostfile: a list per rank of "ip:port"')
    if backend == "jaccl" and ring_file:
        raise BadOptionError("--backend jaccl needs mlx.launch's hostfile (with rdma devices)")


def check_start(opts) -> None:
    """Before anything loads (the caller holds the store's lock): the world size fits the
    model's heads and the store's per-rank caches; a first distributed start records it.

    Raises:
        BadOptionError: the heads do not divide, or the model is not a local directory.
        WorldSizeMismatchError: the store was written at another world size.
    """
    n = world_size(opts)
    check_backend(opts, n)
    written = _written_world(Path(opts.store))
    if written not in (None, n):
        hint = f"--world-size {written}" if written > 1 else "one rank"
        raise WorldSizeMismatchError(
            f"store {opts.store} holds caches sharded over {written} rank(s); this start asks "
            f"for {n}: start it with {hint} (or use another store)"
        )
    if n == 1:
        return
    model_dir = local_model_dir(opts.model)
    from ..engine.distributed.build import check_heads
    from ..errors import WorldSizeError

    try:
        check_heads(json.loads((model_dir / "config.json").read_text()), n)
    except WorldSizeError as exc:
        raise BadOptionError(str(exc)) from None
    marker = Path(opts.store) / WORLD_FILE
    if not marker.exists():
        try:
            marker.write_text(json.dumps({"world_size": n}))
        except OSError as exc:
            raise StartError(f"cannot write {marker}: {exc.strerror}") from None


def _written_world(store: Path) -> int | None:
    """The world size the store's caches were written at; None for a fresh store."""
    marker = store / WORLD_FILE
    if marker.exists():
        try:
            return int(json.loads(marker.read_text())["world_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StartError(f"{marker} is damaged ({exc})") from None
    return 1 if (store / "cache").exists() else None


def local_model_dir(model: str | None) -> Path:
    """The model directory every rank loads (a GGUF file is converted once here)."""
    from ..engine.gguf import gguf_model_dir
    from ..engine.model_factory import ensure_default_model

    if model is None:
        return ensure_default_model()
    path = Path(model).expanduser()
    if path.is_file():
        return gguf_model_dir(path)
    if not (path / "config.json").is_file():
        raise BadOptionError(f"a distributed daemon needs a local model directory, not {model!r}")
    return path


def rank_stores(store: Path) -> list[Path]:
    """The other ranks' store directories of a distributed daemon's store (rank 0's is
    STORE/cache, as for one process)."""
    return sorted(p for p in Path(store).glob("rank-*-of-*") if p.is_dir())


def verify_ranks(store: Path, report, progress=None) -> None:
    """Add every other rank's store to `verify`'s report (a damaged index of one counts
    as a corrupt entry naming it)."""
    from agentkv.storage.maintenance import verify_store

    for path in rank_stores(store):
        r = verify_store(path, progress=progress)
        report.checked += r.checked
        report.bytes_checked += r.bytes_checked
        report.corrupt += r.corrupt
        if r.index_error is not None:
            report.corrupt.append(f"{path}: {r.index_error}")


def local_hostfile(store: Path, n: int) -> Path:
    """A ring hostfile of `n` ranks on 127.0.0.1, each on a free port of its own (two
    groups on the default ports would connect to each other)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        hosts = [[f"127.0.0.1:{s.getsockname()[1]}"] for s in socks]
    finally:
        for s in socks:
            s.close()
    path = run_dir(store, create=True) / HOSTFILE
    path.write_text(json.dumps(hosts))
    return path


def follower_args(opts, rank: int, hostfile: Path) -> list[str]:
    """The command line of rank `rank` (> 0) for these options."""
    args = [sys.executable, "-m", "agentkv.daemon.service.ranks", "--rank", str(rank)]
    args += ["--hosts", str(hostfile), "--store", str(opts.store)]
    args += ["--memory-budget", str(opts.memory_budget), "--block-size", str(opts.block_size)]
    args += ["--prefill-step-size", str(opts.prefill_step_size)]
    args += ["--collective-timeout", str(opts.collective_timeout)]
    args += ["--backend", getattr(opts, "backend", "ring")]
    for flag, value in (
        ("--model", opts.model),
        ("--pool-blocks", opts.pool_blocks),
        ("--disk-budget", opts.disk_budget),
    ):
        if value is not None:
            args += [flag, str(value)]
    return args


def spawn_local(opts, hostfile: Path, n: int) -> list[subprocess.Popen]:
    """Start ranks 1..n-1 on this machine; each logs to STORE/rank-R.log (its pid in
    STORE/rank-R.pid)."""
    procs = []
    run = run_dir(opts.store, create=True)
    for rank in range(1, n):
        with open(run / f"rank-{rank}.log", "ab") as out:
            procs.append(
                subprocess.Popen(
                    follower_args(opts, rank, hostfile),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                )
            )
        (run / f"rank-{rank}.pid").write_text(f"{procs[-1].pid}\n")
    return procs


def _watch_start(procs: list[subprocess.Popen], run: Path, ready: threading.Event) -> None:
    """Until the group formed: a local rank that exits would leave rank 0 waiting in
    init forever, so rank 0 ends with it."""

    def watch():
        while not ready.wait(0.2):
            for rank, p in enumerate(procs, start=1):
                if p.poll() is not None:
                    log.error(
                        "rank %d exited with %d before the group formed; its log ends:\n%s",
                        rank,
                        p.returncode,
                        _tail(run / f"rank-{rank}.log"),
                    )
                    logging.shutdown()
                    os._exit(1)

    threading.Thread(target=watch, name="agentkv-rank-watch", daemon=True).start()


def _local_logs(store: Path, procs: list[subprocess.Popen]) -> str:
    """The ends of the local ranks' logs that exited (after a few seconds' grace)."""
    text = ""
    for rank, p in enumerate(procs, start=1):
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue
        tail = _tail(run_dir(store) / f"rank-{rank}.log", lines=6)
        text += f"\nrank {rank} exited with {p.returncode}; its log ends:\n{tail}"
    return text


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"


def open_rank(opts, rank: int, hostfile: Path):
    """Join the group, load this rank's shard and engine, reconcile the stores.

    Returns:
        (engine, channel).
    """
    from ..engine.distributed.build import build_engine, init_group
    from ..engine.distributed.channel import Channel, Watchdog
    from ..engine.distributed.reconcile import reconcile

    n = world_size(opts)
    watchdog = Watchdog(rank)
    watchdog.arm("joining the group", opts.collective_timeout)
    group = init_group(n, rank, hostfile, getattr(opts, "backend", "ring"))
    watchdog.disarm()
    model_dir = local_model_dir(opts.model)
    engine = build_engine(opts, model_dir, group)
    channel = Channel(group, watchdog, timeout=opts.collective_timeout)
    _check_alike(engine, channel, opts, model_dir)
    reconcile(engine, channel)
    return engine, channel


def _check_alike(engine, channel, opts, model_dir: Path) -> None:
    """Every rank must run the same model files with the same pool and steps, or their
    schedules part at the first turn (ranks on other machines are started by hand).

    Raises:
        DistributedError: naming this rank's values.
    """
    from ..engine.fingerprint import model_fingerprint
    from ..errors import DistributedError

    mine = {
        "model": model_fingerprint(model_dir),
        "pool_blocks": engine.pool.total_blocks,
        "block_size": engine.pool.block_size,
        "prefill_step_size": opts.prefill_step_size,
    }
    if not channel.agree(json.dumps(mine, sort_keys=True).encode()):
        raise DistributedError(
            f"the ranks differ in model files or options (rank {channel.rank} has {mine}): "
            "start every rank with the same model and --memory-budget/--pool-blocks, "
            "--block-size and --prefill-step-size"
        )


def rank_zero_engine(opts, info: dict):
    """The daemon's engine factory (on its engine thread) for a distributed daemon."""
    from ..engine.distributed.lockstep import LockstepEngine
    from ..errors import DistributedError

    tic = time.perf_counter()
    n = world_size(opts)
    hostfile = Path(opts.hosts) if opts.hosts else local_hostfile(opts.store, n)
    ready = threading.Event()
    procs = [] if opts.hosts else spawn_local(opts, hostfile, n)
    _watch_start(procs, run_dir(opts.store, create=True), ready)
    try:
        engine, channel = open_rank(opts, 0, hostfile)
    except DistributedError as exc:  # a rank failed while loading: say why, from its log
        raise DistributedError(f"{exc}{_local_logs(opts.store, procs)}") from exc
    finally:
        ready.set()
    spec, pool = engine.spec, engine.pool
    _check_pool_fits(opts, spec.bytes_per_token * opts.block_size)
    info.update(serving_info(opts, spec, pool, tic), world_size=n)
    info["tool_calling"] = engine.tool_calling
    _note_fingerprints(opts, n)
    log.info("rank 0 of %d serving; pool %d blocks per rank", n, pool.total_blocks)
    return LockstepEngine(engine, channel, after_close=lambda: _reap(opts.store, procs))


def _note_fingerprints(opts, n: int) -> None:
    """Every rank's fingerprint of the model served, in world.json (for offline gc)."""
    from ..engine.distributed.build import rank_fingerprint
    from ..engine.fingerprint import model_fingerprint
    from .rank_stores import record_fingerprints

    base = model_fingerprint(local_model_dir(opts.model))
    record_fingerprints(opts.store, [rank_fingerprint(base, r, n) for r in range(n)])


def _reap(store: Path, procs: list[subprocess.Popen]) -> None:
    """After the group closed: wait for the local ranks to exit (killed past a minute)."""
    for rank, p in enumerate(procs, start=1):
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log.error("rank %d did not exit after closing; killing it", rank)
            p.kill()
            p.wait()
        (run_dir(store) / f"rank-{rank}.pid").unlink(missing_ok=True)


def _size(text: str) -> int:
    from .cli import parse_size

    try:
        return parse_size(text)
    except Exception as exc:  # click's BadParameter: argparse reports its own type errors
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    """A follower rank: `python -m agentkv.daemon.service.ranks --rank R --hosts FILE ...`
    with the options rank 0 was started with."""
    p = argparse.ArgumentParser(prog="agentkv-rank", description=main.__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--hosts", type=Path, required=True, help="MLX ring hostfile")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--memory-budget", type=_size, default=1 << 30, help="per rank, e.g. 4GiB")
    p.add_argument("--pool-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--disk-budget", type=_size, default=None)
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument("--collective-timeout", type=float, default=120.0)
    p.add_argument("--backend", choices=("ring", "jaccl", "mpi", "any"), default="ring")
    opts = SimpleNamespace(**vars(p.parse_args(argv)), world_size=None)
    opts.store = opts.store.expanduser().resolve()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {opts.rank}: %(message)s"
    )
    from ..engine.distributed.lockstep import follow, lost
    from ..errors import DistributedError

    engine, channel = open_rank(opts, opts.rank, opts.hosts)
    freeze_startup_heap()  # a rank's full collections would stall the whole group
    try:
        follow(engine, channel)
    except DistributedError as exc:
        lost(engine, exc)
    except Exception as exc:  # a replayed call failed here but not on rank 0: diverged
        log.exception("rank %d: replaying rank 0's calls failed", opts.rank)
        lost(engine, exc)
    log.info("rank %d: closed", opts.rank)


if __name__ == "__main__":
    main()
