"""What the store's writer has yet to do, as readers must see it meanwhile.

`PendingWrites` is the bookkeeping between `CacheStore`'s callers and its writer thread:
which operations are queued per agent (so a restore can wait for them), what lookups see of
an agent whose turn or delete is queued (the overlay), which blocks queued turns write or
list (so the disk budget and gc keep them), and which blocks the index holds. Every
landed operation notifies `landed` (a Condition) and the listeners added with
`add_listener` (a daemon's engine loop wakes on it instead of polling).

`Outcomes` keeps what failed: why an agent's latest turn or delete could not be written,
and the errors `flush` reports.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .records import BlockRecord, StoredAgent, TurnRecord

log = logging.getLogger("agentkv.storage")

AgentKey = tuple[str, str]  # (agent id, model fingerprint)


@dataclass(frozen=True, slots=True)
class Shown:
    """What lookups see of an agent until a queued operation lands: `agent` is the queued
    turn's record, or None for a queued delete (the agent is hidden)."""

    key: AgentKey
    agent: StoredAgent | None


@dataclass(frozen=True, slots=True)
class Ticket:
    """One queued operation's place in the overlay: the latest ticket of a key wins."""

    key: AgentKey
    number: int


class PendingWrites:
    """Queued-but-not-landed bookkeeping, shared by callers and the writer thread.

    Args:
        on_disk: hashes of the blocks the index holds when the store opens.
    """

    def __init__(self, on_disk: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self.landed = threading.Condition(self._lock)  # notified as each operation lands
        self._on_disk = set(on_disk)
        self._writing: dict[str, int] = {}  # block hash -> queued turns that write it
        # block hash -> queued turns that list it (with or without its bytes): never removed
        self._listed: dict[str, int] = {}
        self._per_agent: dict[str, int] = {}  # agent id -> queued operations
        self._overlay: dict[AgentKey, tuple[int, StoredAgent | None]] = {}
        self._tickets = 0
        self._listeners: list[Callable[[], None]] = []

    # -- queueing and landing (any thread / the writer thread) ------------------------------

    def add(self, agent_id: str | None, blocks: list[BlockRecord], shown: Shown | None):
        """Count an operation as queued; returns its overlay Ticket, or None."""
        with self._lock:
            for b in blocks:
                if b.tensors is not None:
                    _increment(self._writing, b.block_hash)
                _increment(self._listed, b.block_hash)
            if agent_id is not None:
                _increment(self._per_agent, agent_id)
            if shown is None:
                return None
            self._tickets += 1
            self._overlay[shown.key] = (self._tickets, shown.agent)
            return Ticket(shown.key, self._tickets)

    def settle(self, agent_id: str | None, blocks: list[BlockRecord], ticket: Ticket | None):
        """An operation landed or failed: the index now says what it did (or, if it failed,
        what was there before), so its overlay entry goes, unless a later one replaced it."""
        with self._lock:
            for b in blocks:
                if b.tensors is not None:
                    _decrement(self._writing, b.block_hash)
                _decrement(self._listed, b.block_hash)
            if agent_id is not None:
                _decrement(self._per_agent, agent_id)
            if ticket is not None and self._overlay.get(ticket.key, (None,))[0] == ticket.number:
                del self._overlay[ticket.key]
            self.landed.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:  # a listener's fault must not stop the writer
                log.exception("store settle listener failed")

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (on the writer thread, briefly) each time an operation lands."""
        with self._lock:
            self._listeners.append(listener)

    # -- what readers see -------------------------------------------------------------------

    def shown(self, key: AgentKey) -> Shown | None:
        """The overlay entry of an agent, or None when nothing of it is queued."""
        with self._lock:
            entry = self._overlay.get(key)
        return None if entry is None else Shown(key, entry[1])

    def all_shown(self) -> list[Shown]:
        """Every overlay entry."""
        with self._lock:
            return [Shown(key, entry[1]) for key, entry in self._overlay.items()]

    def is_settled(self, agent_id: str) -> bool:
        """True when nothing is queued for this agent."""
        with self._lock:
            return not self._per_agent.get(agent_id)

    def wait_settled(self, agent_id: str, timeout: float, alive: Callable[[], bool]) -> bool:
        """Wait until nothing is queued for the agent or `alive()` is False; False on timeout."""
        with self.landed:
            return self.landed.wait_for(
                lambda: not self._per_agent.get(agent_id) or not alive(), timeout
            )

    # -- blocks -----------------------------------------------------------------------------

    def has_block(self, block_hash: str) -> bool:
        """True if the block is in the index or a queued turn writes it."""
        with self._lock:
            return block_hash in self._on_disk or block_hash in self._writing

    def needs_write(self, block: BlockRecord) -> bool:
        """True if the block comes with its bytes and the index does not hold it yet."""
        with self._lock:
            return block.tensors is not None and block.block_hash not in self._on_disk

    def available_prefix(self, rec: TurnRecord) -> int:
        """How many leading blocks of the turn are in the index or come with their bytes."""
        with self._lock:
            for i, b in enumerate(rec.blocks):
                if b.tensors is None and b.block_hash not in self._on_disk:
                    return i
        return len(rec.blocks)

    def blocks_indexed(self, hashes: Iterable[str]) -> None:
        """The index holds these blocks now."""
        with self._lock:
            self._on_disk.update(hashes)

    def blocks_gone(self, hashes: Iterable[str]) -> None:
        """The index no longer holds these blocks."""
        with self._lock:
            self._on_disk.difference_update(hashes)

    def reset_blocks(self, hashes: Iterable[str]) -> None:
        """The index holds exactly these blocks (after a gc)."""
        with self._lock:
            self._on_disk = set(hashes)

    def listed(self) -> frozenset[str]:
        """Blocks that queued turns list: to be kept whatever their refcount."""
        with self._lock:
            return frozenset(self._listed)

    def unlisted(self, hashes: Iterable[str]) -> list[str]:
        """Those of `hashes` that no queued turn lists."""
        with self._lock:
            return [h for h in hashes if h not in self._listed]


class Outcomes:
    """What failed to land: per agent, why its latest turn or delete could not be written,
    and every failure since the last `take_errors`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unsaved: dict[AgentKey, str] = {}
        self._undeleted: dict[AgentKey, str] = {}
        self._errors: list[str] = []

    def failed(self, kind: str, exc: Exception) -> None:
        """A write of kind `kind` failed."""
        with self._lock:
            self._errors.append(f"{kind}: {exc}")

    def turn_failed(self, key: AgentKey, why: str) -> None:
        """The agent's latest turn could not be written."""
        with self._lock:
            self._unsaved[key] = why

    def delete_failed(self, key: AgentKey, why: str) -> None:
        """The agent's latest delete could not be written."""
        with self._lock:
            self._undeleted[key] = why

    def landed(self, key: AgentKey) -> None:
        """The agent's turn or delete landed: nothing of it is unsaved."""
        with self._lock:
            self._unsaved.pop(key, None)
            self._undeleted.pop(key, None)

    def unsaved(self, key: AgentKey) -> str | None:
        """Why the agent's latest turn could not be written, or None."""
        with self._lock:
            return self._unsaved.get(key)

    def unsaved_agents(self, fingerprint: str) -> dict[str, str]:
        """Agents of a model whose latest turn could not be written, with why."""
        with self._lock:
            return {a: why for (a, fp), why in self._unsaved.items() if fp == fingerprint}

    def delete_error(self, key: AgentKey) -> str | None:
        """Why the agent's latest delete could not be written, or None."""
        with self._lock:
            return self._undeleted.get(key)

    def take_errors(self) -> list[str]:
        """The failures since the last call (cleared)."""
        with self._lock:
            errors, self._errors = self._errors, []
        return errors


def _increment(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 1) - 1
    if n:
        counts[key] = n
    else:
        counts.pop(key, None)
