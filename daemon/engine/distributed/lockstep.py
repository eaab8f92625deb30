"""Rank 0's engine calls, replayed in the same order by every other rank.

`LockstepEngine` stands where the daemon's engine stands on rank 0 (same public API).
Each call that changes state is run on rank 0's engine, then sent to the other ranks,
which run the same call on their own engine (`follow`); a batch step is sent first, since
its forward pass is itself a collective. The engines thus admit, restore, batch and
commit identically, each on its shard of the model. Inputs large enough for the engine's
tokenizer thread are tokenized here on rank 0 and sent as token ids, so no rank's
scheduling depends on a thread's timing.
"""

from __future__ import annotations

import logging
import os
import secrets
import time

from ...errors import DistributedError, InvalidRequestError, UnknownAgentError
from ..prompts import PromptEncoder, encode_turn, render_messages
from .channel import EXIT_RANK_LOST
from .durability import AgreedStore, RankWrites, failed_writes, merge_reports, pack, unpack
from .reconcile import agree_restore, settle

log = logging.getLogger("agentkv.distributed")

HEARTBEAT_S = 1.0  # rank 0 sends one when idle this long: followers know it lives
STORE_STATS_S = 10.0  # each rank's store totals are re-read at most this often
RANK_FIELDS = ("pool_total", "pool_in_use", "pool_cached", "store_blocks", "store_bytes")

_SUBMIT_KEYS = ("max_tokens", "messages", "conversation", "temperature", "top_p", "top_k")
_SUBMIT_KEYS += ("min_p", "seed", "stop", "tools")


class RankStats:
    """This rank's pool and store use as a fixed-length vector (gathered at heartbeats)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._store = [0, 0]
        self._at = 0.0

    def vector(self, fresh: bool = False) -> list[int]:
        """[pool total, in use, cached, store blocks, store bytes]; the store's totals are
        re-read when `fresh` or older than STORE_STATS_S."""
        pool = self.engine.pool.stats()
        stale = fresh or time.monotonic() - self._at > STORE_STATS_S
        if stale and self.engine.store is not None:
            s = self.engine.store.stats()
            self._store, self._at = [s.get("blocks", 0), s.get("block_bytes", 0)], time.monotonic()
        return [pool.total, pool.in_use, pool.cached, *self._store]


class LockstepEngine:
    """Rank 0's engine, every state change also sent to the other ranks.

    Reads (`agent_info`, `stats`, ...) go to rank 0's engine alone, as does any attribute
    not defined here: an engine method that changes state must be added here (and to
    `_replay`), or the ranks drift apart. `store` is rank 0's store as agreed by every
    rank (`durability.AgreedStore`): what the service reports durable is on every rank's
    disk.

    Args:
        engine: rank 0's BlockPoolBatchEngine.
        channel: the group's Channel.
        after_close: called once every rank closed (rank 0 waits for its local ranks).
    """

    def __init__(self, engine, channel, after_close=None) -> None:
        self._engine = engine
        self._channel = channel
        self._after_close = after_close
        self._sizer = PromptEncoder(engine.tokenizer)
        self._rank_stats = RankStats(engine)
        self._ranks: list[list[int]] = []
        self._last = 0.0
        self._closed = False
        self._writes = RankWrites(channel)
        self.store = (
            None
            if engine.store is None
            else AgreedStore(engine.store, self._writes, self._agree_idle)
        )

    def __getattr__(self, name: str):  # reads: rank 0's engine answers alone
        return getattr(self._engine, name)

    @property
    def has_work(self) -> bool:
        """As the engine's; while idle, also the heartbeat (every HEARTBEAT_S)."""
        if not self._closed and time.monotonic() - self._last >= HEARTBEAT_S:
            self._beat()
        return self._engine.has_work

    def _beat(self, fresh: bool = False) -> None:
        """A heartbeat: every rank answers with its pool and store use (`fresh`: with its
        store's totals read now)."""
        self._send({"op": "beat", "fresh": fresh})
        try:
            self._ranks = self._channel.gather(self._rank_stats.vector(fresh))
        except DistributedError as exc:
            lost(self._engine, exc)

    def submit(self, agent_id, prompt=None, max_tokens=256, **kw) -> int:
        """`BlockPoolBatchEngine.submit`, on every rank."""
        if kw.get("logits_processors"):
            raise InvalidRequestError("logits processors cannot be sent to other ranks")
        kw.pop("logits_processors", None)
        if kw.get("seed") is None and kw.get("temperature", 0.0) > 0.0:
            # The engine would draw a seed per rank: every rank must sample the same tokens.
            kw["seed"] = secrets.randbits(63)
        prompt, kw = self._pre_encode(agent_id, prompt, kw)
        self._agree_if_on_disk(agent_id)
        uid = self._engine.submit(agent_id, prompt, max_tokens, **kw)
        args = {k: kw.get(k) for k in _SUBMIT_KEYS} | {"max_tokens": max_tokens}
        args["stop"] = list(args["stop"]) if args["stop"] is not None else None
        self._send({"op": "submit", "agent_id": agent_id, "prompt": prompt, "kw": args, "uid": uid})
        return uid

    def step_once(self) -> list:
        """One batch step on every rank (its forward pass is a collective)."""
        agree = self._writes.agree if self._writes.waiting else None
        self._send({"op": "step", "agree": agree is not None})
        try:
            events = self._channel.guarded("batch step", lambda: _settled_step(self._engine, agree))
        except DistributedError as exc:
            lost(self._engine, exc)
        self._writes.wrote(e.agent_id for e in events if e.completion is not None)
        return events

    def step(self):
        """Drive the batch until idle, yielding completions (as the engine's `step`)."""
        while self.has_work:
            for event in self.step_once():
                if event.completion is not None:
                    yield event.completion

    def cancel(self, uid: int) -> bool:
        """`cancel`, on every rank (only a cancel that found its turn)."""
        done = self._engine.cancel(uid)
        if done:
            self._send({"op": "cancel", "uid": uid})
        return done

    def delete_agent(self, agent_id: str) -> None:
        """`delete_agent`, on every rank."""
        self._engine.delete_agent(agent_id)
        self._send({"op": "delete", "agent_id": agent_id})
        self._writes.wrote([agent_id])

    def finish_delete(self, agent_id: str) -> str | None:
        """`finish_delete`, on every rank (each waits for its own store first)."""
        why = self._engine.finish_delete(agent_id)
        self._send({"op": "finish_delete", "agent_id": agent_id, "ok": why is None})
        return why

    def fork_agent(self, agent_id: str, new_agent_id: str) -> None:
        """`fork_agent`, on every rank."""
        self._agree_if_on_disk(agent_id)  # a fork restores its source
        self._engine.fork_agent(agent_id, new_agent_id)
        self._send({"op": "fork", "agent_id": agent_id, "new_agent_id": new_agent_id})
        self._writes.wrote([new_agent_id])

    def close(self) -> list[dict]:
        """Close every rank's engine; returns once every rank's store is flushed, with
        the agents not durable on some rank (`unsaved_report` rows of every rank)."""
        if self._closed:
            return []
        self._send({"op": "close"})
        self._closed = True
        report = self._engine.close()
        try:  # the followers closed (and flushed) their stores too: what did not land
            report = merge_reports([report, *self._follower_rows()])
        except DistributedError as exc:
            log.error("closing: %s", exc)
        if self._after_close is not None:
            self._after_close()
        return report

    def unsaved_report(self) -> list[dict]:
        """The agents whose latest turn is not on some rank's disk (every rank's rows)."""
        if self._closed:
            return self._engine.unsaved_report()
        self._send({"op": "unsaved"})
        rows = self._collective(self._follower_rows)
        return merge_reports([self._engine.unsaved_report(), *rows])

    def _follower_rows(self) -> list[list[dict]]:
        """Collective: every other rank's `unsaved_report` rows (rank 0 adds none)."""
        return [unpack(data) or [] for data in self._channel.gather_bytes(b"")[1:]]

    def _agree_idle(self) -> None:
        """The ranks agree on their writes now, unless a batch step will (it agrees
        first); followers settle their stores first (rank 0 has, for the agent asked)."""
        if self._closed or self._engine.has_work:
            return
        self._send({"op": "agree_writes"})
        self._collective(self._writes.agree)

    def stats(self) -> dict:
        """The engine's stats plus `distributed`: world size and each rank's pool and store."""
        if not self._closed:
            self._beat(fresh=True)  # each rank's numbers as of now
        out = self._engine.stats()
        ranks = [
            dict(zip(("rank", *RANK_FIELDS), (i, *v), strict=True))
            for i, v in enumerate(self._ranks)
        ]
        out["distributed"] = {"world_size": self._channel.size, "ranks": ranks}
        return out

    def _pre_encode(self, agent_id: str, prompt, kw: dict):
        """Large text or chats become token ids here (the engine would tokenize them on
        its worker thread, at a time that differs per rank)."""
        messages = kw.get("messages")
        if not self._sizer.is_large(prompt, messages, kw.get("tools")):
            return prompt, kw
        if messages is not None:
            if kw.get("tools") is not None:  # its tool parser needs the turn as a chat
                raise InvalidRequestError("a chat with tools this large is not distributed")
            ids = render_messages(self._engine.tokenizer, messages)
            return None, {**kw, "messages": None, "conversation": ids}
        try:
            info = self._engine.agent_info(agent_id)
            first = not (info.tokens or info.pending or info.busy)
        except UnknownAgentError:
            first = True
        return encode_turn(self._engine.tokenizer, prompt, first_turn=first), kw

    def _agree_if_on_disk(self, agent_id: str) -> None:
        """An agent only the store holds is restored next: every rank alike, or none."""
        if self._on_disk_only(agent_id):
            self._send({"op": "agree", "agent_id": agent_id})
            self._collective(agree_restore, self._engine, self._channel, agent_id)

    def _on_disk_only(self, agent_id: str) -> bool:
        if self._engine.store is None:
            return False
        try:
            return self._engine.agent_info(agent_id).state.startswith("on disk")
        except UnknownAgentError:
            return False

    def _collective(self, fn, *args):
        try:
            return fn(*args)
        except DistributedError as exc:
            lost(self._engine, exc)

    def _send(self, message: dict) -> None:
        try:
            self._channel.send(message)
        except DistributedError as exc:
            lost(self._engine, exc)
        self._last = time.monotonic()


def lost(engine, exc: BaseException) -> None:
    """The group broke: flush what this rank's store has queued, say so, and exit."""
    log.error("%s; the distributed daemon stops (restart it to resume)", exc)
    store = getattr(engine, "store", None)
    if store is not None:
        try:
            store.flush(timeout=10.0)
        except Exception as flush_exc:  # queued turns are redone after the restart
            log.error("store flush failed: %s", flush_exc)
    logging.shutdown()
    os._exit(EXIT_RANK_LOST)


def follow(engine, channel) -> None:
    """A follower's loop: replay rank 0's calls until it closes the group."""
    stats = RankStats(engine)
    while True:
        msg = channel.receive()
        op = msg["op"]
        if op == "beat":
            channel.gather(stats.vector(msg.get("fresh", False)))
        elif op == "step":
            _replay_step(engine, channel, msg.get("agree", False))
        elif op == "agree_writes":
            settle(engine.store)
            channel.gather_bytes(failed_writes(engine))
        elif op == "unsaved":
            channel.gather_bytes(pack(engine.unsaved_report()))
        elif op == "close":
            channel.gather_bytes(pack(engine.close()))
            return
        elif op == "agree":
            agree_restore(engine, channel, msg["agent_id"])
        else:
            _replay(engine, msg)


def _settled_step(engine, agree=None) -> list:
    """`step_once` once this rank's store has applied every queued write: an admission
    short of pool room drops first the caches already safe on disk (`is_settled`), which
    must not depend on how fast each rank's writer thread is. So write-back, which
    overlaps decoding in one process, holds the next batch step here (only while a write
    is queued: a no-op otherwise). `agree` (a collective), if given, runs once settled:
    the ranks agree on which of their writes failed."""
    if engine.store is not None:
        settle(engine.store)
    if agree is not None:
        agree()
    return engine.step_once()


def _replay_step(engine, channel, agree: bool) -> None:
    report = (lambda: channel.gather_bytes(failed_writes(engine))) if agree else None
    try:
        channel.guarded("batch step", lambda: _settled_step(engine, report))
    except DistributedError:
        raise
    except Exception:  # rank 0 met the same error: its server fails the turns
        log.exception("batch step failed")


def _replay(engine, msg: dict) -> None:
    op = msg["op"]
    if op == "submit":
        uid = engine.submit(msg["agent_id"], msg["prompt"], **msg["kw"])
        _same(uid, msg["uid"], "submit uid")
    elif op == "cancel":
        _same(engine.cancel(msg["uid"]), True, "cancel")
    elif op == "delete":
        engine.delete_agent(msg["agent_id"])
    elif op == "finish_delete":
        settle(engine.store)
        _same(engine.finish_delete(msg["agent_id"]) is None, msg["ok"], "delete outcome")
    elif op == "fork":
        engine.fork_agent(msg["agent_id"], msg["new_agent_id"])
    else:
        raise DistributedError(f"unknown message {op!r} from rank 0")


def _same(got, want, what: str) -> None:
    if got != want:
        raise DistributedError(f"diverged from rank 0: {what} {got!r} here, {want!r} there")
