"""Daemon overhead: decode tokens/s through a real daemon + Client against the in-process engine.

One model directory (default: the benchmark model, a ~5 M-parameter random llama, float32;
`--model DIR` for another) is served by a real daemon started as a subprocess with
`daemonctl start` (a temp `--store` and an ipc `--socket` under /tmp; always stopped at the
end), and loaded in this process into a `BlockPoolBatchEngine` built by the daemon's own
`process._make_engine` with the same `DaemonOptions` (pool from the 1 GiB memory budget,
512-token prefill chunks, a `CacheStore` writing every turn back, MLX cache limit raised to
the pool size): same model, same engine settings. Three measurements:

1. Decode tokens/s at 1, 8 and 32 agents decoding concurrently. Seeded prompts (random
   non-special token ids, 64-128 tokens each), greedy, the same max_tokens (256 at one
   agent, so that its window is long enough to time; 64 otherwise); each run uses fresh
   agent ids. In-process: every prompt submitted, then `step_once()` looped until idle.
   Daemon: one thread and one `Client` per agent (an orchestrator's agents are
   independent), released together by a barrier; each submits its turn and calls
   `step(timeout=1.0, interval=...)` until its final event, in two modes: "daemon" with
   the interval `Client.stream` uses (STREAM_INTERVAL_S, 20 ms: the daemon answers a step
   at most that often, so a reply carries several tokens at one agent), the target's
   mode; and "daemon, per token" with interval 0 (a reply per token, one round trip per
   token: reported, no target). Decode window, the same for all (as in bench_engine): it
   opens when the last agent receives its first token and closes when the last agent
   receives its last one; tokens/s = tokens received inside the window / window seconds
   (the daemon holds a turn's final event until its write-back is durable; the tokens
   themselves are not held, so the window does not include that wait). Prompts whose
   greedy continuation would hit EOS within max_tokens are redrawn (checked in process),
   and the daemon's tokens are compared with the in-process ones. Runs are interleaved,
   the order of the three rotating each repeat, after one untimed run of each per config;
   medians. Target: daemon / in-process >= 0.90 at every config.
2. Round trip of an empty `step` (`step(timeout=0)` from a client with nothing pending) and,
   for comparison, of `stats`, interleaved, on an idle daemon; and of the empty step while 8
   agents decode 128 tokens each (--quick: 64), probes at random 0-50 ms pauses, those inside
   the decode window kept (the engine thread answers between batch steps). p50/p99.
3. Inter-token gap of a decoding agent while another agent prefills a long prompt (8,000
   tokens; --quick: 2,048) on the same daemon, which prefills in 512-token chunks between
   decode steps. The gap is the time between consecutive `step` replies that carry the
   decoding agent's tokens (one client, stepping continuously). Baseline: the same agent
   decoding alone just before. During: from the long prompt's submit until its turn's final
   event (prefill, its tokens, its commit and write-back). Compared with the time of one
   prefill chunk, timed in this process on the same model (a 512-token forward over a cache
   holding that chunk's offset of random K/V, as BatchGenerator runs a chunk: cache states
   evaluated): the first chunk and the longest (the last full one). Target: the largest gap
   <= 1.25 x (longest chunk + the baseline median gap), i.e. one prefill chunk per decode
   step at most.

Usage: python scripts/bench_daemon.py [--quick] [--agents 1 8 32] [--out bench/daemon.json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from agentkv.client import Client
from agentkv.client.client import STREAM_INTERVAL_S
from agentkv.daemon.engine.model_factory import ensure_random_model
from agentkv.daemon.service.process import DaemonOptions, _make_engine

TARGET = 0.90
GAP_SLACK = 1.25
PROMPT_LEN = (64, 128)
BUSY_AGENTS = 8
FULL = {
    "agents": [1, 8, 32],
    "repeats": 9,
    "max_tokens": 64,
    "max_tokens_one": 256,
    "roundtrips": 2000,
    "prefill": 8000,
    "baseline_tokens": 48,
    "chunk_repeats": 2,
    "busy_tokens": 128,
}
QUICK = {
    "agents": [1, 8],
    "repeats": 3,
    "max_tokens": 32,
    "max_tokens_one": 96,
    "roundtrips": 300,
    "prefill": 2048,
    "baseline_tokens": 24,
    "chunk_repeats": 1,
    "busy_tokens": 64,
}


@dataclass(slots=True)
class Run:
    """One generation run of every prompt to max_tokens.

    Attributes:
        kind: "in-process" or "daemon".
        agents: concurrent agents.
        prefill_s: start of the run to the opening of the decode window.
        decode_s: the decode window.
        decode_tokens: tokens received inside the window.
        total_tokens: tokens received in the whole run.
        opened: `time.perf_counter()` at the opening of the window.
        outputs: generated token ids per prompt, in prompt order.
    """

    kind: str
    agents: int
    prefill_s: float
    decode_s: float
    decode_tokens: int
    total_tokens: int
    opened: float
    outputs: list[list[int]] = field(repr=False)

    @property
    def decode_tps(self) -> float:
        """Decode tokens per second."""
        return self.decode_tokens / self.decode_s


@dataclass(slots=True)
class Row:
    """Medians over the repeats of one config."""

    agents: int
    repeats: int
    max_tokens: int
    inprocess_tps: float
    daemon_tps: float
    ratio: float
    per_token_tps: float
    per_token_ratio: float
    inprocess_prefill_s: float
    daemon_prefill_s: float
    ms_per_step_inprocess: float
    ms_per_step_daemon: float
    decode_tokens: int
    identical_tokens: bool


def window(kind: str, start: float, arrivals: list[list[tuple[float, int]]], outputs) -> Run:
    """The decode window over per-agent token arrivals `(time, tokens)`."""
    if any(not a for a in arrivals):
        raise RuntimeError(f"{kind}: an agent received no token")
    opened = max(a[0][0] for a in arrivals)
    closed = max(a[-1][0] for a in arrivals)
    inside = sum(n for a in arrivals for t, n in a if t > opened)
    return Run(
        kind=kind,
        agents=len(arrivals),
        prefill_s=opened - start,
        decode_s=closed - opened,
        decode_tokens=inside,
        total_tokens=sum(n for a in arrivals for _, n in a),
        opened=opened,
        outputs=outputs,
    )


def make_prompts(n: int, seed: int, low: int, high: int) -> list[list[int]]:
    """`n` prompts of 64-128 token ids drawn from [low, high)."""
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(rng.randint(*PROMPT_LEN))] for _ in range(n)]


def run_inprocess(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> Run:
    """Every prompt through the in-process engine, one fresh agent per prompt."""
    start, arrivals, outputs = _drive(engine, prompts, max_tokens, tag)
    return window("in-process", start, arrivals, outputs)


def _drive(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple:
    """Submit every prompt, step until idle; the start time, token arrivals and outputs."""
    arrivals: list[list[tuple[float, int]]] = [[] for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    index = {
        engine.submit(f"{tag}-{i}", p, max_tokens=max_tokens, temperature=0.0): i
        for i, p in enumerate(prompts)
    }
    while engine.has_work:
        events = engine.step_once()
        now = time.perf_counter()
        for e in events:
            i = index[e.uid]
            if e.token is not None:
                arrivals[i].append((now, 1))
                outputs[i].append(e.token)
            if e.completion is not None and e.completion.finish_reason == "error":
                raise RuntimeError(f"in-process request failed: {e.completion.error}")
    # Untimed: the last turns' write-back, so that it does not overlap the next run (the
    # daemon reports a turn finished only once it is written, so its runs end flushed).
    engine.store.flush()
    return start, arrivals, outputs


def run_daemon(
    endpoint: str, prompts: list[list[int]], max_tokens: int, tag: str, interval: float = 0.0
) -> Run:
    """Every prompt through the daemon: one thread and one Client per agent, each stepping
    with `interval` (0: a reply per token)."""
    n = len(prompts)
    barrier = threading.Barrier(n + 1)
    arrivals: list[list[tuple[float, int]]] = [[] for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []

    def agent(i: int) -> None:
        try:
            with Client(endpoint, timeout=120.0) as c:
                barrier.wait()
                uid = c.submit(f"{tag}-{i}", prompts[i], max_tokens=max_tokens, temperature=0.0)
                while not _collect(c, uid, arrivals[i], outputs[i], interval):
                    pass
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a thread failed: see below
        barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"daemon run failed: {errors[0]!r}") from errors[0]
    return window("daemon", start, arrivals, outputs)


def _collect(c: Client, uid: int, arrivals: list, tokens: list[int], interval: float) -> bool:
    """One `step`: record this request's tokens; True once its final event arrived."""
    events = c.step(timeout=1.0, interval=interval)
    now = time.perf_counter()
    for e in events:
        if e.uid != uid:
            continue
        if e.token_ids:
            arrivals.append((now, len(e.token_ids)))
            tokens += e.token_ids
        if e.finished:
            if e.finish_reason == "error":
                raise RuntimeError(f"daemon request failed: {e.error}")
            return True
    return False


def pick_prompts(engine, n: int, max_tokens: int, seed: int) -> tuple[list[list[int]], int]:
    """Seeded prompts whose greedy continuations run to max_tokens without EOS.

    Checked in process (greedy outputs do not depend on the batch); the first check runs
    every prompt, so it doubles as the config's in-process warm-up. Returns the prompts and
    how many were redrawn.
    """
    low = max(engine.tokenizer.all_special_ids or [0]) + 1
    high = engine.spec.vocab_size
    prompts = make_prompts(n, seed, low, high)
    check, replaced = list(range(n)), 0
    for attempt in range(1, 20):
        tag = f"pick{seed}-{attempt}"
        _, _, outputs = _drive(engine, [prompts[i] for i in check], max_tokens, tag)
        bad = [i for i, out in zip(check, outputs, strict=True) if len(out) < max_tokens]
        if not bad:
            return prompts, replaced
        for i, p in zip(bad, make_prompts(len(bad), seed + 1000 * attempt, low, high), strict=True):
            prompts[i] = p
        check, replaced = bad, replaced + len(bad)
    raise RuntimeError("could not find prompts free of EOS; lower --max-tokens")


KINDS = ("in-process", "daemon", "daemon, per token")


def bench_config(engine, endpoint: str, n: int, plan: dict, seed: int) -> tuple[Row, dict]:
    """Interleaved in-process / daemon / daemon-per-token repeats at `n` concurrent agents
    (the order rotates every repeat)."""
    max_tokens = plan["max_tokens_one"] if n == 1 else plan["max_tokens"]
    prompts, replaced = pick_prompts(engine, n, max_tokens, seed)
    run_daemon(endpoint, prompts, max_tokens, f"w{n}")  # warm-up: the daemon's batch shapes
    runs: dict[str, list[Run]] = {k: [] for k in KINDS}
    for rep in range(plan["repeats"]):
        for kind in KINDS[rep % 3 :] + KINDS[: rep % 3]:
            tag = f"r{n}-{rep}-{KINDS.index(kind)}"
            if kind == "in-process":
                run = run_inprocess(engine, prompts, max_tokens, tag)
            else:
                interval = STREAM_INTERVAL_S if kind == "daemon" else 0.0
                run = run_daemon(endpoint, prompts, max_tokens, tag, interval)
            runs[kind].append(run)
    ip, dm, pt = (runs[k] for k in KINDS)
    med = statistics.median
    ip_tps, dm_tps = med(r.decode_tps for r in ip), med(r.decode_tps for r in dm)
    pt_tps = med(r.decode_tps for r in pt)
    row = Row(
        agents=n,
        repeats=plan["repeats"],
        max_tokens=max_tokens,
        inprocess_tps=round(ip_tps, 1),
        daemon_tps=round(dm_tps, 1),
        ratio=round(dm_tps / ip_tps, 3),
        per_token_tps=round(pt_tps, 1),
        per_token_ratio=round(pt_tps / ip_tps, 3),
        inprocess_prefill_s=round(med(r.prefill_s for r in ip), 3),
        daemon_prefill_s=round(med(r.prefill_s for r in dm), 3),
        ms_per_step_inprocess=round(med(_ms_per_step(r) for r in ip), 2),
        ms_per_step_daemon=round(med(_ms_per_step(r) for r in dm), 2),
        decode_tokens=ip[0].decode_tokens,
        identical_tokens=all(r.outputs == ip[0].outputs for r in ip + dm + pt),
    )
    detail = {
        "prompts_replaced_for_eos": replaced,
        "prompt_lengths": [len(p) for p in prompts],
        "inprocess_tps_runs": [round(r.decode_tps, 1) for r in ip],
        "daemon_tps_runs": [round(r.decode_tps, 1) for r in dm],
        "per_token_tps_runs": [round(r.decode_tps, 1) for r in pt],
        "decode_tokens_runs": {k: [r.decode_tokens for r in v] for k, v in runs.items()},
    }
    return row, detail


def _ms_per_step(run: Run) -> float:
    """Window seconds per token of one agent: the batch step time when all decode."""
    return run.decode_s / (run.decode_tokens / run.agents) * 1e3


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """p50, p99, max and mean of samples in seconds, as milliseconds."""
    s = sorted(samples_s)
    if not s:
        return {"n": 0}

    def pick(q: float) -> float:
        return s[min(len(s) - 1, round(q * (len(s) - 1)))]

    return {
        "n": len(s),
        "p50_ms": round(pick(0.50) * 1e3, 3),
        "p99_ms": round(pick(0.99) * 1e3, 3),
        "max_ms": round(s[-1] * 1e3, 3),
        "mean_ms": round(statistics.fmean(s) * 1e3, 3),
    }


def round_trips(endpoint: str, n: int) -> dict:
    """Empty `step` and `stats` round trips on an idle daemon, interleaved."""
    step_s, stats_s = [], []
    with Client(endpoint, timeout=30.0) as c:
        for _ in range(max(10, n // 20)):  # warm-up
            c.step(timeout=0)
            c.stats()
        for _ in range(n):
            t0 = time.perf_counter()
            c.step(timeout=0)
            t1 = time.perf_counter()
            c.stats()
            t2 = time.perf_counter()
            step_s.append(t1 - t0)
            stats_s.append(t2 - t1)
    return {"empty_step": percentiles(step_s), "stats": percentiles(stats_s)}


def busy_round_trips(endpoint: str, prompts: list[list[int]], max_tokens: int) -> dict:
    """Empty `step` round trips while `len(prompts)` agents decode on the daemon.

    Probes are 0-50 ms apart (seeded random pauses, so that they do not lock onto the batch
    steps' phase), taking little CPU from the daemon; only those inside the decode window
    count (prefill steps are longer).
    """
    done = threading.Event()
    box: dict = {}

    def decode() -> None:
        try:
            box["run"] = run_daemon(endpoint, prompts, max_tokens, "busy")
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    probes: list[tuple[float, float]] = []
    pause = random.Random(len(prompts))
    with Client(endpoint, timeout=30.0) as c:
        thread = threading.Thread(target=decode, daemon=True)
        thread.start()
        while not done.is_set():
            t0 = time.perf_counter()
            c.step(timeout=0)
            probes.append((t0, time.perf_counter()))
            time.sleep(pause.uniform(0.0, 0.05))
        thread.join()
    if "error" in box:
        raise RuntimeError(f"busy run failed: {box['error']!r}") from box["error"]
    run = box["run"]
    closed = run.opened + run.decode_s
    samples = [b - a for a, b in probes if a >= run.opened and b <= closed]
    return {
        "agents": len(prompts),
        "empty_step": percentiles(samples),
        "decode_tps": round(run.decode_tps, 1),
        "ms_per_step": round(_ms_per_step(run), 2),
    }


def pick_decoder(engine, max_tokens: int, seed: int) -> list[int]:
    """A prompt whose greedy continuation runs `max_tokens` tokens without EOS."""
    prompts, _ = pick_prompts(engine, 1, max_tokens, seed)
    return prompts[0]


def gap_test(endpoint: str, decoder: list[int], plan: dict, seed: int, vocab: int) -> dict:
    """Gaps between a decoding agent's token replies, alone and during a long prefill."""
    rng = random.Random(seed)
    long_prompt = [rng.randrange(8, vocab) for _ in range(plan["prefill"])]
    replies: list[tuple[float, int]] = []
    with Client(endpoint, timeout=120.0) as c:
        d_uid = c.submit("gap-decoder", decoder, max_tokens=plan["decoder_tokens"])
        got = 0
        while got < plan["baseline_tokens"] + 1:
            got += _gap_step(c, d_uid, replies, {})
        p_submit = time.perf_counter()
        p_uid = c.submit("gap-prefill", long_prompt, max_tokens=2, temperature=0.0)
        p_state: dict = {"uid": p_uid}
        while "final" not in p_state:
            _gap_step(c, d_uid, replies, p_state)
            if p_state.get("decoder_done"):
                raise RuntimeError("the decoding agent finished before the prefill; raise tokens")
        c.cancel(d_uid)
        while not p_state.get("decoder_done"):
            _gap_step(c, d_uid, [], p_state)
    times = [t for t, _ in replies]
    base = [b - a for a, b in itertools.pairwise(times) if b <= p_submit]
    during = [b - a for a, b in itertools.pairwise(times) if b > p_submit]
    usage = p_state["final"].usage or {}
    return {
        "prefill_tokens": plan["prefill"],
        "baseline": percentiles(base),
        "during": percentiles(during),
        "decoder_tokens_during": sum(n for t, n in replies if t > p_submit),
        "prefill_first_token_s": round(p_state["first"] - p_submit, 3),
        "prefill_final_event_s": round(p_state["final_at"] - p_submit, 3),
        "prefill_usage": usage,
    }


def _gap_step(c: Client, d_uid: int, replies: list, p_state: dict) -> int:
    """One step of the gap test: records the decoder's replies and the prefill's events."""
    events = c.step(timeout=1.0)
    now = time.perf_counter()
    got = 0
    for e in events:
        if e.uid == d_uid:
            if e.token_ids:
                replies.append((now, len(e.token_ids)))
                got += len(e.token_ids)
            if e.finished:
                p_state["decoder_done"] = True
        elif e.uid == p_state.get("uid"):
            if e.token_ids and "first" not in p_state:
                p_state["first"] = now
            if e.finished:
                if e.finish_reason == "error":
                    raise RuntimeError(f"prefill request failed: {e.error}")
                p_state["final"], p_state["final_at"] = e, now
    return got


def chunk_times(model, prefill: int, chunk: int, repeats: int, seed: int) -> dict:
    """Seconds of one prefill chunk: the first, the last full one and the last (partial) one.

    BatchGenerator prefills all of a prompt but its last token in `chunk`-token pieces; a
    piece is timed as it runs one: the model over its tokens on top of a cache holding its
    offset of rows (random K/V: only shapes matter), cache states evaluated, MLX's buffer
    cache cleared after. "longest" is the slowest of them.
    """
    n = prefill - 1
    last = (n - 1) // chunk * chunk
    plan = {"first": (0, min(chunk, n)), "last_full": (max(0, n // chunk - 1) * chunk, chunk)}
    plan["last"] = (last, n - last)
    rng = random.Random(seed)
    tokens = mx.array([[rng.randrange(8, 700) for _ in range(chunk)]])
    out: dict = {"chunk_tokens": chunk, "chunks": -(-n // chunk)}
    _time_chunk(model, tokens, 0)  # warm-up
    for name, (offset, size) in plan.items():
        samples = [_time_chunk(model, tokens[:, :size], offset) for _ in range(repeats)]
        out[name] = {"offset": offset, "tokens": size, "s": round(statistics.median(samples), 3)}
    out["longest"] = max((out[k] for k in plan), key=lambda c: c["s"])
    return out


def _time_chunk(model, tokens: mx.array, offset: int) -> float:
    """Seconds of one prefill chunk on top of `offset` cached rows."""
    cache = make_prompt_cache(model)
    if offset:
        _fill(cache, offset, model)
    tic = time.perf_counter()
    model(tokens, cache=cache)
    mx.eval([c.state for c in cache])
    seconds = time.perf_counter() - tic
    del cache
    mx.clear_cache()
    return seconds


def _fill(cache: list, offset: int, model) -> None:
    """Put `offset` rows of random K/V into each layer's KVCache."""
    probe = make_prompt_cache(model)
    model(mx.array([[8]]), cache=probe)  # shapes of K and V per layer
    for c, p in zip(cache, probe, strict=True):
        k, v, _ = p.state
        keys = mx.random.normal((*k.shape[:2], offset, k.shape[3])).astype(k.dtype)
        values = mx.random.normal((*v.shape[:2], offset, v.shape[3])).astype(v.dtype)
        c.state = (keys, values, offset)
    mx.eval([c.state[:2] for c in cache])


class Daemon:
    """A real daemon started with `daemonctl start` in a short temp dir; always stopped."""

    def __init__(self, model_dir: Path, root: Path) -> None:
        self.root = root
        self.endpoint = f"ipc://{root}/d.sock"
        self.store = root / "store"
        self.model_dir = model_dir
        self.pid: int | None = None

    def ctl(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        """`daemonctl ARGS --socket S --store D` as a subprocess."""
        cmd = [sys.executable, "-m", "agentkv.daemon.service.cli", *args]
        cmd += ["--socket", self.endpoint, "--store", str(self.store)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def __enter__(self) -> Daemon:
        got = self.ctl("start", "--json", "--model", str(self.model_dir), "--timeout", "300")
        if got.returncode != 0:
            raise RuntimeError(f"daemonctl start failed:\n{got.stdout}{got.stderr}")
        self.pid = json.loads(got.stdout)["pid"]
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.ctl("stop", "--timeout", "30", timeout=90.0)
        finally:
            if self.pid is not None and _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
    }


def describe_model(model, path: Path) -> dict[str, object]:
    """The model's size and shape, for the report."""
    args = model.args
    weights = [v for _, v in tree_flatten(model.parameters())]
    return {
        "path": str(path),
        "model_type": args.model_type,
        "hidden_size": args.hidden_size,
        "layers": args.num_hidden_layers,
        "params_m": round(sum(v.size for v in weights) / 1e6, 2),
        "dtype": str(weights[0].dtype).split(".")[-1],
    }


def verdict(rows: list[Row], gap: dict, chunks: dict) -> dict:
    """Ratios against the targets."""
    ratios = [r.ratio for r in rows]
    per_token = [r.per_token_ratio for r in rows]
    base_p50_s = gap["baseline"].get("p50_ms", 0.0) / 1e3
    bound_s = chunks["longest"]["s"] + base_p50_s
    max_gap_s = gap["during"].get("max_ms", float("inf")) / 1e3
    return {
        "target": TARGET,
        "min_ratio": min(ratios),
        "target_met": min(ratios) >= TARGET,
        "stream_interval_s": STREAM_INTERVAL_S,
        "min_ratio_per_token": min(per_token),
        "identical_tokens": all(r.identical_tokens for r in rows),
        "gap_slack": GAP_SLACK,
        "max_gap_over_chunk_plus_step": round(max_gap_s / bound_s, 3),
        "max_gap_over_baseline_p50": round(max_gap_s / base_p50_s, 1) if base_p50_s else None,
        "p99_gap_over_baseline_p50": (
            round(gap["during"]["p99_ms"] / 1e3 / base_p50_s, 1) if base_p50_s else None
        ),
        "prefill_over_max_gap": round(gap["prefill_first_token_s"] / max_gap_s, 1),
        "gap_target_met": max_gap_s <= GAP_SLACK * bound_s,
    }


def print_report(rows: list[Row], meta: dict, res: dict, rt: dict, gap: dict, chunks) -> None:
    """Print the tables and the verdicts."""
    m = meta["model"]
    word = {True: "MET", False: "NOT MET"}
    print("Daemon overhead: daemon + Client (one per agent) vs in-process engine, decode tok/s")
    print(
        f"model: {m['model_type']} {m['params_m']} M params, hidden {m['hidden_size']} x "
        f"{m['layers']} layers, {m['dtype']} ({m['path']}); greedy; prompts {PROMPT_LEN[0]}-"
        f"{PROMPT_LEN[1]} tokens (seed {meta['seed']}); both sides: the daemon's engine settings"
    )
    print(f"{meta['python']} on {meta['processor']}, {meta['cores']} cores ({meta['platform']})")
    print(f"mlx {meta['mlx']} ({meta['mlx_device']}); load average {meta['loadavg']}")
    print("decode window: last agent's first token to last agent's last token, tokens received")
    print(f"inside it / seconds; medians of {meta['repeats']} interleaved repeats after warm-ups")
    print(
        f"daemon: clients step with the stream interval ({res['stream_interval_s'] * 1e3:g} ms); "
        "per token: interval 0, a reply per token"
    )
    print(
        f"{'agents':>6} {'max_tok':>7} {'in-proc tok/s':>13} {'daemon tok/s':>12} {'ratio':>6} "
        f"{'per-token tok/s':>15} {'ratio':>6} {'ms/step i/d':>13} {'prefill i/d s':>14} "
        f"{'same':>5}"
    )
    for r in rows:
        print(
            f"{r.agents:>6} {r.max_tokens:>7} {r.inprocess_tps:>13.1f} {r.daemon_tps:>12.1f} "
            f"{r.ratio:>6.3f} {r.per_token_tps:>15.1f} {r.per_token_ratio:>6.3f} "
            f"{r.ms_per_step_inprocess:>6.1f}/{r.ms_per_step_daemon:<6.1f} "
            f"{r.inprocess_prefill_s:>6.2f}/{r.daemon_prefill_s:<7.2f} "
            f"{'yes' if r.identical_tokens else 'NO':>5}"
        )
    print(
        f"target: daemon/in-process >= {TARGET} at every config: {word[res['target_met']]} "
        f"(min {res['min_ratio']}; per token, no target: min {res['min_ratio_per_token']})"
    )
    print("\nround trip through the Client (ms):")
    for name, s in (
        ("empty step, idle daemon", rt["idle"]["empty_step"]),
        ("stats, idle daemon", rt["idle"]["stats"]),
        (f"empty step, {rt['busy']['agents']} agents decoding", rt["busy"]["empty_step"]),
    ):
        print(f"  {name:34} p50 {s['p50_ms']:8.3f}  p99 {s['p99_ms']:8.3f}  (n={s['n']})")
    print(f"  (batch step while {rt['busy']['agents']} decode: ~{rt['busy']['ms_per_step']} ms)")
    print_gap(gap, chunks, res)


def print_gap(gap: dict, chunks: dict, res: dict) -> None:
    """The inter-token gap table and its verdict."""
    word = {True: "MET", False: "NOT MET"}
    b, d = gap["baseline"], gap["during"]
    print(
        f"\ninter-token gap of a decoding agent (ms between step replies with its tokens), "
        f"another agent prefilling {gap['prefill_tokens']:,} tokens in "
        f"{chunks['chunk_tokens']}-token chunks ({chunks['chunks']} chunks):"
    )
    print(f"  {'':22} {'p50':>9} {'p99':>9} {'max':>9} {'n':>5}")
    for name, s in (("decoding alone", b), ("during the prefill", d)):
        cells = f"{s['p50_ms']:>9.1f} {s['p99_ms']:>9.1f} {s['max_ms']:>9.1f} {s['n']:>5}"
        print(f"  {name:22} {cells}")
    print(
        f"  one prefill chunk (in process): first {chunks['first']['s'] * 1e3:.1f} ms, longest "
        f"(offset {chunks['longest']['offset']}) {chunks['longest']['s'] * 1e3:.1f} ms; whole "
        f"prefill to first token {gap['prefill_first_token_s']} s"
    )
    print(
        f"  max gap / (longest chunk + baseline p50 gap) = "
        f"{res['max_gap_over_chunk_plus_step']} (target <= {GAP_SLACK}: "
        f"{word[res['gap_target_met']]}); max gap / baseline p50 = "
        f"{res['max_gap_over_baseline_p50']}; prefill / max gap = {res['prefill_over_max_gap']}"
    )


def run_all(args, plan: dict, model_dir: Path, root: Path) -> dict:
    """Engine in process, daemon as a subprocess; every measurement; daemon stopped after."""
    # The daemon's own engine factory and options (all defaults but the paths): the same
    # pool, prefill chunk, store and MLX cache limit as the daemon. Socket and store are
    # given so that the defaults' factories (which create directories) do not run.
    opts = DaemonOptions(model=str(model_dir), store=root / "inproc", socket="ipc:///unused")
    engine = _make_engine(opts, {})
    try:
        decoder = pick_decoder(engine, plan["decoder_tokens"], args.seed + 99)
        busy_prompts, _ = pick_prompts(engine, BUSY_AGENTS, plan["busy_tokens"], args.seed + 77)
        rows, details = [], {}
        with Daemon(model_dir, root) as daemon:
            for n in plan["agents"]:
                print(f"decode: {n} agent(s) ...", file=sys.stderr, flush=True)
                row, details[str(n)] = bench_config(engine, daemon.endpoint, n, plan, args.seed + n)
                rows.append(row)
            print("round trips ...", file=sys.stderr, flush=True)
            rt = {"idle": round_trips(daemon.endpoint, plan["roundtrips"])}
            rt["busy"] = busy_round_trips(daemon.endpoint, busy_prompts, plan["busy_tokens"])
            print(f"gap: {plan['prefill']}-token prefill ...", file=sys.stderr, flush=True)
            gap = gap_test(daemon.endpoint, decoder, plan, args.seed, engine.spec.vocab_size)
        loadavg = os.getloadavg()
        print("timing prefill chunks in process ...", file=sys.stderr, flush=True)
        chunks = chunk_times(
            engine.model, plan["prefill"], opts.prefill_step_size, plan["chunk_repeats"], args.seed
        )
        model = describe_model(engine.model, model_dir)
    finally:
        engine.close()
    return {
        "rows": rows,
        "details": details,
        "rt": rt,
        "gap": gap,
        "chunks": chunks,
        "model": model,
        "loadavg": loadavg,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables, write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 8 agents, 2K prefill")
    parser.add_argument("--agents", type=int, nargs="+", help="concurrent agents")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per config")
    parser.add_argument("--max-tokens", type=int, help="tokens generated per agent")
    parser.add_argument("--prefill", type=int, help="long prompt of the gap test, in tokens")
    parser.add_argument("--model", type=Path, help="model dir (default: the embedded model)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp"), help="temp root (short path)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/daemon.json"))
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("agents", "repeats", "max_tokens", "prefill"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if args.max_tokens is not None:
        plan["max_tokens_one"] = args.max_tokens
    if plan["repeats"] < 1 or plan["max_tokens"] < 2 or min(plan["agents"]) < 1:
        parser.error("--repeats >= 1, --max-tokens >= 2, --agents >= 1")
    if plan["prefill"] < 1025:
        parser.error("--prefill > 1024 (at least two full chunks)")
    # The decoder gets a token per chunk: room for every chunk, several times over.
    plan["decoder_tokens"] = plan["baseline_tokens"] + 4 * -(-plan["prefill"] // 512) + 64

    # SIGTERM unwinds like Ctrl-C, so the daemon is stopped and the temp dir removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.perf_counter()
    loadavg = os.getloadavg()
    model_dir = (args.model or ensure_random_model()).expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="akv-", dir=args.dir) as tmp:
        got = run_all(args, plan, model_dir, Path(tmp))
    meta = machine() | {
        "model": got["model"],
        "seed": args.seed,
        "repeats": plan["repeats"],
        "plan": plan,
        "loadavg": [[round(x, 2) for x in la] for la in (loadavg, got["loadavg"])],
        "quick": args.quick,
        "details": got["details"],
    }
    res = verdict(got["rows"], got["gap"], got["chunks"])
    print_report(got["rows"], meta, res, got["rt"], got["gap"], got["chunks"])
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    report = {"experiment": "daemon-overhead", "meta": meta, "result": res}
    report |= {"rows": [asdict(r) for r in got["rows"]], "roundtrip": got["rt"]}
    report |= {"gap": got["gap"], "chunks": got["chunks"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
