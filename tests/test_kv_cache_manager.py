"""KVCacheManager on its own: admit, rebuild, commit, abort and drop against a real pool and
real mlx-lm caches of the tiny test models (no engine, no batch)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from refs import prefill_caches as prefill
from refs import random_tokens

from agentkv.daemon.engine.agents import AgentCache, AgentContext
from agentkv.daemon.engine.block_pool import BlockPool
from agentkv.daemon.engine.kv_cache_manager import Admission, KVCacheManager
from agentkv.daemon.engine.spec import ModelCacheSpec
from agentkv.daemon.errors import CacheReconstructionError, PoolExhaustedError

BS = 16
VOCAB = 768


def setup(loaded_models, arch: str = "llama", total_blocks: int = 64):
    model, _ = loaded_models[arch]
    spec = ModelCacheSpec.from_model(model, block_size=BS)
    pool = BlockPool(spec, total_blocks=total_blocks)
    return model, spec, pool, KVCacheManager(spec, pool)


def commit_turn(model, manager, agent, tokens, max_tokens: int = 1) -> Admission:
    adm = manager.admit(agent, tokens, max_tokens)
    assert adm is not None
    manager.commit(agent, adm, tokens, prefill(model, tokens))
    return adm


def pool_state(pool: BlockPool) -> tuple:
    """Free and reserved counts, and each block's references (the pool's whole state)."""
    refs = [pool._blocks[i].ref_cnt for i in range(pool.total_blocks)]
    return pool.num_free, pool.num_reserved, refs


def full_state(spec, caches) -> list[np.ndarray]:
    """The full-attention layers' K and V rows, as numpy arrays."""
    out = []
    for i in spec.full_layers:
        n = caches[i].offset
        k, v = caches[i].state[:2]
        out += [np.array(k[..., :n, :]), np.array(v[..., :n, :])]
    return out


def test_commit_replaces_the_cache_whole_and_rebuild_gives_it_back(loaded_models):
    model, spec, pool, manager = setup(loaded_models)
    tokens = random_tokens(np.random.default_rng(1), 3 * BS + 5, VOCAB)
    agent = AgentContext("a")
    before = agent.cache
    adm = manager.admit(agent, tokens, max_tokens=4)
    assert adm.cached_len == 0 and adm.reserved == manager.blocks_for(len(tokens) + 4)
    caches = prefill(model, tokens)
    manager.commit(agent, adm, tokens, caches)

    cache = agent.cache
    assert cache is not before and before.tokens == () and before.cached_len == 0
    assert cache.tokens == tuple(tokens) and cache.cached_len == len(tokens)
    assert len(cache.blocks) == 3 and cache.tail.payload.num_tokens == 5
    assert pool.num_reserved == 0 and adm.reserved == 0 and adm.touched == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        cache.cached_len = 0
    pool.check_invariants()

    again = manager.rebuild(agent, Admission(tokens, len(tokens), own_cache=True))
    for got, want in zip(full_state(spec, again), full_state(spec, caches), strict=True):
        assert np.array_equal(got, want)


def test_admit_returns_none_when_short_and_changes_nothing(loaded_models):
    model, _, pool, manager = setup(loaded_models, total_blocks=8)
    rng = np.random.default_rng(2)
    commit_turn(model, manager, AgentContext("a"), random_tokens(rng, 4 * BS, VOCAB))
    baseline = pool_state(pool)
    agent = AgentContext("b")
    assert manager.admit(agent, random_tokens(rng, 2 * BS, VOCAB), max_tokens=3 * BS) is None
    assert pool_state(pool) == baseline and agent.cache.cached_len == 0
    error = manager.refusal(agent, random_tokens(rng, 2 * BS, VOCAB), 3 * BS)
    assert isinstance(error, PoolExhaustedError) and error.need == 5 and error.free == 4


def test_idle_shared_blocks_count_against_the_room(loaded_models):
    """Blocks an agent left in the pool (idle, cached) are reused by hash; taking them uses
    free room, which admit counts before changing anything."""
    model, _, pool, manager = setup(loaded_models, total_blocks=6)
    rng = np.random.default_rng(3)
    prefix = random_tokens(rng, 4 * BS, VOCAB)
    a = AgentContext("a")
    commit_turn(model, manager, a, prefix)
    manager.drop(a)  # its 4 blocks stay cached, idle
    assert pool.num_free == 6 and pool.num_cached == 4
    b = AgentContext("b")
    full = prefix + random_tokens(rng, 5, VOCAB)
    baseline = pool_state(pool)
    assert manager.admit(b, full, max_tokens=2 * BS) is None  # 4 shared + 3 new > 6
    assert pool_state(pool) == baseline
    adm = manager.admit(b, full, max_tokens=BS)  # 4 shared + 2 new
    assert adm.cached_len == 4 * BS and not adm.own_cache and len(adm.touched) == 4
    manager.commit(b, adm, full, prefill(model, full))
    assert b.cache.blocks[:4] == tuple(adm.kept)
    pool.check_invariants()


def test_prefix_sharing_and_abort(loaded_models):
    model, _, pool, manager = setup(loaded_models)
    rng = np.random.default_rng(4)
    prefix = random_tokens(rng, 2 * BS, VOCAB)
    a = AgentContext("a")
    commit_turn(model, manager, a, prefix + random_tokens(rng, 7, VOCAB))
    baseline = pool_state(pool)
    b = AgentContext("b")
    adm = manager.admit(b, prefix + random_tokens(rng, 3, VOCAB), max_tokens=2)
    assert adm.cached_len == 2 * BS and adm.kept == list(a.cache.blocks[:2])
    assert all(block.ref_cnt == 2 for block in adm.kept)
    manager.abort(adm)
    assert pool_state(pool) == baseline and adm.reserved == 0 and adm.touched == []
    assert b.cache.cached_len == 0


def test_a_second_turn_reuses_the_agents_own_cache(loaded_models):
    model, spec, pool, manager = setup(loaded_models)
    rng = np.random.default_rng(5)
    first = random_tokens(rng, BS + 9, VOCAB)
    agent = AgentContext("a")
    commit_turn(model, manager, agent, first)
    old_blocks = agent.cache.blocks
    second = first + random_tokens(rng, 2 * BS, VOCAB)
    adm = manager.admit(agent, second, max_tokens=3)
    assert adm.own_cache and adm.cached_len == len(first) and adm.recomputed == 0
    caches = manager.rebuild(agent, adm)
    assert caches[spec.full_layers[0]].offset == len(first)
    manager.commit(agent, adm, second, prefill(model, second))
    assert agent.cache.blocks[0] is old_blocks[0] and len(agent.cache.blocks) == 3
    # An edited context keeps only the common whole blocks; the rest is recomputed.
    edited = second[: BS + 3] + [8 + (t + 1 - 8) % (VOCAB - 8) for t in second[BS + 3 : BS + 7]]
    adm = manager.admit(agent, edited, max_tokens=1)
    assert adm.cached_len == BS + 3 and adm.recomputed == 0 and len(adm.kept) == 1
    manager.abort(adm)
    pool.check_invariants()


def test_windows_and_states_are_not_rewound(loaded_models):
    model, _, pool, manager = setup(loaded_models, arch="gemma3_text")
    rng = np.random.default_rng(6)
    tokens = random_tokens(rng, 2 * BS + 4, VOCAB)
    agent = AgentContext("a")
    commit_turn(model, manager, agent, tokens)
    assert agent.cache.windows  # the sliding layers' last rows
    with pytest.raises(TypeError):
        agent.cache.windows[0] = None  # a read-only view: the value is never changed
    edited = tokens[:-3] + [8 + (t + 1 - 8) % (VOCAB - 8) for t in tokens[-3:]]
    adm = manager.admit(agent, edited, max_tokens=1)
    assert adm.cached_len == 0 and adm.recomputed == len(tokens) - 3
    manager.abort(adm)
    adm = manager.admit(agent, tokens + [9], max_tokens=1)
    assert adm.own_cache and adm.cached_len == len(tokens)
    manager.abort(adm)
    pool.check_invariants()


def test_drop_keeps_the_tokens_and_releases_the_blocks(loaded_models):
    model, _, pool, manager = setup(loaded_models)
    tokens = random_tokens(np.random.default_rng(7), 2 * BS + 3, VOCAB)
    agent = AgentContext("a")
    commit_turn(model, manager, agent, tokens)
    held = agent.held_blocks()
    assert manager.drop(agent) == 3
    assert agent.cache.tokens == tuple(tokens) and agent.cache.cached_len == 0
    assert agent.held_blocks() == [] and all(b.ref_cnt == 0 for b in held)
    assert pool.num_free == pool.total_blocks and pool.num_cached == 2  # full blocks stay hits


def test_a_block_that_lost_its_payload_is_a_reconstruction_error(loaded_models):
    model, _, _, manager = setup(loaded_models)
    tokens = random_tokens(np.random.default_rng(9), 2 * BS + 3, VOCAB)
    agent = AgentContext("a")
    commit_turn(model, manager, agent, tokens)
    shared = AgentContext("b", AgentCache(tokens=tuple(tokens)))
    adm = manager.admit(shared, tokens + [9], max_tokens=1)  # the blocks of "a", by hash
    assert adm.cached_len == 2 * BS and not adm.own_cache
    adm.kept[1].payload = None  # as if the pool had lost it
    with pytest.raises(CacheReconstructionError):
        manager.rebuild(shared, adm)
    manager.fall_back_to_prefill(adm)
    assert adm.cached_len == 0 and adm.recomputed == 2 * BS + 3
    assert manager.rebuild(shared, adm) is None


def test_commit_refuses_a_cache_of_another_length(loaded_models):
    model, _, pool, manager = setup(loaded_models)
    tokens = random_tokens(np.random.default_rng(8), BS + 2, VOCAB)
    agent = AgentContext("a")
    adm = manager.admit(agent, tokens, max_tokens=2)
    baseline_free = pool.num_free
    with pytest.raises(CacheReconstructionError):
        manager.commit(agent, adm, tokens + [5], prefill(model, tokens))
    assert agent.cache.cached_len == 0 and pool.num_free == baseline_free
    manager.abort(adm)
    assert pool.num_reserved == 0
    pool.check_invariants()
