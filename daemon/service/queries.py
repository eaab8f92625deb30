"""The requests that only read: a page of `agents`, a page of one agent (`inspect`) and
the store's totals for `stats`, kept small since each runs on the engine thread between
batch steps: `agents` is paged (an agent only on disk costs an index read), `inspect`
reads one agent, and the store's totals are recounted at most every STORE_STATS_EVERY_S.
"""

from __future__ import annotations

import bisect
import contextlib
import time

from agentkv.client import protocol
from agentkv.client.protocol import MAX_TOKENS_PER_MESSAGE, ProtocolError

from ..errors import UnknownAgentError
from .engine_api import AgentRecord, Engine, EngineStore

AGENTS_PAGE = protocol.MAX_AGENTS_PER_PAGE  # stored-only agents cost an index read each
INSPECT_PAGE_TOKENS = 128 * 1024  # token ids of one inspect reply at most (<= 5 bytes each)
STORE_STATS_EVERY_S = 0.5  # store totals (COUNT/SUM over the index) at most this often


def agents_page(engine: Engine, body: dict) -> dict:
    """One page of agents, by id; `next` is the `after` of the next page (None: done)."""
    after = body.get("after")
    if after is not None and not isinstance(after, str):
        raise ProtocolError("invalid_request", "after must be an agent id")
    limit = count(body, "limit", AGENTS_PAGE, AGENTS_PAGE)
    ids = sorted(engine.agent_ids())
    i = bisect.bisect_right(ids, after) if after is not None else 0
    rows = []
    while i < len(ids) and len(rows) < limit:
        # UnknownAgentError: listed by the store's index while its delete is queued
        with contextlib.suppress(UnknownAgentError):
            rows.append(info_dict(engine.agent_info(ids[i])))
        i += 1
    return {"agents": rows, "next": ids[i - 1] if i < len(ids) else None}


def inspect_page(engine: Engine, body: dict) -> dict:
    """One agent; `token_ids` holds up to `token_limit` ids (at most INSPECT_PAGE_TOKENS)
    from `token_offset` on."""
    agent_id = protocol.check_agent_id(body.get("agent_id"))
    offset = count(body, "token_offset", 0, None, lo=0)
    limit = count(body, "token_limit", MAX_TOKENS_PER_MESSAGE, MAX_TOKENS_PER_MESSAGE)
    limit = min(limit, INSPECT_PAGE_TOKENS)  # the client pages on by `tokens`
    info, tokens = engine.agent_snapshot(agent_id)
    out = info_dict(info)
    out["token_offset"] = offset
    out["token_ids"] = tokens[offset : offset + limit]
    return out


class StoreTotals:
    """The store's totals, recounted at most every STORE_STATS_EVERY_S and only when
    something was written or deleted since (or writes were pending); its counters are
    always current."""

    def __init__(self) -> None:
        self._stats: dict | None = None
        self._key: tuple | None = None
        self._at = 0.0

    def invalidate(self) -> None:
        """Something changed that the counters do not show yet (a delete was queued)."""
        self._key = None

    def read(self, store: EngineStore) -> dict:
        """The totals, from the cache when they cannot have changed."""
        key = tuple(store.counters.values())
        now = time.monotonic()
        cached = self._stats
        changed = cached is None or key != self._key or cached.get("pending")
        if changed and (cached is None or now - self._at >= STORE_STATS_EVERY_S):
            self._stats, self._key, self._at = store.stats(), key, now
        return {**self._stats, **store.counters}


def info_dict(info: AgentRecord) -> dict:
    """An agent's record as a reply's map: every field."""
    return {k: getattr(info, k) for k in info.__slots__}


def count(body: dict, name: str, default: int, most: int | None, lo: int = 1) -> int:
    """An integer field in [lo, most] (`default` when absent), else invalid_request."""
    value = body.get(name, default)
    if not is_int(value) or value < lo or (most is not None and value > most):
        bounds = f"in [{lo}, {most}]" if most is not None else f">= {lo}"
        raise ProtocolError("invalid_request", f"{name} must be an integer {bounds}")
    return value


def is_int(value) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
