"""Restoring an 8K-token agent from the CacheStore, against the floors and the alternatives.

Model: a ~30 M-parameter llama built in memory with mlx-lm's own classes (hidden 512 x 8
layers, 8 heads, 4 KV heads of dim 64, float32, random init: no training needed), i.e. 16 KiB
of K+V per token, ~125 MiB for the 8,000-token agent (31 full 256-token blocks plus a 64-token
tail). The agent is written synthetically, the way the engine writes one after a turn: random
K/V of the model's cache shapes go through `KVCacheManager.admit`/`commit` into pool blocks,
then `persistence.turn_record` and `CacheStore.save_turn` (31 block files plus the state file
holding the tail), so no 8K-token prefill is needed to make it.

Compared in the same run, interleaved run by run, with the same bytes:

- ours: the engine-side restore after a restart, from disk to injectable caches:
  `persistence.restore` (one K and V buffer per layer allocated by MLX; every block file
  read with scatter reads straight into its rows of those buffers and checksum verified,
  files in parallel on the store's reader threads; then the state file) and
  `rebuild_caches`, which wraps the buffers as mlx-lm caches. The index lookup
  (`store.agent`) is timed apart.
- (a) plain read: open + read() of every file the restore reads, in the same order, the
  bytes kept in memory until the run ends (a restore holds the whole context at once).
- (a1) plain read of mlx-lm's one file (below): one file against 32, same reader.
- (b) mlx-lm: `load_prompt_cache` + `mx.eval` of the same cache saved once with mlx-lm's
  `save_prompt_cache` (one file per agent, no checksum).
- (b2) (b) followed by an xxh3 over the loaded arrays: what mlx-lm's load would cost if it
  verified its bytes as ours does (reported, no target).
- (e) `mx.load` of the per-block files (no checksum, no rebuild): the per-block format read
  by the reader (b) uses, so that (e) against (b) is per-block files against one file.
- (f) the floor of ours' block reads: the same scatter reads of every block file into its
  rows of one new buffer, on as many threads as the store's readers, with nothing else (no
  header parsed, nothing checked, rows and data offsets worked out untimed); (f2) the same
  plus an xxh3 over each file's rows, as ours verifies them. (f2) against (b) is the least
  a verified per-block restore can cost here; ours against (f2) is what our own code adds.
- (c) cold prefill of the same context: timed for real at the full size (8,000 tokens by
  default, in the engine's 2048-token chunks; once, it takes a while). Prefills of shorter
  prompts (512 and 1024 tokens) are timed too and extrapolated to the full size, linearly
  and with a fitted per-token plus attention term, to show how far off an extrapolation
  would be. --quick skips the full-size prefill: (c) is then the fitted extrapolation from
  256 and 512 tokens, labelled as such.

Four regimes, page cache x memory. Page cache: warm (every file read once before, and by
the runs before) or dropped (`os.sync()`, then `posix_fadvise(DONTNEED)` on every file a case
reads, before each of its runs; whether that really drops is judged from (a)'s times).
Memory: fresh (MLX's buffer cache cleared before each run, default cache limit, and glibc's
mmap threshold pinned at 1 MiB (see fix_malloc_threshold): every buffer is new memory,
page-faulted in, as for the first restore after a start) or reused (MLX's
cache limit raised as the daemon raises it to the pool's size, nothing cleared: buffers freed
by the run before are reused, as in a daemon that has run a while). The restored caches and
mlx-lm's are checked equal to the originals, element for element.

Targets: ours <= 1.5x (a) and ours <= 1.2x (b), i.e. per-block files must not make restore
slower than one file per agent. The prefill ratio is reported. If ours misses a target, a
cProfile run splits its time (read, checksum, conversion to mx.array, rebuild).

With `--model PATH` (a model dir or GGUF file, e.g. SmolLM2-135M-Instruct: 30 layers, 3 KV
heads of dim 64, 45 KiB of float32 K+V per token) the agent has that model's cache shapes
instead, and (c) prefills that model.

Usage: python scripts/bench_restore.py [--quick] [--tokens 8000] [--model PATH]
    [--out bench/restore.json]
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import io
import json
import os
import platform
import pstats
import resource
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import xxhash
from bench_ttft import model_size  # a sibling script: scripts/ is on sys.path
from mlx_lm.models.cache import KVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_lm.utils import _get_classes

from agentkv.daemon.engine import persistence
from agentkv.daemon.engine.agents import AgentCache, AgentContext
from agentkv.daemon.engine.block_pool import BlockPool
from agentkv.daemon.engine.host_fill import host_view, new_unzeroed
from agentkv.daemon.engine.kv_blocks import rebuild_caches
from agentkv.daemon.engine.kv_cache_manager import KVCacheManager
from agentkv.daemon.engine.model_factory import load_model, model_config
from agentkv.daemon.engine.spec import ModelCacheSpec
from agentkv.storage import CacheStore, StoredAgent

TARGET_READ = 1.5
TARGET_MLXLM = 1.2
BLOCK_SIZE = 256
PREFILL_STEP = 2048  # the engine's default prefill chunk
AGENT = "bench-agent"
MODEL = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "intermediate_size": 1792,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
FULL = {"repeats": 9, "prefill": [512, 1024], "prefill_repeats": 2, "prefill_full": True}
QUICK = {"repeats": 3, "prefill": [256, 512], "prefill_repeats": 1, "prefill_full": False}
OURS = "ours: restore + rebuild_caches"
READ = "(a) plain read, the same block files"  # 32 files for the default 8,000 tokens
READ_ONE = "(a1) plain read, mlx-lm's 1 file"
MLXLM = "(b) mlx-lm load_prompt_cache"
MXLOAD = "(e) mx.load of the block files only"
MLXLM_CHECKED = "(b2) (b) + xxh3 of its bytes"
BARE = "(f) bare scatter reads of the blocks"
BARE_HASHED = "(f2) (f) + xxh3 of the rows"
REGIMES = ("warm/fresh", "warm/reused", "dropped/fresh", "dropped/reused")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20
REUSED_CACHE_LIMIT = 4 * 2**30  # above what any case allocates (the daemon: the pool's size)


@dataclass(slots=True)
class Case:
    """One timed way of getting the agent's bytes off the disk.

    Attributes:
        name: what the table calls it.
        files: every file it reads (dropped from the page cache in the dropped regime).
        prepare: untimed set-up; its result is handed to `run`.
        run: the timed part; returns what it built, evaluated.
    """

    name: str
    files: list[Path]
    prepare: Callable[[], object]
    run: Callable[[object], object]


@dataclass(slots=True)
class Row:
    """One case in one regime; times in ms."""

    regime: str
    case: str
    runs: int
    median_ms: float
    min_ms: float
    max_ms: float
    gb_per_s: float
    minor_faults: float
    samples_ms: list[float] = field(repr=False)


def bench_model(seed: int):
    """The ~30 M-parameter llama, built in memory (random init; only its shapes matter)."""
    config = model_config("llama", "small") | MODEL
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def random_caches(spec: ModelCacheSpec, n_tokens: int, seed: int) -> list[KVCache]:
    """Per-layer KVCaches holding `n_tokens` rows of random K/V of the model's shapes."""
    key = mx.random.key(seed)
    caches = []
    for layer in spec.layers:
        key, k_key, v_key = mx.random.split(key, 3)
        shape = (1, layer.n_kv_heads, n_tokens)
        keys = mx.random.normal((*shape, layer.k_head_dim), key=k_key)
        values = mx.random.normal((*shape, layer.v_head_dim), key=v_key)
        cache = KVCache()
        cache.state = (keys, values, n_tokens)
        caches.append(cache)
    mx.eval([c.state[:2] for c in caches])
    return caches


def write_agent(root: Path, spec: ModelCacheSpec, caches: list, tokens: list[int]) -> None:
    """Write the agent as the engine does after a turn: pool blocks, turn record, store."""
    pool = BlockPool(spec, total_blocks=len(tokens) // BLOCK_SIZE + 4)
    manager = KVCacheManager(spec, pool)
    agent = AgentContext(AGENT)
    adm = manager.admit(agent, tokens, max_tokens=1)
    if adm is None:
        raise RuntimeError("the pool cannot hold the agent")
    manager.commit(agent, adm, tokens, caches)
    store = CacheStore(root)
    store.register_model(spec.fingerprint, model_id=spec.model_type, block_size=BLOCK_SIZE)
    layout = persistence.layout_meta(spec, BLOCK_SIZE)
    store.save_turn(persistence.turn_record(spec, store, agent, layout))
    store.close()  # flushes: files fsynced and indexed


def agent_files(store: CacheStore, stored: StoredAgent) -> list[Path]:
    """The files a restore reads, in its order: blocks, then the state file."""
    files = [store.block_path(h) for h in stored.block_hashes]
    return files + ([store.root / stored.state_file] if stored.state_file else [])


def restore_ours(spec: ModelCacheSpec, store: CacheStore, stored: StoredAgent, pool) -> list:
    """The engine's restore: files straight into per-layer buffers, wrapped as mlx-lm caches."""
    agent = AgentContext(AGENT, AgentCache(tokens=tuple(stored.tokens)))
    cache = persistence.restore(spec, pool, store, agent, stored)
    got = cache.restored if cache is not None else 0
    if got != stored.stored_tokens:
        raise RuntimeError(f"restored {got} of {stored.stored_tokens} tokens")
    return rebuild_caches(
        spec, [], cache.cached_len, cache.windows, cache.states, full=cache.restored_full
    )


def plain_read(files: Sequence[Path]) -> list[bytes]:
    """open + read() of every file, all kept in memory (as any restore must hold them).

    Dropping each file's bytes before reading the next would recycle one cache-hot buffer
    (~2x faster here), a speed no restore of the whole context can have.
    """
    out = []
    for path in files:
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def mlxlm_load(path: Path) -> list:
    """mlx-lm's own prompt-cache load, evaluated."""
    cache = load_prompt_cache(str(path))
    mx.eval([c.state for c in cache])
    return cache


def mlxlm_load_checked(path: Path) -> list:
    """(b), then an xxh3 over every loaded array: what verifying mlx-lm's file would add."""
    cache = mlxlm_load(path)
    h = xxhash.xxh3_64()
    for c in cache:
        for a in c.state[:2]:
            h.update(memoryview(np.array(a, copy=False)))
    h.hexdigest()
    return cache


def mxload_files(files: Sequence[Path]) -> list:
    """`mx.load` of every file, evaluated: no checksum, no per-layer buffers."""
    loaded = [mx.load(str(path)) for path in files]
    mx.eval([list(arrays.values()) for arrays in loaded])
    return loaded


@dataclass(slots=True)
class BarePlan:
    """(f)'s untimed set-up: one new buffer, and per block file its data offset and rows."""

    blob: mx.array
    reads: list[tuple[Path, int, list[memoryview]]]


def bare_plan(spec: ModelCacheSpec, store: CacheStore, stored: StoredAgent) -> BarePlan:
    """The buffer and rows ours would fill (its own layout code), each file's data offset."""
    layout, nbytes = persistence._buffer_layout(spec, stored.stored_tokens)
    blob = new_unzeroed(nbytes)
    dest_of = persistence._block_dests(layout, host_view(blob), BLOCK_SIZE)
    reads = []
    for b, digest in enumerate(stored.block_hashes):
        path = store.block_path(digest)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        reads.append((path, 8 + header_len, dest_of(b).runs))
    return BarePlan(blob, reads)


def bare_reads(plan: BarePlan, readers: ThreadPoolExecutor, hashed: bool) -> mx.array:
    """(f) / (f2): every block file's data read into its rows, files on `readers`."""

    def one(item: tuple[Path, int, list[memoryview]]) -> None:
        path, offset, rows = item
        fd = os.open(path, os.O_RDONLY)
        try:
            got = os.preadv(fd, rows, offset)
        finally:
            os.close(fd)
        if got != sum(len(r) for r in rows):
            raise RuntimeError(f"short read of {path}")
        if hashed:
            h = xxhash.xxh3_64()
            for r in rows:
                h.update(r)
            h.intdigest()

    list(readers.map(one, plan.reads))
    return plan.blob


def drop_page_cache(files: Sequence[Path]) -> None:
    """Write back dirty pages, then ask the kernel to drop these files' cached pages."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def set_up_run(case: Case, regime: str) -> object:
    """Untimed: the case's set-up, then the regime's memory and page-cache conditions."""
    state = case.prepare()
    gc.collect()
    if regime.endswith("/fresh"):
        mx.clear_cache()
    if regime.startswith("dropped/"):
        drop_page_cache(case.files)
    return state


def time_case(case: Case, regime: str) -> tuple[float, int]:
    """One timed run of a case: seconds, and minor page faults (fresh pages touched)."""
    state = set_up_run(case, regime)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    result = case.run(state)
    elapsed = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    del result, state
    return elapsed, faults


def memory_regime(regime: str) -> int:
    """Set MLX's cache limit for the regime (and start it empty); returns the old limit."""
    mx.clear_cache()
    if regime.endswith("/reused"):
        return mx.set_cache_limit(REUSED_CACHE_LIMIT)
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


def bench_cases(cases: list[Case], repeats: int) -> list[Row]:
    """Every case in every regime, interleaved run by run (case order rotated each round)."""
    rows = []
    for regime in REGIMES:
        default_limit = memory_regime(regime)
        for case in cases:  # warm-up: the page cache, the code paths, reusable buffers
            time_case(case, regime.replace("dropped/", "warm/"))
        samples: dict[str, list[float]] = {c.name: [] for c in cases}
        faults: dict[str, list[int]] = {c.name: [] for c in cases}
        for rep in range(repeats):
            shift = rep % len(cases)
            for case in cases[shift:] + cases[:shift]:
                seconds, minflt = time_case(case, regime)
                samples[case.name].append(seconds * 1e3)
                faults[case.name].append(minflt)
        mx.set_cache_limit(default_limit)
        for case in cases:
            ms = samples[case.name]
            med = statistics.median(ms)
            nbytes = sum(path.stat().st_size for path in case.files)
            rows.append(
                Row(
                    regime,
                    case.name,
                    len(ms),
                    round(med, 2),
                    round(min(ms), 2),
                    round(max(ms), 2),
                    round(nbytes / med / 1e6, 2),
                    statistics.median(faults[case.name]),
                    [round(x, 2) for x in ms],
                )
            )
    return rows


def same_arrays(a: list, b: list) -> bool:
    """Two lists of KVCaches hold identical keys, values and offsets."""
    return all(
        x.offset == y.offset
        and mx.array_equal(x.keys, y.keys).item()
        and mx.array_equal(x.values, y.values).item()
        for x, y in zip(a, b, strict=True)
    )


def prefill_seconds(model, n: int, seed: int) -> float:
    """Seconds to prefill `n` random tokens into fresh caches (chunks of PREFILL_STEP)."""
    tokens = mx.array(np.random.default_rng(seed).integers(8, 768, size=n).tolist())
    cache = make_prompt_cache(model)
    start = time.perf_counter()
    for i in range(0, n, PREFILL_STEP):
        model(tokens[None, i : i + PREFILL_STEP], cache=cache)
        mx.eval([c.state for c in cache])
    return time.perf_counter() - start


def attention_work(n: int) -> int:
    """Query x key pairs a chunked prefill of `n` tokens computes: n^2 for one chunk."""
    return sum(
        min(PREFILL_STEP, n - start) * min(start + PREFILL_STEP, n)
        for start in range(0, n, PREFILL_STEP)
    )


def bench_prefill(
    model, lengths: list[int], repeats: int, target: int, seed: int, full: bool
) -> dict:
    """Median prefill time per length, two extrapolations to `target` tokens, and with
    `full` the real prefill of `target` tokens (timed once).

    Linear: the longest measured prompt's tokens/s. Fitted: least squares of
    t = a*n + b*attention_work(n) through the measured points (per-token work plus attention,
    which grows with the context; chunks of PREFILL_STEP tokens as the engine prefills).
    `target_s` is what (c) reports: the measured time, or without `full` the fitted one.
    """
    prefill_seconds(model, 32, seed)  # warm-up
    times = {n: [] for n in lengths}
    for rep in range(repeats):
        for n in lengths:
            times[n].append(prefill_seconds(model, n, seed + rep))
    med = {n: statistics.median(t) for n, t in times.items()}
    longest = max(lengths)
    linear = med[longest] * target / longest
    x = np.array([[n, attention_work(n)] for n in lengths], dtype=np.float64)
    (a, b), *_ = np.linalg.lstsq(x, np.array([med[n] for n in lengths]), rcond=None)
    # A negative attention term is noise (too few or too short prompts): stay linear.
    fitted = a * target + b * attention_work(target) if b > 0 else linear
    measured = prefill_seconds(model, target, seed + repeats) if full else None
    return {
        "target_s": round(measured if full else fitted, 2),
        "target_how": "measured" if full else "extrapolated (--quick)",
        "target_measured_s": None if measured is None else round(measured, 2),
        "measured_s": {str(n): round(s, 3) for n, s in med.items()},
        "tokens_per_s": {str(n): round(n / s, 1) for n, s in med.items()},
        "target_tokens": target,
        "linear_estimate_s": round(linear, 2),
        "fitted_estimate_s": round(fitted, 2),
        "fit": {"a_s_per_token": a, "b_s_per_query_key": b, "chunk": PREFILL_STEP},
        "samples_s": {str(n): [round(s, 3) for s in t] for n, t in times.items()},
    }


# Where ours spends its time: (label, file name or "~" for built-ins, function, column).
SPLITS = (
    ("one unzeroed buffer (mx.load)", "host_fill.py", "new_unzeroed", "cumtime"),
    ("block files (read+checksum, threads)", "store.py", "read_blocks_into", "cumtime"),
    ("per-layer views of the buffer", "persistence.py", "_layer_arrays", "cumtime"),
    ("state file (tail, windows)", "store.py", "read_state", "cumtime"),
    ("tail rows copy", "persistence.py", "_fill_tail", "cumtime"),
    ("rebuild_caches (wrap)", "kv_blocks.py", "rebuild_caches", "cumtime"),
    ("total", "bench_restore.py", "restore_ours", "cumtime"),
)


def profile_ours(case: Case, regime: str, runs: int, top: int) -> tuple[dict, str]:
    """cProfile `runs` runs of ours; returns ms per run by stage, and the top functions.

    Times are under the profiler, which inflates the Python-heavy stages ("other" most).
    """
    prof = cProfile.Profile()
    default_limit = memory_regime(regime)
    time_case(case, regime.replace("dropped/", "warm/"))
    for _ in range(runs):
        state = set_up_run(case, regime)
        prof.enable()
        result = case.run(state)
        prof.disable()
        del result, state
    mx.set_cache_limit(default_limit)
    stats = pstats.Stats(prof, stream=io.StringIO())
    found: dict[str, float] = {}
    for (path, _, name), (_, _, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        for label, file, func, column in SPLITS:
            if name == func and (file == "~" or Path(path).name == file):
                value = tottime if column == "tottime" else cumtime
                found[label] = found.get(label, 0.0) + value * 1e3 / runs
    known = sum(v for k, v in found.items() if k != "total")
    found["other (Python, pool; cProfile)"] = found.get("total", 0.0) - known
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    return {k: round(v, 2) for k, v in found.items()}, out.getvalue()


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def verdict(rows: list[Row], prefill: dict | None) -> dict:
    """Ratios against the targets, per regime."""
    med = {(r.regime, r.case): r.median_ms for r in rows}
    out: dict = {"target_vs_read": TARGET_READ, "target_vs_mlxlm": TARGET_MLXLM}
    met = True
    for regime in REGIMES:
        ours = med[(regime, OURS)]
        vs_read = ours / med[(regime, READ)]
        vs_mlxlm = ours / med[(regime, MLXLM)]
        met = met and vs_read <= TARGET_READ and vs_mlxlm <= TARGET_MLXLM
        out[regime] = {
            "ours_ms": ours,
            "ours_over_read": round(vs_read, 2),
            "ours_over_mlxlm": round(vs_mlxlm, 2),
            "read_target_met": vs_read <= TARGET_READ,
            "mlxlm_target_met": vs_mlxlm <= TARGET_MLXLM,
            "read_32_over_read_1": round(med[(regime, READ)] / med[(regime, READ_ONE)], 2),
            "mxload_32_over_mlxlm": round(med[(regime, MXLOAD)] / med[(regime, MLXLM)], 2),
            "ours_over_mlxlm_checked": round(ours / med[(regime, MLXLM_CHECKED)], 2),
            "bare_over_mlxlm": round(med[(regime, BARE)] / med[(regime, MLXLM)], 2),
            "floor_over_mlxlm": round(med[(regime, BARE_HASHED)] / med[(regime, MLXLM)], 2),
            "ours_over_floor": round(ours / med[(regime, BARE_HASHED)], 2),
        }
        if prefill is not None:
            out[regime]["prefill_over_ours"] = round(prefill["target_s"] * 1e3 / ours)
            out[regime]["prefill_how"] = prefill["target_how"]
    drop_ratio = med[("dropped/fresh", READ)] / med[("warm/fresh", READ)]
    out["dropped_over_warm_read"] = round(drop_ratio, 2)
    out["dontneed_dropped"] = drop_ratio >= 2.0
    out["target_met"] = met
    return out


def print_rows(rows: list[Row], meta: dict) -> None:
    """The header lines and the table."""
    m = meta["model"]
    print("Restore of one agent from disk to injectable mlx-lm caches (medians, ms)")
    print(
        f"model: llama {m['params_m']} M params, hidden {m['hidden_size']} x {m['layers']} "
        f"layers, {m['kv_heads']} KV heads x {m['head_dim']}, float32; agent "
        f"{meta['tokens']:,} tokens = {meta['blocks']} blocks of {BLOCK_SIZE} + "
        f"{meta['tail']}-token tail; {meta['mib']:.1f} MiB K+V in {meta['files']} files"
    )
    print(f"{meta['python']} on {meta['processor']}, {meta['cores']} cores ({meta['platform']})")
    print(
        f"mlx {meta['mlx']} ({meta['mlx_device']}); GLIBC_TUNABLES={meta['glibc_tunables']!r}; "
        f"{meta.get('malloc', '')}"
    )
    print(f"load average (start, after restores, end): {meta['loadavg']}")
    print(
        f"{meta['repeats']} interleaved runs per case and regime (page cache / memory: see the "
        f"docstring); index lookup (store.agent), not in ours: {meta['lookup_ms']} ms"
    )
    print(
        f"{'regime':14} {'case':36} {'median':>8} {'min':>8} {'max':>8} {'GB/s':>6} {'minflt':>7}"
    )
    for r in rows:
        print(
            f"{r.regime:14} {r.case:36} {r.median_ms:>8.1f} {r.min_ms:>8.1f} "
            f"{r.max_ms:>8.1f} {r.gb_per_s:>6.2f} {r.minor_faults:>7.0f}"
        )


def print_report(rows: list[Row], meta: dict, prefill: dict | None, result: dict) -> None:
    """Print the table, the prefill estimate and the verdict."""
    print_rows(rows, meta)
    if prefill is not None:
        print_prefill(prefill, meta["tokens"])
    drop = "yes" if result["dontneed_dropped"] else "NO: dropped reads are not slower"
    print(f"DONTNEED dropped the page cache: {drop} ((a) dropped/warm x", end="")
    print(f"{result['dropped_over_warm_read']}, fresh memory)")

    def word(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    for regime in REGIMES:
        v = result[regime]
        print(
            f"{regime:14} ours/(a) {v['ours_over_read']:.2f} (target <= {TARGET_READ}: "
            f"{word(v['read_target_met'])}); ours/(b) {v['ours_over_mlxlm']:.2f} (target <= "
            f"{TARGET_MLXLM}: {word(v['mlxlm_target_met'])})"
        )
        line = (
            f"{'':14} per-block vs one file: (a)/(a1) {v['read_32_over_read_1']:.2f}, "
            f"(e)/(b) {v['mxload_32_over_mlxlm']:.2f}; ours/(b2) {v['ours_over_mlxlm_checked']:.2f}"
        )
        if prefill is not None:
            line += f"; prefill/ours x{v['prefill_over_ours']} (prefill {v['prefill_how']})"
        print(line)
        print(
            f"{'':14} floor: bare reads (f)/(b) {v['bare_over_mlxlm']:.2f}, verified "
            f"(f2)/(b) {v['floor_over_mlxlm']:.2f} (the least a verified per-block restore "
            f"costs here); ours/(f2) {v['ours_over_floor']:.2f}"
        )
    print(f"restored caches equal to the originals: {meta['checks']}")


def print_prefill(prefill: dict, tokens: int) -> None:
    """(c): the full-size prefill, measured or (--quick) extrapolated, and the short ones."""
    short = ", ".join(f"{n} tok {s} s" for n, s in prefill["measured_s"].items())
    estimates = (
        f"extrapolated from those {prefill['linear_estimate_s']} s (linear from the longest) / "
        f"{prefill['fitted_estimate_s']} s (fit a*n + b*attention pairs)"
    )
    if prefill["target_measured_s"] is not None:
        print(
            f"(c) cold prefill of {tokens:,} tokens, measured: {prefill['target_measured_s']} s "
            f"({PREFILL_STEP}-token chunks); shorter prompts {short}; {estimates}"
        )
    else:
        print(
            f"(c) cold prefill of {tokens:,} tokens, EXTRAPOLATED (--quick, not run at full "
            f"size): {prefill['target_s']} s; measured {short}; {estimates}"
        )


def print_profile(splits: dict, texts: dict, runs: int) -> None:
    """Where ours spends its time, per regime, and the warm cProfile listing."""
    print(f"\nwhere ours spends its time (ms per run, {runs} cProfiled runs per regime):")
    print(f"  {'stage':30}" + "".join(f"{regime:>16}" for regime in REGIMES))
    for label in splits[REGIMES[0]]:
        cells = "".join(f"{splits[regime].get(label, 0.0):>16.1f}" for regime in REGIMES)
        print(f"  {label:30}{cells}")
    print(f"\ncProfile of ours, warm/fresh, by own time:\n{texts['warm/fresh']}")


def describe_model(model, spec: ModelCacheSpec) -> dict:
    """The model's size and cache shape, for the report."""
    args = model.args
    layer = spec.layers[0]
    return {
        "model_type": args.model_type,
        "hidden_size": args.hidden_size,
        "layers": args.num_hidden_layers,
        "kv_heads": layer.n_kv_heads,
        "head_dim": layer.k_head_dim,
        "params_m": round(model_size(model)[0] / 1e6, 1),
        "dtype": model_size(model)[1],
        "bytes_per_token": spec.bytes_per_token,
    }


def make_cases(spec, store: CacheStore, stored: StoredAgent, mlxlm_file: Path) -> list[Case]:
    """The timed cases, all over the same agent."""
    files = agent_files(store, stored)
    n_blocks = len(stored.block_hashes) + 2
    block_files = files[: len(stored.block_hashes)]
    readers = ThreadPoolExecutor(min(4, os.cpu_count() or 1))  # as many as the store's

    def nothing() -> None:
        return None

    return [
        Case(
            OURS,
            files,
            lambda: BlockPool(spec, total_blocks=n_blocks),  # fresh: no block is in memory
            lambda pool: restore_ours(spec, store, stored, pool),
        ),
        Case(READ, files, nothing, lambda _: plain_read(files)),
        Case(READ_ONE, [mlxlm_file], nothing, lambda _: plain_read([mlxlm_file])),
        Case(MLXLM, [mlxlm_file], nothing, lambda _: mlxlm_load(mlxlm_file)),
        Case(MXLOAD, files, nothing, lambda _: mxload_files(files)),
        Case(MLXLM_CHECKED, [mlxlm_file], nothing, lambda _: mlxlm_load_checked(mlxlm_file)),
        Case(
            BARE,
            block_files,
            lambda: bare_plan(spec, store, stored),
            lambda plan: bare_reads(plan, readers, hashed=False),
        ),
        Case(
            BARE_HASHED,
            block_files,
            lambda: bare_plan(spec, store, stored),
            lambda plan: bare_reads(plan, readers, hashed=True),
        ),
    ]


def run_store_cases(args, plan: dict, spec, tokens: list[int], root: Path) -> dict:
    """Write the agent and mlx-lm's file under `root`, check, time and profile the cases."""
    original = random_caches(spec, args.tokens, args.seed)
    write_agent(root / "store", spec, original, tokens)
    mlxlm_file = root / "agent.safetensors"
    save_prompt_cache(str(mlxlm_file), original)
    store = CacheStore(root / "store")
    try:
        tic = time.perf_counter()
        stored = store.agent(AGENT, spec.fingerprint)
        lookup_ms = round((time.perf_counter() - tic) * 1e3, 2)
        assert stored is not None
        cases = make_cases(spec, store, stored, mlxlm_file)
        ours = cases[0]
        checks = {
            "ours": same_arrays(ours.run(ours.prepare()), original),
            "mlx_lm": same_arrays(mlxlm_load(mlxlm_file), original),
        }
        rows = bench_cases(cases, args.repeats or plan["repeats"])
        loadavg = os.getloadavg()
        splits, texts = {}, {}
        for regime in REGIMES:
            splits[regime], texts[regime] = profile_ours(ours, regime, args.profile_runs, args.top)
    finally:
        store.close()
    return {
        "rows": rows,
        "checks": checks,
        "lookup_ms": lookup_ms,
        "files": len(ours.files),
        "loadavg": loadavg,
        "splits": splits,
        "texts": texts,
    }


def fix_malloc_threshold() -> str:
    """Pin glibc's mmap threshold, so that "fresh" memory is fresh for every case.

    glibc raises its threshold (up to 32 MiB) after freeing a large block, and from then on
    serves smaller buffers (mlx-lm's ~8 MiB per-layer arrays, the plain reads' 4 MiB
    bytes) from its heap, already faulted in: whether a case got fresh memory then depended
    on what ran before it. A fixed threshold (1 MiB) keeps every buffer of 1 MiB or more
    an mmap of its own, returned on free. Returns what was done, for the report.
    """
    if sys.platform != "linux":
        return "not Linux: glibc threshold left alone"
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError) as exc:
        return f"mallopt unavailable ({exc})"
    return f"mallopt(M_MMAP_THRESHOLD, {MMAP_THRESHOLD})" + ("" if ok else " refused")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON report."""
    malloc = fix_malloc_threshold()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 runs; (c) extrapolated from short prefills"
    )
    parser.add_argument("--tokens", type=int, default=8000, help="the agent's context")
    parser.add_argument("--model", type=Path, help="a model dir or GGUF file for the shapes")
    parser.add_argument("--repeats", type=int, help="interleaved runs per case and regime")
    parser.add_argument("--no-prefill", action="store_true", help="skip (c)")
    parser.add_argument("--profile-runs", type=int, default=3, help="cProfiled runs of ours")
    parser.add_argument("--top", type=int, default=12, help="profile rows to print")
    parser.add_argument("--dir", type=Path, help="where to build the store (default: a tmpdir)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/restore.json"))
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.tokens <= BLOCK_SIZE or (args.repeats is not None and args.repeats < 1):
        parser.error(f"--tokens > {BLOCK_SIZE}, --repeats >= 1")

    started = time.perf_counter()
    loadavg = [os.getloadavg()]
    model = bench_model(args.seed) if args.model is None else load_model(args.model)[0]
    spec = ModelCacheSpec.from_model(model, block_size=BLOCK_SIZE)
    tokens = np.random.default_rng(args.seed).integers(8, 768, size=args.tokens).tolist()
    with tempfile.TemporaryDirectory(prefix="bench-restore-", dir=args.dir) as tmp:
        got = run_store_cases(args, plan, spec, tokens, Path(tmp))
    loadavg.append(got["loadavg"])
    prefill = None
    if not args.no_prefill:
        reps = plan["prefill_repeats"]
        full = plan["prefill_full"]
        prefill = bench_prefill(model, plan["prefill"], reps, args.tokens, args.seed, full)
    loadavg.append(os.getloadavg())
    meta = machine() | {
        "model": describe_model(model, spec) | {"path": str(args.model or "built in memory")},
        "tokens": args.tokens,
        "blocks": args.tokens // BLOCK_SIZE,
        "tail": args.tokens % BLOCK_SIZE,
        "files": got["files"],
        "mib": spec.bytes_per_token * args.tokens / 2**20,
        "repeats": got["rows"][0].runs,
        "lookup_ms": got["lookup_ms"],
        "loadavg": [[round(x, 2) for x in la] for la in loadavg],
        "checks": got["checks"],
        "quick": args.quick,
        "malloc": malloc,
    }
    result = verdict(got["rows"], prefill)
    print_report(got["rows"], meta, prefill, result)
    print_profile(got["splits"], got["texts"], args.profile_runs)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    report = {"experiment": "restore", "meta": meta, "result": result, "prefill": prefill}
    report["rows"] = [asdict(r) for r in got["rows"]]
    report["profile"] = {"splits_ms": got["splits"], "text": got["texts"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
