"""One rank's share of a tensor-parallel daemon: its group, its shard of the model, its
pool and its own store.

Each rank holds 1/N of every layer's attention and KV heads (mlx-lm's `model.shard`), so
its cache spec, pool and store hold only its heads. Its fingerprint is the model's,
keyed by rank and world size: blocks of one rank are never read by another, nor at
another world size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import mlx.core as mx

from ...errors import WorldSizeError

log = logging.getLogger("agentkv.distributed")


def init_group(world_size: int, rank: int, hostfile: Path):
    """Join the ring of `world_size` ranks described by `hostfile` (MLX's ring format).

    `strict=True`: without it a missing launcher silently gives a group of one.

    Raises:
        WorldSizeError: the group that formed is not of `world_size` ranks.
    """
    os.environ["MLX_RANK"] = str(rank)
    os.environ["MLX_HOSTFILE"] = str(hostfile)
    group = mx.distributed.init(strict=True, backend="ring")
    if group.size() != world_size or group.rank() != rank:
        raise WorldSizeError(
            f"joined a group of {group.size()} as rank {group.rank()}, "
            f"expected rank {rank} of {world_size}"
        )
    return group


def check_heads(config: dict, world_size: int) -> None:
    """Refuse a split the model cannot take: attention heads, KV heads and the MLP's
    hidden size must divide by the world size (else mlx-lm fails at the first forward).

    Raises:
        WorldSizeError: naming the count that does not divide.
    """
    heads = config.get("num_attention_heads")
    checks = {
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads", heads),
        "intermediate_size": config.get("intermediate_size"),
    }
    for name, value in checks.items():
        if isinstance(value, int) and value % world_size:
            raise WorldSizeError(
                f"the model's {name} ({value}) does not divide by the world size "
                f"{world_size}: each rank must hold whole heads"
            )


def load_sharded(model_dir: Path, group):
    """Load a local model lazily, keep this rank's shard, and materialize only that.

    Raises:
        WorldSizeError: the model has no tensor-parallel `shard` (or its heads do not divide).
    """
    from mlx_lm.utils import load

    check_heads(json.loads((model_dir / "config.json").read_text()), group.size())
    model, tokenizer = load(str(model_dir), lazy=True)
    if not hasattr(model, "shard"):
        raise WorldSizeError(f"{type(model).__module__} has no tensor-parallel shard()")
    model.shard(group)
    mx.eval(model.parameters())
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # every rank has loaded
    return model, tokenizer


def rank_fingerprint(fingerprint: str, rank: int, world_size: int) -> str:
    """The model's fingerprint for one rank's shard (same length as the model's)."""
    key = f"{fingerprint}|tensor-parallel|rank {rank} of {world_size}".encode()
    return hashlib.sha256(key).hexdigest()[: len(fingerprint) or 32]


def rank_store_dir(store: Path, rank: int, world_size: int) -> Path:
    """Rank 0 keeps the usual `STORE/cache` (the index `daemonctl` reads: one truth for
    agents and tokens); rank r > 0 keeps its shard's blocks in `STORE/rank-R-of-N`."""
    return store / "cache" if rank == 0 else store / f"rank-{rank}-of-{world_size}"


def build_engine(opts, model_dir: Path, group):
    """This rank's engine: its shard of the model, a pool of its heads' blocks (the same
    number of blocks on every rank) and its own store."""
    from agentkv.storage import CacheStore

    from ..assemble import assemble_engine
    from ..fingerprint import model_fingerprint
    from ..spec import ModelCacheSpec

    rank, n = group.rank(), group.size()
    model, tokenizer = load_sharded(model_dir, group)
    fingerprint = rank_fingerprint(model_fingerprint(model_dir), rank, n)
    spec = ModelCacheSpec.from_model(model, block_size=opts.block_size, fingerprint=fingerprint)
    store = CacheStore(rank_store_dir(opts.store, rank, n), disk_budget=opts.disk_budget)
    engine = assemble_engine(
        model, tokenizer, spec, opts, store, f"{opts.model or 'default'} (rank {rank} of {n})"
    )
    pool = engine.pool
    log.info("rank %d of %d: %s, pool %d blocks", rank, n, spec.model_type, pool.total_blocks)
    return engine
