"""The engine's agents: who is in memory or only in the store, and their caches' lives.

`AgentRegistry` owns every `AgentContext`: it finds agents in memory or in the store,
restores a stored cache into the pool, writes each finished turn back, picks the idle
cache to drop when the pool runs short (LRU, one already safe on disk first), and forks
and deletes agents. Engine thread only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace

from agentkv.storage import CacheStore, StorageError, StoreWriteError

from ..errors import AgentExistsError, PoolExhaustedError, UnknownAgentError
from . import persistence
from .agents import AgentCache, AgentContext
from .block_pool import BlockPool
from .kv_cache_manager import KVCacheManager
from .spec import ModelCacheSpec

log = logging.getLogger("agentkv.engine")


@dataclass(slots=True)
class AgentInfo:
    """A snapshot of one agent for inspection.

    Attributes:
        agent_id: the agent.
        tokens: context length in tokens.
        cached_tokens: tokens whose cache is held (0 if dropped).
        blocks: pool blocks held (full blocks plus tail).
        shared_blocks: of those, blocks other agents reference too.
        busy: a turn of this agent is in the batch.
        pending: turns waiting behind it.
        in_store: the store holds its current context (or has it queued for writing): its
            cache is restored from there at its next turn if not in memory.
        disk_blocks: full blocks of it the store holds (or has queued for writing).
        last_used: wall-clock time of its last finished turn (0.0: none yet).
        in_memory: the pool holds its cache.
        saving: a write of it to the store is queued.
        state: one word for all that: "running" (a turn in the batch), "queued" (turns
            waiting), "in memory", "on disk" (only the store holds its cache), or "no cache"
            (recomputed from its tokens at its next turn); ", saving" while a write is
            queued, ", unsaved" when its latest write failed.
    """

    agent_id: str
    tokens: int
    cached_tokens: int
    blocks: int
    shared_blocks: int
    busy: bool
    pending: int
    in_store: bool = False
    disk_blocks: int = 0
    last_used: float = 0.0
    in_memory: bool = False
    saving: bool = False
    state: str = "no cache"


class AgentRegistry:
    """Every agent the engine knows, and the store behind them.

    Args:
        spec: the model's cache spec.
        pool: the block pool.
        manager: the cache manager (drops, settles and rebuilds agents' caches).
        store: the CacheStore, or None (no persistence).
        counters: the engine's counters; "dropped_caches", "restored_agents" and
            "restored_tokens" are counted here.
    """

    def __init__(
        self,
        spec: ModelCacheSpec,
        pool: BlockPool,
        manager: KVCacheManager,
        store: CacheStore | None,
        counters: dict[str, int],
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.store = store
        self.agents: dict[str, AgentContext] = {}
        # Agents whose delete is queued in the store: kept until it is on disk, so a delete
        # that cannot be written (disk full) gives the agent back instead of losing it.
        self._deleting: dict[str, AgentContext] = {}
        self._manager = manager
        self._counters = counters
        self._layout = persistence.layout_meta(spec, pool.block_size)
        self._clock = 0

    # -- lookups ---------------------------------------------------------------------------

    def load(self, agent_id: str) -> AgentContext:
        """The agent, from memory or else from the store (then kept in memory).

        Raises:
            UnknownAgentError: neither holds it.
        """
        agent = self.agents.get(agent_id)
        if agent is None and isinstance(agent_id, str):
            agent = self._stored_agent(agent_id)
            if agent is not None:
                self.agents[agent_id] = agent
        if agent is None:
            raise UnknownAgentError(f"unknown agent {agent_id!r}")
        return agent

    def peek(self, agent_id: str) -> AgentContext:
        """Like `load`, but an agent only on disk is read, not brought into memory."""
        agent = self.agents.get(agent_id)
        if agent is None and isinstance(agent_id, str):
            agent = self._stored_agent(agent_id)
        if agent is None:
            raise UnknownAgentError(f"unknown agent {agent_id!r}")
        return agent

    def for_turn(self, agent_id: str) -> AgentContext:
        """The agent a new turn is for: in memory, from the store, or a new one (none of
        them added: `add` once the turn is accepted)."""
        return self.agents.get(agent_id) or self._stored_agent(agent_id) or AgentContext(agent_id)

    def add(self, agent: AgentContext) -> None:
        """Keep `agent` in memory (under its id)."""
        self.agents[agent.agent_id] = agent

    def ids(self) -> list[str]:
        """Ids of every agent: in memory, and in the store for this model."""
        ids = list(self.agents)
        if self.store is not None:
            known = set(ids)
            ids += [a for a in self.store.agent_ids(self.spec.fingerprint) if a not in known]
        return ids

    def count(self) -> int:
        """Agents in memory, and on disk only (after a restart); those in memory alone when
        the store's index cannot be read (its stats say why: stats must still answer)."""
        try:
            return len(self.ids())
        except StorageError:
            return len(self.agents)

    # -- caches ----------------------------------------------------------------------------

    def touch(self, agent: AgentContext) -> None:
        """Mark the agent used now (the LRU order of `lru_idle_agent`)."""
        self._clock += 1
        agent.last_used = self._clock

    def restore(self, agent: AgentContext) -> None:
        """Bring an agent's stored cache into the pool (once; later turns use memory)."""
        # Its last turn may still be queued: wait for it, so that the files exist.
        stored = self.store.agent(agent.agent_id, self.spec.fingerprint, wait=True)
        agent.in_store = False
        if stored is None or tuple(stored.tokens) != agent.tokens:
            return
        cache = persistence.restore(self.spec, self.pool, self.store, agent, stored)
        if cache is None:
            return
        agent.cache = cache
        if cache.restored:
            self._counters["restored_agents"] += 1
            self._counters["restored_tokens"] += cache.restored

    def lru_idle_agent(self, exclude: AgentContext) -> AgentContext | None:
        """The idle agent whose cache to drop: one already safe on disk first, then LRU."""
        idle = [
            a for a in self.agents.values() if a is not exclude and not a.busy and a.held_blocks()
        ]
        settled = self.store.is_settled if self.store is not None else lambda _: False
        return min(idle, key=lambda a: (not settled(a.agent_id), a.last_used), default=None)

    def drop_cache(self, agent: AgentContext) -> None:
        """Release an agent's cache (its next turn restores or recomputes it)."""
        released = self._manager.drop(agent)
        agent.in_store = self.store is not None  # its last turn was queued for writing
        self._counters["dropped_caches"] += 1
        log.info(
            "dropped cache of agent %r (%d blocks); it will be recomputed", agent.agent_id, released
        )

    def drop_all(self) -> None:
        """Release every agent's cache (at close)."""
        for agent in self.agents.values():
            self._manager.drop(agent)

    def committed(self, agent: AgentContext) -> None:
        """After a turn's cache became the agent's: mark it used and write it back."""
        self.touch(agent)
        agent.last_turn = time.time()
        self.write_back(agent)

    def write_back(self, agent: AgentContext) -> None:
        """Queue the agent's current context and cache for writing to the store."""
        if self.store is None:
            return
        agent.saved = False
        try:
            record = persistence.turn_record(self.spec, self.store, agent, self._layout)
            self.store.save_turn(record)
            agent.disk_blocks = len(record.blocks)
            agent.saved = True
        except Exception as exc:  # the turn is done and kept in memory either way
            log.error("agent %r: write-back not queued: %s", agent.agent_id, exc)

    def resave_unsaved(self) -> None:
        """Before closing: every agent whose latest write failed (disk full, ...) is queued
        once more, so a clean stop after a failed write does not lose the turn (the agent's
        next turn would have rewritten it). A second failure is logged by the store."""
        if self.store is None:
            return
        with contextlib.suppress(StoreWriteError):  # reported by flush() already, or logged
            self.store.flush()  # every write settled: `unsaved` is current
        for agent in self.agents.values():
            if self.store.unsaved(agent.agent_id, self.spec.fingerprint) is not None:
                log.warning("agent %r: its last write failed; writing it again", agent.agent_id)
                self.write_back(agent)

    # -- fork and delete -------------------------------------------------------------------

    def fork(self, agent_id: str, new_agent_id: str) -> None:
        """Branch an agent's committed context under a new id (see the engine's
        `fork_agent`). Raises UnknownAgentError, AgentExistsError."""
        src = self.load(agent_id)
        if new_agent_id in self.agents or self._stored_agent(new_agent_id) is not None:
            raise AgentExistsError(f"agent {new_agent_id!r} exists already")
        if src.cache.cached_len == 0 and src.in_store:
            self.restore(src)
        try:
            self._manager.settle_restored(src)
        except PoolExhaustedError:
            self.drop_cache(src)  # the fork (and src's next turn) recompute instead
        self.pool.touch(src.held_blocks())
        fork = AgentContext(new_agent_id, replace(src.cache, restored=0), last_turn=src.last_turn)
        self.touch(fork)
        self.agents[new_agent_id] = fork
        # Even with no cache to share: the fork's token ids must outlive a restart.
        self.write_back(fork)

    def delete(self, agent: AgentContext) -> None:
        """Forget an agent whose turns are cancelled; with a store, its blocks are kept
        until the delete is on disk (`finish_delete`)."""
        del self.agents[agent.agent_id]
        if self.store is None:
            self._manager.drop(agent)
            return
        self.store.delete_agent(agent.agent_id, self.spec.fingerprint)
        previous = self._deleting.pop(agent.agent_id, None)
        if previous is not None:  # deleted again meanwhile: the older copy is not needed
            self._manager.drop(previous)
        self._deleting[agent.agent_id] = agent

    def finish_delete(self, agent_id: str) -> str | None:
        """See the engine's `finish_delete`."""
        agent = self._deleting.pop(agent_id, None)
        why = self.store.delete_error(agent_id, self.spec.fingerprint) if self.store else None
        if agent is not None:
            if why is None or agent_id in self.agents:
                self._manager.drop(agent)
            else:
                self.agents[agent_id] = agent
        return why

    # -- reports ---------------------------------------------------------------------------

    def info(self, agent: AgentContext) -> AgentInfo:
        """A snapshot of `agent` (see AgentInfo)."""
        held, cached = agent.held_blocks(), agent.cache.cached_len
        store, aid = self.store, agent.agent_id
        unsaved = store is not None and store.unsaved(aid, self.spec.fingerprint) is not None
        in_store = store is not None and (agent.in_store or agent.saved) and not unsaved
        saving = store is not None and not store.is_settled(aid)
        if agent.busy or agent.pending:
            state = "running" if agent.busy else "queued"
        else:
            state = "in memory" if cached > 0 else "on disk" if in_store else "no cache"
        state += ", saving" if saving else ", unsaved" if unsaved else ""
        return AgentInfo(
            agent_id=aid,
            tokens=len(agent.tokens),
            cached_tokens=cached,
            blocks=len(held),
            shared_blocks=sum(1 for b in held if b.ref_cnt > 1),
            busy=agent.busy,
            pending=len(agent.pending),
            in_store=in_store,
            disk_blocks=agent.disk_blocks if store is not None else 0,
            last_used=agent.last_turn,
            in_memory=cached > 0,
            saving=saving,
            state=state,
        )

    def unsaved_report(self) -> list[dict]:
        """See the engine's `unsaved_report`."""
        if self.store is None:
            return []
        rows = []
        for agent_id, why in sorted(self.store.unsaved_agents(self.spec.fingerprint).items()):
            agent = self.agents.get(agent_id)
            if agent is None:
                continue
            try:
                durable = self.store.durable_tokens(agent_id, self.spec.fingerprint)
            except StorageError:  # a damaged index: count the whole context as behind
                durable = 0
            behind = max(len(agent.tokens) - durable, 0)
            rows.append({"agent_id": agent_id, "behind_tokens": behind, "error": why})
        return rows

    # -- internals -------------------------------------------------------------------------

    def _stored_agent(self, agent_id: str) -> AgentContext | None:
        """An agent known only to the store: its tokens now, its cache at admission."""
        if self.store is None:
            return None
        stored = self.store.agent(agent_id, self.spec.fingerprint)
        if stored is None:
            return None
        vocab = self.spec.vocab_size or 2**31
        if not all(0 <= t < vocab for t in stored.tokens):
            what = "token ids outside the vocabulary; treated as a new agent"
            self.store.report_corrupt_row(agent_id, self.spec.fingerprint, what)
            return None
        return AgentContext(
            agent_id,
            AgentCache(tokens=tuple(stored.tokens)),
            in_store=True,
            disk_blocks=len(stored.block_hashes),
            last_turn=stored.last_used,
            saved=True,
        )
