"""The SQLite index: schema, migrations, and opening a connection the way the store wants it.

Tables (inspect with e.g. `sqlite-utils tables index.db --counts`):

- `meta(key, value)`: `schema_version`.
- `models(fingerprint, model_id, config, block_size, created)`: every model that wrote here.
- `agents(agent_id, fingerprint, tokens, token_count, stored_tokens, state_file,
  state_checksum, created, last_used, pinned, state_bytes)`, keyed by
  (agent_id, fingerprint): `tokens`
  is the context as little-endian int32 (the source of truth); `stored_tokens` how many of
  them the files cover (0 after a disk-budget eviction: they are then recomputed);
  `state_file` holds what is not block-shaped (partial tail, sliding windows, recurrent
  state).
- `agent_blocks(agent_id, fingerprint, seq, block_hash)`: each agent's ordered full blocks.
- `blocks(hash, fingerprint, path, bytes, checksum, token_count, refcount, created,
  last_used)`: one safetensors file per block, shared by every agent that has it.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import sqlite_utils

from .errors import IndexDamagedError, IndexMissingError, StorageError

SCHEMA_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
# SQLite's primary result codes for a damaged database: SQLITE_CORRUPT, SQLITE_NOTADB.
_DAMAGED_CODES = (11, 26)


def _v1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db["models"].create(
        {"fingerprint": str, "model_id": str, "config": str, "block_size": int, "created": float},
        pk="fingerprint",
        if_not_exists=True,
    )
    db["agents"].create(
        {
            "agent_id": str,
            "fingerprint": str,
            "tokens": bytes,
            "token_count": int,
            "stored_tokens": int,
            "state_file": str,
            "state_checksum": str,
            "created": float,
            "last_used": float,
            "pinned": int,
            "state_bytes": int,
        },
        pk=("agent_id", "fingerprint"),
        not_null={"tokens", "token_count"},
        defaults={"stored_tokens": 0, "pinned": 0, "state_bytes": 0},
        if_not_exists=True,
    )
    db["agent_blocks"].create(
        {"agent_id": str, "fingerprint": str, "seq": int, "block_hash": str},
        pk=("agent_id", "fingerprint", "seq"),
        if_not_exists=True,
    )
    db["agent_blocks"].create_index(["block_hash"], if_not_exists=True)
    db["blocks"].create(
        {
            "hash": str,
            "fingerprint": str,
            "path": str,
            "bytes": int,
            "checksum": str,
            "token_count": int,
            "refcount": int,
            "created": float,
            "last_used": float,
        },
        pk="hash",
        defaults={"refcount": 0},
        if_not_exists=True,
    )
    db["blocks"].create_index(["fingerprint"], if_not_exists=True)


# Migration i takes the schema from version i to i + 1. Append, never edit.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1]


def open_index(
    path: Path, *, read_only: bool = False, immutable: bool = False
) -> sqlite_utils.Database:
    """Open (creating and migrating if needed) the index in WAL mode.

    Args:
        path: the index file.
        read_only: open it read-only (never created or migrated).
        immutable: with read_only, tell SQLite that nothing can change the file (true on a
            read-only file system, where it could not create the WAL's -shm file).

    Raises:
        StorageError: the index is newer than this agentkv, unreadable, or (read-only)
            missing.
    """
    try:
        if read_only:
            flags = "mode=ro&immutable=1" if immutable else "mode=ro"
            uri = f"file:{quote(str(path))}?{flags}"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db = sqlite_utils.Database(conn)
        if not read_only:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=10000")
        if not read_only:
            migrate(db)
        elif (version := schema_version(db)) != SCHEMA_VERSION:
            newer = "newer than" if version > SCHEMA_VERSION else "older than"
            raise StorageError(
                f"index {path} (v{version}) is {newer} this agentkv (v{SCHEMA_VERSION}) "
                "and cannot be migrated read-only"
            )
        check_tables(db)
        return db
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            raise IndexDamagedError(path.parent, str(exc)) from exc
        raise StorageError(f"cannot open index {path}: {exc}") from exc


def is_damage(exc: sqlite3.Error) -> bool:
    """True if SQLite says the database itself is damaged (a garbled page or header), as
    opposed to e.g. a lock, a permission or a missing directory."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _DAMAGED_CODES
    return type(exc) is sqlite3.DatabaseError  # what sqlite3 raises for both codes


def index_gone(root: Path) -> str | None:
    """Why the store's index.db is no index at all (missing, 0 bytes, or not a SQLite
    database), or None when it is one (it may still be damaged inside)."""
    path = root / "index.db"
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return "its index.db is missing"
    except OSError:
        return None  # unreadable (permissions...): opening it says why
    if not head:
        return "its index.db is empty (0 bytes)"
    if head != SQLITE_MAGIC:
        return "its index.db is not a SQLite database (its header is garbled)"
    return None


def has_cache_files(root: Path, *, older_than: float | None = None) -> bool:
    """True if blocks/ or agents/ hold any cache file (temp files of interrupted writes
    aside): what an index that is gone would orphan. With `older_than`: any such file last
    written before that time."""
    for sub in ("blocks", "agents"):
        for top, _, files in os.walk(root / sub):
            for name in files:
                if not name.endswith(".safetensors") or name.startswith("."):
                    continue
                if older_than is None or _mtime(os.path.join(top, name)) < older_than:
                    return True
    return False


def _mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return float("inf")  # gone meanwhile: not older than anything


def lists_nothing(db: sqlite_utils.Database) -> bool:
    """True if the index has no block and no agent row (not even a tokens-only agent)."""
    return not any(
        db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() for table in ("blocks", "agents")
    )


def check_index_present(root: Path) -> None:
    """Refuse a store whose index is gone while its cache files are there.

    Raises:
        IndexMissingError: naming what is wrong and the rebuild command.
    """
    if (why := index_gone(root)) is not None and has_cache_files(root):
        raise IndexMissingError(root, why)


def schema_version(db: sqlite_utils.Database) -> int:
    """The index's schema version (0 for an empty database).

    Raises:
        StorageError: the recorded version is not a whole number.
    """
    if "meta" not in db.table_names():
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        return 0
    try:
        return int(str(row[0]))
    except ValueError:
        raise StorageError(f"the index's schema version is {row[0]!r}") from None


def check_tables(db: sqlite_utils.Database) -> None:
    """Every table and column this version reads is there (a table dropped or rebuilt by
    hand would otherwise fail later lookups with SQLite's own errors).

    Raises:
        StorageError: naming what is missing.
    """
    for table, columns in _expected_columns().items():
        have = {c.name for c in db[table].columns} if table in db.table_names() else set()
        if missing := columns - have:
            what = f"table {table}" if not have else f"{table} columns {sorted(missing)}"
            raise StorageError(f"the index lacks {what}: not an agentkv index of this version")


@functools.cache
def _expected_columns() -> dict[str, set[str]]:
    """Each table's columns as the migrations make them (built once, in memory)."""
    db = sqlite_utils.Database(sqlite3.connect(":memory:"))
    try:
        for step in MIGRATIONS:
            step(db)
        return {t: {c.name for c in db[t].columns} for t in db.table_names()}
    finally:
        db.conn.close()


def migrate(db: sqlite_utils.Database) -> None:
    """Bring the schema to SCHEMA_VERSION, one transaction per step."""
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"index schema v{version} is newer than this agentkv (v{SCHEMA_VERSION})"
        )
    for step in range(version, SCHEMA_VERSION):
        with db.conn:
            db.execute("BEGIN IMMEDIATE")
            MIGRATIONS[step](db)
            db["meta"].upsert({"key": "schema_version", "value": str(step + 1)}, pk="key")
            if step == 0:  # a new index: when, so that files older than it are told apart
                db["meta"].upsert({"key": "created", "value": repr(time.time())}, pk="key")


def created_at(db: sqlite_utils.Database) -> float | None:
    """When the index was made (None: by an agentkv that did not record it)."""
    row = db.execute("SELECT value FROM meta WHERE key = 'created'").fetchone()
    try:
        return float(row[0]) if row else None
    except (TypeError, ValueError):
        return None
