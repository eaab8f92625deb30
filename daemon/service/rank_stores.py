"""Offline edits of a distributed daemon's store act on every rank's store alike.

A store written by N ranks holds rank 0's store in STORE/cache (its index is the one
truth for agents and tokens) and rank r's shard in STORE/rank-R-of-N. `daemonctl delete`
(with no daemon running) removes an agent from every one, `gc` collects garbage in every
one, each rank keeping its own shard of the model kept (its fingerprint is keyed by rank:
`STORE/world.json` maps rank 0's to every rank's), and `rebuild-index` rebuilds every
one's index that is lost or damaged (the next start reconciles them with rank 0's). For
delete and gc every rank store is opened (its lock taken) before anything is changed: a
rank still running refuses the whole command. No MLX import.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from .ranks import WORLD_FILE, rank_stores

log = logging.getLogger("agentkv.distributed")


def record_fingerprints(store: Path, fingerprints: list[str]) -> None:
    """Note in STORE/world.json each rank's fingerprint of the model now served, under
    rank 0's (what `gc --keep-model` and the daemon's `hello` name). Best effort: a store
    on a read-only file system keeps none (gc then keeps every model in rank stores)."""
    marker = Path(store) / WORLD_FILE
    try:
        world = json.loads(marker.read_text())
        world.setdefault("fingerprints", {})[fingerprints[0]] = fingerprints
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(world))
        os.replace(tmp, marker)
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("cannot note the ranks' fingerprints in %s: %s", marker, exc)


def rank_roots(store: Path) -> list[Path]:
    """Every rank's store directory, rank 0's first."""
    return [Path(store) / "cache", *rank_stores(store)]


def rank_fingerprints(store: Path, fingerprint: str | None) -> list[str | None]:
    """Per rank store (as `rank_roots`), the fingerprint of the model whose agents to
    keep: rank 0's is `fingerprint`; another rank's is looked up in world.json (None,
    keeping every model there, if it is not known)."""
    n = len(rank_roots(store))
    if fingerprint is None:
        return [None] * n
    try:
        known = json.loads((Path(store) / WORLD_FILE).read_text()).get("fingerprints", {})
    except (OSError, ValueError, AttributeError):
        known = {}
    mapped = known.get(fingerprint)
    if not isinstance(mapped, list) or len(mapped) != n:
        return [fingerprint] + [None] * (n - 1)
    return list(mapped)


@contextlib.contextmanager
def open_every_rank(store: Path):
    """Every rank's CacheStore, rank 0's first; all their locks are taken before the
    caller changes anything (StoreLockedError if any is in use)."""
    from agentkv.storage import CacheStore

    with contextlib.ExitStack() as stack:
        caches = []
        for root in rank_roots(store):
            caches.append(stack.enter_context(contextlib.closing(CacheStore(root))))
        yield caches


def delete_every_rank(store: Path, agent: str) -> bool:
    """Remove `agent` (every model's) from every rank's store; False if none holds it.
    Its blocks stay, unreferenced, until `gc` (as in one store).

    Raises:
        StorageError: a store cannot be opened or the delete written.
    """
    with open_every_rank(store) as caches:
        found = [(cache, cache.fingerprints_of(agent)) for cache in caches]
        if not any(fps for _, fps in found):
            return False
        for cache, fps in found:  # rank 0 first: once its index forgets it, it is gone
            for fp in fps:
                cache.delete_agent(agent, fp)
            cache.flush()
    return True


def rebuild_every_rank(store: Path, *, dry_run: bool, force: bool, progress: bool):
    """`rebuild_index` of every rank store whose index is lost or damaged (of every one
    with `force`). Returns [(store dir, RebuildReport)].

    Raises:
        StorageError: a store is in use; or no index needs it (and not `force`): rank 0's
            refusal of a sound index says so.
    """
    from agentkv.storage import rebuild_index
    from agentkv.storage.maintenance import index_problem

    roots = rank_roots(store)
    todo = roots if force else [r for r in roots if index_problem(r)[0] is not None]
    return [
        (root, rebuild_index(root, dry_run=dry_run, force=force, progress=progress))
        for root in todo or roots[:1]
    ]


def gc_every_rank(store: Path, fingerprint: str | None, *, dry_run: bool, progress: bool):
    """`gc` of every rank's store (see `collect_garbage`), each keeping its shard of the
    model `fingerprint` names. Returns [(store dir, GcReport)], rank 0's first.

    Raises:
        StorageError: a store is in use (a real run), its index gone or damaged.
    """
    from agentkv.storage.maintenance import collect_garbage

    keep = rank_fingerprints(store, fingerprint)
    roots = rank_roots(store)
    if dry_run:
        return [
            (root, collect_garbage(root, fp, dry_run=True, progress=progress))
            for root, fp in zip(roots, keep, strict=True)
        ]
    with open_every_rank(store) as caches:
        return [
            (root, cache.gc(fp, dry_run=False, progress=progress))
            for root, cache, fp in zip(roots, caches, keep, strict=True)
        ]
