"""Whole-index queries and transactions of maintenance: `gc`, `verify`, `rebuild_index`.

These work on a connection of their own (a daemon may be writing meanwhile), over every
row rather than one agent's. Like `index_writes.py`, nothing here touches a file: the
callers remove files after the transaction that forgets them.
"""

from __future__ import annotations

from .index_rows import AGENT_COLUMNS, BLOCKS_QUERY
from .paths import block_rel, is_block_hash, is_state_rel


def integrity_problems(db, limit: int) -> list[str]:
    """SQLite's integrity check: ["ok"], or up to `limit` problems."""
    return [str(r[0]) for r in db.execute(f"PRAGMA integrity_check({int(limit)})")]


def checkpoint(db) -> None:
    """Move the WAL's pages into the database file and empty the WAL."""
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def every_agent_key(db) -> list[tuple]:
    """(agent_id, fingerprint) of every agent row, whatever their values."""
    return list(db.execute("SELECT agent_id, fingerprint FROM agents"))


def read_agent_rows(db, key: tuple) -> None:
    """Read an agent's rows whole (raises sqlite3.DatabaseError where they are damaged)."""
    db.execute(
        f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ? AND fingerprint = ?", key
    ).fetchall()
    db.execute(BLOCKS_QUERY, key).fetchall()


def foreign_agents(db, fingerprint: str) -> list[str]:
    """ "agent@fingerprint" of every agent of another model."""
    rows = db.execute(
        "SELECT agent_id, fingerprint FROM agents WHERE fingerprint != ?", (fingerprint,)
    )
    return [f"{a}@{f}" for a, f in rows]


def foreign_blocks(db, fingerprint: str) -> list[str]:
    """Blocks of another model."""
    return [
        r[0] for r in db.execute("SELECT hash FROM blocks WHERE fingerprint != ?", (fingerprint,))
    ]


def block_bytes(db, hashes: set[str]) -> int:
    """The bytes of these blocks' files, as the index recorded them."""
    if not hashes:
        return 0
    rows = db.execute("SELECT hash, bytes FROM blocks").fetchall()
    return sum(n for h, n in rows if h in hashes and isinstance(n, int))


def known_files(db) -> set[str]:
    """Every file the index vouches for, named the way the store names them."""
    known = {block_rel(h) for (h,) in db.execute("SELECT hash FROM blocks") if is_block_hash(h)}
    rows = db.execute("SELECT agent_id, state_file FROM agents WHERE state_file IS NOT NULL")
    return known | {rel for agent_id, rel in rows if is_state_rel(rel, agent_id)}


def listed_files(db) -> list[tuple]:
    """(listed path, the store's name for it or None, checksum, recorded bytes) of every
    block and state file the index lists."""
    rows = [
        (path, _block_rel_or_none(h, path), checksum, size)
        for h, path, checksum, size in db.execute("SELECT hash, path, checksum, bytes FROM blocks")
    ]
    rows += [
        (rel, rel if is_state_rel(rel, agent_id) else None, checksum, size)
        for agent_id, rel, checksum, size in db.execute(
            "SELECT agent_id, state_file, state_checksum, state_bytes FROM agents "
            "WHERE state_file IS NOT NULL"
        )
    ]
    return rows


def _block_rel_or_none(block_hash: object, path: object) -> str | None:
    """The block's file if the row's path is the store's name for it, else None."""
    if is_block_hash(block_hash) and path == block_rel(block_hash):
        return path
    return None


def forget_garbage(db, doomed: set[str], fingerprint: str | None) -> tuple[list[str], set[str]]:
    """One transaction: drop other models' agents (when `fingerprint` is given) and the
    `doomed` blocks no agent lists now (a writer may have taken one meanwhile).

    Returns:
        The state files of the agents dropped, and every file the index lists afterwards
        (those stay, even if written after the caller's scan).
    """
    states: list[str] = []
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        if fingerprint is not None:
            rows = db.execute(
                "SELECT agent_id, state_file FROM agents "
                "WHERE fingerprint != ? AND state_file IS NOT NULL",
                (fingerprint,),
            ).fetchall()
            states = [rel for agent_id, rel in rows if is_state_rel(rel, agent_id)]
            db.execute("DELETE FROM agent_blocks WHERE fingerprint != ?", (fingerprint,))
            db.execute("DELETE FROM agents WHERE fingerprint != ?", (fingerprint,))
        db.conn.executemany(
            "DELETE FROM blocks WHERE hash = ? AND NOT EXISTS "
            "(SELECT 1 FROM agent_blocks WHERE block_hash = blocks.hash)",
            [(h,) for h in doomed],
        )
        live = known_files(db)
    return states, live


def fill(db, models: list[tuple], blocks: list[tuple], agents: list[tuple], lists: list[tuple]):
    """A new index's every row, in one transaction; refcounts recounted from the lists.

    Args:
        models: (fingerprint, model_id, config, block_size, created) rows.
        blocks: (hash, fingerprint, path, bytes, checksum, token_count, created, last_used).
        agents: (agent_id, fingerprint, tokens, token_count, stored_tokens, state_file,
            state_checksum, state_bytes, created, last_used); none is pinned.
        lists: (agent_id, fingerprint, seq, block_hash) rows.
    """
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        db.conn.executemany("INSERT INTO models VALUES (?, ?, ?, ?, ?)", models)
        db.conn.executemany("INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)", blocks)
        db.conn.executemany(
            "INSERT INTO agents (agent_id, fingerprint, tokens, token_count, stored_tokens, "
            "state_file, state_checksum, state_bytes, created, last_used, pinned) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
            agents,
        )
        db.conn.executemany("INSERT INTO agent_blocks VALUES (?, ?, ?, ?)", lists)
        db.execute(
            "UPDATE blocks SET refcount = "
            "(SELECT COUNT(*) FROM agent_blocks WHERE block_hash = blocks.hash)"
        )
