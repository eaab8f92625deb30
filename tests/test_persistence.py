"""persistence on its own: an agent's cache to a TurnRecord, written by a real CacheStore in
tmp_path, and restored back into a fresh pool, bit for bit (no engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlx.utils import tree_flatten
from refs import prefill_caches, random_tokens

from agentkv.daemon.engine import persistence
from agentkv.daemon.engine.agents import AgentCache, AgentContext
from agentkv.daemon.engine.block_pool import BlockPool
from agentkv.daemon.engine.kv_cache_manager import Admission, KVCacheManager
from agentkv.daemon.engine.model_factory import ARCHITECTURES
from agentkv.daemon.engine.spec import ModelCacheSpec
from agentkv.storage import CacheStore

BS = 16
VOCAB = 768


def committed_agent(model, spec, tokens: list[int], total_blocks: int = 64):
    """An agent whose turn over `tokens` is committed to a pool of its own."""
    pool = BlockPool(spec, total_blocks=total_blocks)
    manager = KVCacheManager(spec, pool)
    agent = AgentContext("agent")
    adm = manager.admit(agent, tokens, max_tokens=1)
    manager.commit(agent, adm, tokens, prefill_caches(model, tokens))
    return agent, pool, manager


def saved(spec, root, agent: AgentContext) -> CacheStore:
    """A store in `root` holding the agent's turn (written and indexed)."""
    store = CacheStore(root)
    store.register_model(spec.fingerprint, model_id=spec.model_type, block_size=BS)
    layout = persistence.layout_meta(spec, BS)
    store.save_turn(persistence.turn_record(spec, store, agent, layout))
    store.flush()
    return store


def stored_turn(model, root, n_tokens: int):
    """A turn of `n_tokens` random tokens in a store in `root`: (spec, tokens, store,
    the store's StoredAgent)."""
    spec = ModelCacheSpec.from_model(model, block_size=BS)
    tokens = random_tokens(np.random.default_rng(n_tokens), n_tokens, VOCAB)
    agent, _, _ = committed_agent(model, spec, tokens)
    store = saved(spec, root, agent)
    return spec, tokens, store, store.agent("agent", spec.fingerprint)


def states(caches) -> list[np.ndarray]:
    """Every array of every layer's cache state, as numpy."""
    return [np.array(a) for _, a in tree_flatten([c.state for c in caches]) if a is not None]


def rebuilt(manager, agent) -> list:
    cache = agent.cache
    return manager.rebuild(agent, Admission(list(cache.tokens), cache.cached_len, own_cache=True))


def test_layout_and_config_describe_the_model(loaded_models):
    model, _ = loaded_models["gemma3_text"]
    spec = ModelCacheSpec.from_model(model, block_size=BS)
    meta = persistence.layout_meta(spec, BS)
    assert meta["block_size"] == str(BS) and meta["model_type"] == spec.model_type
    layers = json.loads(meta["layers"])
    assert [x["kind"] for x in layers] == [layer.kind.value for layer in spec.layers]
    assert all(isinstance(v, str) for v in meta.values())  # safetensors metadata
    config = json.loads(persistence.model_config(model))
    assert config["num_hidden_layers"] == len(spec.layers)
    assert persistence.model_config(object()) == ""


def test_a_turn_record_carries_only_blocks_the_store_lacks(loaded_models, tmp_path):
    model, _ = loaded_models["llama"]
    spec = ModelCacheSpec.from_model(model, block_size=BS)
    tokens = random_tokens(np.random.default_rng(1), 3 * BS + 7, VOCAB)
    agent, _, _ = committed_agent(model, spec, tokens)
    layout = persistence.layout_meta(spec, BS)
    store = CacheStore(tmp_path)
    first = persistence.turn_record(spec, store, agent, layout)
    assert first.tokens == tokens and first.stored_tokens == len(tokens)
    assert [b.block_hash for b in first.blocks] == [b.block_hash.hex() for b in agent.cache.blocks]
    assert all(b.tensors is not None and b.token_count == BS for b in first.blocks)
    assert first.state_meta["tail_tokens"] == "7" and "tail.k.0" in first.state
    store.save_turn(first)
    store.flush()
    again = persistence.turn_record(spec, store, agent, layout)
    assert all(b.tensors is None for b in again.blocks)  # on disk already: hashes only
    store.close()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_restore_gives_back_the_cache_bit_for_bit(loaded_models, tmp_path, arch):
    model, _ = loaded_models[arch]
    spec = ModelCacheSpec.from_model(model, block_size=BS)
    tokens = random_tokens(np.random.default_rng(2), 2 * BS + 5, VOCAB)
    agent, _, manager = committed_agent(model, spec, tokens)
    want = states(rebuilt(manager, agent))
    assert len(want) >= len(spec.layers)
    store = saved(spec, tmp_path, agent)

    fresh_pool = BlockPool(spec, total_blocks=64)
    fresh = KVCacheManager(spec, fresh_pool)
    back = AgentContext("agent", AgentCache(tokens=tuple(tokens)))
    stored = store.agent("agent", spec.fingerprint)
    cache = persistence.restore(spec, fresh_pool, store, back, stored)
    assert back.cache.cached_len == 0  # restore returns the value; the agent is unchanged
    assert cache.cached_len == cache.restored == len(tokens) and cache.tokens == tuple(tokens)
    back.cache = cache
    for got, exp in zip(states(rebuilt(fresh, back)), want, strict=True):
        assert np.array_equal(got, exp)
    # A fork needs pool blocks: the restored buffers become blocks, the same bytes.
    fresh.settle_restored(back)
    assert back.cache.restored_full is None and back.cache.restored == len(tokens)
    assert len(back.cache.blocks) == 2 and back.cache.tokens == tuple(tokens)
    for got, exp in zip(states(rebuilt(fresh, back)), want, strict=True):
        assert np.array_equal(got, exp)
    fresh_pool.check_invariants()
    store.close()


def test_blocks_still_pooled_are_copied_from_memory(loaded_models, tmp_path):
    model, _ = loaded_models["llama"]
    spec = ModelCacheSpec.from_model(model, block_size=BS)
    tokens = random_tokens(np.random.default_rng(3), 2 * BS + 5, VOCAB)
    agent, pool, _ = committed_agent(model, spec, tokens)
    store = saved(spec, tmp_path, agent)
    before = store.counters["blocks_read"]
    other = AgentContext("agent", AgentCache(tokens=tuple(tokens)))
    cache = persistence.restore(spec, pool, store, other, store.agent("agent", spec.fingerprint))
    assert cache.cached_len == len(tokens) and cache.restored == 5  # the tail alone from disk
    assert store.counters["blocks_read"] == before
    store.close()


@pytest.mark.parametrize(("arch", "kept"), [("llama", BS), ("gemma3_text", None)])
def test_a_corrupt_block_keeps_the_prefix_before_it_or_nothing(loaded_models, tmp_path, arch, kept):
    spec, tokens, store, stored = stored_turn(loaded_models[arch][0], tmp_path, 3 * BS + 2)
    path = store.block_path(stored.block_hashes[1])
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))
    back = AgentContext("agent", AgentCache(tokens=tuple(tokens)))
    cache = persistence.restore(spec, BlockPool(spec, total_blocks=64), store, back, stored)
    if kept is None:  # windows belong to the whole context: nothing is kept
        assert cache is None
    else:  # attention only: the first block is still good
        assert cache.cached_len == cache.restored == kept and cache.windows == {}
    store.close()


def test_a_stored_cache_of_other_tokens_is_not_restored(loaded_models, tmp_path):
    spec, tokens, store, stored = stored_turn(loaded_models["llama"][0], tmp_path, 2 * BS + 5)
    pool = BlockPool(spec, total_blocks=64)
    shorter = AgentContext("agent", AgentCache(tokens=tuple(tokens[: BS + 1])))
    assert persistence.restore(spec, pool, store, shorter, stored) is None
    edited = [8 + (t + 1 - 8) % (VOCAB - 8) for t in tokens]  # every block hashes otherwise
    other = AgentContext("agent", AgentCache(tokens=tuple(edited)))
    assert persistence.restore(spec, pool, store, other, stored) is None
    assert pool.num_free == pool.total_blocks
    store.close()
