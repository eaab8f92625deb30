"""An agent's index rows read defensively: every value checked before it is trusted.

The token ids are the source of truth. Whenever the `tokens` blob decodes, the agent keeps
its context, whatever else is wrong; the rest describes a cache of those tokens, and if any
of it is garbage (a count that disagrees, a block hash that is not hex, a block the index
does not have, a state file name the store would not write) the cache is dropped and the
context recomputed. Nothing here raises on a bad value: problems come back as strings for
the store to log and count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .paths import is_block_hash, is_state_rel
from .records import StoredAgent, unpack_tokens

AGENT_COLUMNS = (
    "tokens, token_count, stored_tokens, state_file, state_checksum, pinned, last_used, state_bytes"
)
# One row per listed block: its position, hash, and the block's row (token_count, or NULL
# when the blocks table has no such block).
BLOCKS_QUERY = (
    "SELECT ab.seq, ab.block_hash, b.token_count FROM agent_blocks ab "
    "LEFT JOIN blocks b ON b.hash = ab.block_hash "
    "WHERE ab.agent_id = ? AND ab.fingerprint = ? ORDER BY ab.seq"
)


@dataclass(slots=True)
class ParsedAgent:
    """What an agent's rows said: the record (None if its tokens are unreadable) and every
    problem found (empty for a clean row)."""

    agent: StoredAgent | None
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class IndexTotals:
    """What the index holds, counted."""

    blocks: int
    block_bytes: int
    agents: int


def read_agent(db, agent_id: str, fingerprint: str) -> ParsedAgent | None:
    """An agent's rows, checked (see `parse_agent`); None if it has no row."""
    key = (agent_id, fingerprint)
    row = db.execute(
        f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ? AND fingerprint = ?", key
    ).fetchone()
    if row is None:
        return None
    return parse_agent(agent_id, fingerprint, row, db.execute(BLOCKS_QUERY, key).fetchall())


def is_pinned(db, agent_id: str, fingerprint: str) -> bool:
    """True if the agent has a row and it is pinned (a garbage value is not)."""
    row = db.execute(
        "SELECT pinned FROM agents WHERE agent_id = ? AND fingerprint = ?",
        (agent_id, fingerprint),
    ).fetchone()
    return bool(row and row[0] == 1)


def agent_keys(db, fingerprint: str | None = None) -> set[tuple[str, str]]:
    """(agent id, fingerprint) of every agent row (of one model, or all)."""
    if fingerprint is None:
        rows = db.execute("SELECT agent_id, fingerprint FROM agents")
    else:
        rows = db.execute(
            "SELECT agent_id, fingerprint FROM agents WHERE fingerprint = ?", (fingerprint,)
        )
    return {(a, f) for a, f in rows if isinstance(a, str)}


def fingerprints_of(db, agent_id: str) -> list[str]:
    """The models an agent has rows for."""
    rows = db.execute("SELECT DISTINCT fingerprint FROM agents WHERE agent_id = ?", (agent_id,))
    return [r[0] for r in rows if isinstance(r[0], str)]


def known_fingerprints(db) -> set[str]:
    """Every model the index knows: registered, or with agents stored."""
    known = {r[0] for r in db.execute("SELECT fingerprint FROM models")}
    known |= {r[0] for r in db.execute("SELECT DISTINCT fingerprint FROM agents")}
    return {k for k in known if isinstance(k, str)}


def token_count(db, agent_id: str, fingerprint: str) -> int:
    """How many tokens the agent's row holds (0 if none, or garbage)."""
    row = db.execute(
        "SELECT token_count FROM agents WHERE agent_id = ? AND fingerprint = ?",
        (agent_id, fingerprint),
    ).fetchone()
    count = row[0] if row is not None else 0
    return count if isinstance(count, int) and count > 0 else 0


def block_hashes(db) -> set[str]:
    """The hashes of every block the index holds."""
    return {row[0] for row in db.execute("SELECT hash FROM blocks")}


def unreferenced_blocks(db) -> list[str]:
    """Blocks no agent lists (refcount 0)."""
    return [r[0] for r in db.execute("SELECT hash FROM blocks WHERE refcount = 0")]


def totals(db) -> IndexTotals:
    """Blocks, their bytes and agents in the index."""
    blocks, nbytes = db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM blocks").fetchone()
    agents = db.execute("SELECT COUNT(*) FROM agents").fetchone()[0]
    return IndexTotals(blocks, nbytes, agents)


def parse_agent(agent_id: str, fingerprint: str, row: tuple, blocks: list[tuple]) -> ParsedAgent:
    """Check an `agents` row (AGENT_COLUMNS) and its `agent_blocks` rows (BLOCKS_QUERY)."""
    tokens = _tokens(row[0])
    if tokens is None:
        return ParsedAgent(None, ["the tokens blob is not a list of int32 token ids"])
    problems = _bookkeeping_problems(row)
    pinned = row[5] == 1
    last_used = float(row[6]) if _is_real_number(row[6]) else 0.0
    cache = _cache_problems(agent_id, tokens, row, blocks)
    if cache:
        agent = StoredAgent(agent_id, fingerprint, tokens, 0, [], None, None, pinned, last_used)
        return ParsedAgent(agent, problems + cache + ["its cached files are ignored"])
    hashes = [b[1] for b in blocks]
    state_bytes = row[7] if row[3] is not None else 0
    agent = StoredAgent(
        agent_id,
        fingerprint,
        tokens,
        row[2],
        hashes,
        row[3],
        row[4],
        pinned,
        last_used,
        state_bytes,
    )
    return ParsedAgent(agent, problems)


def _tokens(blob: object) -> list[int] | None:
    if not isinstance(blob, bytes) or len(blob) % 4:
        return None
    return unpack_tokens(blob)


def _bookkeeping_problems(row: tuple) -> list[str]:
    """Values that do not describe the cache: garbage there is reported, then defaulted."""
    problems = []
    if row[5] not in (0, 1):
        problems.append(f"pinned is {row[5]!r}")
    if not _is_real_number(row[6]):
        problems.append(f"last_used is {row[6]!r}")
    return problems


def _cache_problems(agent_id: str, tokens: list[int], row: tuple, blocks: list[tuple]) -> list:
    token_count, stored, state_file, checksum = row[1], row[2], row[3], row[4]
    problems = []
    if token_count != len(tokens) or not isinstance(token_count, int):
        problems.append(f"token_count is {token_count!r} for {len(tokens)} tokens")
    if not isinstance(stored, int) or not 0 <= stored <= len(tokens):
        problems.append(f"stored_tokens is {stored!r} for {len(tokens)} tokens")
    if [b[0] for b in blocks] != list(range(len(blocks))):
        problems.append("its blocks are not numbered 0, 1, 2, ...")
    bad = [b[1] for b in blocks if not is_block_hash(b[1]) or not isinstance(b[2], int)]
    if bad:
        problems.append(f"lists {len(bad)} block(s) the index does not hold, e.g. {bad[0]!r}")
    elif isinstance(stored, int) and sum(b[2] for b in blocks) > stored:
        problems.append(f"its blocks hold more than stored_tokens ({stored})")
    if state_file is not None and not (is_state_rel(state_file, agent_id) and _is_str(checksum)):
        problems.append(f"state_file is {state_file!r}, not one of this agent's state files")
    size = row[7]
    if state_file is not None and not (isinstance(size, int) and size > 0):
        problems.append(f"state_bytes is {size!r} for a state file")
    return problems


def _is_real_number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _is_str(value: object) -> bool:
    return isinstance(value, str) and bool(value)
