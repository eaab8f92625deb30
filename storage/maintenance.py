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
from pathlib import Path

from tqdm import tqdm

from .errors import CorruptFileError, StoreLockedError, StoreWriteError
from .locks import try_lock
from .paths import Containment, block_rel, is_block_hash, is_state_rel
from .records import GcReport, VerifyReport
from .schema import open_index
from .tensor_files import read_tensor_file

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
    """
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
    finally:
        if lock is not None:
            lock.close()


def _survey(root: Path, db, fingerprint: str | None, progress: bool, keep) -> GcReport:
    report = GcReport(dry_run=True)
    known = _known_files(db)
    for path in _files(root, progress):
        rel = path.relative_to(root).as_posix()
        if rel not in known:
            report.orphan_files.append(rel)
            report.bytes_freed += path.lstat().st_size
    if fingerprint is not None:
        report.foreign_agents = [
            f"{a}@{f}"
            for a, f in db.execute(
                "SELECT agent_id, fingerprint FROM agents WHERE fingerprint != ?",
                (fingerprint,),
            )
        ]
        report.foreign_blocks = _hashes(db, "fingerprint != ?", (fingerprint,))
    report.unreferenced_blocks = [h for h in _hashes(db, "refcount = 0", ()) if h not in keep]
    report.bytes_freed += _block_bytes(
        db, set(report.foreign_blocks) | set(report.unreferenced_blocks)
    )
    return report


def _known_files(db) -> set[str]:
    """Every file the index vouches for, named the way the store names them."""
    known = {block_rel(h) for (h,) in db.execute("SELECT hash FROM blocks") if is_block_hash(h)}
    rows = db.execute("SELECT agent_id, state_file FROM agents WHERE state_file IS NOT NULL")
    return known | {rel for agent_id, rel in rows if is_state_rel(rel, agent_id)}


def verify_store(root: Path, *, progress: bool = False, read_only: bool = False) -> VerifyReport:
    """Re-read every block and state file the index points at and check its checksum.

    A row whose path is not the store's name for that file is reported corrupt unread. A
    daemon may be writing meanwhile (replacing an agent's state file, evicting blocks for
    its disk budget): a file found bad is reported only if the index still lists it after
    the pass, so a file legitimately replaced or removed is no false alarm.
    """
    report = VerifyReport()
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
    return report


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
        rows = [
            (path, _block_rel_or_none(h, path), checksum, size)
            for h, path, checksum, size in db.execute(
                "SELECT hash, path, checksum, bytes FROM blocks"
            )
        ]
        rows += [
            (rel, rel if is_state_rel(rel, agent_id) else None, checksum, size)
            for agent_id, rel, checksum, size in db.execute(
                "SELECT agent_id, state_file, state_checksum, state_bytes FROM agents "
                "WHERE state_file IS NOT NULL"
            )
        ]
    finally:
        db.conn.close()
    return rows


def _block_rel_or_none(block_hash: object, path: object) -> str | None:
    """The block's file if the row's path is the store's name for it, else None."""
    if is_block_hash(block_hash) and path == block_rel(block_hash):
        return path
    return None


def _files(root: Path, progress: bool):
    # rglob does not descend into symlinked directories; a symlinked file is listed as
    # itself, and unlinking it removes the link, never its target. Anything but a real
    # directory is listed (a named pipe or socket left there is an orphan too).
    for sub in ("blocks", "agents"):
        paths = [p for p in (root / sub).rglob("*") if p.is_symlink() or not p.is_dir()]
        yield from tqdm(paths, desc=f"scan {sub}", unit="file", disable=not progress)


def _hashes(db, where: str, args: tuple) -> list[str]:
    return [row[0] for row in db.execute(f"SELECT hash FROM blocks WHERE {where}", args)]


def _block_bytes(db, hashes: set[str]) -> int:
    if not hashes:
        return 0
    rows = db.execute("SELECT hash, bytes FROM blocks").fetchall()
    return sum(n for h, n in rows if h in hashes and isinstance(n, int))


def _remove(root: Path, db, report: GcReport, fingerprint: str | None) -> None:
    """Index rows first (one transaction), files after: a crash leaves orphans, not holes."""
    doomed = set(report.foreign_blocks) | set(report.unreferenced_blocks)
    paths = [block_rel(h) for h in doomed if is_block_hash(h)]
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        if fingerprint is not None:
            states = db.execute(
                "SELECT agent_id, state_file FROM agents "
                "WHERE fingerprint != ? AND state_file IS NOT NULL",
                (fingerprint,),
            ).fetchall()
            paths += [rel for agent_id, rel in states if is_state_rel(rel, agent_id)]
            db.execute("DELETE FROM agent_blocks WHERE fingerprint != ?", (fingerprint,))
            db.execute("DELETE FROM agents WHERE fingerprint != ?", (fingerprint,))
        # Only blocks no agent lists now: a writer may have taken one meanwhile.
        db.conn.executemany(
            "DELETE FROM blocks WHERE hash = ? AND NOT EXISTS "
            "(SELECT 1 FROM agent_blocks WHERE block_hash = blocks.hash)",
            [(h,) for h in doomed],
        )
        # Whatever the index lists now (blocks and state files alike) stays, even if it was
        # written after the scan.
        live = _known_files(db)
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
