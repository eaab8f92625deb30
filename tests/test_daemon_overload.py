"""Misbehaving clients do not grow the daemon or slow anyone else (real daemon, sockets,
store; the misbehaving clients in a process of their own, tests/overload_child.py).

- A client past its bounds (requests in flight, bytes in flight) is refused with
  `overloaded` (Client: Overloaded) at once; one that never reads has its replies dropped
  and its requests refused; oversized fields are refused by size before any engine work.
- The soak: well-behaved clients stream turns while 20 misbehaving ones (never reading,
  oversized requests, garbage frames, greedy floods) hammer the daemon. The daemon's RSS
  stays bounded, the well-behaved clients' inter-token gaps stay within a bound of their
  median, and after a kill -9 at the end every turn a client saw finish is in its agent's
  context and the agent resumes exactly (mlx-lm from scratch on the whole context).
  The default suite runs it for ~20 s with 8 well-behaved clients; AGENTKV_FULL=1 runs the
  issue's soak: 16 well-behaved clients, 5 minutes, max gap within 3x the median.

Measured on a shared 2-core box (load average 6-9 from other work): the 20 s soak grew the
daemon's RSS by ~70-80 MiB (without the bounds: 143 -> 2,546 MiB, 203 tokens instead of
~2,000, a 7.5 s gap, streamers timing out); two 5-minute soaks by 89 and 76 MiB, with
the streamers' median gap 38 / 27 ms alone and 75 / 45 ms under the flood, p99 419 / 205
ms, max 1.09 s / 582 ms (14.6x / 12.9x the median: the 3x bound was not met there; alone,
that box's max gap was already 3.3-6x the median). On the same box idle otherwise (load
~1), one 5-minute soak: RSS 220 -> 327 MiB, resume exact after kill -9, gaps alone median
17.3 ms / max 35.8 ms (2.1x), under the flood median 32.1 ms, p99 93 ms, max 198 ms (6.2x
the median: the 3x bound is still not met; the misbehaving process sent ~4,000 messages/s).
After refusals stopped costing in proportion to what was sent (bounded error messages, a
peek that steps over fields), on the same box idle: RSS 248 -> 314 MiB, resume exact,
gaps alone median 28.2 ms / max 90.3 ms (3.2x), under the flood (3,900 messages/s)
median 42.3 ms, p99 123 ms, max 223 ms (5.3x): still not within 3x.
With the start-up heap frozen out of the GC (full collections had taken 50-120 ms with the
GIL held), idle box: alone median 20.4 ms / max 40.4 ms (2.0x), under the flood (3,640
messages/s) median 45.6 ms, p99 120 ms, max 269 ms (5.9x). Then the I/O thread at nice +10
and pausing 3x its batch time (replies still forwarded): RSS 247 -> 316 MiB, resume exact,
alone median 23.5 ms / max 44.7 ms (1.9x), under the flood (now read at 1,220 messages/s)
median 40.4 ms, p99 100 ms, max 189 ms (4.7x): the 3x bound on the max is still not met on
this 2-core box, where the misbehaving process alone takes half a core.
"""

from __future__ import annotations

import gc
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from refs import FULL, eos_ids, random_tokens, scratch_tokens

from agentkv.client import DaemonUnavailable, Overloaded, protocol
from agentkv.client.errors import error_for
from agentkv.client.protocol import MAGIC

VOCAB = 768
ARGS = ("--block-size", "16", "--pool-blocks", "2048")
TURN_TOKENS = 24
TURNS_PER_AGENT = 4  # then the client moves on to a new agent (contexts stay short)
CHILD = Path(__file__).with_name("overload_child.py")
MiB = 2**20
# RSS the misbehaving clients may add to the daemon: the admission bounds (64 MiB of
# requests and 64 MiB of replies in flight, 16 replies queued per client) plus ZeroMQ's
# per-connection queues (8 messages in) and allocator slack; before the bounds it grew
# by gigabytes in seconds.
RSS_GROWTH_BOUND = 400 * MiB


@pytest.fixture(scope="module")
def daemon(daemon_factory):
    d = daemon_factory(args=ARGS)
    d.start()
    yield d
    d.kill()


def test_overloaded_maps_to_a_typed_client_error():
    assert "overloaded" in protocol.ERRORS
    assert isinstance(error_for("overloaded", "busy"), Overloaded)


def test_the_start_up_heap_is_frozen_out_of_full_collections(daemon):
    """The model, tokenizer and libraries (~10^5 objects) are frozen once the engine is
    built: before, every full collection walked them with the GIL held (50-120 ms in the
    soak, its longest inter-token gaps)."""
    frozen = re.search(r"start-up heap frozen: (\d+) objects", daemon.log())
    assert frozen and int(frozen.group(1)) > 10_000, daemon.log()[-2000:]
    with daemon.client() as c:  # and it serves as before
        assert c.generate("heap", [1, 2, 3], max_tokens=2).token_ids


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_the_io_thread_yields_the_cpu_to_the_engine_thread(daemon):
    """Under a flood the cores are all busy: the I/O thread (the process's main thread) runs
    at a higher nice value, so the engine thread is scheduled first; no other thread (the
    engine, the store's writers) is lowered."""
    nice = {tid: _nice(daemon.pid, tid) for tid in map(int, os.listdir(f"/proc/{daemon.pid}/task"))}
    assert nice.pop(daemon.pid) == _nice(os.getpid(), os.getpid()) + 10, nice
    assert nice and set(nice.values()) == {_nice(os.getpid(), os.getpid())}, nice


def _nice(pid: int, tid: int) -> int:
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19: nice


def test_freezing_the_heap_keeps_later_garbage_collectable():
    from agentkv.daemon.service.heap import freeze_startup_heap

    try:
        assert freeze_startup_heap() > 0
        ring = [None]
        ring[0] = ring  # a cycle made after the freeze
        probe = weakref.ref(_Cyclic(ring))
        gc.collect()
        assert probe() is None
    finally:
        gc.unfreeze()


class _Cyclic:
    def __init__(self, other) -> None:
        self.me, self.other = self, other


def test_requests_past_a_clients_bounds_are_refused_at_once(daemon):
    """A burst of requests from one client that reads only afterwards: PEER_MAX_PENDING run
    at a time, the rest are refused with `overloaded` at once; replies past its socket
    queue are dropped and counted (it was not reading); others are served meanwhile."""
    with daemon.client() as c:
        c.generate("burst-big", random_tokens(np.random.default_rng(1), 4000, VOCAB), max_tokens=1)
        dropped = c.stats()["admission"]["dropped_replies"]
        sock = _dealer(daemon.socket)
        try:
            n = 400
            for i in range(n):
                header = msgpack.packb({"id": i, "agent_id": "burst-big"})
                sock.send_multipart([MAGIC, b"inspect", header])
            assert c.stats()["pid"] == daemon.pid  # served during the burst
            codes = _collect(sock, n, timeout=20.0)
        finally:
            sock.close(linger=0)
        admission = c.stats()["admission"]
    assert set(codes) <= {"ok", "overloaded"}, codes
    assert codes.get("overloaded", 0) > 0 and codes.get("ok", 0) > 0, codes
    assert sum(codes.values()) + admission["dropped_replies"] - dropped == n, (codes, admission)


def test_turns_not_finished_are_bounded_per_client(daemon):
    """Turns queued on one agent: past MAX_TURNS_PER_CLIENT not finished the next submit is
    refused with Overloaded; once they are cancelled, turns are accepted again."""
    from agentkv.daemon.service.commands import MAX_TURNS_PER_CLIENT

    with daemon.client() as c:
        uids = [c.submit("queue", [5, 6, 7], max_tokens=4000)]
        with pytest.raises(Overloaded):  # some may finish meanwhile: submit until refused
            for _ in range(4 * MAX_TURNS_PER_CLIENT):
                uids.append(c.submit("queue", [8], max_tokens=1))
        assert len(uids) >= MAX_TURNS_PER_CLIENT
        with daemon.client() as other:  # another client is not affected
            other.generate("not-queued", [5, 6], max_tokens=2)
        for uid in uids:
            c.cancel(uid)
        deadline = time.monotonic() + 60
        finished = set()
        while len(finished) < len(uids) and time.monotonic() < deadline:
            finished |= {e.uid for e in c.step(timeout=1.0) if e.finished}
        assert finished == set(uids)
        assert c.generate("queue", [9], max_tokens=1).finish_reason in ("length", "stop")


def test_oversized_fields_are_refused_by_size(daemon):
    """A 2 MB agent id (or any request but submit over 64 KiB) is refused by the I/O thread;
    the daemon's memory does not grow with thousands of them."""
    sock = _dealer(daemon.socket)
    junk = "x" * (2 * MiB)
    try:
        sock.send_multipart([MAGIC, b"stats", msgpack.packb({"id": 1, "agent_id": junk})])
        sock.send_multipart(
            [MAGIC, b"submit", msgpack.packb({"id": 2, "agent_id": junk, "tokens": [1]})]
        )
        raw = [_recv(sock) for _ in range(2)]
        replies = [protocol.decode(frames) for frames in raw]
        codes = [r.header["error"]["code"] if not r.header["ok"] else "ok" for r in replies]
        assert codes == ["too_large", "invalid_request"], codes
        # A refusal's cost does not grow with the field: no 2 MB repr in a 2 MB error reply.
        assert all(sum(map(len, frames)) < 1024 for frames in raw), [len(f[2]) for f in raw]
        before = _rss(daemon.pid)
        frames = [MAGIC, b"stats", msgpack.packb({"id": 3, "agent_id": junk})]
        for _ in range(300):
            sock.send_multipart(frames)  # blocks when the daemon stops reading: bounded
        codes = _collect(sock, 300, timeout=30.0)
        assert set(codes) == {"too_large"}, codes
        assert _rss(daemon.pid) - before < 200 * MiB
    finally:
        sock.close(linger=0)


def test_soak_short(daemon_factory, loaded_models):
    """~20 s: 8 streaming clients, 20 misbehaving ones. Generous bounds for a shared 2-core
    box (alone, its max gap is already up to ~15x the median there): the max gap within
    30x the median, the median within 8x the same streamers' median with nobody
    misbehaving (before the bounds: seconds per token, a ~100x slowdown)."""
    _soak(
        daemon_factory,
        loaded_models,
        clients=8,
        seconds=20.0,
        big_tokens=6000,
        gap_ratio=30.0,
        slowdown=8.0,
    )


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="5-minute soak: AGENTKV_FULL=1")
def test_soak_full(daemon_factory, loaded_models):
    """The issue's soak: 16 streaming clients, 20 misbehaving ones, 5 minutes."""
    _soak(
        daemon_factory,
        loaded_models,
        clients=16,
        seconds=300.0,
        big_tokens=20000,
        gap_ratio=3.0,
        slowdown=3.0,
    )


# -- the soak ----------------------------------------------------------------------------


@dataclass
class _Streamer:
    """One well-behaved client's record."""

    index: int
    turns: dict = field(default_factory=dict)  # agent -> [(prompt, merged Event)]
    inflight: dict = field(default_factory=dict)  # agent -> prompt of the unfinished turn
    gaps: list = field(default_factory=list)  # (when, seconds since the previous token)
    error: BaseException | None = None


def _soak(
    daemon_factory,
    loaded_models,
    *,
    clients,
    seconds,
    big_tokens,
    gap_ratio,
    slowdown,
    misbehaving=20,
) -> None:
    model, tokenizer = loaded_models["llama"]
    d = daemon_factory(args=ARGS)
    d.start()
    with d.client(timeout=120.0) as c:
        rng = np.random.default_rng(0)
        c.generate("big", random_tokens(rng, big_tokens, VOCAB), max_tokens=1)
    # The measuring process holds two loaded models: its own full collections (50-120 ms
    # with the GIL held) would stall every streamer thread and show up as daemon gaps.
    gc.collect()
    gc.freeze()
    stop = threading.Event()
    streamers = [_Streamer(i) for i in range(clients)]
    threads = [threading.Thread(target=_stream, args=(d, s, stop)) for s in streamers]
    for t in threads:
        t.start()
    time.sleep(2.0)  # warm: every streamer decoding
    calm = time.monotonic()
    time.sleep(4.0)  # the baseline: the same streamers, nobody misbehaving
    rss = _RssSampler(d.pid)
    base = _rss(d.pid)
    began = time.monotonic()
    child = subprocess.run(
        [sys.executable, str(CHILD), d.socket, str(seconds), "big", str(misbehaving)],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    ended = time.monotonic()
    assert child.returncode == 0, child.stderr
    with d.client(timeout=60.0) as c:
        admission = c.stats().get("admission", {})
    time.sleep(1.0)
    stop.set()
    os.kill(d.pid, 9)  # kill -9 at the end, streamers still decoding
    for t in threads:
        t.join(60)
    peak = rss.stop()
    gc.unfreeze()
    calm_gaps = _gaps(streamers, calm, began)
    gaps = _gaps(streamers, began, ended)
    median, worst = statistics.median(gaps), gaps[-1]
    calm_median = statistics.median(calm_gaps)
    print(
        f"\nsoak {seconds:.0f}s, {clients} streamers: misbehaving {child.stdout.strip()}; "
        f"admission {admission}; RSS {base / MiB:.0f} -> peak {peak / MiB:.0f} MiB; "
        f"alone: {_describe(calm_gaps)}; misbehaving: {_describe(gaps)}"
    )
    assert all(s.error is None for s in streamers), [s.error for s in streamers]
    assert admission.get("refused", 0) > 0 and admission["dropped_replies"] > 0, admission
    assert peak - base < RSS_GROWTH_BOUND, (base, peak)
    assert d.wait_exit(10)
    _check_resume(d, model, eos_ids(tokenizer), streamers)  # before the timing bounds
    assert len(gaps) > 50 * clients, len(gaps)
    assert worst <= gap_ratio * median, (median, worst)
    assert median <= slowdown * calm_median, (calm_median, median)


def _stream(d, s: _Streamer, stop: threading.Event) -> None:
    """Turns on the client's own agents until `stop` or the daemon dies; every token's
    arrival time recorded (`step` without interval: each token as soon as it exists)."""
    rng = np.random.default_rng(100 + s.index)
    try:
        with d.client(timeout=10.0) as c:
            n = 0
            while not stop.is_set():
                agent = f"w{s.index}-{n // TURNS_PER_AGENT}"
                prompt = random_tokens(rng, 5, VOCAB)
                s.inflight[agent] = prompt
                event = _turn(c, agent, prompt, s.gaps)
                del s.inflight[agent]
                s.turns.setdefault(agent, []).append((prompt, event))
                n += 1
    except DaemonUnavailable as exc:
        if not stop.is_set():  # before the kill -9: a well-behaved client was not served
            s.error = exc
    except BaseException as exc:
        s.error = exc


def _turn(c, agent: str, prompt: list[int], gaps: list):
    uid = c.submit(agent, prompt, max_tokens=TURN_TOKENS)
    merged, last = None, None
    while True:
        for event in c.step(timeout=1.0):
            assert event.uid == uid, event
            now = time.monotonic()
            if event.token_ids:
                if last is not None:
                    gaps.append((now, now - last))
                last = now
            if merged is None:
                merged = event
            else:
                merged.token_ids += event.token_ids
                merged.finish_reason, merged.usage = event.finish_reason, event.usage
            if merged.finished:
                assert merged.finish_reason in ("length", "stop"), merged
                return merged


def _check_resume(d, model, eos: set, streamers: list[_Streamer]) -> None:
    """After the kill -9: every finished turn is in its agent's context (plus, at most, the
    turn in flight, which may have finished unseen); the latest agent of a few clients
    resumes exactly."""
    d.start()
    rng = np.random.default_rng(7)
    with d.client(timeout=60.0) as c:
        for s in streamers:
            assert s.turns, f"client {s.index} finished no turn"
            for agent, turns in s.turns.items():
                context = c.inspect(agent)["token_ids"]
                kept = _turns_length(turns, eos)
                assert d.holds_turns(context[:kept], turns, eos), (agent, len(context), kept)
                extra = context[kept:]
                if extra:  # finished in the daemon, not yet seen by the client
                    prompt = s.inflight.get(agent)
                    assert prompt is not None and extra[: len(prompt)] == prompt, agent
        for s in streamers[:4]:
            agent = max(s.turns, key=lambda a: int(a.rsplit("-", 1)[1]))
            context = c.inspect(agent)["token_ids"]
            nxt = random_tokens(rng, 3, VOCAB)
            got = c.generate(agent, nxt, max_tokens=TURN_TOKENS)
            want = scratch_tokens(model, context + nxt, TURN_TOKENS, eos=eos)
            assert got.token_ids == want, agent


def _gaps(streamers: list[_Streamer], start: float, end: float) -> list[float]:
    return sorted(g for s in streamers for when, g in s.gaps if start <= when <= end)


def _describe(gaps: list[float]) -> str:
    median, p99 = statistics.median(gaps), gaps[int(0.99 * (len(gaps) - 1))]
    return (
        f"{len(gaps)} gaps, median {median * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
        f"max {gaps[-1] * 1e3:.1f} ms ({gaps[-1] / median:.1f}x median)"
    )


def _turns_length(turns, eos) -> int:
    return sum(len(p) + len(e.token_ids) + (e.finish_reason == "stop") for p, e in turns)


# -- helpers -----------------------------------------------------------------------------


class _RssSampler:
    """The daemon's peak RSS, sampled every 0.1 s on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, _rss(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.1):
            try:
                self.peak = max(self.peak, _rss(self.pid))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no VmRSS")


def _dealer(endpoint: str):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _recv(sock, timeout: float = 10.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), "no reply"
    return sock.recv_multipart()


def _collect(sock, n: int, timeout: float) -> dict[str, int]:
    """Read up to n replies; counts by error code ("ok" for a success)."""
    codes: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    for _ in range(n):
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(left * 1000)):
            break
        header = protocol.decode(sock.recv_multipart()).header
        code = "ok" if header["ok"] else header["error"]["code"]
        codes[code] = codes.get(code, 0) + 1
    return codes
