"""The KV-cache block pool: block metadata, reference counts and an LRU free list; blocks
are found by their prefix hash (`block_hash.py`).

The pool manages *metadata* only. The engine hangs each block's KV arrays on
``KVBlock.payload``; the pool never looks inside, it only drops the payload when it reclaims
a block. Every operation is O(1) per block and pure Python (no mlx), so the structure is tested
and benchmarked without a model.

Lifecycle of a block::

    free (no hash) --allocate--> in use --register--> in use, cached
        ^                                                  |  free (ref 0)
        |  free (ref 0, no hash)                           v
        +---------------- evicted by allocate <---- idle cached (free-queue tail)
                                                           |  touch (cache hit)
                                                           +--> in use, cached

The free queue holds every block with ``ref_cnt == 0``. Uncached blocks go to its head (reused
first); idle cached blocks go to its tail, so ``allocate`` evicts the least recently freed
cached block only when no plain free block is left.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from agentkv.daemon.errors import PoolExhaustedError

from .block_hash import BlockHash, chain_hashes, hash_block

__all__ = [  # the hashes are re-exported: the pool's users import them from here
    "BlockHash",
    "BlockPool",
    "CacheSpec",
    "FreeBlockQueue",
    "KVBlock",
    "PoolStats",
    "chain_hashes",
    "hash_block",
]


@dataclass(slots=True, eq=False)
class KVBlock:
    """Metadata of one KV-cache block. Identity-compared and hashable by identity.

    Attributes:
        block_id: index of the block in its pool, stable for the pool's lifetime.
        ref_cnt: number of sequences holding the block; 0 means it sits in the free queue.
        block_hash: content hash while the block is cached, else None.
        payload: the engine's KV arrays; the pool sets it to None when it reclaims the block.
        prev_free: free-queue link (pool-internal); not None exactly while in the queue.
        next_free: free-queue link (pool-internal).
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    payload: object | None = None
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None

    def __repr__(self) -> str:  # the default would recurse through the free-queue links
        cached = self.block_hash is not None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, cached={cached})"


class FreeBlockQueue:
    """Doubly linked list of blocks, threaded through `KVBlock.prev_free` / ``next_free``.

    Unlike a deque it removes from the middle in O(1), which a cache hit on an idle block needs.
    Dummy head and tail sentinels keep every link operation branch-free. A block is in the
    queue exactly when its ``prev_free`` is not None.
    """

    __slots__ = ("_head", "_len", "_tail")

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        """Build the queue holding ``blocks`` in order (head first)."""
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        """Yield blocks head to tail. Do not mutate the queue while iterating."""
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None, "broken free-queue link"
            yield node
            node = node.next_free

    def popleft(self) -> KVBlock:
        """Remove and return the head block. Raises IndexError on an empty queue."""
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("pop from an empty free-block queue")
        self.remove(block)
        return block

    def append(self, block: KVBlock) -> None:
        """Insert ``block`` at the tail (reclaimed last)."""
        self._link(block, self._tail.prev_free, self._tail)  # type: ignore[arg-type]

    def appendleft(self, block: KVBlock) -> None:
        """Insert ``block`` at the head (reclaimed first)."""
        self._link(block, self._head, self._head.next_free)  # type: ignore[arg-type]

    def remove(self, block: KVBlock) -> None:
        """Unlink ``block`` from anywhere in the queue. Raises ValueError if it is not queued."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block!r} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def _link(self, block: KVBlock, prev: KVBlock, nxt: KVBlock) -> None:
        if block.prev_free is not None:
            raise ValueError(f"{block!r} is already in the free queue")
        block.prev_free = prev
        block.next_free = nxt
        prev.next_free = block
        nxt.prev_free = block
        self._len += 1


class CacheSpec(Protocol):
    """What the pool needs from a model's cache spec (the full `ModelCacheSpec` lives elsewhere)."""

    block_size: int

    def bytes_per_block(self, block_size: int) -> int:
        """Bytes one block's payload takes at ``block_size`` tokens."""
        ...


@dataclass(slots=True, frozen=True)
class PoolStats:
    """A snapshot of the pool's counters.

    Attributes:
        total: blocks in the pool.
        free: blocks a new reservation or allocation can get now (free queue minus reserved).
        reserved: blocks promised by `BlockPool.reserve` and not yet allocated.
        in_use: blocks with a reference.
        cached: blocks carrying a hash, referenced or idle.
        evictions: idle cached blocks reclaimed so far (by allocate or clear_cache).
        queries: `BlockPool.lookup` calls so far.
        hits: lookups that found a block.
    """

    total: int
    free: int
    reserved: int
    in_use: int
    cached: int
    evictions: int
    queries: int
    hits: int


class BlockPool:
    """A fixed set of KV blocks with reference counts, prefix caching and reservations.

    Not thread-safe: the thread that owns the model owns the pool.
    """

    def __init__(
        self,
        spec: CacheSpec,
        total_blocks: int | None = None,
        *,
        memory_budget: int | None = None,
        block_size: int | None = None,
    ) -> None:
        """Create the pool.

        Args:
            spec: the model's cache spec; only ``block_size`` and ``bytes_per_block`` are used.
            total_blocks: capacity in blocks.
            memory_budget: capacity in payload bytes; with ``total_blocks`` the smaller wins.
            block_size: tokens per block; None means ``spec.block_size``.

        Raises:
            ValueError: no capacity given, a capacity below one block, a bad block size, or a
                memory budget alone for a spec whose blocks take no memory.
        """
        self.block_size: int = spec.block_size if block_size is None else block_size
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        self.bytes_per_block: int = spec.bytes_per_block(self.block_size)
        self.total_blocks: int = _capacity(total_blocks, memory_budget, self.bytes_per_block)
        self._blocks = [KVBlock(i) for i in range(self.total_blocks)]
        self._free = FreeBlockQueue(self._blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self._reserved = 0
        self._evictions = 0
        self._queries = 0
        self._hits = 0

    # -- counters -------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks a new reservation or unreserved allocation can get now."""
        return len(self._free) - self._reserved

    @property
    def num_reserved(self) -> int:
        """Blocks promised by `reserve` and not yet allocated."""
        return self._reserved

    @property
    def num_cached(self) -> int:
        """Blocks that carry a hash, whether referenced or idle in the free queue."""
        return len(self._cached)

    @property
    def num_in_use(self) -> int:
        """Blocks with ``ref_cnt > 0``."""
        return self.total_blocks - len(self._free)

    def stats(self) -> PoolStats:
        """Return a snapshot of the pool's counters."""
        return PoolStats(
            total=self.total_blocks,
            free=self.num_free,
            reserved=self._reserved,
            in_use=self.num_in_use,
            cached=len(self._cached),
            evictions=self._evictions,
            queries=self._queries,
            hits=self._hits,
        )

    # -- reservations ---------------------------------------------------------------------

    def reserve(self, n: int) -> None:
        """Promise ``n`` blocks to a later ``allocate(n, reserved=True)``.

        Reserved blocks stay in the free queue (idle cached ones stay hits) until allocated.

        Raises:
            PoolExhaustedError: ``n`` exceeds `num_free`; nothing is reserved.
            ValueError: ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"cannot reserve a negative number of blocks ({n})")
        if n > self.num_free:
            raise PoolExhaustedError(need=n, free=self.num_free, detail="reserve")
        self._reserved += n

    def unreserve(self, n: int) -> None:
        """Give back ``n`` unused reservations.

        Raises:
            ValueError: ``n`` is negative or more than is reserved.
        """
        if n < 0 or n > self._reserved:
            raise ValueError(f"cannot unreserve {n} block(s): {self._reserved} reserved")
        self._reserved -= n

    # -- allocation and release -----------------------------------------------------------

    def allocate(self, n: int = 1, *, reserved: bool = False) -> list[KVBlock]:
        """Take ``n`` blocks from the head of the free queue (least recently freed first).

        An idle cached block taken this way is evicted: its hash is forgotten and its payload
        dropped. All-or-nothing: on error the pool is unchanged.

        Args:
            n: number of blocks (>= 0).
            reserved: consume ``n`` earlier reservations instead of unreserved free blocks.

        Returns:
            ``n`` blocks with ``ref_cnt == 1``, no hash and no payload.

        Raises:
            PoolExhaustedError: ``reserved`` is False and fewer than ``n`` blocks are free.
            ValueError: ``n`` is negative, or ``reserved`` is True with fewer than ``n`` reserved.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if reserved:
            if n > self._reserved:
                raise ValueError(f"allocate({n}, reserved=True) with {self._reserved} reserved")
            self._reserved -= n  # reserved <= len(free queue) always holds, so pops succeed
        elif n > len(self._free) - self._reserved:
            raise PoolExhaustedError(need=n, free=self.num_free, detail="allocate")
        popleft = self._free.popleft
        blocks = []
        for _ in range(n):
            block = popleft()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference from each block, last block first.

        Tail-first order puts a sequence's later blocks ahead of its (more widely shared)
        earlier blocks in the eviction order. A block reaching ref 0 with a hash stays cached
        at the free-queue tail; one without a hash loses its payload and goes to the head.

        Raises:
            ValueError: a block would drop below ref 0 (a double free); nothing changes.
        """
        self._check_can_free(blocks)
        free_queue = self._free
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is not None:
                    free_queue.append(block)
                else:
                    block.payload = None
                    free_queue.appendleft(block)

    def _check_can_free(self, blocks: Sequence[KVBlock]) -> None:
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of {block!r}")
        if len(blocks) > 1 and len(set(blocks)) != len(blocks):
            # A block listed twice drops two references; rare, so counted only when present.
            for block, count in Counter(blocks).items():
                if count > block.ref_cnt:
                    raise ValueError(f"double free of {block!r}: listed {count} times")

    # -- prefix cache ---------------------------------------------------------------------

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        """Return the cached block with this hash, or None. Takes no reference."""
        self._queries += 1
        block = self._cached.get(block_hash)
        if block is not None:
            self._hits += 1
        return block

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one reference on each block (a cache hit); idle blocks leave the free queue.

        Raises:
            PoolExhaustedError: taking the idle ones would eat into reserved blocks; nothing
                changes.
        """
        blocks = blocks if isinstance(blocks, (list, tuple)) else list(blocks)
        idle = [block for block in blocks if block.ref_cnt == 0]
        if idle:
            need = len(set(idle)) if len(idle) > 1 else 1
            if need > self.num_free:
                raise PoolExhaustedError(need=need, free=self.num_free, detail="touch")
        remove = self._free.remove
        for block in blocks:
            if block.ref_cnt == 0:
                remove(block)
            block.ref_cnt += 1

    def register(self, block: KVBlock, block_hash: BlockHash) -> KVBlock:
        """Cache an allocated, unhashed block under ``block_hash``.

        Returns:
            ``block``, or the block already cached under ``block_hash``; in that case
            ``block`` stays unregistered and the caller decides which copy to keep.

        Raises:
            ValueError: ``block`` is not referenced, or already carries a different hash.
        """
        if block.ref_cnt <= 0:
            raise ValueError(f"register of unallocated {block!r}")
        existing = self._cached.get(block_hash)
        if existing is not None:
            return existing
        if block.block_hash is not None:
            raise ValueError(f"{block!r} is already cached under another hash")
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return block

    def clear_cache(self) -> int:
        """Evict every idle cached block (referenced cached blocks stay). Returns the count."""
        idle = [block for block in self._free if block.block_hash is not None]
        for block in idle:
            self._evict(block)
            # Now a plain free block: move it ahead of the cached ones, like free() would.
            self._free.remove(block)
            self._free.appendleft(block)
        return len(idle)

    def _evict(self, block: KVBlock) -> None:
        del self._cached[block.block_hash]  # type: ignore[arg-type]
        block.block_hash = None
        block.payload = None
        self._evictions += 1

    # -- checking -------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Verify counts, queue links and the hash map agree. O(total_blocks); for tests.

        Raises:
            AssertionError: describing the first disagreement found.
        """
        queued = self._check_queue_links()
        assert len(queued) == len(self._free), f"queue walk {len(queued)} != {len(self._free)}"
        assert 0 <= self._reserved <= len(self._free), f"reserved {self._reserved} out of range"
        for block in self._blocks:
            in_queue = id(block) in queued
            assert block.ref_cnt >= 0, f"negative ref on {block!r}"
            assert in_queue == (block.ref_cnt == 0), f"{block!r} queued={in_queue}"
            if not in_queue:
                assert block.prev_free is None and block.next_free is None, f"stale links {block!r}"
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, f"{block!r} not in hash map"
            elif block.ref_cnt == 0:
                assert block.payload is None, f"free uncached {block!r} kept its payload"
        for key, block in self._cached.items():
            assert block.block_hash == key, f"hash map key disagrees with {block!r}"
            assert self._blocks[block.block_id] is block, f"foreign {block!r} in hash map"

    def _check_queue_links(self) -> set[int]:
        """Walk the queue both ways; return the ids (object ids) of the queued blocks."""
        forward = list(self._free)
        node, backward = self._free._tail.prev_free, []
        while node is not self._free._head:
            assert node is not None, "broken backward link"
            backward.append(node)
            node = node.prev_free
        assert backward[::-1] == forward, "forward and backward walks disagree"
        for block in forward:
            assert 0 <= block.block_id < self.total_blocks, f"sentinel or foreign {block!r}"
            assert self._blocks[block.block_id] is block, f"foreign {block!r} in free queue"
        queued = {id(block) for block in forward}
        assert len(queued) == len(forward), "a block appears twice in the free queue"
        return queued


def _capacity(total_blocks: int | None, memory_budget: int | None, bytes_per_block: int) -> int:
    """Blocks the pool holds: ``total_blocks``, what ``memory_budget`` buys, or the smaller."""
    if total_blocks is None and memory_budget is None:
        raise ValueError("BlockPool needs total_blocks or memory_budget")
    limits = []
    if total_blocks is not None:
        limits.append(total_blocks)
    if memory_budget is not None:
        if memory_budget < 0:
            raise ValueError(f"memory_budget must be >= 0, got {memory_budget}")
        if bytes_per_block > 0:
            limits.append(memory_budget // bytes_per_block)
        elif total_blocks is None:
            raise ValueError(
                "memory_budget cannot size the pool: this model's blocks take 0 bytes "
                "(no full-attention layers); pass total_blocks instead"
            )
    capacity = min(limits)
    if capacity < 1:
        raise ValueError(
            f"block pool capacity must be >= 1 block, got {capacity} "
            f"(total_blocks={total_blocks}, memory_budget={memory_budget}, "
            f"bytes_per_block={bytes_per_block})"
        )
    return capacity
