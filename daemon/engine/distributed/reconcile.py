"""At start, every rank's store agrees with rank 0's index, or the agent is recomputed.

Rank 0's index is the one truth for agents and their tokens. A rank killed mid-write (or
a rank 0 that wrote a turn its followers had not written yet) leaves stores that disagree
about an agent: then every rank keeps rank 0's tokens and forgets that agent's cache, so
all of them recompute it at its next turn, identically. Agents a follower holds that rank
0 does not are deleted there. An agent restored from disk is thus restored by every rank
at the same token count, or by none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging

from agentkv.storage import StoreWriteError
from agentkv.storage.records import TurnRecord

from .. import persistence

log = logging.getLogger("agentkv.distributed")


def settle(store) -> None:
    """Wait until the store applied every queued write; a failed write is logged and its
    agent kept as `unsaved` by the store, so it is no reason to stop here."""
    with contextlib.suppress(StoreWriteError):
        store.flush()


def _digest(store, stored) -> list:
    """What every rank must agree on for an agent to be restored: its tokens, how many of
    them its blocks and state cover, and how many of its block files are there."""
    tokens = hashlib.sha256(repr(stored.tokens).encode()).hexdigest()
    present = 0
    for block_hash in stored.block_hashes:  # a rank restores up to its first missing block
        if not (store.has_block(block_hash) and store.block_path(block_hash).exists()):
            break
        present += 1
    blocks = len(stored.block_hashes)
    return [tokens, stored.stored_tokens, blocks, present, bool(stored.state_file)]


def _rows(engine) -> dict[str, list]:
    store, fp = engine.store, engine.spec.fingerprint
    rows = {}
    for agent_id in store.agent_ids(fp):
        stored = store.agent(agent_id, fp)
        if stored is not None:
            rows[agent_id] = _digest(store, stored)
    return rows


def agree_restore(engine, channel, agent_id: str) -> bool:
    """Before a turn of an agent only the store holds (collective: every rank calls it):
    True if every rank's store holds it alike, so every rank restores the same tokens;
    else every rank forgets its cache there (keeping its tokens) and all recompute it."""
    store, fp = engine.store, engine.spec.fingerprint
    settle(store)  # what the writer still had queued is on disk (or failed) by now
    stored = store.agent(agent_id, fp)
    digest = _digest(store, stored) if stored is not None else None
    if channel.agree(json.dumps(digest).encode()):
        return True
    log.warning("rank %d: stores disagree on agent %r; recomputing it", channel.rank, agent_id)
    if stored is not None:
        store.drop_cache(agent_id, fp)
        settle(store)
    return False


def reconcile(engine, channel) -> list[str]:
    """Make every rank's store agree with rank 0's (collective: every rank calls it at
    start, before any turn). Returns the agents whose caches were dropped."""
    store, fp = engine.store, engine.spec.fingerprint
    mine = _rows(engine)
    if channel.rank == 0:
        channel.send({"op": "agents", "rows": mine})
        truth = mine
    else:
        truth = channel.receive()["rows"]
    ids = sorted(truth)
    differs = channel.any([int(mine.get(a) != truth[a]) for a in ids])
    bad = [a for a, d in zip(ids, differs, strict=True) if d]
    tokens = {a: store.agent(a, fp).tokens for a in bad} if channel.rank == 0 else {}
    if bad:
        tokens = _share(channel, tokens)
    layout = persistence.layout_meta(engine.spec, engine.pool.block_size)
    for agent_id in bad:  # rank 0's tokens, no cache: recomputed on every rank
        store.delete_agent(agent_id, fp)
        store.save_turn(TurnRecord(agent_id, fp, list(tokens[agent_id]), 0, layout=layout))
    for agent_id in sorted(set(mine) - set(truth)):
        store.delete_agent(agent_id, fp)
    settle(store)
    if bad:
        log.warning(
            "rank %d: stores disagreed on %d agent(s); recomputing: %s",
            channel.rank,
            len(bad),
            ", ".join(bad[:10]),
        )
    return bad


def _share(channel, tokens: dict) -> dict:
    if channel.rank == 0:
        channel.send({"op": "tokens", "tokens": tokens})
        return tokens
    return channel.receive()["tokens"]
