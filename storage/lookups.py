"""Lookups on the caller's thread: the index as read, with queued writes laid over it.

`IndexLookups` answers `CacheStore.agent` and friends from the store's reader connection
and `PendingWrites` (a queued turn is visible, a queued delete hides its agent) without
waiting for the writer. A garbage row is never raised: `CorruptRows` logs and counts it
once, until the agent's row is written again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
import threading
from pathlib import Path

from . import index_rows
from .errors import IndexDamagedError, StorageError, StoreClosedError
from .pending import AgentKey, PendingWrites
from .records import StoredAgent
from .schema import is_damage

log = logging.getLogger("agentkv.storage")


class CorruptRows:
    """Counts and logs corrupt agent rows (`counters["corrupt_rows"]`), each once until
    the agent's row is written again."""

    def __init__(self, counters: dict, lock: threading.Lock) -> None:
        self._counters = counters
        self._lock = lock  # the store's: its counters are bumped from several threads
        self._seen: set[AgentKey] = set()

    def report(self, key: AgentKey, what: str) -> None:
        """Count and log a corrupt row, once until it is rewritten."""
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            self._counters["corrupt_rows"] += 1
        log.warning("agent %r: corrupt index row: %s", key[0], what)

    def count(self) -> None:
        """Count a corrupt row that belongs to no agent (a block row)."""
        with self._lock:
            self._counters["corrupt_rows"] += 1

    def rewritten(self, key: AgentKey) -> None:
        """The agent's row was written whole: a new fault in it is reported again."""
        with self._lock:
            self._seen.discard(key)


class IndexLookups:
    """Reads of the store's index, as callers must see them.

    Args:
        root: the store directory (for error messages).
        db: the reader connection (the caller's threads; SQLite serializes them).
        pending: the queued writes to lay over the index.
        rows: where corrupt rows are reported.
    """

    def __init__(self, root: Path, db, pending: PendingWrites, rows: CorruptRows) -> None:
        self.root = root
        self.db = db
        self.closed = False
        self._pending = pending
        self._rows = rows

    @contextlib.contextmanager
    def reading(self):
        """SQLite errors of a lookup as the store's own: StoreClosedError after close(),
        StorageError for an index damaged past what opening it checks (a bad page)."""
        try:
            yield self.db
        except sqlite3.DatabaseError as exc:
            if self.closed:
                raise StoreClosedError("store is closed") from exc
            if is_damage(exc):
                raise IndexDamagedError(self.root, str(exc)) from exc
            raise StorageError(f"index {self.root / 'index.db'} unreadable: {exc}") from exc

    def agent(self, agent_id: str, fingerprint: str, *, overlay: bool) -> StoredAgent | None:
        """The agent as lookups see it (with `overlay`: a queued turn or delete first)."""
        key = (agent_id, fingerprint)
        with self.reading():
            shown = self._pending.shown(key) if overlay else None
            if shown is not None:
                return self._queued_view(shown.agent)
            parsed = index_rows.read_agent(self.db, agent_id, fingerprint)
        if parsed is None:
            return None
        if parsed.problems:
            outcome = "treated as a new agent" if parsed.agent is None else "context kept"
            self._rows.report(key, f"{'; '.join(parsed.problems)}; {outcome}")
        return parsed.agent

    def _queued_view(self, view: StoredAgent | None) -> StoredAgent | None:
        if view is None:
            return None
        # Copies: the record's lists belong to the turn the writer has yet to write.
        return dataclasses.replace(
            view,
            tokens=list(view.tokens),
            block_hashes=list(view.block_hashes),
            pinned=index_rows.is_pinned(self.db, view.agent_id, view.fingerprint),
        )

    def agent_ids(self, fingerprint: str | None) -> list[str]:
        """Ids of stored agents (of one model, or all), queued turns and deletes included."""
        shown = self._pending.all_shown()
        with self.reading():
            pairs = index_rows.agent_keys(self.db, fingerprint)
        for entry in shown:
            if fingerprint is not None and entry.key[1] != fingerprint:
                continue
            if entry.agent is None:
                pairs.discard(entry.key)
            else:
                pairs.add(entry.key)
        return sorted({agent_id for agent_id, _ in pairs})

    def fingerprints_of(self, agent_id: str) -> list[str]:
        """The models an agent is stored for, queued turns and deletes included."""
        shown = [s for s in self._pending.all_shown() if s.key[0] == agent_id]
        with self.reading():
            found = set(index_rows.fingerprints_of(self.db, agent_id))
        for entry in shown:
            if entry.agent is None:
                found.discard(entry.key[1])
            else:
                found.add(entry.key[1])
        return sorted(found)

    def durable_tokens(self, agent_id: str, fingerprint: str) -> int:
        """How many of the agent's tokens the index holds (0 if none)."""
        with self.reading():
            return index_rows.token_count(self.db, agent_id, fingerprint)

    def totals(self) -> index_rows.IndexTotals:
        """Blocks, their bytes and agents in the index."""
        with self.reading():
            return index_rows.totals(self.db)
