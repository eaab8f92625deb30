"""The writer's index transactions, each one `BEGIN IMMEDIATE` ... commit.

Every function here keeps two invariants: a block's refcount is the number of
agent_blocks rows that list it (recounted in the same transaction as the change), and an
agent's stored_tokens is what its listed blocks and its state file hold. Files are the
caller's business: written before a commit, deleted or moved after one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import StoreWriteError
from .paths import block_rel
from .records import StateFile, TurnRecord, WrittenBlock, pack_tokens, unpack_tokens


def commit_turn(
    db, rec: TurnRecord, written: list[WrittenBlock], state: StateFile | None
) -> str | None:
    """A turn: new block rows, the agent's block list and row, refcounts. Returns the
    state file the agent had (its caller deletes it if it is not the new one).

    Args:
        db: the writer's connection.
        rec: the turn.
        written: the block files written for it.
        state: its new state file, or None.

    Raises:
        BlocksGone: a block the turn lists has no row (gc from another process).
    """
    now = time.time()
    key = (rec.agent_id, rec.fingerprint)
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        db.conn.executemany(
            "INSERT OR IGNORE INTO blocks VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
            [_block_row(rec.fingerprint, w, now) for w in written],
        )
        old = db.execute(
            "SELECT state_file, created FROM agents WHERE agent_id = ? AND fingerprint = ?", key
        ).fetchone()
        old_hashes = listed_blocks(db, *key)
        db.execute("DELETE FROM agent_blocks WHERE agent_id = ? AND fingerprint = ?", key)
        db.conn.executemany(
            "INSERT INTO agent_blocks VALUES (?, ?, ?, ?)",
            [(*key, i, b.block_hash) for i, b in enumerate(rec.blocks)],
        )
        check_blocks_exist(db, rec)
        # `pinned = 1` also turns a garbage pinned value back into 0.
        db.execute(
            "INSERT OR REPLACE INTO agents (agent_id, fingerprint, tokens, token_count, "
            "stored_tokens, state_file, state_checksum, state_bytes, created, last_used, "
            "pinned) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, COALESCE((SELECT pinned = 1 "
            "FROM agents WHERE agent_id = ? AND fingerprint = ?), 0))",
            (
                *key,
                pack_tokens(rec.tokens),
                len(rec.tokens),
                rec.stored_tokens,
                state.rel if state else None,
                state.checksum if state else None,
                state.nbytes if state else 0,
                old[1] if old else now,
                now,
                *key,
            ),
        )
        recount(db, set(old_hashes) | {b.block_hash for b in rec.blocks}, now)
    return old[0] if old else None


def _block_row(fingerprint: str, w: WrittenBlock, now: float) -> tuple:
    """A `blocks` row (refcount 0: recounted in the same transaction)."""
    rel = block_rel(w.block_hash)
    return (w.block_hash, fingerprint, rel, w.nbytes, w.checksum, w.token_count, now, now)


def register_model(db, fingerprint: str, model_id: str, config: str, block_size: int) -> None:
    """Record a model; a non-empty id or config replaces what the row had."""
    db.execute(
        "INSERT INTO models VALUES (?, ?, ?, ?, ?) ON CONFLICT(fingerprint) DO UPDATE SET "
        "model_id = CASE WHEN excluded.model_id != '' THEN excluded.model_id ELSE model_id END, "
        "config = CASE WHEN excluded.config != '' THEN excluded.config ELSE config END, "
        "block_size = excluded.block_size",
        (fingerprint, model_id, config, block_size, time.time()),
    )


def listed_blocks(db, agent_id: str, fingerprint: str) -> list[str]:
    """The hashes of an agent's blocks (in no particular order)."""
    return [
        r[0]
        for r in db.execute(
            "SELECT block_hash FROM agent_blocks WHERE agent_id = ? AND fingerprint = ?",
            (agent_id, fingerprint),
        )
    ]


def listed_blocks_in_order(db, agent_id: str, fingerprint: str) -> list[str]:
    """The hashes of an agent's blocks, in order."""
    return [
        r[0]
        for r in db.execute(
            "SELECT block_hash FROM agent_blocks WHERE agent_id = ? AND fingerprint = ? "
            "ORDER BY seq",
            (agent_id, fingerprint),
        )
    ]


def set_state_file(db, agent_id: str, fingerprint: str, state: StateFile) -> bool:
    """Give an agent that has none the state file `state`; False if it has one (or is
    gone) by now."""
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        cur = db.execute(
            "UPDATE agents SET state_file = ?, state_checksum = ?, state_bytes = ? "
            "WHERE agent_id = ? AND fingerprint = ? AND state_file IS NULL",
            (state.rel, state.checksum, state.nbytes, agent_id, fingerprint),
        )
        return cur.rowcount == 1


@dataclass(slots=True)
class Cut:
    """What truncating an agent took from it."""

    blocks: set[str]  # block hashes it no longer lists (their refcounts are to be recounted)
    state_file: str | None  # the state file it no longer has


def truncate_agent(
    db, agent_id: str, fingerprint: str, *, seq: int | None = None, state_file: str | None = None
) -> Cut:
    """Keep an agent's first `seq` blocks (all if None) and drop its state file, which no
    longer applies; stored_tokens becomes what the kept blocks hold, so the row stays one
    that a restore accepts. With `state_file`: only if the agent still has that one."""
    key = (agent_id, fingerprint)
    row = db.execute(
        "SELECT state_file FROM agents WHERE agent_id = ? AND fingerprint = ?", key
    ).fetchone()
    if row is None or (state_file is not None and row[0] != state_file):
        return Cut(set(), None)
    dropped: set[str] = set()
    if seq is not None:
        where = "WHERE agent_id = ? AND fingerprint = ? AND seq >= ?"
        dropped = {
            r[0] for r in db.execute(f"SELECT block_hash FROM agent_blocks {where}", (*key, seq))
        }
        db.execute(f"DELETE FROM agent_blocks {where}", (*key, seq))
    db.execute(
        "UPDATE agents SET state_file = NULL, state_bytes = 0, state_checksum = NULL, "
        "stored_tokens = (SELECT COALESCE(SUM(b.token_count), 0) FROM agent_blocks ab "
        "JOIN blocks b ON b.hash = ab.block_hash WHERE ab.agent_id = ? AND ab.fingerprint = ?) "
        "WHERE agent_id = ? AND fingerprint = ?",
        (*key, *key),
    )
    return Cut(dropped, row[0])


def check_blocks_exist(db, rec: TurnRecord) -> None:
    """Every block the agent lists must have its row (gc in another process may have run)."""
    wanted = {b.block_hash for b in rec.blocks}
    if not wanted:
        return
    marks = ",".join("?" * len(wanted))
    have = db.execute(f"SELECT COUNT(*) FROM blocks WHERE hash IN ({marks})", tuple(wanted))
    if have.fetchone()[0] != len(wanted):
        raise BlocksGone(wanted)


class BlocksGone(StoreWriteError):
    """Blocks a turn lists were removed from the index meanwhile."""

    def __init__(self, hashes: set[str]) -> None:
        self.hashes = hashes
        super().__init__("blocks removed from the index meanwhile; the next turn rewrites them")


def recount(db, hashes: set[str], now: float) -> None:
    """Set each block's refcount to the number of agent_blocks rows that list it."""
    db.conn.executemany(
        "UPDATE blocks SET refcount = (SELECT COUNT(*) FROM agent_blocks WHERE block_hash = ?), "
        "last_used = ? WHERE hash = ?",
        [(h, now, h) for h in hashes],
    )


def remove_agent(db, agent_id: str, fingerprint: str, *, keep_tokens: bool) -> str | None:
    """Forget an agent's blocks, and its row too unless `keep_tokens` (then only its cache
    is forgotten: it will be recomputed). Returns the state file it had."""
    key = (agent_id, fingerprint)
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        row = db.execute(
            "SELECT state_file FROM agents WHERE agent_id = ? AND fingerprint = ?", key
        ).fetchone()
        hashes = listed_blocks(db, *key)
        db.execute("DELETE FROM agent_blocks WHERE agent_id = ? AND fingerprint = ?", key)
        if keep_tokens:
            db.execute(
                "UPDATE agents SET stored_tokens = 0, state_file = NULL, state_bytes = 0, "
                "state_checksum = NULL WHERE agent_id = ? AND fingerprint = ?",
                key,
            )
        else:
            db.execute("DELETE FROM agents WHERE agent_id = ? AND fingerprint = ?", key)
        recount(db, set(hashes), time.time())
    return row[0] if row else None


def forget_block(db, block_hash: str) -> list[tuple[tuple[str, str], Cut]]:
    """Drop a block's row; agents that listed it keep their tokens and the blocks before
    it. Returns each such agent and what it lost."""
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        owners = db.execute(
            "SELECT agent_id, fingerprint, MIN(seq) FROM agent_blocks "
            "WHERE block_hash = ? GROUP BY agent_id, fingerprint",
            (block_hash,),
        ).fetchall()
        cuts = [((a, f), truncate_agent(db, a, f, seq=seq)) for a, f, seq in owners]
        db.execute("DELETE FROM blocks WHERE hash = ?", (block_hash,))
        recount(db, {h for _, cut in cuts for h in cut.blocks}, time.time())
    return cuts


def forget_state(db, agent_id: str, fingerprint: str, state_file: str | None) -> None:
    """Drop an agent's state file, if it still has that one; it keeps its blocks."""
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        truncate_agent(db, agent_id, fingerprint, state_file=state_file)


def disk_bytes(db) -> int:
    """Bytes of block files plus the agents' current state files."""
    blocks = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM blocks").fetchone()[0]
    states = db.execute("SELECT COALESCE(SUM(state_bytes), 0) FROM agents").fetchone()[0]
    return blocks + states


def set_pinned(db, agent_id: str, fingerprint: str, pinned: bool) -> None:
    """Pin or unpin an agent (no row: nothing happens). One statement: autocommitted."""
    db.execute(
        "UPDATE agents SET pinned = ? WHERE agent_id = ? AND fingerprint = ?",
        (int(pinned), agent_id, fingerprint),
    )


def context_without_state(
    db, agent_id: str, fingerprint: str
) -> tuple[list[int], int, list[str]] | None:
    """(tokens, stored_tokens, block hashes in order) of an agent that has no state file;
    None if it has one, has no row, or its tokens blob is unreadable."""
    row = db.execute(
        "SELECT tokens, stored_tokens FROM agents "
        "WHERE agent_id = ? AND fingerprint = ? AND state_file IS NULL",
        (agent_id, fingerprint),
    ).fetchone()
    if row is None or not isinstance(row[0], bytes) or len(row[0]) % 4:
        return None
    return unpack_tokens(row[0]), row[1], listed_blocks_in_order(db, agent_id, fingerprint)


def eviction_victim(db, keep: tuple[str, str]) -> tuple[str, str] | None:
    """The least recently used unpinned agent with a cache on disk, other than `keep`."""
    row = db.execute(
        "SELECT agent_id, fingerprint FROM agents WHERE pinned = 0 AND stored_tokens > 0 "
        "AND NOT (agent_id = ? AND fingerprint = ?) ORDER BY last_used LIMIT 1",
        keep,
    ).fetchone()
    return None if row is None else (row[0], row[1])


def delete_unreferenced(db, hashes: list[str]) -> None:
    """Drop these blocks' rows, each only if still unreferenced (one transaction)."""
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        db.conn.executemany(
            "DELETE FROM blocks WHERE hash = ? AND refcount = 0", [(h,) for h in hashes]
        )
