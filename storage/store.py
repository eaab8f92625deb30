"""CacheStore: agents' KV blocks as safetensors files, indexed in SQLite, written crash-safely.

Layout under the store's root:

    index.db                          SQLite index (WAL), see `schema.py`
    blocks/<ab>/<hash>.safetensors    one file per full block, shared by content hash
    agents/<key>/<gen>.safetensors    per agent: what is not block-shaped (key = hash of the id)
    quarantine/                       files found corrupt, moved aside (never deleted)

Writes happen on one writer thread behind a bounded queue: the engine hands over host
buffers and goes on decoding. Every write puts the files first (temp, fsync, rename, fsync
the directory) and the index transaction after, so a crash leaves at worst an orphan file,
never an index row pointing at a missing or partial file.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import (
    CorruptFileError,
    StorageError,
    StoreClosedError,
    StoreLockedError,
    StoreWriteError,
)
from .maintenance import collect_garbage, verify_store
from .records import (
    BlockRecord,
    GcReport,
    StoredAgent,
    TurnRecord,
    VerifyReport,
    pack_tokens,
    unpack_tokens,
)
from .schema import open_index
from .tensor_files import (
    FileOps,
    HostTensor,
    read_tensor_file,
    read_tensor_file_into,
    write_tensor_file,
)

log = logging.getLogger("agentkv.storage")

FORMAT_VERSION = "1"
_STOP = object()


class CacheStore:
    """Durable home of agents' caches.

    Args:
        root: the store directory (created if missing).
        disk_budget: bytes of block and state files to keep at most; beyond it the least
            recently used unpinned agents lose their files (their tokens stay, so they are
            recomputed if they come back). None: no limit.
        max_pending: turns queued for writing before `save_turn` blocks (backpressure).
        file_ops: the file-system calls to use (tests inject faults here).
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
        try:
            for sub in ("blocks", "agents", "quarantine"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreWriteError(f"cannot create store at {self.root}: {exc}") from exc
        self._lockfile = _lock_store(self.root)
        self._db = open_index(self.root / "index.db")
        self._lock = threading.Lock()
        self._on_disk = {row[0] for row in self._db.execute("SELECT hash FROM blocks")}
        self._queued: dict[str, int] = {}  # block hash -> turns queued that write it
        # block hash -> queued turns that list it (with or without its bytes): never evicted
        self._referenced: dict[str, int] = {}
        self._pending: dict[str, int] = {}  # agent id -> queued operations
        self._errors: list[str] = []
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
        self._writer = threading.Thread(target=self._write_loop, name="agentkv-writer", daemon=True)
        self._writer.start()

    # -- reading (caller's thread) ---------------------------------------------------------

    def agent(self, agent_id: str, fingerprint: str) -> StoredAgent | None:
        """The index's record of an agent under a model, or None (reads the index only)."""
        if self._pending.get(agent_id):
            # A queued write or delete for this agent must land first. Wait only: failures
            # (of any agent) are for the caller of `flush`, not for whoever looks an agent up.
            self._drain()
        row = self._db.execute(
            "SELECT tokens, token_count, stored_tokens, state_file, state_checksum, pinned, "
            "last_used FROM agents WHERE agent_id = ? AND fingerprint = ?",
            (agent_id, fingerprint),
        ).fetchone()
        if row is None:
            return None
        hashes = [
            r[0]
            for r in self._db.execute(
                "SELECT block_hash FROM agent_blocks WHERE agent_id = ? AND fingerprint = ? "
                "ORDER BY seq",
                (agent_id, fingerprint),
            )
        ]
        try:
            tokens = unpack_tokens(row[0])
            if len(tokens) != row[1] or not all(isinstance(h, str) for h in hashes):
                raise ValueError(f"{len(tokens)} tokens, index says {row[1]}")
        except (TypeError, ValueError) as exc:
            self.counters["corrupt_rows"] += 1
            log.warning(
                "agent %r: unreadable index row (%s); treated as a new agent", agent_id, exc
            )
            return None
        return StoredAgent(
            agent_id,
            fingerprint,
            tokens,
            int(row[2] or 0),
            hashes,
            row[3],
            row[4],
            bool(row[5]),
            float(row[6] or 0.0),
        )

    def agent_ids(self, fingerprint: str | None = None) -> list[str]:
        """Ids of stored agents (of one model, or all)."""
        if self._pending:
            self._drain()  # queued writes and deletes land first, as for `agent`
        if fingerprint is None:
            rows = self._db.execute("SELECT DISTINCT agent_id FROM agents ORDER BY agent_id")
        else:
            rows = self._db.execute(
                "SELECT agent_id FROM agents WHERE fingerprint = ? ORDER BY agent_id",
                (fingerprint,),
            )
        return [r[0] for r in rows]

    def is_settled(self, agent_id: str) -> bool:
        """True when nothing is queued for this agent: what it has is on disk already."""
        with self._lock:
            return not self._pending.get(agent_id)

    def has_block(self, block_hash: str) -> bool:
        """True if the block is on disk or queued to be written."""
        with self._lock:
            return block_hash in self._on_disk or block_hash in self._queued

    def block_path(self, block_hash: str) -> Path:
        """Where a block's file lives."""
        return self.root / "blocks" / block_hash[:2] / f"{block_hash}.safetensors"

    def read_block(self, block_hash: str, fingerprint: str) -> dict[str, HostTensor]:
        """A block's tensors, checksum verified.

        Raises:
            CorruptFileError: missing, truncated, corrupt or of another model; the file was
                moved to quarantine and the index no longer points at it.
        """
        path = self.block_path(block_hash)
        try:
            meta, tensors = read_tensor_file(path)
            _expect(meta, path, fingerprint=fingerprint, block_hash=block_hash)
        except CorruptFileError as exc:
            self._corrupt(exc, block=block_hash)
            raise
        self.counters["blocks_read"] += 1
        return tensors

    def read_blocks_into(
        self, fingerprint: str, jobs: list[tuple[str, dict[str, HostTensor]]]
    ) -> list[bool]:
        """Read block files straight into caller-owned arrays; True per block read whole.

        Each job names a block hash and where each of its tensors goes (see
        `read_tensor_file_into`). Files are read and checksummed in parallel (a few reader
        threads; both the reads and the hashing run without the GIL). A bad file is
        handled as in `read_block`, and its job's views hold garbage.
        """
        if not jobs:
            return []
        futures = [
            self._readers().submit(self._read_into, h, fingerprint, dests) for h, dests in jobs
        ]
        ok = []
        for (h, _), future in zip(jobs, futures, strict=True):
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
            CorruptFileError: as for `read_block`; the agent's stored cache is dropped.
        """
        if agent.state_file is None:
            return {}, {}
        path = self.root / agent.state_file
        try:
            meta, tensors = read_tensor_file(path)
            _expect(meta, path, fingerprint=agent.fingerprint, agent_key=_agent_key(agent.agent_id))
            if meta.get("checksum") != agent.state_checksum:
                raise CorruptFileError(path, "not the state file the index recorded")
        except CorruptFileError as exc:
            self._corrupt(exc, agent=agent)
            raise
        self.counters["states_read"] += 1
        return meta, tensors

    # -- writing (queued, applied on the writer thread) ------------------------------------

    def register_model(
        self, fingerprint: str, *, model_id: str = "", config: str = "", block_size: int = 0
    ) -> None:
        """Record a model (idempotent)."""
        self._put(("model", fingerprint, model_id, config, block_size), None)

    def save_turn(self, record: TurnRecord) -> None:
        """Queue an agent's state for writing; blocks while the queue is full."""
        with self._lock:
            for b in record.blocks:
                if b.tensors is not None:
                    self._queued[b.block_hash] = self._queued.get(b.block_hash, 0) + 1
                self._referenced[b.block_hash] = self._referenced.get(b.block_hash, 0) + 1
        self._put(("turn", record), record.agent_id)

    def delete_agent(self, agent_id: str, fingerprint: str) -> None:
        """Queue the removal of an agent. Blocks it shared stay for the others; its own
        blocks stay on disk, unreferenced, until `gc` or the disk budget removes them."""
        self._put(("delete", agent_id, fingerprint), agent_id)

    def drop_cache(self, agent_id: str, fingerprint: str) -> None:
        """Queue forgetting an agent's files but keeping its tokens (it will be recomputed)."""
        self._put(("evict", agent_id, fingerprint), agent_id)

    def set_pinned(self, agent_id: str, fingerprint: str, pinned: bool = True) -> None:
        """Queue pinning an agent (the disk budget never evicts pinned agents)."""
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
        """Flush, stop the writer and close the index. Failed writes are logged, not raised."""
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
        self._lockfile.close()  # releases the flock

    def gc(
        self, fingerprint: str | None = None, *, dry_run: bool = True, progress: bool = False
    ) -> GcReport:
        """Flush, then collect garbage (see `maintenance.collect_garbage`)."""
        self.flush()
        report = collect_garbage(
            self.root, fingerprint, dry_run=dry_run, progress=progress, _locked=True
        )
        if not dry_run:
            with self._lock:
                self._on_disk = {r[0] for r in self._db.execute("SELECT hash FROM blocks")}
        return report

    def verify(self, *, progress: bool = False) -> VerifyReport:
        """Flush, then re-check every file's checksum (see `maintenance.verify_store`)."""
        self.flush()
        return verify_store(self.root, progress=progress)

    def stats(self) -> dict:
        """Counters plus index totals."""
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM blocks").fetchone()
        agents = self._db.execute("SELECT COUNT(*) FROM agents").fetchone()[0]
        return {
            **self.counters,
            "blocks": row[0],
            "block_bytes": row[1],
            "agents": agents,
            "pending": self._queue.unfinished_tasks,
        }

    # -- writer thread ---------------------------------------------------------------------

    def _put(self, op: tuple, agent_id: str | None) -> None:
        if self._closed:
            raise StoreClosedError("store is closed")
        if agent_id is not None:
            with self._lock:
                self._pending[agent_id] = self._pending.get(agent_id, 0) + 1
        self._queue.put((op, agent_id))

    def _write_loop(self) -> None:
        db = open_index(self.root / "index.db")
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._queue.task_done()
                break
            op, agent_id = item
            try:
                self._apply(db, op)
            except Exception as exc:  # one failed write must not stop the writer
                self.counters["write_errors"] += 1
                log.error("store write failed (%s): %s", op[0], exc)
                with self._lock:
                    self._errors.append(f"{op[0]}: {exc}")
            finally:
                self._settle(op, agent_id)
                self._queue.task_done()
        db.conn.close()

    def _settle(self, op: tuple, agent_id: str | None) -> None:
        with self._lock:
            if op[0] == "turn":
                for b in op[1].blocks:
                    if b.tensors is not None:
                        _decrement(self._queued, b.block_hash)
                    _decrement(self._referenced, b.block_hash)
            if agent_id is not None:
                n = self._pending.get(agent_id, 1) - 1
                if n:
                    self._pending[agent_id] = n
                else:
                    self._pending.pop(agent_id, None)

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
            db.execute(
                "INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?)",
                (op[1], op[2], op[3], op[4], time.time()),
            )
        elif kind == "quarantined":
            self._forget_file(db, *op[1:])

    def _write_turn(self, db, rec: TurnRecord) -> None:
        written = [self._write_block(rec, b) for b in rec.blocks if self._needs_write(b)]
        missing = [b.block_hash for b in rec.blocks if not self._will_exist(b, written)]
        if missing:
            raise StoreWriteError(f"agent {rec.agent_id!r}: block {missing[0]} is not on disk")
        state = self._write_state(rec)
        try:
            old = self._commit_turn(db, rec, written, state)
        except _BlocksGone as exc:
            with self._lock:
                self._on_disk.difference_update(exc.hashes)
            raise
        with self._lock:
            self._on_disk.update(h for h, _ in written)
        if old and (state is None or old != state[0]):
            (self.root / old).unlink(missing_ok=True)
        self.counters["turns_written"] += 1
        if self.disk_budget is not None:
            self._enforce_budget(db, keep=(rec.agent_id, rec.fingerprint))

    def _needs_write(self, b: BlockRecord) -> bool:
        with self._lock:
            return b.tensors is not None and b.block_hash not in self._on_disk

    def _will_exist(self, b: BlockRecord, written: list) -> bool:
        with self._lock:
            return b.block_hash in self._on_disk or any(h == b.block_hash for h, _ in written)

    def _write_block(self, rec: TurnRecord, b: BlockRecord) -> tuple[str, object]:
        path = self.block_path(b.block_hash)
        path.parent.mkdir(exist_ok=True)
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

    def _write_state(self, rec: TurnRecord) -> tuple[str, str] | None:
        if not rec.state:
            return None
        key = _agent_key(rec.agent_id)
        directory = self.root / "agents" / key
        directory.mkdir(exist_ok=True)
        rel = f"agents/{key}/{time.time_ns():x}.safetensors"
        meta = {
            **rec.layout,
            **rec.state_meta,
            "format": "agentkv-state",
            "format_version": FORMAT_VERSION,
            "fingerprint": rec.fingerprint,
            "agent_key": key,
            "token_count": str(rec.stored_tokens),
        }
        info = write_tensor_file(self.root / rel, rec.state, meta, self.ops)
        self.counters["bytes_written"] += info.nbytes
        return rel, info.checksum, info.nbytes

    def _commit_turn(self, db, rec: TurnRecord, written: list, state) -> str | None:
        """One transaction: new block rows, the agent's block list and row, refcounts."""
        now = time.time()
        key = (rec.agent_id, rec.fingerprint)
        with db.conn:
            db.execute("BEGIN IMMEDIATE")
            db.conn.executemany(
                "INSERT OR IGNORE INTO blocks VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                [
                    (
                        h,
                        rec.fingerprint,
                        str(self.block_path(h).relative_to(self.root)),
                        info.nbytes,
                        info.checksum,
                        n,
                        now,
                        now,
                    )
                    for h, (info, n) in written
                ],
            )
            old = db.execute(
                "SELECT state_file, created FROM agents WHERE agent_id = ? AND fingerprint = ?", key
            ).fetchone()
            old_hashes = [
                r[0]
                for r in db.execute(
                    "SELECT block_hash FROM agent_blocks WHERE agent_id = ? AND fingerprint = ?",
                    key,
                )
            ]
            db.execute("DELETE FROM agent_blocks WHERE agent_id = ? AND fingerprint = ?", key)
            db.conn.executemany(
                "INSERT INTO agent_blocks VALUES (?, ?, ?, ?)",
                [(*key, i, b.block_hash) for i, b in enumerate(rec.blocks)],
            )
            _check_blocks_exist(db, rec)
            db.execute(
                "INSERT OR REPLACE INTO agents (agent_id, fingerprint, tokens, token_count, "
                "stored_tokens, state_file, state_checksum, state_bytes, created, last_used, "
                "pinned) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "COALESCE((SELECT pinned FROM agents WHERE agent_id = ? AND fingerprint = ?), 0))",
                (
                    *key,
                    pack_tokens(rec.tokens),
                    len(rec.tokens),
                    rec.stored_tokens,
                    state[0] if state else None,
                    state[1] if state else None,
                    state[2] if state else 0,
                    old[1] if old else now,
                    now,
                    *key,
                ),
            )
            _recount(db, set(old_hashes) | {b.block_hash for b in rec.blocks}, now)
        return old[0] if old else None

    def _remove_agent(self, db, agent_id: str, fingerprint: str, *, keep_tokens: bool) -> None:
        key = (agent_id, fingerprint)
        with db.conn:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT state_file FROM agents WHERE agent_id = ? AND fingerprint = ?", key
            ).fetchone()
            hashes = [
                r[0]
                for r in db.execute(
                    "SELECT block_hash FROM agent_blocks WHERE agent_id = ? AND fingerprint = ?",
                    key,
                )
            ]
            db.execute("DELETE FROM agent_blocks WHERE agent_id = ? AND fingerprint = ?", key)
            if keep_tokens:
                db.execute(
                    "UPDATE agents SET stored_tokens = 0, state_file = NULL, state_bytes = 0, "
                    "state_checksum = NULL WHERE agent_id = ? AND fingerprint = ?",
                    key,
                )
            else:
                db.execute("DELETE FROM agents WHERE agent_id = ? AND fingerprint = ?", key)
            _recount(db, set(hashes), time.time())
        if row and row[0]:
            (self.root / row[0]).unlink(missing_ok=True)

    def _enforce_budget(self, db, keep: tuple[str, str]) -> None:
        """Evict least recently used unpinned agents' files until under the disk budget."""
        if self._disk_bytes(db) > self.disk_budget:
            self._delete_unreferenced(db)  # garbage first: no live agent is evicted for it
        while self._disk_bytes(db) > self.disk_budget:
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

    def _disk_bytes(self, db) -> int:
        """Bytes of block files plus the agents' current state files."""
        blocks = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM blocks").fetchone()[0]
        states = db.execute("SELECT COALESCE(SUM(state_bytes), 0) FROM agents").fetchone()[0]
        return blocks + states

    def _delete_unreferenced(self, db) -> list[str]:
        """Drop blocks no agent references: index rows first, then the files."""
        rows = db.execute("SELECT hash, path FROM blocks WHERE refcount = 0").fetchall()
        with self._lock:  # a queued turn that lists a block without its bytes needs it kept
            rows = [(h, path) for h, path in rows if h not in self._referenced]
        with db.conn:
            db.execute("BEGIN IMMEDIATE")
            db.conn.executemany(
                "DELETE FROM blocks WHERE hash = ? AND refcount = 0", [(h,) for h, _ in rows]
            )
        with self._lock:
            self._on_disk.difference_update(h for h, _ in rows)
        for _, path in rows:
            (self.root / path).unlink(missing_ok=True)
        return [h for h, _ in rows]

    # -- corruption ------------------------------------------------------------------------

    def _corrupt(
        self, exc: CorruptFileError, *, block: str | None = None, agent: StoredAgent | None = None
    ) -> None:
        """Count, log, move the file aside, and have the index forget it (via the writer)."""
        self.counters["corrupt_files"] += 1
        log.warning("corrupt cache file: %s", exc)
        if exc.path.exists():
            dest = self.root / "quarantine" / f"{exc.path.name}.{time.time_ns():x}"
            try:
                os.replace(exc.path, dest)
            except OSError as move_err:
                log.error("cannot move %s aside: %s", exc.path, move_err)
        if block is not None:
            with self._lock:
                self._on_disk.discard(block)
            self._put(("quarantined", "block", block), None)
        if agent is not None:
            self._put(("quarantined", "agent", agent.agent_id, agent.fingerprint), agent.agent_id)

    def _forget_file(self, db, kind: str, *ids: str) -> None:
        if kind == "block":
            # Agents that listed the block keep their tokens and the blocks before it.
            with db.conn:
                db.execute("BEGIN IMMEDIATE")
                for agent_id, fingerprint, seq in db.execute(
                    "SELECT agent_id, fingerprint, MIN(seq) FROM agent_blocks WHERE block_hash = ? "
                    "GROUP BY agent_id, fingerprint",
                    ids,
                ).fetchall():
                    _truncate_agent(db, agent_id, fingerprint, seq)
                db.execute("DELETE FROM blocks WHERE hash = ?", ids)
        else:
            with db.conn:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "UPDATE agents SET state_file = NULL, state_bytes = 0, state_checksum = NULL, "
                    "stored_tokens = 0 WHERE agent_id = ? AND fingerprint = ?",
                    ids,
                )


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 1) - 1
    if n:
        counts[key] = n
    else:
        counts.pop(key, None)


def _truncate_agent(db, agent_id: str, fingerprint: str, seq: int) -> None:
    """Keep an agent's first `seq` blocks only; its state file (now an orphan for gc) no
    longer applies."""
    key = (agent_id, fingerprint)
    db.execute(
        "DELETE FROM agent_blocks WHERE agent_id = ? AND fingerprint = ? AND seq >= ?",
        (*key, seq),
    )
    db.execute(
        "UPDATE agents SET state_file = NULL, state_bytes = 0, state_checksum = NULL, "
        "stored_tokens = 0 WHERE agent_id = ? AND fingerprint = ?",
        key,
    )


def _check_blocks_exist(db, rec: TurnRecord) -> None:
    """Every block the agent lists must have its row (gc in another process may have run)."""
    wanted = {b.block_hash for b in rec.blocks}
    if not wanted:
        return
    marks = ",".join("?" * len(wanted))
    have = db.execute(f"SELECT COUNT(*) FROM blocks WHERE hash IN ({marks})", tuple(wanted))
    if have.fetchone()[0] != len(wanted):
        raise _BlocksGone(wanted)


class _BlocksGone(StoreWriteError):
    def __init__(self, hashes: set[str]) -> None:
        self.hashes = hashes
        super().__init__("blocks removed from the index meanwhile; the next turn rewrites them")


def _recount(db, hashes: set[str], now: float) -> None:
    db.conn.executemany(
        "UPDATE blocks SET refcount = (SELECT COUNT(*) FROM agent_blocks WHERE block_hash = ?), "
        "last_used = ? WHERE hash = ?",
        [(h, now, h) for h in hashes],
    )


def _lock_store(root: Path):
    """Hold an exclusive lock on the store for this process's lifetime (one writer only)."""
    f = open(root / "lock", "a+")  # noqa: SIM115 - held open until close()
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StoreLockedError(f"store {root} is in use by another process") from None
    return f


def _agent_key(agent_id: str) -> str:
    """A file-system-safe name for an agent (ids are never used as paths)."""
    return hashlib.sha256(agent_id.encode()).hexdigest()[:32]


def _expect(meta: dict, path: Path, **want: str) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(path, f"format version {meta.get('format_version')!r}")
    for key, value in want.items():
        if meta.get(key) != value:
            raise CorruptFileError(path, f"{key} is {meta.get(key)!r}, expected {value!r}")


__all__ = ["CacheStore", "CorruptFileError", "StorageError", "StoreWriteError"]
