"""daemonctl's agent and store commands: inspect, agents, delete (through the daemon, or
the store itself when no daemon runs on it), verify, gc and rebuild-index. On a
distributed daemon's store, offline delete and gc act on every rank's store
(`rank_stores`)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import click

from agentkv.client import protocol

from .cli_common import _call, _client, _hello, _out, _progress, common, main
from .cli_format import (
    _detail,
    _index_damage_line,
    _ranks_text,
    _rebuild_text,
    _table,
    _verify_data,
)
from .rank_stores import delete_every_rank, gc_every_rank, rebuild_every_rank
from .ranks import rank_stores
from .runfiles import read_pid, same_store


@main.command()
@common
@click.argument("agent", required=False)
def inspect(socket_, store, as_json, timeout, auth_key, agent) -> None:
    """A table of agents, or one AGENT in detail."""
    with _client(socket_, timeout, auth_key) as c:
        if agent is None:
            rows = _call(c.agents)
            ranks = "" if as_json else _ranks_text(_call(c.stats))  # a distributed daemon's
            _out(as_json, rows, _table(rows) + ranks)
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

    from .ranks import verify_ranks

    try:
        report = verify_store(_cache_dir(store, index_ok=False), progress=_progress(as_json))
        verify_ranks(store, report, progress=_progress(as_json))  # a distributed daemon's
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
    cache, bars = _cache_dir(store), _progress(as_json)
    try:
        if rank_stores(store):  # a distributed daemon's store: every rank's
            reports = gc_every_rank(store, fingerprint, dry_run=dry_run, progress=bars)
        else:
            reports = [(cache, collect_garbage(cache, fingerprint, dry_run=dry_run, progress=bars))]
    except StorageError as exc:  # locked, or an index gone or damaged: nothing removed
        raise click.ClickException(str(exc)) from None
    data = _gc_data(reports, dry_run)
    verb = "would remove" if dry_run else "removed"
    _out(
        as_json,
        data,
        f"{verb}: {len(data['orphan_files'])} orphan files, "
        f"{len(data['unreferenced_blocks'])} unreferenced blocks, "
        f"{len(data['foreign_blocks'])} blocks and {len(data['foreign_agents'])} agents of "
        f"other models ({data['bytes'] / 2**20:.1f} MiB)"
        + (f" in {len(reports)} rank stores" if len(reports) > 1 else ""),
    )


def _gc_data(reports: list, dry_run: bool) -> dict:
    """gc's report over every rank store (rank r's files named under its directory)."""
    data = {"dry_run": dry_run, "orphan_files": [], "unreferenced_blocks": []}
    data |= {"foreign_blocks": [], "foreign_agents": [], "bytes": 0}
    for rank, (root, r) in enumerate(reports):
        prefix = f"{root.name}/" if rank else ""
        data["orphan_files"] += [prefix + f for f in r.orphan_files]
        data["unreferenced_blocks"] += r.unreferenced_blocks
        data["foreign_blocks"] += r.foreign_blocks
        data["foreign_agents"] += r.foreign_agents
        data["bytes"] += r.bytes_freed
    if len(reports) > 1:
        data["rank_stores"] = [str(root) for root, _ in reports]
    return data


@main.command("rebuild-index")
@common
@click.option("--dry-run", is_flag=True, help="only report what the new index would hold")
@click.option("--force", is_flag=True, help="rebuild even a sound index (loses pins)")
def rebuild_index(socket_, store, as_json, timeout, auth_key, dry_run, force) -> None:
    """Rebuild the store's index from its block and state files (a lost or damaged
    index.db); refused while a daemon has the store. Agents whose files hold no token
    list (written by an older agentkv) are reported lost. Of a distributed daemon's
    store: every rank store's index that is lost or damaged (every one with --force)."""
    from agentkv.storage import StorageError
    from agentkv.storage import rebuild_index as rebuild

    path = store / "cache"
    if not path.is_dir():
        raise click.ClickException(f"no store at {store}")
    try:
        if rank_stores(store):
            reports = rebuild_every_rank(
                store, dry_run=dry_run, force=force, progress=_progress(as_json)
            )
            data = {"stores": [{"store": str(p), **dataclasses.asdict(r)} for p, r in reports]}
            _out(as_json, data, "\n".join(f"{p}: {_rebuild_text(r)}" for p, r in reports))
            return
        r = rebuild(path, dry_run=dry_run, force=force, progress=_progress(as_json))
    except StorageError as exc:
        raise click.ClickException(str(exc)) from None
    _out(as_json, dataclasses.asdict(r), _rebuild_text(r))


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
    if rank_stores(store):  # a distributed daemon's store: every rank's
        _cache_dir(store)
        try:
            found = delete_every_rank(store, agent)
        except StorageError as exc:
            raise click.ClickException(str(exc)) from None
        if not found:
            raise click.ClickException(f"unknown agent {agent!r}")
        return
    with _offline_store(store) as cache:
        try:
            fingerprints = cache.fingerprints_of(agent)
            if not fingerprints:
                raise click.ClickException(f"unknown agent {agent!r}")
            for fp in fingerprints:  # one agent id may be stored for several models
                cache.delete_agent(agent, fp)
            cache.flush()
        except StorageError as exc:
            raise click.ClickException(str(exc)) from None


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
    from agentkv.storage import StorageError
    from agentkv.storage.maintenance import known_models

    try:
        known = known_models(_cache_dir(store))
    except StorageError as exc:
        raise click.ClickException(f"cannot read the store's models: {exc}") from None
    if fingerprint not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise click.ClickException(f"no model {fingerprint!r} in {store} (its models: {listed})")
