"""Store maintenance: `gc` (dry run by default) and `verify` (every checksum, again).

Both work on the index and the files directly, through their own connection, so they can
run from a separate process (daemonctl) while a daemon writes; they take the index's write
lock only for the short transaction that forgets what they remove. Paths are never taken
from the index as they are: a block's file is the one named after its hash, a state file
must be one the store names for that agent, and nothing reached through a symlink that
leads out of the store is read or deleted (see `paths.py`).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from tqdm import tqdm

from . import index_scans
from .errors import (
    CorruptFileError,
    IndexDamagedError,
    IndexMissingError,
    StorageError,
    StoreLockedError,
    StoreWriteError,
)
from .index_rows import known_fingerprints, unreferenced_blocks
from .locks import try_lock
from .paths import STATE_FILE, Containment, block_rel, is_block_hash
from .records import GcReport, VerifyReport
from .schema import (
    check_index_present,
    created_at,
    has_cache_files,
    index_gone,
    is_damage,
    lists_nothing,
    open_index,
)
from .tensor_files import read_tensor_file, read_tensor_meta

log = logging.getLogger("agentkv.storage")


def collect_garbage(
    root: Path,
    fingerprint: str | None = None,
    *,
    dry_run: bool = True,
    progress: bool = False,
    read_only: bool = False,
    _locked: bool = False,
    _keep: frozenset[str] = frozenset(),
) -> GcReport:
    """Find (and unless dry_run, remove) what no live agent needs.

    Removed: files the index does not know (orphans of crashed writes, temp files, old
    state files), blocks no agent references, and, when `fingerprint` names the model in
    use, every block and agent of other models. Quarantined files are never touched.

    Args:
        root: the store.
        fingerprint: the model in use; None keeps every model's agents and blocks.
        dry_run: only list.
        progress: show progress bars.
        read_only: the store is on a read-only file system (a dry run only).

    Raises:
        StoreLockedError: not a dry run, and another process (a daemon) has the store open:
            its writes in flight would look like orphans. `CacheStore.gc` runs it from the
            owning process instead.
        StoreWriteError: not a dry run on a read-only store.
        IndexMissingError: the index is gone, or lists nothing, while cache files are
            there: every file would look like an orphan (rebuild the index first).
        IndexDamagedError: SQLite finds the index damaged.
    """
    check_index_present(root)  # else SQLite would make an empty index: all files orphans
    if read_only and not dry_run:
        raise StoreWriteError(f"store {root} is read-only")
    lock = None if dry_run or _locked else _lock_store(root)
    try:
        db = open_index(root / "index.db", read_only=read_only, immutable=read_only)
        try:
            report = _survey(root, db, fingerprint, progress, _keep)
            report.dry_run = dry_run
            if not dry_run:
                _remove(root, db, report, fingerprint)
            return report
        finally:
            db.conn.close()
    except sqlite3.DatabaseError as exc:  # a page found garbled on the way
        if is_damage(exc):
            raise IndexDamagedError(root, str(exc)) from exc
        raise StorageError(f"cannot read index {root / 'index.db'}: {exc}") from exc
    finally:
        if lock is not None:
            lock.close()


def _survey(root: Path, db, fingerprint: str | None, progress: bool, keep) -> GcReport:
    report = GcReport(dry_run=True)
    known = index_scans.known_files(db)
    if not known and lists_nothing(db) and _files_predate(root, db):
        # An index recreated empty over a store's files (before agentkv refused to do
        # that): what it does not list is lost from it, not garbage. Files written since
        # the index was made are a first turn in flight (or crashed): orphans indeed.
        raise IndexMissingError(root, "its index lists no blocks and no agents")
    for path in _files(root, progress):
        rel = path.relative_to(root).as_posix()
        if rel not in known:
            report.orphan_files.append(rel)
            report.bytes_freed += path.lstat().st_size
    if fingerprint is not None:
        report.foreign_agents = index_scans.foreign_agents(db, fingerprint)
        report.foreign_blocks = index_scans.foreign_blocks(db, fingerprint)
    report.unreferenced_blocks = [h for h in unreferenced_blocks(db) if h not in keep]
    report.bytes_freed += index_scans.block_bytes(
        db, set(report.foreign_blocks) | set(report.unreferenced_blocks)
    )
    return report


def _files_predate(root: Path, db) -> bool:
    """True if a cache file is older than the index (any, if it did not record when it was
    made); a second of slack for coarse file times."""
    created = created_at(db)
    return has_cache_files(root, older_than=None if created is None else created - 1.0)


def verify_store(root: Path, *, progress: bool = False, read_only: bool = False) -> VerifyReport:
    """Check the index (SQLite's integrity check), then re-read every block and state file
    it points at and check its checksum.

    An index that is gone beside cache files, or damaged, is reported in `index_error`
    (with the agents it affects) and no file is read: the index no longer says which are
    live; `rebuild_index` makes it again from them. A row whose path is not the store's
    name for that file is reported corrupt unread. A daemon may be writing meanwhile
    (replacing an agent's state file, evicting blocks for its disk budget): a file found
    bad is reported only if the index still lists it after the pass, so a file
    legitimately replaced or removed is no false alarm.
    """
    report = VerifyReport()
    report.index_error, report.affected_agents = index_problem(root, read_only)
    if report.index_error is not None:
        return report
    try:
        _verify_files(root, report, progress, read_only)
    except (sqlite3.DatabaseError, StorageError) as exc:  # damaged since the check
        report.index_error = str(getattr(exc, "what", exc))
        report.affected_agents = _agents_in_files(root)
    return report


def known_models(root: Path) -> set[str]:
    """The fingerprints of every model the store's index knows (registered, or with agents
    stored), read through a read-only connection: a daemon may be writing meanwhile.

    Raises:
        StorageError: the index cannot be read.
    """
    try:
        db = open_index(root / "index.db", read_only=True)
        try:
            return known_fingerprints(db)
        finally:
            db.conn.close()
    except sqlite3.Error as exc:
        raise StorageError(str(exc)) from exc


def index_problem(root: Path, read_only: bool = False) -> tuple[str | None, list[str]]:
    """What is wrong with the index itself, and the agents it affects; (None, []) when it
    is sound."""
    if (why := index_gone(root)) is not None:
        if not has_cache_files(root):
            return None, []  # a new, empty store: nothing to lose
        return why, _agents_in_files(root)
    try:
        db = open_index(root / "index.db", read_only=read_only, immutable=read_only)
    except IndexDamagedError as exc:
        return exc.what, _agents_in_files(root)
    try:
        try:
            problems = index_scans.integrity_problems(db, 20)
        except sqlite3.DatabaseError as exc:  # a page too garbled to even check
            problems = [f"{exc}"]
        if problems == ["ok"]:
            return None, []
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        return f"integrity check: {problems[0]}{more}", _unreadable_agents(root, db)
    finally:
        db.conn.close()


def _unreadable_agents(root: Path, db) -> list[str]:
    """Agents whose rows (agent row, block list, their blocks' rows) cannot be read; the
    agents are listed from the index, or from the state files where it cannot list them."""
    try:
        keys = index_scans.every_agent_key(db)
    except sqlite3.DatabaseError:
        keys = _agent_keys_in_files(root)
    bad = []
    for key in keys:
        try:
            index_scans.read_agent_rows(db, key)
        except sqlite3.DatabaseError:
            bad.append(str(key[0]))
    return sorted(set(bad))


def _agent_keys_in_files(root: Path) -> list[tuple[str, str]]:
    """(agent id, fingerprint) of every state file that names its agent."""
    keys = set()
    for path in (root / "agents").glob("*/*.safetensors"):
        rel = path.relative_to(root).as_posix()
        if path.name.startswith(".") or STATE_FILE.fullmatch(rel) is None:
            continue
        try:
            meta = read_tensor_meta(path)
        except CorruptFileError:
            continue
        agent_id = meta.get("agent_id") or f"(unnamed, key {path.parent.name})"
        keys.add((agent_id, str(meta.get("fingerprint"))))
    return sorted(keys)


def _agents_in_files(root: Path) -> list[str]:
    """Every agent the state files name (state files of older agentkv name only a key)."""
    return sorted({a for a, _ in _agent_keys_in_files(root)})


def _verify_files(root: Path, report: VerifyReport, progress: bool, read_only: bool) -> None:
    inside = Containment(root)
    bad: list[tuple] = []
    for row in tqdm(
        _listed_files(root, read_only), desc="verify", unit="file", disable=not progress
    ):
        listed, rel, checksum, size = row
        try:
            if rel is None or not inside.contains(root / rel):
                raise CorruptFileError(str(listed), "not a path of this store")
            # The size the index recorded: a file grown huge (sparse) is never read whole.
            recorded = size if isinstance(size, int) and size > 0 else None
            meta, _ = read_tensor_file(root / rel, size=recorded)
            if meta.get("checksum") != checksum:
                raise CorruptFileError(root / rel, "checksum differs from the index")
            report.bytes_checked += recorded or _size(root / rel)
        except CorruptFileError as exc:
            bad.append((row, exc))
        report.checked += 1
    still = set(_listed_files(root, read_only)) if bad else set()
    for row, exc in bad:
        if row in still:
            log.warning("verify: %s", exc)
            report.corrupt.append(str(row[0]))


def _size(path: Path) -> int:
    """The file's size; 0 if a live writer replaced it since it was read (it was checked)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _listed_files(root: Path, read_only: bool) -> list[tuple]:
    """(listed path, the store's name for it or None, checksum, recorded bytes) of every
    block and state file the index lists."""
    db = open_index(root / "index.db", read_only=read_only, immutable=read_only)
    try:
        return index_scans.listed_files(db)
    finally:
        db.conn.close()


def _files(root: Path, progress: bool):
    # rglob does not descend into symlinked directories; a symlinked file is listed as
    # itself, and unlinking it removes the link, never its target. Anything but a real
    # directory is listed (a named pipe or socket left there is an orphan too).
    for sub in ("blocks", "agents"):
        paths = [p for p in (root / sub).rglob("*") if p.is_symlink() or not p.is_dir()]
        yield from tqdm(paths, desc=f"scan {sub}", unit="file", disable=not progress)


def _remove(root: Path, db, report: GcReport, fingerprint: str | None) -> None:
    """Index rows first (one transaction), files after: a crash leaves orphans, not holes."""
    doomed = set(report.foreign_blocks) | set(report.unreferenced_blocks)
    paths = [block_rel(h) for h in doomed if is_block_hash(h)]
    states, live = index_scans.forget_garbage(db, doomed, fingerprint)
    paths += states
    inside = Containment(root)
    for rel in [*report.orphan_files, *paths]:
        if rel not in live and inside.contains(root / rel, link_ok=True):
            (root / rel).unlink(missing_ok=True)


def _lock_store(root: Path):
    f = try_lock(root / "lock")  # held until gc is done
    if f is None:
        raise StoreLockedError(
            f"store {root} is in use (a daemon is running): stop it, or use a dry run"
        )
    return f
