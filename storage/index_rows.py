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
