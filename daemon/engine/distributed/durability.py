"""`durable` on every rank: a turn is durable once every rank's shard of it is on disk.

Every rank queues the same writes (each replays the same engine calls), each to its own
store on its own writer thread. Rank 0 notes the agents written since the ranks last
agreed (`RankWrites.waiting`); until the next agreement the service sees those agents as
not settled, so a turn's final event (and a delete's answer) waits for it. The ranks
agree, through the lockstep collectives, at the start of the next batch step (after every
rank settled its store, as each does before a step anyway), or, when no step comes, on
the first question about such an agent once rank 0's own write of it landed. Each rank
then says which of its writes failed, and `unsaved` reports rank 0's reasons and theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgpack


def pack(obj) -> bytes:
    """msgpack bytes of `obj`; b"" for an empty one (the agreement's common case costs
    one collective of lengths)."""
    return msgpack.packb(obj, use_bin_type=True) if obj else b""


def unpack(data: bytes):
    """What `pack` packed (None for b"")."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False) if data else None


def failed_writes(engine) -> bytes:
    """A follower's part of an agreement: its agents whose latest write failed (agent id
    -> why), packed."""
    store = engine.store
    return pack(store.unsaved_agents(engine.spec.fingerprint) if store is not None else {})


def merge_reports(reports: list[list[dict]]) -> list[dict]:
    """Every rank's `unsaved_report` rows (in rank order) as one report: per agent, the
    most tokens any rank is behind by, and the first rank's reason (named after rank 0)."""
    merged: dict[str, dict] = {}
    for rank, rows in enumerate(reports):
        for row in rows:
            have = merged.get(row["agent_id"])
            if have is not None:
                have["behind_tokens"] = max(have["behind_tokens"], row["behind_tokens"])
                continue
            why = row["error"] if rank == 0 else f"rank {rank}: {row['error']}"
            merged[row["agent_id"]] = {**row, "error": why}
    return [merged[a] for a in sorted(merged)]


class RankWrites:
    """Rank 0's view of the other ranks' writes: the agents written since the ranks last
    agreed, and the other ranks' failed writes as of that agreement."""

    def __init__(self, channel) -> None:
        self._channel = channel
        self.waiting: set[str] = set()
        self.failed: dict[str, str] = {}  # agent id -> "rank R: why"

    def wrote(self, agent_ids: Iterable[str]) -> None:
        """Every rank has queued a write of these agents (rank 0's call was replayed)."""
        self.waiting.update(agent_ids)

    def agree(self) -> None:
        """Collective, once every rank settled its store: each rank's failed writes.
        Rank 0 adds none (its own store answers for it)."""
        rows = self._channel.gather_bytes(b"")
        failed: dict[str, str] = {}
        for rank, data in enumerate(rows[1:], start=1):
            for agent_id, why in (unpack(data) or {}).items():
                failed.setdefault(agent_id, f"rank {rank}: {why}")
        self.failed = failed
        self.waiting.clear()


class AgreedStore:
    """Rank 0's store as the service sees it: an agent is settled once every rank's store
    applied its writes, and unsaved if any rank's write failed. Everything else is rank
    0's store itself (its index is the one truth for agents and tokens).

    Args:
        store: rank 0's CacheStore.
        writes: the other ranks' writes.
        agree_now: asks the ranks to agree now, if no batch step will (called only once
            rank 0's own writes of the agent in question landed).
    """

    def __init__(self, store, writes: RankWrites, agree_now: Callable[[], None]) -> None:
        self._store = store
        self._writes = writes
        self._agree_now = agree_now

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def is_settled(self, agent_id: str) -> bool:
        """True once every rank's writes of the agent landed or failed."""
        if not self._store.is_settled(agent_id):
            return False
        if agent_id in self._writes.waiting:
            self._agree_now()
        return agent_id not in self._writes.waiting

    def unsaved(self, agent_id: str, fingerprint: str) -> str | None:
        """Why the agent's latest write failed on some rank (rank 0 first), or None."""
        why = self._store.unsaved(agent_id, fingerprint)
        return why if why is not None else self._writes.failed.get(agent_id)

    def unsaved_agents(self, fingerprint: str) -> dict[str, str]:
        """Every agent whose latest write failed on some rank, with why."""
        return {**self._writes.failed, **self._store.unsaved_agents(fingerprint)}
