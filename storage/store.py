"""CacheStore: agents' KV blocks as safetensors files, indexed in SQLite, written crash-safely.

Layout under the store's root:

    index.db                          SQLite index (WAL), see `schema.py`
    blocks/<ab>/<hash>.safetensors    one file per full block, shared by content hash
    agents/<key>/<gen>.safetensors    per agent: what is not block-shaped (key = hash of the id)
    quarantine/                       files found corrupt, moved aside (never deleted)

Writes happen on one writer thread behind a bounded queue: the engine hands over host
buffers and goes on decoding. Every write puts the files first (temp, fsync, rename, fsync
the directory) and the index transaction after, so a crash leaves at worst an orphan file,
never an index row pointing at a missing or partial file. Removals go the other way: index
first, then the file.

The pieces: `operations.py` (what is queued, each operation applying itself), `writer.py`
(the writer thread), `pending.py` (what is queued but not landed, as lookups must see it),
`lookups.py` (index reads with that laid over them), `reads.py` and `cache_files.py` (the
files), `index_rows.py` and `index_writes.py` (all the SQL).

Lookups (`agent`, `agent_ids`) never wait for the queue: they read the index and lay the
queued turns and deletes over it. Paths read back from the index are checked (`paths.py`)
before any file is read, moved or deleted. On a read-only file system the store opens
read-only: restores work, writes fail with StoreWriteError.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from . import index_rows
from .cache_files import FORMAT_VERSION, CacheFiles, prepare_root
from .errors import (
    CorruptFileError,
    IndexDamagedError,
    StorageError,
    StoreClosedError,
    StoreWriteError,
    UnknownStoredAgentError,
)
from .locks import lock_store
from .lookups import CorruptRows, IndexLookups
from .maintenance import collect_garbage, verify_store
from .operations import (
    Delete,
    Evict,
    Gc,
    Pin,
    RegisterModel,
    StoreOp,
    WriteTurn,
)
from .pending import Outcomes, PendingWrites
from .reads import CacheReads
from .records import (
    GcReport,
    StoredAgent,
    TurnRecord,
    VerifyReport,
)
from .schema import check_index_present, is_damage, open_index
from .tensor_files import FileDest, FileOps, HostTensor
from .writer import Writer

log = logging.getLogger("agentkv.storage")

SETTLE_WAIT_S = 30.0  # the most `agent(wait=True)` waits for an agent's queued writes
COUNTERS = (
    "turns_written",
    "blocks_written",
    "bytes_written",
    "write_errors",
    "corrupt_files",
    "evicted_agents",
    "blocks_read",
    "states_read",
    "corrupt_rows",
)


class CacheStore:
    """Durable home of agents' caches.

    Args:
        root: the store directory (created if missing). On a read-only file system it is
            opened read-only (`read_only` is then True): restores work, writes fail.
        disk_budget: bytes of block and state files to keep at most; beyond it the least
            recently used unpinned agents lose their files (their tokens stay, so they are
            recomputed if they come back). None: no limit.
        max_pending: turns queued for writing before `save_turn` blocks (backpressure).
        file_ops: the file-system calls to use (tests inject faults here).

    Raises:
        StoreWriteError: the store cannot be created, or opened for writing on a writable
            file system (e.g. permissions).
        StoreLockedError: another process has the store open.
        IndexMissingError: the index is gone (missing, empty, not a database) while the
            store holds cache files: `rebuild_index` makes it again from them.
        IndexDamagedError: SQLite finds the index damaged.
        StorageError: the index is unreadable or newer than this agentkv.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        disk_budget: int | None = None,
        max_pending: int = 32,
        file_ops: FileOps | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.disk_budget = disk_budget
        self.ops = file_ops or FileOps()
        self.read_only = prepare_root(self.root, self.ops)
        self._files = CacheFiles(self.root, self.ops)
        self._lockfile = None if self.read_only else lock_store(self.root)
        try:
            db, on_disk = _open_index(self.root, self.read_only)
        except BaseException:
            if self._lockfile is not None:
                self._lockfile.close()  # a failed open leaves the store free to retry
            raise
        self._lock = threading.Lock()  # counters bumped from several threads, the pool
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._rows = CorruptRows(self.counters, self._lock)
        self._pending = PendingWrites(on_disk)
        self._outcomes = Outcomes()
        self._lookups = IndexLookups(self.root, db, self._pending, self._rows)
        self._reads = CacheReads(
            self._files, self._pending, self._rows, self.counters, self._lock, self._put
        )
        self._closed = False
        # Held by close() and _put(): nothing can be queued behind the writer's stop (a gc
        # queued there would wait for an answer forever).
        self._closing = threading.Lock()
        self._writer = Writer(
            self._files,
            self._pending,
            self._outcomes,
            self._rows,
            self.counters,
            disk_budget=disk_budget,
            max_pending=max_pending,
            read_only=self.read_only,
        )

    # -- reading (caller's thread) ---------------------------------------------------------

    def agent(self, agent_id: str, fingerprint: str, *, wait: bool = False) -> StoredAgent | None:
        """An agent as the store knows it under a model, or None.

        Answers at once, without waiting for queued writes: a queued turn is visible (its
        record as it will be written; `state_file` is None until then), a queued delete
        hides the agent. A garbage index row is never raised: it is logged and counted in
        `counters["corrupt_rows"]`; the agent keeps its tokens whenever they are readable
        (its cache is then recomputed) and is None otherwise.

        Args:
            agent_id: the agent.
            fingerprint: the model.
            wait: first wait until this agent's queued writes are applied (or failed), and
                answer from the index alone: every file the answer names then exists. What
                a restore needs. The wait is bounded (SETTLE_WAIT_S; a stuck or dead
                writer): the index may then hold an older turn of the agent, whose tokens
                the caller finds differ from its own (its cache is recomputed).

        Raises:
            StoreClosedError: the store is closed.
            StorageError: the index cannot be read (damaged past what opening it checks).
        """
        if wait:
            settled = self._pending.wait_settled(agent_id, SETTLE_WAIT_S, self._writer.is_alive)
            if not settled:
                log.warning("agent %r: queued writes not landed in %gs", agent_id, SETTLE_WAIT_S)
        return self._lookups.agent(agent_id, fingerprint, overlay=not wait)

    def report_corrupt_row(self, agent_id: str, fingerprint: str, what: str) -> None:
        """Count and log an agent row found wrong by a caller that knows more than the index
        (e.g. blocks listed that its tokens do not hash to), once until it is written again."""
        self._rows.report((agent_id, fingerprint), what)

    def agent_ids(self, fingerprint: str | None = None) -> list[str]:
        """Ids of stored agents (of one model, or all), queued turns and deletes included.

        Answers at once, like `agent`.
        """
        return self._lookups.agent_ids(fingerprint)

    def fingerprints_of(self, agent_id: str) -> list[str]:
        """The models (fingerprints) an agent is stored for, sorted; queued turns and
        deletes included, like `agent`. One agent id may be stored for several models."""
        return self._lookups.fingerprints_of(agent_id)

    def is_settled(self, agent_id: str) -> bool:
        """True when nothing is queued for this agent: what it has is on disk already."""
        return self._pending.is_settled(agent_id)

    def on_settled(self, callback: Callable[[], None]) -> None:
        """Call `callback()` each time a queued write lands or fails, after `is_settled`
        says so (on the writer thread, outside the store's locks: it must be quick). A
        caller waiting for `is_settled` wakes on it instead of polling."""
        self._pending.add_listener(callback)

    def has_block(self, block_hash: str) -> bool:
        """True if the block is on disk or queued to be written."""
        return self._pending.has_block(block_hash)

    def block_path(self, block_hash: str) -> Path:
        """Where a block's file lives.

        Raises:
            ValueError: `block_hash` is not a lowercase hex digest.
        """
        return self._files.block_path(block_hash)

    def read_block(self, block_hash: str, fingerprint: str) -> dict[str, HostTensor]:
        """A block's tensors, checksum verified.

        Raises:
            CorruptFileError: missing, truncated, corrupt or of another model; the index
                forgets it and the file is moved to quarantine.
        """
        return self._reads.read_block(block_hash, fingerprint)

    def read_blocks_into(
        self, fingerprint: str, jobs: Iterable[tuple[str, Mapping[str, HostTensor] | FileDest]]
    ) -> list[bool]:
        """Read block files straight into caller-owned arrays; True per block read whole.

        Each job names a block hash and where each of its tensors goes (see
        `read_tensor_file_into`; a FileDest spares the work per file). Files are read and
        checksummed in parallel on a few reader threads (the reads release the GIL; the
        checksum's 64 KiB updates contend for it). A bad file is handled as in
        `read_block`, and its job's views hold garbage.
        """
        return self._reads.read_blocks_into(fingerprint, jobs)

    def read_state(self, agent: StoredAgent) -> tuple[dict[str, str], dict[str, HostTensor]]:
        """An agent's state file (tail rows, windows, recurrent states), checksum verified.

        Raises:
            CorruptFileError: as for `read_block` (a name that is not this agent's state
                file, or that leads out of the store, is never read); the agent's stored
                cache is then its blocks only.
        """
        return self._reads.read_state(agent)

    def report_corrupt_state(self, agent: StoredAgent, what: str) -> None:
        """A state file that `read_state` returned but the caller found unusable (its
        metadata or tensors do not fit the model): counted, forgotten, moved aside."""
        self._reads.report_corrupt_state(agent, what)

    # -- writing (queued, applied on the writer thread) ------------------------------------

    def register_model(
        self, fingerprint: str, *, model_id: str = "", config: str = "", block_size: int = 0
    ) -> None:
        """Record a model: its id (a path or hub id) and config (JSON), when known.

        Idempotent; a later call with a non-empty id or config fills them in. Skipped on a
        read-only store (the record is informative only).
        """
        if not self.read_only:
            self._put(RegisterModel(fingerprint, model_id, config, block_size))

    def save_turn(self, record: TurnRecord) -> None:
        """Queue an agent's state for writing; blocks while the queue is full.

        Lookups see the turn at once (see `agent`).
        """
        self._put(WriteTurn(record))

    def delete_agent(self, agent_id: str, fingerprint: str) -> None:
        """Queue the removal of an agent; lookups no longer see it. Blocks it shared stay
        for the others; its own blocks stay on disk, unreferenced, until `gc` or the disk
        budget removes them."""
        self._put(Delete(agent_id, fingerprint))

    def drop_cache(self, agent_id: str, fingerprint: str) -> None:
        """Queue forgetting an agent's files but keeping its tokens (it will be recomputed)."""
        self._put(Evict(agent_id, fingerprint))

    def set_pinned(self, agent_id: str, fingerprint: str, pinned: bool = True) -> None:
        """Queue pinning (or unpinning) an agent: the disk budget never evicts pinned agents.

        Raises:
            TypeError: the ids are not strings or `pinned` not a bool.
            UnknownStoredAgentError: the store has no such agent, indexed or queued (an
                agent whose first turn has not finished is not stored yet).
        """
        if not (isinstance(agent_id, str) and isinstance(fingerprint, str)):
            raise TypeError("agent_id and fingerprint must be strings")
        if not isinstance(pinned, bool):
            raise TypeError(f"pinned must be a bool, not {pinned!r}")
        if self.agent(agent_id, fingerprint) is None:
            raise UnknownStoredAgentError(f"no stored agent {agent_id!r} of model {fingerprint}")
        self._put(Pin(agent_id, fingerprint, pinned))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued write is applied.

        Raises:
            StoreWriteError: some writes since the last flush failed (their agents keep the
                state they had on disk before; memory is unaffected).
            TimeoutError: the queue did not drain in time.
        """
        self._writer.drain(timeout)
        errors = self._outcomes.take_errors()
        if errors:
            raise StoreWriteError(f"{len(errors)} write(s) failed: {errors[0]}")

    def close(self) -> None:
        """Flush, stop the writer and close the index. Failed writes are logged, not raised.

        Idempotent, from any thread: a second call returns once the store is closed, and
        writes or a gc asked for meanwhile raise StoreClosedError.
        """
        with self._closing:
            if self._closed:
                return
            try:
                self.flush()
            except StoreWriteError as exc:
                log.error("closing store with failed writes: %s", exc)
            self._closed = self._lookups.closed = True
            self._writer.stop()
            self._reads.close()
            self._lookups.db.conn.close()
            if self._lockfile is not None:
                self._lockfile.close()  # releases the flock

    def gc(
        self, fingerprint: str | None = None, *, dry_run: bool = True, progress: bool = False
    ) -> GcReport:
        """Collect garbage (see `maintenance.collect_garbage`) once queued writes landed.

        A real run happens on the writer thread, in queue order: writes queued before it are
        done, later ones wait, so a file being written is never taken for an orphan; blocks
        that queued turns list are kept. Failed writes stay for `flush` to report.

        Raises:
            StoreWriteError: a real run on a read-only store.
        """
        if dry_run:
            self._writer.drain()  # files being written are not orphans
            return collect_garbage(
                self.root, fingerprint, progress=progress, read_only=self.read_only
            )
        if self.read_only:
            raise StoreWriteError(f"store {self.root} is read-only")
        op = Gc(fingerprint, progress)
        self._put(op)
        return op.done.result()

    def verify(self, *, progress: bool = False) -> VerifyReport:
        """Flush, then re-check every file's checksum (see `maintenance.verify_store`)."""
        self.flush()
        return verify_store(self.root, progress=progress, read_only=self.read_only)

    def stats(self) -> dict:
        """Counters plus index totals. An index that cannot be read (damaged) is no error
        here: the answer then says why under `index_error`, and has no totals."""
        try:
            totals = self._lookups.totals()
        except StoreClosedError:
            raise
        except StorageError as exc:
            return {**self.counters, "index_error": str(exc), "pending": self._writer.unfinished}
        return {
            **self.counters,
            "blocks": totals.blocks,
            "block_bytes": totals.block_bytes,
            "agents": totals.agents,
            "pending": self._writer.unfinished,
        }

    def unsaved(self, agent_id: str, fingerprint: str) -> str | None:
        """Why the agent's latest queued turn could not be written (disk full, ...), or None
        when it landed. The index then holds the agent's previous turn: the caller still
        has the state in memory and may queue it again (`save_turn`)."""
        return self._outcomes.unsaved((agent_id, fingerprint))

    def unsaved_agents(self, fingerprint: str) -> dict[str, str]:
        """Every agent of a model whose latest queued turn could not be written, with why."""
        return self._outcomes.unsaved_agents(fingerprint)

    def delete_error(self, agent_id: str, fingerprint: str) -> str | None:
        """Why the agent's latest queued delete could not be written, or None. The index
        then still holds the agent: it is not deleted, and comes back after a restart."""
        return self._outcomes.delete_error((agent_id, fingerprint))

    def durable_tokens(self, agent_id: str, fingerprint: str) -> int:
        """How many of the agent's tokens the index holds (0 if none), ignoring writes
        still queued: what a crash now would keep."""
        return self._lookups.durable_tokens(agent_id, fingerprint)

    def _put(self, op: StoreOp) -> None:
        """Queue an operation for the writer thread (blocks while the queue is full)."""
        with self._closing:
            if self._closed:
                raise StoreClosedError("store is closed")
            self._writer.submit(op)


def _open_index(root: Path, read_only: bool):
    """The store's reader connection to its index, and the hashes of the blocks it holds."""
    # On a read-only file system nothing can change the index under us, and SQLite opens a
    # WAL database there only as immutable (it cannot create the -shm file).
    path = root / "index.db"
    check_index_present(root)  # else SQLite makes an empty index over the files
    if not read_only and not all(os.access(p, os.W_OK) for p in (root, path) if p.exists()):
        # else SQLite's "attempt to write a readonly database", untyped as to why
        raise StoreWriteError(f"cannot write to store {root}: permission denied")
    db = open_index(path, read_only=read_only, immutable=read_only)
    try:
        return db, index_rows.block_hashes(db)
    except sqlite3.DatabaseError as exc:
        db.conn.close()
        if is_damage(exc):
            raise IndexDamagedError(root, str(exc)) from exc
        raise StorageError(f"cannot read index {path}: {exc}") from exc


__all__ = ["FORMAT_VERSION", "CacheStore", "CorruptFileError", "StorageError", "StoreWriteError"]
