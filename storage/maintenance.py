"""Store maintenance: `gc` (dry run by default) and `verify` (every checksum, again).

Both work on the index and the files directly, through their own connection, so they can
run from a separate process (daemonctl) while a daemon writes; they take the index's write
lock only for the short transaction that forgets what they remove.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from .errors import CorruptFileError, StoreLockedError
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
    _locked: bool = False,
) -> GcReport:
    """Find (and unless dry_run, remove) what no live agent needs.

    Removed: files the index does not know (orphans of crashed writes, temp files, old
    state files), blocks no agent references, and, when `fingerprint` names the model in
    use, every block and agent of other models. Quarantined files are never touched.

    Raises:
        StoreLockedError: not a dry run, and another process (a daemon) has the store open:
            its writes in flight would look like orphans. `CacheStore.gc` runs it from the
            owning process instead.
    """
    lock = None if dry_run or _locked else _lock_store(root)
    try:
        return _collect(root, fingerprint, dry_run=dry_run, progress=progress)
    finally:
        if lock is not None:
            lock.close()


def _collect(root: Path, fingerprint: str | None, *, dry_run: bool, progress: bool) -> GcReport:
    db = open_index(root / "index.db")
    try:
        report = GcReport(dry_run=dry_run)
        known = {row[0] for row in db.execute("SELECT path FROM blocks")}
        known |= {
            row[0]
            for row in db.execute("SELECT state_file FROM agents WHERE state_file IS NOT NULL")
        }
        for path in _files(root, progress):
            rel = str(path.relative_to(root))
            if rel not in known:
                report.orphan_files.append(rel)
                report.bytes_freed += path.stat().st_size
        if fingerprint is not None:
            report.foreign_agents = [
                f"{a}@{f}"
                for a, f in db.execute(
                    "SELECT agent_id, fingerprint FROM agents WHERE fingerprint != ?",
                    (fingerprint,),
                )
            ]
            report.foreign_blocks = _hashes(db, "fingerprint != ?", (fingerprint,))
        report.unreferenced_blocks = _hashes(db, "refcount = 0", ())
        report.bytes_freed += _block_bytes(
            db, set(report.foreign_blocks) | set(report.unreferenced_blocks)
        )
        if not dry_run:
            _remove(root, db, report, fingerprint)
        return report
    finally:
        db.conn.close()


def verify_store(root: Path, *, progress: bool = False) -> VerifyReport:
    """Re-read every block and state file the index points at and check its checksum."""
    db = open_index(root / "index.db")
    try:
        rows = db.execute("SELECT path, checksum FROM blocks").fetchall()
        rows += db.execute(
            "SELECT state_file, state_checksum FROM agents WHERE state_file IS NOT NULL"
        ).fetchall()
    finally:
        db.conn.close()
    report = VerifyReport()
    for rel, checksum in tqdm(rows, desc="verify", unit="file", disable=not progress):
        path = root / rel
        try:
            meta, _ = read_tensor_file(path)
            if meta.get("checksum") != checksum:
                raise CorruptFileError(path, "checksum differs from the index")
            report.bytes_checked += path.stat().st_size
        except CorruptFileError as exc:
            log.warning("verify: %s", exc)
            report.corrupt.append(rel)
        report.checked += 1
    return report


def _files(root: Path, progress: bool):
    for sub in ("blocks", "agents"):
        paths = [p for p in (root / sub).rglob("*") if p.is_file()]
        yield from tqdm(paths, desc=f"scan {sub}", unit="file", disable=not progress)


def _hashes(db, where: str, args: tuple) -> list[str]:
    return [row[0] for row in db.execute(f"SELECT hash FROM blocks WHERE {where}", args)]


def _block_bytes(db, hashes: set[str]) -> int:
    if not hashes:
        return 0
    rows = db.execute("SELECT hash, bytes FROM blocks").fetchall()
    return sum(n for h, n in rows if h in hashes)


def _remove(root: Path, db, report: GcReport, fingerprint: str | None) -> None:
    """Index rows first (one transaction), files after: a crash leaves orphans, not holes."""
    doomed = set(report.foreign_blocks) | set(report.unreferenced_blocks)
    paths = [p for (h, p) in db.execute("SELECT hash, path FROM blocks").fetchall() if h in doomed]
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        if fingerprint is not None:
            states = db.execute(
                "SELECT state_file FROM agents WHERE fingerprint != ? AND state_file IS NOT NULL",
                (fingerprint,),
            ).fetchall()
            paths += [s[0] for s in states]
            db.execute("DELETE FROM agent_blocks WHERE fingerprint != ?", (fingerprint,))
            db.execute("DELETE FROM agents WHERE fingerprint != ?", (fingerprint,))
        # Only blocks no agent lists now: a writer may have taken one meanwhile.
        db.conn.executemany(
            "DELETE FROM blocks WHERE hash = ? AND NOT EXISTS "
            "(SELECT 1 FROM agent_blocks WHERE block_hash = blocks.hash)",
            [(h,) for h in doomed],
        )
        gone = {row[0] for row in db.execute("SELECT path FROM blocks")}
    for rel in [*report.orphan_files, *paths]:
        if rel not in gone:
            (root / rel).unlink(missing_ok=True)


def _lock_store(root: Path):
    import fcntl

    f = open(root / "lock", "a+")  # noqa: SIM115 - held until gc is done
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StoreLockedError(
            f"store {root} is in use (a daemon is running): stop it, or use a dry run"
        ) from None
    return f
