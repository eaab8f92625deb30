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
import tempfile
from pathlib import Path

import mlx.core as mx

from ...errors import DistributedError, WorldSizeError

log = logging.getLogger("agentkv.distributed")

BACKENDS = ("ring", "jaccl", "mpi")  # `--backend` names these, or "any"
JACCL_PORT = 32323  # mlx.launch's default --starting-port: the JACCL coordinator's port


def available_backends() -> list[str]:
    """The mx.distributed backends this mlx build has (the Linux CPU wheel: ring only)."""
    return [b for b in BACKENDS if mx.distributed.is_available(b)]


def launch_env(backend: str, rank: int, hostfile: Path) -> dict[str, str]:
    """What `mlx.launch` would set for this rank. A ring hostfile (a list per rank of
    "ip:port") is MLX_HOSTFILE itself; from mlx.launch's hostfile ({"hosts": [{"ssh",
    "ips", "rdma"}, ...]}) JACCL gets MLX_IBV_DEVICES (a file of every host's "rdma"
    list) and MLX_JACCL_COORDINATOR (host 0's first ip). MPI reads its own launcher's."""
    env = {"MLX_RANK": str(rank)}
    hosts = json.loads(hostfile.read_text())
    if isinstance(hosts, list):
        env["MLX_HOSTFILE"] = str(hostfile)
    elif backend in ("jaccl", "any"):
        with tempfile.NamedTemporaryFile(
            "w", prefix="agentkv-ibv-", suffix=".json", delete=False
        ) as f:
            json.dump([h.get("rdma") for h in hosts["hosts"]], f)
        env["MLX_IBV_DEVICES"] = f.name
        coordinator = f"{hosts['hosts'][0]['ips'][0]}:{JACCL_PORT}"
        env["MLX_JACCL_COORDINATOR"] = os.environ.get("MLX_JACCL_COORDINATOR", coordinator)
    return env


def init_group(world_size: int, rank: int, hostfile: Path, backend: str = "ring"):
    """Join the group of `world_size` ranks described by `hostfile` over `backend` (see
    `launch_env`).

    `strict=True`: without it a missing launcher silently gives a group of one.

    Raises:
        DistributedError: the backend could not form a group (not in this mlx build, or
            not set up: RDMA, MPI).
        WorldSizeError: the group that formed is not of `world_size` ranks.
    """
    os.environ.update(launch_env(backend, rank, hostfile))
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as exc:
        raise DistributedError(f"rank {rank}: cannot join the {backend} group: {exc}") from exc
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
