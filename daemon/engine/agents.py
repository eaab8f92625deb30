"""Per-agent state: the token ids (the source of truth) and what of their cache is held."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx

from .kv_blocks import RecurrentState, WindowKV

if TYPE_CHECKING:
    from .block_pool import KVBlock


@dataclass(slots=True, eq=False)
class AgentContext:
    """One agent's context and cache.

    The cache covers `tokens[:cached_len]`: usually all of them; 0 when it was dropped
    (the next turn restores it from the store or recomputes it from `tokens`); a prefix of
    whole blocks after a partial restore (attention-only models).

    Attributes:
        agent_id: the agent's id.
        tokens: every token of the context: prompts, generated tokens, a final EOS.
        blocks: full blocks (one reference each) covering `tokens[:len(blocks) * block_size]`
            for the full-attention layers.
        tail: a private block with the rows after the last full block, or None.
        windows: sliding-window layers' last rows at `cached_len`.
        states: recurrent layers' state at `cached_len`.
        cached_len: tokens the cache covers.
        last_used: engine clock of the last admission or commit (LRU for dropping caches).
        pending: this agent's queued requests (uids), oldest first.
        active: the uid of the request now in the batch, or None.
        in_store: the store holds this agent's latest state (restore instead of recompute).
        restored: tokens of the current cache read from disk (reported by the next turn).
        restored_full: after a restore, the full-attention rows read from disk, one (K, V)
            buffer pair per layer, used by the next turn instead of blocks; its commit
            turns the finished cache into blocks and clears this.
        disk_blocks: full blocks the store holds (or has queued) for this agent, as of its
            last write-back or when it was read from the store.
        last_turn: wall-clock time (time.time()) of its last finished turn, 0.0 if none.
        saved: its current context was read from the store or queued for writing to it
            (it is there unless that write failed: `CacheStore.unsaved`).
    """

    agent_id: str
    tokens: list[int] = field(default_factory=list)
    blocks: list[KVBlock] = field(default_factory=list)
    tail: KVBlock | None = None
    windows: dict[int, WindowKV] = field(default_factory=dict)
    states: dict[int, RecurrentState] = field(default_factory=dict)
    cached_len: int = 0
    last_used: int = 0
    pending: deque[int] = field(default_factory=deque)
    active: int | None = None
    in_store: bool = False
    restored: int = 0
    restored_full: dict[int, tuple[mx.array, mx.array]] | None = None
    disk_blocks: int = 0
    last_turn: float = 0.0
    saved: bool = False

    @property
    def busy(self) -> bool:
        """True while a request of this agent is in the batch."""
        return self.active is not None

    def held_blocks(self) -> list[KVBlock]:
        """Every pool block this agent references, in order."""
        return self.blocks + ([self.tail] if self.tail is not None else [])
