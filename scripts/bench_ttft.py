"""Time to first token: cold vs warm in memory vs warm after a restart, 512 to 8K tokens.

The in-process engine with a CacheStore, built as the daemon builds it (`process._make_engine`
with the daemon's default options: pool from the 1 GiB memory budget, 512-token prefill
chunks, MLX cache limit raised to the pool's size) on the benchmark model (a ~5 M
parameter llama, float32; `--model DIR` for another), in a temp store. One agent per context
length L (512, 1024, 2048, 4096 and 8000 tokens; --quick: 512 to 2048), each prompt random
non-special token ids (seeded), greedy, 2 tokens per turn, one turn at a time:

- cold: the agent's first turn, its L tokens all prefilled (no cache).
- warm in memory: a later turn of 16 new tokens on top of its context, its cache in the pool.
- after restart: `engine.close()` (write-back flushed, store closed), MLX's buffer cache
  cleared, then a new engine from the same factory on the same store (as a restarted
  daemon); the agent's next turn (16 new tokens) restores its cache from disk first. The
  store's files are in the page cache (a daemon restart); "after restart, page cache
  dropped" does the same after `os.sync()` and `posix_fadvise(DONTNEED)` on every file of
  the store (as after a reboot; best effort).

TTFT is the engine's `usage.ttft_ms`: from `submit` to the first generated token (queueing,
restore, the prefill of what is not cached, the first decode step). Cold runs once per
length (an 8K cold prefill takes minutes on a small CPU); then rounds alternate the two
restart regimes, each round: restart, one turn per agent (restored), one more turn per agent
(warm in memory). Medians. Every turn's usage is checked against its regime (cold: nothing
cached; warm: the whole context cached, nothing restored; restart: the whole context
restored); a mismatch is reported. The table shows each regime's TTFT and cold / warm
ratios; no target.

Usage: python scripts/bench_ttft.py [--quick] [--contexts 512 8000] [--out bench/ttft.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from agentkv.daemon.engine.model_factory import ensure_random_model
from agentkv.daemon.service.process import DaemonOptions, _make_engine

TURN_TOKENS = 16
MAX_TOKENS = 2
MAX_POSITIONS = 8192  # the benchmark model's max_position_embeddings
COLD = "cold"
WARM = "warm in memory"
RESTART = "after restart"
DROPPED = "after restart, page cache dropped"
REGIMES = (COLD, WARM, RESTART, DROPPED)
FULL = {"contexts": [512, 1024, 2048, 4096, 8000], "rounds": 4}
QUICK = {"contexts": [512, 1024, 2048], "rounds": 2}


@dataclass(slots=True)
class Sample:
    """One turn's first-token time and what its usage says about it."""

    regime: str
    context: int
    prompt_tokens: int
    cached_tokens: int
    restored_tokens: int
    ttft_ms: float
    restore_ms: float
    as_expected: bool


@dataclass(slots=True)
class Row:
    """Medians of one regime at one context length."""

    context: int
    regime: str
    runs: int
    ttft_ms: float
    min_ms: float
    max_ms: float
    restore_ms: float
    cold_over_this: float
    as_expected: bool


class Bench:
    """The engine, rebuilt from the daemon's factory on one store at every restart."""

    def __init__(self, model_dir: Path, root: Path) -> None:
        self.opts = DaemonOptions(model=str(model_dir), store=root, socket="ipc:///unused")
        self.engine = _make_engine(self.opts, {})
        self.samples: list[Sample] = []

    def restart(self, drop_page_cache: bool) -> None:
        """Close the engine, forget MLX's buffers, build a new one on the same store."""
        self.engine.close()
        self.engine = None
        gc.collect()
        mx.clear_cache()
        if drop_page_cache:
            drop_files(self.opts.store)
        self.engine = _make_engine(self.opts, {})

    def turn(self, agent: str, tokens: list[int], regime: str, context: int) -> Sample:
        """One turn of `agent`; its completion's usage becomes a sample."""
        before = len(self.engine.agent_tokens(agent)) if regime != COLD else 0
        uid = self.engine.submit(agent, tokens, max_tokens=MAX_TOKENS, temperature=0.0)
        done = [c for c in self.engine.step() if c.uid == uid]
        if len(done) != 1 or done[0].finish_reason == "error":
            raise RuntimeError(f"turn of {agent} failed: {done}")
        u = done[0].usage
        if regime == COLD:
            expected = u.cached_tokens == 0
        elif regime == WARM:
            expected = u.cached_tokens == before and u.restored_tokens == 0
        else:  # the whole context restored from disk
            expected = u.cached_tokens == before and u.restored_tokens == before
        sample = Sample(
            regime=regime,
            context=context,
            prompt_tokens=u.prompt_tokens,
            cached_tokens=u.cached_tokens,
            restored_tokens=u.restored_tokens,
            ttft_ms=u.ttft_ms,
            restore_ms=u.restore_ms,
            as_expected=expected,
        )
        self.samples.append(sample)
        return sample

    def close(self) -> None:
        """Close the engine (flushes the store)."""
        if self.engine is not None:
            self.engine.close()


def drop_files(root: Path) -> None:
    """Best effort: write out dirty pages, then drop every file under `root` from the cache."""
    os.sync()
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def random_tokens(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    """`n` token ids drawn from [low, high)."""
    return [rng.randrange(low, high) for _ in range(n)]


def run(bench: Bench, contexts: list[int], rounds: int, seed: int) -> None:
    """Warm-up, cold turns, then rounds of restart + restored turn + warm turn per agent."""
    engine = bench.engine
    low = max(engine.tokenizer.all_special_ids or [0]) + 1
    high = engine.spec.vocab_size
    rng = random.Random(seed)
    warm_up = random_tokens(rng, 256, low, high)
    for regime in (COLD, WARM):  # untimed: MLX's kernels and the engine's paths
        bench.turn("warm-up", warm_up[: 256 if regime == COLD else TURN_TOKENS], regime, 0)
    bench.samples.clear()
    agents = {n: f"ctx-{n}" for n in contexts}
    for n, agent in agents.items():
        print(f"cold prefill of {n} tokens ...", file=sys.stderr, flush=True)
        bench.turn(agent, random_tokens(rng, n, low, high), COLD, n)
    for n, agent in agents.items():
        bench.turn(agent, random_tokens(rng, TURN_TOKENS, low, high), WARM, n)
    for r in range(rounds):
        regime = RESTART if r % 2 == 0 else DROPPED
        print(f"round {r + 1}/{rounds}: {regime} ...", file=sys.stderr, flush=True)
        bench.restart(drop_page_cache=regime == DROPPED)
        for n, agent in agents.items():
            bench.turn(agent, random_tokens(rng, TURN_TOKENS, low, high), regime, n)
        for n, agent in agents.items():
            bench.turn(agent, random_tokens(rng, TURN_TOKENS, low, high), WARM, n)


def summarize(samples: list[Sample], contexts: list[int]) -> list[Row]:
    """Medians per context length and regime, with cold / this regime."""
    rows = []
    for n in contexts:
        cold = statistics.median(s.ttft_ms for s in samples if s.context == n and s.regime == COLD)
        for regime in REGIMES:
            got = [s for s in samples if s.context == n and s.regime == regime]
            if not got:
                continue
            ttft = statistics.median(s.ttft_ms for s in got)
            rows.append(
                Row(
                    context=n,
                    regime=regime,
                    runs=len(got),
                    ttft_ms=round(ttft, 2),
                    min_ms=round(min(s.ttft_ms for s in got), 2),
                    max_ms=round(max(s.ttft_ms for s in got), 2),
                    restore_ms=round(statistics.median(s.restore_ms for s in got), 2),
                    cold_over_this=round(cold / ttft, 1),
                    as_expected=all(s.as_expected for s in got),
                )
            )
    return rows


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


def model_size(model) -> tuple[int, str]:
    """The model's real parameter count and a word for its weights' types.

    A quantized layer's packed uint32 `weight` holds 32 / bits values per element; its
    `scales` and `biases` are quantization metadata, not parameters.
    """
    bits = {name: m.bits for name, m in model.named_modules() if hasattr(m, "bits")}
    count, kinds = 0, set()
    for name, v in tree_flatten(model.parameters()):
        module, _, leaf = name.rpartition(".")
        if module not in bits:
            count += v.size
            kinds.add(str(v.dtype).split(".")[-1])
        elif leaf == "weight":
            count += v.size * 32 // bits[module]
            kinds.add(f"{bits[module]}-bit")
    return count, "+".join(sorted(kinds, key=lambda k: (not k.endswith("-bit"), k)))


def describe_model(model, path: Path) -> dict[str, object]:
    """The model's size and shape, for the report."""
    args = model.args
    params, dtype = model_size(model)
    return {
        "path": str(path),
        "model_type": args.model_type,
        "hidden_size": args.hidden_size,
        "layers": args.num_hidden_layers,
        "kv_heads": args.num_key_value_heads,
        "head_dim": args.hidden_size // args.num_attention_heads,
        "params_m": round(params / 1e6, 2),
        "dtype": dtype,
        "blas": os.environ.get("LD_PRELOAD") or "bundled (mlx[cpu] reference BLAS)",
    }


def print_report(rows: list[Row], meta: dict) -> None:
    """Print the table."""
    m = meta["model"]
    print("Time to first token: cold vs warm in memory vs warm after a restart (in-process)")
    print(
        f"model: {m['model_type']} {m['params_m']} M params, hidden {m['hidden_size']} x "
        f"{m['layers']} layers, {m['dtype']}; engine and store built as the daemon builds them "
        f"({meta['prefill_step_size']}-token prefill chunks); turns of {TURN_TOKENS} new "
        f"tokens, {MAX_TOKENS} generated"
    )
    print(f"{meta['python']} on {meta['processor']}, {meta['cores']} cores ({meta['platform']})")
    print(f"mlx {meta['mlx']} ({meta['mlx_device']}); load average {meta['loadavg']}")
    print("TTFT = usage.ttft_ms (submit to first token); medians; cold runs once per length")
    print(
        f"{'context':>7}  {'regime':34} {'runs':>4} {'ttft ms':>10} {'min':>10} {'max':>10} "
        f"{'restore ms':>10} {'cold/this':>9} {'usage ok':>8}"
    )
    for r in rows:
        print(
            f"{r.context:>7}  {r.regime:34} {r.runs:>4} {r.ttft_ms:>10.1f} {r.min_ms:>10.1f} "
            f"{r.max_ms:>10.1f} {r.restore_ms:>10.1f} {r.cold_over_this:>9.1f} "
            f"{'yes' if r.as_expected else 'NO':>8}"
        )
    if not all(r.as_expected for r in rows):
        print("WARNING: some turns' usage does not match their regime (see samples in the JSON)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 to 2048 tokens, 2 rounds")
    parser.add_argument("--contexts", type=int, nargs="+", help="context lengths in tokens")
    parser.add_argument("--rounds", type=int, help="restart rounds (alternating regimes)")
    parser.add_argument("--model", type=Path, help="model dir (default: the embedded model)")
    parser.add_argument("--dir", type=Path, help="where the store goes (default: a tmpdir)")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("bench/ttft.json"))
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("contexts", "rounds"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    plan["contexts"] = sorted(set(plan["contexts"]))
    longest = max(plan["contexts"]) + (plan["rounds"] * 2 + 1) * (TURN_TOKENS + MAX_TOKENS)
    if plan["rounds"] < 1 or min(plan["contexts"]) < 1 or longest > MAX_POSITIONS:
        parser.error(f"--rounds >= 1; contexts plus all turns within {MAX_POSITIONS} positions")

    started = time.perf_counter()
    loadavg = [os.getloadavg()]
    model_dir = (args.model or ensure_random_model()).expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="bench-ttft-", dir=args.dir) as tmp:
        bench = Bench(model_dir, Path(tmp) / "store")
        try:
            model = describe_model(bench.engine.model, model_dir)
            run(bench, plan["contexts"], plan["rounds"], args.seed)
        finally:
            bench.close()
    loadavg.append(os.getloadavg())
    rows = summarize(bench.samples, plan["contexts"])
    meta = machine() | {
        "model": model,
        "prefill_step_size": bench.opts.prefill_step_size,
        "turn_tokens": TURN_TOKENS,
        "max_tokens": MAX_TOKENS,
        "rounds": plan["rounds"],
        "seed": args.seed,
        "loadavg": [[round(x, 2) for x in la] for la in loadavg],
        "quick": args.quick,
    }
    print_report(rows, meta)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    result = {
        "contexts": plan["contexts"],
        "as_expected": all(r.as_expected for r in rows),
        "cold_over_warm": {r.context: r.cold_over_this for r in rows if r.regime == WARM},
        "cold_over_restart": {r.context: r.cold_over_this for r in rows if r.regime == RESTART},
        "cold_over_restart_dropped": {
            r.context: r.cold_over_this for r in rows if r.regime == DROPPED
        },
    }
    report = {"experiment": "ttft", "meta": meta, "result": result}
    report |= {"rows": [asdict(r) for r in rows], "samples": [asdict(s) for s in bench.samples]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
