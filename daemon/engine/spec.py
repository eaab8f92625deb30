"""ModelCacheSpec: what a model's per-layer cache looks like, and what a block of it costs.

The spec is read off the model the way mlx-lm builds its cache: `make_prompt_cache(model)`
gives each layer's cache class, and a one-token probe forward fills every cache once, so head
counts, head dims, dtypes and recurrent-state shapes come from the arrays the model really
writes rather than from per-architecture guesses about config field names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache

from ..errors import UnsupportedModelError
from .batch_probe import check_batching
from .fingerprint import weights_fingerprint

DEFAULT_BLOCK_SIZE = 256


class LayerKind(str, enum.Enum):
    """How a layer's cache grows with the context."""

    FULL = "full"  # KVCache: one K/V row per token, kept in pool blocks
    SLIDING = "sliding"  # RotatingKVCache: only the last `window` tokens matter
    RECURRENT = "recurrent"  # ArraysCache: fixed-size state, snapshot per agent


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One layer's cache layout.

    Attributes:
        index: layer position in the model.
        kind: full attention, sliding window or recurrent state.
        n_kv_heads: key/value heads (0 for recurrent layers).
        k_head_dim: key head dim (0 for recurrent layers).
        v_head_dim: value head dim (0 for recurrent layers).
        dtype: cache dtype name, e.g. "float32" or "bfloat16".
        window: sliding window size (sliding layers only).
        keep: tokens a rotating cache never evicts (sliding layers only).
        state_shapes: per-sequence shapes of a recurrent layer's state arrays.
        state_dtypes: their dtype names.
    """

    index: int
    kind: LayerKind
    n_kv_heads: int = 0
    k_head_dim: int = 0
    v_head_dim: int = 0
    dtype: str = "float32"
    window: int | None = None
    keep: int = 0
    state_shapes: tuple[tuple[int, ...], ...] = ()
    state_dtypes: tuple[str, ...] = ()

    @property
    def bytes_per_token(self) -> int:
        """K plus V bytes one token adds to this layer (0 for recurrent layers)."""
        item = itemsize(self.dtype)
        return self.n_kv_heads * (self.k_head_dim + self.v_head_dim) * item

    @property
    def fixed_bytes(self) -> int:
        """Bytes per agent that do not grow with the context (the window, or the state)."""
        if self.kind is LayerKind.SLIDING:
            return self.bytes_per_token * (self.window or 0)
        sizes = (
            _numel(s) * itemsize(d)
            for s, d in zip(self.state_shapes, self.state_dtypes, strict=True)
        )
        return sum(sizes)


@dataclass(frozen=True, slots=True)
class ModelCacheSpec:
    """A model's cache layout, block size and fingerprint.

    Attributes:
        model_type: mlx-lm model type, e.g. "llama".
        layers: one LayerSpec per layer, in order.
        fingerprint: identifies the model; block hashes and stored caches are keyed by it.
        block_size: tokens per block.
        vocab_size: the model's vocabulary size (token ids must be below it).
    """

    model_type: str
    layers: tuple[LayerSpec, ...]
    fingerprint: str
    block_size: int = DEFAULT_BLOCK_SIZE
    vocab_size: int = 0
    full_layers: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        full = tuple(i for i, layer in enumerate(self.layers) if layer.kind is LayerKind.FULL)
        object.__setattr__(self, "full_layers", full)

    @classmethod
    def from_model(
        cls,
        model,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        fingerprint: str | None = None,
    ) -> ModelCacheSpec:
        """Read the cache layout off an mlx-lm model.

        Args:
            model: an mlx-lm model (as returned by `mlx_lm.load`).
            block_size: tokens per block.
            fingerprint: the model's identity; by default a hash of its config and weights'
                names, shapes, dtypes and leading values (see `weights_fingerprint`).

        Raises:
            UnsupportedModelError: a layer uses a cache class agentkv cannot keep, or the
                model computes differently in a batch than alone (see `batch_probe`).
        """
        caches = make_prompt_cache(model)
        # One-token probe: every cache then holds arrays whose shapes and dtypes are real.
        model(mx.array([[0]]), cache=caches)
        mx.eval([c.state for c in caches])
        layers = tuple(_layer_spec(i, c) for i, c in enumerate(caches))
        check_batching(model, layers[0].dtype if layers else "float32")
        args = getattr(model, "args", None)
        return cls(
            model_type=str(getattr(args, "model_type", type(model).__module__.split(".")[-1])),
            layers=layers,
            fingerprint=fingerprint or weights_fingerprint(model),
            block_size=block_size,
            vocab_size=_vocab_size(model),
        )

    @property
    def all_full(self) -> bool:
        """True when every layer is full attention (prefixes can then be shared by blocks)."""
        return len(self.full_layers) == len(self.layers)

    @property
    def bytes_per_token(self) -> int:
        """K/V bytes one token adds across the full-attention layers (what blocks hold)."""
        return sum(self.layers[i].bytes_per_token for i in self.full_layers)

    def bytes_per_block(self, block_size: int | None = None) -> int:
        """Bytes one pool block's payload takes."""
        return self.bytes_per_token * (block_size or self.block_size)

    @property
    def fixed_bytes_per_agent(self) -> int:
        """Bytes per agent outside the pool: sliding windows and recurrent states."""
        return sum(layer.fixed_bytes for layer in self.layers if layer.kind is not LayerKind.FULL)

    def describe(self) -> dict:
        """A JSON-ready summary (for status output and benchmark reports)."""
        kinds: dict[str, int] = {}
        for layer in self.layers:
            kinds[layer.kind.value] = kinds.get(layer.kind.value, 0) + 1
        return {
            "model_type": self.model_type,
            "fingerprint": self.fingerprint,
            "block_size": self.block_size,
            "layers": kinds,
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_block": self.bytes_per_block(),
            "fixed_bytes_per_agent": self.fixed_bytes_per_agent,
        }


def _layer_spec(index: int, cache) -> LayerSpec:
    if type(cache) is RotatingKVCache:
        return _attention_spec(index, cache, LayerKind.SLIDING, cache.max_size, cache.keep)
    if type(cache) is KVCache:
        return _attention_spec(index, cache, LayerKind.FULL, None, 0)
    if type(cache) is ArraysCache:
        arrays = [a for a in cache.cache if a is not None]
        return LayerSpec(
            index=index,
            kind=LayerKind.RECURRENT,
            state_shapes=tuple(tuple(a.shape) for a in arrays),
            state_dtypes=tuple(_dtype_name(a.dtype) for a in arrays),
            dtype=_dtype_name(arrays[0].dtype) if arrays else "float32",
        )
    raise UnsupportedModelError(
        f"layer {index} uses {type(cache).__name__}; agentkv supports KVCache, "
        "RotatingKVCache and ArraysCache layers"
    )


def _attention_spec(index: int, cache, kind: LayerKind, window: int | None, keep: int) -> LayerSpec:
    keys, values = cache.keys, cache.values  # [batch, kv heads, tokens, head dim]
    return LayerSpec(
        index=index,
        kind=kind,
        n_kv_heads=keys.shape[1],
        k_head_dim=keys.shape[3],
        v_head_dim=values.shape[3],
        dtype=_dtype_name(keys.dtype),
        window=window,
        keep=keep,
    )


def _vocab_size(model) -> int:
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    if size is None and isinstance(getattr(args, "text_config", None), dict):
        size = args.text_config.get("vocab_size")
    return int(size or 0)


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


def itemsize(name: str) -> int:
    """Bytes per element of an MLX dtype, by name (e.g. "bfloat16" -> 2)."""
    return getattr(mx, name).size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
