"""Between agents and the block pool: what a turn reuses, reserves, rebuilds and commits.

A turn's life: `admit` decides how much of the new context is already cached (the agent's
own cache, or blocks another agent left under the same chained hashes) and reserves the
blocks the finished turn may need (or, when the pool is short now, changes nothing and
returns None); `rebuild` copies that prefix into fresh mlx-lm caches;
`commit` turns the finished sequence's cache into blocks (reusing every block whose hash
is already in the pool) and makes them the agent's new `AgentCache`, replaced whole;
`abort` gives everything back and leaves the agent as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import mlx.core as mx

from ..errors import CacheReconstructionError, PoolExhaustedError
from .agents import AgentCache, AgentContext, frozen_map
from .block_hash import BlockHash, chain_hashes, hash_block
from .block_pool import BlockPool, KVBlock
from .kv_blocks import block_payload, rebuild_caches, snapshot_states, snapshot_windows
from .prompts import common_prefix_len
from .spec import ModelCacheSpec


@dataclass(slots=True, eq=False)
class Admission:
    """What a turn took from the pool when it entered the batch.

    Attributes:
        full_tokens: the whole context this turn generates after.
        cached_len: leading tokens of it that come from the cache.
        kept: full blocks valid for the new context's prefix (the agent's or shared ones,
            and those of its own prompt once `publish` pooled them).
        touched: blocks this admission took a reference on, shared or published (returned
            on abort).
        reserved: blocks promised for the commit and not yet used.
        recomputed: tokens the agent had before that are prefilled again.
        restored: of the cached tokens, those read from disk for this turn.
        own_cache: True when the prefix comes from the agent's own cache.
    """

    full_tokens: list[int]
    cached_len: int
    kept: list[KVBlock] = field(default_factory=list)
    touched: list[KVBlock] = field(default_factory=list)
    reserved: int = 0
    recomputed: int = 0
    restored: int = 0
    own_cache: bool = False


class KVCacheManager:
    """Applies the pool's bookkeeping to agents' turns. Single-threaded (the MLX thread)."""

    def __init__(self, spec: ModelCacheSpec, pool: BlockPool) -> None:
        self.spec = spec
        self.pool = pool
        self.block_size = pool.block_size

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks (full ones plus a partial tail) that hold n_tokens."""
        return -(-n_tokens // self.block_size)

    def admit(
        self, agent: AgentContext, full_tokens: list[int], max_tokens: int
    ) -> Admission | None:
        """Plan the reuse and reserve the blocks a turn needs.

        Returns:
            The admission, or None when the pool has too few free blocks for it now
            (nothing was changed then: the normal "not yet" of a busy pool).
        """
        adm = self._plan(agent, full_tokens)
        need = self._need(adm, max_tokens)
        # Shared blocks idle in the free queue leave it when referenced: they count too.
        idle = len({b for b in adm.touched if b.ref_cnt == 0})
        if idle + need > self.pool.num_free:
            return None
        self.pool.touch(adm.touched)
        self.pool.reserve(need)
        adm.reserved = need
        return adm

    def refusal(
        self, agent: AgentContext, full_tokens: list[int], max_tokens: int
    ) -> PoolExhaustedError:
        """The error for a turn that `admit` cannot fit even with every idle cache dropped."""
        need = self._need(self._plan(agent, full_tokens), max_tokens)
        return PoolExhaustedError(need=need, free=self.pool.num_free, detail="reserve")

    def rebuild(self, agent: AgentContext, adm: Admission) -> list | None:
        """Fresh per-layer caches holding the admission's cached prefix (None if empty).

        Raises:
            CacheReconstructionError: the stored pieces do not form that prefix.
        """
        n, cache = adm.cached_len, agent.cache
        if n == 0:
            return None
        if adm.own_cache and cache.restored_full is not None:
            return rebuild_caches(
                self.spec, [], n, cache.windows, cache.states, full=cache.restored_full
            )
        if adm.own_cache:
            held = cache.held_blocks()[: self.blocks_for(n)]
            windows, states = cache.windows, cache.states
        else:
            held, windows, states = adm.kept, {}, {}
        payloads = [b.payload for b in held]
        if any(p is None for p in payloads):
            raise CacheReconstructionError(f"agent {agent.agent_id!r}: a block lost its payload")
        return rebuild_caches(self.spec, payloads, n, windows, states)

    def fall_back_to_prefill(self, adm: Admission) -> None:
        """Forget the cached prefix of an admission: the turn prefills everything."""
        adm.recomputed += adm.cached_len
        adm.cached_len = 0

    def commit(self, agent: AgentContext, adm: Admission, tokens: list[int], caches: list) -> None:
        """Make a finished sequence's cache the agent's blocks; release what is left.

        `tokens` are all the sequence's tokens (the cache holds exactly these). Blocks
        whose chained hash is already pooled are shared, not stored twice. On failure
        (pool exhausted) the agent is left as it was and the admission is released.
        """
        self.check_offsets(tokens, caches)
        got: list[KVBlock] = []
        try:
            blocks = self._full_blocks(adm, tokens, caches, got)
            tail = self._tail_block(adm, tokens, caches, got)
        except PoolExhaustedError:
            self.pool.free(got)
            self.abort(adm)
            raise
        kept = set(adm.kept)
        old = [b for b in agent.held_blocks() if b not in kept]
        new = AgentCache(
            tokens=tuple(tokens),
            blocks=(*adm.kept, *blocks),
            tail=tail,
            windows=frozen_map(snapshot_windows(self.spec, caches)),
            states=frozen_map(snapshot_states(self.spec, caches, len(tokens))),
            cached_len=len(tokens),
        )
        _materialize(blocks, new)
        agent.cache = new
        adm.touched = []  # now owned by the agent
        self.pool.unreserve(adm.reserved)
        adm.reserved = 0
        self.pool.free(old)

    def pending_hashes(self, adm: Admission) -> list[BlockHash]:
        """The chained hashes of the full blocks a running turn's prefill computes (its
        context's full blocks past those it kept); [] unless blocks can be shared."""
        if not self.spec.all_full:
            return []
        bs, kept = self.block_size, adm.kept
        parent = kept[-1].block_hash if kept else None
        return chain_hashes(adm.full_tokens[len(kept) * bs :], bs, self.spec.fingerprint, parent)

    def first_missing_hash(self, full: list[int]) -> BlockHash | None:
        """The hash of the first leading full block of `full` not pooled (None: all are)."""
        hashes = chain_hashes(full[: len(full) - 1], self.block_size, self.spec.fingerprint)
        for h in hashes:
            block = self.pool.lookup(h)
            if block is None or block.payload is None:
                return h
        return None

    def publish(self, adm: Admission, caches: list) -> int:
        """Pool a running turn's prompt blocks now that its prefill is done (its first token
        came), so that turns waiting for the same prefix reuse them before it finishes.

        The blocks come out of the turn's own reservation and join its `kept` (its commit
        then starts after them; an abort gives them back). Returns the blocks published.
        """
        offset = min(caches[i].offset for i in self.spec.full_layers)
        prompt = adm.full_tokens[: min(len(adm.full_tokens), offset)]
        if len(prompt) // self.block_size - len(adm.kept) > adm.reserved:
            return 0  # cannot happen (the reservation covers the whole turn); never borrow
        blocks = self._full_blocks(adm, prompt, caches, [])
        adm.kept += blocks
        adm.touched += blocks
        _evaluate(blocks)
        return len(blocks)

    def settle_restored(self, agent: AgentContext) -> None:
        """Turn an agent's restored buffers into pool blocks now (a fork needs blocks).

        On PoolExhaustedError the agent keeps its buffers.
        """
        before = agent.cache
        if before.restored_full is None:
            return
        prefix = list(before.tokens[: before.cached_len])
        caches = self.rebuild(agent, Admission(prefix, len(prefix), own_cache=True))
        self.commit(agent, Admission(prefix, 0), prefix, caches)
        # A partial restore covers a prefix only; its restored tokens are still unreported.
        agent.cache = replace(agent.cache, tokens=before.tokens, restored=before.restored)

    def check_offsets(self, tokens: list[int], caches: list) -> None:
        """The finished cache must hold exactly the sequence's tokens."""
        for i in self.spec.full_layers:
            if caches[i].offset != len(tokens):
                raise CacheReconstructionError(
                    f"layer {i} cache holds {caches[i].offset} tokens, sequence has {len(tokens)}"
                )

    def abort(self, adm: Admission) -> None:
        """Give back an admission's reservation and shared references."""
        self.pool.free(adm.touched)
        adm.touched = []
        self.pool.unreserve(adm.reserved)
        adm.reserved = 0

    def drop(self, agent: AgentContext) -> int:
        """Release an idle agent's cache (its tokens stay); returns the blocks released."""
        held = agent.held_blocks()
        self.pool.free(held)
        agent.cache = agent.cache.without_cache()
        return len(held)

    # -- internals -------------------------------------------------------------------------

    def _need(self, adm: Admission, max_tokens: int) -> int:
        """Blocks to reserve: the finished turn's, less the full blocks it keeps."""
        return self.blocks_for(len(adm.full_tokens) + max_tokens) - len(adm.kept)

    def _plan(self, agent: AgentContext, full: list[int]) -> Admission:
        bs, cache = self.block_size, agent.cache
        previous = common_prefix_len(cache.tokens, full)
        if cache.cached_len > 0:
            n = min(previous, cache.cached_len, len(full) - 1)
            if n < cache.cached_len and not self.spec.all_full:
                n = 0  # windows and recurrent states cannot be rewound
            adm = Admission(full, n, kept=list(cache.blocks[: n // bs]), own_cache=n > 0)
        else:
            matched = self._shared_prefix(full)
            n = len(matched) * bs
            adm = Admission(full, n, kept=list(matched), touched=list(matched))
        adm.recomputed = max(0, previous - adm.cached_len)
        return adm

    def _shared_prefix(self, full: list[int]) -> list[KVBlock]:
        """Pooled blocks matching the leading full blocks of `full` (all-attention models)."""
        if not self.spec.all_full:
            return []
        # At least one token must remain to be fed to the model.
        hashes = chain_hashes(full[: len(full) - 1], self.block_size, self.spec.fingerprint)
        matched = []
        for h in hashes:
            block = self.pool.lookup(h)
            if block is None or block.payload is None:
                break
            matched.append(block)
        return matched

    def _full_blocks(self, adm: Admission, tokens, caches, got: list[KVBlock]) -> list[KVBlock]:
        bs = self.block_size
        parent = adm.kept[-1].block_hash if adm.kept else None
        out = []
        for i in range(len(adm.kept), len(tokens) // bs):
            h = hash_block(parent, tokens[i * bs : (i + 1) * bs], self.spec.fingerprint)
            block = self.pool.lookup(h)
            if block is not None and block.payload is not None:
                self._take(adm, block)
            else:
                block = self._allocate(adm)
                block.payload = block_payload(self.spec, caches, i * bs, (i + 1) * bs)
                block = self._register(block, h)
            got.append(block)
            out.append(block)
            parent = h
        return out

    def _tail_block(self, adm: Admission, tokens, caches, got: list[KVBlock]) -> KVBlock | None:
        start = len(tokens) // self.block_size * self.block_size
        if start == len(tokens):
            return None
        block = self._allocate(adm)
        got.append(block)
        block.payload = block_payload(self.spec, caches, start, len(tokens))
        return block

    def _take(self, adm: Admission, block: KVBlock) -> None:
        # An idle cached block leaves the free queue: that uses one reserved slot.
        if block.ref_cnt == 0 and adm.reserved > 0:
            self.pool.unreserve(1)
            adm.reserved -= 1
        self.pool.touch([block])

    def _allocate(self, adm: Admission) -> KVBlock:
        if adm.reserved > 0:
            adm.reserved -= 1
            return self.pool.allocate(1, reserved=True)[0]
        return self.pool.allocate(1)[0]

    def _register(self, block: KVBlock, h) -> KVBlock:
        existing = self.pool.register(block, h)
        if existing is not block:  # cannot happen single-threaded, but never store twice
            self.pool.touch([existing])
            self.pool.free([block])
        return existing


def _materialize(blocks: list[KVBlock], cache: AgentCache) -> None:
    """Evaluate new payloads and snapshots now, so they stop referencing the batch buffers."""
    arrays = []
    arrays += [a for w in cache.windows.values() for a in (w.keys, w.values)]
    arrays += [a for s in cache.states.values() for a in s.arrays if a is not None]
    _evaluate([*blocks, *([cache.tail] if cache.tail is not None else [])], arrays)


def _evaluate(blocks: list[KVBlock], more: list | None = None) -> None:
    """Evaluate blocks' payloads (and `more` arrays) now: no view of a batch buffer stays."""
    arrays = [a for b in blocks for a in (*b.payload.keys, *b.payload.values)]
    mx.eval([*arrays, *(more or [])])
