"""Rank 0's decisions to every rank, over mx.distributed collectives, with a watchdog.

Every message is an `all_sum` of a fixed-size head (its length and first bytes) and, if
longer, one of the rest (msgpack bytes; the other ranks add zeros), so every rank issues
the same collectives in the same order. A collective on a
dead peer either raises (the ring backend notices a closed socket) or blocks; the watchdog
ends the process with one log line when a collective outlasts its timeout, so a lost rank
never leaves the daemon hanging.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

import mlx.core as mx
import msgpack
import numpy as np
from mlx_lm.generate import generation_stream

from ...errors import DistributedError

log = logging.getLogger("agentkv.distributed")

EXIT_RANK_LOST = 70  # the process exit status when the group broke (EX_SOFTWARE)
HEAD_BYTES = 256  # a message's first collective: its length and (most often) all of it


class Watchdog:
    """Ends the process when an armed wait outlasts its deadline.

    One thread; `arm(what, seconds)` before a blocking collective, `disarm()` after.
    `os._exit` because the thread stuck in the collective cannot be interrupted: the store
    is crash-safe, so what was durable stays durable and the rest is redone on restart.
    Arms nest: a collective inside a guarded batch step (the ranks' agreement on their
    writes) gives the step its deadline back when it ends.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._lock = threading.Lock()
        self._what = ""
        self._deadline: float | None = None
        self._outer: list[tuple[str, float | None]] = []  # the waits this one is inside
        self._thread = threading.Thread(target=self._watch, name="agentkv-watchdog", daemon=True)
        self._thread.start()

    def arm(self, what: str, seconds: float) -> None:
        """Start timing a wait named `what`."""
        with self._lock:
            self._outer.append((self._what, self._deadline))
            self._what, self._deadline = what, time.monotonic() + seconds

    def disarm(self) -> None:
        """The wait ended in time (the one it was inside, if any, is timed again)."""
        with self._lock:
            self._what, self._deadline = self._outer.pop() if self._outer else ("", None)

    def _watch(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
            if late:
                log.error("rank %d: %s timed out: a rank is lost; exiting", self.rank, what)
                logging.shutdown()
                os._exit(EXIT_RANK_LOST)


class Channel:
    """Collectives between the ranks of one group: messages from rank 0, agreement, stats.

    Args:
        group: the mx.distributed group.
        watchdog: the process's Watchdog.
        timeout: seconds any one collective may take before the watchdog ends the process;
            also how long a follower waits for rank 0's next message (rank 0 sends a
            heartbeat every second while idle).
    """

    def __init__(self, group, watchdog: Watchdog, *, timeout: float = 120.0) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.timeout = timeout
        self.idle_timeout = timeout
        self.watchdog = watchdog
        # mlx-lm's generation stream: the batch's own collectives run there, and all of a
        # rank's collectives must run in one order, so ours go on the same stream.
        self._on = {"group": group, "stream": generation_stream}

    def send(self, message: dict) -> None:
        """Rank 0: hand `message` (msgpack-able) to every rank."""
        self._exchange(msgpack.packb(message, use_bin_type=True), self.timeout)

    def receive(self) -> dict:
        """Another rank: the next message of rank 0."""
        data = self._exchange(b"", self.idle_timeout)
        return msgpack.unpackb(data, raw=False, strict_map_key=False)

    def any(self, flags: list[int]) -> list[bool]:
        """For each position, True if any rank's flag there is set."""
        if not flags:
            return []
        total = self._sum(mx.array(flags, dtype=mx.int32), "agreement")
        return [int(x) > 0 for x in total.tolist()]

    def agree(self, digest: bytes) -> bool:
        """True if every rank passed the same bytes (compared through a SHA-256)."""
        mine = mx.array(list(hashlib.sha256(digest).digest()), dtype=mx.int32)
        rows = self._run(lambda: mx.distributed.all_gather(mine[None], **self._on), "agree")
        return bool(mx.all(rows == rows[0:1]).item())

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values` (same length on each), in rank order."""
        mine = mx.array(values, dtype=mx.int64)[None]
        rows = self._run(lambda: mx.distributed.all_gather(mine, **self._on), "gather")
        return [list(map(int, r)) for r in rows.tolist()]

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data` (of any length), in rank order: one collective of the
        lengths, and a second (each rank's bytes padded to the longest) only if any has
        some."""
        sizes = [row[0] for row in self.gather([len(data)])]
        longest = max(sizes)
        if longest == 0:
            return [b""] * self.size
        mine = np.zeros((1, longest), np.uint8)
        mine[0, : len(data)] = np.frombuffer(data, np.uint8)
        rows = self._run(
            lambda: mx.distributed.all_gather(mx.array(mine), **self._on), "gather bytes"
        )
        got = np.array(rows)
        return [got[i, :n].tobytes() for i, n in enumerate(sizes)]

    def guarded(self, what: str, fn):
        """Run `fn` (which issues collectives: a batch step) under the watchdog; a lost
        peer's error becomes DistributedError."""
        self.watchdog.arm(what, self.timeout)
        try:
            return fn()
        except RuntimeError as exc:
            raise DistributedError(f"{what} failed: {exc}") from exc
        finally:
            self.watchdog.disarm()

    def _exchange(self, data: bytes, wait: float) -> bytes:
        """One all-sum of HEAD_BYTES (4 bytes of length, then the start of the message),
        and a second only for what does not fit: most messages (a step, a beat, a cancel)
        cost one collective."""
        room = HEAD_BYTES - 4
        head = np.zeros(HEAD_BYTES, np.uint8)
        if self.rank == 0:
            head[:4] = np.frombuffer(len(data).to_bytes(4, "little"), np.uint8)
            head[4 : 4 + min(len(data), room)] = np.frombuffer(data[:room], np.uint8)
        got = np.array(self._sum(mx.array(head), "message", wait))
        n = int.from_bytes(got[:4].tobytes(), "little")
        if n <= room:
            return got[4 : 4 + n].tobytes()
        if self.rank == 0:
            tail = mx.array(np.frombuffer(data[room:], np.uint8))
        else:
            tail = mx.zeros((n - room,), mx.uint8)
        return got[4:].tobytes() + bytes(memoryview(self._sum(tail, "message")))

    def _sum(self, x: mx.array, what: str, wait: float | None = None) -> mx.array:
        return self._run(lambda: mx.distributed.all_sum(x, **self._on), what, wait)

    def _run(self, make, what: str, wait: float | None = None) -> mx.array:
        self.watchdog.arm(what, wait or self.timeout)
        try:
            out = make()
            mx.eval(out)
            return out
        except RuntimeError as exc:  # the ring backend lost a peer
            raise DistributedError(f"rank {self.rank}: {what}: {exc}") from exc
        finally:
            self.watchdog.disarm()
