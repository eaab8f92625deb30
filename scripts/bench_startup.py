"""Startup: `CacheStore(root)`, and the daemon's whole start but its weights, until ready.

The index is built synthetically: the schema comes from `storage.schema.open_index` (the
product's migrations), then every row is inserted with plain sqlite3 in one transaction: one
model, 10,000 agents of 10 full 256-token blocks each plus a tail (their token ids as the
int32 blob the store keeps, ~10 KiB per agent), 100,000 `agent_blocks` rows and 100,000
`blocks` rows (unique hashes, refcount 1). No block or state file exists: opening a store
reads the index only (it loads every block hash into memory and starts the writer thread), so
files would not change what is timed; the first lookup (`store.agent`) reads the index only
too.

Timed, each run:

- store: `CacheStore(root)` from the call to its return (ready: lookups and writes
  accepted); then the first `store.agent(id, fingerprint)` of a random agent on that fresh
  store.
- daemon: what the daemon's start does besides loading the weights (`process._make_engine`,
  with `DaemonOptions` defaults), on the tiny random llama (loaded once, untimed): the model
  directory's fingerprint, `ModelCacheSpec.from_model` (a one-token probe), the `BlockPool`
  (the default 1 GiB memory budget), MLX's cache limit, `CacheStore(root)` and the engine
  (which registers the model with the store). Weights of a real model take longer to load;
  everything else here does not grow with them, except the pool's block count.

`close()` is outside the timers. Two page-cache regimes, alternating run by run: warm (the
index was just read) and dropped (`os.sync()`, then `posix_fadvise(DONTNEED)` on index.db
and its WAL before the open). Medians over the runs.

Target: store open <= 0.5 s (median, both regimes). The daemon row is reported, no target.

Usage: python scripts/bench_startup.py [--quick] [--agents 10000] [--out bench/startup.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from agentkv.daemon import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from agentkv.daemon.engine.fingerprint import model_fingerprint
from agentkv.daemon.engine.model_factory import build_model_dir, load_model
from agentkv.daemon.service.process import DaemonOptions
from agentkv.storage import CacheStore
from agentkv.storage.records import pack_tokens
from agentkv.storage.schema import open_index

TARGET_S = 0.5
BLOCK_SIZE = 256
BLOCK_BYTES = 2 * 2**20 + 4096  # a 2 MiB block file plus its header (the size is not read)
FINGERPRINT = "bench" + "0" * 27
FULL = {"agents": 10_000, "blocks_per_agent": 10, "repeats": 9}
QUICK = {"agents": 10_000, "blocks_per_agent": 10, "repeats": 3}
REGIMES = ("warm", "dropped")
STAGES = ("fingerprint", "spec", "pool", "store", "engine")  # the daemon row, in order
# Columns named explicitly: columns added later with defaults keep their defaults.
MODEL_COLUMNS = ("fingerprint", "model_id", "config", "block_size", "created")
AGENT_COLUMNS = (
    "agent_id", "fingerprint", "tokens", "token_count", "stored_tokens", "state_file",
    "state_checksum", "created", "last_used", "pinned",
)  # fmt: skip
AGENT_BLOCK_COLUMNS = ("agent_id", "fingerprint", "seq", "block_hash")
BLOCK_COLUMNS = (
    "hash", "fingerprint", "path", "bytes", "checksum", "token_count", "refcount", "created",
    "last_used",
)  # fmt: skip


@dataclass(slots=True)
class Row:
    """Medians of one regime; times in ms."""

    regime: str
    runs: int
    open_ms: float
    open_min_ms: float
    open_max_ms: float
    first_lookup_ms: float
    lookup_blocks: int
    ready_ms: float  # the daemon's start without its weights
    ready_min_ms: float
    ready_max_ms: float
    ready_stages_ms: dict[str, float]  # medians per stage
    open_samples_ms: list[float] = field(repr=False)
    lookup_samples_ms: list[float] = field(repr=False)
    ready_samples_ms: list[float] = field(repr=False)


def block_hash(agent: int, seq: int) -> str:
    """A unique 64-hex-digit block hash, as long as the store's sha256 hex digests."""
    return hashlib.sha256(f"{agent}:{seq}".encode()).hexdigest()


def build_index(root: Path, n_agents: int, per_agent: int, seed: int) -> dict:
    """Create the schema with the product's migrations, then insert every row at once."""
    open_index(root / "index.db").conn.close()
    rng = np.random.default_rng(seed)
    now = time.time()
    agents, agent_blocks, blocks = [], [], []
    for a in range(n_agents):
        n_tokens = per_agent * BLOCK_SIZE + int(rng.integers(1, BLOCK_SIZE))
        tokens = pack_tokens(rng.integers(8, 768, size=n_tokens, dtype=np.int32))
        agent_id = f"agent-{a:05d}"
        state = f"agents/{hashlib.sha256(agent_id.encode()).hexdigest()[:32]}/1.safetensors"
        agents.append(
            (agent_id, FINGERPRINT, tokens, n_tokens, n_tokens, state, "xxh3_64:0", now, now, 0)
        )
        for seq in range(per_agent):
            h = block_hash(a, seq)
            agent_blocks.append((agent_id, FINGERPRINT, seq, h))
            path = f"blocks/{h[:2]}/{h}.safetensors"
            blocks.append((h, FINGERPRINT, path, BLOCK_BYTES, "xxh3_64:0", BLOCK_SIZE, 1, now, now))
    conn = sqlite3.connect(root / "index.db", isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(_insert("models", MODEL_COLUMNS), (FINGERPRINT, "llama", "", BLOCK_SIZE, now))
        conn.executemany(_insert("agents", AGENT_COLUMNS), agents)
        conn.executemany(_insert("agent_blocks", AGENT_BLOCK_COLUMNS), agent_blocks)
        conn.executemany(_insert("blocks", BLOCK_COLUMNS), blocks)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # as a cleanly stopped store leaves it
    finally:
        conn.close()
    return {"agents": len(agents), "agent_blocks": len(agent_blocks), "blocks": len(blocks)}


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def drop_page_cache(root: Path) -> None:
    """Write back dirty pages, then ask the kernel to drop the index files' cached pages."""
    os.sync()
    for name in ("index.db", "index.db-wal", "index.db-shm"):
        path = root / name
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_open(root: Path, regime: str, agent_id: str) -> tuple[float, float, int]:
    """One open: seconds to ready, seconds of the first lookup, blocks the lookup found."""
    if regime == "dropped":
        drop_page_cache(root)
    start = time.perf_counter()
    store = CacheStore(root)
    ready = time.perf_counter()
    try:
        stored = store.agent(agent_id, FINGERPRINT)
        looked = time.perf_counter()
        assert stored is not None, agent_id
        return ready - start, looked - ready, len(stored.block_hashes)
    finally:
        store.close()


def time_ready(root: Path, regime: str, model, tokenizer, model_dir: Path) -> dict[str, float]:
    """One daemon start without the weights: seconds per stage (see STAGES)."""
    opts = DaemonOptions()
    if regime == "dropped":
        drop_page_cache(root)
    times = [time.perf_counter()]
    fingerprint = model_fingerprint(model_dir)
    times.append(time.perf_counter())
    spec = ModelCacheSpec.from_model(model, block_size=opts.block_size, fingerprint=fingerprint)
    times.append(time.perf_counter())
    pool = BlockPool(spec, memory_budget=opts.memory_budget)
    pool_bytes = pool.total_blocks * pool.bytes_per_block
    mx.set_cache_limit(max(mx.set_cache_limit(pool_bytes), pool_bytes))
    times.append(time.perf_counter())
    store = CacheStore(root, disk_budget=opts.disk_budget)
    times.append(time.perf_counter())
    engine = BlockPoolBatchEngine(
        model, tokenizer, pool, spec, store=store, prefill_step_size=opts.prefill_step_size
    )
    times.append(time.perf_counter())
    engine.close()
    stages = {stage: b - a for stage, a, b in zip(STAGES, times[:-1], times[1:], strict=True)}
    return stages | {"pool_blocks": pool.total_blocks}


def bench(
    root: Path, n_agents: int, repeats: int, seed: int, model_dir: Path
) -> tuple[list[Row], int]:
    """Alternate the regimes run by run, after one untimed open and start; returns the
    rows and the pool's size in blocks."""
    rng = random.Random(seed)
    model, tokenizer = load_model(model_dir)
    time_open(root, "warm", "agent-00000")
    blocks = time_ready(root, "warm", model, tokenizer, model_dir)["pool_blocks"]
    got: dict[str, list[tuple[float, float, int]]] = {r: [] for r in REGIMES}
    ready: dict[str, list[dict[str, float]]] = {r: [] for r in REGIMES}
    for rep in range(repeats):
        order = REGIMES if rep % 2 == 0 else REGIMES[::-1]
        for regime in order:
            got[regime].append(time_open(root, regime, f"agent-{rng.randrange(n_agents):05d}"))
            ready[regime].append(time_ready(root, regime, model, tokenizer, model_dir))
    return [_row(regime, got[regime], ready[regime]) for regime in REGIMES], int(blocks)


def _row(regime: str, got: list[tuple[float, float, int]], ready: list[dict]) -> Row:
    opens = [g[0] * 1e3 for g in got]
    lookups = [g[1] * 1e3 for g in got]
    totals = [sum(r[s] for s in STAGES) * 1e3 for r in ready]
    stages = {s: round(statistics.median(r[s] for r in ready) * 1e3, 2) for s in STAGES}
    return Row(
        regime,
        len(opens),
        round(statistics.median(opens), 1),
        round(min(opens), 1),
        round(max(opens), 1),
        round(statistics.median(lookups), 2),
        got[0][2],
        round(statistics.median(totals), 1),
        round(min(totals), 1),
        round(max(totals), 1),
        stages,
        [round(x, 1) for x in opens],
        [round(x, 2) for x in lookups],
        [round(x, 1) for x in totals],
    )


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "sqlite": sqlite3.sqlite_version,
    }


def print_report(rows: list[Row], meta: dict, result: dict) -> None:
    """Print the table and the verdict."""
    counts = meta["rows"]
    print("Startup: CacheStore(root) to ready and its first lookup; the daemon's start, no weights")
    print(
        f"index: {counts['agents']:,} agents, {counts['blocks']:,} blocks, "
        f"{counts['agent_blocks']:,} agent_blocks rows; index.db {meta['index_mib']:.1f} MiB "
        f"(built in {meta['build_s']} s); no block files (opening reads the index only)"
    )
    print(f"{meta['python']} on {meta['processor']}, {meta['cores']} cores ({meta['platform']})")
    print(f"sqlite {meta['sqlite']}; load average (start, end): {meta['loadavg']}")
    print(f"{meta['repeats']} runs per regime, alternating; medians (min-max)")
    print(f"{'regime':8} {'row':34} {'ms':>9} {'min':>8} {'max':>8}")
    for r in rows:
        print(
            f"{r.regime:8} {'store: CacheStore(root) to ready':34} {r.open_ms:>9.1f} "
            f"{r.open_min_ms:>8.1f} {r.open_max_ms:>8.1f}"
        )
        print(f"{'':8} {'store: first store.agent() lookup':34} {r.first_lookup_ms:>9.2f}")
        print(
            f"{r.regime:8} {'daemon: ready, excluding weights':34} {r.ready_ms:>9.1f} "
            f"{r.ready_min_ms:>8.1f} {r.ready_max_ms:>8.1f}"
        )
        print(f"{'':8}   " + ", ".join(f"{k} {v} ms" for k, v in r.ready_stages_ms.items()))
    print(f"daemon row: {meta['daemon']}")
    word = "MET" if result["target_met"] else "NOT MET"
    print(f"target: store open <= {TARGET_S * 1e3:.0f} ms (median, both regimes): {word}", end=" ")
    print(
        f"(slowest median {result['slowest_open_ms']} ms); daemon ready excluding weights: ", end=""
    )
    print(f"slowest median {result['slowest_ready_ms']} ms (no target)")


def main(argv: Sequence[str] | None = None) -> int:
    """Build the index, run the benchmark, print the table, write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs per regime")
    parser.add_argument("--agents", type=int, help="agents in the index")
    parser.add_argument("--blocks-per-agent", type=int, help="full blocks per agent")
    parser.add_argument("--repeats", type=int, help="timed opens per regime")
    parser.add_argument("--dir", type=Path, help="where to build the index (default: a tmpdir)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/startup.json"))
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("agents", "blocks_per_agent", "repeats"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if min(plan.values()) < 1:
        parser.error("--agents, --blocks-per-agent and --repeats must be >= 1")

    started = time.perf_counter()
    loadavg = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-startup-", dir=args.dir) as tmp:
        root = Path(tmp)
        tic = time.perf_counter()
        (root / "store").mkdir()
        counts = build_index(root / "store", plan["agents"], plan["blocks_per_agent"], args.seed)
        build_s = round(time.perf_counter() - tic, 1)
        index_mib = (root / "store" / "index.db").stat().st_size / 2**20
        model_dir = build_model_dir(root / "model", "llama", seed=0)
        rows, pool_blocks = bench(
            root / "store", plan["agents"], plan["repeats"], args.seed, model_dir
        )
    loadavg.append(os.getloadavg())
    meta = machine() | {
        "rows": counts,
        "index_mib": round(index_mib, 1),
        "build_s": build_s,
        "repeats": plan["repeats"],
        "loadavg": [[round(x, 2) for x in la] for la in loadavg],
        "quick": args.quick,
        "daemon": (
            f"tiny random llama, block size {DaemonOptions().block_size}, pool of "
            f"{DaemonOptions().memory_budget / 2**30:g} GiB = {pool_blocks:,} blocks (the "
            "daemon's defaults)"
        ),
    }
    slowest = max(r.open_ms for r in rows)
    result = {"target_ms": TARGET_S * 1e3, "slowest_open_ms": slowest}
    result["slowest_ready_ms"] = max(r.ready_ms for r in rows)
    result["target_met"] = slowest <= TARGET_S * 1e3
    print_report(rows, meta, result)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    report = {"experiment": "startup", "meta": meta, "result": result}
    report["rows"] = [asdict(r) for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
