"""Tests of the block pool: hashing, the free queue, refcounts, LRU, reservations, capacity."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from agentkv.daemon.engine.block_pool import (
    BlockHash,
    BlockPool,
    FreeBlockQueue,
    KVBlock,
    PoolStats,
    chain_hashes,
    hash_block,
)
from agentkv.daemon.errors import PoolExhaustedError

FP = "model-a@sha:1234"


@dataclass
class FakeSpec:
    """Stand-in for ModelCacheSpec: only what the pool reads."""

    block_size: int = 4
    per_token_bytes: int = 10

    def bytes_per_block(self, block_size: int) -> int:
        return block_size * self.per_token_bytes


def make_pool(total: int = 8, **kwargs) -> BlockPool:
    return BlockPool(FakeSpec(), total, **kwargs)


def h(n: int) -> BlockHash:
    return BlockHash(n.to_bytes(32, "little"))


def ids(blocks) -> list[int]:
    return [block.block_id for block in blocks]


def cache_blocks(pool: BlockPool, *hash_ids: int) -> list[KVBlock]:
    """Allocate one block per hash id, register it, and return the (still referenced) blocks."""
    blocks = pool.allocate(len(hash_ids))
    for block, n in zip(blocks, hash_ids, strict=True):
        assert pool.register(block, h(n)) is block
    return blocks


# -- hashing ------------------------------------------------------------------------------


def test_same_prefix_same_chain():
    tokens = list(range(100, 112))
    assert chain_hashes(tokens, 4, FP) == chain_hashes(list(tokens), 4, FP)
    longer = chain_hashes([*tokens, 1, 2, 3, 4], 4, FP)
    assert longer[:3] == chain_hashes(tokens, 4, FP)
    assert len(set(longer)) == 4


def test_changed_token_changes_its_block_and_all_later():
    tokens = list(range(16))
    base = chain_hashes(tokens, 4, FP)
    edited = tokens.copy()
    edited[5] = 999  # block 1
    changed = chain_hashes(edited, 4, FP)
    assert changed[0] == base[0]
    assert all(a != b for a, b in zip(changed[1:], base[1:], strict=True))


def test_fingerprint_changes_every_hash():
    tokens = list(range(12))
    a, b = chain_hashes(tokens, 4, FP), chain_hashes(tokens, 4, FP + "x")
    assert all(x != y for x, y in zip(a, b, strict=True))


def test_partial_block_gets_no_hash():
    assert len(chain_hashes(list(range(11)), 4, FP)) == 2
    assert chain_hashes([1, 2, 3], 4, FP) == []
    assert chain_hashes([], 4, FP) == []


def test_chain_hashes_matches_hash_block_and_parent():
    tokens = list(range(50, 62))
    chain = chain_hashes(tokens, 4, FP)
    parent = None
    for i, expected in enumerate(chain):
        parent = hash_block(parent, tokens[4 * i : 4 * i + 4], FP)
        assert parent == expected
        assert len(parent) == 32
    # Continuing from a parent hash gives the tail of the full chain.
    assert chain_hashes(tokens[4:], 4, FP, parent=chain[0]) == chain[1:]


def test_hash_does_not_confuse_token_bytes_with_fingerprint():
    assert hash_block(None, [1], "a") != hash_block(None, [], "a\x01\x00\x00\x00")
    assert hash_block(None, [1, 2], FP) != hash_block(None, [2, 1], FP)


def test_chain_hashes_rejects_bad_block_size():
    with pytest.raises(ValueError):
        chain_hashes([1, 2], 0, FP)


# -- free queue ---------------------------------------------------------------------------


def test_free_queue_ops():
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert len(queue) == 5 and ids(queue) == [0, 1, 2, 3, 4]
    queue.remove(blocks[2])  # middle
    assert ids(queue) == [0, 1, 3, 4]
    assert blocks[2].prev_free is None and blocks[2].next_free is None
    queue.remove(blocks[0])  # head
    queue.remove(blocks[4])  # tail
    assert ids(queue) == [1, 3] and len(queue) == 2
    queue.appendleft(blocks[4])
    queue.append(blocks[0])
    assert ids(queue) == [4, 1, 3, 0]
    assert queue.popleft() is blocks[4]
    assert ids(queue) == [1, 3, 0] and len(queue) == 3


def test_free_queue_empty_and_misuse():
    block = KVBlock(0)
    queue = FreeBlockQueue()
    with pytest.raises(IndexError):
        queue.popleft()
    with pytest.raises(ValueError):
        queue.remove(block)
    queue.append(block)
    with pytest.raises(ValueError):
        queue.append(block)
    assert queue.popleft() is block
    assert len(queue) == 0 and list(queue) == []


# -- allocate / free / refcounts ----------------------------------------------------------


def test_allocate_and_free_refcounts():
    pool = make_pool(4)
    blocks = pool.allocate(3)
    assert ids(blocks) == [0, 1, 2]
    assert all(b.ref_cnt == 1 and b.block_hash is None and b.payload is None for b in blocks)
    assert (pool.num_free, pool.num_in_use) == (1, 3)
    pool.touch(blocks[:1])
    assert blocks[0].ref_cnt == 2
    pool.free(blocks)
    assert blocks[0].ref_cnt == 1 and pool.num_in_use == 1
    pool.free(blocks[:1])
    assert pool.num_free == 4 and pool.num_in_use == 0
    assert pool.allocate(0) == []
    pool.check_invariants()


def test_free_drops_payload_of_uncached_block():
    pool = make_pool(2)
    (block,) = pool.allocate()
    block.payload = "kv arrays"
    pool.free([block])
    assert block.payload is None


def test_exhaustion_is_all_or_nothing():
    pool = make_pool(3)
    pool.allocate(2)
    with pytest.raises(PoolExhaustedError) as info:
        pool.allocate(2)
    assert (info.value.need, info.value.free) == (2, 1)
    assert "need 2" in str(info.value) and "1 free" in str(info.value)
    assert pool.num_free == 1
    pool.check_invariants()


def test_double_free_fails_loudly():
    pool = make_pool(3)
    a, b = pool.allocate(2)
    pool.free([a])
    with pytest.raises(ValueError, match="double free"):
        pool.free([b, a])
    assert b.ref_cnt == 1  # nothing changed
    with pytest.raises(ValueError, match="double free"):
        pool.free([b, b])
    assert b.ref_cnt == 1
    pool.check_invariants()


def test_uncached_freed_blocks_reused_before_cached():
    pool = make_pool(4)
    cached = cache_blocks(pool, 1, 2)
    plain = pool.allocate(2)
    pool.free(cached)
    pool.free(plain)
    # Queue: plain blocks at the head, idle cached ones behind them.
    assert set(ids(pool.allocate(2))) == set(ids(plain))
    assert pool.num_cached == 2 and pool.stats().evictions == 0


def test_lru_reclaims_least_recently_freed_cached_block_first():
    pool = make_pool(2)
    a, b = cache_blocks(pool, 1, 2)
    a.payload = b.payload = "kv"
    pool.free([a])
    pool.free([b])
    (got,) = pool.allocate()
    assert got is a and a.block_hash is None and a.payload is None
    assert pool.lookup(h(1)) is None and pool.lookup(h(2)) is b
    assert b.payload == "kv"
    assert pool.stats().evictions == 1
    pool.check_invariants()


def test_free_is_tail_first():
    pool = make_pool(3)
    seq = cache_blocks(pool, 1, 2, 3)
    pool.free(seq)
    # The sequence's tail was freed first, so it is evicted first; the shared head lasts.
    assert ids(pool._free) == [2, 1, 0]
    assert pool.allocate(1)[0] is seq[2]


def test_touch_pulls_idle_cached_block_out_of_queue():
    pool = make_pool(4)
    a, b, c = cache_blocks(pool, 1, 2, 3)
    pool.free([a, b, c])
    assert pool.lookup(h(2)) is b
    pool.touch([b])
    assert b.ref_cnt == 1 and b not in list(pool._free)
    assert pool.num_free == 3 and pool.num_in_use == 1
    stats = pool.stats()
    assert (stats.queries, stats.hits) == (1, 1)
    pool.touch(iter([b, b]))  # generators and repeats are fine
    assert b.ref_cnt == 3
    pool.check_invariants()


def test_touch_never_eats_reserved_blocks():
    pool = make_pool(2)
    (a,) = cache_blocks(pool, 1)
    pool.free([a])
    pool.reserve(2)
    with pytest.raises(PoolExhaustedError) as info:
        pool.touch([a])
    assert (info.value.need, info.value.free) == (1, 0)
    assert a.ref_cnt == 0 and pool.num_reserved == 2
    pool.check_invariants()


def test_register_returns_existing_block_on_duplicate_hash():
    pool = make_pool(3)
    first, second = pool.allocate(2)
    assert pool.register(first, h(7)) is first
    assert pool.register(second, h(7)) is first
    assert second.block_hash is None and pool.num_cached == 1
    assert pool.register(first, h(7)) is first  # idempotent
    with pytest.raises(ValueError):
        pool.register(first, h(8))  # already cached under another hash
    pool.free([second])
    with pytest.raises(ValueError):
        pool.register(second, h(9))  # not allocated
    pool.check_invariants()


def test_referenced_cached_block_is_never_evicted():
    pool = make_pool(2)
    (a,) = cache_blocks(pool, 1)
    pool.allocate(1)
    with pytest.raises(PoolExhaustedError):
        pool.allocate(1)
    assert pool.lookup(h(1)) is a


def test_clear_cache_drops_only_idle_cached_blocks():
    pool = make_pool(4)
    a, b = cache_blocks(pool, 1, 2)
    pool.free([a])
    assert pool.clear_cache() == 1
    assert pool.lookup(h(1)) is None and pool.lookup(h(2)) is b
    assert pool.num_cached == 1 and pool.num_free == 3
    pool.check_invariants()


# -- reservations -------------------------------------------------------------------------


def test_reserve_allocate_unreserve():
    pool = make_pool(5)
    pool.reserve(3)
    assert (pool.num_free, pool.num_reserved) == (2, 3)
    with pytest.raises(PoolExhaustedError) as info:
        pool.allocate(3)
    assert (info.value.need, info.value.free) == (3, 2)
    assert len(pool.allocate(2, reserved=True)) == 2
    assert (pool.num_free, pool.num_reserved) == (2, 1)
    with pytest.raises(ValueError):
        pool.allocate(2, reserved=True)  # only 1 reserved
    with pytest.raises(ValueError):
        pool.unreserve(2)
    pool.unreserve(1)
    assert (pool.num_free, pool.num_reserved) == (3, 0)
    pool.check_invariants()


def test_reserve_exhaustion_names_need_and_free():
    pool = make_pool(4)
    pool.allocate(1)
    with pytest.raises(PoolExhaustedError, match=r"need 4 block\(s\), 3 free") as info:
        pool.reserve(4)
    assert (info.value.need, info.value.free) == (4, 3)
    assert pool.num_reserved == 0
    with pytest.raises(ValueError):
        pool.reserve(-1)
    pool.reserve(0)
    pool.reserve(3)
    assert pool.num_free == 0


def test_reserved_allocation_evicts_idle_cached_blocks():
    pool = make_pool(2)
    a, b = cache_blocks(pool, 1, 2)
    pool.free([a, b])
    pool.reserve(2)
    assert pool.lookup(h(1)) is a  # reserving keeps idle cached blocks as hits
    pool.allocate(2, reserved=True)
    assert pool.num_cached == 0 and pool.stats().evictions == 2
    pool.check_invariants()


# -- capacity -----------------------------------------------------------------------------


def test_capacity_from_memory_budget():
    spec = FakeSpec(block_size=4, per_token_bytes=10)  # 40 bytes per block
    assert BlockPool(spec, memory_budget=400).total_blocks == 10
    assert BlockPool(spec, memory_budget=439).total_blocks == 10
    assert BlockPool(spec, 5, memory_budget=400).total_blocks == 5
    assert BlockPool(spec, 50, memory_budget=400).total_blocks == 10
    pool = BlockPool(spec, memory_budget=400, block_size=8)  # 80 bytes per block
    assert (pool.total_blocks, pool.block_size, pool.bytes_per_block) == (5, 8, 80)


def test_capacity_errors():
    spec = FakeSpec()
    with pytest.raises(ValueError, match="total_blocks or memory_budget"):
        BlockPool(spec)
    with pytest.raises(ValueError, match=">= 1 block"):
        BlockPool(spec, 0)
    with pytest.raises(ValueError, match=">= 1 block"):
        BlockPool(spec, memory_budget=39)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(spec, 4, block_size=0)
    zero = FakeSpec(per_token_bytes=0)
    with pytest.raises(ValueError, match="take 0 bytes"):
        BlockPool(zero, memory_budget=1 << 30)
    assert BlockPool(zero, 7, memory_budget=1 << 30).total_blocks == 7


def test_stats_snapshot():
    pool = make_pool(6)
    cache_blocks(pool, 1)
    pool.reserve(2)
    pool.lookup(h(1))
    pool.lookup(h(2))
    assert pool.stats() == PoolStats(
        total=6, free=3, reserved=2, in_use=1, cached=1, evictions=0, queries=2, hits=1
    )


# -- randomized stress --------------------------------------------------------------------


# Weighted by repetition: allocation and free twice as often as the rest.
_STRESS_OPS = (
    *("alloc", "alloc", "reserve", "alloc_reserved", "unreserve"),
    *("register", "free", "free", "hit"),
)


def _expect_refusal(pool: BlockPool, op, *args) -> None:
    """``op(*args)`` must raise PoolExhaustedError and leave the pool exactly as it was."""
    before = pool.stats()
    with pytest.raises(PoolExhaustedError):
        op(*args)
    assert pool.stats() == before


def _stress_step(pool: BlockPool, rng: random.Random, held: list[list[KVBlock]]) -> str:
    """One random operation; ``held`` lists each simulated sequence's referenced blocks."""
    op = rng.choice(_STRESS_OPS)
    if op == "alloc":
        n = rng.randint(1, 4)
        if n <= pool.num_free:
            held.append(pool.allocate(n))
        else:
            _expect_refusal(pool, pool.allocate, n)
            op = "alloc_refused"
    elif op == "reserve":
        n = rng.randint(0, 3)
        if n <= pool.num_free:
            pool.reserve(n)
        else:
            _expect_refusal(pool, pool.reserve, n)
    elif op == "alloc_reserved" and pool.num_reserved:
        held.append(pool.allocate(rng.randint(1, pool.num_reserved), reserved=True))
    elif op == "unreserve" and pool.num_reserved:
        pool.unreserve(rng.randint(1, pool.num_reserved))
    elif op == "register" and held:
        for block in held[rng.randrange(len(held))]:
            if block.block_hash is None:
                assert pool.register(block, h(rng.randrange(40))).block_hash is not None
    elif op == "free" and held:
        pool.free(held.pop(rng.randrange(len(held))))
    elif op == "hit":
        found = [b for b in (pool.lookup(h(rng.randrange(40))) for _ in range(3)) if b]
        if len({id(b) for b in found if b.ref_cnt == 0}) <= pool.num_free:
            pool.touch(found)
            held.append(found)
        else:
            _expect_refusal(pool, pool.touch, found)
            op = "hit_refused"
    return op


def test_randomized_stress_keeps_invariants():
    rng = random.Random(20240611)
    pool = make_pool(32)
    held: list[list[KVBlock]] = []
    seen: set[str] = set()
    for step in range(5000):
        seen.add(_stress_step(pool, rng, held))
        if step % 10 == 0:
            pool.check_invariants()
        assert sum(b.ref_cnt for b in pool._blocks) == sum(len(seq) for seq in held)
    # The run must have reached the interesting paths, not just the easy ones.
    assert {"alloc_refused", "hit_refused", "alloc_reserved", "unreserve"} <= seen
    assert pool.stats().evictions > 0 and pool.stats().hits > 0
    for seq in held:
        pool.free(seq)
    pool.unreserve(pool.num_reserved)
    pool.check_invariants()
    assert (pool.num_free, pool.num_in_use, pool.num_reserved) == (32, 0, 0)
    pool.clear_cache()
    assert pool.num_cached == 0
    pool.check_invariants()
