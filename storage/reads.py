"""Reads of cache files for restores: checked, counted, and a corrupt file forgotten.

`CacheReads` reads block and state files through `CacheFiles` (block files in parallel on
a few reader threads) and turns a corrupt file into a `ForgetBlock` or `ForgetState`
operation for the writer: the index forgets the file, then it is moved to quarantine.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait

from .cache_files import CacheFiles
from .errors import CorruptFileError
from .lookups import CorruptRows
from .operations import ForgetBlock, ForgetState, StoreOp
from .pending import PendingWrites
from .records import CONTEXT_TENSORS, StoredAgent, context_digest
from .tensor_files import FileDest, HostTensor

log = logging.getLogger("agentkv.storage")


class CacheReads:
    """The store's file reads (see `CacheStore.read_block`, `read_blocks_into`,
    `read_state`, `report_corrupt_state` for what each promises).

    Args:
        files: the store's files.
        pending: told at once that a corrupt block is gone.
        rows: where a row found wrong by its state file is reported.
        counters: the store's counters (reads and corrupt files are counted here).
        lock: the store's counters lock.
        put: queues an operation for the writer.
    """

    def __init__(
        self,
        files: CacheFiles,
        pending: PendingWrites,
        rows: CorruptRows,
        counters: dict,
        lock: threading.Lock,
        put: Callable[[StoreOp], None],
    ) -> None:
        self._files = files
        self._pending = pending
        self._rows = rows
        self._counters = counters
        self._lock = lock
        self._put = put
        self._pool: ThreadPoolExecutor | None = None  # block readers, made on first restore

    def read_block(self, block_hash: str, fingerprint: str) -> dict[str, HostTensor]:
        """A block's tensors, checksum verified. Raises CorruptFileError."""
        try:
            tensors = self._files.read_block(block_hash, fingerprint)
        except CorruptFileError as exc:
            self._corrupt(exc, block=block_hash)
            raise
        with self._lock:
            self._counters["blocks_read"] += 1
        return tensors

    def read_blocks_into(
        self, fingerprint: str, jobs: Iterable[tuple[str, Mapping[str, HostTensor] | FileDest]]
    ) -> list[bool]:
        """Block files into caller-owned arrays, in parallel; True per block read whole."""
        # Submitted as the jobs come: an iterable caller's later jobs overlap the reads.
        futures: list[tuple[str, Future]] = []
        read = self._files.read_block_into
        try:
            for h, dests in jobs:
                futures.append((h, self._readers().submit(read, h, fingerprint, dests)))
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
            self._counters["blocks_read"] += sum(ok)
        return ok

    def _readers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                workers = min(4, os.cpu_count() or 1)
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="agentkv-reader")
            return self._pool

    def read_state(self, agent: StoredAgent) -> tuple[dict[str, str], dict[str, HostTensor]]:
        """An agent's state file, checksum verified. Raises CorruptFileError."""
        if agent.state_file is None:
            return {}, {}
        try:
            meta, tensors = self._files.read_state(agent)
        except CorruptFileError as exc:
            self._corrupt(exc, agent=agent)
            raise
        of = meta.get("context")  # absent in files written before it was recorded
        if of is not None and of != context_digest(agent.tokens[: agent.stored_tokens]):
            # A good file, of the tokens the index held before they were edited: the row
            # is wrong, not the file.
            self._rows.report((agent.agent_id, agent.fingerprint), "tokens differ from its state")
            raise CorruptFileError(
                self._files.root / agent.state_file,
                "holds the state of other tokens than the index's",
            )
        with self._lock:
            self._counters["states_read"] += 1
        for name in CONTEXT_TENSORS:  # the index's copy of the context, not cache state
            tensors.pop(name, None)
        return meta, tensors

    def report_corrupt_state(self, agent: StoredAgent, what: str) -> None:
        """A state file found unusable by the caller: counted, forgotten, moved aside."""
        if agent.state_file is not None:
            path = self._files.root / agent.state_file
            self._corrupt(CorruptFileError(path, what), agent=agent)

    def close(self) -> None:
        """Stop the reader threads."""
        if self._pool is not None:
            self._pool.shutdown()

    def _corrupt(
        self, exc: CorruptFileError, *, block: str | None = None, agent: StoredAgent | None = None
    ) -> None:
        """Count and log; the writer makes the index forget the file, then moves it aside."""
        with self._lock:
            self._counters["corrupt_files"] += 1
        log.warning("corrupt cache file: %s", exc)
        if block is not None:
            self._pending.blocks_gone([block])
            self._put(ForgetBlock(exc.path, block))
        if agent is not None:
            self._put(ForgetState(exc.path, agent.agent_id, agent.fingerprint, agent.state_file))
