"""EXP-006: rebuilding an agent's cache from pool blocks, against a numpy copy of the same bytes.

The shape is Gemma-3-12B-like: 48 full-attention layers, 8 KV heads, head_dim 256, bfloat16,
256-token blocks, i.e. 384 KiB per token and 3 GiB of K+V for an 8K context (also 2K and 4K).
Payloads are random `BlockKV`s built directly (no model). The MLX side is `rebuild_caches(...)`
as shipped (one copy of each block into one buffer per layer and K/V: keys and values on two
streams, rows copied as 8-byte words), plus plain `mx.concatenate` per layer on one stream
(what `rebuild_caches` did before EXP-006) and on two streams. The baseline is numpy
copying the same source bytes (zero-copy uint16 views of the MLX payloads) block by block
into a preallocated `[1, H, T, D]` uint16 destination per layer and K/V, on one thread. Since
`rebuild_caches` copies keys and values on two streams (two threads on the CPU backend), the
same numpy copy on two threads (keys | values) is shown too, as the like-for-like reference.

MLX's CPU allocator keeps at most `mx.set_cache_limit` bytes of freed buffers (32 MiB by
default), so with the default limit every rebuild of a big context writes fresh memory and
pays a page fault per 4 KiB page. Both regimes are measured, each after warm-up runs, with
the cases of a regime interleaved run by run:

- "reused": cache limit raised above one rebuild's size, so MLX reuses its freed buffers (the
  steady state a daemon gets if it raises the limit); numpy copies into the same preallocated
  destination every time.
- "fresh": MLX's default cache limit (what a daemon gets unless it changes it), with numpy
  concatenating into fresh arrays as a reference.

Effective GB/s = K+V bytes of the context / p50 seconds (1 GB = 1e9 bytes).
Target: `rebuild_caches` >= 0.7x the numpy copy into a preallocated destination.

Usage: python scripts/bench_gather.py [--quick] [--contexts 2048 8192] [--out bench/gather.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from agentkv.daemon.engine.kv_blocks import BlockKV, rebuild_caches
from agentkv.daemon.engine.spec import LayerKind, LayerSpec, ModelCacheSpec

TARGET_RATIO = 0.7
FULL = {"contexts": [2048, 4096, 8192], "repeats": 8, "warmup": 1}
QUICK = {"contexts": [2048, 4096], "repeats": 5, "warmup": 1}
GIB = 1 << 30
NUMPY = "numpy copy into preallocated dst"
REBUILD = "rebuild_caches"
ONE_STREAM = "mx.concatenate, one stream"
NUMPY_FRESH = "numpy concatenate into new arrays"
NUMPY_2T = "numpy copy, 2 threads (K | V)"
TWO_STREAMS = "mx.concatenate, two streams (K | V)"
SIDE = mx.new_thread_local_stream(mx.default_device())  # values' stream in TWO_STREAMS


@dataclass(slots=True)
class Shape:
    """The cache shape being rebuilt."""

    layers: int = 48
    heads: int = 8
    head_dim: int = 256
    block_size: int = 256
    dtype: str = "bfloat16"

    @property
    def bytes_per_token(self) -> int:
        """K plus V bytes per token over all layers (2 bytes per bf16 element)."""
        return 2 * self.layers * self.heads * self.head_dim * 2


@dataclass(slots=True)
class Row:
    """One case in one regime at one context length; times in ms over the timed runs."""

    context: int
    regime: str
    case: str
    runs: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    std_ms: float
    gb_per_s: float
    faults_per_run: float


@dataclass(slots=True)
class Case:
    """A timed operation; `run` returns what it built so the timer includes its evaluation."""

    name: str
    run: Callable[[], object]


def make_spec(shape: Shape) -> ModelCacheSpec:
    """A spec with `shape.layers` full-attention layers."""
    layers = tuple(
        LayerSpec(i, LayerKind.FULL, shape.heads, shape.head_dim, shape.head_dim, shape.dtype)
        for i in range(shape.layers)
    )
    return ModelCacheSpec("bench", layers, "bench", shape.block_size)


def make_payloads(shape: Shape, n_blocks: int, seed: int) -> list[BlockKV]:
    """Random full blocks; the bits are random uint16 reinterpreted as bfloat16."""
    rng = np.random.default_rng(seed)
    dims = (1, shape.heads, shape.block_size, shape.head_dim)

    def one() -> mx.array:
        return mx.array(rng.integers(0, 1 << 16, size=dims, dtype=np.uint16)).view(mx.bfloat16)

    payloads = []
    for _ in range(n_blocks):
        keys = tuple(one() for _ in range(shape.layers))
        values = tuple(one() for _ in range(shape.layers))
        mx.eval(keys, values)
        payloads.append(BlockKV(keys, values, shape.block_size))
    return payloads


def numpy_sources(payloads: Sequence[BlockKV]) -> list[list[np.ndarray]]:
    """Per block, zero-copy uint16 views of K then V of every layer (numpy has no bf16)."""

    def view(a: mx.array) -> np.ndarray:
        return np.asarray(memoryview(a.view(mx.uint16)))

    return [[view(a) for a in (*p.keys, *p.values)] for p in payloads]


def make_cases(
    spec: ModelCacheSpec,
    payloads: Sequence[BlockKV],
    srcs: list[list[np.ndarray]],
    ctx: int,
    pool: ThreadPoolExecutor,
) -> tuple[list[Case], list[Case], list[np.ndarray]]:
    """The "reused" and "fresh" regimes' cases for one context, and numpy's destinations.

    `pool` (two threads) runs the like-for-like numpy case: rebuild_caches copies K and V on
    two streams, i.e. two threads; numpy's slice copies release the GIL.
    """
    bs = spec.block_size
    blocks, block_srcs = payloads[: ctx // bs], srcs[: ctx // bs]
    n_arrays = len(block_srcs[0])
    dsts = [np.empty((1, *a.shape[1:2], ctx, a.shape[3]), np.uint16) for a in block_srcs[0]]

    def numpy_copy(arrays: range = range(n_arrays)) -> None:
        for j in arrays:
            dst = dsts[j]
            for i, src in enumerate(block_srcs):
                dst[:, :, i * bs : (i + 1) * bs, :] = src[j]

    def numpy_two_threads() -> None:
        half = n_arrays // 2  # keys are the first half, values the second
        for f in [pool.submit(numpy_copy, r) for r in (range(half), range(half, n_arrays))]:
            f.result()

    def numpy_fresh() -> list[np.ndarray]:
        return [np.concatenate([s[j] for s in block_srcs], axis=2) for j in range(n_arrays)]

    def rebuild() -> list:
        return rebuild_caches(spec, blocks, ctx)

    def one_stream() -> list[mx.array]:
        return _concat_layers(blocks, n_arrays // 2, None)

    def two_streams() -> list[mx.array]:
        return _concat_layers(blocks, n_arrays // 2, SIDE)

    reused = [
        Case(NUMPY, numpy_copy),
        Case(REBUILD, rebuild),
        Case(ONE_STREAM, one_stream),
        Case(TWO_STREAMS, two_streams),
        Case(NUMPY_2T, numpy_two_threads),
    ]
    fresh = [Case(REBUILD, rebuild), Case(ONE_STREAM, one_stream), Case(NUMPY_FRESH, numpy_fresh)]
    return reused, fresh, dsts


def _concat_layers(
    blocks: Sequence[BlockKV], n_layers: int, values_stream: mx.ThreadLocalStream | None
) -> list[mx.array]:
    """Plain `mx.concatenate` per layer, keys on the default stream, values on another."""
    out = []
    for j in range(n_layers):
        out.append(mx.concatenate([p.keys[j] for p in blocks], axis=2))
        out.append(mx.concatenate([p.values[j] for p in blocks], axis=2, stream=values_stream))
    mx.eval(out)
    return out


def time_interleaved(cases: Sequence[Case], warmup: int, repeats: int) -> dict[str, tuple]:
    """Run every case once per round, `warmup` untimed rounds then `repeats` timed ones.

    Returns, per case, the list of seconds and the mean minor page faults per timed run.
    """
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    faults: dict[str, int] = dict.fromkeys(times, 0)
    for round_ in range(warmup + repeats):
        for case in cases:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            case.run()  # the result is dropped here, so its buffers are free for the next run
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[case.name].append(elapsed)
                faults[case.name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {name: (times[name], faults[name] / repeats) for name in times}


def summarize(ctx: int, regime: str, name: str, secs: list[float], faults: float, nbytes: int):
    """One table row from the timed runs."""
    cuts = statistics.quantiles(secs, n=100, method="inclusive")
    p50 = statistics.median(secs)
    return Row(
        context=ctx,
        regime=regime,
        case=name,
        runs=len(secs),
        p50_ms=round(p50 * 1e3, 2),
        p95_ms=round(cuts[94] * 1e3, 2),
        p99_ms=round(cuts[98] * 1e3, 2),
        std_ms=round(statistics.stdev(secs) * 1e3, 2),
        gb_per_s=round(nbytes / p50 / 1e9, 2),
        faults_per_run=round(faults),
    )


def check_identical(spec, payloads, ctx: int, dsts: list[np.ndarray]) -> bool:
    """`rebuild_caches` gives exactly the bytes numpy copied, for every layer's K and V."""
    caches = rebuild_caches(spec, payloads[: ctx // spec.block_size], ctx)
    got = [c.keys for c in caches] + [c.values for c in caches]  # numpy's order: K..., V...
    return _same_bytes(got, dsts)


def _same_bytes(arrays: list[mx.array], dsts: list[np.ndarray]) -> bool:
    return all(
        np.array_equal(np.asarray(memoryview(a.view(mx.uint16))), want)
        for a, want in zip(arrays, dsts, strict=True)
    )


def bench_context(
    shape: Shape,
    payloads: Sequence[BlockKV],
    srcs: list[list[np.ndarray]],
    ctx: int,
    plan: dict,
    default_limit: int,
) -> tuple[list[Row], bool]:
    """Both regimes at one context length; returns its rows and whether bytes matched."""
    spec = make_spec(shape)
    nbytes = ctx * shape.bytes_per_token
    rows = []
    mx.set_cache_limit(2 * nbytes + GIB)
    with ThreadPoolExecutor(2) as pool:
        reused, fresh, dsts = make_cases(spec, payloads, srcs, ctx, pool)
        results = time_interleaved(reused, plan["warmup"], plan["repeats"])
    rows += [summarize(ctx, "reused", n, s, f, nbytes) for n, (s, f) in results.items()]
    identical = check_identical(spec, payloads, ctx, dsts)
    del dsts, reused
    mx.set_cache_limit(default_limit)
    mx.clear_cache()
    results = time_interleaved(fresh, plan["warmup"], plan["repeats"])
    rows += [summarize(ctx, "fresh", n, s, f, nbytes) for n, (s, f) in results.items()]
    return rows, identical


def fit_shape(shape: Shape, max_ctx: int) -> tuple[Shape, str | None]:
    """Fewer layers if payloads + MLX output + numpy destination would not fit in memory."""
    avail = _mem_available()
    need = 3 * max_ctx * shape.bytes_per_token + GIB  # payloads, MLX output, numpy dst
    if avail is None or need <= 0.8 * avail:
        return shape, None
    per_layer = 3 * max_ctx * shape.bytes_per_token // shape.layers
    layers = max(1, int((0.8 * avail - GIB) // per_layer))
    note = (
        f"SCALED DOWN: {shape.layers} layers need ~{need / GIB:.1f} GiB, "
        f"{avail / GIB:.1f} GiB available; using {layers} layers"
    )
    return Shape(layers, shape.heads, shape.head_dim, shape.block_size, shape.dtype), note


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "numpy": np.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def verdict(rows: list[Row]) -> dict[str, object]:
    """rebuild_caches / numpy-into-preallocated GB/s per context, in each regime."""
    by = {(r.context, r.regime, r.case): r for r in rows}
    ratios: dict[str, dict[str, float]] = {"reused": {}, "fresh": {}}
    two_threads: dict[str, float] = {}
    for ctx in sorted({r.context for r in rows}):
        base = by[(ctx, "reused", NUMPY)].gb_per_s
        for regime in ratios:
            ratios[regime][str(ctx)] = round(by[(ctx, regime, REBUILD)].gb_per_s / base, 2)
        like = by[(ctx, "reused", NUMPY_2T)].gb_per_s
        two_threads[str(ctx)] = round(by[(ctx, "reused", REBUILD)].gb_per_s / like, 2)
    return {
        "target_ratio": TARGET_RATIO,
        "ratio_reused": ratios["reused"],
        "ratio_fresh": ratios["fresh"],
        "target_met_reused": all(v >= TARGET_RATIO for v in ratios["reused"].values()),
        "target_met_fresh": all(v >= TARGET_RATIO for v in ratios["fresh"].values()),
        "ratio_reused_vs_numpy_2_threads": two_threads,
    }


def print_report(rows: list[Row], meta: dict, result: dict) -> None:
    """Print the comparison table and the verdict."""
    shape = meta["shape"]
    print("EXP-006 gather: rebuild an agent's cache from pool blocks vs a numpy copy")
    print(
        f"shape: {shape['layers']} layers x K,V x [1, {shape['heads']}, T, {shape['head_dim']}] "
        f"{shape['dtype']}, {shape['block_size']}-token blocks, "
        f"{shape['bytes_per_token'] // 1024} KiB/token"
    )
    if meta["scaled"]:
        print(meta["scaled"])
    print(f"{meta['python']} on {meta['processor']}, {meta['cores']} cores ({meta['platform']})")
    print(f"mlx {meta['mlx']} ({meta['mlx_device']}), numpy {meta['numpy']}", end="")
    print(f", GLIBC_TUNABLES={meta['glibc_tunables'] or '(unset)'}")
    print(f"{meta['runs']} timed runs after {meta['warmup']} warm-up rounds, cases interleaved")
    print("reused: MLX cache limit raised above one rebuild (freed buffers reused)")
    print(f"fresh:  MLX default cache limit ({meta['default_cache_limit'] >> 20} MiB)")
    head = f"{'ctx':>5} {'regime':6} {'case':36} {'GiB':>5} {'p50 ms':>8} {'p95':>8}"
    print(head + f" {'p99':>8} {'std':>7} {'GB/s':>6} {'faults':>8}")
    for r in rows:
        gib = r.context * shape["bytes_per_token"] / GIB
        print(
            f"{r.context:>5} {r.regime:6} {r.case:36} {gib:>5.2f} {r.p50_ms:>8.1f} "
            f"{r.p95_ms:>8.1f} {r.p99_ms:>8.1f} {r.std_ms:>7.1f} {r.gb_per_s:>6.2f} "
            f"{r.faults_per_run:>8.0f}"
        )
    print("faults = minor page faults per run; p95/p99 of few runs are close to the max")

    def word(ok: object) -> str:
        return "MET" if ok else "NOT MET"

    print(f"target: {REBUILD} >= {TARGET_RATIO}x '{NUMPY}' GB/s (p50)")
    print(f"  reused: {result['ratio_reused']} -> {word(result['target_met_reused'])}")
    print(f"  fresh:  {result['ratio_fresh']} -> {word(result['target_met_fresh'])}")
    print("  (rebuild_caches copies on two threads; reused vs numpy on two threads too: ", end="")
    print(f"{result['ratio_reused_vs_numpy_2_threads']}, not the target)")
    print(f"rebuilt arrays identical to numpy's bytes: {meta['identical']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2K and 4K, 5 runs")
    parser.add_argument("--contexts", type=int, nargs="+", help="context lengths in tokens")
    parser.add_argument("--repeats", type=int, help="timed runs per case (>= 2)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("bench/gather.json"))
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("contexts", "repeats", "warmup"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    shape = Shape(layers=args.layers)
    if plan["repeats"] < 2 or any(c <= 0 or c % shape.block_size for c in plan["contexts"]):
        parser.error(f"--repeats >= 2; contexts positive multiples of {shape.block_size}")

    started = time.perf_counter()
    shape, scaled = fit_shape(shape, max(plan["contexts"]))
    payloads = make_payloads(shape, max(plan["contexts"]) // shape.block_size, args.seed)
    srcs = numpy_sources(payloads)
    default_limit = mx.set_cache_limit(0)
    mx.set_cache_limit(default_limit)
    rows: list[Row] = []
    identical = True
    for ctx in plan["contexts"]:
        ctx_rows, ok = bench_context(shape, payloads, srcs, ctx, plan, default_limit)
        rows += ctx_rows
        identical = identical and ok
    meta = machine() | {
        "shape": asdict(shape) | {"bytes_per_token": shape.bytes_per_token},
        "scaled": scaled,
        "runs": plan["repeats"],
        "warmup": plan["warmup"],
        "default_cache_limit": default_limit,
        "identical": identical,
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    result = verdict(rows)
    print_report(rows, meta, result)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"experiment": "EXP-006", "meta": meta, "result": result}
    report["rows"] = [asdict(row) for row in rows]
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['wall_s']} s)")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
