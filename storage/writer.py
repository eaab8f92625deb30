"""The store's writer thread: queued operations applied one at a time, in order.

`Writer` owns the bounded queue, the thread and the writer's own index connection. Each
operation (`operations.py`) applies itself through the methods here, which put the files
first (`cache_files.py`) and the index transaction after (`index_writes.py`), so a crash
leaves at worst an orphan file, never an index row pointing at a missing or partial file.
Removals go the other way: index first, then the file. A failed operation is logged and
recorded (`pending.Outcomes`); it never stops the writer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import index_rows, index_writes
from .cache_files import CacheFiles, ModelInfo
from .errors import StorageError, StoreWriteError
from .lookups import CorruptRows
from .maintenance import collect_garbage
from .operations import StoreOp
from .paths import is_state_rel
from .pending import AgentKey, Outcomes, PendingWrites, Ticket
from .records import BlockRecord, GcReport, StateFile, TurnRecord, WrittenBlock
from .schema import open_index

log = logging.getLogger("agentkv.storage")


@dataclass(frozen=True, slots=True)
class _Entry:
    """A queued operation and its overlay ticket."""

    op: StoreOp
    ticket: Ticket | None


_STOP = object()


class Writer:
    """Applies the store's operations on one thread, behind a bounded queue.

    Args:
        files: the store's files.
        pending: the bookkeeping shared with readers.
        outcomes: where failures are recorded.
        rows: where corrupt index rows are counted.
        counters: the store's counters (the writer's own are updated here).
        disk_budget: bytes of files to keep at most (None: no limit).
        max_pending: operations queued before `submit` blocks (backpressure).
        read_only: every operation fails (the store is on a read-only file system).
    """

    def __init__(
        self,
        files: CacheFiles,
        pending: PendingWrites,
        outcomes: Outcomes,
        rows: CorruptRows,
        counters: dict,
        *,
        disk_budget: int | None,
        max_pending: int,
        read_only: bool,
    ) -> None:
        self.files = files
        self.pending = pending
        self.outcomes = outcomes
        self.rows = rows
        self.counters = counters
        self.disk_budget = disk_budget
        self.read_only = read_only
        self.db = None  # the writer's connection, opened on its thread
        self._models: dict[str, ModelInfo] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._loop, name="agentkv-writer", daemon=True)
        self._thread.start()

    # -- the queue (callers' threads) -------------------------------------------------------

    def submit(self, op: StoreOp) -> None:
        """Queue an operation; blocks while the queue is full."""
        ticket = self.pending.add(op.agent_id, op.listed_blocks(), op.shown())
        self._queue.put(_Entry(op, ticket))

    @property
    def unfinished(self) -> int:
        """Operations queued or being applied."""
        return self._queue.unfinished_tasks

    def is_alive(self) -> bool:
        """False once the thread is gone (stopped, or died)."""
        return self._thread.is_alive()

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every queued operation is applied. Raises TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("store writes still pending")
                self._queue.all_tasks_done.wait(left)

    def stop(self) -> None:
        """Stop the thread once the queue is done, and wait for it."""
        self._queue.put(_STOP)
        self._thread.join()

    # -- the thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self.db = None if self.read_only else open_index(self.files.root / "index.db")
        except StorageError as exc:  # every write then fails; reads go on
            log.error("store %s: the writer cannot open the index: %s", self.files.root, exc)
        while True:
            entry = self._queue.get()
            if entry is _STOP:
                self._queue.task_done()
                break
            try:
                self._run(entry.op)
            finally:
                self.pending.settle(entry.op.agent_id, entry.op.listed_blocks(), entry.ticket)
                self._queue.task_done()
        if self.db is not None:
            self.db.conn.close()

    def _run(self, op: StoreOp) -> None:
        try:
            if self.db is None:
                raise StoreWriteError(f"store {self.files.root} is read-only")
            op.apply(self)
            op.landed(self.outcomes)
        except Exception as exc:  # one failed write must not stop the writer
            if op.failed(self.outcomes, exc):
                self.counters["write_errors"] += 1
                log.error("store write failed (%s): %s", op.kind, exc)

    # -- what operations do (writer thread) --------------------------------------------------

    def write_turn(self, rec: TurnRecord) -> None:
        """A turn: new block files and the state file, then its index transaction."""
        kept = self.pending.available_prefix(rec)
        if kept < len(rec.blocks):
            # A block the turn listed without its bytes (on disk when the engine looked) was
            # removed since by the disk budget. Keep what is there; the agent's next turn
            # sends the block's bytes again.
            log.info(
                "agent %r: block %s left the disk before its turn was written; "
                "storing its first %d block(s) only",
                rec.agent_id,
                rec.blocks[kept].block_hash,
                kept,
            )
            rec = _prefix_of(rec, kept)
        written = [self._write_block(rec, b) for b in rec.blocks if self.pending.needs_write(b)]
        state = self._write_state(rec)
        try:
            old = index_writes.commit_turn(self.db, rec, written, state)
        except index_writes.BlocksGone as exc:
            self.pending.blocks_gone(exc.hashes)
            raise
        self.pending.blocks_indexed(w.block_hash for w in written)
        key = (rec.agent_id, rec.fingerprint)
        if old and (state is None or old != state.rel):
            self._unlink_state(old, key)
        self.rows.rewritten(key)
        self.counters["turns_written"] += 1
        if self.disk_budget is not None:
            self._enforce_budget(keep=key)

    def _write_block(self, rec: TurnRecord, b: BlockRecord) -> WrittenBlock:
        info = self.files.write_block(rec, b)
        self.counters["blocks_written"] += 1
        self.counters["bytes_written"] += info.nbytes
        return WrittenBlock(b.block_hash, info.nbytes, info.checksum, b.token_count)

    def _write_state(self, rec: TurnRecord) -> StateFile | None:
        state = self.files.write_state(rec, self._models.get(rec.fingerprint, ModelInfo()))
        if state is not None:
            self.counters["bytes_written"] += state.nbytes
        return state

    def register_model(self, fingerprint: str, model_id: str, config: str, block_size: int):
        """Record a model in the index, and remember it for the state files' metadata."""
        index_writes.register_model(self.db, fingerprint, model_id, config, block_size)
        old = self._models.get(fingerprint, ModelInfo())
        self._models[fingerprint] = ModelInfo(
            model_id or old.model_id, config or old.config, block_size
        )

    def set_pinned(self, agent_id: str, fingerprint: str, pinned: bool) -> None:
        """Pin or unpin an agent."""
        index_writes.set_pinned(self.db, agent_id, fingerprint, pinned)

    def remove_agent(self, agent_id: str, fingerprint: str, *, keep_tokens: bool) -> None:
        """Forget an agent (or, with `keep_tokens`, its cache only): index, then files."""
        key = (agent_id, fingerprint)
        old = index_writes.remove_agent(self.db, *key, keep_tokens=keep_tokens)
        if old:
            self._unlink_state(old, key)
        self.rows.rewritten(key)
        if keep_tokens:
            self._keep_context(key)

    def _keep_context(self, key: AgentKey) -> None:
        """An agent whose cache was dropped or cut short keeps a state file of its context
        alone (its tokens and the blocks it still lists), so the index is never the only
        copy of its tokens (see `rebuild.py`). The file first, then the row. A failure is
        logged: the index still holds the tokens."""
        context = index_writes.context_without_state(self.db, *key)
        if context is None:
            return
        tokens, stored, hashes = context
        rec = TurnRecord(key[0], key[1], tokens, stored, [BlockRecord(h, 0) for h in hashes])
        try:
            state = self._write_state(rec)
            if state is not None and not index_writes.set_state_file(self.db, *key, state):
                self._unlink_state(state.rel, key)  # the agent changed meanwhile
        except (OSError, StorageError) as exc:
            log.warning("agent %r: its context file could not be written: %s", key[0], exc)

    def _unlink_state(self, rel: object, key: AgentKey) -> None:
        """Delete a state file the index no longer lists (only one of this agent's)."""
        if not self.files.unlink_state(rel, key[0]):
            self.rows.report(key, f"state_file was {rel!r}; that file was left alone")

    def _enforce_budget(self, keep: AgentKey) -> None:
        """Evict least recently used unpinned agents' files until under the disk budget."""
        if index_writes.disk_bytes(self.db) > self.disk_budget:
            self._delete_unreferenced()  # garbage first: no live agent is evicted for it
        while index_writes.disk_bytes(self.db) > self.disk_budget:
            victim = index_writes.eviction_victim(self.db, keep)
            if victim is None:
                return
            self.remove_agent(*victim, keep_tokens=True)
            self._delete_unreferenced()
            self.counters["evicted_agents"] += 1

    def _delete_unreferenced(self) -> None:
        """Drop blocks no agent references: index rows first, then the files."""
        # A queued turn that lists a block without its bytes needs it kept.
        hashes = self.pending.unlisted(index_rows.unreferenced_blocks(self.db))
        index_writes.delete_unreferenced(self.db, hashes)
        self.pending.blocks_gone(hashes)
        for h in hashes:
            if not self.files.unlink_block(h):
                self.rows.count()
                log.warning("index held a block row with hash %r; no file deleted", h)

    def forget_block(self, path: Path, block_hash: str) -> None:
        """A corrupt block file: the index forgets it (agents that listed it keep the
        blocks before it), then the file is moved to quarantine."""
        cuts = index_writes.forget_block(self.db, block_hash)
        for key, cut in cuts:
            if cut.state_file is not None:  # it no longer applies to what is left
                self._unlink_state(cut.state_file, key)
        self.files.quarantine(path)
        for key, _ in cuts:
            self._keep_context(key)

    def forget_state(self, path: Path, agent_id: str, fingerprint: str, state_file) -> None:
        """A corrupt state file: the index forgets it (one transaction), then the file is
        moved to quarantine; the agent keeps its blocks and a context file."""
        index_writes.forget_state(self.db, agent_id, fingerprint, state_file)
        if is_state_rel(state_file, agent_id):  # else a name the store never gave this agent
            self.files.quarantine(path)
        self._keep_context((agent_id, fingerprint))

    def collect_garbage(self, fingerprint: str | None, progress: bool) -> GcReport:
        """A real gc between two writes; blocks that queued turns list are kept."""
        report = collect_garbage(
            self.files.root,
            fingerprint,
            dry_run=False,
            progress=progress,
            _locked=True,
            _keep=self.pending.listed(),
        )
        self.pending.reset_blocks(index_rows.block_hashes(self.db))
        return report


def _prefix_of(rec: TurnRecord, blocks: int) -> TurnRecord:
    """The turn with its first `blocks` blocks only, and no state (it needs them all)."""
    kept = rec.blocks[:blocks]
    return TurnRecord(
        rec.agent_id,
        rec.fingerprint,
        rec.tokens,
        sum(b.token_count for b in kept),
        kept,
        layout=rec.layout,
    )
