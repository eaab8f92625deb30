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

Lookups (`agent`, `agent_ids`) never wait for the queue: they read the index and lay the
queued turns and deletes over it. Paths read back from the index are checked (`paths.py`)
before any file is read, moved or deleted. On a read-only file system the store opens
read-only: restores work, writes fail with StoreWriteError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from . import index_writes
from .errors import (
    CorruptFileError,
    IndexDamagedError,
    StorageError,
    StoreClosedError,
    StoreLockedError,
    StoreWriteError,
    UnknownStoredAgentError,
)
from .index_rows import AGENT_COLUMNS, BLOCKS_QUERY, parse_agent
from .locks import try_lock
from .maintenance import collect_garbage, verify_store
from .paths import Containment, agent_key, block_rel, is_state_rel
from .records import (
    CONTEXT_TENSORS,
    BlockRecord,
    GcReport,
    StoredAgent,
    TurnRecord,
    VerifyReport,
    context_digest,
    context_tensors,
    unpack_tokens,
)
from .schema import check_index_present, is_damage, open_index
from .tensor_files import (
    FileDest,
    FileOps,
    HostTensor,
    read_tensor_file,
    read_tensor_file_into,
    write_tensor_file,
)

log = logging.getLogger("agentkv.storage")

FORMAT_VERSION = "1"
SETTLE_WAIT_S = 30.0  # the most `agent(wait=True)` waits for an agent's queued writes
_STOP = object()
_DELETED = None  # what the overlay holds for an agent whose delete is queued


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
        self.read_only = self._prepare_root()
        self._paths = Containment(self.root)
        self._lockfile = None if self.read_only else _lock_store(self.root)
        try:
            self._db, self._on_disk = self._open_index()
        except BaseException:
            if self._lockfile is not None:
                self._lockfile.close()  # a failed open leaves the store free to retry
            raise
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified as queued ops land
        self._queued: dict[str, int] = {}  # block hash -> turns queued that write it
        # block hash -> queued turns that list it (with or without its bytes): never evicted
        self._referenced: dict[str, int] = {}
        self._pending: dict[str, int] = {}  # agent id -> queued operations
        # (agent id, fingerprint) -> (ticket of its latest queued turn or delete, what
        # lookups see meanwhile: the turn's record, or _DELETED)
        self._overlay: dict[tuple[str, str], tuple[int, StoredAgent | None]] = {}
        self._tickets = 0
        self._bad_rows: set[tuple[str, str]] = set()  # corrupt rows counted already
        # (agent id, fingerprint) -> why its latest turn could not be written
        self._unsaved: dict[tuple[str, str], str] = {}
        # (agent id, fingerprint) -> why its latest delete could not be written
        self._undeleted: dict[tuple[str, str], str] = {}
        self._errors: list[str] = []
        self._models: dict[str, tuple[str, str, int]] = {}  # see _remember_model
        self.counters = {
            "turns_written": 0,
            "blocks_written": 0,
            "bytes_written": 0,
            "write_errors": 0,
            "corrupt_files": 0,
            "evicted_agents": 0,
            "blocks_read": 0,
            "states_read": 0,
            "corrupt_rows": 0,
        }
        self._pool: ThreadPoolExecutor | None = None  # block readers, made on first restore
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._closed = False
        # Held by close() and _put(): nothing can be queued behind the writer's stop (a gc
        # queued there would wait for an answer forever).
        self._closing = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="agentkv-writer", daemon=True)
        self._writer.start()

    def _open_index(self):
        """The index, and the hashes of the blocks it holds."""
        # On a read-only file system nothing can change the index under us, and SQLite
        # opens a WAL database there only as immutable (it cannot create the -shm file).
        path = self.root / "index.db"
        check_index_present(self.root)  # else SQLite makes an empty index over the files
        if not self.read_only and not all(
            os.access(p, os.W_OK) for p in (self.root, path) if p.exists()
        ):  # else SQLite's "attempt to write a readonly database", untyped as to why
            raise StoreWriteError(f"cannot write to store {self.root}: permission denied")
        db = open_index(path, read_only=self.read_only, immutable=self.read_only)
        try:
            return db, {row[0] for row in db.execute("SELECT hash FROM blocks")}
        except sqlite3.DatabaseError as exc:
            db.conn.close()
            if is_damage(exc):
                raise IndexDamagedError(self.root, str(exc)) from exc
            raise StorageError(f"cannot read index {path}: {exc}") from exc

    def _prepare_root(self) -> bool:
        """Create the store's directories; True if the file system is read-only."""
        if self.root.is_dir() and self.ops.is_read_only(self.root):
            log.info("store %s is on a read-only file system: opened read-only", self.root)
            wal = self.root / "index.db-wal"
            if wal.exists() and wal.stat().st_size:
                # SQLite opens a WAL index there only as immutable, which ignores the WAL:
                # the index is read as of its last checkpoint (older turns are recomputed).
                log.warning("store %s was not closed cleanly: its index's WAL is ignored", wal)
            return True
        try:
            if not self.root.is_dir():
                self.root.mkdir(parents=True)
                self.ops.fsync_dir(self.root.parent)
            created = [sub for sub in ("blocks", "agents", "quarantine") if _mkdir(self.root / sub)]
            if created:
                self.ops.fsync_dir(self.root)  # the new directories survive a crash
        except OSError as exc:
            raise StoreWriteError(f"cannot create store at {self.root}: {exc}") from exc
        return False

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
        with self._index_read():
            return self._lookup(agent_id, fingerprint, wait)

    def _lookup(self, agent_id: str, fingerprint: str, wait: bool) -> StoredAgent | None:
        if wait:
            with self._settled:
                settled = self._settled.wait_for(
                    lambda: not self._pending.get(agent_id) or not self._writer.is_alive(),
                    SETTLE_WAIT_S,
                )
            if not settled:
                log.warning("agent %r: queued writes not landed in %gs", agent_id, SETTLE_WAIT_S)
        else:
            with self._lock:
                queued = self._overlay.get((agent_id, fingerprint))
            if queued is not None:
                return self._queued_view(queued[1])
        return self._indexed_agent(agent_id, fingerprint)

    def _queued_view(self, view: StoredAgent | None) -> StoredAgent | None:
        if view is None:
            return None
        row = self._db.execute(
            "SELECT pinned FROM agents WHERE agent_id = ? AND fingerprint = ?",
            (view.agent_id, view.fingerprint),
        ).fetchone()
        # Copies: the record's lists belong to the turn the writer has yet to write.
        return dataclasses.replace(
            view,
            tokens=list(view.tokens),
            block_hashes=list(view.block_hashes),
            pinned=bool(row and row[0] == 1),
        )

    def _indexed_agent(self, agent_id: str, fingerprint: str) -> StoredAgent | None:
        key = (agent_id, fingerprint)
        row = self._db.execute(
            f"SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ? AND fingerprint = ?", key
        ).fetchone()
        if row is None:
            return None
        parsed = parse_agent(
            agent_id, fingerprint, row, self._db.execute(BLOCKS_QUERY, key).fetchall()
        )
        if parsed.problems:
            outcome = "treated as a new agent" if parsed.agent is None else "context kept"
            self._corrupt_row(key, f"{'; '.join(parsed.problems)}; {outcome}")
        return parsed.agent

    @contextlib.contextmanager
    def _index_read(self):
        """SQLite errors of a lookup as the store's own: StoreClosedError after close(),
        StorageError for an index damaged past what opening it checks (a bad page)."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if self._closed:
                raise StoreClosedError("store is closed") from exc
            if is_damage(exc):
                raise IndexDamagedError(self.root, str(exc)) from exc
            raise StorageError(f"index {self.root / 'index.db'} unreadable: {exc}") from exc

    def report_corrupt_row(self, agent_id: str, fingerprint: str, what: str) -> None:
        """Count and log an agent row found wrong by a caller that knows more than the index
        (e.g. blocks listed that its tokens do not hash to), once until it is written again."""
        self._corrupt_row((agent_id, fingerprint), what)

    def _corrupt_row(self, key: tuple[str, str], what: str) -> None:
        """Count and log a corrupt agent row, once until the agent's row is written again."""
        with self._lock:
            if key in self._bad_rows:
                return
            self._bad_rows.add(key)
            self.counters["corrupt_rows"] += 1
        log.warning("agent %r: corrupt index row: %s", key[0], what)

    def agent_ids(self, fingerprint: str | None = None) -> list[str]:
        """Ids of stored agents (of one model, or all), queued turns and deletes included.

        Answers at once, like `agent`.
        """
        with self._lock:
            overlay = {k: v[1] for k, v in self._overlay.items()}
        with self._index_read():
            if fingerprint is None:
                rows = self._db.execute("SELECT agent_id, fingerprint FROM agents")
            else:
                rows = self._db.execute(
                    "SELECT agent_id, fingerprint FROM agents WHERE fingerprint = ?",
                    (fingerprint,),
                )
            pairs = {(a, f) for a, f in rows if isinstance(a, str)}
        for key, view in overlay.items():
            if fingerprint is not None and key[1] != fingerprint:
                continue
            if view is _DELETED:
                pairs.discard(key)
            else:
                pairs.add(key)
        return sorted({agent_id for agent_id, _ in pairs})

    def is_settled(self, agent_id: str) -> bool:
        """True when nothing is queued for this agent: what it has is on disk already."""
        with self._lock:
            return not self._pending.get(agent_id)

    def has_block(self, block_hash: str) -> bool:
        """True if the block is on disk or queued to be written."""
        with self._lock:
            return block_hash in self._on_disk or block_hash in self._queued

    def block_path(self, block_hash: str) -> Path:
        """Where a block's file lives.

        Raises:
            ValueError: `block_hash` is not a lowercase hex digest.
        """
        return self.root / block_rel(block_hash)

    def read_block(self, block_hash: str, fingerprint: str) -> dict[str, HostTensor]:
        """A block's tensors, checksum verified.

        Raises:
            CorruptFileError: missing, truncated, corrupt or of another model; the index
                forgets it and the file is moved to quarantine.
        """
        path = self.block_path(block_hash)
        try:
            self._check_contained(path)
            meta, tensors = read_tensor_file(path)
            _expect(meta, path, fingerprint=fingerprint, block_hash=block_hash)
        except CorruptFileError as exc:
            self._corrupt(exc, block=block_hash)
            raise
        self.counters["blocks_read"] += 1
        return tensors

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
        # Submitted as the jobs come: an iterable caller's later jobs overlap the reads.
        futures: list[tuple[str, Future]] = []
        try:
            for h, dests in jobs:
                futures.append((h, self._readers().submit(self._read_into, h, fingerprint, dests)))
        except BaseException:
            wait([f for _, f in futures])  # never leave a reader writing into freed views
            raise
        ok = []
        for h, future in futures:
            try:
                future.result()
                ok.append(True)
            except CorruptFileError as exc:
                self._corrupt(exc, block=h)
                ok.append(False)
        with self._lock:
            self.counters["blocks_read"] += sum(ok)
        return ok

    def _read_into(self, block_hash: str, fingerprint: str, dests) -> None:
        path = self.block_path(block_hash)
        self._check_contained(path, link_ok=True)  # opened with O_NOFOLLOW: never followed
        meta = read_tensor_file_into(path, dests)
        _expect(meta, path, fingerprint=fingerprint, block_hash=block_hash)

    def _readers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                workers = min(4, os.cpu_count() or 1)
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="agentkv-reader")
            return self._pool

    def read_state(self, agent: StoredAgent) -> tuple[dict[str, str], dict[str, HostTensor]]:
        """An agent's state file (tail rows, windows, recurrent states), checksum verified.

        Raises:
            CorruptFileError: as for `read_block` (a name that is not this agent's state
                file, or that leads out of the store, is never read); the agent's stored
                cache is then its blocks only.
        """
        if agent.state_file is None:
            return {}, {}
        path = self.root / str(agent.state_file)
        try:
            if not is_state_rel(agent.state_file, agent.agent_id):
                raise CorruptFileError(path, "not a state file name of this agent")
            self._check_contained(path)
            meta, tensors = read_tensor_file(path, size=agent.state_bytes or None)
            _expect(meta, path, fingerprint=agent.fingerprint, agent_key=agent_key(agent.agent_id))
            if meta.get("checksum") != agent.state_checksum:
                raise CorruptFileError(path, "not the state file the index recorded")
        except CorruptFileError as exc:
            self._corrupt(exc, agent=agent)
            raise
        of = meta.get("context")  # absent in files written before it was recorded
        if of is not None and of != context_digest(agent.tokens[: agent.stored_tokens]):
            # A good file, of the tokens the index held before they were edited: the row
            # is wrong, not the file.
            self._corrupt_row((agent.agent_id, agent.fingerprint), "tokens differ from its state")
            raise CorruptFileError(path, "holds the state of other tokens than the index's")
        self.counters["states_read"] += 1
        for name in CONTEXT_TENSORS:  # the index's copy of the context, not cache state
            tensors.pop(name, None)
        return meta, tensors

    def report_corrupt_state(self, agent: StoredAgent, what: str) -> None:
        """A state file that `read_state` returned but the caller found unusable (its
        metadata or tensors do not fit the model): counted, forgotten, moved aside."""
        if agent.state_file is not None:
            self._corrupt(CorruptFileError(self.root / agent.state_file, what), agent=agent)

    def _check_contained(self, path: Path, *, link_ok: bool = False) -> None:
        if not self._paths.contains(path, link_ok=link_ok):
            raise CorruptFileError(path, "a symlink leads out of the store")

    # -- writing (queued, applied on the writer thread) ------------------------------------

    def register_model(
        self, fingerprint: str, *, model_id: str = "", config: str = "", block_size: int = 0
    ) -> None:
        """Record a model: its id (a path or hub id) and config (JSON), when known.

        Idempotent; a later call with a non-empty id or config fills them in. Skipped on a
        read-only store (the record is informative only).
        """
        if not self.read_only:
            self._put(("model", fingerprint, model_id, config, block_size), None)

    def save_turn(self, record: TurnRecord) -> None:
        """Queue an agent's state for writing; blocks while the queue is full.

        Lookups see the turn at once (see `agent`).
        """
        with self._lock:
            for b in record.blocks:
                if b.tensors is not None:
                    self._queued[b.block_hash] = self._queued.get(b.block_hash, 0) + 1
                self._referenced[b.block_hash] = self._referenced.get(b.block_hash, 0) + 1
        view = (record.fingerprint, _queued_record(record))
        self._put(("turn", record), record.agent_id, view=view)

    def delete_agent(self, agent_id: str, fingerprint: str) -> None:
        """Queue the removal of an agent; lookups no longer see it. Blocks it shared stay
        for the others; its own blocks stay on disk, unreferenced, until `gc` or the disk
        budget removes them."""
        self._put(("delete", agent_id, fingerprint), agent_id, view=(fingerprint, _DELETED))

    def drop_cache(self, agent_id: str, fingerprint: str) -> None:
        """Queue forgetting an agent's files but keeping its tokens (it will be recomputed)."""
        self._put(("evict", agent_id, fingerprint), agent_id)

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
        self._put(("pin", agent_id, fingerprint, pinned), agent_id)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued write is applied.

        Raises:
            StoreWriteError: some writes since the last flush failed (their agents keep the
                state they had on disk before; memory is unaffected).
            TimeoutError: the queue did not drain in time.
        """
        self._drain(timeout)
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise StoreWriteError(f"{len(errors)} write(s) failed: {errors[0]}")

    def _drain(self, timeout: float | None = None) -> None:
        """Wait until every queued write is applied; failures stay for `flush` to report."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("store writes still pending")
                self._queue.all_tasks_done.wait(left)

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
            self._closed = True
            self._queue.put(_STOP)
            self._writer.join()
            if self._pool is not None:
                self._pool.shutdown()
            self._db.conn.close()
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
            self._drain()  # files being written are not orphans
            return collect_garbage(
                self.root, fingerprint, progress=progress, read_only=self.read_only
            )
        if self.read_only:
            raise StoreWriteError(f"store {self.root} is read-only")
        done: Future = Future()
        self._put(("gc", fingerprint, progress, done), None)
        return done.result()

    def verify(self, *, progress: bool = False) -> VerifyReport:
        """Flush, then re-check every file's checksum (see `maintenance.verify_store`)."""
        self.flush()
        return verify_store(self.root, progress=progress, read_only=self.read_only)

    def stats(self) -> dict:
        """Counters plus index totals. An index that cannot be read (damaged) is no error
        here: the answer then says why under `index_error`, and has no totals."""
        try:
            with self._index_read():
                row = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM blocks"
                ).fetchone()
                agents = self._db.execute("SELECT COUNT(*) FROM agents").fetchone()[0]
        except StoreClosedError:
            raise
        except StorageError as exc:
            pending = self._queue.unfinished_tasks
            return {**self.counters, "index_error": str(exc), "pending": pending}
        return {
            **self.counters,
            "blocks": row[0],
            "block_bytes": row[1],
            "agents": agents,
            "pending": self._queue.unfinished_tasks,
        }

    # -- writer thread ---------------------------------------------------------------------

    def _put(
        self, op: tuple, agent_id: str | None, *, view: tuple[str, StoredAgent | None] | None = None
    ) -> None:
        """Queue an op. `view`: (fingerprint, what lookups of the agent see until the op
        lands: its record, or _DELETED)."""
        with self._closing:
            if self._closed:
                raise StoreClosedError("store is closed")
            ticket = None
            with self._lock:
                if agent_id is not None:
                    self._pending[agent_id] = self._pending.get(agent_id, 0) + 1
                if view is not None:
                    self._tickets += 1
                    ticket = ((agent_id, view[0]), self._tickets)
                    self._overlay[ticket[0]] = (self._tickets, view[1])
            self._queue.put((op, agent_id, ticket))  # blocks while the queue is full

    def _write_loop(self) -> None:
        try:
            db = None if self.read_only else open_index(self.root / "index.db")
        except StorageError as exc:  # every write then fails; reads go on
            log.error("store %s: the writer cannot open the index: %s", self.root, exc)
            db = None
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._queue.task_done()
                break
            op, agent_id, ticket = item
            try:
                if db is None:
                    raise StoreWriteError(f"store {self.root} is read-only")
                self._apply(db, op)
                self._saved(op)
            except Exception as exc:  # one failed write must not stop the writer
                self._write_failed(op, exc)
            finally:
                self._settle(op, agent_id, ticket)
                self._queue.task_done()
        if db is not None:
            db.conn.close()

    def _write_failed(self, op: tuple, exc: Exception) -> None:
        if op[0] == "gc":  # the caller waits for this one: the error is its own
            op[3].set_exception(exc)
            return
        self.counters["write_errors"] += 1
        log.error("store write failed (%s): %s", op[0], exc)
        with self._lock:
            self._errors.append(f"{op[0]}: {exc}")
            if op[0] == "turn":
                self._unsaved[(op[1].agent_id, op[1].fingerprint)] = str(exc)
            elif op[0] == "delete":
                self._undeleted[(op[1], op[2])] = str(exc)

    def _saved(self, op: tuple) -> None:
        """An agent's turn landed (or the agent was deleted): nothing of it is unsaved."""
        if op[0] in ("turn", "delete"):
            key = (op[1].agent_id, op[1].fingerprint) if op[0] == "turn" else (op[1], op[2])
            with self._lock:
                self._unsaved.pop(key, None)
                self._undeleted.pop(key, None)

    def unsaved(self, agent_id: str, fingerprint: str) -> str | None:
        """Why the agent's latest queued turn could not be written (disk full, ...), or None
        when it landed. The index then holds the agent's previous turn: the caller still
        has the state in memory and may queue it again (`save_turn`)."""
        with self._lock:
            return self._unsaved.get((agent_id, fingerprint))

    def unsaved_agents(self, fingerprint: str) -> dict[str, str]:
        """Every agent of a model whose latest queued turn could not be written, with why."""
        with self._lock:
            return {a: why for (a, fp), why in self._unsaved.items() if fp == fingerprint}

    def delete_error(self, agent_id: str, fingerprint: str) -> str | None:
        """Why the agent's latest queued delete could not be written, or None. The index
        then still holds the agent: it is not deleted, and comes back after a restart."""
        with self._lock:
            return self._undeleted.get((agent_id, fingerprint))

    def durable_tokens(self, agent_id: str, fingerprint: str) -> int:
        """How many of the agent's tokens the index holds (0 if none), ignoring writes
        still queued: what a crash now would keep."""
        with self._index_read():
            row = self._db.execute(
                "SELECT token_count FROM agents WHERE agent_id = ? AND fingerprint = ?",
                (agent_id, fingerprint),
            ).fetchone()
        count = row[0] if row is not None else 0
        return count if isinstance(count, int) and count > 0 else 0

    def _settle(self, op: tuple, agent_id: str | None, ticket) -> None:
        with self._lock:
            if op[0] == "turn":
                for b in op[1].blocks:
                    if b.tensors is not None:
                        _decrement(self._queued, b.block_hash)
                    _decrement(self._referenced, b.block_hash)
            if agent_id is not None:
                _decrement(self._pending, agent_id)
            # The index now says what the op did (or, if it failed, what was there before).
            if ticket is not None and self._overlay.get(ticket[0], (None,))[0] == ticket[1]:
                del self._overlay[ticket[0]]
            self._settled.notify_all()

    def _apply(self, db, op: tuple) -> None:
        kind = op[0]
        if kind == "turn":
            self._write_turn(db, op[1])
        elif kind == "delete":
            self._remove_agent(db, op[1], op[2], keep_tokens=False)
        elif kind == "evict":
            self._remove_agent(db, op[1], op[2], keep_tokens=True)
        elif kind == "pin":
            db.execute(
                "UPDATE agents SET pinned = ? WHERE agent_id = ? AND fingerprint = ?",
                (int(op[3]), op[1], op[2]),
            )
        elif kind == "model":
            index_writes.register_model(db, *op[1:])
            self._remember_model(*op[1:])
        elif kind == "quarantined":
            self._forget_file(db, *op[1:])
        elif kind == "gc":
            op[3].set_result(self._gc_now(db, op[1], op[2]))

    def _gc_now(self, db, fingerprint: str | None, progress: bool) -> GcReport:
        with self._lock:
            keep = frozenset(self._referenced)  # listed by turns still queued
        report = collect_garbage(
            self.root, fingerprint, dry_run=False, progress=progress, _locked=True, _keep=keep
        )
        with self._lock:
            self._on_disk = {r[0] for r in db.execute("SELECT hash FROM blocks")}
        return report

    def _write_turn(self, db, rec: TurnRecord) -> None:
        kept = self._available_prefix(rec)
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
        written = [self._write_block(rec, b) for b in rec.blocks if self._needs_write(b)]
        state = self._write_state(rec)
        try:
            old = index_writes.commit_turn(db, rec, written, state)
        except index_writes.BlocksGone as exc:
            with self._lock:
                self._on_disk.difference_update(exc.hashes)
            raise
        with self._lock:
            self._on_disk.update(h for h, _ in written)
        key = (rec.agent_id, rec.fingerprint)
        if old and (state is None or old != state[0]):
            self._unlink_state(old, key)
        with self._lock:
            self._bad_rows.discard(key)  # rewritten whole
        self.counters["turns_written"] += 1
        if self.disk_budget is not None:
            self._enforce_budget(db, keep=(rec.agent_id, rec.fingerprint))

    def _available_prefix(self, rec: TurnRecord) -> int:
        """How many leading blocks of the turn are on disk or come with their bytes."""
        with self._lock:
            for i, b in enumerate(rec.blocks):
                if b.tensors is None and b.block_hash not in self._on_disk:
                    return i
        return len(rec.blocks)

    def _needs_write(self, b: BlockRecord) -> bool:
        with self._lock:
            return b.tensors is not None and b.block_hash not in self._on_disk

    def _write_block(self, rec: TurnRecord, b: BlockRecord) -> tuple[str, object]:
        path = self.block_path(b.block_hash)
        self._make_dir(path.parent)
        meta = {
            **rec.layout,
            "format": "agentkv-block",
            "format_version": FORMAT_VERSION,
            "fingerprint": rec.fingerprint,
            "block_hash": b.block_hash,
            "token_count": str(b.token_count),
        }
        info = write_tensor_file(path, b.tensors, meta, self.ops)
        self.counters["blocks_written"] += 1
        self.counters["bytes_written"] += info.nbytes
        return b.block_hash, (info, b.token_count)

    def _remember_model(self, fingerprint: str, model_id: str, config: str, block_size: int):
        """What state files record of their model (so a lost index can be rebuilt whole)."""
        old = self._models.get(fingerprint, ("", "", 0))
        self._models[fingerprint] = (model_id or old[0], config or old[1], block_size)

    def _write_state(self, rec: TurnRecord) -> tuple[str, str, int] | None:
        """Write the agent's state file; (its path, checksum, size), or None for an agent
        with no tokens. Every turn writes one, holding besides the tensors that are not
        block-shaped (if any) the agent's id, its token ids and its block list: all the
        index knows of it, so a lost index is rebuilt from the files (`rebuild.py`)."""
        if not rec.tokens:
            return None
        key = agent_key(rec.agent_id)
        self._make_dir(self.root / "agents" / key)
        rel = f"agents/{key}/{time.time_ns():x}.safetensors"
        model_id, config, block_size = self._models.get(rec.fingerprint, ("", "", 0))
        meta = {
            **rec.layout,
            **rec.state_meta,
            "format": "agentkv-state",
            "format_version": FORMAT_VERSION,
            "fingerprint": rec.fingerprint,
            "agent_key": key,
            "agent_id": rec.agent_id,
            "token_count": str(rec.stored_tokens),
            "context": context_digest(rec.tokens[: rec.stored_tokens]),
            "holds": "state" if rec.state else "tokens",
            "model_id": model_id,
            "model_config": config,
            "model_block_size": str(block_size),
        }
        tensors = {**rec.state, **context_tensors(rec.tokens, [b.block_hash for b in rec.blocks])}
        info = write_tensor_file(self.root / rel, tensors, meta, self.ops)
        self.counters["bytes_written"] += info.nbytes
        return rel, info.checksum, info.nbytes

    def _make_dir(self, directory: Path) -> None:
        """Create a file's directory if needed, durably; never one reached through a symlink."""
        if _mkdir(directory):
            self.ops.fsync_dir(directory.parent)  # the new entry survives a crash
        if not self._paths.contains(directory):
            raise StoreWriteError(f"{directory} leads out of the store (a symlink)")

    def _remove_agent(self, db, agent_id: str, fingerprint: str, *, keep_tokens: bool) -> None:
        key = (agent_id, fingerprint)
        old = index_writes.remove_agent(db, *key, keep_tokens=keep_tokens)
        if old:
            self._unlink_state(old, key)
        with self._lock:
            self._bad_rows.discard(key)
        if keep_tokens:
            self._keep_context(db, *key)

    def _keep_context(self, db, agent_id: str, fingerprint: str) -> None:
        """An agent whose cache was dropped or cut short keeps a state file of its context
        alone (its tokens and the blocks it still lists), so the index is never the only
        copy of its tokens (see `rebuild.py`). The file first, then the row. A failure is
        logged: the index still holds the tokens."""
        key = (agent_id, fingerprint)
        row = db.execute(
            "SELECT tokens, stored_tokens FROM agents "
            "WHERE agent_id = ? AND fingerprint = ? AND state_file IS NULL",
            key,
        ).fetchone()
        if row is None or not isinstance(row[0], bytes) or len(row[0]) % 4:
            return
        hashes = index_writes.listed_blocks_in_order(db, *key)
        rec = TurnRecord(
            agent_id,
            fingerprint,
            unpack_tokens(row[0]),
            row[1],
            [BlockRecord(h, 0) for h in hashes],
        )
        try:
            state = self._write_state(rec)
            if state is not None and not index_writes.set_state_file(db, *key, state):
                self._unlink_state(state[0], key)  # the agent changed meanwhile
        except (OSError, StorageError) as exc:
            log.warning("agent %r: its context file could not be written: %s", agent_id, exc)

    def _unlink_state(self, rel: object, key: tuple[str, str]) -> None:
        """Delete a state file the index no longer lists, if its name is one the store
        gave this agent and it lies inside the store; anything else is left alone."""
        path = self.root / str(rel)
        if is_state_rel(rel, key[0]) and self._paths.contains(path, link_ok=True):
            path.unlink(missing_ok=True)
        else:
            self._corrupt_row(key, f"state_file was {rel!r}; that file was left alone")

    def _enforce_budget(self, db, keep: tuple[str, str]) -> None:
        """Evict least recently used unpinned agents' files until under the disk budget."""
        if index_writes.disk_bytes(db) > self.disk_budget:
            self._delete_unreferenced(db)  # garbage first: no live agent is evicted for it
        while index_writes.disk_bytes(db) > self.disk_budget:
            victim = db.execute(
                "SELECT agent_id, fingerprint FROM agents WHERE pinned = 0 AND stored_tokens > 0 "
                "AND NOT (agent_id = ? AND fingerprint = ?) ORDER BY last_used LIMIT 1",
                keep,
            ).fetchone()
            if victim is None:
                return
            self._remove_agent(db, victim[0], victim[1], keep_tokens=True)
            self._delete_unreferenced(db)
            self.counters["evicted_agents"] += 1

    def _delete_unreferenced(self, db) -> list[str]:
        """Drop blocks no agent references: index rows first, then the files."""
        rows = db.execute("SELECT hash FROM blocks WHERE refcount = 0").fetchall()
        with self._lock:  # a queued turn that lists a block without its bytes needs it kept
            hashes = [r[0] for r in rows if r[0] not in self._referenced]
        with db.conn:
            db.execute("BEGIN IMMEDIATE")
            db.conn.executemany(
                "DELETE FROM blocks WHERE hash = ? AND refcount = 0", [(h,) for h in hashes]
            )
        with self._lock:
            self._on_disk.difference_update(hashes)
        for h in hashes:
            self._unlink_block(h)
        return hashes

    def _unlink_block(self, block_hash: object) -> None:
        """Delete a block's file: the one the store names after the hash (a path column is
        never followed), and only inside the store."""
        try:
            path = self.block_path(block_hash)
        except ValueError:
            with self._lock:  # lookups on the caller's thread count corrupt rows too
                self.counters["corrupt_rows"] += 1
            log.warning("index held a block row with hash %r; no file deleted", block_hash)
            return
        if self._paths.contains(path, link_ok=True):
            path.unlink(missing_ok=True)

    # -- corruption ------------------------------------------------------------------------

    def _corrupt(
        self, exc: CorruptFileError, *, block: str | None = None, agent: StoredAgent | None = None
    ) -> None:
        """Count and log; the writer makes the index forget the file, then moves it aside."""
        with self._lock:
            self.counters["corrupt_files"] += 1
        log.warning("corrupt cache file: %s", exc)
        if block is not None:
            with self._lock:
                self._on_disk.discard(block)
            self._put(("quarantined", "block", exc.path, block), None)
        if agent is not None:
            ids = (agent.agent_id, agent.fingerprint, agent.state_file)
            self._put(("quarantined", "agent", exc.path, *ids), agent.agent_id)

    def _forget_file(self, db, kind: str, path: Path, *ids: str | None) -> None:
        """Index first (one transaction), then the file to quarantine: a crash in between
        leaves a stray file, never a row that points at nothing."""
        if kind == "block":
            cuts = index_writes.forget_block(db, *ids)
            for key, cut in cuts:
                if cut.state_file is not None:  # it no longer applies to what is left
                    self._unlink_state(cut.state_file, key)
            self._quarantine(path)
            for key, _ in cuts:
                self._keep_context(db, *key)
            return
        index_writes.forget_state(db, *ids)
        agent_id, fingerprint, state_file = ids
        if is_state_rel(state_file, agent_id):  # else a name the store never gave this agent
            self._quarantine(path)
        self._keep_context(db, agent_id, fingerprint)

    def _quarantine(self, path: Path) -> None:
        if not self._paths.contains(path, link_ok=True) or not os.path.lexists(path):
            return  # never move a file from outside the store (a link moves, not its target)
        dest = self.root / "quarantine" / f"{path.name}.{time.time_ns():x}"
        try:
            self.ops.replace(path, dest)
        except OSError as move_err:
            log.error("cannot move %s aside: %s", path, move_err)


def _queued_record(rec: TurnRecord) -> StoredAgent:
    """What lookups see of a turn still queued: its files are not written yet."""
    hashes = [b.block_hash for b in rec.blocks]
    return StoredAgent(
        rec.agent_id,
        rec.fingerprint,
        rec.tokens,
        rec.stored_tokens,
        hashes,
        None,
        None,
        False,
        time.time(),
    )


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


def _mkdir(directory: Path) -> bool:
    """Create a directory; True if it was created (it is then to be fsynced in its parent)."""
    try:
        directory.mkdir()
    except FileExistsError:
        return False
    return True


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 1) - 1
    if n:
        counts[key] = n
    else:
        counts.pop(key, None)


def _lock_store(root: Path):
    """Hold an exclusive lock on the store for this process's lifetime (one writer only).

    Raises:
        StoreLockedError: another process holds it.
        StoreWriteError: the lock file cannot be opened for writing (e.g. permissions).
    """
    try:
        f = try_lock(root / "lock")  # held open until close()
    except OSError as exc:
        raise StoreWriteError(f"cannot open store {root} for writing: {exc}") from exc
    if f is None:
        raise StoreLockedError(f"store {root} is in use by another process")
    return f


def _expect(meta: dict, path: Path, **want: str) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(path, f"format version {meta.get('format_version')!r}")
    for key, value in want.items():
        if meta.get(key) != value:
            raise CorruptFileError(path, f"{key} is {meta.get(key)!r}, expected {value!r}")


__all__ = ["CacheStore", "CorruptFileError", "StorageError", "StoreWriteError"]
