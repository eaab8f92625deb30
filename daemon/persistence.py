"""The engine's side of the CacheStore: agent state to host buffers, and back into the pool.

Runs on the MLX thread. Arrays handed to the store are evaluated first and passed as
zero-copy numpy views of MLX memory, which the writer thread only reads; nothing on the
writer thread touches MLX. Restoring reads each block's file once (checksum verified) into
a pool block, so the turn after a restore, and every later one, is served from memory.
"""

from __future__ import annotations

import json
import logging

import mlx.core as mx
import numpy as np

from agentkv.storage import CacheStore, CorruptFileError, StoredAgent
from agentkv.storage.records import BlockRecord, TurnRecord
from agentkv.storage.tensor_files import HostTensor

from .agents import AgentContext
from .block_pool import BlockPool, KVBlock
from .errors import PoolExhaustedError
from .kv_blocks import BlockKV, RecurrentState, WindowKV
from .spec import LayerKind, ModelCacheSpec

log = logging.getLogger("agentkv.persistence")


def layout_meta(spec: ModelCacheSpec, block_size: int) -> dict[str, str]:
    """Metadata every file of this model carries: layer layout, dtype, block size."""
    layers = [
        {
            "index": layer.index,
            "kind": layer.kind.value,
            "heads": layer.n_kv_heads,
            "k_dim": layer.k_head_dim,
            "v_dim": layer.v_head_dim,
            "window": layer.window,
        }
        for layer in spec.layers
    ]
    dtypes = sorted({layer.dtype for layer in spec.layers})
    return {
        "layers": json.dumps(layers, separators=(",", ":")),
        "dtype": ",".join(dtypes),
        "block_size": str(block_size),
        "model_type": spec.model_type,
    }


def turn_record(
    spec: ModelCacheSpec, store: CacheStore, agent: AgentContext, layout: dict[str, str]
) -> TurnRecord:
    """Everything the store needs to make the agent's state durable (only new blocks' bytes)."""
    blocks = []
    for block in agent.blocks:
        digest = block.block_hash.hex()
        tensors = None if store.has_block(digest) else _payload_tensors(spec, block.payload)
        blocks.append(BlockRecord(digest, block.payload.num_tokens, tensors))
    state, meta = _state_tensors(spec, agent)
    record = TurnRecord(
        agent.agent_id,
        spec.fingerprint,
        list(agent.tokens),
        agent.cached_len,
        blocks,
        state,
        meta,
        layout,
    )
    _eval_host(record)
    return record


def restore(
    spec: ModelCacheSpec,
    pool: BlockPool,
    store: CacheStore,
    agent: AgentContext,
    stored: StoredAgent,
) -> int:
    """Load an agent's stored cache into pool blocks; returns tokens read from disk.

    Blocks already pooled (shared with another agent) are taken from memory. A missing or
    corrupt file ends the restore there: what came before it is kept when every layer is
    full attention, otherwise nothing is (windows and states belong to the whole context).
    """
    bs = pool.block_size
    n_blocks = len(stored.block_hashes)
    if not n_blocks * bs <= stored.stored_tokens <= len(agent.tokens):
        if stored.stored_tokens or n_blocks:
            log.warning("agent %r: stored cache does not match its tokens", agent.agent_id)
        return 0
    got: list[KVBlock] = []
    from_disk = 0
    try:
        for digest in stored.block_hashes:
            block, read = _block(spec, pool, store, bytes.fromhex(digest), stored.fingerprint)
            got.append(block)
            from_disk += read * bs
        meta, tensors = store.read_state(stored)
        tail, windows, states = _unpack_state(spec, pool, meta, tensors)
        rows = len(got) * bs + (tail.payload.num_tokens if tail is not None else 0)
        if rows != stored.stored_tokens:
            pool.free([tail] if tail is not None else [])
            raise ValueError(f"files hold {rows} tokens, index says {stored.stored_tokens}")
    except (CorruptFileError, PoolExhaustedError, KeyError, ValueError) as exc:
        log.warning("agent %r: restore stopped: %s", agent.agent_id, exc)
        return _keep_prefix(spec, pool, agent, got, from_disk)
    agent.blocks, agent.tail, agent.windows, agent.states = got, tail, windows, states
    agent.cached_len = stored.stored_tokens
    return from_disk + (tail.payload.num_tokens if tail is not None else 0)


def _keep_prefix(spec, pool, agent, got, from_disk) -> int:
    if not spec.all_full or not got:
        pool.free(got)
        return 0
    agent.blocks, agent.tail, agent.windows, agent.states = got, None, {}, {}
    agent.cached_len = len(got) * pool.block_size
    return from_disk


def _block(spec, pool: BlockPool, store: CacheStore, h: bytes, fingerprint: str):
    block = pool.lookup(h)
    if block is not None and block.payload is not None:
        pool.touch([block])
        return block, 0
    tensors = store.read_block(h.hex(), fingerprint)
    payload = _payload_from(spec, tensors)
    if payload.num_tokens != pool.block_size:
        raise ValueError(f"block {h.hex()[:12]} holds {payload.num_tokens} tokens")
    (block,) = pool.allocate(1)
    block.payload = payload
    existing = pool.register(block, h)
    if existing is not block:  # cannot happen on one thread; never keep two copies
        pool.touch([existing])
        pool.free([block])
    return existing, 1


def _payload_tensors(spec: ModelCacheSpec, payload: BlockKV) -> dict[str, HostTensor]:
    out = {}
    for j, i in enumerate(spec.full_layers):
        out[f"k.{i}"] = _host(payload.keys[j])
        out[f"v.{i}"] = _host(payload.values[j])
    return out


def _payload_from(spec: ModelCacheSpec, tensors: dict[str, HostTensor]) -> BlockKV:
    keys = tuple(_device(tensors[f"k.{i}"]) for i in spec.full_layers)
    values = tuple(_device(tensors[f"v.{i}"]) for i in spec.full_layers)
    n = keys[0].shape[2] if keys else 0
    mx.eval(keys, values)
    return BlockKV(keys, values, n)


def _state_tensors(spec, agent: AgentContext) -> tuple[dict[str, HostTensor], dict[str, str]]:
    state: dict[str, HostTensor] = {}
    meta: dict[str, str] = {}
    if agent.tail is not None:
        for name, t in _payload_tensors(spec, agent.tail.payload).items():
            state[f"tail.{name}"] = t
        meta["tail_tokens"] = str(agent.tail.payload.num_tokens)
    for i, w in agent.windows.items():
        state[f"win.k.{i}"], state[f"win.v.{i}"] = _host(w.keys), _host(w.values)
        meta[f"win.offset.{i}"] = str(w.offset)
    for i, s in agent.states.items():
        present = [j for j, a in enumerate(s.arrays) if a is not None]
        for j in present:
            state[f"rec.{i}.{j}"] = _host(s.arrays[j])
        meta[f"rec.arrays.{i}"] = f"{len(s.arrays)}:" + ",".join(map(str, present))
        meta[f"rec.offset.{i}"] = str(s.offset)
    return state, meta


def _unpack_state(spec, pool: BlockPool, meta, tensors):
    tail = None
    if "tail_tokens" in meta:
        payload = _payload_from(
            spec, {k[5:]: t for k, t in tensors.items() if k.startswith("tail.")}
        )
        (tail,) = pool.allocate(1)
        tail.payload = payload
    windows, states = {}, {}
    for layer in spec.layers:
        i = layer.index
        if layer.kind is LayerKind.SLIDING:
            k, v = _device(tensors[f"win.k.{i}"]), _device(tensors[f"win.v.{i}"])
            windows[i] = WindowKV(k, v, int(meta[f"win.offset.{i}"]))
        elif layer.kind is LayerKind.RECURRENT:
            count, present = meta[f"rec.arrays.{i}"].split(":")
            arrays: list = [None] * int(count)
            for j in (int(x) for x in present.split(",") if x):
                arrays[j] = _device(tensors[f"rec.{i}.{j}"])
            states[i] = RecurrentState(tuple(arrays), int(meta[f"rec.offset.{i}"]))
    mx.eval([w.keys for w in windows.values()], [s.arrays for s in states.values()])
    return tail, windows, states


def _host(a: mx.array) -> HostTensor:
    """A zero-copy numpy view of an MLX array's memory (bfloat16 as its raw uint16)."""
    name = str(a.dtype).split(".")[-1]
    raw = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
    return HostTensor(name, raw)  # made concrete by _eval_host


def _eval_host(record: TurnRecord) -> None:
    """Evaluate every array in the record, then swap in numpy views of their buffers."""
    groups = [b.tensors for b in record.blocks if b.tensors] + [record.state]
    mx.eval([t.data for g in groups for t in g.values()])
    for g in groups:
        for name, t in g.items():
            g[name] = HostTensor(t.dtype, np.array(t.data, copy=False))


def _device(t: HostTensor) -> mx.array:
    a = mx.array(t.data)
    return a.view(mx.bfloat16) if t.dtype == "bfloat16" else a
