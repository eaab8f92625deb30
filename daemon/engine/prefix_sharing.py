"""Turns that start together with one long prefix prefill it once.

Blocks are shared under their chained hash once pooled, and a turn pools its blocks when
it finishes. Agents started at the same moment with one system prompt would each prefill
all of it, side by side. Instead, a waiting turn whose first uncached block a running turn
is computing now (its *leader*) is deferred, not refused, and the leader pools its
prompt's full blocks as soon as its prefill is done (its first token), not at its end; the
deferred turn then prefills only what follows the shared part. Full-attention models only
(only their blocks are shared). Engine thread only.
"""

from __future__ import annotations

from .block_hash import BlockHash
from .kv_cache_manager import KVCacheManager
from .turns import Request


class PrefixLeaders:
    """The running turns whose prefill computes blocks not pooled yet, by block hash.

    Args:
        manager: the cache manager (hashes, pool lookups).
    """

    def __init__(self, manager: KVCacheManager) -> None:
        self._manager = manager
        self._by_hash: dict[BlockHash, Request] = {}
        self._hashes: dict[int, list[BlockHash]] = {}  # leader uid -> the hashes it holds

    def __len__(self) -> int:
        """Running turns still prefilling blocks others could share."""
        return len(self._hashes)

    def add(self, req: Request) -> None:
        """A turn entered the batch: the blocks its prefill computes (first claim wins)."""
        hashes = [
            h
            for h in self._manager.pending_hashes(req.admission)
            if self._by_hash.setdefault(h, req) is req
        ]
        if hashes:
            self._hashes[req.uid] = hashes

    def drop(self, req: Request) -> None:
        """The turn's prefill is done, or it left the batch."""
        for h in self._hashes.pop(req.uid, ()):
            del self._by_hash[h]

    def leader_for(self, full: list[int]) -> Request | None:
        """The running turn computing the first block of `full` that is not pooled, if any."""
        if not self._by_hash:
            return None
        missing = self._manager.first_missing_hash(full)
        return None if missing is None else self._by_hash.get(missing)
