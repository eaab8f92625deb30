"""Per-agent state: the cache value (token ids and what of their cache is held) and the
engine's mutable bookkeeping around it."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import mlx.core as mx

from .kv_blocks import RecurrentState, WindowKV

if TYPE_CHECKING:
    from .block_pool import KVBlock

_EMPTY: Mapping = MappingProxyType({})


def frozen_map(d: Mapping | None) -> Mapping:
    """A read-only view of `d` (the shared empty map for None or {})."""
    return MappingProxyType(dict(d)) if d else _EMPTY


@dataclass(slots=True, frozen=True, eq=False)
class AgentCache:
    """An agent's context and the cache of it the engine holds: one immutable value.

    Every change (a commit, a restore, a drop) makes a new value that replaces the old one
    whole (`AgentContext.cache`), so no reader ever sees half of one state and half of
    another. The cache covers `tokens[:cached_len]`: usually all of them; 0 when it was
    dropped (the next turn restores it from the store or recomputes it from `tokens`); a
    prefix of whole blocks after a partial restore (attention-only models).

    Attributes:
        tokens: every token of the context: prompts, generated tokens, a final EOS.
        blocks: full blocks (one reference each) covering `tokens[:len(blocks) * block_size]`
            for the full-attention layers.
        tail: a private block with the rows after the last full block, or None.
        windows: sliding-window layers' last rows at `cached_len`.
        states: recurrent layers' state at `cached_len`.
        cached_len: tokens the cache covers.
        restored_full: after a restore, the full-attention rows read from disk, one (K, V)
            buffer pair per layer, used by the next turn instead of blocks; its commit turns
            the finished cache into blocks.
        restored: tokens of this cache read from disk, not yet reported by a turn.
    """

    tokens: tuple[int, ...] = ()
    blocks: tuple[KVBlock, ...] = ()
    tail: KVBlock | None = None
    windows: Mapping[int, WindowKV] = field(default_factory=lambda: _EMPTY)
    states: Mapping[int, RecurrentState] = field(default_factory=lambda: _EMPTY)
    cached_len: int = 0
    restored_full: Mapping[int, tuple[mx.array, mx.array]] | None = None
    restored: int = 0

    def held_blocks(self) -> list[KVBlock]:
        """Every pool block this cache references, in order."""
        return [*self.blocks, *([self.tail] if self.tail is not None else [])]

    def without_cache(self) -> AgentCache:
        """The same context with no cache held (recomputed or restored at its next turn)."""
        return AgentCache(tokens=self.tokens)


EMPTY_CACHE = AgentCache()


@dataclass(slots=True, eq=False)
class AgentContext:
    """One agent: its cache value, and the engine's bookkeeping of it.

    Only `cache` says what the agent's context and cache are; it is replaced whole. The rest
    is bookkeeping the engine thread updates as turns queue, run and are written back.

    Attributes:
        agent_id: the agent's id.
        cache: its context and cache (see `AgentCache`).
        last_used: engine clock of the last admission or commit (LRU for dropping caches).
        pending: this agent's queued requests (uids), oldest first.
        active: the uid of the request now in the batch, or None.
        in_store: the store holds this agent's latest state (restore instead of recompute).
        disk_blocks: full blocks the store holds (or has queued) for this agent, as of its
            last write-back or when it was read from the store.
        last_turn: wall-clock time (time.time()) of its last finished turn, 0.0 if none.
        saved: its current context was read from the store or queued for writing to it
            (it is there unless that write failed: `CacheStore.unsaved`).
    """

    agent_id: str
    cache: AgentCache = EMPTY_CACHE
    last_used: int = 0
    pending: deque[int] = field(default_factory=deque)
    active: int | None = None
    in_store: bool = False
    disk_blocks: int = 0
    last_turn: float = 0.0
    saved: bool = False

    @property
    def busy(self) -> bool:
        """True while a request of this agent is in the batch."""
        return self.active is not None

    @property
    def tokens(self) -> tuple[int, ...]:
        """The agent's context token ids (`cache.tokens`)."""
        return self.cache.tokens

    def held_blocks(self) -> list[KVBlock]:
        """Every pool block this agent references, in order."""
        return self.cache.held_blocks()
