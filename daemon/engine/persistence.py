"""The engine's side of the CacheStore: agent state to host buffers, and back into the pool.

Runs on the MLX thread. Arrays handed to the store are evaluated first and passed as
zero-copy numpy views of MLX memory, which the writer thread only reads; nothing on the
writer thread touches MLX. Restoring reads each block's file once (checksum verified)
straight into the agent's cache buffers; the next commit turns them into pool blocks, so
every later turn is served from memory.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from agentkv.storage import CacheStore, CorruptFileError, StoredAgent
from agentkv.storage.paths import is_block_hash
from agentkv.storage.records import BlockRecord, TurnRecord
from agentkv.storage.tensor_files import DTYPES, TAGS, FileDest, HostTensor, tensor_entries

from .agents import AgentCache, AgentContext, frozen_map
from .block_hash import chain_hashes
from .block_pool import BlockPool
from .host_fill import host_view, new_unzeroed
from .kv_blocks import BlockKV, RecurrentState, WindowKV
from .spec import LayerKind, ModelCacheSpec, itemsize

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


def model_config(model) -> str:
    """The model's config (its mlx-lm `args`) as JSON, or "" when it has none."""
    args = getattr(model, "args", None)
    if not dataclasses.is_dataclass(args):
        return ""
    return json.dumps(dataclasses.asdict(args), sort_keys=True, default=str)


def turn_record(
    spec: ModelCacheSpec, store: CacheStore, agent: AgentContext, layout: dict[str, str]
) -> TurnRecord:
    """Everything the store needs to make the agent's state durable (only new blocks' bytes).

    A block on disk now may be gone by the time the writer gets to the turn (the disk
    budget removes unreferenced blocks); the writer then stores the turn's blocks before it
    and no state, and the agent's next turn sends that block's bytes again.
    """
    cache = agent.cache
    blocks = []
    for block in cache.blocks:
        digest = block.block_hash.hex()
        tensors = None if store.has_block(digest) else _payload_tensors(spec, block.payload)
        blocks.append(BlockRecord(digest, block.payload.num_tokens, tensors))
    state, meta = _state_tensors(spec, cache)
    record = TurnRecord(
        agent.agent_id,
        spec.fingerprint,
        list(cache.tokens),
        cache.cached_len,
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
) -> AgentCache | None:
    """Load an agent's stored cache straight into its next turn's cache buffers.

    Each full-attention layer gets a K and a V buffer for the stored rows, all views of one
    new MLX allocation that is not zeroed first (host_fill), and every block file is read,
    checksum verified, into its rows: one copy from the file, no staging, files read in
    parallel. Rows a failed read leaves undefined are cut off, never used. Blocks still
    pooled (shared with an agent in memory) are copied from memory instead. The buffers
    are the agent's cache until its next commit turns the finished cache into pool
    blocks.

    Returns:
        The agent's restored cache (its `restored`: the tokens read from disk), to replace
        `agent.cache`; None when nothing could be restored. The agent is not changed.

    A missing or corrupt file ends the restore there: the rows before it are kept when every
    layer is full attention, otherwise nothing is (windows and states belong to the whole
    context). So does a listed block that is not the one the agent's tokens hash to (an
    index row naming another block, or blocks cut at another block size): files are
    checked to be what they claim, the list to be this context's.
    """
    bs, tokens = pool.block_size, agent.cache.tokens
    n_blocks, n = len(stored.block_hashes), stored.stored_tokens
    if not n_blocks * bs <= n <= len(tokens) or not all(
        is_block_hash(h) for h in stored.block_hashes
    ):
        if n or n_blocks:
            log.warning("agent %r: stored cache does not match its tokens", agent.agent_id)
        return None
    stored = _chained_prefix(spec, bs, store, agent, stored)
    n_blocks, n = len(stored.block_hashes), stored.stored_tokens
    if n == 0 or (stored.state_file is None and not spec.all_full):
        return None  # windows and recurrent states need the state file (a corrupt one was cut)
    layout, nbytes = _buffer_layout(spec, n)
    # Rows are written here before MLX reads them; no full-attention layer, no buffer.
    blob = new_unzeroed(nbytes) if nbytes else None
    host = host_view(blob) if blob is not None else None
    views = _layer_views(layout, host) if host is not None else {}
    dest_of = _block_dests(layout, host, bs)
    good, from_disk = _fill_blocks(spec, pool, store, stored, views, dest_of)
    if good < n_blocks:
        return _keep_prefix(spec, tokens, _layer_arrays(layout, blob), good * bs, from_disk)
    try:
        meta, tensors = store.read_state(stored)  # a bad file: counted and moved aside
        if meta.get("holds") == "tokens" and not spec.all_full:
            # The context's tokens alone (its blocks were cut short): no windows or states.
            return None
        tail = _fill_tail(spec, meta, tensors, views, n_blocks * bs, n)
        windows, states = _unpack_state(spec, meta, tensors)
    except (CorruptFileError, KeyError, IndexError, ValueError, TypeError, OverflowError) as exc:
        if not isinstance(exc, CorruptFileError):  # checksum-valid, yet no state of this model
            store.report_corrupt_state(stored, f"not a state of this model: {exc!r}")
        log.warning("agent %r: restore stopped: %s", agent.agent_id, exc)
        return _keep_prefix(spec, tokens, _layer_arrays(layout, blob), n_blocks * bs, from_disk)
    return AgentCache(
        tokens=tokens,
        windows=frozen_map(windows),
        states=frozen_map(states),
        cached_len=n,
        restored_full=frozen_map(_layer_arrays(layout, blob)),
        restored=from_disk + tail,
    )


def _chained_prefix(
    spec: ModelCacheSpec, bs: int, store: CacheStore, agent: AgentContext, stored: StoredAgent
) -> StoredAgent:
    """`stored`, cut before the first listed block that is not the chain of the agent's
    tokens at this block size (counted as a corrupt row), with no state file then."""
    listed = stored.block_hashes
    expected = chain_hashes(agent.cache.tokens[: len(listed) * bs], bs, spec.fingerprint)
    good = next(
        (b for b, (h, want) in enumerate(zip(listed, expected, strict=True)) if h != want.hex()),
        len(listed),
    )
    if good == len(listed):
        return stored
    what = f"block {good} is not its tokens' (block size {bs})"
    store.report_corrupt_row(agent.agent_id, stored.fingerprint, what)
    cut = listed[:good]
    return dataclasses.replace(stored, block_hashes=cut, stored_tokens=good * bs, state_file=None)


def _fill_blocks(spec, pool: BlockPool, store: CacheStore, stored: StoredAgent, views, dest_of):
    """Fill the buffers' block rows; returns (leading blocks filled, tokens read from disk).
    `dest_of(b)`: where block b's file goes (see _block_dests)."""
    bs = pool.block_size
    sources: list[int | None] = []  # per block: its job's index, None if copied from memory
    job_index = itertools.count()

    def jobs():  # a generator: the store starts reading while later jobs are still made
        for b, digest in enumerate(stored.block_hashes):
            block = pool.lookup(bytes.fromhex(digest))
            if block is not None and block.payload is not None:
                _copy_payload(spec, block.payload, views, slice(b * bs, (b + 1) * bs))
                sources.append(None)
            else:
                sources.append(next(job_index))
                yield digest, dest_of(b)

    ok = store.read_blocks_into(stored.fingerprint, jobs())
    good = next((b for b, j in enumerate(sources) if j is not None and not ok[j]), len(sources))
    from_disk = sum(1 for j in sources[:good] if j is not None) * bs
    return good, from_disk


def _keep_prefix(spec, tokens, buffers: dict, rows: int, from_disk: int) -> AgentCache | None:
    """The cache of the first `rows` restored rows (attention-only models), or None."""
    if not spec.all_full or rows == 0:
        return None
    full = {i: (k[:, :, :rows], v[:, :, :rows]) for i, (k, v) in buffers.items()}
    return AgentCache(
        tokens=tokens, cached_len=rows, restored_full=frozen_map(full), restored=from_disk
    )


def _buffer_layout(spec: ModelCacheSpec, n: int) -> tuple[list[tuple], int]:
    """Where each full-attention layer's K and V buffer of n rows lies in one allocation:
    (layer, dtype, K span, V span) per layer, a span being byte (start, stop, shape),
    64-aligned; and the allocation's size."""
    out, end = [], 0
    for i in spec.full_layers:
        layer = spec.layers[i]
        size = itemsize(layer.dtype)
        spans = []
        for dim in (layer.k_head_dim, layer.v_head_dim):
            shape = (1, layer.n_kv_heads, n, dim)
            start = end + -end % 64
            end = start + size * int(np.prod(shape))
            spans.append((start, end, shape))
        out.append((i, layer.dtype, spans[0], spans[1]))
    return out, end


def _layer_views(layout, blob: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Writable numpy views of each layer's K and V rows inside the allocation."""
    out = {}
    for i, dtype, *spans in layout:
        np_dtype = DTYPES[TAGS[dtype]]
        k, v = (blob[a:b].view(np_dtype).reshape(shape) for a, b, shape in spans)
        out[i] = (k, v)
    return out


def _layer_arrays(layout, blob: mx.array | None) -> dict[int, tuple[mx.array, mx.array]]:
    """Each layer's K and V as MLX views of the filled allocation (no copy)."""
    out: dict = {}
    for i, dtype, *spans in layout:
        k, v = (blob[a:b].view(getattr(mx, dtype)).reshape(shape) for a, b, shape in spans)
        out[i] = (k, v)
    mx.eval(list(out.values()))
    return out


def _block_dests(layout, blob: np.ndarray | None, bs: int) -> Callable[[int], FileDest]:
    """Where block b's file goes: its rows of each layer's K and V buffers, as byte runs
    of the allocation (one per KV head, in file order). The header entries every block
    file must hold are the same for all blocks: worked out once."""
    whole = memoryview(blob) if blob is not None else None
    tensors = []  # (name, dtype, shape, bytes) of each tensor a block file holds
    heads: list[tuple[int, int]] = []  # (byte start of a head's rows, bytes per block)
    for i, dtype, *spans in layout:
        size = itemsize(dtype)
        for name, (start, _, (_, n_heads, n, dim)) in zip(("k", "v"), spans, strict=True):
            run = bs * dim * size
            tensors.append((f"{name}.{i}", dtype, (1, n_heads, bs, dim), n_heads * run))
            heads += [(start + h * n * dim * size, run) for h in range(n_heads)]
    entries = tensor_entries(tensors)

    def dest_of(b: int) -> FileDest:
        return FileDest(entries, [whole[s + b * r : s + (b + 1) * r] for s, r in heads])

    return dest_of


def _copy_payload(spec, payload: BlockKV, views, rows: slice) -> None:
    for j, i in enumerate(spec.full_layers):
        k, v = views[i]
        np.copyto(k[:, :, rows, :], _numpy(payload.keys[j]), casting="no")
        np.copyto(v[:, :, rows, :], _numpy(payload.values[j]), casting="no")


def _fill_tail(spec, meta, tensors, views, start: int, n: int) -> int:
    """Copy the state file's tail rows into the buffers; returns their count."""
    tail = int(meta.get("tail_tokens", 0))
    if start + tail != n:
        raise ValueError(f"files hold {start + tail} tokens, index says {n}")
    for i in spec.full_layers if tail else ():
        k, v = views[i]
        np.copyto(k[:, :, start:n, :], tensors[f"tail.k.{i}"].data, casting="no")
        np.copyto(v[:, :, start:n, :], tensors[f"tail.v.{i}"].data, casting="no")
    return tail


def _payload_tensors(spec: ModelCacheSpec, payload: BlockKV) -> dict[str, HostTensor]:
    out = {}
    for j, i in enumerate(spec.full_layers):
        out[f"k.{i}"] = _host(payload.keys[j])
        out[f"v.{i}"] = _host(payload.values[j])
    return out


def _state_tensors(spec, cache: AgentCache) -> tuple[dict[str, HostTensor], dict[str, str]]:
    state: dict[str, HostTensor] = {}
    meta: dict[str, str] = {}
    if cache.tail is not None:
        for name, t in _payload_tensors(spec, cache.tail.payload).items():
            state[f"tail.{name}"] = t
        meta["tail_tokens"] = str(cache.tail.payload.num_tokens)
    for i, w in cache.windows.items():
        state[f"win.k.{i}"], state[f"win.v.{i}"] = _host(w.keys), _host(w.values)
        meta[f"win.offset.{i}"] = str(w.offset)
    for i, s in cache.states.items():
        present = [j for j, a in enumerate(s.arrays) if a is not None]
        for j in present:
            state[f"rec.{i}.{j}"] = _host(s.arrays[j])
        meta[f"rec.arrays.{i}"] = f"{len(s.arrays)}:" + ",".join(map(str, present))
        meta[f"rec.offset.{i}"] = str(s.offset)
    return state, meta


def _unpack_state(spec, meta, tensors) -> tuple[dict, dict]:
    """Sliding windows and recurrent states from an agent's state file."""
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
    return windows, states


def _host(a: mx.array) -> HostTensor:
    """A zero-copy numpy view of an MLX array's memory (bfloat16 as its raw uint16)."""
    name = str(a.dtype).split(".")[-1]
    raw = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
    return HostTensor(name, raw)  # made concrete by _eval_host


def _numpy(a: mx.array) -> np.ndarray:
    """A zero-copy numpy view of an evaluated MLX array (bfloat16 as its raw uint16)."""
    raw = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
    mx.eval(raw)
    return np.array(raw, copy=False)


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
