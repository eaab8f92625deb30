"""Moving K/V between mlx-lm cache objects and agentkv's blocks and per-agent snapshots.

Full-attention layers live in pool blocks (`BlockKV` payloads, one per block of tokens).
Sliding-window layers keep only their last `window` rows per agent (`WindowKV`), and
recurrent layers a state snapshot (`RecurrentState`): their memory does not grow with the
context. Rebuilding an agent's cache copies each block once, into one buffer per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from ..errors import CacheReconstructionError
from .spec import LayerKind, ModelCacheSpec

_values_stream = None


def values_stream():
    """The stream rebuilds copy values on (keys go on the default stream).

    On the CPU backend each stream runs on its own thread, so both cores copy: ~1.9x the
    bandwidth of one stream on a 2-core machine (EXP-006). Thread-local, like mlx-lm's
    generation stream, and made on first use, so importing this module touches no device
    (the engine thread is the first to use it).
    """
    global _values_stream
    if _values_stream is None:
        _values_stream = mx.new_thread_local_stream(mx.default_device())
    return _values_stream


@dataclass(slots=True, eq=False)
class BlockKV:
    """K/V rows of one block for every full-attention layer, each `[1, heads, n, dim]`."""

    keys: tuple[mx.array, ...]
    values: tuple[mx.array, ...]
    num_tokens: int

    @property
    def nbytes(self) -> int:
        """Bytes held by this payload."""
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)


@dataclass(slots=True, eq=False)
class WindowKV:
    """The rows a sliding-window layer still attends to, in time order, and its offset."""

    keys: mx.array
    values: mx.array
    offset: int


@dataclass(slots=True, eq=False)
class RecurrentState:
    """A recurrent layer's state arrays (`ArraysCache.cache`) at some offset."""

    arrays: tuple[mx.array | None, ...]
    offset: int


def block_payload(spec: ModelCacheSpec, caches: Sequence, start: int, stop: int) -> BlockKV:
    """Own copies of rows `[start, stop)` of every full-attention layer of a single sequence.

    `mx.array` always copies, so a payload never pins the (much larger) batch buffer that
    the extracted cache may still be a view of.
    """
    keys, values = [], []
    for i in spec.full_layers:
        cache = caches[i]
        keys.append(mx.array(cache.keys[:, :, start:stop, :]))
        values.append(mx.array(cache.values[:, :, start:stop, :]))
    return BlockKV(tuple(keys), tuple(values), stop - start)


def snapshot_windows(spec: ModelCacheSpec, caches: Sequence) -> dict[int, WindowKV]:
    """Sliding layers' kept rows (already time-ordered and exact-length after extraction)."""
    out = {}
    for layer in spec.layers:
        if layer.kind is LayerKind.SLIDING:
            cache = caches[layer.index]
            keys, values = _temporal(cache)
            out[layer.index] = WindowKV(mx.array(keys), mx.array(values), int(cache.offset))
    return out


def snapshot_states(
    spec: ModelCacheSpec, caches: Sequence, offset: int
) -> dict[int, RecurrentState]:
    """Recurrent layers' state arrays, copied."""
    out = {}
    for layer in spec.layers:
        if layer.kind is LayerKind.RECURRENT:
            arrays = tuple(None if a is None else mx.array(a) for a in caches[layer.index].cache)
            out[layer.index] = RecurrentState(arrays, offset)
    return out


def rebuild_caches(
    spec: ModelCacheSpec,
    payloads: Sequence[BlockKV],
    n_tokens: int,
    windows: dict[int, WindowKV] | None = None,
    states: dict[int, RecurrentState] | None = None,
    full: dict[int, tuple[mx.array, mx.array]] | None = None,
) -> list:
    """Build one mlx-lm cache object per layer holding the first `n_tokens` of a context.

    Each full-attention layer's buffer is filled by one concatenate of its block rows (one
    copy of each block; keys and values on two streams, which copy in parallel), or, when
    `full` gives a (K, V) buffer pair per layer (a restore's), is that buffer. Sliding
    windows and recurrent states must sit exactly at `n_tokens`. The result is evaluated,
    so a bad block fails here and not mid-batch.

    Raises:
        CacheReconstructionError: the pieces do not add up to `n_tokens` of this model.
    """
    try:
        if full is None:
            by_layer = _rebuild_full(spec, payloads, n_tokens)
        else:
            by_layer = _full_from_buffers(spec, full, n_tokens)
        caches = []
        for layer in spec.layers:
            if layer.kind is LayerKind.FULL:
                caches.append(by_layer[layer.index])
            elif layer.kind is LayerKind.SLIDING:
                caches.append(_rotating(layer, (windows or {}).get(layer.index), n_tokens))
            else:
                caches.append(_arrays(layer, (states or {}).get(layer.index), n_tokens))
        mx.eval([c.state for c in caches])
    except CacheReconstructionError:
        raise
    except (ValueError, RuntimeError, IndexError, TypeError) as exc:
        raise CacheReconstructionError(f"cannot rebuild {n_tokens} tokens: {exc}") from exc
    return caches


def _rebuild_full(spec: ModelCacheSpec, payloads: Sequence[BlockKV], n_tokens: int) -> dict:
    have = sum(p.num_tokens for p in payloads)
    if have < n_tokens:
        raise CacheReconstructionError(f"blocks hold {have} tokens, {n_tokens} needed")
    pieces: list[tuple[BlockKV, int]] = []
    remaining = n_tokens
    for payload in payloads:
        if remaining <= 0:
            break
        take = min(payload.num_tokens, remaining)
        pieces.append((payload, take))
        remaining -= take
    out = {}
    for j, index in enumerate(spec.full_layers):
        keys = _join([p.keys[j] for p, _ in pieces], [t for _, t in pieces])
        values = _join(
            [p.values[j] for p, _ in pieces], [t for _, t in pieces], stream=values_stream()
        )
        cache = KVCache()
        if n_tokens > 0:
            _check_rows(spec, index, keys, values, n_tokens)
            cache.state = (keys, values, n_tokens)
        out[index] = cache
    return out


def _full_from_buffers(spec: ModelCacheSpec, full: dict, n_tokens: int) -> dict:
    out = {}
    for index in spec.full_layers:
        keys, values = full[index]
        if keys.shape[2] < n_tokens:
            raise CacheReconstructionError(
                f"buffers hold {keys.shape[2]} tokens, {n_tokens} needed"
            )
        if keys.shape[2] > n_tokens:
            keys, values = keys[:, :, :n_tokens], values[:, :, :n_tokens]
        _check_rows(spec, index, keys, values, n_tokens)
        cache = KVCache()
        cache.state = (keys, values, n_tokens)
        out[index] = cache
    return out


def _join(arrays: list[mx.array], takes: list[int], stream=None) -> mx.array | None:
    parts = [a if a.shape[2] == t else a[:, :, :t, :] for a, t in zip(arrays, takes, strict=True)]
    if not parts:
        return None
    if len(parts) == 1:
        return mx.array(parts[0])
    # One output buffer, each block copied into it once. MLX's CPU copy goes element by
    # element, so rows are copied as 8-byte words when their size allows (~1.2x, EXP-006).
    dtype = parts[0].dtype
    if parts[0].shape[-1] * dtype.size % 8:
        return mx.concatenate(parts, axis=2, stream=stream)
    words = [p.view(mx.uint64, stream=stream) for p in parts]
    return mx.concatenate(words, axis=2, stream=stream).view(dtype, stream=stream)


def _check_rows(spec, index, keys, values, n_tokens) -> None:
    layer = spec.layers[index]
    want_k = (1, layer.n_kv_heads, n_tokens, layer.k_head_dim)
    want_v = (1, layer.n_kv_heads, n_tokens, layer.v_head_dim)
    if tuple(keys.shape) != want_k or tuple(values.shape) != want_v:
        raise CacheReconstructionError(
            f"layer {index}: rebuilt K{tuple(keys.shape)}/V{tuple(values.shape)}, "
            f"expected K{want_k}/V{want_v}"
        )


def _rotating(layer, window: WindowKV | None, n_tokens: int) -> RotatingKVCache:
    cache = RotatingKVCache(max_size=layer.window, keep=layer.keep)
    if n_tokens == 0:
        return cache
    if window is None or window.offset != n_tokens:
        have = None if window is None else window.offset
        raise CacheReconstructionError(
            f"layer {layer.index}: sliding window at {have}, {n_tokens} needed"
        )
    rows = window.keys.shape[2]
    if rows != min(n_tokens, layer.window):
        raise CacheReconstructionError(f"layer {layer.index}: window holds {rows} rows")
    cache.state = (window.keys, window.values, n_tokens, layer.keep, layer.window, rows)
    return cache


def _arrays(layer, state: RecurrentState | None, n_tokens: int) -> ArraysCache:
    n_arrays = len(layer.state_shapes)
    cache = ArraysCache(n_arrays)
    if n_tokens == 0:
        return cache
    if state is None or state.offset != n_tokens:
        have = None if state is None else state.offset
        raise CacheReconstructionError(f"layer {layer.index}: state at {have}, {n_tokens} needed")
    cache.cache = list(state.arrays)
    return cache


def _temporal(cache: RotatingKVCache) -> tuple[mx.array, mx.array]:
    """Rows of an extracted rotating cache, which mlx-lm hands back in time order."""
    keys, values, offset, _keep, max_size, idx = cache.state
    n = min(int(offset), max_size)
    if keys.shape[2] != n or idx != n:
        raise ValueError(
            f"rotating cache not in extracted layout (rows {keys.shape[2]}, idx {idx})"
        )
    return keys, values
